"""Probe metrics, with one name for each (shared by the LightningModule, the tuner and reports).

Scores are probabilities that the trace ends **correct** (label 1). On a split:

- ``auroc``, ``auprc`` (average precision, positives = correct): step level;
- ``accuracy``, ``f1`` at the chosen threshold (picked on validation to maximize F1, then
  applied unchanged to test);
- ``ece``: expected calibration error, :data:`ECE_BINS` equal-width bins;
- ``trace_auroc``: AUROC over traces of the running-mean score at the trace's last step
  (the mean of its step scores: what the runner's default aggregation sees at the end);
- ``early25_auroc``, ``early50_auroc``, ``early75_auroc``: step-level AUROC using only steps
  whose ``rel_position`` (step index / number of steps) is at most 0.25 / 0.5 / 0.75.

Within-problem metrics (what a vote needs: which of *one problem's* traces are right; how
hard a problem is does not matter). Only problems with at least one correct and one wrong
trace count, and each such problem weighs the same:

- ``within_auroc``: per problem, the step-level AUROC of its steps (every step of a correct
  trace against every step of a wrong trace of the same problem); the **mean over problems**.
  (Not the pooled pairwise fraction: that would let a problem with many long traces dominate,
  while a vote is decided once per problem.)
- ``within_rank25``, ``within_rank50``, ``within_rank75``: per problem, the fraction of
  (correct, wrong) trace pairs that the traces' running-mean scores at 25 / 50 / 75 % of
  their steps (the mean of the scores of steps with ``rel_position`` at most that fraction:
  what the runner's default aggregate sees at that point) order correctly, ties counting one
  half; the mean over problems.

:func:`compute_metrics` adds each one's interval (``<metric>_lo`` / ``<metric>_hi``) when asked:
the problem bootstrap of :mod:`stepprobe.stats` over the per-problem values.

Logged names are ``<split>_<metric>``, e.g. :data:`VAL_AUROC` = ``"val_auroc"``.
An AUROC on one class only is ``nan``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from stepprobe.stats import mean_interval

AUROC = "auroc"
AUPRC = "auprc"
ACCURACY = "accuracy"
F1 = "f1"
ECE = "ece"
TRACE_AUROC = "trace_auroc"
EARLY_FRACTIONS = (0.25, 0.5, 0.75)
EARLY_AUROC = {f: f"early{int(f * 100)}_auroc" for f in EARLY_FRACTIONS}
WITHIN_AUROC = "within_auroc"
WITHIN_RANK = {f: f"within_rank{int(f * 100)}" for f in EARLY_FRACTIONS}
WITHIN_METRICS = (WITHIN_AUROC, *WITHIN_RANK.values())
LOSS = "loss"
#: What every split gets; the within-problem metrics need the problem of each row as well.
METRICS = (AUROC, AUPRC, ACCURACY, F1, ECE, TRACE_AUROC, *EARLY_AUROC.values())
ALL_METRICS = (*METRICS, *WITHIN_METRICS)
HIGHER_IS_BETTER = {m: m != ECE for m in ALL_METRICS} | {LOSS: False}
ECE_BINS = 15

TRAIN, VAL, TEST = "train", "val", "test"


def key(split: str, metric: str) -> str:
    """Logged name of a metric on a split: ``key("val", "auroc") == "val_auroc"``."""
    return f"{split}_{metric}"


VAL_LOSS = key(VAL, LOSS)
#: What the tuner maximizes unless told otherwise.
DEFAULT_TUNE_OBJECTIVE = key(VAL, EARLY_AUROC[0.5])


def split_of(name: str) -> tuple[str, str]:
    split, _, metric = name.partition("_")
    return split, metric


def mode_of(name: str) -> str:
    """``"max"`` or ``"min"`` for a logged metric name."""
    _, metric = split_of(name)
    if metric not in HIGHER_IS_BETTER:
        from stepprobe.errors import StepprobeError

        raise StepprobeError(f"unknown metric {name!r}; known: "
                             + ", ".join(key(VAL, m) for m in (*ALL_METRICS, LOSS)))
    return "max" if HIGHER_IS_BETTER[metric] else "min"


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC (ties count one half); ``nan`` when only one class is present."""
    y = np.asarray(labels).astype(bool)
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, np.asarray(scores, dtype=np.float64)))


def weighted_auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC under many row weightings at once: ``weights[b, n]`` -> ``[b]`` (``nan`` where a class weighs 0).

    Kept beside :func:`auroc` (scikit-learn's ``roc_auc_score``) because the problem bootstrap
    needs thousands of weightings of the same rows and the within-problem metrics one weighting
    per problem: one sort serves them all here, where ``roc_auc_score(sample_weight=...)`` would
    sort and validate once per weighting (about 1 ms each)."""
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


def within_problem_auroc(scores: np.ndarray, labels: np.ndarray, problem: np.ndarray) -> dict[str, float]:
    """Per problem with both outcomes: the AUROC of its rows (``{str(problem): auroc}``, sorted by problem)."""
    scores, y, problem = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool), np.asarray(problem)
    if not problem.size:
        return {}
    uniq, inv = np.unique(problem, return_inverse=True)
    pos, cnt = np.bincount(inv, weights=y), np.bincount(inv)  # one entry per problem (np.unique's inverse)
    both = np.flatnonzero((pos > 0) & (pos < cnt))
    out: dict[str, float] = {}
    chunk = max(1, 4_000_000 // scores.size)  # one-hot weights: chunk x rows
    for a in range(0, len(both), chunk):
        g = both[a:a + chunk]
        vals = weighted_auroc(scores, y, inv[None, :] == g[:, None])
        out.update((str(uniq[k]), float(v)) for k, v in zip(g, vals))
    return out


def ece(scores: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS,
        weights: np.ndarray | None = None) -> float | np.ndarray:
    """Expected calibration error over equal-width bins: ``sum over bins |sum(score) - sum(label)| / n``.

    ``weights``: per-row weights (``[n]`` gives a float) or many weightings at once (``[b, n]``
    gives ``[b]``, for the bootstrap); ``nan`` where the rows weigh nothing."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    w = np.ones(s.size) if weights is None else np.asarray(weights, dtype=np.float64)
    w2 = np.atleast_2d(w)
    idx = np.clip((s * bins).astype(int), 0, bins - 1)
    gap = np.zeros(w2.shape[0])
    for b in np.unique(idx):
        m = idx == b
        gap += np.abs(w2[:, m] @ (s[m] - y[m]))
    total = w2.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(total > 0, gap / total, np.nan)
    return out if w.ndim == 2 else float(out[0])


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
    lab = np.zeros(len(uniq))
    lab[inv] = np.asarray(labels)
    return np.bincount(inv, weights=scores) / np.maximum(np.bincount(inv), 1), lab


#: How far above a fraction a step's ``rel_position`` may lie and still count as at most it: the
#: file stores ``k / n`` in float32 (``float32(1/3)`` is 1e-8 above 1/3); distinct ``k / n`` of
#: traces under a million steps lie further apart than this.
REL_TOLERANCE = 1e-6


def up_to(rel_position: np.ndarray, fraction: float) -> np.ndarray:
    """Which steps lie at most ``fraction`` of the way through their trace (``rel_position <=
    fraction``, within :data:`REL_TOLERANCE`): the early metrics' and the running means' steps."""
    return np.asarray(rel_position, dtype=np.float64) <= fraction + REL_TOLERANCE


def running_mean_at(scores: np.ndarray, trace: np.ndarray, rel_position: np.ndarray,
                    fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Each trace's running-mean score at ``fraction`` of its steps: the mean of its step scores
    :func:`up_to` that fraction. Returns (trace ids, means); traces with no such step are left out."""
    m = up_to(rel_position, fraction)
    if not m.any():
        return np.zeros(0, dtype=np.asarray(trace).dtype), np.zeros(0)
    # np.unique's inverse takes every value 0..len(uniq)-1, so the counts have one entry per trace
    uniq, inv = np.unique(np.asarray(trace)[m], return_inverse=True)
    return uniq, np.bincount(inv, weights=np.asarray(scores)[m]) / np.bincount(inv)


def within_problem_rank(scores: np.ndarray, labels: np.ndarray, trace: np.ndarray, problem: np.ndarray,
                        rel_position: np.ndarray, fraction: float) -> dict[str, float]:
    """Per problem with both outcomes among its traces: the pairwise ranking accuracy of the
    traces' running-mean scores at ``fraction`` of their steps (``{problem: accuracy}``)."""
    trace, problem, labels = np.asarray(trace), np.asarray(problem), np.asarray(labels).astype(bool)
    ids, means = running_mean_at(scores, trace, rel_position, fraction)
    if ids.size == 0:
        return {}
    # one row per trace: its problem and label (constant within a trace)
    uniq_all, first_row = np.unique(trace, return_index=True)
    rows = first_row[np.searchsorted(uniq_all, ids)]
    # the fraction of (correct, wrong) pairs ordered right, ties one half = the AUROC of the traces
    return within_problem_auroc(means, labels[rows], problem[rows])


def _mean(per_problem: dict[str, float]) -> float:
    v = [x for x in per_problem.values() if np.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def within_problem_metrics(scores: np.ndarray, labels: np.ndarray, *, trace: np.ndarray, problem: np.ndarray,
                           rel_position: np.ndarray, bootstrap: int = 0, seed: int = 0) -> dict[str, float]:
    """``within_auroc`` and ``within_rank25/50/75`` (with ``_lo``/``_hi`` when ``bootstrap`` > 0:
    that many problem resamples), plus ``within_problems``: how many problems have both outcomes."""
    per = {WITHIN_AUROC: within_problem_auroc(scores, labels, problem)}
    for frac, name in WITHIN_RANK.items():
        per[name] = within_problem_rank(scores, labels, trace, problem, rel_position, frac)
    out: dict[str, float] = {}
    for name, d in per.items():
        out[name] = _mean(d)
        if bootstrap > 0:
            iv = mean_interval(list(d.values()), n_boot=bootstrap, seed=seed)
            out[f"{name}_lo"], out[f"{name}_hi"] = iv.low, iv.high
    out[WITHIN_PROBLEMS] = float(len(per[WITHIN_AUROC]))
    return out


WITHIN_PROBLEMS = "within_problems"


def compute_metrics(scores: np.ndarray, labels: np.ndarray, *, trace: np.ndarray | None = None,
                    rel_position: np.ndarray | None = None, threshold: float = 0.5,
                    prefix: str | None = None, problem: np.ndarray | None = None,
                    bootstrap: int = 0) -> dict[str, float]:
    """All metrics of one split; names prefixed ``<prefix>_`` when given. The within-problem
    metrics need ``problem``, ``trace`` and ``rel_position``; ``bootstrap`` > 0 adds their
    intervals (``<metric>_lo``, ``<metric>_hi``)."""
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
        for frac, name in EARLY_AUROC.items():
            m = up_to(rel_position, frac)
            out[name] = auroc(scores[m], labels[m])
    if problem is not None and trace is not None and rel_position is not None:
        out.update(within_problem_metrics(scores, labels, trace=trace, problem=problem, rel_position=rel_position,
                                          bootstrap=bootstrap))
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
