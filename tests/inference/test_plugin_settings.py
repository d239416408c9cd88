"""The plugin's settings (inference/plugin.py): what is refused, the engine and server arguments
they become, a request's overrides, and a scorer for another model refused before the engine
starts."""

from __future__ import annotations

import pytest

from stepprobe.errors import ArtifactMismatch, StepprobeError
from stepprobe.inference.plugin import PluginSettings, install_kwargs, request_overrides, serve_args


def test_settings_validation_and_flags(tmp_path):
    with pytest.raises(StepprobeError, match="unknown pruning policy"):
        PluginSettings(policy="sometimes")
    with pytest.raises(StepprobeError, match="needs a scorer"):  # "none": not even the released one
        PluginSettings(policy="memory", scorer="none")
    with pytest.raises(StepprobeError, match="unknown stepprobe setting"):
        PluginSettings.from_mapping({"scorer": "x", "polcy": "none"})
    s = PluginSettings(scorer=str(tmp_path), policy="memory")
    kw = install_kwargs(s)
    assert kw["additional_config"]["stepprobe"]["policy"] == "memory"
    args = serve_args(s)
    assert args[0] == "--worker-cls" and "--additional-config" in args

    class P:
        extra_args = {"stepprobe": {"policy": "none"}, "stepprobe_group": "g"}

    assert request_overrides(P()) == {"policy": "none", "group": "g"}


def test_scorer_for_another_model_is_refused_before_start(tmp_path, tiny_model_path, default_model_path, helpers):
    """A scorer exported for another model (here: the 576-wide default) is refused, one line."""
    import numpy as np

    from stepprobe.boundaries import BoundaryRule
    from stepprobe.inference.runner import StepRunner
    from stepprobe.probes.checkpoint import linear_probe, save_scorer

    ident = helpers.tiny_identity(default_model_path)
    probe = linear_probe(["layer_03"], weight=np.zeros(ident["hidden_size"], dtype=np.float32))
    save_scorer(tmp_path / "s", probe, model=ident, boundary_rule=BoundaryRule().to_dict())
    with pytest.raises(ArtifactMismatch, match="hidden size 576") as err:
        StepRunner(tiny_model_path, PluginSettings(scorer=str(tmp_path / "s"), policy="memory"))
    assert "\n" not in str(err.value)
