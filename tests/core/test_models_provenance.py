"""The embedded default model, random test models and provenance checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stepprobe import layers
from stepprobe.errors import ArtifactMismatch, StepprobeError
from stepprobe.models import resolve_model
from stepprobe.provenance import check_model_identity, check_schema, model_identity, package_versions


def test_default_model_is_a_verified_hf_checkpoint(default_model_path):
    path = Path(default_model_path)
    config = json.loads((path / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert "quantization_config" not in config  # vLLM would try to load GGUF weights otherwise
    marker = json.loads((path / "stepprobe_model.json").read_text())
    assert "model.safetensors" in marker["sha256"]
    assert resolve_model("smollm2-135m") == default_model_path  # idempotent, no reconversion


def test_default_model_generates_text(default_model_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_path)
    model = AutoModelForCausalLM.from_pretrained(default_model_path)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "5" in text  # a real de-quantized model, not random weights


def test_identity_and_mismatch(tiny_model_path, default_model_path):
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    tiny = model_identity("tiny", AutoConfig.from_pretrained(tiny_model_path), tok)
    default = model_identity("default", AutoConfig.from_pretrained(default_model_path), tok)
    assert tiny["vocab_hash"] == default["vocab_hash"] and tiny["hidden_size"] == 64
    check_model_identity(tiny, dict(tiny), "x")
    with pytest.raises(ArtifactMismatch, match="made for model 'tiny'"):
        check_model_identity(tiny, default, "probe.safetensors")


def test_schema_check_and_versions():
    check_schema({"kind": "k", "schema_version": 1}, "k", 1, "f")
    with pytest.raises(ArtifactMismatch, match="schema version 2"):
        check_schema({"kind": "k", "schema_version": 2}, "k", 1, "f")
    with pytest.raises(ArtifactMismatch, match="not a stepprobe"):
        check_schema({"kind": "other"}, "k", 1, "f")
    assert {"stepprobe", "torch", "transformers"} <= set(package_versions())


def test_resolve_model_rejects_a_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"0")
    with pytest.raises(StepprobeError, match="is a file"):
        resolve_model(str(f))


def test_site_names():
    assert layers.all_sites(2) == ["embed", "layer_00", "layer_01", "final_norm"]
    assert layers.parse_sites("0-1,final_norm", 2) == ["layer_00", "layer_01", "final_norm"]
    assert layers.parse_sites("-1", 30) == ["layer_29"]
    with pytest.raises(StepprobeError, match="unknown site"):
        layers.parse_sites("layer_05", 2)
