"""The offline deciders of replay: when each policy prunes each trace, decided on a problem's
recorded traces as the live scheduler decides it (see :mod:`stepprobe.inference.replay`), and
whether the vote of the unpruned traces is right."""

from __future__ import annotations

import collections
from typing import Sequence

import numpy as np

from stepprobe.errors import StepprobeError
from stepprobe.options import PruningOptions

from .confidence import window_means
from .policies import (POLICIES, VICTIM_RULES, Live, TraceScore, below_group_best, below_threshold, cap_to_min_live,
                       effective_min_keep, top_fraction_losers)
from .replay_data import Params, Problem


def parse_policy(name: str, default_rule: str = PruningOptions.memory_victim) -> tuple[str, str]:
    """``"memory:group_gap"`` -> ``("memory", "group_gap")``; other names keep ``default_rule``."""
    base, _, rule = name.partition(":")
    if base not in POLICIES or (rule and (base != "memory" or rule not in VICTIM_RULES)):
        raise StepprobeError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}, memory:<rule> with rule one of "
                             f"{', '.join(VICTIM_RULES)}")
    return base, rule or default_rule


def vote_correct(problem: Problem, pruned: Sequence[bool], method: str) -> bool:
    """Whether the vote of the unpruned traces is right: the rule of ``voting.vote`` (its
    weights, ties to the class seen first in trace order) on the problem's precomputed answer classes."""
    from stepprobe.voting import weights

    voters = [(t, c) for t, c, p in zip(problem.traces, problem.classes, pruned) if not p and c >= 0]
    if not voters:
        return False
    w = weights([None if method == "majority" else (t.score if method == "score" else t.confidence)
                 for t, _ in voters], method)
    tally: dict[int, float] = {}
    order: list[int] = []
    for (t, c), wk in zip(voters, w):
        if c not in tally:
            tally[c] = 0.0
            order.append(c)
        tally[c] += wk
    best = max(range(len(order)), key=lambda k: (tally[order[k]], -k))
    winner = order[best]
    return next(t.correct for t, c in voters if c == winner)


# ---------------------------------------------------------------------------------- policies
def decide_threshold(problem: Problem, p: Params) -> list[int | None]:
    """Tokens generated when each trace is pruned (``None``: not pruned)."""
    out: list[int | None] = []
    for t in problem.traces:
        ts = TraceScore(p.aggregate, p.ema_alpha)
        cut = None
        for g, s in zip(t.step_gen, t.step_scores):
            ts.add(s)
            if below_threshold(ts.value, ts.n, p.threshold, p.warmup_steps):
                if g + 2 < t.num_tokens:  # flagged after step g+1, finished before step g+2
                    cut = g + 2
                break
        out.append(cut)
    return out


def decide_top_fraction(problem: Problem, p: Params) -> list[int | None]:
    traces = problem.traces
    arrivals: dict[int, list[tuple[int, float]]] = collections.defaultdict(list)
    finish: dict[int, list[int]] = collections.defaultdict(list)
    for k, t in enumerate(traces):
        for g, s in zip(t.step_gen, t.step_scores):
            arrivals[g + 1].append((k, s))
        finish[t.num_tokens - 1].append(k)
    scores = [TraceScore(p.aggregate, p.ema_alpha) for _ in traces]
    done = [False] * len(traces)
    for step in sorted(set(arrivals) | set(finish)):
        for k, s in arrivals.get(step, []):
            if not done[k]:
                scores[k].add(s)
        for k in finish.get(step, []):
            done[k] = True
        members = {k: (scores[k].value, scores[k].n) for k in range(len(traces)) if not done[k]}
        if not members:
            break
        losers = top_fraction_losers(members, p.keep_fraction, p.keep_step)
        if losers is not None:
            out: list[int | None] = [None] * len(traces)
            for k in losers:
                out[k] = step + 1
            return out
    return [None] * len(traces)


def confidence_threshold(problem: Problem, p: Params) -> float | None:
    warm = [t.confidence for t in problem.traces[: p.conf_warmup] if t.confidence is not None]
    return float(np.percentile(warm, p.conf_percentile)) if warm else None


def decide_confidence(problem: Problem, p: Params) -> list[int | None]:
    thr = confidence_threshold(problem, p)
    out: list[int | None] = []
    for k, t in enumerate(problem.traces):
        cut = None
        c = t.stop_confidence
        if k >= p.conf_warmup and thr is not None and c and len(c) >= p.conf_window:
            means = window_means(c, p.conf_window)  # entry j: the window ending at token w-1+j
            hit = np.nonzero(means < thr)[0]
            if len(hit):
                s = int(hit[0]) + p.conf_window - 1  # flagged after step s
                if s + 1 < t.num_tokens:
                    cut = s + 1
        out.append(cut)
    return out


def decide_relative(problem: Problem, p: Params) -> list[int | None]:
    """The within-problem relative threshold, step by step as the scheduler decides it: after
    each engine step, every live trace more than ``relative_margin`` below the best other live
    trace of the problem is flagged; the flagged are cut, lowest first, while the problem keeps
    ``min_live`` live traces (refused ones stay live and may be flagged again)."""
    traces = problem.traces
    arrivals: dict[int, list[tuple[int, float]]] = collections.defaultdict(list)
    for k, t in enumerate(traces):
        for g, s in zip(t.step_gen, t.step_scores):
            arrivals[g + 1].append((k, s))
    scores = [TraceScore(p.aggregate, p.ema_alpha) for _ in traces]
    out: list[int | None] = [None] * len(traces)
    keep = effective_min_keep("relative", p.min_live, False)
    for step in sorted(arrivals):
        for k, s in arrivals[step]:
            if out[k] is None and step <= traces[k].num_tokens:
                scores[k].add(s)
        live = [k for k in range(len(traces)) if out[k] is None and traces[k].num_tokens > step]
        flagged = [k for k in live if below_group_best(scores[k].value, scores[k].n,
                                                       (scores[q].value for q in live if q != k),
                                                       p.relative_margin, p.warmup_steps)]
        if not flagged:
            continue
        view = [Live(str(k), "g", scores[k].value, True, keep) for k in live]
        for r in cap_to_min_live([str(k) for k in flagged], view):
            k = int(r)
            if step + 1 < traces[k].num_tokens:
                out[k] = step + 1
    return out


def apply_min_live(problem: Problem, cuts: list[int | None], min_live: int) -> list[int | None]:
    """Drop the cuts that would leave the problem with fewer than ``min_live`` live traces, in
    time order (simultaneous cuts: lowest-scored first), as the scheduler's cap does."""
    if min_live <= 0:
        return cuts
    traces = problem.traces
    out: list[int | None] = [None] * len(traces)
    for c in sorted({c for c in cuts if c is not None}):
        live = [k for k in range(len(traces)) if out[k] is None and traces[k].num_tokens > c]
        at = [str(k) for k in range(len(traces)) if cuts[k] == c]
        view = [Live(str(k), "g", traces[k].score, True, min_live) for k in live]
        for r in cap_to_min_live(at, view):
            out[int(r)] = c
    return out


DECIDERS = {"threshold": decide_threshold, "top_fraction": decide_top_fraction, "confidence": decide_confidence,
            "relative": decide_relative}

