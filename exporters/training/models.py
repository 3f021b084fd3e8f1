"""The torch models a recipe can ask for, looked up by `arch` in MODELS. Output contracts (kept by export):

    mlp       x [N, F] normalised features      -> probs [N, K] (softmax inside the graph)
    cnn1d     x [N, C, W] normalised window     -> probs [N, K]
    dense_ae  x [N, F] normalised features      -> score [N] mean squared reconstruction error
                                                   (exported as ScoreAndErrors: score [N], errors [N, F])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, n_features: int, n_classes: int, hidden: tuple[int, ...] = (64, 32),
                 dropout: float = 0.1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, n_classes))
        self.body = nn.Sequential(*layers)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.body(x), dim=-1)


class CNN1D(nn.Module):
    """Any channel count and window length: the convolutions slide over time and the global average pool
    makes the head's width independent of `window`, which must only survive the two 2x poolings."""

    MIN_WINDOW = 4

    def __init__(self, n_channels: int, n_classes: int, window: int, width: int = 32,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if window < self.MIN_WINDOW or n_channels < 1:
            raise ValueError(f"cnn1d needs >= 1 channel and windows of >= {self.MIN_WINDOW} samples (got "
                             f"{n_channels} channels, window {window})")
        self.window = window
        self.features = nn.Sequential(
            nn.Conv1d(n_channels, width, kernel_size=7, padding=3), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(width, width * 2, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(width * 2, width * 2, kernel_size=3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(width * 2, n_classes))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=-1)


class DenseAE(nn.Module):
    def __init__(self, n_features: int, hidden: tuple[int, ...] = (32, 8)) -> None:
        super().__init__()
        enc: list[nn.Module] = []
        width = n_features
        for h in hidden:
            enc += [nn.Linear(width, h), nn.ReLU()]
            width = h
        dec: list[nn.Module] = []
        for h in reversed((n_features, *hidden[:-1])):
            dec += [nn.Linear(width, h), nn.ReLU()]
            width = h
        dec = dec[:-1]  # no activation on the reconstruction
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((self.reconstruct(x) - x) ** 2).mean(dim=-1)


class ScoreAndErrors(nn.Module):
    """A dense autoencoder as export writes it: (score [N], errors [N, F]), the per-feature squared
    reconstruction errors beside their mean, the same ops as DenseAE.forward (so the same score), with the
    errors as a second output the agent reads for an `ood` deferral's attribution (edgekit/gate.py)."""

    def __init__(self, autoencoder: DenseAE) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        errors = (self.autoencoder.reconstruct(x) - x) ** 2
        return errors.mean(dim=-1), errors


MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn1d": CNN1D, "dense_ae": DenseAE}


def build(arch: str, **kwargs: Any) -> nn.Module:
    if arch not in MODELS:
        raise KeyError(f"unknown arch {arch!r}; expected one of {sorted(MODELS)}")
    return MODELS[arch](**kwargs)


def save_checkpoint(path: Any, model: nn.Module, arch: str, kwargs: dict[str, Any]) -> None:
    torch.save({"arch": arch, "kwargs": kwargs, "state_dict": model.state_dict()}, path)


def load_checkpoint(path: Any) -> tuple[nn.Module, dict[str, Any]]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = build(ckpt["arch"], **ckpt["kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, ckpt
