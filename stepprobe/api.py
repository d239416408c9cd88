"""The Python API: what a notebook handles without the command line.

    from stepprobe import api

Each name is the function the stages themselves use, re-exported from where it is defined and
imported when first used (``from stepprobe import api`` imports neither torch nor vLLM).

- :func:`load_scorer` (``stepprobe.probes.checkpoint``): a scorer directory (``stepprobe export``),
  checked; ``scorer.score({site: features})`` scores rows of features;
- :func:`open_hidden_states` (``stepprobe.training.data``): a hidden-state file (``stepprobe
  record``), checked: ``hs.steps``, ``hs.traces``, ``hs.problems``, ``hs.features(site)``;
- :func:`score_steps` (``stepprobe.training.evaluate``): a scorer's probability at every step
  row of a hidden-state file;
- :func:`stage_config` and :func:`run_stage`: any command's config, from a config file and/or
  fields, checked as the command line checks it, and the stage run with it.
"""

from __future__ import annotations

import os
from typing import Any

#: name -> module defining it (re-exported as is).
REEXPORTS = {
    "load_scorer": "stepprobe.probes.checkpoint",
    "open_hidden_states": "stepprobe.training.data",
    "score_steps": "stepprobe.training.evaluate",
}

__all__ = [*REEXPORTS, "stage_config", "run_stage"]


def stage_config(stage: str, config: str | os.PathLike | None = None, **fields: Any):
    """The checked config of the command ``stage`` (as named on the command line): the fields
    of the YAML/JSON file ``config`` (if given; a pipeline file's section of that stage), with
    ``fields`` over them: what ``stepprobe STAGE --config FILE --field value`` builds."""
    from stepprobe import cli

    return cli.load_config(cli.stage_module(stage).Config, config, fields, source="arguments")


def run_stage(stage: str, config: Any = None, **fields: Any) -> Any:
    """Run the command ``stage`` with ``config`` (a :func:`stage_config`; or a config file and
    ``fields`` to build one) and return what the stage returns (its output directory or file).
    The output locks it takes are released when it ends, as at the end of a command."""
    from stepprobe import cli, locks
    from stepprobe.config import StageConfig

    if not isinstance(config, StageConfig):
        config = stage_config(stage, config, **fields)
    elif fields:
        config = config.replace(**fields)
    with locks.scope(stage):
        return cli.stage_module(stage).run(config)


def __getattr__(name: str) -> Any:
    if name in REEXPORTS:
        import importlib

        return getattr(importlib.import_module(REEXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
