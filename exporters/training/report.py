"""The training report: run_dir/report/index.html with PNG plots (matplotlib Agg) and metric tables.

Plots: loss curves (predictor, autoencoder; train and cal), test confusion matrix, test ROC (binary, or
one-vs-rest), autoencoder score histogram normal vs other, and a per-group metrics table.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from edgekit.contract.run import RunMeta  # noqa: E402

log = logging.getLogger(__name__)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape(str(v))


def _plot_losses(history: dict[str, dict[str, list[float]]], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, (name, h) in zip(axes, history.items()):
        for split, values in h.items():
            ax.plot(range(1, len(values) + 1), values, label=split)
        ax.set_title(f"{name} loss")
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_confusion(cm: np.ndarray, labels: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 1.2 * len(labels) + 2))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=30)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = cm.max() if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > top / 2 else "black")
    ax.set_title("test confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_roc(y: np.ndarray, probs: np.ndarray, labels: list[str], positive: str | None, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    classes = [labels.index(positive)] if positive is not None else range(len(labels))
    for k in classes:
        truth = (y == k).astype(int)
        if truth.min() == truth.max():
            continue
        fpr, tpr, _ = roc_curve(truth, probs[:, k])
        ax.plot(fpr, tpr, label=labels[k] if positive is None else f"{labels[k]} vs rest")
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("test ROC" + (" (one-vs-rest)" if positive is None else ""))
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_ae(y: np.ndarray, score: np.ndarray, normal: int, normal_label: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.histogram_bin_edges(np.log10(np.maximum(score, 1e-9)), bins=30)
    for mask, name in ((y == normal, normal_label), (y != normal, "other labels")):
        if mask.any():
            ax.hist(np.log10(np.maximum(score[mask], 1e-9)), bins=bins, alpha=0.6, label=f"{name} (n={mask.sum()})")
    ax.set_xlabel("log10 autoencoder reconstruction error")
    ax.set_ylabel("test rows")
    ax.set_title("autoencoder score, test split")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


METRIC_KEYS = ("n", "accuracy", "balanced_accuracy", "macro_f1", "auc", "sensitivity", "specificity", "log_loss")
GROUP_KEYS = ("n", "accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity")


def write_report(run_dir: Path, run: RunMeta, y: np.ndarray, probs: np.ndarray, ae_score: np.ndarray) -> Path:
    """Write run_dir/report/index.html (+ PNGs) from run.json (as written) and the test split's labels `y`,
    predictor probabilities `probs` (n, K) and autoencoder scores `ae_score` (n,). Returns the HTML path."""
    rep = Path(run_dir) / "report"
    rep.mkdir(parents=True, exist_ok=True)
    labels = run.labels
    _plot_losses(run.history, rep / "loss.png")
    _plot_confusion(np.asarray(run.metrics["test"]["confusion"]), labels, rep / "confusion.png")
    _plot_roc(y, probs, labels, run.positive_label, rep / "roc.png")
    _plot_ae(y, ae_score, run.normal_index, run.normal_label, rep / "ae_hist.png")
    sizes = ", ".join(f"{k} {v}" for k, v in run.split_sizes.items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edgekit run: {html.escape(run.task)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}} table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:.2em .5em;text-align:right}} img{{max-width:100%}}</style></head><body>
<h1>{html.escape(run.task)}</h1>
<p>labels {html.escape(', '.join(labels))}; normal {html.escape(run.normal_label)}; device {run.device};
seed {run.seed}; rows {sizes}; extra labels added to train: {run.extra_labels_added}{_skipped_html(run)};
predictor {run.models.predictor.arch} on {run.models.predictor.input};
second opinion {run.models.second_opinion.kind}; created {run.created_at}.</p>
{_imputation_html(run)}
<h2>Metrics</h2>{_metrics_table(run)}
<h2>Loss curves</h2><img src="loss.png" alt="loss curves">
<h2>Test split</h2><img src="confusion.png" alt="confusion matrix"> <img src="roc.png" alt="ROC">
<img src="ae_hist.png" alt="autoencoder score histogram">
<h2>Per group</h2>{_groups_html(run)}
<p>data fingerprint <code>{run.data_fingerprint}</code>, edgekit {run.code_version}</p>
</body></html>
"""
    path = rep / "index.html"
    path.write_text(page)
    log.info("report_written path=%s", path)
    return path


def _metrics_table(run: RunMeta) -> str:
    rows = []
    for split, m in run.metrics.items():
        cells = "".join(f"<td>{_fmt(m.get(k))}</td>" for k in METRIC_KEYS)
        so, ae = m["second_opinion"], m["autoencoder"]
        rows.append(f"<tr><th>{split}</th>{cells}<td>{_fmt(so['accuracy'])}</td><td>{_fmt(m['agreement'])}</td>"
                    f"<td>{_fmt(ae['auc_other_vs_normal'])}</td></tr>")
    head = "".join(f"<th>{k}</th>" for k in METRIC_KEYS)
    return (f"<table><tr><th>split</th>{head}<th>second opinion acc.</th><th>agreement</th>"
            f"<th>AE AUC other vs normal</th></tr>{''.join(rows)}</table>")


def _groups_html(run: RunMeta) -> str:
    out = ""
    for name, values in run.groups_metrics.items():
        grow = "".join(
            f"<tr><th>{html.escape(v)}</th>{''.join(f'<td>{_fmt(m.get(k))}</td>' for k in GROUP_KEYS)}</tr>"
            for v, m in values.items())
        out += (f"<h3>by {html.escape(name)} (test split)</h3><table><tr><th>{html.escape(name)}</th>"
                f"{''.join(f'<th>{k}</th>' for k in GROUP_KEYS)}</tr>{grow}</table>")
    return out or "<p>This dataset has no group columns.</p>"


def _imputation_html(run: RunMeta) -> str:
    imp = run.imputation
    if imp is None:
        return ""
    filled = ", ".join(f"{html.escape(k)} ({n} cells) = {imp.values[k]:.4g}" for k, n in imp.missing.items())
    return f"<p>Empty cells filled with the training split's median: {filled or 'none were empty'}.</p>"


def _skipped_html(run: RunMeta) -> str:
    sk = run.extra_labels_skipped
    by_label = {**(sk.get("unknown_label") or {}), **(sk.get("skipped_label") or {})}  # unknown: runs before issue 15
    n_skipped = (sum(by_label.values()) + int(sk.get("unreadable_features") or 0)
                 + int(sk.get("without_baseline") or 0))
    mapped = sk.get("mapped_label") or {}
    text = f"; mapped by the recipe {html.escape(str(mapped))}" if mapped else ""
    if not n_skipped:
        return f" ({text[2:]})" if text else ""
    return (f" (skipped {n_skipped}: labels the recipe skips {html.escape(str(by_label))}, "
            f"unreadable features or windows {sk.get('unreadable_features', 0)}"
            + (f", without features relative to a device baseline {sk['without_baseline']}"
               if sk.get("without_baseline") else "") + f"{text})")
