"""Model quality on the real datasets, beside the published results: `edgekit eval NAME`.

EVALUATIONS maps each name to `run_<name>(json_out, plot_out, progress) -> dict`; TABLES maps it to the
plain-text table the README shows unedited. The metrics are edgekit.exporters.metrics'; this module only
runs the evaluations (skab, fall_screening, ipol, deferral, trials, sensor_faults, review_load, review_loop),
which never import it back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import deferral, fall_screening, ipol, review_load, review_loop, sensor_faults, skab, trials

log = logging.getLogger(__name__)


# --- JSON ------------------------------------------------------------------------------------------


def _plain(obj: Any) -> Any:
    """numpy -> JSON-able; arrays over 50 items are dropped (the JSON is a summary, not a dump)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items() if not (isinstance(v, np.ndarray) and v.size > 50)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def write_json(result: dict[str, Any], path: Path | None) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_plain(result), indent=2) + "\n")
    log.info("eval_json_written path=%s", path)


# --- the evaluations -------------------------------------------------------------------------------


def _png(plot_out: Path) -> Path:
    path = Path(plot_out)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def run_skab(json_out: Path | None, plot_out: Path | None, progress: bool = True) -> dict[str, Any]:
    result = skab.evaluate_skab(progress=progress)
    if plot_out is not None:
        skab.plot(result, _png(plot_out))
    result = {k: v for k, v in result.items() if k != "rows"}
    write_json(result, json_out)
    return result


def run_fall(json_out: Path | None, plot_out: Path | None, progress: bool = True) -> dict[str, Any]:
    result = fall_screening.evaluate_fall(progress=progress)
    if plot_out is not None:
        fall_screening.plot(result, _png(plot_out))
    result = {k: v for k, v in result.items() if k != "oof"}
    write_json(result, json_out)
    return result


def run_ipol(json_out: Path | None, plot_out: Path | None, progress: bool = True) -> dict[str, Any]:
    result = ipol.evaluate()
    if plot_out is not None:
        ipol.plot(result, _png(plot_out))
    write_json(result, json_out)
    return result


def run_deferral(json_out: Path | None, plot_out: Path | None, progress: bool = True) -> dict[str, Any]:
    result = deferral.evaluate_deferral(progress=progress)
    if plot_out is not None:
        deferral.plot(result, _png(plot_out))
    write_json(result, json_out)
    return result


def run_trials(json_out: Path | None, plot_out: Path | None, progress: bool = True) -> dict[str, Any]:
    result = trials.evaluate(progress=progress)  # a table of counts: no plot
    write_json(result, json_out)
    return result


def run_sensor_faults(json_out: Path | None, plot_out: Path | None, progress: bool = True) -> dict[str, Any]:
    result = sensor_faults.evaluate(progress=progress)  # a table of shares: no plot
    write_json(result, json_out)
    return result


def run_incidents(json_out: Path | None, plot_out: Path | None, progress: bool = True) -> dict[str, Any]:
    result = review_load.evaluate(progress=progress)  # a table of counts: no plot
    write_json(result, json_out)
    return result


def run_review_loop(json_out: Path | None, plot_out: Path | None, progress: bool = True) -> dict[str, Any]:
    result = review_loop.evaluate(progress=progress)  # a table per round: no plot
    write_json(result, json_out)
    return result


EVALUATIONS: dict[str, Callable[[Path | None, Path | None, bool], dict[str, Any]]] = {
    "skab": run_skab,
    "fall-screening": run_fall,
    "ipol": run_ipol,
    "deferral": run_deferral,
    "trials": run_trials,
    "sensor-faults": run_sensor_faults,
    "incidents": run_incidents,
    "review-loop": run_review_loop,
}


TABLES: dict[str, Callable[[dict[str, Any]], str]] = {
    "skab": skab.table,
    "fall-screening": fall_screening.table,
    "ipol": ipol.table,
    "deferral": deferral.table,
    "trials": trials.table,
    "sensor-faults": sensor_faults.table,
    "incidents": review_load.table,
    "review-loop": review_loop.table,
}
