"""One name for each hidden-state site, shared by the recorder, probes, tuner and runner.

Sites, for a decoder with ``n`` layers:

- ``embed``: the token embeddings (input of decoder layer 0). transformers ``hidden_states[0]``.
- ``layer_00`` .. ``layer_{n-1}``: the residual stream **after** decoder layer ``i``, before
  any final norm. transformers ``hidden_states[i + 1]`` for ``i < n - 1``; for the last layer
  transformers returns the post-norm value instead, so the recorder reads it with a hook.
  In vLLM a decoder layer returns ``(hidden_states, residual)`` and the residual stream is
  their sum.
- ``final_norm``: the output of the model's final norm (what the LM head sees). transformers
  ``hidden_states[n]``.

The same strings name HDF5 datasets, probe feature specs, Optuna parameters and the
runner's hooks.

What is read, per architecture (recorder: ``data_collection/record.py: SiteExtractor``, hooks
on the transformers model; live: ``inference/hooks.py: site_modules``, hooks on vLLM's model;
both agree in fp32 for every family below, ``tests/inference/test_architectures.py``):

- Llama, Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms), Phi-3 (fused ``qkv_proj`` and
  ``gate_up_proj``: only the weights are packed, the layer's output is the same), Qwen3-MoE
  (sparse MoE MLP in every layer): ``embed`` = ``embed_tokens`` output; ``layer_XX`` =
  residual stream after the layer (recorder: the layer's output; vLLM: the layer returns
  ``(hidden_states, residual)`` unsummed, the hook reads ``hidden_states + residual``, which
  vLLM computes only inside the next fused add-norm); ``final_norm`` = the final norm's
  output (vLLM's fused add-norm returns ``(normed, residual)``; the hook reads ``normed``).
- Gemma 3 (``gemma3_text``): **scaled embeddings**: transformers multiplies by
  ``sqrt(hidden_size)`` inside ``embed_tokens`` (``Gemma3TextScaledWordEmbedding``), vLLM after
  it, in the model's forward (``embed_tokens(ids) * normalizer``). ``embed`` is the scaled
  embedding, what decoder layer 0 reads, in both: the vLLM hook on ``embed_tokens`` multiplies
  by the model's own ``normalizer`` buffer (same op, same dtype as the model). **Post-norms**
  (``post_attention_layernorm`` and ``post_feedforward_layernorm`` on each branch before it is
  added): ``layer_XX`` is still the residual stream after the layer (the branches' sums),
  never a post-norm's output. **Sliding-window layers** read the same sites; the window
  changes attention, not what is read. ``final_norm`` = the final ``GemmaRMSNorm``
  (``1 + weight``) output, before the LM head (no logit soft-cap involved).

A *feature* is a site read one of two ways: ``layer_20`` is the hidden state at the step's
boundary token; ``layer_20.mean`` (:func:`mean_name`) is the mean of that site's hidden
states over the step's tokens (from the token after the previous boundary, or the first
generated token, up to and including the boundary token). Step means are recorded only
when asked for (``stepprobe record --step-mean``) and live capture in the runner does not
compute them, so a scorer that reads one is refused there.
"""

from __future__ import annotations

import re

from .errors import StepprobeError

EMBED = "embed"
FINAL_NORM = "final_norm"
_LAYER_RE = re.compile(r"^layer_(\d+)$")
MEAN_SUFFIX = ".mean"


def mean_name(site: str) -> str:
    """The step-mean feature of ``site`` (``layer_20`` -> ``layer_20.mean``)."""
    return site if site.endswith(MEAN_SUFFIX) else site + MEAN_SUFFIX


def split_feature(name: str) -> tuple[str, bool]:
    """``layer_20.mean`` -> ``("layer_20", True)``; ``layer_20`` -> ``("layer_20", False)``."""
    if name.endswith(MEAN_SUFFIX):
        return name[:-len(MEAN_SUFFIX)], True
    return name, False


def is_step_mean(name: str) -> bool:
    return name.endswith(MEAN_SUFFIX)


#: Group features (issue 23, :mod:`stepprobe.probes.group_features`): a site read against the
#: trace's siblings (``layer_20.group``, ``layer_20.group_step``, ``layer_20.gdev``), and ``text.group``.
GROUP_KINDS = (".group_step", ".group", ".gdev")
TEXT_GROUP = "text.group"


def split_group(name: str) -> tuple[str, str | None]:
    """``layer_20.group`` -> ``("layer_20", ".group")``; a plain feature -> ``(name, None)``."""
    for kind in GROUP_KINDS:
        if name.endswith(kind):
            return name[:-len(kind)], kind
    return name, None


def layer_name(index: int) -> str:
    """Name of the residual stream after decoder layer ``index`` (0-based)."""
    return f"layer_{index:02d}"


def all_sites(num_layers: int) -> list[str]:
    """Every recorded site in model order: embed, layer_00.., final_norm."""
    return [EMBED, *(layer_name(i) for i in range(num_layers)), FINAL_NORM]


def layer_index(name: str) -> int | None:
    """Decoder-layer index of a ``layer_XX`` site; ``None`` for embed and final_norm."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def site_depth(name: str, num_layers: int) -> int:
    """Position of a site in model order (embed 0, layer_i i+1, final_norm n+1); for plots.

    A step-mean feature (``layer_20.mean``) or a group feature has the depth of its site
    (``text.group``: 0)."""
    if name == TEXT_GROUP:
        return 0
    name = split_feature(split_group(name)[0])[0]
    if name == EMBED:
        return 0
    if name == FINAL_NORM:
        return num_layers + 1
    idx = layer_index(name)
    if idx is None or idx >= num_layers:
        raise StepprobeError(f"unknown site {name!r}; sites are {EMBED}, layer_00..{layer_name(num_layers - 1)}, {FINAL_NORM}")
    return idx + 1


def parse_sites(spec: str | list[str], num_layers: int) -> list[str]:
    """Parse a user's site list: names, indices, ranges like ``10-20``, ``all``, ``layers``.

    Any item may end in ``.mean`` for the step-mean features of what it names
    (``layers.mean``, ``10-14.mean``, ``layer_20.mean``), or in a group kind for its group
    features (``layer_20.group``, ``10-14.gdev``; ``text.group`` as it is)."""
    items = spec if isinstance(spec, list) else [s.strip() for s in spec.split(",") if s.strip()]
    out: list[str] = []
    for item in items:
        item = str(item)
        base, mean = split_feature(item)
        group_base, kind = split_group(item)
        if kind is not None and item != TEXT_GROUP:
            out.extend(n + kind for n in parse_sites([group_base], num_layers))
        elif mean:
            out.extend(mean_name(n) for n in parse_sites([base], num_layers))
        elif item == "all":
            out.extend(all_sites(num_layers))
        elif item == "layers":
            out.extend(layer_name(i) for i in range(num_layers))
        elif re.fullmatch(r"-?\d+", item):
            i = int(item) % num_layers if int(item) < 0 else int(item)
            out.append(layer_name(i))
        elif re.fullmatch(r"\d+-\d+", item):
            a, b = map(int, item.split("-"))
            out.extend(layer_name(i) for i in range(a, b + 1))
        else:
            out.append(item)
    for name in out:
        site_depth(name, num_layers)  # validates
    return list(dict.fromkeys(out))
