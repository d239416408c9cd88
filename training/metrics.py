"""Probe metrics, with one name for each (shared by the LightningModule, the tuner and reports).

Scores are probabilities that the trace ends **correct** (label 1). On a split:

- ``auroc``, ``auprc`` (average precision, positives = correct): step level;
- ``accuracy``, ``f1`` at the chosen threshold (picked on validation to maximize F1, then
  applied unchanged to test);
- ``ece``: expected calibration error, 15 equal-width bins;
- ``trace_auroc``: AUROC over traces of the running-mean score at the trace's last step
  (the mean of its step scores: what the runner's default aggregation sees at the end);
- ``early25_auroc``, ``early50_auroc``, ``early75_auroc``: step-level AUROC using only steps
  whose ``rel_position`` (step index / number of steps) is at most 0.25 / 0.5 / 0.75.

Logged names are ``<split>_<metric>``, e.g. :data:`VAL_AUROC` = ``"val_auroc"``.
An AUROC on one class only is ``nan``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score

AUROC = "auroc"
AUPRC = "auprc"
ACCURACY = "accuracy"
F1 = "f1"
ECE = "ece"
TRACE_AUROC = "trace_auroc"
EARLY_FRACTIONS = (0.25, 0.5, 0.75)
EARLY_AUROC = {f: f"early{int(f * 100)}_auroc" for f in EARLY_FRACTIONS}
LOSS = "loss"
METRICS = (AUROC, AUPRC, ACCURACY, F1, ECE, TRACE_AUROC, *EARLY_AUROC.values())
HIGHER_IS_BETTER = {m: m != ECE for m in METRICS} | {LOSS: False}

TRAIN, VAL, TEST = "train", "val", "test"


def key(split: str, metric: str) -> str:
    """Logged name of a metric on a split: ``key("val", "auroc") == "val_auroc"``."""
    return f"{split}_{metric}"


VAL_LOSS = key(VAL, LOSS)
VAL_AUROC = key(VAL, AUROC)
VAL_EARLY50_AUROC = key(VAL, EARLY_AUROC[0.5])
VAL_TRACE_AUROC = key(VAL, TRACE_AUROC)
#: What early stopping, checkpointing and the tuner maximize unless told otherwise.
DEFAULT_MONITOR = VAL_AUROC
DEFAULT_TUNE_OBJECTIVE = VAL_EARLY50_AUROC


def split_of(name: str) -> tuple[str, str]:
    split, _, metric = name.partition("_")
    return split, metric


def mode_of(name: str) -> str:
    """``"max"`` or ``"min"`` for a logged metric name."""
    _, metric = split_of(name)
    if metric not in HIGHER_IS_BETTER:
        from stepprobe.errors import StepprobeError

        raise StepprobeError(f"unknown metric {name!r}; known: "
                             + ", ".join(key(VAL, m) for m in (*METRICS, LOSS)))
    return "max" if HIGHER_IS_BETTER[metric] else "min"


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Rank AUROC (ties count one half); ``nan`` when only one class is present."""
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def weighted_auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC under many weightings at once: ``weights[b, n]`` -> ``[b]`` (for the bootstrap)."""
    order = np.argsort(scores, kind="mergesort")
    s, y, w = np.asarray(scores)[order], np.asarray(labels).astype(bool)[order], weights[:, order].astype(np.float64)
    # Group tied scores: each group contributes pos_w * (neg_w below + neg_w in group / 2).
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    wp = np.add.reduceat(w * y, starts, axis=1)
    wn = np.add.reduceat(w * ~y, starts, axis=1)
    below = np.cumsum(wn, axis=1) - wn
    num = (wp * (below + wn / 2)).sum(1)
    den = wp.sum(1) * wn.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def bootstrap_auroc_ci(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, *, n: int = 1000,
                       level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile CI of AUROC, resampling whole groups (problems) with replacement.

    Steps of one problem are correlated; resampling steps would give too narrow an interval.
    """
    if n <= 0:
        return float("nan"), float("nan")
    uniq, inv = np.unique(np.asarray(groups), return_inverse=True)
    rng = np.random.default_rng(seed)
    vals: list[np.ndarray] = []
    for start in range(0, n, 256):  # bounded memory
        b = min(256, n - start)
        counts = np.stack([np.bincount(rng.integers(0, len(uniq), len(uniq)), minlength=len(uniq)) for _ in range(b)])
        vals.append(weighted_auroc(scores, labels, counts[:, inv]))
    v = np.concatenate(vals)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    a = (1 - level) / 2
    return float(np.quantile(v, a)), float(np.quantile(v, 1 - a))


def ece(scores: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if scores.size == 0:
        return float("nan")
    idx = np.clip((scores * bins).astype(int), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.sum() * abs(scores[m].mean() - labels[m].mean())
    return float(total / scores.size)


def best_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The score threshold (predict correct when score >= t) that maximizes F1."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if scores.size == 0 or not labels.any():
        return 0.5
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    last = np.r_[s[1:] != s[:-1], True]  # only cut between distinct scores
    f1 = 2 * tp / (tp + fp + y.sum())
    f1 = np.where(last, f1, -1)
    return float(s[int(np.argmax(f1))])


def trace_scores(scores: np.ndarray, labels: np.ndarray, trace: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per trace: the running mean at its last step (= mean of its step scores) and its label."""
    uniq, inv = np.unique(np.asarray(trace), return_inverse=True)
    sums = np.bincount(inv, weights=np.asarray(scores, dtype=np.float64), minlength=len(uniq))
    counts = np.bincount(inv, minlength=len(uniq))
    lab = np.zeros(len(uniq))
    lab[inv] = np.asarray(labels)
    return sums / np.maximum(counts, 1), lab


def compute_metrics(scores: np.ndarray, labels: np.ndarray, *, trace: np.ndarray | None = None,
                    rel_position: np.ndarray | None = None, threshold: float = 0.5,
                    prefix: str | None = None) -> dict[str, float]:
    """All metrics of one split; names prefixed ``<prefix>_`` when given."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    pred = scores >= threshold
    y = labels.astype(bool)
    tp = float((pred & y).sum())
    prec_den, rec_den = float(pred.sum()), float(y.sum())
    f1 = 2 * tp / (prec_den + rec_den) if prec_den + rec_den > 0 else 0.0
    out: dict[str, float] = {
        AUROC: auroc(scores, labels),
        AUPRC: float(average_precision_score(labels, scores)) if 0 < y.sum() < y.size else float("nan"),
        ACCURACY: float((pred == y).mean()) if y.size else float("nan"),
        F1: float(f1),
        ECE: ece(scores, labels),
    }
    if trace is not None:
        ts, tl = trace_scores(scores, labels, trace)
        out[TRACE_AUROC] = auroc(ts, tl)
    if rel_position is not None:
        rp = np.asarray(rel_position)
        for frac, name in EARLY_AUROC.items():
            m = rp <= frac + 1e-9
            out[name] = auroc(scores[m], labels[m])
    if prefix:
        out = {key(prefix, k): v for k, v in out.items()}
    return out


def clean(d: dict[str, Any]) -> dict[str, Any]:
    """Floats with nan -> None, for JSON."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out[k] = clean(v)
        elif isinstance(v, (float, np.floating)):
            out[k] = None if not np.isfinite(v) else float(v)
        else:
            out[k] = v
    return out
