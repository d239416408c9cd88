"""The bootstrap over problems and the interval it gives: one of each for every report.

Steps and traces of one problem are correlated, so every interval in stepprobe resamples
**problems** with replacement (:func:`resample_counts`), recomputes the statistic on each
resample with each row weighted by how often its problem was drawn (:func:`bootstrap`), and
takes the percentile interval (:func:`percentile_interval`). The resample count
(:data:`N_BOOT`), the level (:data:`LEVEL`) and the quantile method (:data:`QUANTILE_METHOD`:
``inverted_cdf``, so a bound is a value some resample produced, e.g. exactly 0 for a paired
difference on a few problems) are declared here only. The seed is fixed, so a table is
reproducible.

An estimate with its interval is an :class:`Interval`, written by one formatter
(:meth:`Interval.label`: ``0.700 [0.504, 0.838]``). Artifacts keep the keys their readers
know (no schema change): a metric as ``{"value", "lo", "hi", "n"}`` (``eval.json``,
``sweep.json``), a paired difference as ``{"diff", "low", "high", "n", "level", "verdict"}``
(``replay.json``, ``bench.json``, ``trust.json``), a metric table's columns as ``<m>``,
``<m>_lo``, ``<m>_hi``. :meth:`Interval.from_dict` and :meth:`Interval.from_flat` read all three.

:func:`paired_bootstrap`: two methods on the same problems give two per-problem outcome
vectors ``a`` and ``b``; the interval of ``mean(b) - mean(a)``. An interval that contains 0
reads as "no difference" (:attr:`PairedDiff.verdict`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .errors import StepprobeError

N_BOOT = 4000
LEVEL = 0.95
QUANTILE_METHOD = "inverted_cdf"
_CHUNK = 256  # resamples evaluated at once (bounds memory: chunk x rows weights)


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


@dataclasses.dataclass(frozen=True)
class Interval:
    """An estimate over ``n`` problems with its bootstrap interval ``[low, high]``."""

    value: float
    low: float
    high: float
    n: int | None = None
    level: float = LEVEL

    def label(self, digits: int = 3, *, signed: bool = False) -> str:
        """``0.700 [0.504, 0.838]``; ``signed``: ``+0.056 [-0.083, +0.194]``; a missing number is ``n/a``."""
        f = f"{{:{'+' if signed else ''}.{digits}f}}"
        s = [("n/a" if not math.isfinite(x) else f.format(x)) for x in (self.value, self.low, self.high)]
        return f"{s[0]} [{s[1]}, {s[2]}]"

    def to_dict(self) -> dict[str, Any]:
        """A metric's keys in ``eval.json`` / ``sweep.json``."""
        return {"value": self.value, "lo": self.low, "hi": self.high, "n": self.n}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | Interval | None) -> Interval:
        """Either artifact shape (``value/lo/hi`` or ``diff/low/high``); missing numbers are ``nan``."""
        if isinstance(d, Interval):
            return d
        d = d or {}
        n = d.get("n")
        return cls(_num(d.get("value", d.get("diff"))), _num(d.get("lo", d.get("low"))),
                   _num(d.get("hi", d.get("high"))), None if n is None else int(n), float(d.get("level") or LEVEL))

    @classmethod
    def from_flat(cls, d: Mapping[str, Any], name: str, n: int | None = None) -> Interval:
        """``name``, ``name_lo``, ``name_hi`` of a metric table (train's ``metrics.json``, sweep rows)."""
        return cls(_num(d.get(name)), _num(d.get(f"{name}_lo")), _num(d.get(f"{name}_hi")), n)

    @property
    def has_bounds(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)


class PairedDiff(Interval):
    """``mean(b) - mean(a)`` over ``n`` problems (:func:`paired_bootstrap`), with a verdict."""

    @property
    def diff(self) -> float:
        return self.value

    @property
    def verdict(self) -> str:
        """``better`` (interval above 0), ``worse`` (below) or ``no difference``."""
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "no difference"

    def label(self, digits: int = 3, *, signed: bool = True) -> str:
        return super().label(digits, signed=signed)

    def to_dict(self) -> dict[str, Any]:
        """A paired difference's keys in ``replay.json``, ``bench.json``, ``trust.json``."""
        return {"diff": self.value, "low": self.low, "high": self.high, "n": self.n, "level": self.level,
                "verdict": self.verdict}


def format_interval(d: Mapping[str, Any] | Interval | None, digits: int = 3, *, signed: bool = False,
                    missing: str = "n/a") -> str:
    """:meth:`Interval.label` of an interval or of either artifact dict; ``missing`` for none."""
    return missing if not d else Interval.from_dict(d).label(digits, signed=signed)


def resample_counts(n_groups: int, *, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """``counts[b, g]``: how often group ``g`` is drawn in resample ``b`` (``n_groups`` draws each)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_groups, size=(n_boot, n_groups))
    flat = (idx + n_groups * np.arange(n_boot)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n_groups).reshape(n_boot, n_groups)


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of bootstrap values (non-finite ones dropped; ``nan`` when none is left)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return math.nan, math.nan
    a = (1.0 - level) / 2
    low, high = np.quantile(v, [a, 1.0 - a], method=QUANTILE_METHOD)
    return float(low), float(high)


def bootstrap(stat: Callable[[np.ndarray], np.ndarray], groups: Sequence[Any] | np.ndarray, *, n_boot: int = N_BOOT,
              level: float = LEVEL, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of ``stat`` over resamples of whole groups (problems).

    ``groups[i]`` is row ``i``'s problem; ``stat(w)`` gets ``w[b, i]``, the weight of row ``i`` in
    resample ``b`` (how often its problem was drawn), and returns one value per resample."""
    g = np.asarray(groups)
    if n_boot <= 0 or g.size == 0:
        return math.nan, math.nan
    uniq, inv = np.unique(g, return_inverse=True)
    counts = resample_counts(len(uniq), n_boot=n_boot, seed=seed)
    vals = np.concatenate([np.asarray(stat(counts[s:s + _CHUNK][:, inv]), dtype=np.float64).reshape(-1)
                           for s in range(0, n_boot, _CHUNK)])
    return percentile_interval(vals, level)


def mean_interval(values: Sequence[float] | np.ndarray, *, n_boot: int = N_BOOT, level: float = LEVEL,
                  seed: int = 0) -> Interval:
    """The mean of one value per problem (non-finite ones left out) with its interval."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return Interval(math.nan, math.nan, math.nan, 0, level)
    low, high = bootstrap(lambda w: w @ v / v.size, np.arange(v.size), n_boot=n_boot, level=level, seed=seed)
    return Interval(float(v.mean()), low, high, int(v.size), level)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, n_boot: int = N_BOOT, level: float = LEVEL,
                     seed: int = 0) -> PairedDiff:
    """Paired bootstrap interval of ``mean(b) - mean(a)`` over problems (see module docstring)."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise StepprobeError(f"paired bootstrap needs two outcome vectors over the same problems "
                             f"(got shapes {x.shape} and {y.shape})")
    if len(x) == 0:
        raise StepprobeError("paired bootstrap over zero problems")
    return PairedDiff(*dataclasses.astuple(mean_interval(y - x, n_boot=n_boot, level=level, seed=seed)))
