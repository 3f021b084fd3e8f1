"""The baseline users compare us with: the same per-window path done with torch eager (and the second opinion
with scikit-learn, as trained). Run as its own process by bench/latency.py and bench/startup.py so torch's
threads never share a process with onnxruntime (FIELD-NOTES: that distorted timings 250x).

    python bench/torch_path.py latency RUN_DIR BUNDLE WINDOWS.npz ROUNDS   -> JSON on stdout
    python bench/torch_path.py once RUN_DIR BUNDLE WINDOWS.npz             -> JSON: first result, peak RSS

Features (numpy, edgekit.features) and the gate decision (edgekit.gate) are the agent's own code here too:
only the models differ. torch runs with 1 intra-op and 1 inter-op thread, like onnxruntime in the agent.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import json  # noqa: E402
import pickle  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgekit.exporters.training.models import load_checkpoint  # noqa: E402
from edgekit.features import extractor  # noqa: E402
from edgekit.gate import Gate  # noqa: E402
from edgekit.manifest import read_manifest  # noqa: E402
from edgekit.pipeline import EdgePipeline  # noqa: E402
from edgekit.runtime import Outputs, Preprocess  # noqa: E402
from edgekit.values import Window  # noqa: E402


class TorchModels:
    """The run's torch models (and the scikit-learn second opinion) behind ModelSet's interface, so the
    agent's own EdgePipeline drives them: only the models differ from the edge path."""

    def __init__(self, tp: "TorchPath", with_second: bool) -> None:
        self.tp = tp
        self.with_second = with_second and tp.second is not None
        self.input_kind = {"predictor": tp.pred_input, "gate": "features"}
        if self.with_second:
            self.input_kind["second_opinion"] = "features"

    def infer(self, features: np.ndarray, window: np.ndarray | None) -> Outputs:
        tp = self.tp
        return Outputs(probs=tp.predictor_run(features, window),
                       second_probs=tp.second_run(features) if self.with_second else None,
                       ood_score=None if tp.ae is None else tp.ae_run(features))


class TorchPath:
    def __init__(self, run_dir: Path, bundle: Path) -> None:
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
        man = json.loads((bundle / "manifest.json").read_text())
        run = json.loads((run_dir / "run.json").read_text())
        self.inp = man["input"]
        manifest = read_manifest(bundle)
        self.extract = extractor(manifest.input.extractor, manifest.input.feature_params)
        self.rate = float(self.inp.get("rate_hz") or 1.0)
        norm = man["normalize"]
        self.f_mean = np.asarray(norm["features"]["mean"], np.float32)
        self.f_std = np.asarray(norm["features"]["std"], np.float32)
        win = norm.get("window")
        self.w_mean = None if not win else np.asarray(win["mean"], np.float32)[:, None]
        self.w_std = None if not win else np.asarray(win["std"], np.float32)[:, None]
        models = run["models"]
        self.predictor, _ = load_checkpoint(run_dir / models["predictor"]["file"])
        self.pred_input = models["predictor"]["input"]
        self.ae = None
        if "autoencoder" in models:
            self.ae, _ = load_checkpoint(run_dir / models["autoencoder"]["file"])
        self.second = None
        if "second_opinion" in models:
            with (run_dir / models["second_opinion"]["file"]).open("rb") as fh:
                self.second = pickle.load(fh)  # noqa: S301 - our own training output
            if hasattr(self.second, "n_jobs"):
                self.second.n_jobs = 1
        gate = Gate.from_thresholds(manifest.thresholds.model_dump())
        pre = Preprocess.from_manifest(manifest)
        self.pipelines = {second: EdgePipeline(manifest, TorchModels(self, second), pre, gate)
                          for second in (True, False)}

    def inputs(self, window: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        raw = self.extract(window[None], self.rate)
        feats = ((raw - self.f_mean) / self.f_std).astype(np.float32, copy=False)
        win = None
        if self.w_mean is not None:
            win = ((window.T[None] - self.w_mean) / self.w_std).astype(np.float32)
        return feats, win

    def predictor_run(self, feats: np.ndarray, win: np.ndarray | None) -> np.ndarray:
        x = win if self.pred_input == "window" else feats
        with torch.inference_mode():
            return self.predictor(torch.from_numpy(x)).numpy()

    def ae_run(self, feats: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.ae(torch.from_numpy(feats)).numpy()

    def second_run(self, feats: np.ndarray) -> np.ndarray:
        return self.second.predict_proba(feats)

    def path(self, window: np.ndarray, with_second: bool = True) -> object:
        """The agent's pipeline (plausibility, features, normalisation, gate) with the torch models."""
        w = Window(seq=0, start_s=0.0, end_s=float(len(window) - 1), data=window)
        return self.pipelines[with_second].run([w])[0].decision


def timed(cases: dict, rounds: int, n: int, warmup: int = 50, chunks: int = 10) -> dict[str, list[float]]:
    """Same scheme as edgekit.bench.timed: cases interleaved in chunks, µs per call."""
    for fn in cases.values():
        for i in range(warmup):
            fn(i % n)
    out: dict[str, list[float]] = {k: [] for k in cases}
    per = max(1, rounds // chunks)
    clock = time.perf_counter_ns
    done = 0
    while done < rounds:
        k = min(per, rounds - done)
        for name, fn in cases.items():
            for i in range(done, done + k):
                t0 = clock()
                fn(i % n)
                out[name].append((clock() - t0) / 1000.0)
        done += k
    return out


def stats(us: list[float]) -> dict[str, float]:
    a = np.asarray(us)
    return {"median_us": float(np.median(a)), "p99_us": float(np.percentile(a, 99)), "n": int(a.size)}


def main() -> None:
    mode, run_dir, bundle, windows_file = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    windows = np.load(windows_file)["windows"]
    if mode == "once":
        tp = TorchPath(run_dir, bundle)
        decision = tp.path(windows[0])
        first_s = time.perf_counter() - T_START
        print(json.dumps({"first_result_s_in_process": first_s, "decision": decision.action,
                          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          "torch": torch.__version__}))
        return
    rounds = int(sys.argv[5])
    tp = TorchPath(run_dir, bundle)
    n = len(windows)
    prepared = [tp.inputs(w) for w in windows]
    cases = {
        "features": lambda i: tp.inputs(windows[i]),
        "predictor": lambda i: tp.predictor_run(*prepared[i]),
        "path": lambda i: tp.path(windows[i]),
        "path_no_second": lambda i: tp.path(windows[i], with_second=False),
    }
    if tp.ae is not None:
        cases["gate"] = lambda i: tp.ae_run(prepared[i][0])
    if tp.second is not None:
        cases["second_opinion"] = lambda i: tp.second_run(prepared[i][0])
    us = timed(cases, rounds, n)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "second_opinion": type(tp.second).__name__ if tp.second is not None else None,
                      "cases": {k: stats(v) for k, v in us.items()}}))


if __name__ == "__main__":
    main()
