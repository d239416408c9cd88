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

BLOCK = 16
PROMPT = 8
MAX_TOKENS = 24  # 32 tokens = two blocks per request; four requests need 8 blocks
NUM_BLOCKS = 7


def make_scheduler(model_path: str, *, async_scheduling: bool, settings: dict):
    import torch
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from stepprobe.inference.scheduler import StepprobeScheduler

    sched = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=256, max_model_len=256,
                            enable_chunked_prefill=True, is_encoder_decoder=False)
    cache = CacheConfig(block_size=BLOCK)
    config = VllmConfig(scheduler_config=sched, model_config=ModelConfig(model=model_path, dtype="float32", seed=0),
                        cache_config=cache, additional_config={"stepprobe": settings})
    config.scheduler_config.async_scheduling = async_scheduling  # the CPU platform forces it off
    cache.num_gpu_blocks = NUM_BLOCKS
    kv = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(
        ["layer"], FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=32, dtype=torch.float32))])
    return StepprobeScheduler(config, kv_cache_config=kv, structured_output_manager=StructuredOutputManager(config),
                              block_size=BLOCK, log_stats=True)


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
def test_memory_policy_prunes_lowest_instead_of_preempting(tiny_model_path, async_scheduling):
    s = make_scheduler(tiny_model_path, async_scheduling=async_scheduling,
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
def test_policy_none_preempts_and_still_finishes_everything(tiny_model_path, async_scheduling):
    s = make_scheduler(tiny_model_path, async_scheduling=async_scheduling, settings={"policy": "none"})
    add_requests(s, 4, {"group": "g"})
    done = drive(s, SCORES, in_flight=2 if async_scheduling else 1)
    assert all(done[r] == ("length", None, MAX_TOKENS) for r in SCORES)
    assert s.stepprobe_counts["preempted"] > 0 and s.stepprobe_counts["pruned"] == 0


def test_threshold_policy_under_async_scheduling(tiny_model_path):
    s = make_scheduler(tiny_model_path, async_scheduling=True,
                       settings={"policy": "threshold", "scorer": "unused", "threshold": 0.5, "warmup_steps": 3})
    add_requests(s, 2, {"group": "t"})
    done = drive(s, {"r0": 0.9, "r1": 0.2}, in_flight=2)
    assert done["r0"] == ("length", None, MAX_TOKENS)
    assert done["r1"][:2] == ("stop", "pruned") and 3 <= done["r1"][2] < MAX_TOKENS
