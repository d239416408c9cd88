"""Problem sources: a ``--problems`` spec -> the problems.

A spec is a file path (read by :func:`~stepprobe.data_collection.problems.load_problems`),
the built-in generator ``builtin`` / ``builtin:n=300,seed=0,families=add+word_add,levels=1+2``
(see :mod:`stepprobe.data_collection.tasks`), or the test-only set of other phrasings
``builtin-ood`` / ``builtin-ood:n=96,seed=0`` (:mod:`stepprobe.data_collection.ood_tasks`) and
a third, ``builtin-ood2`` (:mod:`stepprobe.data_collection.ood2_tasks`).
"""

from __future__ import annotations

from typing import Any

from ..errors import StepprobeError
from .ood2_tasks import generate_ood2_tasks
from .ood_tasks import generate_ood_tasks
from .problems import Problem, load_problems
from .tasks import generate_tasks

BUILTIN = "builtin"
BUILTIN_OOD = "builtin-ood"
BUILTIN_OOD2 = "builtin-ood2"  # issue 23's third test set


def parse_builtin_spec(spec: str) -> dict[str, Any]:
    """``builtin:n=300,seed=0,families=add+word_add,levels=1+2`` -> generate_tasks kwargs."""
    _, _, rest = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not value.strip():
            raise StepprobeError(f"problem spec {spec!r}: expected key=value, got {item!r}")
        value = value.strip()
        try:
            if key in ("n", "seed"):
                kwargs[key] = int(value)
            elif key == "families":
                kwargs[key] = [v for v in value.split("+") if v]
            elif key == "levels":
                kwargs[key] = [int(v) for v in value.split("+") if v]
            else:
                raise StepprobeError(f"problem spec {spec!r}: unknown key {key!r}; known: n, seed, families, levels")
        except ValueError:
            raise StepprobeError(f"problem spec {spec!r}: {key} must be an integer (levels: 1+2)") from None
    return kwargs


def load_problem_source(spec: str, **field_overrides: Any) -> list[Problem]:
    """Problems from a file path or a built-in spec (``builtin[:key=value,...]``, ``builtin-ood[:...]``,
    ``builtin-ood2[:...]``)."""
    spec = str(spec).strip()
    for name, generate in ((BUILTIN_OOD2, generate_ood2_tasks), (BUILTIN_OOD, generate_ood_tasks),
                           (BUILTIN, generate_tasks)):
        if spec == name or spec.startswith(name + ":"):
            if any(v is not None for v in field_overrides.values()):
                raise StepprobeError("field names (question_field, ...) apply to problem files, not to the built-in "
                                     "tasks")
            return generate(**parse_builtin_spec(spec))
    return load_problems(spec, **{k: v for k, v in field_overrides.items() if v is not None})
