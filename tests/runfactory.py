"""A small run directory in the layout exporters/training/train.py writes (edgekit/contract/run.py; run.json
built with RunMeta), trained in seconds on synthetic signals, so export tests do not depend on the training
pipeline or datasets. With `params`, the features are edgekit.features' 'spectral' ones of the windows (and
the raw windows are kept in the run directory, see `raw_windows`), so a bundle's agent can be checked
against them.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from edgekit.contract.run import (
    AutoencoderModel,
    GateTarget,
    PredictorModel,
    RunInput,
    RunMeta,
    RunModels,
    SecondOpinionModel,
    write_run,
)
from edgekit.manifest import FeatureParams, Normalize, Stats

RATE_HZ = 32.0
RAW_WINDOWS = "factory_windows.npz"  # not part of the run contract: for tests that replay the windows


def _signals(rng: np.random.Generator, n: int, n_classes: int, channels: int, width: int):
    y = rng.integers(0, n_classes, size=n)
    t = np.arange(width) / width
    freq = 2.0 + 3.0 * y  # class sets the frequency
    phase = rng.uniform(0, 2 * np.pi, size=(n, channels))
    amp = 1.0 + 0.3 * y[:, None]
    windows = amp[:, :, None] * np.sin(2 * np.pi * freq[:, None, None] * t[None, None, :] + phase[:, :, None])
    windows = windows + rng.normal(0, 0.6, size=windows.shape)  # noisy: not every case is easy
    return windows.astype(np.float32), y.astype(np.int64)


def _features(windows: np.ndarray) -> np.ndarray:
    diff = np.diff(windows, axis=-1)
    return np.concatenate([windows.std(-1), np.abs(diff).mean(-1), windows.max(-1) - windows.min(-1)],
                          axis=1).astype(np.float32)


def raw_windows(run: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The raw windows (n, width, channels) float64 of a run made with `params`, and each split's rows."""
    with np.load(run / RAW_WINDOWS) as data:
        return data["windows"], {s: data[f"{s}_rows"] for s in ("train", "cal", "test")}


def make_run(root: Path, *, arch: str = "mlp", n_classes: int = 2, second: str = "random_forest",
             n: int = 1500, seed: int = 0, epochs: int = 60, channels: int = 3, width: int = 32,
             params: FeatureParams | None = None) -> Path:
    """Train tiny models and write a run directory under `root`; returns its path. `channels` and `width`
    shape the windows (names ax, ay, az for 3 channels, else c0, c1, ...); `params`: the features are the
    'spectral' extractor's with these parameters instead of the factory's own nine."""
    import torch
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.svm import SVC

    from edgekit.exporters.training.models import build, save_checkpoint

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    windows, y = _signals(rng, n, n_classes, channels, width)
    chans = ["ax", "ay", "az"] if channels == 3 else [f"c{i}" for i in range(channels)]
    if params is None:
        raw = _features(windows)
        names = [f"{stat}_{c}" for stat in ("std", "mad", "range") for c in chans]
    else:
        from edgekit.features import extract, feature_names

        as_recorded = windows.transpose(0, 2, 1).astype(np.float64)  # (n, width, channels), as the agent cuts
        raw = extract("spectral", as_recorded, RATE_HZ, params)
        names = feature_names("spectral", chans, params)
    idx = rng.permutation(n)
    parts = {"train": idx[: n // 2], "cal": idx[n // 2: 3 * n // 4], "test": idx[3 * n // 4:]}
    f_mean, f_std = raw[parts["train"]].mean(0), raw[parts["train"]].std(0) + 1e-6
    w_mean = windows[parts["train"]].mean(axis=(0, 2))
    w_std = windows[parts["train"]].std(axis=(0, 2)) + 1e-6
    feats = ((raw - f_mean) / f_std).astype(np.float32)
    wins = ((windows - w_mean[None, :, None]) / w_std[None, :, None]).astype(np.float32)
    splits: dict[str, np.ndarray] = {}
    for name, ix in parts.items():
        splits[f"{name}_features"] = feats[ix]
        splits[f"{name}_features_raw"] = raw[ix]
        splits[f"{name}_y"] = y[ix]
        if arch == "cnn1d":
            splits[f"{name}_window"] = wins[ix]

    run = root / f"run-{arch}-{n_classes}"
    run.mkdir(parents=True)
    if params is not None:
        np.savez_compressed(run / RAW_WINDOWS, windows=as_recorded, **{f"{s}_rows": ix for s, ix in parts.items()})
    n_features = feats.shape[1]
    if arch == "mlp":
        kwargs = {"n_features": n_features, "n_classes": n_classes, "hidden": (32, 16)}
        x_train = splits["train_features"]
    else:
        kwargs = {"n_channels": channels, "n_classes": n_classes, "window": width, "width": 8}
        x_train = splits["train_window"]
    model = build(arch, **kwargs)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(splits["train_y"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model.logits(xt), yt)
        loss.backward()
        opt.step()
    model.eval()
    save_checkpoint(run / "predictor.pt", model, arch, kwargs)

    ae_kwargs = {"n_features": n_features, "hidden": (8, 3)}
    ae = build("dense_ae", **ae_kwargs)
    normal = torch.from_numpy(splits["train_features"][splits["train_y"] == 0])
    opt = torch.optim.Adam(ae.parameters(), lr=1e-2)
    ae.train()
    for _ in range(epochs * 2):
        opt.zero_grad()
        loss = ae(normal).mean()
        loss.backward()
        opt.step()
    ae.eval()
    save_checkpoint(run / "autoencoder.pt", ae, "dense_ae", ae_kwargs)

    if second == "random_forest":
        clf = RandomForestClassifier(n_estimators=30, max_depth=6, random_state=seed)
    else:
        clf = SVC(probability=True, random_state=seed)
    clf.fit(splits["train_features"], splits["train_y"])
    with open(run / "second_opinion.pkl", "wb") as fh:
        pickle.dump(clf, fh)

    np.savez_compressed(run / "splits.npz", **splits)
    labels = ["normal"] + [f"fault_{i}" for i in range(1, n_classes)]
    write_run(run, RunMeta(
        task=f"synthetic-{arch}", recipe={"name": "synthetic"}, seed=seed, device="cpu", labels=labels,
        normal_label="normal", positive_label="fault_1" if n_classes == 2 else None,
        input=RunInput(kind="window", extractor="machine" if params is None else "spectral", channels=chans,
                       rate_hz=RATE_HZ, window_size=width, window_hop=width // 2, feature_names=names,
                       feature_params=params),
        normalize=Normalize(features=Stats(mean=f_mean.tolist(), std=f_std.tolist()),
                            window=Stats(mean=w_mean.tolist(), std=w_std.tolist()) if arch == "cnn1d" else None),
        data_fingerprint="0" * 64,
        models=RunModels(
            predictor=PredictorModel(file="predictor.pt", arch=arch, input="features" if arch == "mlp" else "window"),
            autoencoder=AutoencoderModel(file="autoencoder.pt", arch="dense_ae", input="features"),
            second_opinion=SecondOpinionModel(file="second_opinion.pkl", kind=second, input="features")),
        gate=GateTarget(target_error=0.05, delta=0.1),
        created_at="2026-01-01T00:00:00+00:00", code_version="test"))
    return run
