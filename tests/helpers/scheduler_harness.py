"""The one builder of the pruning scheduler for the scheduler tests (no engine): vLLM's real
``Scheduler`` or ``AsyncScheduler`` (``async_scheduling``) from a real ``VllmConfig``, with the
``stepprobe`` settings given and a KV cache of ``num_blocks`` blocks of :data:`BLOCK` tokens.
Tests take it as the ``build_scheduler`` fixture (conftest.py), bound to the tiny model;
:func:`engine_core_loop` steps it as vLLM's engine core does."""

from __future__ import annotations

from collections import deque

BLOCK = 16
PROMPT = 8
MAX_TOKENS = 24  # 32 tokens = two blocks per request; four requests need 8 blocks
NUM_BLOCKS = 7


def build_scheduler(model_path: str, *, async_scheduling: bool, settings: dict, num_blocks: int = NUM_BLOCKS,
                    groups: int = 1, watermark: float = 0.0, log_stats: bool = True, positional: bool = False,
                    batched_tokens: int = 256):
    """``groups``: KV-cache groups; ``positional``: pass vLLM's constructor arguments by position."""
    import torch
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from stepprobe.inference.scheduler import StepprobeScheduler

    # These tests pin the mechanics of the paper's memory rule; the risk-controlled default
    # (a cutoff from the scorer's trust.json, nothing pruned without one) has its own tests.
    settings = {"max_accuracy_loss": None, **settings}
    sched = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=batched_tokens, max_model_len=256,
                            enable_chunked_prefill=True, is_encoder_decoder=False, watermark=watermark)
    cache = CacheConfig(block_size=BLOCK)
    config = VllmConfig(scheduler_config=sched, model_config=ModelConfig(model=model_path, dtype="float32", seed=0),
                        cache_config=cache, additional_config={"stepprobe": settings})
    config.scheduler_config.async_scheduling = async_scheduling  # the CPU platform forces it off
    cache.num_gpu_blocks = num_blocks
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=32, dtype=torch.float32)
    kv = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                       kv_cache_groups=[KVCacheGroupSpec([f"layer{i}"], spec) for i in range(groups)])
    som = StructuredOutputManager(config)
    if positional:
        return StepprobeScheduler(config, kv, som, BLOCK, None)
    return StepprobeScheduler(config, kv_cache_config=kv, structured_output_manager=som, block_size=BLOCK,
                              log_stats=log_stats)


def engine_core_loop(scheduler, complete, in_flight: int, at_step: dict | None = None) -> None:
    """Step ``scheduler`` as vLLM's engine core does: ``schedule()``, and hand each step's output
    to ``complete`` once ``in_flight`` steps are scheduled (1: the synchronous core; 2: the
    async one, whose next step is scheduled before the previous output arrives). ``at_step``:
    callables run before the step of that index."""
    pending: deque = deque()
    for i in range(1000):
        if not scheduler.has_requests():
            break
        if at_step and i in at_step:
            at_step[i]()
        so = scheduler.schedule()
        if so.total_num_scheduled_tokens:
            pending.append(so)
            if len(pending) >= in_flight:
                complete(pending.popleft())
        else:
            while pending:
                complete(pending.popleft())
            complete(so)  # the engine core also updates after an empty step (a prune's output)
    else:
        raise AssertionError("the scheduler never finished its requests")
    while pending:
        complete(pending.popleft())
