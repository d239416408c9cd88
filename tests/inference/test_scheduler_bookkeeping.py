"""What the pruning scheduler keeps straight around its rules (no engine): its place among vLLM's
classes, the KV room it leaves, what a pruned trace's client receives, its counters and group
state, and the per-request settings each rule reads.

Built and driven like test_scheduler_rules.py, on vLLM's real ``Scheduler``/``AsyncScheduler``
from a real ``VllmConfig``; here each request may have its own length, client, trace headers,
and a score schedule (a step score only on some tokens), and a hook sees the scheduler after
every update:

- the classes ``scheduler_cls`` builds: their names, module and bases, positional arguments;
- a scorer refuses an engine configuration it cannot score;
- the KV-room bound of ``_sp_may_preempt`` exactly at its edge, with speculative and
  lookahead tokens, a watermark and two KV-cache groups;
- a preemption keeps vLLM's timestamp;
- what the client receives for a pruned trace (finish and stop reason, trace headers,
  events), also when nothing else of that client is in the step, and on the request itself;
- the live counters stay exact through finishes and prunes; finished groups are forgotten,
  live ones are not, and a group name used again is decided again;
- a trace that finishes on its own makes its group's pending decision, without new scores;
- step scores of a request the scheduler no longer tracks are ignored, the others counted;
- the confidence rule reads every request of a batch, whatever comes first.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.scheduler_harness import BLOCK, PROMPT, engine_core_loop

MODES = pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
LONG = 24


def add(scheduler, specs: dict[str, dict], *, max_tokens: dict | None = None, client: dict | None = None,
        headers: dict | None = None, logprobs: int | None = None, prompt: dict | None = None,
        resumable: bool = False) -> dict:
    """One request per ``specs`` item (request id -> its ``stepprobe`` extra args), in order."""
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    hasher = get_request_block_hasher(BLOCK, sha256)
    reqs = {}
    for i, (rid, extra) in enumerate(specs.items()):
        sp = SamplingParams(max_tokens=(max_tokens or {}).get(rid, LONG), ignore_eos=True, logprobs=logprobs,
                            extra_args={"stepprobe": dict(extra)})
        reqs[rid] = Request(request_id=rid, prompt_token_ids=[100 + i] * (prompt or {}).get(rid, PROMPT),
                            sampling_params=sp, pooling_params=None, block_hasher=hasher,
                            client_index=(client or {}).get(rid, 0), trace_headers=(headers or {}).get(rid),
                            resumable=resumable)
        scheduler.add_request(reqs[rid])
    return reqs


def drive(scheduler, *, in_flight: int, scores=None, rows=None, extra_steps=None, after=None, reverse_batch=False,
          chunked=False):
    """Run to completion. ``scores(rid, k)`` is the step score for ``rid``'s ``k``-th token (0-based;
    ``None``: no step ends there); ``rows[rid]`` its log-probability row (or ``rows(rid, k)``, that
    of its ``k``-th token); with ``chunked`` (synchronous runs) a request still in a chunked
    prefill samples nothing, as a model runner does; ``reverse_batch`` lays the batch out last-scheduled first; ``extra_steps`` step
    scores put in front of every output's; ``after()`` runs after every update. Returns
    ``(done, outs)``: each request's (finish_reason, stop_reason, tokens) and each final output
    with the client it went to."""
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, LogprobsLists, ModelRunnerOutput

    done: dict[str, tuple] = {}
    outs: dict[str, tuple] = {}
    tokens: dict[str, int] = {}
    sent: dict[str, int] = {}

    def complete(so):
        rids = list(so.num_scheduled_tokens)[::-1 if reverse_batch else 1]
        if not rids:
            deliver(scheduler.update_from_output(so, EMPTY_MODEL_RUNNER_OUTPUT))
            return
        prefilling = {r for r in rids if chunked and scheduler.requests[r].num_computed_tokens
                      < scheduler.requests[r].num_prompt_tokens}
        mro = ModelRunnerOutput(req_ids=rids, req_id_to_index={r: k for k, r in enumerate(rids)},
                                sampled_token_ids=[[] if r in prefilling else [5] for r in rids])
        steps = dict(extra_steps or {})
        at = {}
        for r in rids:
            if r in prefilling:
                continue
            k = at[r] = sent.get(r, 0)
            sent[r] = k + 1
            v = scores(r, k) if scores is not None else None
            if v is not None:
                steps[r] = [[0, v]]
        mro.stepprobe_steps = steps
        if rows is not None:
            lp = np.array([rows(r, at.get(r, 0)) if callable(rows) else rows[r] for r in rids], dtype=np.float32)
            mro.logprobs = LogprobsLists(logprob_token_ids=np.full(lp.shape, 5, dtype=np.int32), logprobs=lp,
                                         sampled_token_ranks=np.ones(len(rids), dtype=np.int32))
        deliver(scheduler.update_from_output(so, mro))

    def deliver(outputs):
        for client, eco in outputs.items():
            for o in eco.outputs:
                tokens[o.request_id] = tokens.get(o.request_id, 0) + len(o.new_token_ids)
                if o.finish_reason is not None:
                    done[o.request_id] = (str(o.finish_reason), o.stop_reason, tokens[o.request_id])
                    outs[o.request_id] = (client, o)
        if after is not None:
            after()

    engine_core_loop(scheduler, complete, in_flight)
    return done, outs


def const(table: dict):
    return lambda r, k: table.get(r)


FULL = ("length", None, LONG)
MEM = {"policy": "memory", "scorer": "unused", "threshold": 0.5}


# --------------------------------------------------------------------- the classes
def test_the_built_classes_are_named_and_placed_for_their_base():
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    import stepprobe.inference.scheduler as S

    sync, asy = S._build()
    for klass, base in ((sync, Scheduler), (asy, AsyncScheduler)):
        assert klass.__name__ == f"Stepprobe{base.__name__}"
        assert klass.__module__ == "stepprobe.inference.scheduler"
        assert klass.__mro__[1:3] == (S.PruningMixin, base)
    assert sync is not asy and not issubclass(sync, AsyncScheduler)
    made = S._make(Scheduler)
    assert made.__name__ == "StepprobeScheduler" and made.__module__ == "stepprobe.inference.scheduler"
    assert issubclass(made, S.PruningMixin) and issubclass(made, Scheduler)


@MODES
def test_positional_constructor_arguments_reach_vllm(build_scheduler, async_scheduling):
    s = build_scheduler(async_scheduling=async_scheduling, settings={"policy": "none"}, positional=True)
    assert s.block_size == BLOCK and s.kv_cache_config.num_blocks == 7
    add(s, {"r0": {}})
    done, _ = drive(s, in_flight=1)
    assert done == {"r0": FULL}


def test_a_scorer_refuses_pipeline_parallelism(build_scheduler, monkeypatch):
    from vllm.v1.core.sched.scheduler import Scheduler

    from stepprobe.inference.plugin import StepprobeError

    real = Scheduler.__init__

    def init(self, vllm_config, *a, **k):  # vLLM's own set-up first, then the engine would be pipelined
        real(self, vllm_config, *a, **k)
        vllm_config.parallel_config.pipeline_parallel_size = 2

    monkeypatch.setattr(Scheduler, "__init__", init)
    with pytest.raises(StepprobeError, match="pipeline parallelism"):
        build_scheduler(async_scheduling=False, settings={"policy": "threshold", "scorer": "x", "threshold": 0.5})
    # Without a scorer (none given, not even the released default) nothing is scored, so nothing is refused.
    build_scheduler(async_scheduling=False, settings={"policy": "none", "scorer": "none"})


# --------------------------------------------------------------------- the KV-room bound
@pytest.mark.parametrize("spec,look,watermark,groups", [(0, 0, 0.0, 1), (3, 0, 0.0, 1), (0, 3, 0.0, 1),
                                                        (2, 3, 0.04, 1), (0, 0, 0.04, 2), (1, 0, 0.0, 2)])
def test_may_preempt_exactly_below_the_bound(build_scheduler, spec, look, watermark, groups):
    """The most one step can allocate: per KV-cache group, 2 blocks per running request plus the
    step's tokens (the budget, and per running request its lookahead and speculative tokens) in
    blocks, rounded up; plus vLLM's watermark. At the bound no preemption is possible; one
    block fewer, it is."""
    import math

    s = build_scheduler(async_scheduling=False, settings=MEM, num_blocks=200, groups=groups,
                        watermark=watermark)
    add(s, {f"r{i}": {"group": "g"} for i in range(4)})
    s.schedule()
    assert len(s.running) == 4
    s.num_spec_tokens, s.num_lookahead_tokens = spec, look
    ahead = 1 + spec + look
    wm = int(watermark * 200)
    assert s.kv_cache_manager.watermark_blocks == wm
    bound = groups * (2 * 4 + math.ceil((s.max_num_scheduled_tokens + 4 * ahead) / BLOCK)) + wm
    pool = s.kv_cache_manager.block_pool
    taken = pool.get_new_blocks(pool.get_num_free_blocks() - bound)
    assert pool.get_num_free_blocks() == bound and s._sp_may_preempt() is False
    taken += pool.get_new_blocks(1)
    assert s._sp_may_preempt() is True
    pool.free_blocks(taken)


def test_may_preempt_when_the_kv_layout_is_unknown(build_scheduler):
    s = build_scheduler(async_scheduling=False, settings=MEM, num_blocks=200)
    s.kv_cache_config.kv_cache_groups = []  # no block size to bound by: assume the worst
    assert s._sp_may_preempt() is True


# --------------------------------------------------------------------- preemption
@MODES
def test_a_preemption_keeps_vllms_timestamp(build_scheduler, async_scheduling):
    from vllm.v1.engine import EngineCoreEventType

    s = build_scheduler(async_scheduling=async_scheduling, settings={"policy": "none"})
    reqs = add(s, {f"r{i}": {"group": "g"} for i in range(4)})
    stamps = []
    for r in reqs.values():
        orig = r.record_event

        def rec(kind, timestamp=None, _orig=orig):
            if kind == EngineCoreEventType.PREEMPTED:
                stamps.append(timestamp)
            return _orig(kind, timestamp)

        r.record_event = rec
    done, _ = drive(s, in_flight=2 if async_scheduling else 1)
    assert all(d == FULL for d in done.values()) and len(done) == 4
    assert stamps and len(stamps) == s.stepprobe_counts["preempted"]
    assert all(isinstance(t, float) and t > 0 for t in stamps)


# --------------------------------------------------------------------- what the client receives
@MODES
def test_a_pruned_traces_final_output_as_the_client_gets_it(build_scheduler, async_scheduling):
    from vllm.v1.engine import EngineCoreEventType, FinishReason
    from vllm.v1.request import RequestStatus

    s = build_scheduler(async_scheduling=async_scheduling, num_blocks=32, log_stats=False,
                        settings={"policy": "threshold", "scorer": "unused", "threshold": 0.5, "warmup_steps": 3})
    hdr = {"traceparent": "00-abc-def-01"}
    reqs = add(s, {"lo": {}, "hi": {}}, client={"lo": 1}, headers={"lo": hdr}, max_tokens={"hi": 4})
    # An event still to be delivered when the trace is pruned reaches the client with the prune.
    reqs["lo"].record_event(EngineCoreEventType.QUEUED)
    done, outs = drive(s, in_flight=2 if async_scheduling else 1, scores=const({"lo": 0.1, "hi": 0.9}))
    assert done["hi"] == ("length", None, 4)
    assert done["lo"][:2] == ("stop", "pruned") and 3 <= done["lo"][2] < LONG
    client, out = outs["lo"]
    assert client == 1 and out.new_token_ids == [] and out.finish_reason == FinishReason.STOP
    assert out.stop_reason == "pruned" and out.trace_headers == hdr
    assert reqs["lo"].stop_reason == "pruned" and reqs["lo"].status == RequestStatus.FINISHED_STOPPED


@MODES
def test_a_pruned_output_carries_the_events_not_yet_sent(build_scheduler, async_scheduling):
    from vllm.v1.engine import EngineCoreEventType

    s = build_scheduler(async_scheduling=async_scheduling, num_blocks=32,
                        settings={"policy": "threshold", "scorer": "unused", "threshold": 0.5, "warmup_steps": 2})
    reqs = add(s, {"lo": {}})
    def mark():
        if not reqs["lo"].is_finished():
            reqs["lo"].record_event(EngineCoreEventType.QUEUED, 123.0)

    done, outs = drive(s, in_flight=2 if async_scheduling else 1, scores=const({"lo": 0.1}), after=mark)
    assert done["lo"][:2] == ("stop", "pruned")
    seen = [(e.type, e.timestamp) for e in outs["lo"][1].events or ()]
    assert (EngineCoreEventType.QUEUED, 123.0) in seen


# --------------------------------------------------------------------- bookkeeping
def _check_counters(s):
    live = {r: t for r, t in s._sp_traces.items() if not t.done}
    assert s._sp_live_memory == sum(t.policy == "memory" for t in live.values())
    for g, members in s._sp_groups.items():
        assert s._sp_live_count[g] == sum(r in live for r in members)


@MODES
def test_live_counters_stay_exact_through_finishes_and_prunes(build_scheduler, async_scheduling):
    s = build_scheduler(async_scheduling=async_scheduling, num_blocks=6, settings={**MEM, "protect_last": False})
    specs = {"m0": {"group": "g"}, "m1": {"group": "g"}, "m2": {"group": "g"},
             "n0": {"group": "h", "policy": "none"}, "n1": {"group": "h", "policy": "none"},
             "t0": {"group": "t", "policy": "threshold"}}
    add(s, specs, max_tokens={"n0": 3, "n1": 5, "t0": 12})
    _check_counters(s)
    done, _ = drive(s, in_flight=2 if async_scheduling else 1, after=lambda: _check_counters(s),
                    scores=const({"m0": 0.2, "m1": 0.9, "m2": 0.8, "t0": 0.1}))
    assert done["t0"][:2] == ("stop", "pruned") and s.stepprobe_counts["pruned"] >= 2
    assert {r for r, d in done.items() if d[1] == "pruned"} >= {"m0", "t0"}
    # Everything finished: nothing of it is kept (a server runs forever).
    assert not s._sp_traces and not s._sp_groups and not s._sp_live_count and not s._sp_decided_groups
    assert s._sp_live_memory == 0


@MODES
def test_a_group_is_forgotten_only_once_all_its_traces_finished(build_scheduler, async_scheduling):
    # "short" finishes on its own first; its group still has "long", which the threshold
    # prunes only after its warm-up (well after "short" is gone).
    s = build_scheduler(async_scheduling=async_scheduling, num_blocks=32,
                        settings={"policy": "threshold", "scorer": "unused", "threshold": 0.5, "warmup_steps": 10})
    add(s, {"short": {"group": "g"}, "long": {"group": "g"}, "other": {"group": "o"}}, max_tokens={"short": 3})
    done, _ = drive(s, in_flight=2 if async_scheduling else 1, scores=const({"short": 0.9, "long": 0.1, "other": 0.9}))
    assert done["short"] == ("length", None, 3) and done["other"] == FULL
    assert done["long"][:2] == ("stop", "pruned") and 10 <= done["long"][2] < LONG
    assert not s._sp_traces and not s._sp_groups and not s._sp_live_count


def test_a_group_name_used_again_is_decided_again(build_scheduler):
    s = build_scheduler(async_scheduling=False, num_blocks=32,
                        settings={"policy": "top_fraction", "scorer": "unused", "threshold": 0.5, "keep_fraction": 0.5,
                        "keep_step": 3})
    for rnd in range(2):
        add(s, {f"a{rnd}": {"group": "q"}, f"b{rnd}": {"group": "q"}})
        done, _ = drive(s, in_flight=1, scores=const({f"a{rnd}": 0.9, f"b{rnd}": 0.1}))
        assert done[f"a{rnd}"] == FULL and done[f"b{rnd}"][:2] == ("stop", "pruned")
    assert s.stepprobe_counts["pruned"] == 2 and not s._sp_decided_groups


@MODES
def test_a_trace_finishing_on_its_own_makes_its_groups_pending_decision(build_scheduler, async_scheduling):
    # top_fraction decides once every live trace has keep_step steps. "u" never has one and
    # finishes after 6 tokens; "f0" and "f1" have their 3 steps long before, then no more step
    # ends. When "u" is gone, the group is decided at once: "f1" goes.
    s = build_scheduler(async_scheduling=async_scheduling, num_blocks=32,
                        settings={"policy": "top_fraction", "scorer": "unused", "threshold": 0.5, "keep_fraction": 0.5,
                        "keep_step": 3})
    add(s, {"f0": {"group": "g"}, "f1": {"group": "g"}, "u": {"group": "g"}}, max_tokens={"u": 6})
    table = {"f0": 0.9, "f1": 0.1}
    done, _ = drive(s, in_flight=2 if async_scheduling else 1, scores=lambda r, k: table.get(r) if k < 3 else None)
    assert done["u"] == ("length", None, 6) and done["f0"] == FULL
    assert done["f1"][:2] == ("stop", "pruned") and 6 <= done["f1"][2] <= 9


# --------------------------------------------------------------------- step scores
@MODES
def test_steps_of_an_untracked_request_are_ignored_and_the_rest_counted(build_scheduler, async_scheduling):
    s = build_scheduler(async_scheduling=async_scheduling, num_blocks=32,
                        settings={"policy": "threshold", "scorer": "unused", "threshold": 0.5, "warmup_steps": 4})
    add(s, {"ok": {}, "lo": {}})
    done, _ = drive(s, in_flight=2 if async_scheduling else 1, scores=const({"ok": 0.9, "lo": 0.1}),
                    extra_steps={"gone": [[0, 0.0], [1, 0.0]]})
    assert done["ok"] == FULL and done["lo"][:2] == ("stop", "pruned") and 4 <= done["lo"][2] < LONG
    # one per token of "ok"; "lo"'s up to its prune (in flight ones of a pruned trace are not counted)
    assert LONG + 4 <= s.stepprobe_counts["steps"] <= LONG + done["lo"][2]
    assert "gone" not in s._sp_traces


# --------------------------------------------------------------------- confidence
UNSURE = [-0.7, -0.5, -1.0]  # confidence 0.75, below 2.0


@MODES
def test_confidence_reads_every_request_of_the_batch(build_scheduler, async_scheduling):
    # The batch starts with a request of another policy and one without a threshold: the
    # confidence request after them is still judged.
    s = build_scheduler(async_scheduling=async_scheduling, num_blocks=32, settings={"policy": "confidence"})
    add(s, {"other": {"policy": "none"}, "nothr": {"conf_window": 4},
            "unsure": {"conf_threshold": 2.0, "conf_window": 4}}, logprobs=2)
    done, _ = drive(s, in_flight=2 if async_scheduling else 1, rows={"other": UNSURE, "nothr": UNSURE, "unsure": UNSURE})
    assert done["other"] == FULL and done["nothr"] == FULL
    assert done["unsure"][:2] == ("stop", "pruned") and 4 <= done["unsure"][2] <= 6


# --------------------------------------------------------------------- groups and per-request settings
def test_the_children_of_one_request_form_its_group(build_scheduler):
    # vLLM names the children of an n > 1 request "{i}_{parent}": without a "group" they are
    # one problem each parent, so top_fraction keeps the better half of each parent's children.
    s = build_scheduler(async_scheduling=False, num_blocks=32,
                        settings={"policy": "top_fraction", "scorer": "unused", "threshold": 0.5, "keep_fraction": 0.5,
                        "keep_step": 3})
    add(s, {"0_P": {}, "1_P": {}, "0_Q_x": {}, "1_Q_x": {}})
    assert {s._sp_traces[r].group for r in s._sp_traces} == {"P", "Q_x"}
    done, _ = drive(s, in_flight=1, scores=const({"0_P": 0.9, "1_P": 0.1, "0_Q_x": 0.2, "1_Q_x": 0.15}))
    assert done["0_P"] == FULL and done["0_Q_x"] == FULL
    assert done["1_P"][:2] == ("stop", "pruned") and done["1_Q_x"][:2] == ("stop", "pruned")


def test_the_configured_aggregate_decides_the_threshold(build_scheduler):
    # One low step then high ones: the mean (0.63 after 3 steps) stays above 0.5, the minimum does not.
    dip_first = lambda r, k: 0.1 if k == 0 else 0.9  # noqa: E731
    for aggregate, pruned in (("mean", False), ("min", True)):
        s = build_scheduler(async_scheduling=False, num_blocks=32,
                            settings={"policy": "threshold", "scorer": "unused", "threshold": 0.5, "warmup_steps": 3,
                            "aggregate": aggregate})
        add(s, {"r": {}})
        done, _ = drive(s, in_flight=1, scores=dip_first)
        assert (done["r"][:2] == ("stop", "pruned")) is pruned, aggregate
        if pruned:
            assert done["r"][2] == 3


def test_the_configured_ema_alpha_decides_the_threshold(build_scheduler):
    # Three high steps, a dip of two, high again: an EMA with alpha 0.3 falls to 0.44 and prunes,
    # one with alpha 0.1 stays at 0.73 and keeps the trace.
    dip = lambda r, k: 0.0 if k in (3, 4) else 0.9  # noqa: E731
    for alpha, pruned in ((0.3, True), (0.1, False)):
        s = build_scheduler(async_scheduling=False, num_blocks=32,
                            settings={"policy": "threshold", "scorer": "unused", "threshold": 0.5, "warmup_steps": 3,
                            "aggregate": "ema", "ema_alpha": alpha})
        add(s, {"r": {}})
        done, _ = drive(s, in_flight=1, scores=dip)
        assert done["r"] == (("stop", "pruned", 5) if pruned else FULL), alpha


def test_a_request_may_widen_its_own_relative_margin(build_scheduler):
    # 0.7 is 0.2 below the best (0.9): the default margin 0.1 prunes it, a request's own 0.5 keeps it.
    s = build_scheduler(async_scheduling=False, num_blocks=32,
                        settings={"policy": "relative", "scorer": "unused", "threshold": 0.5, "warmup_steps": 2})
    add(s, {"best": {"group": "g"}, "wide": {"group": "g", "relative_margin": 0.5}, "plain": {"group": "g"}})
    assert s._sp_traces["wide"].relative_margin == 0.5 and s._sp_traces["plain"].relative_margin == 0.1
    done, _ = drive(s, in_flight=1, scores=const({"best": 0.9, "wide": 0.7, "plain": 0.7}))
    assert done["best"] == FULL and done["wide"] == FULL
    assert done["plain"][:2] == ("stop", "pruned")


# --------------------------------------------------------------------- confidence windows
SURE = [-0.1, -5.0, -5.0]  # confidence 5.0


def test_the_default_confidence_window_is_64_tokens(build_scheduler):
    # Unsure from the first token: judged once 64 confidences are in, so a 65-token request is
    # pruned after 64 tokens; a 64-token one ends by length before it can be.
    s = build_scheduler(async_scheduling=False, num_blocks=32, settings={"policy": "confidence"})
    add(s, {"long": {"conf_threshold": 2.0}, "short": {"conf_threshold": 2.0}}, logprobs=2,
        max_tokens={"long": 65, "short": 64})
    assert s._sp_traces["long"].conf_window == 64 and s._sp_traces["long"].conf.maxlen == 64
    done, _ = drive(s, in_flight=1, rows={"long": UNSURE, "short": UNSURE})
    assert done["long"] == ("stop", "pruned", 64) and done["short"] == ("length", None, 64)


@MODES
def test_the_confidence_window_slides(build_scheduler, async_scheduling):
    # Sure for 4 tokens, then unsure: the mean of the last 4 falls below 2.0 on the 3rd unsure
    # token (a mean over every token would take 16 more).
    s = build_scheduler(async_scheduling=async_scheduling, num_blocks=32, settings={"policy": "confidence"})
    add(s, {"r": {"conf_threshold": 2.0, "conf_window": 4}}, logprobs=2)
    done, _ = drive(s, in_flight=2 if async_scheduling else 1, rows=lambda r, k: SURE if k < 4 else UNSURE)
    assert done["r"][:2] == ("stop", "pruned") and 7 <= done["r"][2] <= 8


def test_confidence_reads_past_a_request_still_prefilling(build_scheduler):
    # "big"'s 100-token prompt takes four steps of a 32-token budget and samples nothing until
    # then; it comes first in the batch, and "unsure" behind it is still judged from its first token.
    s = build_scheduler(async_scheduling=False, num_blocks=32, batched_tokens=32,
                        settings={"policy": "confidence"})
    add(s, {"unsure": {"conf_threshold": 2.0, "conf_window": 4}, "big": {"conf_threshold": 2.0, "conf_window": 4}},
        logprobs=2, prompt={"big": 100})
    done, _ = drive(s, in_flight=1, rows={"unsure": UNSURE, "big": SURE}, reverse_batch=True, chunked=True)
    assert done["big"] == FULL
    assert done["unsure"] == ("stop", "pruned", 4)


# --------------------------------------------------------------------- a prune does not re-open a decision
def test_a_prune_does_not_reopen_its_groups_decision(build_scheduler):
    # top_fraction waits while "t" (threshold) is live in its group; "f0"/"f1" have their 3
    # steps, then no more. "t" is pruned by its threshold: unlike a trace finishing on its own,
    # that does not make the group's pending top_fraction decision, so "f1" is kept.
    s = build_scheduler(async_scheduling=False, num_blocks=32,
                        settings={"policy": "top_fraction", "scorer": "unused", "threshold": 0.5, "keep_fraction": 0.5,
                        "keep_step": 3, "warmup_steps": 5})
    add(s, {"f0": {"group": "g"}, "f1": {"group": "g"}, "t": {"group": "g", "policy": "threshold"}})
    table = {"f0": 0.9, "f1": 0.1}
    done, _ = drive(s, in_flight=1, scores=lambda r, k: 0.1 if r == "t" else (table[r] if k < 3 else None))
    assert done["t"] == ("stop", "pruned", 5)
    assert done["f0"] == FULL and done["f1"] == FULL
    assert s.stepprobe_counts["pruned"] == 1


# --------------------------------------------------------------------- preemption order
@MODES
def test_without_a_prunable_trace_vllm_preempts_whom_it_would_anyway(build_scheduler, async_scheduling):
    # The memory policy orders the running queue only to put its victims last; with none
    # (the memory trace is unscored), the untracked request and the memory one keep vLLM's
    # order, so the same request is preempted as under plain vLLM (no stepprobe policy).
    preempted = {}
    for policy in ("none", "memory"):
        s = build_scheduler(async_scheduling=async_scheduling, num_blocks=4,
                            settings={**MEM, "policy": policy})
        reqs = add(s, {"u": {"policy": "none", "group": "h"}, "m": {"group": "g"}})
        done, _ = drive(s, in_flight=2 if async_scheduling else 1)
        assert done == {"u": FULL, "m": FULL}
        preempted[policy] = {r: q.num_preemptions for r, q in reqs.items()}
    assert sum(preempted["none"].values()) > 0
    assert preempted["memory"] == preempted["none"]


@MODES
def test_reset_prefix_cache_drops_the_stale_output_of_what_it_preempts(build_scheduler, async_scheduling):
    s = build_scheduler(async_scheduling=async_scheduling, num_blocks=32, settings=MEM)
    reqs = add(s, {"a": {"group": "g"}, "b": {"group": "g"}})
    so = s.schedule()
    assert set(so.num_scheduled_tokens) == {"a", "b"}
    assert s.reset_prefix_cache(reset_running_requests=True)
    # Preempted (not pruned: that is only for lack of KV room inside schedule()), with their
    # in-flight output dropped as vLLM asked.
    assert s.stepprobe_counts == {"pruned": 0, "preempted": 2, "steps": 0}
    assert all(r.drop_stale_output is True and r.num_preemptions == 1 for r in reqs.values())
    assert not s.running and s._sp_live("a") and s._sp_live("b")


def test_a_request_waiting_for_remote_kv_keeps_its_blocks_when_aborted(build_scheduler):
    # vLLM frees an aborted request that still waits for a KV transfer with delay_free_blocks:
    # its blocks stay for the transfer; the trace is finished all the same.
    from vllm.v1.request import RequestStatus

    s = build_scheduler(async_scheduling=False, num_blocks=32, settings={"policy": "none"})
    reqs = add(s, {"a": {}})
    s.schedule()
    pool = s.kv_cache_manager.block_pool
    free = pool.get_num_free_blocks()
    reqs["a"].status = RequestStatus.WAITING_FOR_REMOTE_KVS
    s.running.remove(reqs["a"])
    s.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert not s._sp_live("a") and "a" in s.finished_req_ids
    assert pool.get_num_free_blocks() == free  # not freed yet
    s._free_blocks(reqs["a"])
    assert pool.get_num_free_blocks() > free


# --------------------------------------------------------------------- the same id again
def test_a_streaming_requests_next_chunk_replaces_its_trace(build_scheduler):
    # A resumable (streaming-input) request is added again under the same id for its next
    # chunk: one live trace, counted once, so the group is forgotten once it is aborted.
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT
    from vllm.v1.request import RequestStatus

    s = build_scheduler(async_scheduling=False, num_blocks=32,
                        settings={"policy": "threshold", "scorer": "unused", "threshold": 0.5})
    add(s, {"x": {"group": "g"}}, resumable=True)
    first = s._sp_traces["x"]
    s.schedule()
    add(s, {"x": {"group": "g"}}, resumable=True)
    assert s._sp_traces["x"] is not first and first.done and s._sp_live("x")
    _check_counters(s)
    assert s._sp_live_count["g"] == 1
    s.finish_requests("x", RequestStatus.FINISHED_ABORTED)
    s.update_from_output(s.schedule(), EMPTY_MODEL_RUNNER_OUTPUT)
    assert not s._sp_traces and not s._sp_groups and not s._sp_live_count


def test_a_streaming_request_moved_to_another_group_keeps_its_trace(build_scheduler):
    # The next chunk of "x" names another group: forgetting the old group (now without live
    # traces) must not forget "x"'s live trace in the new one, which is still judged.
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

    from vllm.v1.request import RequestStatus

    s = build_scheduler(async_scheduling=False, num_blocks=32,
                        settings={"policy": "threshold", "scorer": "unused", "threshold": 0.5})
    add(s, {"x": {"group": "a"}}, resumable=True)
    s.schedule()
    add(s, {"x": {"group": "b"}}, resumable=True)
    s.update_from_output(s.schedule(), EMPTY_MODEL_RUNNER_OUTPUT)
    assert "a" not in s._sp_groups
    assert s._sp_live("x") and s._sp_traces["x"].group == "b"
    _check_counters(s)
    # Once more, the old group still live when the new one is forgotten, then forgotten too.
    add(s, {"y": {"group": "c"}, "z": {"group": "c"}}, resumable=True)
    s.schedule()
    add(s, {"y": {"group": "d"}}, resumable=True)
    s.finish_requests(["x", "y"], RequestStatus.FINISHED_ABORTED)
    s.update_from_output(s.schedule(), EMPTY_MODEL_RUNNER_OUTPUT)
    assert set(s._sp_groups) == {"c"} and set(s._sp_traces) == {"z"}
    s.finish_requests("z", RequestStatus.FINISHED_ABORTED)
    s.update_from_output(s.schedule(), EMPTY_MODEL_RUNNER_OUTPUT)
    assert not s._sp_traces and not s._sp_groups and not s._sp_live_count
