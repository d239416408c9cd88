"""Replay every pruning policy offline on the traces of one self-consistency run.

Example::

    stepprobe run --scorer runs/x/scorer --problems heldout.jsonl --policy none --record-confidence \\
        --output runs/x/sc
    stepprobe replay --results runs/x/sc --kv-blocks 0,16,32,64 --output runs/x/replay

A ``run`` with policy ``none`` (and ``--record-confidence``) keeps, for every trace, its step
scores at their token positions, its per-token confidences, its answer and whether it is
right. ``replay`` decides, on those same traces, what each policy would have pruned and
when, so every policy is compared on identical samples (paired), and hundreds of problems
cost seconds instead of hours:

- ``threshold``, ``top_fraction``, ``confidence``: decided exactly as the live scheduler
  decides (the same functions of :mod:`stepprobe.inference.policies` and the same
  step-by-step order), with one assumption: a problem's traces advance in lockstep (one token
  per engine step each, from the same start), which holds unless the KV cache is full. A
  score for the boundary token at generated index ``g`` arrives after engine step ``g + 1``;
  a trace flagged after step ``s`` has generated ``s + 1`` tokens when it is finished.
- ``memory``: a model of vLLM's scheduler on a KV cache of ``kv_blocks`` blocks of
  ``block_size`` tokens: FCFS admission (not while a preemption happened in the step),
  chunked prefill within ``max_num_batched_tokens``, the prompt's full blocks shared by a
  problem's traces (prefix caching), and vLLM's victim rule (the **last** running request is
  preempted; the memory policy first sorts running traces so that the last is the
  lowest-scoring prunable one, and finishes it instead). A preempted trace frees its blocks
  and recomputes its prompt and generated tokens when readmitted.
- time: engine steps and computed tokens of that same model, as
  ``steps * step_cost_tokens + computed tokens`` (token units; a ratio to self-consistency
  at the same budget is what is reported). Every policy, SC included, goes through the
  scheduler model at every budget, with its pruning points.

Beside each pruning policy: ``random`` prunes the same number of traces per problem at the
same points (which traces: uniformly at random; mean over ``random_draws`` draws) and
``oracle`` prunes wrong traces first (by the true labels). Every accuracy difference to SC
carries a paired bootstrap 95% interval over problems (:mod:`stepprobe.stats`).

Votes: pruned traces do not vote; a trace without an answer does not vote; answers are
merged into classes of equivalent answers once per problem (math-verify, as
:func:`~stepprobe.inference.voting.merge_answers` does); **ties go to the answer class seen
first in trace-index order**, the rule of :func:`~stepprobe.inference.voting.vote`.

Writes ``replay.json`` (``stepprobe-replay``), ``replay.md`` (bench's table with intervals
and the baselines) and ``replay.png`` (accuracy vs. output tokens and vs. model time, one
line per policy across KV budgets).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stepprobe import locks
from stepprobe.config import OptionGroup, StageConfig, option
from stepprobe.data_collection.grading import grading_of
from stepprobe.errors import ArtifactMismatch, StepprobeError
from stepprobe.io import atomic_write_json, atomic_write_text
from stepprobe.provenance import check_schema, package_versions
from stepprobe.stats import paired_bootstrap

from .policies import (VICTIM_RULES, Live, TraceScore, below_cutoff, below_group_best, below_threshold,
                       cap_to_min_live, effective_min_keep, memory_victim_keys, top_fraction_losers)

log = logging.getLogger(__name__)

KIND = "stepprobe-replay"
SCHEMA_VERSION = 2  # 2: a row per (policy, vote), SC same tokens, admission-sized SC, memory+risk
POLICIES = ("none", "memory", "threshold", "top_fraction", "confidence", "relative")


def parse_policy(name: str, default_rule: str = "score") -> tuple[str, str]:
    """``"memory:group_gap"`` -> ``("memory", "group_gap")``; other names keep ``default_rule``."""
    base, _, rule = name.partition(":")
    if base not in POLICIES or (rule and (base != "memory" or rule not in VICTIM_RULES)):
        raise StepprobeError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}, memory:<rule> with rule one of "
                             f"{', '.join(VICTIM_RULES)}")
    return base, rule or default_rule
DEFAULT_VOTE = {"none": "majority", "confidence": "confidence"}


@dataclasses.dataclass
class SchedulerModel(OptionGroup):
    """The model of vLLM's scheduler that replay and calibrate run every policy through."""

    block_size: int = option(128, "KV block size in tokens (vLLM's CPU backend: 128)")
    max_num_batched_tokens: int = option(4096, "tokens per engine step (vLLM's CPU default for LLM)")
    max_num_seqs: int = option(256, "running requests at most (vLLM's CPU default for LLM)")
    step_cost_tokens: float = option(64.0, "time model: one engine step costs as much as this many computed tokens")
    protect_last: bool = option(True, "memory: never prune a problem's last live trace (as the scheduler)")
    memory_victim: str = option("score", "memory victim rule for 'memory' (memory:<rule> names one): "
                                         + ", ".join(VICTIM_RULES))
    min_live: int = option(0, "every policy keeps at least this many live traces per problem (as the scheduler)")

    def check(self) -> None:
        if self.memory_victim not in VICTIM_RULES:
            raise StepprobeError(f"unknown memory victim rule {self.memory_victim!r}; known: {', '.join(VICTIM_RULES)}")
        if self.block_size < 1 or self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise StepprobeError("block_size, max_num_batched_tokens and max_num_seqs must be positive")


@dataclasses.dataclass
class Config(StageConfig, SchedulerModel):
    SECTION = "replay"

    results: str | None = option(None, "a run's output directory or results.jsonl (policy none, --record-confidence)")
    policies: list[str] = option(factory=lambda: ["none", "memory", "threshold", "top_fraction", "confidence"],
                                 help="policies to replay; 'none' is SC; also relative, memory:<victim rule>")
    kv_blocks: list[int] = option(factory=lambda: [0, 16, 32, 64], help="KV budgets in blocks (0 = unlimited)")
    votes: list[str] = option(factory=lambda: ["majority", "score"],
                              help="votes of the pruning policies, a row each (the confidence baseline: its own and "
                                   "majority), so the effect of pruning shows apart from the vote's")
    trust: str | None = option("auto", "a scorer's trust.json (stepprobe calibrate) for the risk-controlled rows; auto: "
                                       "the run's scorer's, if it has one; none: no such rows")
    admission: bool = option(True, "add SC with max_num_seqs sized so that it never preempts (what a careful user "
                                   "configures instead of pruning)")
    threshold: float | None = option(None, "threshold policy (default: the run's, else the scorer's)")
    warmup_steps: int | None = option(None, "threshold warm-up steps (default: the run's)")
    keep_fraction: float | None = option(None, "top_fraction keep fraction (default: the run's)")
    keep_step: int | None = option(None, "top_fraction ranking step (default: the run's)")
    aggregate: str | None = option(None, "trace score aggregate (default: the run's)")
    relative_margin: float | None = option(None, "relative policy: margin below the group's best (default: the run's, else 0.1)")
    random_draws: int = option(200, "draws for the random-pruning baseline")
    seed: int = option(0, "seed of the random baseline and the bootstrap")
    limit: int | None = option(None, "only the first N problems")
    live_bench: str | None = option(None, "a bench output directory: also replay its SC traces at its KV budgets "
                                          "and compare with what its live policies did (replay vs. live)")
    output: str | None = option(None, "output directory (default: <results dir>/replay)")

    def check(self) -> None:
        for p in self.policies:
            parse_policy(p)
        bad = [v for v in self.votes if v not in ("majority", "score", "confidence")]
        if bad or not self.votes:
            raise StepprobeError(f"replay: votes must be majority, score or confidence, got {self.votes}")
        if "none" not in self.policies:
            self.policies = ["none", *self.policies]


# ---------------------------------------------------------------------------------- data
@dataclasses.dataclass
class Trace:
    index: int
    num_tokens: int
    answer: str | None
    correct: bool
    step_gen: list[int]  # generated index of each scored boundary token
    step_scores: list[float]
    score: float | None = None  # aggregate of all step scores
    confidence: float | None = None  # trace confidence (lowest window mean), for the confidence vote
    token_confidence: list[float] | None = None
    stop_confidence: list[float] | None = None


@dataclasses.dataclass
class Problem:
    problem_id: str
    prompt_tokens: int
    traces: list[Trace]
    classes: list[int]  # answer class per trace (-1: no answer)


@dataclasses.dataclass
class Params:
    threshold: float
    warmup_steps: int
    keep_fraction: float
    keep_step: int
    aggregate: str
    ema_alpha: float
    conf_window: int
    conf_percentile: float
    conf_warmup: int
    relative_margin: float = 0.1
    min_live: int = 0


def load_run(path: str | Path, limit: int | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The header and problem records of a run's results.jsonl (schema checked)."""
    from .run import RESULTS_KIND, RESULTS_SCHEMA_VERSION

    p = Path(path)
    if p.is_dir():
        p = p / "results.jsonl"
    if not p.is_file():
        raise StepprobeError(f"no run results at {p}")
    with open(p, encoding="utf-8") as fh:
        lines = [ln for ln in fh if ln.strip()]
    if not lines:
        raise ArtifactMismatch(f"{p} is empty")
    header = json.loads(lines[0])
    check_schema(header, RESULTS_KIND, RESULTS_SCHEMA_VERSION, str(p))
    records = []
    for ln in lines[1:]:
        try:
            records.append(json.loads(ln))
        except json.JSONDecodeError:
            break  # a torn last line of a killed run
    if header.get("config", {}).get("policy") != "none" or any(r.get("pruned") for r in records):
        raise ArtifactMismatch(f"{p} is not a self-consistency run (policy none, nothing pruned); replay needs "
                               "every trace in full")
    return header, records[:limit] if limit else records


def build_problems(records: list[dict[str, Any]]) -> list[Problem]:
    from .voting import merge_answers

    out = []
    for r in records:
        plen = int(r.get("prompt_tokens") or 0)
        traces = []
        for t in sorted(r["traces"], key=lambda t: t["index"]):
            pos = [int(p) for p in t.get("step_positions", [])]
            traces.append(Trace(
                index=int(t["index"]), num_tokens=int(t["num_tokens"]), answer=t.get("answer"),
                correct=bool(t.get("correct")), step_gen=pos,  # generated-token positions (results schema 4)
                step_scores=[float(s) for s in t.get("step_scores", [])], score=t.get("score"),
                confidence=t.get("confidence"), token_confidence=t.get("token_confidence"),
                stop_confidence=t.get("stop_confidence")))
        answered = [k for k, t in enumerate(traces) if t.answer is not None]
        classes = [-1] * len(traces)
        for c, members in enumerate(merge_answers([traces[k].answer for k in answered])):  # type: ignore[misc]
            for m in members:
                classes[answered[m]] = c
        out.append(Problem(r["problem_id"], plen, traces, classes))
    return out


# ---------------------------------------------------------------------------------- votes
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
            cs = np.concatenate([[0.0], np.cumsum(np.asarray(c, dtype=np.float64))])
            means = (cs[p.conf_window:] - cs[:-p.conf_window]) / p.conf_window  # window ending at token w-1+j
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


# ---------------------------------------------------------------------------------- scheduler model
@dataclasses.dataclass
class _Req:
    prob: int
    k: int
    plen: int
    target: int  # tokens it will generate (finish, or its pruning point)
    step_pos: list[int]
    step_scores: list[float]
    score: TraceScore
    gen: int = 0
    computed: int = 0
    own_blocks: int = 0
    shares: bool = False
    n_scored: int = 0
    preemptions: int = 0
    done: bool = False
    pruned_by_memory: bool = False


@dataclasses.dataclass
class SimResult:
    tokens: list[list[int]]  # generated tokens per problem and trace
    memory_pruned: list[list[bool]]
    preemptions: list[list[int]]
    steps: int
    computed_tokens: int


def simulate(problems: list[Problem], targets: list[list[int]], *, kv_blocks: int, block_size: int,
             max_num_batched_tokens: int, max_num_seqs: int, memory: bool, params: Params,
             protect_last: bool = True, phases: list[list[tuple[int, int]]] | None = None,
             memory_rule: str = "score", follow: dict[int, list[tuple[int, int]]] | None = None,
             cutoff: float | None | Sequence[float | None] = None) -> SimResult:
    """vLLM's scheduler on the traces (see module docstring). ``targets[i][k]``: tokens trace k
    of problem i generates; ``phases``: groups of (problem, trace) submitted one after another,
    default one phase with everything; ``follow[i]``: traces of problem i submitted as soon as
    its traces submitted so far have all finished (the confidence baseline's second phase,
    queued per problem when its warm-up ends, as the live runner does); ``cutoff``: the memory
    policy may prune only traces scored below it (risk-controlled pruning; ``None``: any; a list:
    one per problem)."""
    bs = block_size
    cuts = list(cutoff) if isinstance(cutoff, (list, tuple)) else [cutoff] * len(problems)
    free = math.inf if not kv_blocks else int(kv_blocks)
    shared_blocks = [pr.prompt_tokens // bs for pr in problems]
    shared_refs = [0] * len(problems)
    live_in_group = [0] * len(problems)
    reqs = {(i, k): _Req(i, k, pr.prompt_tokens, targets[i][k], [pr.prompt_tokens + g for g in t.step_gen],
                         t.step_scores, TraceScore(params.aggregate, params.ema_alpha))
            for i, pr in enumerate(problems) for k, t in enumerate(pr.traces)}
    phases = phases or [[(i, k) for i, pr in enumerate(problems) for k in range(len(pr.traces))]]
    steps = computed_total = 0

    def blocks_of(r: _Req, total: int) -> int:
        return max(0, math.ceil(total / bs) - (shared_blocks[r.prob] if r.shares else 0))

    def release(r: _Req) -> None:
        nonlocal free
        free += r.own_blocks
        r.own_blocks = 0
        if r.shares:
            r.shares = False
            shared_refs[r.prob] -= 1
            if shared_refs[r.prob] == 0:
                free += shared_blocks[r.prob]

    keep = effective_min_keep("memory", params.min_live, protect_last)
    allowed: set[tuple[int, int]] = set()

    def prunable(r: _Req) -> bool:
        if r.done or r.score.value is None or (r.prob, r.k) not in allowed:
            return False
        return live_in_group[r.prob] - 1 >= keep

    members: dict[int, list[_Req]] = collections.defaultdict(list)  # each problem's submitted traces

    def may_preempt(running: list[_Req]) -> bool:
        """The scheduler's bound (``PruningMixin._sp_may_preempt``): with this many free blocks no
        running request can run out this step, so it neither sorts nor prunes."""
        return free < 2 * len(running) + -(-(max_num_batched_tokens + len(running)) // bs)

    dirty = True  # a score, an admission or a finish since the last sort (else its order still holds)

    def victim_order(running: list[_Req], waiting: Any) -> None:
        """The scheduler's sort: the memory victim rule over each problem's live traces."""
        nonlocal dirty
        if not dirty:
            return
        dirty = False
        ids = {id(r) for r in running}
        rest = [r for p in dict.fromkeys(r.prob for r in running) for r in members[p]
                if not r.done and id(r) not in ids]
        view = [Live(f"{r.prob}/{r.k}", str(r.prob), r.score.value, below_cutoff(r.score.value, cuts[r.prob]), keep)
                for r in (*running, *rest)]
        keys = memory_victim_keys(view, memory_rule)
        allowed.clear()
        allowed.update((r.prob, r.k) for r in running if keys[f"{r.prob}/{r.k}"][0] == 1)
        running.sort(key=lambda r: keys[f"{r.prob}/{r.k}"])

    for phase in phases:
        waiting = collections.deque(reqs[key] for key in phase)
        for r in waiting:
            live_in_group[r.prob] += 1
            members[r.prob].append(r)
        running: list[_Req] = []
        while waiting or running:
            if memory and running and may_preempt(running):
                victim_order(running, waiting)
            else:
                allowed.clear()
                dirty = True
            budget = max_num_batched_tokens
            scheduled: list[tuple[_Req, int]] = []
            preempted = False
            i = 0
            while i < len(running) and budget > 0:
                r = running[i]
                n_new = min(r.plen + r.gen - r.computed, budget)
                need = blocks_of(r, r.computed + n_new) - r.own_blocks
                while need > free:
                    victim = running.pop()
                    preempted = True
                    release(victim)
                    if memory and prunable(victim):
                        victim.done = victim.pruned_by_memory = True
                        dirty = True
                        live_in_group[victim.prob] -= 1
                    else:
                        victim.computed = 0
                        dirty = True
                        victim.preemptions += 1
                        waiting.appendleft(victim)
                    if victim is r:
                        break
                if i >= len(running) or running[i] is not r:
                    break  # r itself was the victim
                free -= need
                r.own_blocks += need
                scheduled.append((r, n_new))
                budget -= n_new
                i += 1
            if not preempted:
                while waiting and budget > 0 and len(running) < max_num_seqs:
                    r = waiting[0]
                    sb = shared_blocks[r.prob]
                    hit = sb > 0 and shared_refs[r.prob] > 0  # the prompt's full blocks are cached
                    start = min(sb * bs, r.plen + r.gen - 1) if hit else 0
                    n_new = min(r.plen + r.gen - start, budget)
                    own = max(0, math.ceil((start + n_new) / bs) - sb)
                    cost = own + (0 if hit else sb)
                    if cost > free:
                        break
                    waiting.popleft()
                    free -= cost
                    r.own_blocks = own
                    if sb:
                        r.shares = True
                        shared_refs[r.prob] += 1
                    r.computed = start
                    running.append(r)
                    dirty = True
                    scheduled.append((r, n_new))
                    budget -= n_new
            if not scheduled:
                if running or waiting:
                    raise StepprobeError(f"replay: a KV budget of {kv_blocks} blocks cannot hold one trace")
                break
            steps += 1
            for r, n_new in scheduled:
                r.computed += n_new
                computed_total += n_new
                while r.n_scored < len(r.step_pos) and r.step_pos[r.n_scored] < r.computed:
                    r.score.add(r.step_scores[r.n_scored])
                    dirty = True
                    r.n_scored += 1
                if r.computed == r.plen + r.gen:
                    r.gen += 1
                    if r.gen >= r.target:
                        r.done = True
                        dirty = True
                        live_in_group[r.prob] -= 1
                        release(r)
                        if follow and live_in_group[r.prob] == 0 and follow.get(r.prob):
                            for key in follow.pop(r.prob):  # queued behind what is waiting, as enqueue does
                                waiting.append(reqs[key])
                                members[r.prob].append(reqs[key])
                                live_in_group[r.prob] += 1
            running = [r for r in running if not r.done]
    tokens = [[reqs[(i, k)].gen for k in range(len(pr.traces))] for i, pr in enumerate(problems)]
    mem = [[reqs[(i, k)].pruned_by_memory for k in range(len(pr.traces))] for i, pr in enumerate(problems)]
    pre = [[reqs[(i, k)].preemptions for k in range(len(pr.traces))] for i, pr in enumerate(problems)]
    return SimResult(tokens, mem, pre, steps, computed_total)


# ---------------------------------------------------------------------------------- replay
@dataclasses.dataclass
class Outcome:
    """One policy at one budget: per problem, which traces were pruned and at how many tokens."""

    policy: str
    kv_blocks: int
    vote: str
    pruned: list[list[bool]]
    tokens: list[list[int]]
    preemptions: int
    steps: int
    computed_tokens: int
    correct: list[bool]
    votes: list[str] = dataclasses.field(default_factory=list)


def run_policy(problems: list[Problem], policy: str, kv_blocks: int, config: Any, params: Params, *,
               cutoff: Any = None, vote: str | Sequence[str] | None = None, max_num_seqs: int | None = None,
               subset: list[int] | None = None) -> Outcome:
    """One policy at one budget. ``cutoff``: memory pruning only below it (one, or one per problem);
    ``vote``: instead of the policy's own (one, or one per problem); ``max_num_seqs``: instead of the config's; ``subset[i]``: only the first
    ``subset[i]`` traces of problem i are sampled (self-consistency with fewer traces)."""
    full = [[t.num_tokens for t in pr.traces] for pr in problems]
    name = policy
    policy, rule = parse_policy(policy, config.memory_victim)
    if policy in DECIDERS:
        cuts = [DECIDERS[policy](pr, params) for pr in problems]
        if policy != "relative":
            cuts = [apply_min_live(pr, c, params.min_live) for pr, c in zip(problems, cuts)]
        targets = [[c if c is not None else n for c, n in zip(cs, ns)] for cs, ns in zip(cuts, full)]
    else:
        cuts = [[None] * len(pr.traces) for pr in problems]
        targets = full
    phases = follow = None
    if subset is not None:
        phases = [[(i, k) for i, pr in enumerate(problems) for k in range(min(subset[i], len(pr.traces)))]]
    if policy == "confidence":  # warm-up traces first; a problem's rest once its warm-up finished
        w = params.conf_warmup
        phases = [[(i, k) for i, pr in enumerate(problems) for k in range(min(w, len(pr.traces)))]]
        follow = {i: [(i, k) for k in range(w, len(pr.traces))] for i, pr in enumerate(problems)
                  if len(pr.traces) > w}
    sim = simulate(problems, targets, kv_blocks=kv_blocks, block_size=config.block_size,
                   max_num_batched_tokens=config.max_num_batched_tokens,
                   max_num_seqs=max_num_seqs or config.max_num_seqs, memory=policy == "memory", params=params,
                   protect_last=config.protect_last, phases=phases, memory_rule=rule, follow=follow, cutoff=cutoff)
    pruned = [[(c is not None) or m for c, m in zip(cs, ms)] for cs, ms in zip(cuts, sim.memory_pruned)]
    if subset is not None:  # traces never sampled do not vote
        pruned = [[p or k >= subset[i] for k, p in enumerate(pm)] for i, pm in enumerate(pruned)]
    votes = list(vote) if isinstance(vote, (list, tuple)) else [vote or DEFAULT_VOTE.get(policy, "majority")] * len(problems)
    correct = [vote_correct(pr, pm, v) for pr, pm, v in zip(problems, pruned, votes)]
    label = votes[0] if len(set(votes)) <= 1 else "per fold"
    return Outcome(name, kv_blocks, label, pruned, sim.tokens, sum(map(sum, sim.preemptions)), sim.steps,
                   sim.computed_tokens, correct, votes)


def baselines(problems: list[Problem], outcome: Outcome, draws: int, seed: int) -> dict[str, list[float]]:
    """Random and oracle pruning of the same number of traces per problem at the same points."""
    rng = np.random.default_rng(seed)
    rand, oracle = [], []
    for pr, pm, toks, vote in zip(problems, outcome.pruned, outcome.tokens, outcome.votes):
        n = len(pr.traces)
        points = [toks[k] for k in range(n) if pm[k]]
        if not points:
            c = vote_correct(pr, [False] * n, vote)
            rand.append(float(c))
            oracle.append(float(c))
            continue
        hits = 0
        for _ in range(draws):
            who = rng.permutation(n)[: len(points)]
            mask = [False] * n
            for k, cut in zip(who, points):
                mask[k] = cut < pr.traces[k].num_tokens  # a trace shorter than the point finished on its own
            hits += vote_correct(pr, mask, vote)
        rand.append(hits / draws)
        order = sorted(range(n), key=lambda k: (pr.traces[k].correct, k))  # wrong traces first
        mask = [False] * n
        for k, cut in zip(order[: len(points)], sorted(points)):
            mask[k] = cut < pr.traces[k].num_tokens
        oracle.append(float(vote_correct(pr, mask, vote)))
    return {"random": rand, "oracle": oracle}


def fewer_traces(problems: list[Problem], outcome: Outcome) -> list[int]:
    """Self-consistency with fewer traces at the same output tokens: per problem, how many of its
    first traces (sampled in full) come closest to the tokens the policy spent on it (at least one)."""
    out = []
    for pr, toks in zip(problems, outcome.tokens):
        spent = sum(toks)
        cum = np.cumsum([t.num_tokens for t in pr.traces])
        out.append(int(np.argmin(np.abs(cum - spent))) + 1)
    return out


def admission_seqs(problems: list[Problem], kv_blocks: int, config: Any, params: Params) -> tuple[int, Outcome]:
    """The largest ``max_num_seqs`` at which self-consistency never preempts at this budget
    (what a careful user would set instead of pruning), with its outcome."""
    smallest = min(pr.prompt_tokens + 1 for pr in problems)  # no more than this many fit at once anyway
    lo, hi = 1, max(1, min(int(config.max_num_seqs), kv_blocks * config.block_size // smallest + 1))
    best = None
    while lo <= hi:  # preemptions grow with the requests admitted at once
        mid = (lo + hi) // 2
        o = run_policy(problems, "none", kv_blocks, config, params, max_num_seqs=mid)
        if o.preemptions == 0:
            best, lo = (mid, o), mid + 1
        else:
            hi = mid - 1
    if best is None:
        o = run_policy(problems, "none", kv_blocks, config, params, max_num_seqs=1)
        best = (1, o)
    return best


def trust_cutoffs(problems: list[Problem], trust: dict[str, Any]) -> tuple[list[float | None], list[str], str]:
    """Per problem, the cutoff and vote of a trust document that no choice on that problem made:
    a problem of the calibration set gets its fold's cross-fitted choice, any other the shipped one."""
    from .calibrate import _float

    def cut(choice: dict[str, Any]) -> float | None:
        c = choice["cutoff"]
        return 0.0 if c is None else (None if c == "inf" else _float(c))

    fold_of = {pid: f for f in trust["crossfit"]["folds"] for pid in f["problems"]}
    cuts, votes, inside = [], [], 0
    for pr in problems:
        f = fold_of.get(pr.problem_id)
        if f is None:
            cuts.append(cut(trust["default"]))
            votes.append(trust["vote"]["rule"])
        else:
            inside += 1
            cuts.append(cut(f["choice"]))
            votes.append(f["vote"])
    how = ("cross-fitted" if inside == len(problems) else "calibrated elsewhere" if inside == 0
           else f"cross-fitted on {inside}, calibrated elsewhere on {len(problems) - inside}")
    return cuts, votes, how


def params_from(config: Any, header: dict[str, Any]) -> Params:
    """The policies' parameters: the config's where it sets them (replay's options), else the run's."""
    rc = header.get("config", {})

    def pick(name: str, run_key: str | None = None, default: Any = None) -> Any:
        v = getattr(config, name, None)
        return v if v is not None else rc.get(run_key or name, default)

    thr = pick("threshold")
    if thr is None and rc.get("scorer"):
        from stepprobe.probes.checkpoint import read_scorer_meta

        try:
            thr = read_scorer_meta(rc["scorer"]).get("threshold")
        except Exception as e:  # noqa: BLE001 - a moved scorer: say what to pass
            raise StepprobeError(f"replay: cannot read the run's scorer for its threshold ({e}); pass --threshold")
    return Params(
        threshold=float(0.5 if thr is None else thr),
        warmup_steps=int(pick("warmup_steps", default=2)), keep_fraction=float(pick("keep_fraction", default=0.5)),
        keep_step=int(pick("keep_step", default=3)), aggregate=str(pick("aggregate", default="mean")),
        ema_alpha=float(rc.get("ema_alpha", 0.3)),
        conf_window=int(rc.get("confidence_window", 64)), conf_percentile=float(rc.get("confidence_percentile", 10.0)),
        conf_warmup=int(rc.get("confidence_warmup", 4)),
        relative_margin=float(pick("relative_margin", default=0.1)), min_live=int(getattr(config, "min_live", 0)))


def replay(problems: list[Problem], config: Config, params: Params, trust: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every policy at every budget, with each vote asked for: rows of bench's table plus
    intervals and baselines (random and oracle pruning; SC with fewer traces at the same tokens;
    SC admitted so it never preempts; the risk-controlled rule of ``trust``)."""
    from tqdm import tqdm

    rows = []
    risk = trust_cutoffs(problems, trust) if trust else None
    work = [(kv, p, v) for kv in config.kv_blocks for p in config.policies for v in _votes_of(p, config.votes)]
    bar = tqdm(total=len(work) + (len(config.kv_blocks) if risk else 0), desc="replay", unit="row", leave=False)
    for kv in config.kv_blocks:
        sc = run_policy(problems, "none", kv, config, params)
        sc_time = sc.steps * config.step_cost_tokens + sc.computed_tokens
        sc_tokens = sum(map(sum, sc.tokens))
        adm_time = None
        if config.admission and kv and sc.preemptions:
            seqs, adm = admission_seqs(problems, kv, config, params)
            adm_time = adm.steps * config.step_cost_tokens + adm.computed_tokens
        todo = [(p, v, {}) for p in config.policies for v in _votes_of(p, config.votes)]
        if risk and kv:
            todo.append(("memory+risk", risk[1], {"cutoff": risk[0]}))
        done: dict[tuple[str, str], Outcome] = {}
        for policy, vote, extra in todo:
            if policy == "none":
                o = sc
            else:
                base = "memory:" + config.memory_victim if policy == "memory+risk" else policy
                same = next((x for (p, _), x in done.items() if p == policy), None)
                if same is not None and isinstance(vote, str):  # another vote on the same pruning
                    o = dataclasses.replace(same, vote=vote, votes=[vote] * len(problems), correct=[
                        vote_correct(pr, pm, vote) for pr, pm in zip(problems, same.pruned)])
                else:
                    o = run_policy(problems, base, kv, config, params, vote=vote, **extra)
                    o.policy = policy
                done[(policy, str(vote))] = o
            bar.update(1)
            t = o.steps * config.step_cost_tokens + o.computed_tokens
            toks = sum(map(sum, o.tokens))
            row = {"kv_blocks": kv, "policy": policy, "vote": o.vote, "problems": len(problems),
                   "accuracy": float(np.mean(o.correct)), "model_time": t, "time_ratio": t / sc_time,
                   "admission_time_ratio": t / adm_time if adm_time else None,
                   "output_tokens": toks, "token_ratio": toks / sc_tokens if sc_tokens else float("nan"),
                   "preemptions": o.preemptions, "pruned": sum(map(sum, o.pruned)),
                   "traces": sum(len(p.traces) for p in problems), "steps": o.steps,
                   "computed_tokens": o.computed_tokens, "correct": [bool(c) for c in o.correct]}
            if policy == "memory+risk":
                row["rule"] = f"risk <= {trust['crossfit']['tolerance']:g} ({risk[2]})"
            if policy != "none":
                row["vs_sc"] = paired_bootstrap(sc.correct, o.correct, seed=config.seed).to_dict()
                if row["pruned"]:
                    base_rows = baselines(problems, o, config.random_draws, config.seed)
                    k = fewer_traces(problems, o)
                    base_rows["sc_same_tokens"] = [  # the first k traces, sampled in full, majority vote
                        float(vote_correct(pr, [i >= ki for i in range(len(pr.traces))], "majority"))
                        for pr, ki in zip(problems, k)]
                    for name, vals in base_rows.items():
                        row[name] = {"accuracy": float(np.mean(vals)),
                                     "vs_sc": paired_bootstrap(sc.correct, vals, seed=config.seed).to_dict(),
                                     "policy_minus": paired_bootstrap(vals, o.correct, seed=config.seed).to_dict()}
                    row["sc_same_tokens"].update(traces=int(sum(k)), token_ratio=sum(
                        t.num_tokens for pr, ki in zip(problems, k) for t in pr.traces[:ki]) / sc_tokens)
            rows.append(row)
            if policy == "none" and adm_time:
                rows.append({"kv_blocks": kv, "policy": "none+admission", "vote": "majority", "problems": len(problems),
                             "accuracy": row["accuracy"], "model_time": adm_time, "time_ratio": adm_time / sc_time,
                             "admission_time_ratio": 1.0, "max_num_seqs": seqs, "output_tokens": toks,
                             "token_ratio": 1.0, "preemptions": adm.preemptions, "pruned": 0, "traces": row["traces"],
                             "steps": adm.steps, "computed_tokens": adm.computed_tokens, "correct": row["correct"]})
    bar.close()
    return {"rows": rows}


def _votes_of(policy: str, votes: Sequence[str]) -> list[str]:
    """The votes a policy is replayed with: SC majority only; the confidence baseline its own and
    majority; the STEP policies the ones asked for (confidence there means majority)."""
    if policy == "none":
        return ["majority"]
    if policy == "confidence":
        return ["confidence", "majority"] if "majority" in votes else ["confidence"]
    return list(dict.fromkeys(v for v in votes if v != "confidence")) or ["majority"]


def load_bench(path: str | Path) -> dict[str, Any]:
    from .bench import BENCH_KIND, BENCH_SCHEMA_VERSION

    p = Path(path)
    if p.is_dir():
        p = p / "bench.json"
    if not p.is_file():
        raise StepprobeError(f"no bench results at {p}")
    data = json.loads(p.read_text(encoding="utf-8"))
    check_schema(data, BENCH_KIND, BENCH_SCHEMA_VERSION, str(p))
    return data


def live_check(config: Config, bench: dict[str, Any]) -> list[dict[str, Any]]:
    """Replay the bench's own SC traces at each of its KV budgets and put each live policy's
    row beside the replayed one: accuracy, token and preemption counts, and how many traces
    the replay prunes exactly as the live engine did."""
    from .calibrate import resolve_trust

    header = {"config": {**bench["config"], "policy": "none"}}
    params = params_from(config, header)
    bc = bench["config"]
    cutoff = resolve_trust(bc.get("scorer"), bc.get("max_accuracy_loss"), bc.get("risk_delta", 0.1),
                           bc.get("prune_below")).cutoff if "max_accuracy_loss" in bc else None
    out = []
    for kv in bench["config"]["kv_blocks"]:
        sc_records = bench["problems"].get(f"{kv}/none")
        if not sc_records:
            continue
        problems = build_problems(sc_records)
        ids = [pr.problem_id for pr in problems]
        for policy in bench["config"]["policies"]:
            live_rows = [r for r in bench["rows"] if r["kv_blocks"] == kv and r["policy"] == policy]
            admission = policy == "none+admission"  # bench's SC sized not to preempt
            if not live_rows or (policy not in POLICIES and not admission):
                continue
            live = live_rows[0]
            if admission:
                o = run_policy(problems, "none", kv, config, params, max_num_seqs=live.get("max_num_seqs"))
            else:
                o = run_policy(problems, policy, kv, config, params, vote=live.get("vote"),
                               cutoff=cutoff if policy.startswith("memory") else None)
            sc = run_policy(problems, "none", kv, config, params) if policy != "none" else o
            by_id = {r["problem_id"]: r for r in bench["problems"][f"{kv}/{policy}"]}
            same_pruned = same_correct = n_traces = 0
            for pr, pm, c in zip(problems, o.pruned, o.correct):
                rec = by_id.get(pr.problem_id)
                if rec is None:
                    continue
                live_pruned = {t["index"]: bool(t["pruned"]) for t in rec["traces"]}
                same_pruned += sum(live_pruned.get(t.index) == p for t, p in zip(pr.traces, pm))
                n_traces += len(pr.traces)
                same_correct += bool(rec["correct"]) == bool(c)
            toks = sum(map(sum, o.tokens))
            out.append({
                "kv_blocks": kv, "policy": policy, "problems": len(ids),
                "live": {"accuracy": live["accuracy"], "token_ratio": live["token_ratio"],
                         "time_ratio": live["time_ratio"], "preemptions": live["preemptions"], "pruned": live["pruned"]},
                "replay": {"accuracy": float(np.mean(o.correct)), "token_ratio": toks / max(sum(map(sum, sc.tokens)), 1),
                           "time_ratio": (o.steps * config.step_cost_tokens + o.computed_tokens)
                           / (sc.steps * config.step_cost_tokens + sc.computed_tokens),
                           "preemptions": o.preemptions, "pruned": sum(map(sum, o.pruned))},
                "traces_pruned_alike": same_pruned / max(n_traces, 1),
                "problems_voted_alike": same_correct / max(len(ids), 1),
                # a resumed cell's wall time adds up batches: not a point for the time model's fit
                "model": {"steps": o.steps, "computed_tokens": o.computed_tokens,
                          "live_wall_s": None if live.get("resumed") else live.get("wall_s")}})
    return out


def fit_step_cost(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    """Least-squares ``wall_s = a * steps + b * computed_tokens`` over the live rows; ``a / b`` is
    the ``step_cost_tokens`` that makes the time model match this machine."""
    pts = [(r["model"]["steps"], r["model"]["computed_tokens"], r["model"]["live_wall_s"]) for r in rows
           if r.get("model", {}).get("live_wall_s")]
    if len(pts) < 3:
        return None
    x = np.array([[s, c] for s, c, _ in pts], dtype=np.float64)
    y = np.array([w for *_, w in pts], dtype=np.float64)
    (a, b), *_ = np.linalg.lstsq(x, y, rcond=None)
    pred = x @ np.array([a, b])
    return {"seconds_per_step": float(a), "seconds_per_token": float(b),
            "step_cost_tokens": float(a / b) if b > 0 else float("nan"),
            "max_relative_error": float(np.max(np.abs(pred - y) / y)), "points": len(pts)}


def live_markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| KV blocks | policy | accuracy live / replay | x SC tokens live / replay | x SC time live / model "
            "| preemptions live / replay | pruned live / replay | traces pruned alike | problems right/wrong alike |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        a, b = r["live"], r["replay"]
        lines.append(f"| {r['kv_blocks'] or 'default'} | {r['policy']} | {a['accuracy']:.3f} / {b['accuracy']:.3f} | "
                     f"{a['token_ratio']:.2f} / {b['token_ratio']:.2f} | {_ratio(a['time_ratio'])} / {b['time_ratio']:.2f} | "
                     f"{a['preemptions']} / {b['preemptions']} | {a['pruned']} / {b['pruned']} | "
                     f"{r['traces_pruned_alike']:.3f} | {r['problems_voted_alike']:.3f} |")
    return head + "\n".join(lines) + "\n"


def _ratio(x: float | None) -> str:
    """A live time ratio; a bench row of a resumed cell (or one timed apart from its SC) has none."""
    return "–" if x is None else f"{x:.2f}"


def _iv(d: dict[str, Any] | None) -> str:
    if not d:
        return "–"
    return f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| KV blocks | policy | vote | accuracy | Δ vs SC [95% CI] | random | SC same tokens | oracle "
            "| x SC time (model) | x admission-SC time | x SC tokens | preemptions | pruned |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        def acc(name: str) -> str:
            return f"{r[name]['accuracy']:.3f}" if name in r else "–"

        adm = r.get("admission_time_ratio")
        policy = r["policy"] + (f" ({r['rule']})" if r.get("rule") else "") + (
            f" (max_num_seqs {r['max_num_seqs']})" if r.get("max_num_seqs") else "")
        lines.append(f"| {r['kv_blocks'] or 'unlimited'} | {policy} | {r['vote']} | {r['accuracy']:.3f} | "
                     f"{_iv(r.get('vs_sc'))} | {acc('random')} | {acc('sc_same_tokens')} | {acc('oracle')} | "
                     f"{r['time_ratio']:.2f} | {'–' if adm is None else f'{adm:.2f}'} | "
                     f"{r['token_ratio']:.2f} | {r['preemptions']} | {r['pruned']}/{r['traces']} |")
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    policies = list(dict.fromkeys((r["policy"], r["vote"]) for r in rows))
    for policy in policies:
        sub = [r for r in rows if (r["policy"], r["vote"]) == policy]
        policy = f"{policy[0]} ({policy[1]})"
        for ax, key, label in ((axes[0], "output_tokens", "output tokens"), (axes[1], "model_time", "model time (token units)")):
            xs = [r[key] for r in sub]
            ax.plot(xs, [r["accuracy"] for r in sub], marker="o", label=policy)
            for r in sub:
                ax.annotate(str(r["kv_blocks"] or "∞"), (r[key], r["accuracy"]), fontsize=6)
            ax.set_xlabel(label)
            ax.set_ylabel("accuracy")
    axes[0].set_title("accuracy vs. output tokens (labels: KV blocks)")
    axes[1].set_title("accuracy vs. model time")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_trust(config: Config, header: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The trust.json for the risk-controlled rows: ``--trust`` (a file or a scorer directory),
    or with ``auto`` the run's scorer's, checked against the run's scorer weights."""
    from .calibrate import FILE_NAME, read_trust

    if not config.trust:
        return None, None
    weights = (header.get("scorer") or {}).get("weights_sha256")
    if config.trust == "auto":
        scorer = (header.get("config") or {}).get("scorer")
        if not scorer or not weights or not (Path(scorer) / FILE_NAME).is_file():
            return None, None
        return read_trust(scorer, weights), str(Path(scorer) / FILE_NAME)
    p = Path(config.trust)
    d = p if p.is_dir() else p.parent
    if not (d / FILE_NAME).is_file():
        raise StepprobeError(f"replay: no {FILE_NAME} at {config.trust}")
    return read_trust(d, weights), str(d / FILE_NAME)


def run(config: Config) -> Path:
    if not config.results:
        raise StepprobeError("replay needs --results (a run's output directory or results.jsonl)")
    res = Path(config.results)
    out = Path(config.output) if config.output else (res if res.is_dir() else res.parent) / "replay"
    locks.hold(out)  # one writer per output directory
    t0 = time.perf_counter()
    header, records = load_run(config.results, config.limit)
    if not records:
        raise StepprobeError(f"{config.results} has no problems")
    if "confidence" in config.policies and not any(t.get("stop_confidence") for r in records for t in r["traces"]):
        raise StepprobeError("replay of the confidence policy needs a run with --record-confidence "
                             "(per-token confidences); drop 'confidence' from --policies or rerun")
    out.mkdir(parents=True, exist_ok=True)
    grading = grading_of(header.get("config"))
    bench = load_bench(config.live_bench) if config.live_bench else None
    if bench is not None and grading_of(bench.get("config")) != grading:
        raise ArtifactMismatch(f"replay: {config.results} was graded {grading}, the bench {config.live_bench} "
                               f"{grading_of(bench.get('config'))}; their accuracies are not comparable")
    problems = build_problems(records)
    params = params_from(config, header)
    trust, trust_path = load_trust(config, header)
    result = replay(problems, config, params, trust)
    doc = {"kind": KIND, "schema_version": SCHEMA_VERSION, "config": config.to_dict(), "grading": grading,
           "trust": {"path": trust_path, "vote": trust["vote"], "calibration_set": trust["calibration_set"],
                     "holds_for": trust["holds_for"], "default": trust["default"]} if trust else None,
           "params": dataclasses.asdict(params), "package_versions": package_versions(),
           "source": {"results": str(Path(config.results).resolve()), "run_config": header.get("config"),
                      "model": header.get("model"), "scorer": header.get("scorer")},
           "problems": len(problems), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "seconds": time.perf_counter() - t0, **result}
    text = (f"Replay on {len(problems)} problems (graded {grading}; paired: the same traces for every policy; Δ vs SC with a paired "
            "bootstrap 95% interval over problems; random/oracle prune the same number of traces per problem at the "
            "same points; 'SC same tokens' samples fewer traces per problem, in full, for the same output tokens; "
            "'none+admission' is SC with max_num_seqs sized so that it never preempts; 'memory+risk' is memory "
            "pruning only below the cutoff its scorer's calibration earned; time from the scheduler model).\n\n"
            + markdown(result["rows"]))
    if bench is not None:
        doc["live_check"] = live_check(config, bench)
        doc["time_fit"] = fit_step_cost(doc["live_check"])
        text += ("\nReplay vs. live: the bench's own SC traces replayed at its KV budgets, beside what its live "
                 "policies did on the same problems.\n\n" + live_markdown(doc["live_check"]))
        if doc["time_fit"]:
            f = doc["time_fit"]
            text += (f"\nTime model fitted to the live wall times ({f['points']} runs): {f['seconds_per_step'] * 1e3:.1f} ms "
                     f"per engine step + {f['seconds_per_token'] * 1e3:.2f} ms per computed token "
                     f"(= step_cost_tokens {f['step_cost_tokens']:.0f}; largest error {f['max_relative_error']:.0%}).\n")
    atomic_write_json(out / "replay.json", doc)
    atomic_write_text(out / "replay.md", text)
    plot(result["rows"], out / "replay.png")
    log.info("replay: %d problems in %.1f s\n%s", len(problems), time.perf_counter() - t0, text)
    return out


def read_replay(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "replay.json"
    data = json.loads(p.read_text(encoding="utf-8"))
    check_schema(data, KIND, SCHEMA_VERSION, str(p))
    return data
