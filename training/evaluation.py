"""Evaluation helpers that resample problems: calibration, paired differences, within-problem ranking.

- :class:`Calibration`: temperature or Platt scaling of a probe's logit, fitted on the
  validation split only (by log-loss), stored in the scorer, applied before the sigmoid.
- :func:`bootstrap_ci`: percentile interval of any metric, resampling whole problems.
- :func:`paired_difference`: the difference of one metric between two scorers on the same
  steps, with its interval from the same problem resamples (a difference whose interval
  holds 0 is "no difference").

Within-problem ranking is :func:`stepprobe.training.metrics.within_problem_metrics`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from stepprobe.errors import StepprobeError

from . import metrics as M

CALIBRATIONS = ("none", "temperature", "platt")
MIN_SLOPE = 1e-3  # calibration keeps the score's order


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def logit(p: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """``p = sigmoid(a * logit + b)``; temperature scaling has ``b = 0`` (``a = 1 / T``)."""

    method: str = "none"
    a: float = 1.0
    b: float = 0.0

    def apply_logits(self, z: np.ndarray) -> np.ndarray:
        return _sigmoid(self.a * np.asarray(z, dtype=np.float64) + self.b)

    def apply(self, p: np.ndarray) -> np.ndarray:
        """Calibrated probability from an uncalibrated one."""
        if self.method == "none":
            return np.asarray(p, dtype=np.float64)
        return self.apply_logits(logit(p))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "a": float(self.a), "b": float(self.b)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Calibration":
        if not d:
            return cls()
        if d.get("method") not in CALIBRATIONS:
            raise StepprobeError(f"unknown calibration {d.get('method')!r}; known: {', '.join(CALIBRATIONS)}")
        return cls(str(d["method"]), float(d.get("a", 1.0)), float(d.get("b", 0.0)))


def fit_calibration(scores: np.ndarray, labels: np.ndarray, method: str = "platt") -> Calibration:
    """Fit on (uncalibrated probability, label) pairs by minimizing log-loss (Newton steps).

    ``temperature`` fits ``a`` alone; ``platt`` fits ``a`` and ``b``. ``a`` is kept at or
    above :data:`MIN_SLOPE`, so calibration never reverses the ranking (a probe trained with
    a within-problem ranking loss can have a logit that is anti-correlated with the label
    across problems; its calibrated score is then nearly constant, but still ordered)."""
    if method not in CALIBRATIONS:
        raise StepprobeError(f"unknown calibration {method!r}; known: {', '.join(CALIBRATIONS)}")
    if method == "none":
        return Calibration()
    y = np.asarray(labels, dtype=np.float64)
    if y.size == 0 or y.min() == y.max():
        raise StepprobeError("calibration needs both classes in the validation split")
    z = logit(scores)
    a, b = 1.0, 0.0
    fit_b = method == "platt"
    for _ in range(100):
        p = _sigmoid(a * z + b)
        r = p - y
        w = np.maximum(p * (1 - p), 1e-12)
        ga, gb = float((r * z).sum()), float(r.sum())
        haa, hab, hbb = float((w * z * z).sum()) + 1e-9, float((w * z).sum()), float(w.sum()) + 1e-9
        if fit_b:
            det = haa * hbb - hab * hab
            if det <= 0:
                break
            da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        else:
            da, db = ga / haa, 0.0
        step = 1.0
        loss0 = _logloss(a * z + b, y)
        while step > 1e-4 and _logloss(max(a - step * da, MIN_SLOPE) * z + (b - step * db), y) > loss0 + 1e-12:
            step /= 2
        a_new, b_new = max(a - step * da, MIN_SLOPE), b - step * db
        done = abs(a_new - a) < 1e-9 and abs(b_new - b) < 1e-9
        a, b = a_new, b_new
        if done:
            break
    return Calibration(method, float(a), float(b))


def _logloss(z: np.ndarray, y: np.ndarray) -> float:
    # log(1 + e^z) - y z, stably
    return float((np.logaddexp(0.0, z) - y * z).mean())


def _resample_counts(groups: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    uniq, inv = np.unique(np.asarray(groups), return_inverse=True)
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, len(uniq), len(uniq)), minlength=len(uniq)) for _ in range(n)])
    return counts, inv


def bootstrap_ci(metric: Callable[[np.ndarray], float], groups: np.ndarray, *, n: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile interval of ``metric(weights)`` over resamples of whole groups (problems).

    ``metric`` receives per-row integer weights (how often each row's problem was drawn)."""
    if n <= 0 or len(groups) == 0:
        return float("nan"), float("nan")
    counts, inv = _resample_counts(groups, n, seed)
    vals = np.array([metric(c[inv]) for c in counts], dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    if not vals.size:
        return float("nan"), float("nan")
    a = (1 - level) / 2
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))


def weighted_ece(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None, bins: int = 15) -> float:
    """Expected calibration error (equal-width bins), rows weighted (bootstrap weights)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    w = np.ones_like(s) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.sum() <= 0:
        return float("nan")
    idx = np.clip((s * bins).astype(int), 0, bins - 1)
    tw = np.bincount(idx, weights=w, minlength=bins)
    ts = np.bincount(idx, weights=w * s, minlength=bins)
    ty = np.bincount(idx, weights=w * y, minlength=bins)
    m = tw > 0
    return float(np.abs(ts[m] - ty[m]).sum() / w.sum())


def weighted_auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float:
    if weights is None:
        return M.auroc(scores, labels)
    return float(M.weighted_auroc(scores, labels, np.asarray(weights)[None, :])[0])


def metric_with_ci(name: str, scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, *, n: int = 1000,
                   seed: int = 0) -> dict[str, float]:
    """``{value, lo, hi}`` of ``auroc`` or ``ece`` with a problem-bootstrap interval."""
    fn = {"auroc": weighted_auroc, "ece": weighted_ece}[name]
    value = fn(scores, labels, None)
    lo, hi = bootstrap_ci(lambda w: fn(scores, labels, w), groups, n=n, seed=seed)
    return {"value": value, "lo": lo, "hi": hi}


def paired_difference(name: str, scores_a: np.ndarray, scores_b: np.ndarray, labels: np.ndarray,
                      groups: np.ndarray, *, n: int = 1000, seed: int = 0) -> dict[str, float]:
    """``metric(a) - metric(b)`` on the same rows, interval from the same problem resamples."""
    fn = {"auroc": weighted_auroc, "ece": weighted_ece}[name]
    diff = fn(scores_a, labels, None) - fn(scores_b, labels, None)
    lo, hi = bootstrap_ci(lambda w: fn(scores_a, labels, w) - fn(scores_b, labels, w), groups, n=n, seed=seed)
    return {"value": float(diff), "lo": lo, "hi": hi}
