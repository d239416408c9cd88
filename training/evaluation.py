"""Evaluation helpers: calibration, and metrics with their problem-bootstrap interval.

- :class:`Calibration`: temperature or Platt scaling of a probe's logit, fitted on the
  validation split only (by log-loss), stored in the scorer, applied before the sigmoid.
- :func:`metric_with_ci`: ``auroc`` or ``ece`` with its interval from resampling whole
  problems (:func:`stepprobe.stats.bootstrap`).
- :func:`paired_difference`: the difference of one metric between two scorers on the same
  steps, with its interval from the same problem resamples (a difference whose interval
  holds 0 is "no difference").

Within-problem ranking is :func:`stepprobe.training.metrics.within_problem_metrics`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit
from scipy.special import logit as _logit

from stepprobe.errors import StepprobeError
from stepprobe.stats import LEVEL, N_BOOT, Interval, bootstrap

from . import metrics as M

CALIBRATIONS = ("none", "temperature", "platt")
MIN_SLOPE = 1e-3  # calibration keeps the score's order


def logit(p: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """``log(p / (1 - p))`` of ``p`` clipped to ``[eps, 1 - eps]`` (a score of exactly 0 or 1 stays finite)."""
    return _logit(np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps))


@dataclasses.dataclass(frozen=True)
class Calibration:
    """``p = sigmoid(a * logit + b)``; temperature scaling has ``b = 0`` (``a = 1 / T``)."""

    method: str = "none"
    a: float = 1.0
    b: float = 0.0

    def apply_logits(self, z: np.ndarray) -> np.ndarray:
        return expit(self.a * np.asarray(z, dtype=np.float64) + self.b)

    def apply(self, p: np.ndarray) -> np.ndarray:
        """Calibrated probability from an uncalibrated one."""
        if self.method == "none":
            return np.asarray(p, dtype=np.float64)
        return self.apply_logits(logit(p))

    def invert(self, p: np.ndarray) -> np.ndarray:
        """The uncalibrated probability behind a calibrated one (``p = sigmoid(a z + b)`` solved for z)."""
        return expit((logit(p, eps=1e-12) - self.b) / self.a)

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
    """Fit on (uncalibrated probability, label) pairs by minimizing the mean log-loss (L-BFGS-B).

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
    fit_b = method == "platt"

    def loss(ab: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = ab[0], ab[1] if fit_b else 0.0
        t = a * z + b
        r = (expit(t) - y) / y.size  # d loss / d t, per row
        grad = np.array([r @ z, r.sum()] if fit_b else [r @ z])
        return float((np.logaddexp(0.0, t) - y * t).mean()), grad  # log(1 + e^t) - y t, stably

    x0 = np.array([1.0, 0.0] if fit_b else [1.0])
    bounds = [(MIN_SLOPE, None)] + ([(None, None)] if fit_b else [])
    res = minimize(loss, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 1000})
    return Calibration(method, float(res.x[0]), float(res.x[1]) if fit_b else 0.0)


#: name -> (the metric, the metric under many row weightings ``w[b, n]`` at once)
_METRIC = {"auroc": (M.auroc, M.weighted_auroc), "ece": (M.ece, lambda s, y, w: M.ece(s, y, weights=w))}


def _metric(name: str):
    if name not in _METRIC:
        raise StepprobeError(f"unknown metric {name!r} for an interval; known: {', '.join(_METRIC)}")
    return _METRIC[name]


def metric_with_ci(name: str, scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, *, n: int = N_BOOT,
                   level: float = LEVEL, seed: int = 0) -> Interval:
    """``auroc`` or ``ece`` over the rows with its interval from ``n`` resamples of the problems ``groups``."""
    plain, weighted = _metric(name)
    low, high = bootstrap(lambda w: weighted(scores, labels, w), groups, n_boot=n, level=level, seed=seed)
    return Interval(plain(scores, labels), low, high, int(np.unique(np.asarray(groups)).size), level)


def paired_difference(name: str, scores_a: np.ndarray, scores_b: np.ndarray, labels: np.ndarray,
                      groups: np.ndarray, *, n: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> Interval:
    """``metric(a) - metric(b)`` on the same rows, interval from the same problem resamples."""
    plain, weighted = _metric(name)
    diff = plain(scores_a, labels) - plain(scores_b, labels)
    low, high = bootstrap(lambda w: weighted(scores_a, labels, w) - weighted(scores_b, labels, w), groups, n_boot=n,
                          level=level, seed=seed)
    return Interval(float(diff), low, high, int(np.unique(np.asarray(groups)).size), level)
