"""A user's own recordings, generated: a 3-axis vibration sensor at 1 kHz on a few machines, as CSV files
with an epoch-seconds time column and a text label column (normal / fault), one file with a time gap.

What a factory engineer would bring to edgekit (issue 12), made here so tests need no dataset. The fault
adds a 157 Hz tone with 31 Hz impacts (a bearing-like signature) and more broadband noise on top of the
50 Hz rotation; each file runs normal, then fault from `fault_from` of its length.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CHANNELS = ("vib_x", "vib_y", "vib_z")
LABELS = ("normal", "fault")

RECIPE = """\
task = "{task}"
seed = 0
labels = ["normal", "fault"]

[data]
loader = "recordings"
path = "{path}"
relative_to = "recipe"
channels = ["vib_x", "vib_y", "vib_z"]
units = {{ vib_x = "m/s^2", vib_y = "m/s^2", vib_z = "m/s^2" }}
name_pattern = '(?P<machine>machine-\\d+)/'
group_columns = ["machine"]

[[data.files]]
glob = "*/*.csv"

[data.layout]
delimiter = ","
time_column = "time"
time_format = "seconds"

[data.label]
source = "column"
column = "state"
at = "last"

[window]
size = {size}
hop = {hop}

[features]
extractor = "machine"

[predictor]
arch = "mlp"
hidden = [32]
epochs = {epochs}

[autoencoder]
hidden = [16, 4]
epochs = {epochs}

[second_opinion]
kind = "random_forest"
params = {{ n_estimators = 20, max_depth = 6 }}

[splits]
group_by = "file"
"""


def signal(n: int, rate_hz: float, fault: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) vibration in m/s^2; rows where `fault` is True carry the fault's signature."""
    t = np.arange(n) / rate_hz
    base = np.stack([np.sin(2 * np.pi * 50 * t + p) for p in (0.0, 1.0, 2.0)], axis=1)
    out = base + 0.2 * rng.standard_normal((n, 3))
    impacts = (np.sin(2 * np.pi * 31 * t) > 0.95).astype(float)
    tone = (0.8 * np.sin(2 * np.pi * 157 * t) + 1.5 * impacts)[:, None] * np.array([1.0, 0.6, 0.3])
    out[fault] += tone[fault] + 0.3 * rng.standard_normal((int(fault.sum()), 3))
    return out + np.array([0.0, 0.0, 9.81])


def write_recording(path: Path, t: np.ndarray, values: np.ndarray, fault: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fh.write("time," + ",".join(CHANNELS) + ",state\n")
        for ti, row, f in zip(t, values, fault):
            fh.write(f"{ti:.6f},{row[0]:.5f},{row[1]:.5f},{row[2]:.5f},{LABELS[int(f)]}\n")
    return path


def vibration_recordings(root: Path, *, machines: int = 4, runs: int = 2, seconds: float = 4.0,
                         rate_hz: float = 1000.0, fault_from: float = 0.5, gap: tuple[str, float, float] = (
                             "machine-1/run-1.csv", 1.0, 2.0), seed: int = 0) -> list[Path]:
    """machines x runs CSV files under root/machine-M/run-R.csv; `gap` = (file, at seconds, length seconds):
    that file's clock jumps by the length at that time. Returns the files."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate_hz)
    files = []
    for m in range(machines):
        for r in range(runs):
            rel = f"machine-{m}/run-{r}.csv"
            t = 1_700_000_000.0 + 3600 * (m * runs + r) + np.arange(n) / rate_hz
            if rel == gap[0]:
                t[int(gap[1] * rate_hz):] += gap[2]
            fault = np.arange(n) >= int(fault_from * n)
            files.append(write_recording(root / rel, t, signal(n, rate_hz, fault, rng), fault))
    return files


def write_recipe(folder: Path, data: str = "recordings", task: str = "vibration", epochs: int = 20,
                 size: int = 200, hop: int = 100) -> Path:
    """The recipe for recordings under folder/`data`, written as folder/recipe.toml."""
    path = folder / "recipe.toml"
    path.write_text(RECIPE.format(task=task, path=data, epochs=epochs, size=size, hop=hop))
    return path
