"""Risk control: choose how far to trust a probe with a finite-sample guarantee.

The setting (Learn-then-Test; Angelopoulos, Bates, Candès, Jordan and Lei, 2021). There are
``n`` calibration problems, exchangeable with the problems a user will run, and an ordered
list of pruning cutoffs ``c_1 < c_2 < ... < c_m``; ``c_0`` (prune nothing) is plain
self-consistency. For each problem ``i`` and cutoff ``c_j`` the loss is

    L_ij = SC correct on i  -  pruned run correct on i          (in {-1, 0, 1})

so the risk ``R(c) = E[L(c)]`` is the expected accuracy lost against self-consistency with the
same N and KV budget. A user sets a tolerance ``alpha`` (``--max-accuracy-loss``) and a
failure rate ``delta``. For ``j = 1, 2, ...`` in that fixed order the null ``H_j: R(c_j) > alpha``
is tested at level ``delta``; testing stops at the first null that is not rejected, and the
last rejected cutoff is chosen (``c_0`` when none is). Fixed-sequence testing controls the
family-wise error at ``delta``, so

    P( R(chosen cutoff) > alpha ) <= delta

over the draw of the calibration problems, whatever the probe: a probe that is pure noise
gets (almost) no pruning, a probe that knows the labels gets most of it.

The p-values are the betting p-values of Waudby-Smith and Ramdas (2020, "WSR"), which the
LTT paper recommends for bounded losses: with ``Z = (1 + L) / 2`` in ``[0, 1]`` and
``m = (1 + alpha) / 2``, the capital ``K_t = prod_{s <= t} (1 + lam_s (m - Z_s))`` is a
non-negative supermartingale under the null, so ``p = 1 / max_t K_t`` is valid (Ville's
inequality). The bets ``lam_s`` are predictable (they use ``Z_1..Z_{s-1}`` only) and adapt to
the variance, which matters here: most problems' votes do not change (``L = 0``), and a
variance-blind bound (Hoeffding) could not certify a loss of one point on a few hundred
problems at all. Problems enter the capital process in a fixed, seeded order.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from .errors import StepprobeError

#: Default tolerance (accuracy points lost against self-consistency) and failure rate.
DEFAULT_TOLERANCE = 0.01
DEFAULT_DELTA = 0.1
#: Bets are capped at this fraction of the largest bet that keeps the capital non-negative.
BET_CAP = 0.9


def wsr_pvalue(losses: Sequence[float], alpha: float, delta: float, *, seed: int = 0) -> float:
    """Valid p-value for the null ``E[L] > alpha`` (losses in ``[-1, 1]``; see module docstring)."""
    x = np.asarray(losses, dtype=np.float64)
    if x.ndim != 1 or not len(x):
        raise StepprobeError("risk control needs at least one calibration problem")
    if np.any(x < -1 - 1e-9) or np.any(x > 1 + 1e-9):
        raise StepprobeError("risk control: losses must lie in [-1, 1]")
    if not 0 <= alpha < 1 or not 0 < delta < 1:
        raise StepprobeError(f"risk control: need 0 <= tolerance < 1 and 0 < delta < 1 (got {alpha}, {delta})")
    z = (1.0 + x[np.random.default_rng(seed).permutation(len(x))]) / 2.0
    m = (1.0 + alpha) / 2.0
    cap = BET_CAP / (1.0 - m)  # 1 + lam (m - z) >= 1 - cap (1 - m) > 0 for every z in [0, 1]
    n = len(z)
    log_k = best = 0.0
    var, s_sum, sq_sum = 0.25, 0.0, 0.0  # WSR's estimates before any value: mean 1/2, variance 1/4
    for t, zi in enumerate(z, start=1):
        lam = min(cap, math.sqrt(2.0 * math.log(1.0 / delta) / (n * var)))  # uses values before t only
        log_k += math.log1p(lam * (m - zi))
        best = max(best, log_k)
        s_sum += zi
        mu = (0.5 + s_sum) / (t + 1)
        sq_sum += (zi - mu) ** 2
        var = (0.25 + sq_sum) / (t + 1)
    return float(min(1.0, math.exp(-best)))


@dataclasses.dataclass(frozen=True)
class RiskChoice:
    """The outcome of fixed-sequence testing over cutoffs."""

    index: int  # 0: prune nothing; j >= 1: cutoff j of the list given
    cutoff: float | None  # None: prune nothing (c_0); math.inf: any scored trace may go (the paper's rule)
    alpha: float
    delta: float
    pvalues: list[float]  # for the cutoffs tested, in order (the sequence stops at the first > delta)
    risks: list[float]  # observed mean loss of every cutoff (all of them, for the record)

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "cutoff": _num(self.cutoff), "tolerance": self.alpha, "delta": self.delta,
                "pvalues": self.pvalues, "observed_risk": self.risks}


def _num(x: float | None) -> float | str | None:
    return "inf" if x is not None and math.isinf(x) else x


def choose_cutoff(cutoffs: Sequence[float], losses: np.ndarray, alpha: float = DEFAULT_TOLERANCE,
                  delta: float = DEFAULT_DELTA, *, seed: int = 0) -> RiskChoice:
    """Learn-then-Test over ``cutoffs`` (ascending, the most cautious first); ``losses[j, i]`` is
    problem i's loss at cutoff j. Returns the last cutoff whose null is rejected in order."""
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 2 or losses.shape[0] != len(cutoffs):
        raise StepprobeError(f"risk control: {len(cutoffs)} cutoffs but a loss table of shape {losses.shape}")
    if list(cutoffs) != sorted(cutoffs):
        raise StepprobeError("risk control: cutoffs must be ascending (the most cautious first)")
    risks = [float(r) for r in losses.mean(axis=1)] if losses.size else [0.0] * len(cutoffs)
    pvalues: list[float] = []
    chosen = 0
    for j in range(len(cutoffs)):
        p = wsr_pvalue(losses[j], alpha, delta, seed=seed)
        pvalues.append(p)
        if p > delta:
            break
        chosen = j + 1
    return RiskChoice(chosen, None if chosen == 0 else float(cutoffs[chosen - 1]), alpha, delta, pvalues, risks)


def cutoff_grid(scores: Sequence[float], points: int = 40) -> list[float]:
    """Candidate cutoffs from the calibration traces' scores: ``points`` quantiles (strictly
    increasing, duplicates dropped) and ``inf`` last (every scored trace prunable: the paper's rule)."""
    s = np.asarray([v for v in scores if v is not None and np.isfinite(v)], dtype=np.float64)
    if not len(s):
        return [math.inf]
    qs = np.quantile(s, np.linspace(0.0, 1.0, points + 1)[1:], method="inverted_cdf")
    grid = sorted({float(q) for q in qs})
    # a cutoff prunes traces strictly below it: nudge each quantile up so that its trace counts
    grid = [float(np.nextafter(q, np.inf)) for q in grid]
    return grid + [math.inf]


def choose_vote(majority: Sequence[float], other: Sequence[float], *, seed: int = 0) -> tuple[bool, dict[str, Any]]:
    """Whether a weighted vote has earned its place: its paired bootstrap interval against the
    majority vote (same traces, same problems) lies above zero. Returns (use it, the interval)."""
    from .stats import paired_bootstrap

    d = paired_bootstrap(majority, other, seed=seed)
    return d.low > 0, d.to_dict()
