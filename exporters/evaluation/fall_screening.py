"""Fall screening (Bet, Castro & Ponti 2021 data): repeated stratified k-fold CV of the predictor and the
second opinion that edgekit/recipes/fall_screening.toml defines (built and fitted by training/train.py's own
functions, on the recipe's rows) and their combination, plus baselines (SVM, logistic regression, the best
single feature), beside the study's results; with the gate on, a coverage-risk curve.

Everything a fold decides (feature scaling, weights, decision thresholds) is fitted on its training part
only: each model's threshold maximises Youden's J on inner 3-fold out-of-fold probabilities.
"""

from __future__ import annotations

import logging
import textwrap
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import ConfigError
from edgekit.exporters.metrics import auc, binary_metrics, coverage_risk_curve, mean_sd, risk_at_coverage
from edgekit.paths import shipped, shown
from edgekit.recipe import Recipe, load_recipe

log = logging.getLogger(__name__)

MODELS = ("mlp", "second", "svm", "logreg", "single", "combined")
BASE_MODELS = ("mlp", "second", "svm", "logreg", "single")
MODEL_LABELS = {"mlp": "predictor MLP (recipe)", "second": "second opinion (recipe)", "svm": "SVM (defaults)",
                "logreg": "logistic reg. (C in fold)", "single": "best single feature (in fold)",
                "combined": "predictor + second opinion"}
PUBLISHED = [  # Bet, Castro & Ponti, Exp. Gerontology 143 (2021); "-" where not reported
    ("best single feature", 0.75, 0.71, 0.76),
    ("fusion of 3 best features", None, 0.86, None),
]
LOGREG_CS = [0.003, 0.01, 0.03, 0.1, 0.3, 1.0]
COVERAGE_GRID = np.round(np.linspace(0.1, 1.0, 19), 3)


@dataclass(frozen=True)
class FallDesign:
    repeats: int = 10
    folds: int = 5
    inner_folds: int = 3
    seed: int = 0
    # the predictor, second opinion and rows are the recipe's (a shipped recipe's name, or a path), never a
    # copy of its settings
    recipe: str = "fall_screening.toml"


def fall_recipe(design: FallDesign) -> tuple[Path, Recipe]:
    """The recipe whose models are evaluated; ConfigError if it is not a binary feature-MLP recipe."""
    path = Path(design.recipe)
    path = path if path.is_absolute() else shipped("recipes", str(path))
    recipe = load_recipe(path)
    if recipe.predictor.arch != "mlp" or recipe.positive_label is None:
        raise ConfigError(f"needs arch 'mlp' and two labels (got {recipe.predictor.arch!r}, {recipe.labels})",
                          where=f"{path}: predictor", hint="the fall evaluation is binary: faller or not")
    return path, recipe


def load_fall(design: FallDesign | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The recipe's rows (training/tasks.py load_task): features (73, 9) and 1 = faller (73,) of the usable
    participants (excluded == 0)."""
    from edgekit.exporters.training.tasks import load_task

    path, recipe = fall_recipe(design or FallDesign())
    data = load_task(recipe, path.parent)
    positive = recipe.labels.index(recipe.positive_label or recipe.labels[1])
    return data.features.astype(np.float64), (data.y == positive).astype(np.int64)


def _fit_mlp(x: np.ndarray, y: np.ndarray, recipe: Recipe, seed: int) -> Any:
    """The recipe's predictor, built and fitted as training/train.py does (no cal rows here: with fewer than
    train.EARLY_STOP_MIN_CAL, which the recipe's own cal split is, the last epoch is kept either way)."""
    import torch

    from edgekit.exporters.training.train import fit_predictor, new_predictor

    pcfg = recipe.predictor
    p_kwargs = {"n_features": x.shape[1], "n_classes": 2, "hidden": tuple(pcfg.hidden), "dropout": pcfg.dropout}
    xs = x.astype(np.float32)
    model = new_predictor(pcfg, p_kwargs, xs, seed)
    fit_predictor(model, xs, y, xs[:0], y[:0], 2, pcfg, torch.device("cpu"), seed, False)
    model.eval()
    return model


def _fit_predict(name: str, x: np.ndarray, y: np.ndarray, x_new: np.ndarray, recipe: Recipe,
                 seed: int, where: str = "recipe") -> np.ndarray:
    """P(faller) for x_new from model `name` fitted on (x, y), features scaled with x's statistics.
    `where` (the recipe file) names the place of a bad second_opinion.params key."""
    from edgekit.exporters.training.train import fit_normalizer

    mu, sd = fit_normalizer(x)
    xs, xn = (x - mu) / sd, (x_new - mu) / sd
    if name == "mlp":
        import torch

        model = _fit_mlp(xs, y, recipe, seed)
        with torch.no_grad():
            return model(torch.from_numpy(xn.astype(np.float32))).numpy()[:, 1].astype(np.float64)
    if name == "second":
        from edgekit.exporters.training.train import fit_second_opinion

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # scikit-learn 1.9 deprecates SVC(probability=True)
            est = fit_second_opinion(recipe.model_copy(update={"seed": seed}), xs, y, where=where)
        return est.predict_proba(xn)[:, 1]
    if name == "single":
        # the study's approach: the one feature that best separates the training fold (AUC), oriented
        aucs = np.array([auc(y, xs[:, j]) for j in range(xs.shape[1])])
        j = int(np.argmax(np.abs(aucs - 0.5)))
        return 1.0 / (1.0 + np.exp(-np.sign(aucs[j] - 0.5) * xn[:, j]))
    if name == "logreg":
        from sklearn.linear_model import LogisticRegressionCV

        # the L2 strength is chosen by inner 3-fold CV on the training part only
        est = LogisticRegressionCV(Cs=LOGREG_CS, cv=3, scoring="roc_auc", class_weight="balanced")
        with warnings.catch_warnings():
            # scikit-learn 1.9 warns about l1_ratios and fitted-attribute defaults changing in 1.10; the plain
            # L2 fit used here is the same either way
            warnings.simplefilter("ignore", FutureWarning)
            est.fit(xs, y)
        return est.predict_proba(xn)[:, 1]
    from edgekit.exporters.training.train import SECOND_OPINIONS

    cls, defaults = SECOND_OPINIONS["svm"]
    est = cls(**{**defaults, "random_state": seed})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn 1.9 deprecates SVC(probability=True)
        est.fit(xs, y)
    return est.predict_proba(xn)[:, 1]


def youden_threshold(y: np.ndarray, prob: np.ndarray) -> float:
    """The probability cut maximising sensitivity + specificity - 1 (midpoint between scores)."""
    s = np.unique(prob)
    cuts = np.r_[s[0] - 1e-9, (s[1:] + s[:-1]) / 2, s[-1] + 1e-9]
    best, best_j = 0.5, -np.inf
    for c in cuts:
        m = binary_metrics(y, prob >= c)
        j = m["sensitivity"] + m["specificity"] - 1
        if j > best_j:
            best, best_j = float(c), j
    return best


def gate_confidence(prob: np.ndarray, thr: np.ndarray, agree: np.ndarray) -> np.ndarray:
    """The gate's confidence in the combined decision: its margin from the cut, minus 1 when the predictor
    and the second opinion disagree (so disagreements are always deferred first)."""
    return np.abs(prob - thr) - np.where(agree, 0.0, 1.0)


def _cross_fit(x: np.ndarray, y: np.ndarray, recipe: Recipe, where: str, design: FallDesign, seed: int
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One repeat of the outer stratified CV: each model's out-of-fold P(faller) for every participant, and
    the decision threshold of each (Youden's J on inner-CV out-of-fold probabilities of the outer training
    folds only). "combined" is the mean of the MLP's and the second opinion's probabilities."""
    from sklearn.model_selection import StratifiedKFold

    prob = {m: np.zeros(len(y)) for m in BASE_MODELS}
    thr = {m: np.zeros(len(y)) for m in MODELS}
    outer = StratifiedKFold(design.folds, shuffle=True, random_state=seed)
    for k, (tr, te) in enumerate(outer.split(x, y)):
        inner = StratifiedKFold(design.inner_folds, shuffle=True, random_state=seed + k + 1)
        inner_prob = {m: np.zeros(len(tr)) for m in prob}
        for itr, ite in inner.split(x[tr], y[tr]):
            for m in prob:
                inner_prob[m][ite] = _fit_predict(m, x[tr][itr], y[tr][itr], x[tr][ite], recipe, seed + k, where)
        inner_prob["combined"] = (inner_prob["mlp"] + inner_prob["second"]) / 2
        for m in thr:
            thr[m][te] = youden_threshold(y[tr], inner_prob[m])
        for m in prob:
            prob[m][te] = _fit_predict(m, x[tr], y[tr], x[te], recipe, seed + k, where)
    prob["combined"] = (prob["mlp"] + prob["second"]) / 2
    return prob, thr


def _deferral(y: np.ndarray, prob: dict[str, np.ndarray], thr: dict[str, np.ndarray]
              ) -> tuple[np.ndarray, dict[str, Any]]:
    """One repeat's coverage-risk curve of the combined decision deferred by gate confidence, and its
    out-of-fold rows (y, decision, confidence, errors, how often the two models agree)."""
    decision = prob["combined"] >= thr["combined"]
    agree = (prob["mlp"] >= thr["mlp"]) == (prob["second"] >= thr["second"])
    conf = gate_confidence(prob["combined"], thr["combined"], agree)
    errors = decision != y.astype(bool)
    curve = risk_at_coverage(coverage_risk_curve(conf, errors), COVERAGE_GRID)
    return curve, {"y": y.copy(), "decision": decision, "confidence": conf, "errors": errors,
                   "agree_rate": float(agree.mean())}


def evaluate_fall(design: FallDesign | None = None, progress: bool = True) -> dict[str, Any]:
    """Repeated stratified CV. Returns per-model mean/sd of the metrics, the coverage-risk curve and
    `oof` (per repeat: y, combined decision, gate confidence) for the deferral evaluation."""
    import torch

    design = design or FallDesign()
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    path, recipe = fall_recipe(design)
    x, y = load_fall(design)
    per_repeat: dict[str, list[dict[str, Any]]] = {m: [] for m in MODELS}
    curves, oof = [], []
    reps = range(design.repeats)
    if progress:
        from tqdm import tqdm

        reps = tqdm(reps, desc="fall CV repeats", leave=False)
    for r in reps:
        prob, thr = _cross_fit(x, y, recipe, str(path), design, design.seed + 1000 * r)
        for m in MODELS:
            met = binary_metrics(y, prob[m] >= thr[m])
            met["auc"] = auc(y, prob[m])
            per_repeat[m].append(met)
        curve, repeat_oof = _deferral(y, prob, thr)
        curves.append(curve)
        oof.append(repeat_oof)
    # what choosing the feature and its cut on all 73 people gives (no held-out data): an optimistic bound
    p_in = _fit_predict("single", x, y, x, recipe, design.seed)
    in_sample = binary_metrics(y, p_in >= youden_threshold(y, p_in))
    in_sample["auc"] = auc(y, p_in)
    summary = {m: {k: mean_sd([d[k] for d in per_repeat[m]])
                   for k in ("sensitivity", "specificity", "auc", "accuracy", "f1")} for m in MODELS}
    curve = np.array(curves)
    out = {
        "design": asdict(design),
        "recipe": {"file": shown(path),
                   "predictor": recipe.predictor.model_dump(mode="json"),
                   "second_opinion": recipe.second_opinion.model_dump(mode="json")},
        "n": int(len(y)), "n_fallers": int(y.sum()), "models": summary,
        "coverage_risk": {"coverage": COVERAGE_GRID.tolist(), "risk_mean": curve.mean(axis=0).tolist(),
                          "risk_sd": curve.std(axis=0, ddof=1).tolist()},
        "in_sample_single_feature": in_sample,
        "agree_rate": mean_sd([o["agree_rate"] for o in oof]),
        "note": ("repeated stratified CV; scaling, weights and every decision threshold (Youden's J on "
                 "inner 3-fold out-of-fold probabilities) fitted on the outer training folds only"),
        "seconds": round(time.perf_counter() - t0, 1), "oof": oof,
    }
    log.info("eval_fall n=%d combo_sens=%.3f combo_spec=%.3f seconds=%.1f", len(y),
             summary["combined"]["sensitivity"]["mean"], summary["combined"]["specificity"]["mean"], out["seconds"])
    return out


def _ms(s: dict[str, float]) -> str:
    return f"{s['mean']:.2f} ± {s['sd']:.2f}"


def table(result: dict[str, Any]) -> str:
    d = result["design"]
    lines = [f"Fall screening, {result['n']} participants ({result['n_fallers']} fallers), "
             f"{d['repeats']} x {d['folds']}-fold stratified CV, mean ± sd across repeats",
             f"{'model':<30}{'sensitivity':>13}{'specificity':>13}{'AUC':>13}{'accuracy':>13}"]
    for m in MODELS:
        s = result["models"][m]
        lines.append(f"{MODEL_LABELS[m]:<30}{_ms(s['sensitivity']):>13}{_ms(s['specificity']):>13}"
                     f"{_ms(s['auc']):>13}{_ms(s['accuracy']):>13}")
    ins = result["in_sample_single_feature"]
    lines.append(f"{'single feature, in-sample *':<30}{ins['sensitivity']:>13.2f}{ins['specificity']:>13.2f}"
                 f"{ins['auc']:>13.2f}{ins['accuracy']:>13.2f}")
    lines.append("published (Bet, Castro & Ponti 2021):")
    for name, acc, sens, spec in PUBLISHED:
        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}"
        lines.append(f"  {name:<28}{f(sens):>13}{f(spec):>13}{'-':>13}{f(acc):>13}")
    cr = result["coverage_risk"]
    lines.append("gate on (defer disagreements first, then the smallest margins): error on accepted cases")
    lines.append(f"{'fraction deferred':<20}" + "".join(f"{1 - c:>7.2f}" for c in cr["coverage"][::3]))
    lines.append(f"{'error (mean)':<20}" + "".join(f"{v:>7.2f}" for v in cr["risk_mean"][::3]))
    lines.append(f"{'error (sd)':<20}" + "".join(f"{v:>7.2f}" for v in cr["risk_sd"][::3]))
    lines.append(f"* feature and cut chosen and scored on the same {result['n']} people (no held-out data): "
                 "optimistic")
    rec = result["recipe"]
    pr, so = rec["predictor"], rec["second_opinion"]
    params = ", ".join(f"{k}={v}" for k, v in so["params"].items())
    lines += textwrap.wrap(f"predictor and second opinion as {rec['file']} defines them, fitted by training/train.py: "
                           f"MLP hidden {pr['hidden']}, dropout {pr['dropout']}, {pr['epochs']} epochs; "
                           f"{so['kind']} ({params})", 110)
    lines.append(f"predictor and second opinion agree on {result['agree_rate']['mean']:.0%} of participants")
    return "\n".join(lines)


def plot(result: dict[str, Any], out_png: Path) -> Path:
    """Coverage-risk curve: error on accepted cases vs fraction deferred, mean ± sd across repeats."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cr = result["coverage_risk"]
    deferred = 1 - np.asarray(cr["coverage"])
    mean, sd = np.asarray(cr["risk_mean"]), np.asarray(cr["risk_sd"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(deferred, mean, marker="o", color="tab:blue", label="combination, gate on")
    ax.fill_between(deferred, np.maximum(mean - sd, 0), mean + sd, color="tab:blue", alpha=0.2,
                    label="± sd across repeats")
    ax.set_xlabel("fraction deferred to a person")
    ax.set_ylabel("error on accepted cases")
    ax.set_title(f"Fall screening coverage-risk ({result['n']} participants)")
    ax.set_xlim(0, 0.95)
    ax.set_ylim(0, None)
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
