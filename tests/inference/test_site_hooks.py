"""The live capture's site hooks on stand-ins laid out like vLLM's decoders (no engine).

vLLM's Gemma models scale the embedding after ``embed_tokens`` (``embed_tokens(ids) *
self.normalizer`` in the model's forward); transformers scales inside its embedding module,
so the recorder's ``embed`` (what decoder layer 0 reads) is the scaled embedding. The hook
must store the scaled one too; for a model without a ``normalizer`` it stores the lookup.
The engine-level check of every architecture is ``test_architectures.py``.
"""

from __future__ import annotations

import torch

HIDDEN, VOCAB, ROWS = 64, 100, 16


class _Layer(torch.nn.Module):  # vLLM's decoder-layer contract: (hidden_states, residual) unsummed
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(HIDDEN, HIDDEN)

    def forward(self, positions, hidden_states, residual):
        residual = hidden_states if residual is None else hidden_states + residual
        return self.lin(residual), residual


class _Norm(torch.nn.Module):  # fused add-norm: (normed, residual)
    def forward(self, hidden_states, residual):
        x = hidden_states + residual
        return x / x.norm(dim=-1, keepdim=True), x


class _Inner(torch.nn.Module):
    def __init__(self, embed: torch.Tensor, scale: float | None):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding.from_pretrained(embed.clone())
        self.layers = torch.nn.ModuleList([_Layer(), _Layer()])
        self.norm = _Norm()
        if scale is not None:
            self.register_buffer("normalizer", torch.tensor(scale), persistent=False)

    def forward(self, ids, positions):
        h = self.embed_tokens(ids)
        if hasattr(self, "normalizer"):
            h = h * self.normalizer
        residual = None
        for layer in self.layers:
            h, residual = layer(positions, h, residual)
        return self.norm(h, residual)[0]


class _Model(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.model = inner


def _capture(inner: _Inner, ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    from stepprobe.inference.hooks import install_hooks

    sites = ["embed", "layer_00", "layer_01", "final_norm"]
    buffers, handles = install_hooks(_Model(inner), sites, HIDDEN, ROWS, torch.float32, torch.device("cpu"))
    try:
        with torch.no_grad():
            out = inner(ids, torch.arange(len(ids)))
    finally:
        for h in handles:
            h.remove()
    return {s: b[: len(ids)].clone() for s, b in buffers.items()}, out


def test_embed_site_is_what_layer_0_reads_with_gemmas_scale():
    """Gemma: the hook stores ``embed_tokens(ids) * normalizer``, which equals transformers'
    ``Gemma3TextScaledWordEmbedding`` output (the recorder's ``embed``) for the same weights."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    torch.manual_seed(0)
    hf = Gemma3TextScaledWordEmbedding(VOCAB, HIDDEN, 0, embed_scale=HIDDEN ** 0.5)  # as Gemma3TextModel builds it
    ids = torch.tensor([5, 17, 42, 3])
    got, _ = _capture(_Inner(hf.weight.detach(), HIDDEN ** 0.5), ids)
    with torch.no_grad():
        ref = hf(ids)
    torch.testing.assert_close(got["embed"], ref, rtol=0, atol=0)
    assert not torch.allclose(got["embed"], hf.weight[ids].detach())  # the raw lookup is not the site


def test_embed_site_without_a_normalizer_is_the_lookup_and_layers_are_the_residual_stream():
    torch.manual_seed(0)
    weight = torch.randn(VOCAB, HIDDEN)
    inner = _Inner(weight, None)
    ids = torch.tensor([1, 2, 3])
    got, out = _capture(inner, ids)
    torch.testing.assert_close(got["embed"], weight[ids], rtol=0, atol=0)
    with torch.no_grad():  # the residual stream after each layer: the pair's sum
        h, res = weight[ids], None
        streams = []
        for layer in inner.layers:
            h, res = layer(None, h, res)
            streams.append(h + res)
    torch.testing.assert_close(got["layer_00"], streams[0])
    torch.testing.assert_close(got["layer_01"], streams[1])
    torch.testing.assert_close(got["final_norm"], out)
