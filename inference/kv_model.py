"""A model of vLLM's scheduler and KV cache, on which replay and calibrate run every policy.

FCFS admission (not while a preemption happened in the step), chunked prefill within
``max_num_batched_tokens``, the prompt's full blocks shared by a problem's traces (prefix
caching), and vLLM's victim rule (the **last** running request is preempted; the memory policy
first sorts running traces so that the last is the lowest-scoring prunable one, and finishes it
instead). A preempted trace frees its blocks and recomputes its prompt and generated tokens when
readmitted. Time: engine steps and computed tokens (see :mod:`stepprobe.inference.replay`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Sequence

from stepprobe.config import OptionGroup, option
from stepprobe.errors import StepprobeError
from stepprobe.options import PruningOptions

from .policies import VICTIM_RULES, Live, TraceScore, below_cutoff, effective_min_keep, memory_victim_keys
from .replay_data import Params, Problem


@dataclasses.dataclass
class SchedulerModel(OptionGroup):
    """The model of vLLM's scheduler that replay and calibrate run every policy through."""

    block_size: int = option(128, "KV block size in tokens (vLLM's CPU backend: 128)")
    max_num_batched_tokens: int = option(4096, "tokens per engine step (vLLM's CPU default for LLM)")
    max_num_seqs: int = option(256, "running requests at most (vLLM's CPU default for LLM)")
    step_cost_tokens: float = option(64.0, "time model: one engine step costs as much as this many computed tokens")
    protect_last: bool = option(PruningOptions.protect_last, "memory: never prune a problem's last live trace (as the scheduler)")
    memory_victim: str = option(PruningOptions.memory_victim, "memory victim rule for 'memory' (memory:<rule> names one): "
                                         + ", ".join(VICTIM_RULES))
    min_live: int = option(PruningOptions.min_live, "every policy keeps at least this many live traces per problem (as the scheduler)")

    def check(self) -> None:
        if self.memory_victim not in VICTIM_RULES:
            raise StepprobeError(f"unknown memory victim rule {self.memory_victim!r}; known: {', '.join(VICTIM_RULES)}")
        if self.block_size < 1 or self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise StepprobeError("block_size, max_num_batched_tokens and max_num_seqs must be positive")



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
             protect_last: bool = PruningOptions.protect_last, phases: list[list[tuple[int, int]]] | None = None,
             memory_rule: str = PruningOptions.memory_victim, follow: dict[int, list[tuple[int, int]]] | None = None,
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

