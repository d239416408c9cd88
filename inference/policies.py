"""Trace scores from step scores, and the pruning rules, as plain code the scheduler calls.

Kept free of vLLM so the rules are unit-tested on their own; the scheduler
(:mod:`stepprobe.inference.scheduler`) only feeds them and acts on their answers.

What an unscored trace counts as: **unknown, never pruned**. A trace with no completed step
yet has no evidence against it; memory pruning ranks every scored trace below it (when only
unscored traces are left, vLLM preempts as usual), the threshold rule waits for
``warmup_steps`` steps, and keep-top-fraction waits until the trace has ``keep_step`` steps
or has finished.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable


@dataclasses.dataclass
class TraceScore:
    """Running aggregate of one trace's step scores."""

    aggregate: str = "mean"
    ema_alpha: float = 0.3
    n: int = 0
    total: float = 0.0
    last: float = math.nan
    low: float = math.inf
    ema: float = math.nan

    def add(self, score: float) -> None:
        self.n += 1
        self.total += score
        self.last = score
        self.low = min(self.low, score)
        self.ema = score if self.n == 1 else self.ema_alpha * score + (1 - self.ema_alpha) * self.ema

    @property
    def value(self) -> float | None:
        """The trace's score (``None`` while unscored)."""
        if self.n == 0:
            return None
        if self.aggregate == "mean":
            return self.total / self.n
        if self.aggregate == "last":
            return self.last
        if self.aggregate == "min":
            return self.low
        return self.ema


def aggregate_scores(scores: Iterable[float], aggregate: str = "mean", ema_alpha: float = 0.3) -> float | None:
    """The same aggregate as the scheduler's, over a finished list of step scores."""
    t = TraceScore(aggregate, ema_alpha)
    for s in scores:
        t.add(float(s))
    return t.value


def memory_rank_key(score: float | None, prunable: bool) -> tuple[int, float]:
    """Sort key for running traces so that the memory victim (vLLM pops the last) is the
    lowest-scoring prunable one; unscored or protected traces keep their order in front."""
    if not prunable or score is None:
        return (0, 0.0)
    return (1, -score)


def below_threshold(score: float | None, n_steps: int, threshold: float, warmup_steps: int) -> bool:
    return score is not None and n_steps >= warmup_steps and score < threshold


def top_fraction_losers(members: dict[str, tuple[float | None, int]], keep_fraction: float,
                        keep_step: int) -> list[str] | None:
    """Which live traces of a group to prune, or ``None`` when it is too early to decide.

    ``members`` maps each **running** trace to (score, steps). The decision is taken once
    every running trace has ``keep_step`` steps; the best ``ceil(keep_fraction * count)``
    (at least one) are kept.
    """
    if not members or any(steps < keep_step for _, steps in members.values()):
        return None
    keep = max(1, math.ceil(keep_fraction * len(members)))
    ranked = sorted(members, key=lambda r: -(members[r][0] if members[r][0] is not None else math.inf))
    return ranked[keep:]
