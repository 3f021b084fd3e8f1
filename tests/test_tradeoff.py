"""The deferral budget's other side in the bundle report (exporters/export/tradeoff.py, issue 15): error on the
accepted windows against the share deferred, from the agent's own gate rule with the exported thresholds'
out-of-distribution check and envelope held, the exported point where calibration put it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgekit.exporters.export.calibrate import calibrate_gate
from edgekit.exporters.export.tradeoff import at_share, curve, table, windows_per_hour, write


def split(n: int, seed: int) -> dict[str, np.ndarray]:
    """Two classes; the predictor is right more often the surer it is; the second opinion mostly agrees."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    sure = rng.uniform(0.5, 1.0, n)
    right = rng.random(n) < sure
    top = np.where(right, y, 1 - y)
    probs = np.where(top[:, None] == np.arange(2), sure[:, None], 1 - sure[:, None])
    second = np.clip(probs + rng.normal(0, 0.1, (n, 1)) * np.array([1, -1]), 0, 1)
    return {"probs": probs, "second": second, "score": rng.random(n), "y": y, "second_label": second.argmax(1)}


def test_the_curve_trades_deferral_for_error_and_passes_through_the_exported_gate(tmp_path: Path) -> None:
    outputs = {"cal": split(3000, 0), "test": split(3000, 1)}
    cal = calibrate_gate(outputs["cal"], outputs["test"], normal_index=0, target_error=0.1, delta=0.1)
    c = curve(outputs["test"], cal["thresholds"], None)
    assert np.all(np.diff(c["deferred"]) >= 0)  # a higher min_confidence never accepts more
    errors = [e for e in c["error"] if e is not None]
    assert errors[0] > 0.2 > errors[len(errors) // 2]  # deferring the unsure cases lowers the error
    share = 1.0 - cal["calibration"]["test_coverage"]
    exported = at_share(c, share)  # the exported gate's deferral is a point of the curve, with its error
    assert exported is not None and abs(exported["deferred"] - share) < 1e-12
    assert abs(exported["error"] - cal["calibration"]["test_error"]) < 1e-12

    inp = type("Input", (), {"rate_hz": 1.0, "window_hop": 4})()
    assert windows_per_hour(inp) == 900.0
    t = write(tmp_path, outputs, cal, {"cal": None, "test": None}, inp)
    saved = json.loads((tmp_path / "deferral.json").read_text())
    assert saved["rows"] == t["rows"] and saved["exported"]["per_hour"] == t["exported"]["test_deferred"] * 900
    assert len(saved["curves"]["test"]["lam"]) <= 201  # thinned for the bundle
    assert (tmp_path / "report" / "deferral.png").read_bytes()[:4] == b"\x89PNG"
    page = (tmp_path / "report" / "deferral.html").read_text()
    assert "never by the gate" in page and "deferral.png" in page
    text = table(t)
    assert text.splitlines()[0].split()[:2] == ["deferred", "(test)"] and "exported gate: defers" in text


def test_an_exported_bundle_carries_its_tradeoff_signed_with_its_files(stream_bundle: Path) -> None:
    from edgekit.manifest import read_manifest

    t = json.loads((stream_bundle / "deferral.json").read_text())
    assert t["schema"] == "edgekit.deferral-tradeoff/1" and t["rows"] and t["windows_per_hour"] > 0
    files = read_manifest(stream_bundle).files
    assert {"deferral.json", "report/deferral.html", "report/deferral.png"} <= set(files)
