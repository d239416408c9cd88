"""How stepprobe plugs into an unmodified vLLM: three engine arguments, no fork.

- ``worker_cls = "stepprobe.inference.worker.StepprobeWorker"``: the platform's own worker
  (CPU or CUDA) plus, right after the model is loaded and **before** vLLM compiles it,
  capture hooks on the scorer's sites; after every step it scores the new step
  boundaries and hangs the scores on the model runner's output.
- ``scheduler_cls = "stepprobe.inference.scheduler.StepprobeScheduler"``: vLLM's own
  scheduler (the async one when async scheduling is on) that prunes traces by score.
- ``additional_config = {"stepprobe": {...}}``: the settings below, seen by both.

With ``vllm serve``::

    vllm serve MODEL --worker-cls stepprobe.inference.worker.StepprobeWorker \\
        --scheduler-cls stepprobe.inference.scheduler.StepprobeScheduler \\
        --additional-config '{"stepprobe": {"scorer": "/path/to/scorer", "policy": "memory"}}'

:func:`serve_args` prints exactly these flags for a settings object. A request may override
the policy with ``SamplingParams(extra_args={"stepprobe": {"policy": "none"}})`` (over HTTP:
``"vllm_xargs": {"stepprobe_policy": "none"}``).

These scheduler and worker hooks are vLLM internals ("not public" in vLLM's words); the
versions they were tested with are pinned in ``TESTED_VLLM`` and a different version logs
a warning at start-up.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from typing import Any, Mapping

from stepprobe.config import stage_defaults
from stepprobe.errors import StepprobeError
from stepprobe.options import AGGREGATES, POLICIES, PolicyOption, PruningOptions, check_policy  # noqa: F401

log = logging.getLogger(__name__)

KEY = "stepprobe"
WORKER_CLS = "stepprobe.inference.worker.StepprobeWorker"
SCHEDULER_CLS = "stepprobe.inference.scheduler.StepprobeScheduler"
TESTED_VLLM = ("0.32.0",)

@dataclasses.dataclass
@stage_defaults(policy="none")
class PluginSettings(PruningOptions, PolicyOption):
    """What the worker and scheduler read from ``additional_config["stepprobe"]``: the
    pruning group of :mod:`stepprobe.options` (``scorer``, ``policy``, ``aggregate``, ...;
    described in ``docs/options.md``) and three switches of its own.

    - ``policy``: default pruning policy of requests (a request can override it):
      ``none`` (plain self-consistency), ``memory`` (when the KV cache cannot hold the next
      step, finish the lowest-scoring trace instead of preempting), ``threshold`` (finish a
      trace whose score is below ``threshold`` after ``warmup_steps`` steps),
      ``top_fraction`` (when every running trace of a group has ``keep_step`` steps, keep the
      best ``keep_fraction`` of them), ``confidence`` (the DeepConf-style baseline: finish a
      trace when the mean token confidence over its last ``conf_window`` tokens falls below
      the request's ``conf_threshold``; needs ``logprobs`` in the request), ``relative`` (the
      within-problem threshold: finish a trace whose score is more than ``relative_margin``
      below the best other live trace of its problem, after ``warmup_steps`` steps).
    - ``memory_victim``: which trace the memory policy finishes when the KV cache is full:
      ``score`` (the paper's: the lowest score over all running traces, whatever their problem),
      ``group_gap`` (the trace furthest below the best live trace of its own problem),
      ``group_largest`` (the lowest trace of the problem with the most live traces). It compares
      problems with each other, so it is an engine setting, not a per-request one.
    - ``min_live``: every policy leaves each group (problem) at least this many live traces;
      a prune that would go below it is not carried out (the memory policy then preempts as
      vLLM would). A request may set its own (``extra_args``), as it may ``relative_margin``.
    - ``protect_last``: never prune the last live trace of a group under the memory policy
      (the memory policy's ``min_live`` is at least 1 while it is on).
    - ``keep_records``: the worker keeps every request's step scores until the client takes
      them (``collective_rpc("stepprobe_take_records")``); off for a server.
    - ``record_features``: also keep the raw features (parity tests, debugging).
    - ``canary``: the client runs a start-up self-test generation (see runner.py).
    """

    keep_records: bool = False
    record_features: bool = False
    canary: bool = True

    def check(self) -> None:
        if self.policy not in ("none", "confidence") and not self.scorer:
            raise StepprobeError(f"policy {self.policy!r} needs a scorer (give --scorer DIR)")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> "PluginSettings":
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise StepprobeError(f"unknown stepprobe setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> "PluginSettings":
        extra = getattr(vllm_config, "additional_config", None) or {}
        if not isinstance(extra, Mapping):
            return cls()
        return cls.from_mapping(extra.get(KEY))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def install_kwargs(settings: PluginSettings) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` / ``EngineArgs`` that install the plugin."""
    return {
        "worker_cls": WORKER_CLS,
        "scheduler_cls": SCHEDULER_CLS,
        "additional_config": {KEY: settings.to_dict()},
    }


def serve_args(settings: PluginSettings) -> list[str]:
    """The ``vllm serve`` flags for these settings (after ``vllm serve MODEL``)."""
    return ["--worker-cls", WORKER_CLS, "--scheduler-cls", SCHEDULER_CLS,
            "--additional-config", json.dumps({KEY: settings.to_dict()})]


def request_overrides(sampling_params: Any) -> dict[str, Any]:
    """Per-request settings from ``SamplingParams.extra_args`` (nested or ``stepprobe_*`` keys)."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    out = dict(extra.get(KEY) or {}) if isinstance(extra.get(KEY), Mapping) else {}
    for k, v in extra.items():
        if k.startswith(KEY + "_"):
            out[k[len(KEY) + 1:]] = v
    return out


_CHILD_RE = re.compile(r"^\d+_(.+)$")  # vLLM's child of an n > 1 request (vllm/v1/engine/parallel_sampling.py)


def request_group(request_id: str, overrides: Mapping[str, Any]) -> str:
    """The group (problem) of a request, for the scheduler's group rules and the worker's group
    features: its ``extra_args`` ``group``, else the parent of an ``n > 1`` child (vLLM names the
    children ``{i}_{parent}``), else the request itself."""
    m = _CHILD_RE.match(request_id)
    return str(overrides.get("group") or (m.group(1) if m else request_id))


def unsupported_features(source: Any, model_path: str | None = None) -> list[str]:
    """What in this engine configuration the capture cannot score correctly (empty: fine):
    ``source`` is a ``VllmConfig`` (in the engine) or a mapping of ``EngineArgs`` values (before
    an engine starts; ``model_path`` then lets the model's config say whether it uses M-RoPE).

    - pipeline parallelism: the hooked layers of other stages are ``PPMissingLayer``s and
      the output comes from the last stage;
    - dual-batch overlap / micro-batching: the model runs once per micro-batch on sliced
      inputs, so the capture buffers' rows are overwritten;
    - speculative decoding: rejected draft tokens would advance the boundary detector;
    - M-RoPE models: positions are ``[3, N]``;
    - weight offloading (``--cpu-offload-gb``, prefetch offloading): not verified;
    - prefill/decode context parallelism: rows are partitioned across ranks;
    - data parallelism: vLLM routes each child of an ``n > 1`` request to an engine of its own
      (``DPLBAsyncMPClient.get_core_engine_for_request``), so the group rules would see part of a
      group; run one server per replica behind a balancer that keeps a request whole;
    - ``external_launcher`` (one engine per torchrun rank): only tensor-parallel rank 0's
      scheduler would see scores, so the ranks' schedulers would decide differently.
    """
    v = _engine_args_values(source, model_path) if isinstance(source, Mapping) else _vllm_config_values(source)
    out = []
    if v["pipeline_parallel_size"] > 1:
        out.append(f"pipeline parallelism (pipeline_parallel_size={v['pipeline_parallel_size']})")
    if v["data_parallel_size"] > 1:
        out.append(f"data parallelism (data_parallel_size={v['data_parallel_size']})")
    if v["distributed_executor_backend"] == "external_launcher":
        out.append("distributed_executor_backend=external_launcher")
    if v["ubatching"]:
        out.append("dual-batch overlap / micro-batching (enable_dbo, ubatch_size)")
    if v["context_parallel"]:
        out.append("context parallelism")
    if v["speculative"]:
        out.append("speculative decoding")
    if v["mrope"]:
        out.append("an M-RoPE model")
    if v["offload"]:
        out.append("weight offloading (cpu_offload_gb / offload_group_size)")
    return out


def _vllm_config_values(vllm_config: Any) -> dict[str, Any]:
    pc = getattr(vllm_config, "parallel_config", None)
    mc = getattr(vllm_config, "model_config", None)
    oc = getattr(vllm_config, "offload_config", None)
    return {
        "pipeline_parallel_size": getattr(pc, "pipeline_parallel_size", 1),
        "data_parallel_size": getattr(pc, "data_parallel_size", 1),
        "distributed_executor_backend": getattr(pc, "distributed_executor_backend", None),
        "ubatching": bool(getattr(pc, "use_ubatching", False)),
        "context_parallel": getattr(pc, "prefill_context_parallel_size", 1) > 1
        or getattr(pc, "decode_context_parallel_size", 1) > 1,
        "speculative": getattr(vllm_config, "speculative_config", None) is not None,
        "mrope": mc is not None and bool(getattr(mc, "uses_mrope", False)),
        "offload": oc is not None and (oc.uva.cpu_offload_gb > 0 or oc.prefetch.offload_group_size > 0),
    }


def _engine_args_values(args: Mapping[str, Any], model_path: str | None) -> dict[str, Any]:
    mrope = False
    if model_path is not None:
        from transformers import AutoConfig
        from vllm.transformers_utils.config import uses_mrope

        try:
            hf = AutoConfig.from_pretrained(model_path, trust_remote_code=bool(args.get("trust_remote_code")))
        except (OSError, ValueError):  # vLLM will say what is wrong with the model
            hf = None
        mrope = hf is not None and bool(uses_mrope(hf))
    return {
        "pipeline_parallel_size": int(args.get("pipeline_parallel_size") or 1),
        "data_parallel_size": int(args.get("data_parallel_size") or 1),
        "distributed_executor_backend": args.get("distributed_executor_backend"),
        "ubatching": bool(args.get("enable_dbo")) or int(args.get("ubatch_size") or 0) > 1,
        "context_parallel": int(args.get("prefill_context_parallel_size") or 1) > 1
        or int(args.get("decode_context_parallel_size") or 1) > 1,
        "speculative": bool(args.get("speculative_config")),
        "mrope": mrope,
        "offload": float(args.get("cpu_offload_gb") or 0) > 0 or int(args.get("offload_group_size") or 0) > 0,
    }


def check_supported(source: Any, model_path: str | None = None) -> None:
    """Refuse, in one line, an engine configuration the capture cannot score correctly (a
    ``VllmConfig`` in the engine, or ``EngineArgs`` values before it starts)."""
    bad = unsupported_features(source, model_path)
    if bad:
        raise StepprobeError(f"the capture cannot score with {', '.join(bad)}; run without it, or without a scorer")


def preflight(vllm_config: Any) -> None:
    """What the worker and scheduler would refuse, checked on a ``VllmConfig`` before any
    engine process starts or any weights load: the configuration, and the scorer against
    the model (a no-op without a stepprobe scorer in ``additional_config``)."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    if not isinstance(extra, Mapping) or not isinstance(extra.get(KEY), Mapping) or not extra[KEY].get("scorer"):
        return
    settings = PluginSettings.from_vllm_config(vllm_config)
    check_supported(vllm_config)
    from .runner import check_scorer_for_model

    check_scorer_for_model(settings.scorer, vllm_config.model_config.model)


def register_preflight() -> None:
    """vLLM general plugin (entry point ``vllm.general_plugins: stepprobe``): vLLM loads it in
    every process, ``vllm serve``'s API server first. It wraps ``EngineArgs.create_engine_config``
    so that a stepprobe configuration is checked (:func:`preflight`) in the process that builds
    the config, before the engine core starts and the model loads. Under the ``vllm`` command
    line a refusal is one line on stderr and exit code 2 (instead of vLLM's multi-line engine
    start-up failure after the weights loaded); elsewhere it raises :class:`StepprobeError`."""
    import os
    import sys

    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_stepprobe_preflight", False):
        return

    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        config = original(self, *args, **kwargs)
        try:
            preflight(config)
        except StepprobeError as exc:
            if os.path.basename(sys.argv[0] or "") == "vllm":
                print(f"stepprobe: error: {exc}", file=sys.stderr)
                raise SystemExit(2) from None
            raise
        return config

    create_engine_config._stepprobe_preflight = True  # type: ignore[attr-defined]
    EngineArgs.create_engine_config = create_engine_config  # type: ignore[method-assign]


def parse_vllm_cli_engine_args(argv: list[str]) -> dict[str, Any]:
    """``EngineArgs`` fields from ``vllm serve`` flags, parsed by vLLM's own argument parser."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser(add_help=False))
    ns, _ = parser.parse_known_args(argv)
    return vars(ns)


def check_vllm_version() -> None:
    try:
        import vllm

        if vllm.__version__ not in TESTED_VLLM:
            log.warning("stepprobe's vLLM hooks were tested with vLLM %s; this is %s (internal APIs may differ)",
                        ", ".join(TESTED_VLLM), vllm.__version__)
    except ImportError:  # pragma: no cover
        raise StepprobeError("vLLM is not installed: pip install 'stepprobe[cpu]' (or [gpu])") from None
