"""A small bundle for a 3-channel vibration stream at any rate and window (issue 12's contract and block
tests, bench/stream_khz.py), and recordings that stream through it.

The run is written with RunMeta like tests/runfactory.py's, but its features are the agent's own (`machine`
extractor of edgekit/features.py over the windows), so the exported bundle runs in the agent. Signals: a
shaft tone at 2 % of the rate plus noise; the fault class adds a tone at 30 % of the rate. Trained in seconds.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from edgekit.contract.run import (
    AutoencoderModel,
    ChannelRange,
    GateTarget,
    PredictorModel,
    RunInput,
    RunMeta,
    RunModels,
    SecondOpinionModel,
    write_run,
)
from edgekit.manifest import Normalize, Recording, Stats

CHANNELS = ("ax", "ay", "az")


def signal(rng: np.random.Generator, n: int, rate_hz: float, fault: np.ndarray | bool = False,
           start_s: float = 0.0) -> np.ndarray:
    """(n, 3) samples from `start_s`; `fault` per sample (or one for all) adds the fault tone. Values are
    float32-exact, so a float32 binary block carries them unchanged."""
    t = start_s + np.arange(n) / rate_hz
    base = np.stack([np.sin(2 * np.pi * 0.02 * rate_hz * t + k) for k in range(3)], axis=1)
    tone = 0.8 * np.sin(2 * np.pi * 0.3 * rate_hz * t)[:, None] * np.asarray(fault, dtype=np.float64).reshape(-1, 1)
    x = base + tone + rng.normal(0, 0.3, size=(n, 3))
    return x.astype(np.float32).astype(np.float64)


def make_stream_run(root: Path, *, rate_hz: float, window: int, hop: int, n: int = 600, seed: int = 0,
                    epochs: int = 40) -> Path:
    """Train tiny models on `n` windows (half normal, half fault) and write a run directory; returns it."""
    import torch
    from sklearn.ensemble import RandomForestClassifier

    from edgekit.exporters.training.models import build, save_checkpoint
    from edgekit.features import EXTRACTORS, extract

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    windows = np.stack([signal(rng, window, rate_hz, bool(label), start_s=rng.uniform(0, 100)) for label in y])
    raw = extract("machine", windows, rate_hz).astype(np.float32)
    names = EXTRACTORS["machine"].names(list(CHANNELS))
    idx = rng.permutation(n)
    parts = {"train": idx[: n // 2], "cal": idx[n // 2: 3 * n // 4], "test": idx[3 * n // 4:]}
    f_mean, f_std = raw[parts["train"]].mean(0), raw[parts["train"]].std(0) + 1e-6
    feats = ((raw - f_mean) / f_std).astype(np.float32)
    splits: dict[str, np.ndarray] = {}
    for name, ix in parts.items():
        splits[f"{name}_features"], splits[f"{name}_features_raw"], splits[f"{name}_y"] = feats[ix], raw[ix], y[ix]

    run = root / f"run-stream-{rate_hz:g}"
    run.mkdir(parents=True)
    kwargs = {"n_features": feats.shape[1], "n_classes": 2, "hidden": (32, 16)}
    model = build("mlp", **kwargs)
    xt, yt = torch.from_numpy(splits["train_features"]), torch.from_numpy(splits["train_y"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model.logits(xt), yt).backward()
        opt.step()
    model.eval()
    save_checkpoint(run / "predictor.pt", model, "mlp", kwargs)
    ae_kwargs = {"n_features": feats.shape[1], "hidden": (8, 3)}
    ae = build("dense_ae", **ae_kwargs)
    rows = torch.from_numpy(splits["train_features"])  # fit_on "all": a fault is a class, not out of distribution
    opt = torch.optim.Adam(ae.parameters(), lr=1e-2)
    ae.train()
    for _ in range(epochs * 2):
        opt.zero_grad()
        ae(rows).mean().backward()
        opt.step()
    ae.eval()
    save_checkpoint(run / "autoencoder.pt", ae, "dense_ae", ae_kwargs)
    clf = RandomForestClassifier(n_estimators=20, max_depth=6, random_state=seed)
    clf.fit(splits["train_features"], splits["train_y"])
    with open(run / "second_opinion.pkl", "wb") as fh:
        pickle.dump(clf, fh)
    np.savez_compressed(run / "splits.npz", **splits)
    train_w = windows[parts["train"]]
    write_run(run, RunMeta(
        task="stream", recipe={"name": "stream"}, seed=seed, device="cpu", labels=["normal", "fault"],
        normal_label="normal", positive_label="fault",
        input=RunInput(kind="window", extractor="machine", channels=list(CHANNELS), rate_hz=float(rate_hz),
                       window_size=window, window_hop=hop, feature_names=names,
                       channel_range=ChannelRange(min=train_w.min(axis=(0, 1)).tolist(),
                                                  max=train_w.max(axis=(0, 1)).tolist()),
                       recording=Recording(delimiter=",", header_line=1, rate_hz=float(rate_hz))),
        normalize=Normalize(features=Stats(mean=f_mean.tolist(), std=f_std.tolist())),
        data_fingerprint="0" * 64,
        models=RunModels(predictor=PredictorModel(file="predictor.pt", arch="mlp", input="features"),
                         autoencoder=AutoencoderModel(file="autoencoder.pt", arch="dense_ae", input="features",
                                                                  fit_on="all"),
                         second_opinion=SecondOpinionModel(file="second_opinion.pkl", kind="random_forest",
                                                           input="features")),
        gate=GateTarget(target_error=0.1, delta=0.1),
        created_at="2026-01-01T00:00:00+00:00", code_version="test"))
    return run


def make_stream_bundle(root: Path, *, rate_hz: float, window: int, hop: int, n: int = 600) -> Path:
    """make_stream_run, exported (INT8) to root/bundle-stream-RATE; returns the bundle directory."""
    from edgekit.exporters.export.export import export

    run = make_stream_run(root, rate_hz=rate_hz, window=window, hop=hop, n=n)
    bundle = root / f"bundle-stream-{rate_hz:g}"
    export(run, bundle, int8=True, progress=False)
    return bundle


def recording(rate_hz: float, seconds: float, seed: int = 1) -> np.ndarray:
    """(n, 3) samples: normal for the first half, faulty for the second."""
    n = int(round(seconds * rate_hz))
    return signal(np.random.default_rng(seed), n, rate_hz, np.arange(n) >= n // 2)


def write_csv(path: Path, values: np.ndarray, columns: tuple[str, ...] = CHANNELS,
              t_s: np.ndarray | None = None) -> Path:
    """A recording in the bundle's layout (header line, comma-separated; a leading 't' column with `t_s`);
    repr of each float so replay reads back the same numbers."""
    cells = [[repr(float(v)) for v in row] for row in values]
    if t_s is not None:
        columns = ("t", *columns)
        cells = [[repr(float(t)), *row] for t, row in zip(t_s, cells)]
    path.write_text(",".join(columns) + "\n" + "\n".join(",".join(row) for row in cells) + "\n")
    return path


class Gateway:
    """A sensor gateway: a paho client publishing QoS 1 to `topic` (the MQTT source's tests and the own-sensor
    test stream recordings through it)."""

    def __init__(self, port: int, topic: str, client_id: str = "test-gateway") -> None:
        import paho.mqtt.client as mqtt

        self.topic = topic
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, *items: bytes) -> None:
        for payload in items:
            self.client.publish(self.topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
