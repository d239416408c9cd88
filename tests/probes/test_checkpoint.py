"""Probe registry, feature spec and the scorer checkpoint (no HDF5 needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stepprobe.errors import ArtifactMismatch, StepprobeError
from stepprobe.probes.checkpoint import (CONFIG_FILE, WEIGHTS_FILE, linear_probe, load_scorer,
                                         save_scorer)
from stepprobe.probes.features import FeatureSpec, ProbeModel
from stepprobe.probes.registry import build_probe, known_probes

H = 16
IDENTITY = {"name": "tiny", "config_hash": "c0ffee", "vocab_hash": "beef", "hidden_size": H,
            "num_hidden_layers": 4, "model_type": "llama"}
RULE = {"delimiter": "\n\n", "mode": "completes-occurrence-nonoverlapping", "token_ids": [198, 271]}


def _trained_like(arch: str, spec: FeatureSpec, **params) -> ProbeModel:
    m = ProbeModel(spec, arch, H, params)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    m.norm.fit(np.random.default_rng(0).normal(2.0, 3.0, size=(50, len(spec.sites), H)))
    return m


def test_registry_lists_known_names_on_unknown():
    assert {"linear", "mlp", "deep_mlp", "mixture"} <= set(known_probes())
    with pytest.raises(StepprobeError, match="known: linear, mlp, deep_mlp, mixture"):
        build_probe("transformer", num_sites=1, hidden_size=H)
    with pytest.raises(StepprobeError, match="unknown parameter"):
        build_probe("linear", num_sites=1, hidden_size=H, width=3)
    with pytest.raises(StepprobeError, match="go together"):
        build_probe("mixture", num_sites=2, hidden_size=H, combine="mean")


def test_step_paper_mlp_shape():
    mlp = build_probe("mlp", num_sites=1, hidden_size=H)
    assert [m.out_features for m in mlp.head if isinstance(m, torch.nn.Linear)] == [512, 1]


def test_feature_spec_parse():
    spec = FeatureSpec.parse("1-3", None, 4)
    assert spec.sites == ("layer_01", "layer_02", "layer_03") and spec.combine == "mean"
    assert FeatureSpec.parse("final_norm", None, 4).combine == "single"
    with pytest.raises(StepprobeError):
        FeatureSpec.parse("layer_09", None, 4)


@pytest.mark.parametrize("arch,combine,sites,params", [
    ("linear", "single", ("layer_02",), {}),
    ("mlp", "concat", ("layer_01", "layer_02"), {"width": 8}),
    ("deep_mlp", "mean", ("layer_01", "layer_02", "layer_03"), {"width": 8, "depth": 2, "dropout": 0.3}),
    ("mixture", "mixture", ("embed", "layer_03", "final_norm"), {"width": 4}),
])
def test_round_trip_identical_scores(tmp_path, arch, combine, sites, params):
    m = _trained_like(arch, FeatureSpec(sites, combine), **params).eval()
    save_scorer(tmp_path / "s", m, model=IDENTITY, boundary_rule=RULE, metrics={"test_auroc": 0.7},
                config={"arch": arch}, threshold=0.4)
    sc = load_scorer(tmp_path / "s", expected_model=IDENTITY)
    feats = {s: torch.randn(32, H) for s in sites}
    x = torch.stack([feats[s] for s in sites], 1)
    with torch.no_grad():
        want = m(x)
    assert torch.equal(sc.score(feats), want)
    assert torch.equal(sc.module(x), want)
    assert sc.sites == list(sites) and sc.hidden_size == H and sc.threshold == 0.4
    assert sc.metrics == {"test_auroc": 0.7} and sc.boundary_rule == RULE and sc.model == IDENTITY
    assert ((want > 0) & (want < 1)).all()


def test_planted_linear_scorer(tmp_path):
    w = np.zeros(H, dtype=np.float32)
    w[0] = 2.0
    save_scorer(tmp_path / "s", linear_probe(["layer_01"], w, bias=-1.0), model=IDENTITY, boundary_rule=RULE)
    sc = load_scorer(tmp_path / "s")
    x = torch.zeros(3, H)
    x[:, 0] = torch.tensor([0.0, 0.5, 3.0])
    got = sc.score({"layer_01": x})
    assert torch.allclose(got, torch.sigmoid(torch.tensor([-1.0, 0.0, 5.0])))


def test_mismatches_fail_clearly(tmp_path):
    save_scorer(tmp_path / "s", linear_probe(["layer_01"], np.ones(H)), model=IDENTITY, boundary_rule=RULE)
    sc = load_scorer(tmp_path / "s")
    with pytest.raises(ArtifactMismatch, match="hidden size 16, but model 'big' has hidden size 64"):
        sc.check_compatible({**IDENTITY, "name": "big", "hidden_size": 64})
    with pytest.raises(ArtifactMismatch, match="config_hash"):
        sc.check_compatible({**IDENTITY, "name": "other", "config_hash": "different"})
    with pytest.raises(ArtifactMismatch, match="vocab_hash"):
        load_scorer(tmp_path / "s", expected_model={**IDENTITY, "vocab_hash": "x"})
    with pytest.raises(ArtifactMismatch, match="does not have"):
        sc.check_compatible({**IDENTITY, "num_hidden_layers": 1})
    # Saving refuses an overwrite and a hidden-size lie.
    with pytest.raises(StepprobeError, match="already holds"):
        save_scorer(tmp_path / "s", linear_probe(["layer_01"], np.ones(H)), model=IDENTITY, boundary_rule=RULE)
    with pytest.raises(ArtifactMismatch, match="hidden size"):
        save_scorer(tmp_path / "t", linear_probe(["layer_01"], np.ones(8)), model=IDENTITY, boundary_rule=RULE)


def test_tampered_checkpoints_refused(tmp_path):
    d = save_scorer(tmp_path / "s", linear_probe(["layer_01"], np.ones(H)), model=IDENTITY, boundary_rule=RULE)
    meta = json.loads((d / CONFIG_FILE).read_text())
    (d / CONFIG_FILE).write_text(json.dumps({**meta, "schema_version": 99}))
    with pytest.raises(ArtifactMismatch, match="schema version 99"):
        load_scorer(d)
    (d / CONFIG_FILE).write_text(json.dumps({**meta, "architecture": "mlp", "params": {}}))
    with pytest.raises(ArtifactMismatch, match="do not match architecture 'mlp'"):
        load_scorer(d)
    (d / CONFIG_FILE).write_text(json.dumps(meta))
    (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ArtifactMismatch, match="do not match the hash"):
        load_scorer(d)
    with pytest.raises(ArtifactMismatch, match="not a scorer"):
        load_scorer(tmp_path)
