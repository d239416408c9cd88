"""Capture hooks on vLLM's model: each site's output copied into a buffer on the module.

vLLM compiles the model (Dynamo + Inductor on CPU; plus CUDA graphs on a GPU) right after
loading it; hooks added later never fire. So the worker installs these hooks **between**
loading and compiling, and vLLM then compiles (and graph-captures) the hooked model. A hook
is pure tensor code: it copies the whole site output for the batch (``hidden_states +
residual`` for a decoder layer) into a persistent buffer registered on the module, so it
survives tracing and graph replay. What each site reads, per architecture, is in
:mod:`stepprobe.layers`.
"""

from __future__ import annotations

from typing import Any

import torch

from stepprobe.errors import ArtifactMismatch
from stepprobe.layers import EMBED, FINAL_NORM, layer_index

BUFFER_NAME = "_stepprobe_capture"


def _hook_plain(module, args, output):  # embed_tokens: output is [n, hidden]
    getattr(module, BUFFER_NAME)[: output.shape[0]].copy_(output)


def _hook_scaled(scale_owner: torch.nn.Module):
    """embed_tokens of a model that scales its embeddings after the lookup (vLLM's Gemma family:
    ``embed_tokens(ids) * self.normalizer`` in the model's forward; transformers scales inside
    its embedding module). Stores the product the model computes, so ``embed`` is what decoder
    layer 0 reads, as in the recorder."""
    def hook(module, args, output):
        getattr(module, BUFFER_NAME)[: output.shape[0]].copy_(output * scale_owner.normalizer)
    return hook


def _hook_first(module, args, output):  # final norm with residual: (normed, residual)
    out = output[0] if isinstance(output, tuple) else output
    getattr(module, BUFFER_NAME)[: out.shape[0]].copy_(out)


def _hook_layer(module, args, output):  # decoder layer: (hidden_states, residual)
    if isinstance(output, tuple):
        hidden, residual = output[0], output[1]
        res = hidden if residual is None else hidden + residual
    else:
        res = output
    getattr(module, BUFFER_NAME)[: res.shape[0]].copy_(res)


def site_modules(model: torch.nn.Module, sites: list[str]) -> dict[str, tuple[torch.nn.Module, Any]]:
    """The module and hook for each site of a vLLM decoder (``model.model.{embed_tokens,layers,norm}``);
    what each reads, per architecture, is in :mod:`stepprobe.layers`."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise ArtifactMismatch(f"stepprobe cannot find decoder layers in {type(model).__name__} "
                               "(expected model.model.layers)")
    out = {}
    for site in sites:
        if site == EMBED:
            scaled = isinstance(getattr(inner, "normalizer", None), torch.Tensor)
            out[site] = (inner.embed_tokens, _hook_scaled(inner) if scaled else _hook_plain)
        elif site == FINAL_NORM:
            out[site] = (inner.norm, _hook_first)
        else:
            idx = layer_index(site)
            if idx is None or idx >= len(inner.layers):
                raise ArtifactMismatch(f"scorer reads site {site!r}; the model has {len(inner.layers)} layers")
            out[site] = (inner.layers[idx], _hook_layer)
    return out



def capture_rows(vllm_config: Any) -> int:
    """Rows of each capture buffer: a step's batched tokens, with room for padding."""
    return int(vllm_config.scheduler_config.max_num_batched_tokens) + 512


def install_hooks(model: torch.nn.Module, sites: list[str], hidden_size: int, rows: int, dtype: torch.dtype,
                  device: torch.device) -> tuple[dict[str, torch.Tensor], list[Any]]:
    """Register a capture buffer and a forward hook on each site's module (before compilation).

    Every tensor-parallel rank calls this with the same arguments, the ones whose outputs vLLM
    discards included: a hook is a second reader of the layer's output, so it changes what
    Inductor may fuse there (on Hopper/Blackwell at -O2, the all-reduce + RMSNorm fusion). With
    hooks on rank 0 only, rank 0 would run an unfused all-reduce where the other ranks run the
    fused one, and the ranks would wait on different collectives. Identical hooks keep the
    compiled graphs, and so the collectives, identical; only the output rank scores."""
    buffers: dict[str, torch.Tensor] = {}
    handles: list[Any] = []
    for site, (module, hook) in site_modules(model, sites).items():
        module.register_buffer(BUFFER_NAME, torch.zeros(rows, hidden_size, dtype=dtype, device=device),
                               persistent=False)
        buffers[site] = getattr(module, BUFFER_NAME)
        handles.append(module.register_forward_hook(hook))
    return buffers, handles

