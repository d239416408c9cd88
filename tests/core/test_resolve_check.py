"""Building a config resolves, then checks; ``check()`` only validates (issue 24)."""

from __future__ import annotations

import copy
import dataclasses
import importlib

import pytest

from stepprobe.cli import STAGES
from stepprobe.config import StageConfig
from stepprobe.errors import StepprobeError

# Raw values a resolve() turns into others: a preset, vLLM's -1 for "no top-k", "from the
# data" (None) for collect's model and the scorer.
RAW = {"prompt_preset": "step-paper", "top_k": -1, "model": None, "scorer": None, "system_prompt": None,
       "temperature": None, "policies": ["memory"]}


def _stage_configs() -> list[type]:
    out = []
    for module, _ in STAGES.values():
        cls = getattr(importlib.import_module(module), "Config", None)
        if isinstance(cls, type) and issubclass(cls, StageConfig):
            out.append(cls)
    return out


def _unbuilt(cls: type) -> StageConfig:
    """An instance with its declared defaults and the raw values, before resolve and check."""
    obj = object.__new__(cls)
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = None
        object.__setattr__(obj, f.name, RAW.get(f.name, value) if f.name in RAW else value)
    return obj


@pytest.mark.parametrize("cls", _stage_configs(), ids=lambda c: c.__module__.rsplit(".", 1)[-1])
def test_check_changes_nothing(cls):
    obj = _unbuilt(cls)
    before = copy.deepcopy(dataclasses.asdict(obj))
    for klass in reversed(cls.__mro__):
        check = klass.__dict__.get("check")
        if check is not None:
            try:
                check(obj)
            except StepprobeError:
                pass  # a raw value may be refused; what matters is that none was changed
    assert dataclasses.asdict(obj) == before


def test_building_a_config_resolves_before_it_checks():
    from stepprobe.data_collection import collect
    from stepprobe.step_paper import STEP_PROMPT

    cfg = collect.Config(prompt_preset="step-paper", top_k=-1)
    assert cfg.top_k == 0
    assert cfg.system_prompt == STEP_PROMPT["system_prompt"]
    assert cfg.model is not None and cfg.temperature is not None  # collect's built-in defaults
    with pytest.raises(StepprobeError, match="top_k"):
        collect.Config(top_k=-2)
