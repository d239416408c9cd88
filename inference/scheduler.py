"""The engine-core side: vLLM's scheduler, pruning traces by their step scores.

:class:`StepprobeScheduler` is what ``scheduler_cls`` names; constructing it returns an
instance of vLLM's own ``Scheduler`` or, when async scheduling is on (the GPU default),
its ``AsyncScheduler``, each with :class:`PruningMixin` on top, so the async path is never
silently replaced by the synchronous one.

Scores arrive on the model runner output (``stepprobe_steps``, set by capture.py in the worker) in
``update_from_output`` and are folded into each trace's running aggregate
(:class:`~stepprobe.inference.policies.TraceScore`). Pruning a trace means finishing it
like vLLM finishes a stopped request: ``finish_reason="stop"``, ``stop_reason="pruned"``, its
blocks freed, its partial text delivered to the client.

- ``memory``: before each ``schedule()`` that could run out of KV blocks (free blocks below
  what the step could allocate at most; otherwise nothing is ordered, so an uncongested step
  costs no scan), running traces are ordered so that vLLM's
  preemption victim (the last one) is the lowest-scoring prunable trace, and
  ``_preempt_request`` finishes that trace instead of sending it back to the waiting queue.
  Which trace is the victim is ``memory_victim``: ``score`` (the paper's rule) compares raw
  scores **across problems** (they share one KV cache), so a hard problem loses traces first;
  ``group_gap`` and ``group_largest`` compare each trace with the other live traces of its own
  problem (:func:`~stepprobe.inference.policies.memory_victim_keys`). A group's last live
  trace is protected (``protect_last``), no group goes below ``min_live`` live traces, and
  unscored traces are never pruned, so when no trace may go vLLM preempts as usual.
- ``relative``: a trace more than ``relative_margin`` below the best other live trace of its
  group is finished (after ``warmup_steps``); decided when scores arrive, like threshold.
- ``threshold`` and ``top_fraction``: decided when scores arrive (within one problem's
  group for top_fraction), carried out at the start of the next ``schedule()``, where every
  flagged prune is capped so each group keeps ``min_live`` live traces
  (:func:`~stepprobe.inference.policies.cap_to_min_live`).
- ``none``: scores are still collected; nothing is pruned (plain self-consistency).

A group is the set of children of one ``n > 1`` request (vLLM names them ``{i}_{parent}``),
or what ``extra_args={"stepprobe": {"group": ...}}`` says (:func:`~stepprobe.inference.plugin.request_group`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from typing import Any

from stepprobe.options import ConfidenceOptions

from .plugin import PluginSettings, check_policy, check_supported, request_group, request_overrides
from .policies import (DEFAULT_THRESHOLD, Live, TraceScore, below_cutoff, below_group_best, below_threshold,
                       cap_to_min_live, effective_min_keep, memory_victim_keys, top_fraction_losers)

log = logging.getLogger(__name__)

PRUNED = "pruned"


@dataclasses.dataclass
class _Trace:
    score: TraceScore
    policy: str
    group: str
    min_live: int
    relative_margin: float
    done: bool = False
    conf_threshold: float | None = None
    conf_window: int = ConfidenceOptions.confidence_window
    conf: Any = None  # deque of recent token confidences (confidence policy)


class PruningMixin:
    """Score bookkeeping and pruning on top of a vLLM scheduler class."""

    #: Memory traces the current ``schedule()`` may prune instead of preempting; empty outside
    #: ``schedule()``, so only preemptions for lack of KV space there become prunes.
    _sp_mem_allowed: frozenset[str] = frozenset()

    def __init__(self, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(vllm_config, *args, **kwargs)  # type: ignore[call-arg]
        self._sp = PluginSettings.from_vllm_config(vllm_config)
        if self._sp.scorer:
            check_supported(vllm_config)
        self._sp_threshold = self._sp.threshold
        if self._sp_threshold is None and self._sp.scorer:
            from stepprobe.probes.checkpoint import read_scorer_meta

            self._sp_threshold = float(read_scorer_meta(self._sp.scorer).get("threshold", DEFAULT_THRESHOLD))
        # Risk-controlled memory pruning: only traces scored below the cutoff the scorer's
        # calibration earned may go (None: the paper's rule; see inference/calibrate.py).
        from .calibrate import resolve_trust

        self._sp_cutoff = resolve_trust(self._sp.scorer, self._sp.max_accuracy_loss, self._sp.risk_delta,
                                        self._sp.prune_below).cutoff
        self._sp_traces: dict[str, _Trace] = {}
        self._sp_groups: dict[str, set[str]] = defaultdict(set)
        # Per-step cost proportional to what changed: live traces counted per group, and the
        # groups where a trace finished (every finish goes through _free_request) since the
        # last update, instead of walking every trace and group each step.
        self._sp_live_count: dict[str, int] = defaultdict(int)
        self._sp_finished_groups: set[str] = set()
        self._sp_touched_groups: set[str] = set()
        self._sp_live_memory = 0  # live traces under the memory policy
        self._sp_decided_groups: set[str] = set()
        self._sp_flagged: list[str] = []  # flagged for pruning at the next schedule()
        self._sp_outputs: list[tuple[int, Any]] = []
        self.stepprobe_counts = {"pruned": 0, "preempted": 0, "steps": 0}

    # ---------------------------------------------------------------- requests
    def add_request(self, request: Any) -> None:
        super().add_request(request)  # type: ignore[misc]
        over = request_overrides(request.sampling_params)
        policy = check_policy(over.get("policy", self._sp.policy))
        group = request_group(request.request_id, over)
        trace = _Trace(TraceScore(self._sp.aggregate, self._sp.ema_alpha), policy, group,
                       min_live=int(over.get("min_live", self._sp.min_live)),
                       relative_margin=float(over.get("relative_margin", self._sp.relative_margin)))
        if policy == "confidence":
            from collections import deque

            trace.conf_threshold = over.get("conf_threshold")
            trace.conf_window = int(over.get("conf_window", ConfidenceOptions.confidence_window))
            trace.conf = deque(maxlen=trace.conf_window)
        old = self._sp_traces.get(request.request_id)
        if old is not None and not old.done:  # the same id again: forget the old trace
            self._sp_mark_done(request.request_id)
        self._sp_traces[request.request_id] = trace
        self._sp_groups[group].add(request.request_id)
        self._sp_live_count[group] += 1
        self._sp_live_memory += policy == "memory"

    def _sp_live(self, rid: str) -> bool:
        t = self._sp_traces.get(rid)
        return t is not None and not t.done

    def _sp_min_keep(self, t: _Trace) -> int:
        return effective_min_keep(t.policy, t.min_live, self._sp.protect_last)

    def _sp_group_view(self, groups: Any) -> list[Live]:
        """The live traces of ``groups`` as the pure group rules see them (``prunable`` = memory policy)."""
        out = []
        for g in groups:
            for r in self._sp_groups[g]:
                t = self._sp_traces.get(r)
                if t is not None and not t.done:
                    out.append(Live(r, g, t.score.value,
                                    t.policy == "memory" and below_cutoff(t.score.value, self._sp_cutoff),
                                    self._sp_min_keep(t)))
        return out

    def _sp_mark_done(self, rid: str, pruned: bool = False) -> None:
        t = self._sp_traces.get(rid)
        if t is not None and not t.done:
            t.done = True
            self._sp_live_count[t.group] -= 1
            self._sp_live_memory -= t.policy == "memory"
            self._sp_finished_groups.add(t.group)
            if not pruned:  # finished on its own (stop, length, abort): its group's rules look again
                self._sp_touched_groups.add(t.group)

    def _free_request(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        self._sp_mark_done(request.request_id)  # stopped, aborted, errored or pruned
        return super()._free_request(request, *args, **kwargs)  # type: ignore[misc]

    # ---------------------------------------------------------------- pruning
    def _sp_finish(self, request: Any, *, from_running: bool) -> None:
        """Finish ``request`` as pruned and queue its final output for the client."""
        from vllm.v1.engine import EngineCoreOutput
        from vllm.v1.request import RequestStatus

        request.stop_reason = PRUNED
        self._sp_mark_done(request.request_id, pruned=True)
        if from_running:
            # Already popped from self.running by vLLM's preemption loop.
            request.status = RequestStatus.FINISHED_STOPPED
            self._free_request(request)  # type: ignore[attr-defined]
        else:
            self.finish_requests(request.request_id, RequestStatus.FINISHED_STOPPED)  # type: ignore[attr-defined]
        self._sp_outputs.append((request.client_index, EngineCoreOutput(
            request_id=request.request_id, new_token_ids=[], finish_reason=request.get_finished_reason(),
            stop_reason=PRUNED, events=request.take_events(), trace_headers=request.trace_headers)))
        self.stepprobe_counts["pruned"] += 1
        log.debug("stepprobe: pruned %s (score %s)", request.request_id, self._sp_traces[request.request_id].score.value)

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        if self._sp_flagged:
            flagged, self._sp_flagged = self._sp_flagged, []
            flagged = [r for r in dict.fromkeys(flagged) if self._sp_live(r)]
            groups = {self._sp_traces[r].group for r in flagged}
            for rid in cap_to_min_live(flagged, self._sp_group_view(groups)):
                req = self.requests.get(rid)  # type: ignore[attr-defined]
                if req is not None and not req.is_finished():
                    self._sp_finish(req, from_running=False)
        running = self.running  # type: ignore[attr-defined]
        # No live memory-policy trace (counted on add/finish), or KV room for whatever this step can
        # allocate: no preemption can happen, so nothing to order and no O(running) scan.
        mem_groups = set() if not (self._sp_live_memory and self._sp_may_preempt()) else {
            t.group for t in (self._sp_traces.get(r.request_id) for r in running)
            if t is not None and t.policy == "memory"}
        if mem_groups:
            keys = memory_victim_keys(self._sp_group_view(mem_groups), self._sp.memory_victim)
            zero = (0, 0.0, 0.0)
            # Scored memory traces whose group keeps its minimum even if all of them go
            # (allowed_losers), so each may be pruned when vLLM picks it as the victim.
            self._sp_mem_allowed = frozenset(r for r, k in keys.items() if k[0] == 1)
            running.sort(key=lambda r: keys.get(r.request_id, zero))  # stable: the rest keep vLLM's order
        # Only preemptions for lack of KV space inside schedule() become prunes (not, e.g.,
        # the preempt-everything of reset_prefix_cache).
        try:
            return super().schedule(*args, **kwargs)  # type: ignore[misc]
        finally:
            self._sp_mem_allowed = frozenset()

    def _sp_may_preempt(self) -> bool:
        """False only when this ``schedule()`` provably cannot run out of KV blocks for a running request.

        A running request allocates at most ``ceil((new + lookahead) / block) + 1`` blocks per KV-cache
        group in one step, and the step schedules at most ``max_num_scheduled_tokens`` new tokens in all,
        so ``groups * (2 * running + ceil((budget + running * lookahead) / smallest block))`` free blocks
        (plus vLLM's watermark) are always enough. Anything unknown answers True (order as before).
        """
        try:
            mgr = self.kv_cache_manager  # type: ignore[attr-defined]
            groups = self.kv_cache_config.kv_cache_groups  # type: ignore[attr-defined]
            block = min(g.kv_cache_spec.block_size for g in groups)
            running = len(self.running)  # type: ignore[attr-defined]
            ahead = 1 + int(self.num_spec_tokens or 0) + int(self.num_lookahead_tokens or 0)  # type: ignore[attr-defined]
            tokens = int(self.max_num_scheduled_tokens) + running * ahead  # type: ignore[attr-defined]
            bound = len(groups) * (2 * running + -(-tokens // block)) + int(mgr.watermark_blocks)
            return mgr.block_pool.get_num_free_blocks() < bound
        except (AttributeError, TypeError, ValueError):
            return True

    def _preempt_request(self, request: Any, timestamp: float, drop_stale_output: bool = False) -> None:
        if request.request_id in self._sp_mem_allowed:
            self._sp_finish(request, from_running=True)
            return
        self.stepprobe_counts["preempted"] += 1
        super()._preempt_request(request, timestamp, drop_stale_output)  # type: ignore[misc]

    # ---------------------------------------------------------------- scores
    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        steps = getattr(model_runner_output, "stepprobe_steps", None)
        touched_groups = set()
        if steps:
            for rid, pairs in steps.items():
                t = self._sp_traces.get(rid)
                if t is None or t.done:
                    continue
                for _, s in pairs:
                    t.score.add(float(s))
                    self.stepprobe_counts["steps"] += 1
                if t.policy == "threshold" and below_threshold(t.score.value, t.score.n, self._sp_threshold,
                                                               self._sp.warmup_steps):
                    self._sp_flagged.append(rid)
                elif t.policy in ("top_fraction", "relative"):
                    touched_groups.add(t.group)
        logprobs = model_runner_output.logprobs
        if logprobs is not None:
            self._sp_confidence(model_runner_output, logprobs)
        outputs = super().update_from_output(scheduler_output, model_runner_output)  # type: ignore[misc]
        # Groups where a trace finished since the last update: rules look again where one finished
        # on its own (as before), and every group with a finish is a candidate for gc.
        finished_groups, self._sp_finished_groups = self._sp_finished_groups, set()
        touched_groups |= self._sp_touched_groups
        self._sp_touched_groups = set()
        for g in touched_groups:
            self._sp_decide_group(g)
        if self._sp_outputs:
            from vllm.v1.engine import EngineCoreOutputs

            for client, out in self._sp_outputs:
                eco = outputs.get(client)
                if eco is None:
                    outputs[client] = eco = EngineCoreOutputs(outputs=[])
                eco.outputs.append(out)
            self._sp_outputs = []
        self._sp_gc(finished_groups)
        return outputs

    def _sp_confidence(self, mro: Any, logprobs: Any) -> None:
        """DeepConf-style online stop: sliding-window mean of token confidence (minus the mean
        top-k log-probability) below the request's threshold."""
        for rid, idx in mro.req_id_to_index.items():
            t = self._sp_traces.get(rid)
            if t is None or t.done or t.policy != "confidence" or t.conf_threshold is None:
                continue
            toks = mro.sampled_token_ids[idx] if mro.sampled_token_ids else []
            if not toks:
                continue
            part = logprobs.slice_request(idx, len(toks))
            for row in part.logprobs:
                top = [float(v) for v in row[1:] if v > -1e30]
                if top:
                    t.conf.append(-sum(top) / len(top))
            if len(t.conf) == t.conf_window and sum(t.conf) / len(t.conf) < float(t.conf_threshold):
                self._sp_flagged.append(rid)

    def _sp_decide_group(self, group: str) -> None:
        members = self._sp_groups[group]
        live = {r: self._sp_traces[r] for r in members if self._sp_live(r)}
        if not live:
            return
        for r, t in live.items():
            if t.policy == "relative" and r not in self._sp_flagged and below_group_best(
                    t.score.value, t.score.n, (o.score.value for q, o in live.items() if q != r),
                    t.relative_margin, self._sp.warmup_steps):
                self._sp_flagged.append(r)
        if group in self._sp_decided_groups or any(t.policy != "top_fraction" for t in live.values()):
            return
        losers = top_fraction_losers({r: (t.score.value, t.score.n) for r, t in live.items()},
                                     self._sp.keep_fraction, self._sp.keep_step)
        if losers is None:
            return
        self._sp_decided_groups.add(group)
        for r in losers:
            self._sp_flagged.append(r)

    def _sp_gc(self, groups: set[str]) -> None:
        """Forget those of ``groups`` whose traces have all finished (a server runs forever)."""
        for g in groups:
            if self._sp_live_count[g] <= 0 and g in self._sp_groups:
                for r in self._sp_groups.pop(g):
                    if getattr(self._sp_traces.get(r), "group", None) == g:  # not an id re-added elsewhere
                        del self._sp_traces[r]
                self._sp_decided_groups.discard(g)
                del self._sp_live_count[g]


def _make(base: type) -> type:
    return type(f"Stepprobe{base.__name__}", (PruningMixin, base), {"__module__": __name__})


class StepprobeScheduler:
    """What ``scheduler_cls`` names: builds the pruning subclass of the scheduler vLLM would use."""

    def __new__(cls, vllm_config: Any, *args: Any, **kwargs: Any) -> Any:
        from vllm.v1.core.sched.async_scheduler import AsyncScheduler
        from vllm.v1.core.sched.scheduler import Scheduler

        base = AsyncScheduler if vllm_config.scheduler_config.async_scheduling else Scheduler
        klass = _SYNC if base is Scheduler else _ASYNC
        log.info("stepprobe: pruning scheduler on %s (policy %s)", base.__name__,
                 PluginSettings.from_vllm_config(vllm_config).policy)
        return klass(vllm_config, *args, **kwargs)


def _build() -> tuple[type, type]:
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    return _make(Scheduler), _make(AsyncScheduler)


_SYNC, _ASYNC = _build()
