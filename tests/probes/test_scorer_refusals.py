"""Every way a scorer directory can be wrong is refused with a one-line reason (``ArtifactMismatch``).

Each case changes exactly one thing in a valid scorer; where the weights change, the hash in
``scorer.json`` is updated too, so the check under test (not the hash check) must catch it.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from stepprobe.errors import ArtifactMismatch, StepprobeError
from stepprobe.io import sha256_file
from stepprobe.probes.checkpoint import CONFIG_FILE, WEIGHTS_FILE, linear_probe, load_scorer, save_scorer

H = 16
IDENTITY = {"name": "tiny", "config_hash": "c0ffee", "vocab_hash": "beef", "hidden_size": H,
            "num_hidden_layers": 4, "model_type": "llama"}
RULE = {"delimiter": "\n\n", "mode": "completes-occurrence-nonoverlapping", "token_ids": [198, 271]}


@pytest.fixture()
def scorer_dir(tmp_path):
    return save_scorer(tmp_path / "s", linear_probe(["layer_01"], np.linspace(-1, 1, H), bias=0.25),
                       model=IDENTITY, boundary_rule=RULE)


def _rewrite_weights(d, change) -> None:
    tensors = load_file(str(d / WEIGHTS_FILE))
    change(tensors)
    save_file(tensors, str(d / WEIGHTS_FILE))
    meta = json.loads((d / CONFIG_FILE).read_text())
    meta["weights_sha256"] = sha256_file(d / WEIGHTS_FILE)
    (d / CONFIG_FILE).write_text(json.dumps(meta))


def _first_weight(tensors) -> str:
    return next(k for k, t in sorted(tensors.items()) if t.ndim >= 1 and t.numel() > 1)


def _edit_meta(d, **changes) -> None:
    meta = json.loads((d / CONFIG_FILE).read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    (d / CONFIG_FILE).write_text(json.dumps(meta))


def test_the_unchanged_scorer_loads(scorer_dir):
    sc = load_scorer(scorer_dir)
    assert sc.sites == ["layer_01"] and sc.hidden_size == H


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_weights_are_refused(scorer_dir, bad):
    def poison(t):
        name = _first_weight(t)
        t[name] = t[name].clone()
        t[name].view(-1)[3] = bad
    _rewrite_weights(scorer_dir, poison)
    with pytest.raises(ArtifactMismatch, match="holds NaN or inf"):
        load_scorer(scorer_dir)


def test_wrongly_shaped_weights_are_refused(scorer_dir):
    def reshape(t):
        name = _first_weight(t)
        t[name] = torch.zeros(t[name].numel() + 1)
    _rewrite_weights(scorer_dir, reshape)
    with pytest.raises(ArtifactMismatch, match=r"has shape \[\d+\], architecture wants"):
        load_scorer(scorer_dir)


def test_weights_of_another_dtype_are_refused(scorer_dir):
    def half(t):
        name = _first_weight(t)
        t[name] = t[name].to(torch.float16)
    _rewrite_weights(scorer_dir, half)
    with pytest.raises(ArtifactMismatch, match="is torch.float16, expected float32"):
        load_scorer(scorer_dir)


def test_missing_or_extra_tensors_are_refused(scorer_dir):
    _rewrite_weights(scorer_dir, lambda t: t.update(extra=torch.zeros(2)))
    with pytest.raises(ArtifactMismatch, match=r"do not match architecture 'linear' \(unexpected \['extra'\]"):
        load_scorer(scorer_dir)


def test_missing_weights_file_is_refused(scorer_dir):
    (scorer_dir / WEIGHTS_FILE).unlink()
    with pytest.raises(ArtifactMismatch, match=f"weights file {WEIGHTS_FILE} is missing"):
        load_scorer(scorer_dir)


def test_unreadable_weights_are_refused(scorer_dir):
    (scorer_dir / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    _edit_meta(scorer_dir, weights_sha256=sha256_file(scorer_dir / WEIGHTS_FILE))
    with pytest.raises(ArtifactMismatch, match="not a readable safetensors file"):
        load_scorer(scorer_dir)


def test_weights_that_do_not_match_the_recorded_hash_are_refused(tmp_path, scorer_dir):
    other = save_scorer(tmp_path / "o", linear_probe(["layer_01"], np.ones(H)), model=IDENTITY, boundary_rule=RULE)
    shutil.copy(other / WEIGHTS_FILE, scorer_dir / WEIGHTS_FILE)  # a mixed checkpoint
    with pytest.raises(ArtifactMismatch, match="do not match the hash"):
        load_scorer(scorer_dir)


@pytest.mark.parametrize("text,reason", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"kind": "stepprobe-traces", "schema_version": 1}', "is not a stepprobe scorer file"),
], ids=["syntax", "not-an-object", "other-kind"])
def test_bad_scorer_json_is_refused(scorer_dir, text, reason):
    (scorer_dir / CONFIG_FILE).write_text(text)
    with pytest.raises(ArtifactMismatch, match=reason):
        load_scorer(scorer_dir)


@pytest.mark.parametrize("field", ["architecture", "params", "feature_spec", "hidden_size", "model",
                                   "boundary_rule", "weights_sha256"])
def test_scorer_json_missing_a_field_is_refused(scorer_dir, field):
    _edit_meta(scorer_dir, **{field: None})
    with pytest.raises(ArtifactMismatch, match=f"missing field\\(s\\) {field}$"):
        load_scorer(scorer_dir)


def test_scorer_json_whose_probe_and_model_disagree_is_refused(scorer_dir):
    _edit_meta(scorer_dir, model={**IDENTITY, "hidden_size": 64})
    with pytest.raises(ArtifactMismatch, match="probe hidden size 16 differs from its model's 64"):
        load_scorer(scorer_dir)


def test_a_site_the_model_does_not_have_is_refused(scorer_dir):
    _edit_meta(scorer_dir, model={**IDENTITY, "num_hidden_layers": 1})
    with pytest.raises(StepprobeError, match="layer_01"):
        load_scorer(scorer_dir)


def test_missing_directory_and_missing_config(tmp_path, scorer_dir):
    with pytest.raises(StepprobeError, match="scorer directory not found"):
        load_scorer(tmp_path / "nowhere")
    (scorer_dir / CONFIG_FILE).unlink()
    with pytest.raises(ArtifactMismatch, match=f"is not a scorer checkpoint \\(no {CONFIG_FILE}\\)"):
        load_scorer(scorer_dir)


def test_refusals_are_one_line(scorer_dir):
    _rewrite_weights(scorer_dir, lambda t: t.update({_first_weight(t): torch.full_like(t[_first_weight(t)], float("nan"))}))
    with pytest.raises(ArtifactMismatch) as err:
        load_scorer(scorer_dir)
    assert "\n" not in str(err.value)
