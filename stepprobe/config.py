"""The config base every stage uses.

A stage config is a dataclass deriving from :class:`StageConfig`. Its fields are
declared with :func:`option` so that each carries its help text; the CLI turns every
field into a ``--flag`` and a config file (YAML or JSON) into defaults, flags winning.
Configs are plain data: they are saved beside every artifact and loaded back.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from . import __version__
from .errors import StepprobeError

C = TypeVar("C", bound="StageConfig")

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, factory: Any = _MISSING, resume_ok: bool = False,  # noqa: A002
           blank: bool = False, absent: Any = _MISSING) -> Any:
    """A config field with help text (``factory`` for mutable defaults).

    ``resume_ok``: the field may differ between a run and the run it resumes (paths,
    progress flags); readers compare everything else. ``blank``: an empty string is a value
    of its own (e.g. ``system_prompt: ""``), not "none". ``absent``: the value an artifact
    saved before the field existed was made with (a run resuming it compares with that).
    """
    meta = {"help": help, "resume_ok": resume_ok, "blank": blank}
    if absent is not _MISSING:
        meta["absent"] = absent
    if factory is not _MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, name: str, *, blank: bool = False) -> Any:
    """Turn a value from a file or a command line into the field's type."""
    inner, optional = _unwrap_optional(tp)
    nulls = ("none", "null") if blank else ("none", "null", "")
    if value is None or (optional and isinstance(value, str) and value.lower() in nulls):
        if optional or value is None:
            return None
    origin = typing.get_origin(inner)
    try:
        if inner is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if inner in (int, float, str):
            if inner is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return inner(value)
        if origin in (list, tuple):
            (elem,) = typing.get_args(inner)[:1] or (str,)
            if isinstance(value, str):
                value = json.loads(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            return [coerce(v, elem, name) for v in value]
        if origin is dict or inner is dict:
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
    except (TypeError, ValueError, json.JSONDecodeError):
        raise StepprobeError(f"config field {name!r}: cannot read {value!r} as {getattr(inner, '__name__', inner)}") from None
    return value


@dataclasses.dataclass
class OptionGroup:
    """Base of the option groups (``stepprobe.options``) and of every stage config.

    Building a config does two things, here and nowhere else, each for every class in its
    bases, groups first: ``resolve()`` fills what a field leaves to the defaults or to a file
    (a prompt preset, a released scorer, the built-in sampling defaults of ``collect``), then
    ``check()`` validates: it raises or returns, and changes nothing. So a config cannot
    exist unresolved or unchecked, and a value that is not what the user typed was set by a
    ``resolve``.
    """

    def __post_init__(self) -> None:
        classes = list(reversed(type(self).__mro__))
        for step in ("resolve", "check"):
            for klass in classes:
                method = klass.__dict__.get(step)
                if method is not None:
                    method(self)


def stage_defaults(**values: Any):
    """Class decorator (put it *below* ``@dataclass``): a stage's own defaults for fields a
    group declares. Help text, type and checks stay the group's."""

    def deco(cls: type) -> type:
        inherited: dict[str, dataclasses.Field] = {}
        for base in reversed(cls.__mro__[1:]):
            for f in getattr(base, "__dataclass_fields__", {}).values():
                inherited[f.name] = f
        ann = cls.__dict__.get("__annotations__")
        if ann is None:
            ann = {}
            cls.__annotations__ = ann
        for name, value in values.items():
            if name not in inherited:
                raise TypeError(f"{cls.__name__}: no inherited option {name!r}")
            f = inherited[name]
            ann[name] = f.type
            if callable(value) and not isinstance(value, (int, float, str, bool)):
                setattr(cls, name, dataclasses.field(default_factory=value, metadata=f.metadata))
            else:
                setattr(cls, name, dataclasses.field(default=value, metadata=f.metadata))
        return cls

    return deco


#: The output path has one name in every stage, ``output`` (``--output``); the training stages and
#: the pipeline keep their field ``out`` (what their artifacts record) and every stage takes the other
#: spelling too, so old commands and config files still work.
OUTPUT_NAMES = ("output", "out")


def output_spelling(fields: set[str], data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """``data`` with the output path under the name of the config's own field."""
    field = next((n for n in OUTPUT_NAMES if n in fields), None)
    other = next((n for n in OUTPUT_NAMES if n != field), None)
    if field is None or other not in data:
        return data
    if data.get(field) not in (None, data[other]):
        raise StepprobeError(f"{source}: the output is given twice ({field}: {data[field]!r}, {other}: "
                             f"{data[other]!r}); give it once, as output")
    return {**{k: v for k, v in data.items() if k != other}, field: data[other]}


@dataclasses.dataclass
class StageConfig(OptionGroup):
    """Base of every stage config. Subclasses add fields with :func:`option` and take the
    shared groups of :mod:`stepprobe.options` as bases."""

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], *, source: str = "config") -> C:
        hints = typing.get_type_hints(cls)
        known = {f.name for f in cls.fields()}
        data = output_spelling(known, data, source)
        unknown = sorted(set(data) - known - {"stepprobe_version", "stage"})
        if unknown:
            raise StepprobeError(f"{source}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        blank = {f.name for f in cls.fields() if f.metadata.get("blank")}
        kwargs = {k: coerce(v, hints[k], k, blank=k in blank) for k, v in data.items() if k in known}
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a required field is missing
            raise StepprobeError(f"{source}: {exc}") from None

    @classmethod
    def from_file(cls: type[C], path: str | Path, **overrides: Any) -> C:
        data = load_mapping(path)
        # A file may hold several stages' sections (the pipeline config); take ours if so.
        section = getattr(cls, "SECTION", None)
        if section and isinstance(data.get(section), dict):
            data = data[section]
        data = output_spelling({f.name for f in cls.fields()}, data, str(path))
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["stepprobe_version"] = __version__
        return out

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


def load_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping, with a one-line error when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise StepprobeError(f"config file not found: {path}")
    from .io import open_text

    with open_text(path) as fh:
        text = fh.read()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise StepprobeError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {str(exc).splitlines()[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise StepprobeError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    return data
