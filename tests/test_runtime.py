"""ModelSet and Preprocess: the single-window IO-binding path gives exactly what session.run gives, and the
normalisation gives exactly what the plain formulas give."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgekit.runtime import ModelSet, Preprocess

F, C, W = 7, 3, 16


def _save(path: Path, nodes: list, inputs: list, outputs: list, inits: list) -> str:
    onnx = pytest.importorskip("onnx", reason="building test models needs onnx (the train extra)")
    h = onnx.helper
    graph = h.make_graph(nodes, path.stem, inputs, outputs, inits)
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(path))
    return path.name


def _models(root: Path, *, window_predictor: bool, double_score: bool = False) -> SimpleNamespace:
    """Tiny real ONNX models with the bundle's roles, inputs and output names; a manifest stand-in."""
    onnx = pytest.importorskip("onnx", reason="building test models needs onnx (the train extra)")
    h, tp, nph = onnx.helper, onnx.TensorProto, onnx.numpy_helper
    rng = np.random.default_rng(0)
    fx = h.make_tensor_value_info("x", tp.FLOAT, ["batch", F])

    def dense(name: str, rows: int) -> onnx.TensorProto:
        return nph.from_array(rng.normal(size=(rows, 2)).astype(np.float32), name)

    models: dict[str, SimpleNamespace] = {}
    probs_dim = ["batch", 2]
    if window_predictor:
        wx = h.make_tensor_value_info("x", tp.FLOAT, ["batch", C, W])
        file = _save(root / "predictor.onnx", [h.make_node("Flatten", ["x"], ["flat"], axis=1),
                                               h.make_node("MatMul", ["flat", "w"], ["logits"]),
                                               h.make_node("Softmax", ["logits"], ["probs"], axis=1)],
                     [wx], [h.make_tensor_value_info("probs", tp.FLOAT, probs_dim)], [dense("w", C * W)])
        models["predictor"] = SimpleNamespace(file=file, input_name="x", input="window", input_shape=[None, C, W])
    else:
        file = _save(root / "predictor.onnx", [h.make_node("MatMul", ["x", "w"], ["logits"]),
                                               h.make_node("Softmax", ["logits"], ["probs"], axis=1)],
                     [fx], [h.make_tensor_value_info("probs", tp.FLOAT, probs_dim)], [dense("w", F)])
        models["predictor"] = SimpleNamespace(file=file, input_name="x", input="features", input_shape=[None, F])
    score = [h.make_node("ReduceMean", ["sq"], ["mean"], axes=[1], keepdims=0),
             h.make_node("Cast", ["mean"], ["score"], to=tp.DOUBLE if double_score else tp.FLOAT)]
    file = _save(root / "gate.onnx", [h.make_node("Mul", ["x", "x"], ["sq"]), *score],
                 [fx], [h.make_tensor_value_info("score", tp.DOUBLE if double_score else tp.FLOAT, ["batch"])], [])
    models["gate"] = SimpleNamespace(file=file, input_name="x", input="features", input_shape=[None, F])
    file = _save(root / "second.onnx", [h.make_node("MatMul", ["x", "w"], ["logits"]),
                                        h.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
                                        h.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0)],
                 [fx], [h.make_tensor_value_info("label", tp.INT64, [None]),
                        h.make_tensor_value_info("probabilities", tp.FLOAT, [None, 2])], [dense("w", F)])
    models["second_opinion"] = SimpleNamespace(file=file, input_name="x", input="features", input_shape=[None, F])
    return SimpleNamespace(models=models)


def _expected(ms: ModelSet, features: np.ndarray, window: np.ndarray | None) -> dict[str, np.ndarray]:
    return {role: sess.run(ms._out[role], {"x": window if ms.input_kind[role] == "window" else features})[0]
            for role, sess in ms.sessions.items()}


def _check(ms: ModelSet, features: np.ndarray, window: np.ndarray | None) -> None:
    out = ms.infer(features, window)
    want = _expected(ms, features, window)
    for role, got in (("predictor", out.probs), ("gate", out.ood_score), ("second_opinion", out.second_probs)):
        assert got.shape == want[role].shape and got.dtype == want[role].dtype
        assert np.array_equal(got, want[role]), role  # bitwise: the bound run is the same session run


@pytest.mark.parametrize("window_predictor", [False, True])
def test_single_windows_take_the_bound_path_and_match_session_run(tmp_path: Path, window_predictor: bool) -> None:
    ms = ModelSet(tmp_path, _models(tmp_path, window_predictor=window_predictor), ["CPUExecutionProvider"], 1)
    assert set(ms._bound) == {"predictor", "gate", "second_opinion"}
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(6, 1, F)).astype(np.float32)
    wins = rng.normal(size=(6, 1, C, W)).astype(np.float32) if window_predictor else [None] * 6
    first = ms.infer(feats[0], wins[0])
    kept = (first.probs.copy(), first.ood_score.copy(), first.second_probs.copy())
    for f, w in zip(feats, wins):
        _check(ms, f, w)
    # what a call returned is the caller's: later calls do not write into it
    assert all(np.array_equal(a, b) for a, b in zip(kept, (first.probs, first.ood_score, first.second_probs)))
    # batches (and anything but one float32 row) go through session.run
    _check(ms, feats[:, 0], None if not window_predictor else np.concatenate(wins))
    _check(ms, feats[0], None if not window_predictor else wins[0])


def test_an_output_that_cannot_be_preallocated_falls_back_to_session_run(tmp_path: Path) -> None:
    ms = ModelSet(tmp_path, _models(tmp_path, window_predictor=False, double_score=True),
                  ["CPUExecutionProvider"], 1)
    assert set(ms._bound) == {"predictor", "second_opinion"}  # a float64 score has no float32 buffer
    _check(ms, np.random.default_rng(2).normal(size=(1, F)).astype(np.float32), None)


def test_preprocess_is_the_plain_formula_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    mean, std = rng.normal(size=F).astype(np.float32), rng.uniform(0.1, 3, size=F).astype(np.float32)
    w_mean, w_std = rng.normal(size=C).astype(np.float32), rng.uniform(0.1, 3, size=C).astype(np.float32)
    manifest = SimpleNamespace(normalize=SimpleNamespace(
        features=SimpleNamespace(mean=mean.tolist(), std=std.tolist()),
        window=SimpleNamespace(mean=w_mean.tolist(), std=w_std.tolist())))
    pre = Preprocess.from_manifest(manifest)
    raw = rng.normal(size=(5, F)).astype(np.float32) * 100
    want = ((raw - mean) / std).astype(np.float32)
    assert np.array_equal(pre.features(raw).view(np.uint32), want.view(np.uint32))
    data = rng.normal(size=(W, C)) * 50 + 9.81  # float64, as the windower hands it out
    want = ((data.T[None] - w_mean[:, None]) / w_std[:, None]).astype(np.float32)
    got = pre.window(data)
    assert got.shape == (1, C, W) and got.dtype == np.float32 and got.flags.c_contiguous
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
