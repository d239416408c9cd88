"""The ``stepprobe`` command: one subcommand per pipeline stage.

Each stage module exposes ``Config`` (a :class:`~stepprobe.config.StageConfig`), ``run(config)``
and a docstring. The CLI only builds flags from the config's fields, loads ``--config FILE``,
applies the flags on top and calls ``run``. Stage modules are imported lazily, so
``stepprobe --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import logging
import os
import signal
import sys
import typing
from typing import Any, Sequence

from . import __version__, locks
from .config import OUTPUT_NAMES, StageConfig, _unwrap_optional
from .errors import StepprobeError

# name -> (module, one line for `stepprobe --help`), in pipeline order.
STAGES: dict[str, tuple[str, str]] = {
    "model": ("stepprobe.models", "prepare a model (convert the embedded default to an HF checkpoint)"),
    "collect": ("stepprobe.data_collection.collect", "sample N traces per problem with vLLM and grade them"),
    "record": ("stepprobe.data_collection.record", "record step-boundary hidden states of all layers into HDF5"),
    "train": ("stepprobe.training.train", "train one probe (Lightning) and write a run directory"),
    "sweep": ("stepprobe.training.sweep", "layer sweep: one probe per layer, metric vs. layer"),
    "tune": ("stepprobe.training.tune", "Optuna study over layers and probe architecture"),
    "export": ("stepprobe.training.export", "export the best probe as a scorer checkpoint"),
    "evaluate": ("stepprobe.training.evaluate", "evaluate a scorer on held-out recorded traces, with intervals"),
    "import-step-scorer": ("stepprobe.probes.step_scorer",
                           "convert a STEP-paper scorer checkpoint into a scorer (never unpickles code)"),
    "import-step-dump": ("stepprobe.data_collection.step_dump",
                         "convert STEP-paper hidden-state dumps (*_hiddenstates_*.pt) into the HDF5 file"),
    "run": ("stepprobe.inference.run", "generate with vLLM, score steps and prune traces"),
    "calibrate": ("stepprobe.inference.calibrate",
                  "how far pruning and votes may trust a scorer: risk-controlled cutoff and earned vote (trust.json)"),
    "bench": ("stepprobe.inference.bench", "self-consistency vs. STEP pruning vs. confidence, side by side"),
    "replay": ("stepprobe.inference.replay", "replay every policy offline on the traces of one SC run (paired)"),
    "serve": ("stepprobe.inference.serve", "vllm serve with scoring and pruning (OpenAI-compatible endpoint)"),
    "pipeline": ("stepprobe.pipeline", "the whole pipeline end to end into one run directory"),
}


def available_stages() -> dict[str, tuple[str, str]]:
    return {name: spec for name, spec in STAGES.items() if importlib.util.find_spec(spec[0]) is not None}


def _flag_type(tp: Any):
    inner, _ = _unwrap_optional(tp)
    return inner


def add_config_flags(parser: argparse.ArgumentParser, config_cls: type[StageConfig], skip: Sequence[str] = ()) -> None:
    hints = typing.get_type_hints(config_cls)
    for f in config_cls.fields():
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if default is not None and not required:
            help_text = f"{help_text} (default: {default})"
        elif required:
            help_text = f"{help_text} (required unless in --config)"
        if _flag_type(hints[f.name]) is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name in OUTPUT_NAMES:  # one name in every stage; the other spelling still works, unlisted
            parser.add_argument("--output", dest=f.name, default=None, metavar="OUTPUT", help=help_text)
            parser.add_argument("--out", dest=f.name, default=None, help=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)


def build_config(config_cls: type[StageConfig], args: argparse.Namespace) -> StageConfig:
    overrides = {f.name: getattr(args, f.name) for f in config_cls.fields() if getattr(args, f.name, None) is not None}
    return load_config(config_cls, args.config, overrides)


def load_config(config_cls: type[StageConfig], path: str | os.PathLike | None, fields: dict[str, Any],
                source: str = "command line") -> StageConfig:
    """A stage's checked config: the YAML/JSON file ``path`` (if given) with ``fields`` over it."""
    if path:
        return config_cls.from_file(path, **fields)
    return config_cls.from_dict(fields, source=source)


def stage_module(stage: str) -> Any:
    """The module (``Config``, ``run``) of the command ``stage``."""
    if stage not in STAGES:
        raise StepprobeError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    return importlib.import_module(STAGES[stage][0])


def make_parser() -> argparse.ArgumentParser:
    stages = available_stages()
    parser = argparse.ArgumentParser(
        prog="stepprobe",
        description="Learn from a model's hidden states at reasoning-step boundaries which sampled "
        "traces are going wrong, and prune them inside vLLM while they are generated.",
        epilog="Pipeline: " + " -> ".join(n for n in stages if n not in ("model", "pipeline", "serve")
                                          and not n.startswith("import-"))
        + ". Run `stepprobe STAGE --help` for a stage's options.",
    )
    parser.add_argument("--version", action="version", version=f"stepprobe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", title="stages")
    for name, (_, line) in stages.items():
        sub.add_parser(name, help=line, add_help=False)
    return parser


def _parse_stage(stage: str, rest: list[str]) -> tuple[Any, argparse.Namespace]:
    """The stage's module and its parsed flags (``--help`` and unknown flags exit here)."""
    module, line = stage_module(stage), STAGES[stage][1]
    config_cls: type[StageConfig] = module.Config
    stage_parser = argparse.ArgumentParser(prog=f"stepprobe {stage}", description=(module.__doc__ or line).strip(),
                                           formatter_class=argparse.RawDescriptionHelpFormatter)
    stage_parser.add_argument("--config", help="YAML or JSON file with config fields; flags override it")
    # A stage that wraps another program takes that program's arguments after "--".
    passthrough = getattr(module, "PASSTHROUGH", None)
    extra: list[str] | None = None
    if passthrough and "--" in rest:
        cut = rest.index("--")
        rest, extra = rest[:cut], rest[cut + 1:]
    add_config_flags(stage_parser, config_cls, skip=[passthrough] if passthrough else [])
    args = stage_parser.parse_args(rest)
    if extra is not None:
        setattr(args, passthrough, extra)
    return module, args


def stage_config(argv: Sequence[str]) -> StageConfig:
    """The config a command line (``STAGE --flag ...``) builds, checked, without running it."""
    top, rest = make_parser().parse_known_args(list(argv))
    module, args = _parse_stage(top.stage, rest)
    return build_config(module.Config, args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    top, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if top.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not top.verbose:
        # vLLM's import says on every CPU machine that Triton has no CPU backend: noise, not news.
        logging.getLogger("vllm.triton_utils").setLevel(logging.ERROR)
    if not top.stage:
        parser.print_help()
        return 2
    module, args = _parse_stage(top.stage, rest)
    try:
        config = build_config(module.Config, args)
        with locks.scope(top.stage), _sigterm_ends_the_command():
            module.run(config)
    except StepprobeError as exc:
        return _refuse(top.stage, str(exc))
    except OSError as exc:  # an unwritable or missing path, a full disk: the user's to fix
        filename = _filename(exc)
        where = f"{filename}: " if filename else ""
        return _refuse(top.stage, f"{where}{exc.strerror or exc}")
    except UnicodeDecodeError as exc:
        return _refuse(top.stage, f"an input file is not UTF-8 text ({exc.reason}); save it as UTF-8")
    except KeyboardInterrupt:
        print(f"stepprobe {top.stage}: interrupted; rerun the same command to resume", file=sys.stderr)  # noqa: T201
        return 130
    except Terminated:
        return _terminated(top.stage)
    except Exception:
        # Raised from the signal handler inside C code (an extension module's import, say), the
        # Terminated can come out as another exception (CPython: "TypeError: expected a message
        # argument" from ssl's import): SIGTERM still ends the command in one line.
        if _SIGTERM_SEEN:
            return _terminated(top.stage)
        raise
    return 0


def _terminated(stage: str) -> int:
    print(f"stepprobe {stage}: terminated (SIGTERM); what was finished is kept, rerun the same command to "
          "resume", file=sys.stderr)  # noqa: T201
    return 128 + signal.SIGTERM


def _filename(exc: OSError) -> str | None:
    """The file an OSError concerns: its own, or that of the same error it was raised while
    handling (a file that could not be flushed fails again, without a name, when closed)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == exc.errno and seen.filename:
            return seen.filename
        seen = seen.__context__
    return None


class Terminated(BaseException):
    """SIGTERM arrived: unwinds the command like Ctrl-C does (writers close, engines stop)."""


_SIGTERM_SEEN = False  # set by the handler: a Terminated that C code turned into another exception


@contextlib.contextmanager
def _sigterm_ends_the_command():
    """Turn SIGTERM into :class:`Terminated` while the stage runs, so that it ends with one
    line and the ``finally`` blocks that keep its output resumable run (by default the
    process would just vanish with exit 143)."""
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def _raise(signum, frame):
        global _SIGTERM_SEEN
        _SIGTERM_SEEN = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise Terminated()

    global _SIGTERM_SEEN
    _SIGTERM_SEEN = False
    signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _refuse(stage: str, message: str) -> int:
    """Print a refusal as one line (a multi-line message is joined) and return exit code 2."""
    line = " ".join(str(message).split())
    print(f"stepprobe {stage}: error: {line}", file=sys.stderr)  # noqa: T201
    return 2


if __name__ == "__main__":
    sys.exit(main())
