"""The pruning scheduler on its own, synchronous and **async** (vLLM's GPU default).

The CPU build of vLLM always turns async scheduling off, so no engine here can run
``StepprobeAsyncScheduler``. These tests build vLLM's real scheduler classes from a real
``VllmConfig`` and drive them the way vLLM's engine core does with async scheduling: the
next step is scheduled while the previous one is still "in flight", and each step's model
runner output (one sampled token per request, plus the step scores the worker would attach)
comes back one step late. That is the accounting the async path must survive (in-flight
tokens, output placeholders, a pruned request whose last token is still on its way).
"""

from __future__ import annotations

from collections import deque

import pytest

from helpers.scheduler_harness import BLOCK, MAX_TOKENS, PROMPT


def add_requests(scheduler, n: int, extra: dict) -> None:
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    hasher = get_request_block_hasher(BLOCK, sha256)
    for i in range(n):
        sp = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, extra_args={"stepprobe": dict(extra)})
        scheduler.add_request(Request(request_id=f"r{i}", prompt_token_ids=[100 + i] * PROMPT, sampling_params=sp,
                                      pooling_params=None, block_hasher=hasher))


def drive(scheduler, scores: dict[str, float], *, in_flight: int) -> dict[str, tuple]:
    """Run to completion with ``in_flight`` steps outstanding (2 = async engine core, 1 = sync);
    every token is a step boundary scored ``scores[req_id]``. Returns each request's
    (finish_reason, stop_reason, tokens delivered)."""
    from vllm.v1.outputs import ModelRunnerOutput

    pending: deque = deque()
    done: dict[str, tuple] = {}
    tokens: dict[str, int] = {}

    def complete(so):
        rids = list(so.num_scheduled_tokens)
        mro = ModelRunnerOutput(req_ids=rids, req_id_to_index={r: k for k, r in enumerate(rids)},
                                sampled_token_ids=[[5] for _ in rids])
        mro.stepprobe_steps = {r: [[0, scores[r]]] for r in rids}
        for eco in scheduler.update_from_output(so, mro).values():
            for o in eco.outputs:
                tokens[o.request_id] = tokens.get(o.request_id, 0) + len(o.new_token_ids)
                if o.finish_reason is not None:
                    done[o.request_id] = (str(o.finish_reason), o.stop_reason, tokens[o.request_id])

    for _ in range(1000):
        if not scheduler.has_requests():
            break
        so = scheduler.schedule()
        if so.total_num_scheduled_tokens:
            pending.append(so)
        if pending and (len(pending) >= in_flight or not so.total_num_scheduled_tokens):
            complete(pending.popleft())
    else:
        raise AssertionError("the scheduler never finished its requests")
    while pending:
        complete(pending.popleft())
    return done


SCORES = {"r0": 0.9, "r1": 0.8, "r2": 0.7, "r3": 0.1}


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_memory_policy_prunes_lowest_instead_of_preempting(build_scheduler, async_scheduling):
    s = build_scheduler(async_scheduling=async_scheduling,
                        settings={"policy": "memory", "scorer": "unused", "threshold": 0.5})
    assert type(s).__name__ == ("StepprobeAsyncScheduler" if async_scheduling else "StepprobeScheduler")
    add_requests(s, 4, {"group": "g"})
    done = drive(s, SCORES, in_flight=2 if async_scheduling else 1)
    assert done["r3"][:2] == ("stop", "pruned")
    assert 0 < done["r3"][2] < MAX_TOKENS  # partial output came back
    assert all(done[r] == ("length", None, MAX_TOKENS) for r in ("r0", "r1", "r2"))
    assert s.stepprobe_counts["pruned"] == 1 and s.stepprobe_counts["preempted"] == 0
    assert not s.requests and not s.running and not s._sp_traces  # nothing leaks


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_policy_none_preempts_and_still_finishes_everything(build_scheduler, async_scheduling):
    s = build_scheduler(async_scheduling=async_scheduling, settings={"policy": "none"})
    add_requests(s, 4, {"group": "g"})
    done = drive(s, SCORES, in_flight=2 if async_scheduling else 1)
    assert all(done[r] == ("length", None, MAX_TOKENS) for r in SCORES)
    assert s.stepprobe_counts["preempted"] > 0 and s.stepprobe_counts["pruned"] == 0


def test_threshold_policy_under_async_scheduling(build_scheduler):
    s = build_scheduler(async_scheduling=True,
                        settings={"policy": "threshold", "scorer": "unused", "threshold": 0.5, "warmup_steps": 3})
    add_requests(s, 2, {"group": "t"})
    done = drive(s, {"r0": 0.9, "r1": 0.2}, in_flight=2)
    assert done["r0"] == ("length", None, MAX_TOKENS)
    assert done["r1"][:2] == ("stop", "pruned") and 3 <= done["r1"][2] < MAX_TOKENS


def add_grouped(scheduler, requests: list[tuple[str, str]], extra: dict | None = None) -> None:
    """Add requests ``(request_id, group)`` in this order (the last one is vLLM's default victim)."""
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    hasher = get_request_block_hasher(BLOCK, sha256)
    for i, (rid, group) in enumerate(requests):
        sp = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True,
                            extra_args={"stepprobe": {"group": group, **(extra or {})}})
        scheduler.add_request(Request(request_id=rid, prompt_token_ids=[100 + i] * PROMPT, sampling_params=sp,
                                      pooling_params=None, block_hasher=hasher))


# Problem B is easy (its traces score high), A is hard. Added B first, so A's last trace is
# both the lowest overall and the last added (vLLM's own victim).
GROUPED = [("b0", "B"), ("b1", "B"), ("a0", "A"), ("a1", "A")]
GROUPED_SCORES = {"b0": 0.9, "b1": 0.5, "a0": 0.30, "a1": 0.25}


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("rule,victim", [("score", "a1"), ("group_gap", "b1"), ("group_largest", "b1")])
def test_memory_victim_rule_picks_within_its_own_problem(build_scheduler, async_scheduling, rule, victim):
    s = build_scheduler(async_scheduling=async_scheduling,
                        settings={"policy": "memory", "scorer": "unused", "threshold": 0.5, "memory_victim": rule})
    add_grouped(s, GROUPED)
    done = drive(s, GROUPED_SCORES, in_flight=2 if async_scheduling else 1)
    assert done[victim][:2] == ("stop", "pruned") and 0 < done[victim][2] < MAX_TOKENS
    assert all(done[r] == ("length", None, MAX_TOKENS) for r in GROUPED_SCORES if r != victim)
    assert s.stepprobe_counts["pruned"] == 1 and s.stepprobe_counts["preempted"] == 0
    if rule != "score":
        # The lowest of its own problem (0.5 < 0.9), not the lowest overall, not the last added.
        assert victim != GROUPED[-1][0] and GROUPED_SCORES[victim] > min(GROUPED_SCORES.values())
    assert not s.requests and not s._sp_traces


SIX = [("a0", "A"), ("a1", "A"), ("a2", "A"), ("b0", "B"), ("b1", "B"), ("b2", "B")]
SIX_SCORES = {"a0": 0.9, "a1": 0.8, "a2": 0.5, "b0": 0.3, "b1": 0.25, "b2": 0.2}


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_min_live_holds_under_memory_pressure(build_scheduler, async_scheduling):
    """Six traces need 12 blocks, 7 exist: three must go. With min_live=2 each problem gives up
    one trace (its lowest: a2 scores above all of B), then vLLM preempts instead."""
    s = build_scheduler(async_scheduling=async_scheduling, num_blocks=7,
                        settings={"policy": "memory", "scorer": "unused", "threshold": 0.5,
                        "memory_victim": "group_gap", "min_live": 2})
    add_grouped(s, SIX)
    done = drive(s, SIX_SCORES, in_flight=2 if async_scheduling else 1)
    pruned = {r for r, d in done.items() if d[1] == "pruned"}
    assert pruned == {"a2", "b2"}
    for g in "ab":
        assert sum(done[f"{g}{i}"] == ("length", None, MAX_TOKENS) for i in range(3)) == 2
    assert s.stepprobe_counts["preempted"] > 0  # the third victim was preempted, not pruned
    assert not s.requests and not s._sp_traces


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_relative_policy_and_min_live_for_flagged_prunes(build_scheduler, async_scheduling):
    """Relative: a2 and a1 fall more than 0.1 below a0; B's traces are within 0.1 of each other.
    min_live=2 lets A lose only one, its lowest."""
    s = build_scheduler(async_scheduling=async_scheduling, num_blocks=32,
                        settings={"policy": "relative", "scorer": "unused", "threshold": 0.5, "relative_margin": 0.1,
                        "warmup_steps": 2, "min_live": 2})
    add_grouped(s, [("a0", "A"), ("a1", "A"), ("a2", "A"), ("b0", "B"), ("b1", "B")])
    done = drive(s, {"a0": 0.9, "a1": 0.7, "a2": 0.6, "b0": 0.3, "b1": 0.25}, in_flight=2 if async_scheduling else 1)
    assert done["a2"][:2] == ("stop", "pruned") and 2 <= done["a2"][2] < MAX_TOKENS
    assert all(done[r] == ("length", None, MAX_TOKENS) for r in ("a0", "a1", "b0", "b1"))


def test_threshold_policy_keeps_min_live_per_request_override(build_scheduler):
    """min_live applies to every policy and a request may set it: both traces are below the
    threshold, one is kept."""
    s = build_scheduler(async_scheduling=True, num_blocks=32,
                        settings={"policy": "threshold", "scorer": "unused", "threshold": 0.5, "warmup_steps": 2})
    add_grouped(s, [("t0", "T"), ("t1", "T")], extra={"min_live": 1})
    done = drive(s, {"t0": 0.2, "t1": 0.1}, in_flight=2)
    assert done["t1"][:2] == ("stop", "pruned") and done["t0"] == ("length", None, MAX_TOKENS)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_memory_policy_orders_running_only_when_a_preemption_is_possible(build_scheduler, async_scheduling,
                                                                          monkeypatch):
    """Ordering every running trace each step costs O(running); it is skipped while the free KV
    blocks cover the most one step can allocate, and done as soon as they may not."""
    import stepprobe.inference.scheduler as S

    calls = []
    real = S.memory_victim_keys
    monkeypatch.setattr(S, "memory_victim_keys", lambda *a, **k: calls.append(1) or real(*a, **k))
    mem = {"policy": "memory", "scorer": "unused", "threshold": 0.5}
    roomy = build_scheduler(async_scheduling=async_scheduling, settings=mem, num_blocks=200)
    add_requests(roomy, 4, {"group": "g"})
    for _ in range(3):
        roomy.schedule()
    assert roomy._sp_may_preempt() is False and calls == []
    tight = build_scheduler(async_scheduling=async_scheduling, settings=mem)
    add_requests(tight, 4, {"group": "g"})
    tight.schedule()
    assert tight._sp_may_preempt() is True
    tight.schedule()
    assert calls, "a step that may preempt must order the running traces"
