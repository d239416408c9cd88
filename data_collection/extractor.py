"""Hidden states of every site at chosen positions, from a teacher-forced transformers forward.

The recorder's reader of a model (``stepprobe record``); the live side reads the same sites
with hooks on vLLM's model (``inference/hooks.py``), and the parity tests compare the two.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import StepprobeError
from ..layers import EMBED, FINAL_NORM, all_sites, layer_name, mean_name

COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _find_attr(obj: Any, names: Sequence[str]) -> Any:
    for dotted in names:
        cur = obj
        for part in dotted.split("."):
            cur = getattr(cur, part, None)
            if cur is None:
                break
        if cur is not None:
            return cur
    return None


class SiteExtractor:
    """Teacher-forced forward pass that returns every site's hidden state at chosen positions.

    Sites are read with hooks, so they follow :mod:`stepprobe.layers` exactly: ``embed``
    is the input of decoder layer 0, ``layer_i`` the output of decoder layer ``i``
    (residual stream, before any final norm) and ``final_norm`` the final norm's output.
    Only the base model runs (no LM head), and only the requested positions leave the hook.
    """

    def __init__(self, model_path: str, *, dtype: str = "auto", device: str = "auto",
                 mean_sites: Sequence[str] = ()):
        import torch
        from transformers import AutoModel

        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        if dtype not in COMPUTE_DTYPES:
            raise StepprobeError(f"compute dtype {dtype!r} not supported; use one of {', '.join(COMPUTE_DTYPES)}")
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype_name = dtype
        self.model = AutoModel.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(self.device).eval()
        base = self.model
        layers = _find_attr(base, ["layers", "model.layers", "decoder.layers", "h", "transformer.h"])
        norm = _find_attr(base, ["norm", "model.norm", "final_layernorm", "decoder.final_layer_norm", "ln_f"])
        if layers is None or norm is None:
            raise StepprobeError(f"cannot find the decoder layers and final norm of {type(base).__name__}")
        self.num_layers = len(layers)
        self.hidden_size = int(self.model.config.hidden_size)
        self.sites = all_sites(self.num_layers)
        self.mean_sites = list(mean_sites)
        self._index: tuple[Any, Any] | None = None
        self._segments: tuple[Any, Any, Any, Any] | None = None  # token batch, token pos, row, row lengths
        self._out: dict[str, Any] = {}
        self._handles = [layers[0].register_forward_pre_hook(self._pre_hook, with_kwargs=True)]
        for i, layer in enumerate(layers):
            self._handles.append(layer.register_forward_hook(self._make_hook(layer_name(i))))
        self._handles.append(norm.register_forward_hook(self._make_hook(FINAL_NORM)))

    def _take(self, site: str, h: Any) -> None:
        if self._index is None:
            return
        if isinstance(h, (tuple, list)):
            h = h[0]
        b, p = self._index
        self._out[site] = h[b, p].float()
        if self._segments is not None and site in self.mean_sites:
            tb, tp, row, counts = self._segments
            import torch

            sums = torch.zeros((counts.numel(), h.shape[-1]), dtype=torch.float32, device=h.device)
            sums.index_add_(0, row, h[tb, tp].float())
            self._out[mean_name(site)] = sums / counts[:, None]

    def _pre_hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        self._take(EMBED, args[0] if args else kwargs["hidden_states"])

    def _make_hook(self, site: str):
        def hook(module: Any, args: Any, output: Any) -> None:
            self._take(site, output)
        return hook

    def extract(self, sequences: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
                pad_id: int = 0, starts: Sequence[int] | None = None) -> list[dict[str, np.ndarray]]:
        """For each sequence, ``{site: float32 [len(positions[i]), hidden]}`` at absolute positions.

        With ``mean_sites``, also ``{<site>.mean: ...}``: the mean over each step's tokens,
        from the token after the previous boundary (the first step: from ``starts[i]``, the
        first generated token) up to and including the boundary token.

        Sequences are right-padded and run without an attention mask: with causal
        attention, padding after a position cannot change it.
        """
        import torch

        lengths = [len(s) for s in sequences]
        T = max(lengths)
        ids = torch.full((len(sequences), T), int(pad_id), dtype=torch.long)
        for i, s in enumerate(sequences):
            ids[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        b = torch.as_tensor([i for i, ps in enumerate(positions) for _ in ps], dtype=torch.long, device=self.device)
        p = torch.as_tensor([q for ps in positions for q in ps], dtype=torch.long, device=self.device)
        if p.numel() and int(p.max()) >= T:
            raise StepprobeError("a boundary position lies beyond its sequence")
        self._index, self._out = (b, p), {}
        if self.mean_sites:
            if starts is None:
                raise StepprobeError("step means need the first generated position of each sequence")
            tb, tp, row, counts, r = [], [], [], [], 0
            for i, ps in enumerate(positions):
                lo = int(starts[i])
                for q in ps:
                    span = range(lo, int(q) + 1)
                    tb.extend([i] * len(span))
                    tp.extend(span)
                    row.extend([r] * len(span))
                    counts.append(len(span))
                    lo, r = int(q) + 1, r + 1
            dev = self.device
            self._segments = (torch.as_tensor(tb, dtype=torch.long, device=dev),
                              torch.as_tensor(tp, dtype=torch.long, device=dev),
                              torch.as_tensor(row, dtype=torch.long, device=dev),
                              torch.as_tensor(counts, dtype=torch.float32, device=dev))
        try:
            with torch.inference_mode():
                self.model(input_ids=ids.to(self.device), use_cache=False)
            names = self.sites + [mean_name(s) for s in self.mean_sites]
            got = {s: self._out[s].cpu().numpy() for s in names}
        finally:
            self._index, self._out, self._segments = None, {}, None
        result, lo = [], 0
        for ps in positions:
            result.append({s: got[s][lo:lo + len(ps)] for s in names})
            lo += len(ps)
        return result

    def close(self) -> None:
        for h in self._handles:
            h.remove()
