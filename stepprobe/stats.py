"""Paired bootstrap over problems: the one interval every accuracy difference carries.

Two methods evaluated on the same problems (and, in a replay, on the same traces) give two
per-problem outcome vectors ``a`` and ``b``. :func:`paired_bootstrap` resamples **problems**
with replacement, recomputes ``mean(b) - mean(a)`` on each resample, and reports the
difference with its percentile interval. An interval that contains 0 reads as "no
difference" (:attr:`PairedDiff.verdict`). The seed is fixed, so a table is reproducible.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from .errors import StepprobeError

N_BOOT = 4000
LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class PairedDiff:
    """``mean(b) - mean(a)`` over ``n`` problems, with its bootstrap interval."""

    diff: float
    low: float
    high: float
    n: int
    level: float = LEVEL

    @property
    def verdict(self) -> str:
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "no difference"

    def label(self, digits: int = 3) -> str:
        """``+0.056 [-0.083, +0.194]``."""
        f = f"{{:+.{digits}f}}"
        return f"{f.format(self.diff)} [{f.format(self.low)}, {f.format(self.high)}]"

    def to_dict(self) -> dict[str, Any]:
        return {"diff": self.diff, "low": self.low, "high": self.high, "n": self.n, "level": self.level,
                "verdict": self.verdict}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, n_boot: int = N_BOOT, level: float = LEVEL,
                     seed: int = 0) -> PairedDiff:
    """Paired bootstrap interval of ``mean(b) - mean(a)`` over problems (see module docstring)."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise StepprobeError(f"paired bootstrap needs two outcome vectors over the same problems "
                             f"(got shapes {x.shape} and {y.shape})")
    n = len(x)
    if n == 0:
        raise StepprobeError("paired bootstrap over zero problems")
    d = y - x
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    means = d[idx].mean(axis=1)
    alpha = (1.0 - level) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha], method="inverted_cdf")
    return PairedDiff(float(d.mean()), float(low), float(high), n, level)
