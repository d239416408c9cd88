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
from typing import Iterable, Sequence

#: The pruning policies a request may name (``none`` is plain self-consistency).
POLICIES = ("none", "memory", "threshold", "top_fraction", "confidence", "relative")
#: How a trace's step scores become its score (:class:`TraceScore`).
AGGREGATES = ("mean", "last", "min", "ema")
#: The threshold policy's cut when neither the settings nor the scorer give one.
DEFAULT_THRESHOLD = 0.5


@dataclasses.dataclass
class TraceScore:
    """Running aggregate of one trace's step scores (``aggregate`` one of :data:`AGGREGATES`;
    the defaults are the option group's, :class:`stepprobe.options.PruningOptions`)."""

    aggregate: str
    ema_alpha: float
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


def aggregate_scores(scores: Iterable[float], aggregate: str, ema_alpha: float) -> float | None:
    """The same aggregate as the scheduler's, over a finished list of step scores."""
    t = TraceScore(aggregate, ema_alpha)
    for s in scores:
        t.add(float(s))
    return t.value


def below_cutoff(score: float | None, cutoff: float | None) -> bool:
    """Risk-controlled memory pruning: a trace may be pruned only while it is scored below the
    cutoff its scorer's calibration earned (``stepprobe calibrate``); ``None`` is no cutoff (the
    paper's rule: any scored trace may go), ``0`` prunes nothing."""
    return score is not None and (cutoff is None or score < cutoff)


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


# ------------------------------------------------------------------ within-problem rules
#
# A vote needs the good traces of *each* problem; which problem is hard does not matter. The
# paper's memory rule (``score``) compares raw scores across every running trace, so a hard
# problem, whose traces all score low, gives up its traces first. The group rules compare a
# trace only with the other live traces of its own problem (group). Every rule below is a
# pure function of the live traces, called by the scheduler and by an offline replay alike.

#: Memory victim rules: ``score`` (the paper's: the lowest score of all), ``group_gap``
#: (the trace furthest below the best other live trace of its own problem: the problem most
#: sure which trace to drop gives one up), ``group_largest`` (the lowest trace of the problem
#: with the most live traces: keeps the problems' vote sizes even; ties by the gap).
VICTIM_RULES = ("score", "group_gap", "group_largest")


@dataclasses.dataclass(frozen=True)
class Live:
    """One live (not finished) trace as the group rules see it.

    ``score`` is ``None`` while unscored; ``prunable`` says whether the rule being applied may
    prune it (its policy, e.g. ``memory``); ``min_keep`` is how many live traces its group
    keeps whatever happens (``min_live``, and 1 for the memory policy with ``protect_last``).
    Unscored and unprunable traces still count as live for their group.
    """

    rid: str
    group: str
    score: float | None
    prunable: bool = True
    min_keep: int = 0


def effective_min_keep(policy: str, min_live: int, protect_last: bool) -> int:
    """Live traces per group that ``policy`` never goes below."""
    return max(int(min_live), 1 if protect_last and policy == "memory" else 0)


def _by_group(live: Sequence[Live]) -> dict[str, list[Live]]:
    out: dict[str, list[Live]] = {}
    for t in live:
        out.setdefault(t.group, []).append(t)
    return out


def group_gaps(live: Sequence[Live]) -> dict[str, float | None]:
    """Each scored trace's score minus the best score of the *other* scored live traces of its
    group (``None`` when there is no other scored trace to compare with)."""
    out: dict[str, float | None] = {}
    for members in _by_group(live).values():
        scored = sorted((t for t in members if t.score is not None), key=lambda t: -t.score)
        for t in members:
            if t.score is None or len(scored) < 2:
                out[t.rid] = None
            else:
                best_other = scored[1].score if scored[0].rid == t.rid else scored[0].score
                out[t.rid] = t.score - best_other
    return out


def allowed_losers(live: Sequence[Live]) -> dict[str, int]:
    """For each group, its scored prunable traces that may go while the group keeps its
    ``min_keep`` live traces, lowest first: ``{rid: k}`` with ``k`` = 0 for the lowest."""
    out: dict[str, int] = {}
    for members in _by_group(live).values():
        keep = max(t.min_keep for t in members)
        room = len(members) - keep
        cands = sorted((t for t in members if t.prunable and t.score is not None), key=lambda t: t.score)
        for k, t in enumerate(cands[:max(room, 0)]):
            out[t.rid] = k
    return out


def memory_victim_keys(live: Sequence[Live], rule: str) -> dict[str, tuple]:
    """Sort key of every live trace such that, sorted ascending, the memory victims come last
    in the order ``rule`` would take them one by one (vLLM preempts the last running request).

    Traces that may not go (unscored, another policy, their group at its ``min_keep``, no
    other scored trace to compare with, or the best of its problem, under ``group_gap``) get ``(0, 0, 0)``, so a stable
    sort leaves them in vLLM's order in front. Each group offers only its lowest traces down
    to its ``min_keep``, so taking victims from the end never breaks that minimum; under
    ``group_largest`` the k-th lowest trace of a group of n live traces ranks by n - k, which
    is exactly "take from the largest group, then recount".
    """
    if rule not in VICTIM_RULES:
        raise ValueError(f"unknown memory victim rule {rule!r}; known: {', '.join(VICTIM_RULES)}")
    allowed = allowed_losers(live)
    sizes = {g: len(m) for g, m in _by_group(live).items()}
    gaps = group_gaps(live) if rule != "score" else {}
    keys: dict[str, tuple] = {}
    for t in live:
        k = allowed.get(t.rid)
        if k is None:
            keys[t.rid] = (0, 0.0, 0.0)
        elif rule == "score":
            keys[t.rid] = (1, -t.score, 0.0)
        elif rule == "group_gap":
            gap = gaps[t.rid]  # the best of its problem (gap > 0) is never this rule's victim
            keys[t.rid] = (0, 0.0, 0.0) if gap is None or gap > 0 else (1, -gap, -t.score)
        else:  # group_largest
            gap = gaps[t.rid]
            keys[t.rid] = (1, float(sizes[t.group] - k), -(gap if gap is not None else t.score))
    return keys


def memory_victim(live: Sequence[Live], rule: str) -> str | None:
    """The one trace ``rule`` prunes next under memory pressure, or ``None`` (then vLLM preempts)."""
    keys = memory_victim_keys(live, rule)
    cands = [t.rid for t in live if keys[t.rid][0] == 1]
    return max(cands, key=lambda r: keys[r]) if cands else None


def below_group_best(score: float | None, n_steps: int, others: Iterable[float | None], margin: float,
                     warmup_steps: int) -> bool:
    """The within-problem relative threshold: prune a trace whose score is more than ``margin``
    below the best score among the other live traces of its problem, once it has
    ``warmup_steps`` steps. Without another scored trace there is nothing to compare with."""
    best = max((s for s in others if s is not None), default=None)
    return score is not None and best is not None and n_steps >= warmup_steps and score < best - margin


def relative_losers(members: dict[str, tuple[float | None, int]], margin: float, warmup_steps: int) -> list[str]:
    """Live traces of one group (``rid -> (score, steps)``) that the relative threshold prunes
    (before the group minimum is applied, see :func:`cap_to_min_live`)."""
    return [r for r, (s, n) in members.items()
            if below_group_best(s, n, (v[0] for q, v in members.items() if q != r), margin, warmup_steps)]


def cap_to_min_live(flagged: Iterable[str], live: Sequence[Live]) -> list[str]:
    """Which of the ``flagged`` traces may be pruned now so that every group keeps its
    ``min_keep`` live traces: per group the lowest-scored flagged ones first (unscored last).
    The rest stay live (a rule may flag them again later)."""
    flagged = set(flagged)
    out: list[str] = []
    for members in _by_group(live).values():
        cands = [t for t in members if t.rid in flagged]
        if not cands:
            continue
        keep = max(t.min_keep for t in members)
        room = max(0, len(members) - keep)
        cands.sort(key=lambda t: (t.score is None, t.score if t.score is not None else 0.0))
        out += [t.rid for t in cands[:room]]
    return out
