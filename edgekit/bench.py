"""`edgekit bench BUNDLE`: per-window latency of a bundle on this device, for the per-device latency table.

Per model fp32 vs INT8 (bare onnxruntime runs), the onnxruntime floor (the agent's session runs, nothing
else), the edge path (features + normalise + models + gate, with the agent's own objects) and the agent's
whole `process` (plus result encoding and the durable outbox write). numpy + onnxruntime only; never torch.
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import ModelError

log = logging.getLogger(__name__)

SCHEMA = "edgekit.bench/1"
N_INPUTS = 64  # distinct windows cycled through, so no case measures one cached input
CHUNKS = 10  # cases are timed round-robin in this many chunks: drift (turbo, a noisy neighbour) hits all alike
# The outputs the agent asks each role for (edgekit/runtime.py ModelSet); bare runs ask for the same.
ROLE_OUTPUTS = {"predictor": ["probs"], "gate": ["score"], "second_opinion": ["probabilities"]}


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import onnxruntime as ort

    cpu = platform.processor() or ""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)
        info = {k.strip().lower(): v.strip() for k, v in info.items()}
        # x86 says "model name"; a Raspberry Pi's arm64 kernel says "Model" (and "model name" is absent).
        cpu = info.get("model name") or info.get("model") or info.get("hardware") or cpu
    except OSError:
        pass

    return {"machine": platform.machine(), "cpu": cpu, "cores": os.cpu_count(), "system": platform.platform(),
            "python": platform.python_version(), "onnxruntime": ort.__version__, "numpy": np.__version__}


def timed(cases: dict[str, Callable[[int], Any]], rounds: int, warmup: int = 100,
          chunks: int = CHUNKS) -> dict[str, np.ndarray]:
    """Time each `fn(i)` `rounds` times (i = call index); returns µs per call per case.

    Cases are interleaved in `chunks` rounds so a slow stretch of the machine hits every case alike.
    """
    for fn in cases.values():
        for i in range(warmup):
            fn(i)
    out: dict[str, list[float]] = {name: [] for name in cases}
    per_chunk = max(1, rounds // chunks)
    clock = time.perf_counter_ns
    done = 0
    while done < rounds:
        n = min(per_chunk, rounds - done)
        for name, fn in cases.items():
            samples = out[name]
            for i in range(done, done + n):
                t0 = clock()
                fn(i)
                samples.append((clock() - t0) / 1000.0)
        done += n
    return {name: np.asarray(v) for name, v in out.items()}


def summary(us: np.ndarray) -> dict[str, float]:
    return {"median_us": float(np.median(us)), "p99_us": float(np.percentile(us, 99)),
            "mean_us": float(us.mean()), "n": int(us.size)}


def synthetic_windows(manifest: Any, n: int = N_INPUTS, seed: int = 0) -> np.ndarray:
    """(n, size, C) float64 windows near the training data, from the manifest's statistics.

    The window normalisation when the bundle has one; else each channel's level and spread from the
    "<channel>.mean" / "<channel>.std" feature statistics; else N(0, 1).
    """
    rng = np.random.default_rng(seed)
    inp = manifest.input
    size, channels = int(inp.window_size), list(inp.channels or [])
    c = len(channels) or 1
    norm = manifest.normalize
    level, spread = np.zeros(c), np.ones(c)
    if norm.window is not None:
        level = np.asarray(norm.window.mean, dtype=np.float64)
        spread = np.asarray(norm.window.std, dtype=np.float64)
    else:
        names = list(inp.feature_names)
        means = np.asarray(norm.features.mean, dtype=np.float64)
        for j, ch in enumerate(channels):
            if f"{ch}.mean" in names:
                level[j] = means[names.index(f"{ch}.mean")]
            if f"{ch}.std" in names:
                spread[j] = max(abs(means[names.index(f"{ch}.std")]), 1e-6)
    return level + spread * rng.standard_normal((n, size, c))


def _providers() -> list[str]:
    """The agent's providers: the detected device profile's, as far as onnxruntime has them."""
    import onnxruntime as ort

    try:
        from edgekit.devices import detect as detect_mod
        from edgekit.devices import profile as profile_mod

        return list(profile_mod.available_providers(detect_mod.detect(), ort.get_available_providers()))
    except Exception as exc:  # an unknown device still gets a CPU number
        log.warning("bench.profile_unavailable error=%r providers=CPUExecutionProvider", exc)
        return ["CPUExecutionProvider"]


def _variants(bundle: Path, spec: Any) -> dict[str, str]:
    """quantization -> file name for one role: the fp32 file and its INT8 sibling when the export kept one."""
    fp32 = getattr(spec, "fp32_file", None) or spec.file
    out = {"fp32": fp32}
    for cand in (spec.file, fp32.replace(".fp32.", ".int8.")):
        if ".int8." in cand and (bundle / cand).is_file():
            out["int8"] = cand
            break
    return out


def offline_agent(bundle: Path, threads: int, workdir: Path) -> tuple[Any, Callable[[Any], None]]:
    """A real Agent entered (no broker: results go to its outbox) and its `process` method; call
    `agent.__exit__(None, None, None)` when done."""
    from edgekit.agent import Agent
    from edgekit.config import AgentConfig, validate

    cfg = validate(AgentConfig, {
        "device_id": "bench", "site": "bench", "allow_unsigned": True, "bundle": str(bundle),
        "source": {"kind": "simulated", "generator": "pump"},
        "mqtt": {"url": None}, "outbox": {"path": str(workdir / "outbox.db")},
        "runtime": {"intra_op_threads": threads},
    }, "edgekit bench")
    agent = Agent(cfg)
    agent.__enter__()
    return agent, agent.process


class _Prepared:
    """One bundle loaded as the agent loads it, with `n` windows turned into every stage's ready inputs."""

    def __init__(self, bundle: Path, windows: np.ndarray | None, threads: int) -> None:
        from edgekit.features import extractor
        from edgekit.gate import Gate
        from edgekit.manifest import load_bundle
        from edgekit.pipeline import EdgePipeline
        from edgekit.runtime import ModelSet, Preprocess
        from edgekit.values import Window

        self.bundle, self.threads = bundle, threads
        self.manifest = manifest = load_bundle(bundle)
        inp = self.inp = manifest.input
        if inp.kind != "window":
            raise ModelError(f"bundle takes table rows ({inp.kind}), edgekit bench measures window bundles",
                             where=f"{bundle}/manifest.json: input.kind")
        self.wins = synthetic_windows(manifest) if windows is None else np.asarray(windows, dtype=np.float64)
        self.source = "synthetic (manifest statistics)" if windows is None else "recorded"
        self.n = n = len(self.wins)
        self.rate = float(inp.rate_hz or 1.0)
        self.providers = _providers()
        self.models = ModelSet(bundle, manifest, self.providers, threads)
        self.pre = Preprocess.from_manifest(manifest)
        self.gate = Gate.from_thresholds(manifest.thresholds.model_dump())
        self.pipeline = EdgePipeline(manifest, self.models, self.pre, self.gate)
        self.extract = extractor(inp.extractor, inp.feature_params)
        self.raw = self.extract(self.wins, self.rate)
        self.feats = self.pre.features(self.raw)
        self.uses_window = "window" in self.models.input_kind.values()
        self.win_in = np.stack([self.pre.window(w)[0] for w in self.wins]) if self.uses_window else None
        self.one_feats = [self.feats[i:i + 1] for i in range(n)]
        self.one_wins = None if self.win_in is None else [self.win_in[i:i + 1] for i in range(n)]
        self.window_objs = [Window(seq=i, start_s=float(i), end_s=float(i + inp.window_size - 1), data=self.wins[i])
                            for i in range(n)]

    def model_input(self, role: str, i: int) -> np.ndarray:
        if self.models.input_kind[role] == "window":
            assert self.one_wins is not None
            return self.one_wins[i % self.n]
        return self.one_feats[i % self.n]


def _model_cases(p: _Prepared) -> tuple[dict[str, Callable[[int], Any]], list[dict[str, Any]]]:
    """Per model, fp32 and INT8: bare session runs on ready inputs, and the table's rows for them."""
    from edgekit.runtime import open_session

    outputs = getattr(p.models, "_out", ROLE_OUTPUTS)
    cases: dict[str, Callable[[int], Any]] = {}
    rows: list[dict[str, Any]] = []
    for role, spec in p.manifest.models.items():
        for quant, fname in _variants(p.bundle, spec).items():
            sess = open_session(p.bundle / fname, p.providers, p.threads)
            name, outs = spec.input_name, outputs.get(role)
            cases[f"{role}/{quant}"] = (lambda i, s=sess, nm=name, o=outs, r=role:
                                        s.run(o, {nm: p.model_input(r, i)}))
            rows.append({"role": role, "quantization": quant, "file": fname, "used": fname == spec.file})
    return cases, rows


def _path_cases(p: _Prepared) -> dict[str, Callable[[int], Any]]:
    """The stages of one window: features, normalise, the floor (exactly the session runs the agent makes,
    on inputs bound once as ModelSet.infer binds them), the gate, and the whole edge path."""
    n = p.n
    floors = [p.models.floor_runs(p.one_feats[i], None if p.one_wins is None else p.one_wins[i]) for i in range(n)]
    out = p.models.infer(p.feats, p.win_in)
    decide_args = [(out.probs[i], None if out.second_probs is None else out.second_probs[i],
                    None if out.ood_score is None else float(out.ood_score[i])) for i in range(n)]

    def normalise(i: int) -> None:
        p.pre.features(p.raw[i % n][None])
        if p.uses_window:
            p.pre.window(p.window_objs[i % n].data)

    return {
        "features": lambda i: p.extract(p.window_objs[i % n].data[None], p.rate),
        "normalise": normalise,
        "floor": lambda i: floors[i % n](),
        "gate_decide": lambda i: p.gate.decide(*decide_args[i % n]),
        # What Agent.process runs before it encodes the result: the same pipeline object (edgekit/pipeline.py).
        "edge_path": lambda i: p.pipeline.run([p.window_objs[i % n]]),
    }


def run_bench(bundle: Path, rounds: int = 2000, *, windows: np.ndarray | None = None, threads: int = 1,
              agent: bool = True) -> dict[str, Any]:
    """Measure one bundle; returns a JSON-able dict (see `table`). `windows`: (n, size, C) real windows."""
    bundle = Path(bundle)
    if rounds < 10:
        raise ValueError(f"rounds must be >= 10 (got {rounds})")
    p = _Prepared(bundle, windows, threads)
    model_cases, model_rows = _model_cases(p)
    path_cases = _path_cases(p)
    agent_error = None
    agent_obj = None
    tmp = tempfile.TemporaryDirectory(prefix="edgekit-bench-")
    try:
        if agent:
            try:
                agent_obj, process = offline_agent(bundle, threads, Path(tmp.name))
                path_cases["agent_process"] = lambda i: process(p.window_objs[i % p.n])
            except Exception as exc:  # the table still has the rest; the error is reported in it
                log.warning("bench.agent_unavailable error=%r", exc)
                agent_error = repr(exc)
        model_us = timed(model_cases, rounds)
        path_us = timed(path_cases, rounds)
    finally:
        if agent_obj is not None:
            agent_obj.__exit__(None, None, None)
        tmp.cleanup()
    for row in model_rows:
        row.update(summary(model_us[f"{row['role']}/{row['quantization']}"]))
    stages = _stages(p, path_us, agent_error)
    med = {s["stage"]: s.get("median_us") for s in stages}
    ratios = {"edge_path_over_floor": med["edge_path"] / med["floor"]}
    if med.get("agent_process"):
        ratios["agent_process_over_floor"] = med["agent_process"] / med["floor"]
    return {"schema": SCHEMA, "bundle": str(bundle), "task": p.manifest.task, "rounds": rounds,
            "threads": threads, "providers": p.providers, "inputs": {"windows": p.n, "source": p.source,
                                                                     "shape": list(p.wins.shape[1:])},
            "machine": machine(), "models": model_rows, "stages": stages, "ratios": ratios}


def _stages(p: _Prepared, path_us: dict[str, np.ndarray], agent_error: str | None) -> list[dict[str, Any]]:
    labels = {
        "features": f"features ({p.inp.extractor})",
        "normalise": "normalise (features" + (", window)" if p.uses_window else ")"),
        "floor": f"floor: bare onnxruntime runs ({len(p.models.sessions)} models, io binding)",
        "gate_decide": "gate.decide",
        "edge_path": "edge path: plausibility+features+normalise+models+gate",
        "agent_process": "agent.process: + result JSON + outbox write",
    }
    stages = []
    for key, label in labels.items():
        if key in path_us:
            stages.append({"stage": key, "label": label, **summary(path_us[key])})
        elif key == "agent_process" and agent_error is not None:
            stages.append({"stage": key, "label": label, "error": agent_error})
    return stages


def table(result: dict[str, Any]) -> str:
    """The result of `run_bench` as a plain-text table."""
    m = result["machine"]
    lines = [
        f"edgekit bench {result['bundle']} (task {result['task']}): {result['rounds']} rounds, "
        f"{result['threads']} intra-op thread(s), {result['inputs']['windows']} {result['inputs']['source']} "
        f"windows of {tuple(result['inputs']['shape'])}",
        f"device: {m['cpu']} ({m['machine']}, {m['cores']} cores), python {m['python']}, "
        f"onnxruntime {m['onnxruntime']}, numpy {m['numpy']}, providers {','.join(result['providers'])}",
        "",
        f"{'model':<16}{'quant':<7}{'file':<26}{'median_us':>11}{'p99_us':>10}  used",
    ]
    for r in result["models"]:
        lines.append(f"{r['role']:<16}{r['quantization']:<7}{r['file']:<26}{r['median_us']:>11.1f}"
                     f"{r['p99_us']:>10.1f}  {'*' if r['used'] else ''}")
    lines += ["", f"{'per window':<49}{'median_us':>11}{'p99_us':>10}"]
    for s in result["stages"]:
        if "error" in s:
            lines.append(f"{s['label']:<49}  unavailable: {s['error'][:60]}")
        else:
            lines.append(f"{s['label']:<49}{s['median_us']:>11.1f}{s['p99_us']:>10.1f}")
    r = result["ratios"]
    lines += ["", f"edge path / floor: {r['edge_path_over_floor']:.2f}x (target <= 2x)"]
    if "agent_process_over_floor" in r:
        lines.append(f"agent.process / floor: {r['agent_process_over_floor']:.2f}x")
    return "\n".join(lines)
