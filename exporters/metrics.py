"""Every metric the server side reports, in one place: training's run.json metrics, export's parity metric,
and the evaluations' pooled binary metrics, coverage-risk curves and mean ± sd.

numpy, plus scikit-learn for F1, AUC and log loss (imported when called). Below training, export and
evaluation: imports nothing from them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# --- binary decisions (evaluations) ----------------------------------------------------------------


def binary_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    """Pooled binary metrics, positive = anomaly / faller.

    f1; far = FP / (FP + TN) (false alarm rate, SKAB's FAR); mar = FN / (FN + TP) (missed alarm rate);
    sensitivity = 1 - mar, specificity = 1 - far, precision, accuracy and the four counts.
    An undefined ratio (0/0) is reported as 0.0.
    """
    y = np.asarray(y_true).astype(bool).ravel()
    p = np.asarray(y_pred).astype(bool).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length ({y.size} vs {p.size})")
    tp = int((y & p).sum())
    fp = int((~y & p).sum())
    fn = int((y & ~p).sum())
    tn = int((~y & ~p).sum())

    def ratio(a: int, b: int) -> float:
        return a / b if b else 0.0

    return {"f1": ratio(2 * tp, 2 * tp + fp + fn), "far": ratio(fp, fp + tn), "mar": ratio(fn, fn + tp),
            "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
            "precision": ratio(tp, tp + fp), "accuracy": ratio(tp + tn, y.size),
            "tp": tp, "fp": fp, "fn": fn, "tn": tn, "n": int(y.size)}


def coverage_risk_curve(confidence: np.ndarray, errors: np.ndarray) -> dict[str, np.ndarray]:
    """Error on accepted cases against coverage when the least confident are deferred first.

    Cases sorted by confidence (high first); point k accepts the k most confident (k = 1..n):
    coverage = k / n, deferred = 1 - coverage, risk = errors among them / k. Ties in confidence are
    accepted together (the gate cannot split them), so only the last point of each tie run is kept.
    """
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    err = np.asarray(errors).astype(np.float64).ravel()
    if conf.shape != err.shape or conf.size == 0:
        raise ValueError(f"confidence and errors must be non-empty and equal in length ({conf.size}, {err.size})")
    order = np.argsort(-conf, kind="stable")
    c_sorted = conf[order]
    cum = np.cumsum(err[order])
    k = np.arange(1, conf.size + 1)
    last_of_tie = np.r_[c_sorted[1:] != c_sorted[:-1], True]
    k, cum = k[last_of_tie], cum[last_of_tie]
    return {"coverage": k / conf.size, "deferred": 1.0 - k / conf.size, "risk": cum / k,
            "threshold": c_sorted[last_of_tie]}


def risk_at_coverage(curve: dict[str, np.ndarray], coverages: np.ndarray) -> np.ndarray:
    """The curve's risk at given coverages (step function: the largest point with coverage <= c)."""
    cov = curve["coverage"]
    idx = np.searchsorted(cov, np.asarray(coverages, dtype=np.float64), side="right") - 1
    idx = np.clip(idx, 0, cov.size - 1)
    return curve["risk"][idx]


def mean_sd(values: list[float] | np.ndarray) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


# --- scores and classes (training, export) ---------------------------------------------------------


def auc(y: np.ndarray, score: np.ndarray, **kw: Any) -> float | None:
    """ROC AUC (scikit-learn's roc_auc_score, keywords passed on); None when y holds one class or the
    score cannot be ranked."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        return None
    try:
        return float(roc_auc_score(y, score, **kw))
    except ValueError:
        return None


def f1(y: np.ndarray, pred: np.ndarray) -> float:
    """Binary F1 of boolean decisions (scikit-learn's f1_score; 0.0 when undefined)."""
    from sklearn.metrics import f1_score

    return float(f1_score(y, pred, zero_division=0))


def decision_metric(y: np.ndarray, pred: np.ndarray, n_classes: int,
                    positive_index: int | None) -> tuple[str, float]:
    """Binary F1 of the positive label when there is one and two classes, else macro-F1: the held-out metric
    parity compares fp32 and INT8 on."""
    from sklearn.metrics import f1_score

    if positive_index is not None and n_classes == 2:
        return "f1", float(f1_score(y, pred, pos_label=positive_index, average="binary", zero_division=0))
    return "macro_f1", float(f1_score(y, pred, labels=list(range(n_classes)), average="macro",
                                      zero_division=0))


def classification_metrics(y: np.ndarray, probs: np.ndarray, labels: list[str], normal: int) -> dict[str, Any]:
    """run.json's metrics of class probabilities: accuracy, balanced accuracy, macro-F1, recall per label,
    confusion matrix, log loss, AUC (one-vs-rest when multi-class), and for two labels sensitivity and
    specificity of the label that is not `normal`. None where a value is undefined on these rows."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, log_loss

    k = len(labels)
    pred = probs.argmax(axis=1)
    cm = confusion_matrix(y, pred, labels=list(range(k)))
    out: dict[str, Any] = {
        "n": int(len(y)),
        "accuracy": float((pred == y).mean()) if len(y) else None,
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)) if len(np.unique(y)) > 1 else None,
        "macro_f1": float(f1_score(y, pred, average="macro", labels=list(range(k)), zero_division=0)),
        "recall": {lab: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None) for i, lab in enumerate(labels)},
        "confusion": cm.tolist(),
    }
    if len(np.unique(y)) > 1:
        clipped = np.clip(probs, 1e-7, 1)
        out["log_loss"] = float(log_loss(y, clipped / clipped.sum(axis=1, keepdims=True), labels=list(range(k))))
    if k == 2:
        pos = 1 - normal
        out["auc"] = auc((y == pos).astype(int), probs[:, pos])
        out["sensitivity"] = out["recall"][labels[pos]]
        out["specificity"] = out["recall"][labels[normal]]
    else:
        out["auc"] = (auc(y, probs, multi_class="ovr", labels=list(range(k)))
                      if len(np.unique(y)) == k else None)
    return out
