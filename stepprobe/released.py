"""Released scorers shipped inside the package, used when a model has one and no --scorer is given.

``stepprobe/released/<name>/`` holds a scorer directory (``scorer.safetensors``,
``scorer.json``, ``README.md`` = the model card: data, recipe, held-out metrics). For the
embedded default model the recipe is ``configs/released-smollm2-135m.yaml`` and
``scripts/release_scorer.sh`` reproduces it in one command. ``run``, ``bench`` and ``serve``
call :func:`resolve_scorer`: an explicit ``--scorer`` wins, ``--scorer none`` means no
scoring, and otherwise the default model gets its released scorer where one is shipped.
``STEPPROBE_RELEASED_DIR`` points elsewhere (tests).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .models import DEFAULT_MODEL

log = logging.getLogger(__name__)

# model name (as given on the command line) -> folder under the released root
RELEASED = {DEFAULT_MODEL: "smollm2-135m"}
#: The problems each released scorer was trained on (its recipe, configs/released-*.yaml): an
#: evaluation of it leaves their questions out.
TRAINED_ON = {"smollm2-135m": "builtin:n=1000,seed=100"}


def released_training_problems(model: str | None) -> str:
    """The problem source the model's released scorer was trained on ("" when none is shipped)."""
    return TRAINED_ON.get(RELEASED.get(model or DEFAULT_MODEL, ""), "")
NO_SCORER = "none"


def released_root() -> Path:
    env = os.environ.get("STEPPROBE_RELEASED_DIR")
    return Path(env) if env else Path(__file__).resolve().parent / "released"


def released_scorer(model: str | None) -> Path | None:
    """The shipped scorer directory for ``model`` (``None``/the default model name), if any."""
    name = RELEASED.get(model or DEFAULT_MODEL)
    if name is None:
        return None
    path = released_root() / name
    return path if (path / "scorer.json").is_file() else None


def resolve_scorer(model: str | None, scorer: str | None) -> str:
    """What a stage should score with: the explicit one, nothing (``none`` or ``""``), or, when
    ``scorer`` is unset (``None``), the model's released one. Returns ``""`` for "no scorer", never
    ``None``, so resolving a resolved value again changes nothing (``--scorer none`` stays none)."""
    if scorer is not None:
        return "" if scorer.strip().lower() in (NO_SCORER, "") else scorer
    found = released_scorer(model)
    if found is not None:
        # debug: configs are built (and rebuilt) before a refusal; the stage names its scorer when it starts
        log.debug("no --scorer given: using the released scorer for %s (%s)", model or DEFAULT_MODEL, found)
        return str(found)
    return ""
