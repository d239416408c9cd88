"""How every stage starts and stops vLLM, in one place.

:func:`engine_kwargs` turns a config's :class:`~stepprobe.options.EngineOptions` into
``vllm.LLM`` / ``EngineArgs`` keyword arguments (with ``engine_args`` passed through after
:func:`check_engine_args`), :func:`make_llm` starts an engine with them, :func:`shutdown` stops one,
and :func:`engine_cli_args` writes the same settings as ``vllm serve`` flags. ``collect``,
``run``, ``bench``, ``serve`` and the benchmarks all go through here.
:func:`prepare_engine` starts the watchdog that stops the engine's processes when the
command dies (:mod:`stepprobe.lifetime`), and sets what the engine reads from the environment:

- CPU cores: vLLM's CPU backend (``VLLM_CPU_OMP_THREADS_BIND=auto``) keeps one core for the
  front-end process; on a 2-core machine that halves generation. Measured here
  (SmolLM2-135M, 32 prompts x 8 samples x 96 tokens, bf16, eager): 584 tok/s with the
  default, 869 tok/s with ``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` (1.49x). A value the user set
  wins.
- KV cache, ``kv_cache_gib`` (GiB, the same name in every stage): on CPU it becomes
  ``VLLM_CPU_KVCACHE_SPACE`` (whole GiB, rounded up: vLLM reads it as an integer, and the
  variable, when set, overrides ``kv_cache_memory_bytes``); on a GPU it becomes
  ``kv_cache_memory_bytes``. Unset on CPU, stepprobe uses ``CPU_DEFAULT_KV_GIB`` unless the
  variable is already set (vLLM's own default asks for most of the machine's free memory
  and refuses to start when other processes hold some of it); unset on a GPU, vLLM's
  ``gpu_memory_utilization`` decides.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import json
from typing import Any, Iterator, Mapping, Sequence

from .errors import StepprobeError

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_GIB = 2


def use_all_cpu_cores() -> None:
    """Let vLLM's CPU engine use every core (see the module docstring)."""
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def prepare_engine(kv_cache_gib: float | None = None, *, cpu_default_gib: int | None = CPU_DEFAULT_KV_GIB) -> dict[str, Any]:
    """Set the environment the engine reads and return extra ``vllm.LLM`` keyword arguments."""
    from vllm.platforms import current_platform

    from .lifetime import guard_children

    if kv_cache_gib is not None and not kv_cache_gib > 0:
        raise StepprobeError(f"kv_cache_gib must be positive, got {kv_cache_gib}")
    guard_children()  # the engine's processes end with this command, however it ends
    if current_platform.is_cpu():
        use_all_cpu_cores()
        if kv_cache_gib is not None:
            # Read when the engine starts (the engine core process inherits it).
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(math.ceil(kv_cache_gib))))
        elif cpu_default_gib is not None and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cpu_default_gib)
            log.info("VLLM_CPU_KVCACHE_SPACE not set; using %d GiB for the KV cache", cpu_default_gib)
        return {}
    if kv_cache_gib is not None:
        return {"kv_cache_memory_bytes": int(kv_cache_gib * (1 << 30))}
    return {}


# Engine arguments stepprobe sets itself: an ``engine_args`` entry may not set them.
OWN_ENGINE_ARGS = {
    "model": "model", "seed": "seed", "dtype": "dtype", "max_model_len": "max_model_len",
    "num_gpu_blocks_override": "num_kv_blocks", "max_num_seqs": "max_num_seqs", "enforce_eager": "enforce_eager",
    "kv_cache_memory_bytes": "kv_cache_gib", "worker_cls": "the plugin", "scheduler_cls": "the plugin",
    "additional_config": "the plugin",
}


def engine_arg_names() -> set[str]:
    """The fields of vLLM's ``EngineArgs`` (what ``vllm.LLM`` and ``vllm serve`` accept)."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    return {f.name for f in dataclasses.fields(EngineArgs)}


def check_engine_args(engine_args: Mapping[str, Any] | None) -> None:
    """Refuse, in one line, ``engine_args`` keys vLLM does not know or stepprobe sets itself."""
    if not engine_args:
        return
    if not isinstance(engine_args, Mapping):
        raise StepprobeError(f"engine_args must be a mapping of vLLM engine arguments, got {engine_args!r}")
    own = sorted(k for k in engine_args if k in OWN_ENGINE_ARGS)
    if own:
        raise StepprobeError("engine_args: " + ", ".join(f"{k} is set by {OWN_ENGINE_ARGS[k]}" for k in own))
    unknown = sorted(set(engine_args) - engine_arg_names())
    if unknown:
        raise StepprobeError(f"engine_args: unknown vLLM engine argument(s) {', '.join(unknown)} "
                             "(see vllm.engine.arg_utils.EngineArgs)")
    dp = int(engine_args.get("data_parallel_size") or 1)
    if dp > 1 and engine_args.get("distributed_executor_backend") != "external_launcher":
        # vllm.LLM raises ValueError for this once the model path is resolved (entrypoints/llm.py)
        raise StepprobeError(f"engine_args: data_parallel_size={dp}: vLLM's offline engine (vllm.LLM) runs one "
                             "data-parallel rank per process; run one stepprobe process per replica, each on its "
                             "own share of the problems, or use tensor_parallel_size")


def engine_kwargs(options: Any, *, seed: int = 0) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments (without the model) for a config with
    :class:`~stepprobe.options.EngineOptions`. Sets the environment the engine reads."""
    check_engine_args(options.engine_args)
    kwargs: dict[str, Any] = {"seed": seed, "dtype": options.dtype, "enforce_eager": bool(options.enforce_eager)}
    if options.max_model_len:
        kwargs["max_model_len"] = int(options.max_model_len)
    if options.num_kv_blocks is not None:
        kwargs["num_gpu_blocks_override"] = int(options.num_kv_blocks)
    if options.max_num_seqs is not None:
        kwargs["max_num_seqs"] = int(options.max_num_seqs)
    kwargs.update(prepare_engine(options.kv_cache_gib))
    kwargs.update(options.engine_args or {})
    return kwargs


def make_llm(model_path: str, kwargs: Mapping[str, Any]):
    """Start a ``vllm.LLM``: the one place an engine starts (``collect``, the runner of ``run``,
    ``bench`` and ``serve``'s checks, the tests). ``kwargs``: from :func:`engine_kwargs` (which
    prepared the environment the engine reads), plus what the caller adds (the plugin's)."""
    from vllm import LLM

    log.info("starting vLLM on %s", model_path)
    note_compile(bool(kwargs.get("enforce_eager")))
    return LLM(model=model_path, **kwargs)


def stream_requests(llm: Any, prompts: Sequence[Any], params: Any) -> Iterator[list[tuple[int, Any]]]:
    """Generate like ``llm.generate(prompts, params)``, but hand back each prompt's output as
    soon as it finishes: all prompts are queued at once (``LLM.enqueue``: they share the batch
    and the KV cache exactly as in ``generate``) and the engine is stepped by
    :func:`finished_outputs`. Yields, after every engine step that finished some prompts,
    ``[(prompt index, RequestOutput), ...]`` in prompt order (an ``n > 1`` request finishes
    when the last of its ``n`` samples does). A caller that stops early, or an exception,
    aborts the prompts still in the engine."""
    ids = llm.enqueue(list(prompts), params, use_tqdm=False)
    index = {client_request_id(rid): k for k, rid in enumerate(ids)}
    with contextlib.closing(finished_outputs(llm, {client_request_id(rid): rid for rid in ids})) as steps:
        for outs in steps:
            yield sorted((index[o.request_id], o) for o in outs)


def finished_outputs(llm: Any, wanted: dict[str, str]) -> Iterator[list[Any]]:
    """Step the engine until every request in ``wanted`` (client request id -> vLLM's internal
    id, as ``LLM.enqueue`` returns it; the caller may add requests while iterating) has
    finished, yielding after each step that finished some of them their outputs (each removed
    from ``wanted`` first). A caller that stops early, or an exception (an interrupt), aborts
    the requests still wanted, so a shared engine is left empty."""
    engine = llm.llm_engine
    try:
        while wanted:
            if not engine.has_unfinished_requests():
                raise StepprobeError(f"the engine stopped with {len(wanted)} requests unreported "
                                     "(request ids not matched: vLLM internals changed?)")
            done = [o for o in engine.step() if getattr(o, "finished", False) and o.request_id in wanted]
            for o in done:
                del wanted[o.request_id]
            if done:
                yield done
    finally:
        if wanted:
            left, _ = list(wanted.values()), wanted.clear()
            try:
                engine.abort_request(left, internal=True)
            except Exception as exc:  # noqa: BLE001 - the engine may be gone already
                log.debug("abort after an interrupted generation: %s", exc)


def client_request_id(internal_id: str) -> str:
    """vLLM's internal request id -> the client's (vLLM appends ``-<8 chars>`` unless request
    id randomization is disabled)."""
    base, sep, tail = internal_id.rpartition("-")
    return base if sep and len(tail) == 8 else internal_id


def output_tokens_in_flight(llm: Any) -> int | None:
    """Output tokens the engine holds for requests not yet handed back: running and
    waiting requests, and the finished samples of ``n > 1`` requests whose other samples still
    run. Reads the front end's request states (vLLM internals); ``None`` where they are not
    there."""
    try:
        proc = llm.llm_engine.output_processor
        total = sum(len(s.detokenizer.output_token_ids) for s in proc.request_states.values()
                    if s.detokenizer is not None)
        for parent in proc.parent_requests.values():
            total += sum(len(c.token_ids) for c in getattr(parent, "output_aggregator", None) or [] if c is not None)
        return int(total)
    except Exception:  # noqa: BLE001 - another vLLM version: the caller falls back
        return None


def shutdown(llm: Any) -> None:
    """Stop an engine's core process now instead of whenever the garbage collector gets to it."""
    if llm is None:
        return
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as exc:  # noqa: BLE001 - best effort at teardown
        log.debug("engine shutdown: %s", exc)


def engine_cli_args(kwargs: Mapping[str, Any]) -> list[str]:
    """The ``vllm serve`` flags for engine keyword arguments (``--max-model-len 2048`` ...)."""
    argv: list[str] = []
    for k, v in kwargs.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            argv.append(flag if v else "--no-" + k.replace("_", "-"))
        elif isinstance(v, (dict, list)):
            argv += [flag, json.dumps(v)]
        elif v is not None:
            argv += [flag, str(v)]
    return argv


def kv_block_size() -> int:
    """The KV block size vLLM picks on this platform for ordinary (non-MLA) attention:
    128 tokens on CPU, 16 on a GPU (vLLM's defaults when none is given)."""
    from vllm.platforms import current_platform

    return 128 if current_platform.is_cpu() else 16


def check_kv_budget(num_kv_blocks: int | None, max_model_len: int | None, *, flag: str = "--num-kv-blocks") -> None:
    """Refuse, before the engine starts, a KV budget that cannot hold one sequence of
    ``max_model_len`` tokens (vLLM would refuse it after loading the model, in a long
    traceback that suggests a flag stepprobe does not have)."""
    if num_kv_blocks is None:
        return
    if num_kv_blocks < 1:
        raise StepprobeError(f"{flag} must be at least 1, got {num_kv_blocks}")
    if not max_model_len:  # the model's own context length: known only once vLLM reads the config
        return
    block = kv_block_size()
    if num_kv_blocks * block < max_model_len:
        need = -(-max_model_len // block)
        raise StepprobeError(
            f"{flag} {num_kv_blocks} holds {num_kv_blocks * block} tokens ({block}-token blocks), fewer than "
            f"--max-model-len {max_model_len}; give {flag} {need} or more, or a smaller --max-model-len")


_COMPILE_NOTED = False


def note_compile(enforce_eager: bool) -> None:
    """Say once, before a compiled CPU engine starts, that compilation takes a while."""
    global _COMPILE_NOTED
    from vllm.platforms import current_platform

    if enforce_eager or _COMPILE_NOTED or not current_platform.is_cpu():
        return
    _COMPILE_NOTED = True
    log.info("vLLM compiles the model before the first generation (on CPU this can take minutes, less when "
             "its compile cache is warm); --enforce-eager skips compilation and starts at once, at lower speed")


def check_context(prompt_lens: list[int], max_tokens: int, max_model_len: int | None, what: str = "prompts") -> None:
    """Refuse prompts that do not fit ``max_model_len`` at all, and warn (once) when prompt +
    ``max_tokens`` exceeds it: vLLM then stops those traces at ``max_model_len`` total tokens
    with finish reason ``length``, earlier than ``--max-tokens`` says, without a word."""
    if not max_model_len or not prompt_lens:
        return
    longest = max(prompt_lens)
    if longest >= max_model_len:
        raise StepprobeError(f"{sum(p >= max_model_len for p in prompt_lens)} of {len(prompt_lens)} {what} have "
                             f"{max_model_len} or more tokens (longest {longest}), no room to generate; raise "
                             f"--max-model-len above {longest + max_tokens}")
    over = [p for p in prompt_lens if p + max_tokens > max_model_len]
    if over:
        log.warning("%d of %d %s (longest %d tokens) + --max-tokens %d exceed --max-model-len %d: their traces "
                    "stop at %d total tokens (as few as %d generated); raise --max-model-len to %d or lower "
                    "--max-tokens", len(over), len(prompt_lens), what, longest, max_tokens, max_model_len,
                    max_model_len, max_model_len - longest, longest + max_tokens)
