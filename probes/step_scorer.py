"""Convert a scorer trained by the STEP paper's code into a stepprobe scorer.

The paper's ``train_scorer.py`` trains ``MLPClassifier``: ``net = Sequential(Linear(D, 512),
ReLU, Linear(512, 1))`` on raw final-norm hidden states (transformers'
``last_hidden_state``) with ``BCEWithLogitsLoss``; the probability is the sigmoid of its
output. Its checkpoints are ``torch.save`` dicts holding ``model_state_dict`` beside the
optimizer state, metrics and the loss curve; a bare state dict (keys ``net.0.weight``,
``net.0.bias``, ``net.2.weight``, ``net.2.bias``) and a ``.safetensors`` file of one are read
too. (Format as described from the paper's training code; no released checkpoint could be
downloaded where this was written.)

The result is an ordinary scorer directory (``scorer.safetensors`` + ``scorer.json``) for the
named model: architecture ``mlp`` with the checkpoint's width, site ``final_norm``,
identity normalization (mean 0, std 1: the paper normalizes nothing), and the paper's
boundary rule (:func:`stepprobe.boundaries.step_paper_rule`: a token whose own text holds
``"\\n\\n"``, nothing after ``</think>``) recorded as such, so ``stepprobe run`` and
``stepprobe serve`` segment like the paper, and the paper's prompt as the scorer's
``generation`` record, so ``run`` and ``bench`` build the paper's prompts unless told
otherwise (the sampling settings are not in a checkpoint: pass them). ``net.i.*`` maps to the probe's ``head.i.*``: the
layers are the same, and on the same float32 features the scores are the paper's forward.

Safety: the checkpoint is read with ``torch.load(weights_only=True)`` only
(:mod:`stepprobe.safe_load`); a file that needs full unpickling is refused in one line and
nothing in it runs.

Examples::

    stepprobe import-step-scorer --checkpoint best_model.pt --model Qwen/Qwen3-4B-Thinking-2507 \\
        --output runs/qwen3-4b/scorer
    stepprobe serve --scorer runs/qwen3-4b/scorer --prompt-preset step-paper -- --port 8000
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Mapping

import torch

from stepprobe import locks
from stepprobe.config import StageConfig, option
from stepprobe.errors import ArtifactMismatch, StepprobeError
from stepprobe.io import sha256_file
from stepprobe.layers import FINAL_NORM
from stepprobe.step_paper import STEP_PROMPT, model_identity_for, paper_boundary_rule

from .checkpoint import CONFIG_FILE, save_scorer
from .features import FeatureSpec, ProbeModel

log = logging.getLogger(__name__)

STEP_KEYS = ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias")
STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model")  # where a training script keeps the weights
PAPER_WIDTH = 512


@dataclasses.dataclass
class Config(StageConfig):
    SECTION = "import_step_scorer"

    checkpoint: str = option(help="the STEP scorer checkpoint: a torch.save dict with model_state_dict (as "
                                  "train_scorer.py writes), a bare state dict, or a .safetensors file")
    model: str = option(help="the model the scorer was trained on (name, local path or HF id; only its config "
                             "and tokenizer are read)")
    out: str = option(help="scorer directory to write")
    threshold: float = option(0.5, "the scorer's decision threshold (the paper's default cut is 0.5)")
    overwrite: bool = option(False, "replace a scorer already in --output")


# -- reading ---------------------------------------------------------------------------------

def read_step_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """``(state dict, the rest of the checkpoint, form)``; form is ``dict``, ``bare`` or ``safetensors``.

    Nothing is unpickled beyond ``torch.load(weights_only=True)``.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        if not path.is_file():
            raise StepprobeError(f"STEP checkpoint not found: {path}")
        try:
            return dict(load_file(str(path), device="cpu")), {}, "safetensors"
        except Exception as exc:  # safetensors raises its own types
            raise ArtifactMismatch(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    from stepprobe.safe_load import load_torch_file

    obj = load_torch_file(path, what="STEP checkpoint")
    if not isinstance(obj, Mapping):
        raise ArtifactMismatch(f"{path}: a STEP checkpoint is a dict (model_state_dict, or net.* tensors); "
                               f"this file holds a {type(obj).__name__}")
    for key in STATE_DICT_KEYS:
        if isinstance(obj.get(key), Mapping):
            rest = {k: v for k, v in obj.items() if k != key}
            return dict(obj[key]), rest, "dict"
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), {}, "bare"
    keys = ", ".join(sorted(map(str, obj))[:8])
    raise ArtifactMismatch(f"{path}: holds neither model_state_dict nor a bare state dict of tensors "
                           f"(top-level keys: {keys})")


def check_step_state_dict(sd: Mapping[str, Any], what: str) -> tuple[int, int]:
    """Refuse anything but the paper's MLP (one line); returns ``(input size D, width)``."""
    sd = dict(sd)
    if sd and all(str(k).startswith("module.") for k in sd):  # saved from DataParallel / DDP
        sd = {str(k)[len("module."):]: v for k, v in sd.items()}
    if set(sd) != set(STEP_KEYS):
        extra, missing = sorted(set(map(str, sd)) - set(STEP_KEYS)), sorted(set(STEP_KEYS) - set(sd))
        raise ArtifactMismatch(f"{what}: not the STEP MLPClassifier's state dict (keys {', '.join(STEP_KEYS)}); "
                               f"unexpected {extra[:6]}, missing {missing}")
    for k in STEP_KEYS:
        t = sd[k]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ArtifactMismatch(f"{what}: {k} is {getattr(t, 'dtype', type(t).__name__)}, expected a float tensor")
    w0, b0, w2, b2 = (sd[k] for k in STEP_KEYS)
    if w0.ndim != 2:
        raise ArtifactMismatch(f"{what}: net.0.weight has shape {list(w0.shape)}, expected [width, hidden]")
    width, d = (int(s) for s in w0.shape)
    want = {"net.0.bias": [width], "net.2.weight": [1, width], "net.2.bias": [1]}
    for k, shape in want.items():
        if list(sd[k].shape) != shape:
            raise ArtifactMismatch(f"{what}: {k} has shape {list(sd[k].shape)}, expected {shape} "
                                   f"(net.0.weight is [{width}, {d}])")
    if width < 1 or d < 1:
        raise ArtifactMismatch(f"{what}: empty layer (net.0.weight is [{width}, {d}])")
    for k in STEP_KEYS:
        if not torch.isfinite(sd[k]).all():
            raise ArtifactMismatch(f"{what}: {k} holds NaN or inf")
    return d, width


def _scalar(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v.item())
    if hasattr(v, "item") and getattr(v, "size", 2) == 1:  # numpy scalars
        try:
            return float(v.item())
        except (TypeError, ValueError):
            return None
    return None


def checkpoint_metrics(rest: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """Scalar entries (one level of nesting) as metrics; a short description of everything else."""
    metrics: dict[str, float] = {}
    other: dict[str, str] = {}
    for k, v in rest.items():
        s = _scalar(v)
        if s is not None:
            if math.isfinite(s):
                metrics[str(k)] = s
            continue
        if isinstance(v, Mapping) and "optim" not in str(k).lower():
            subs = {f"{k}.{kk}": _scalar(vv) for kk, vv in v.items()}
            got = {kk: vv for kk, vv in subs.items() if vv is not None and math.isfinite(vv)}
            if got:
                metrics.update(got)
                continue
        n = len(v) if hasattr(v, "__len__") else None
        other[str(k)] = type(v).__name__ + (f"[{n}]" if n is not None else "")
    return metrics, other


# -- converting ------------------------------------------------------------------------------

def step_probe(sd: Mapping[str, torch.Tensor]) -> ProbeModel:
    """The stepprobe probe that computes exactly the paper's ``sigmoid(net(x))`` on ``final_norm``."""
    d, width = check_step_state_dict(sd, "state dict")
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    probe = ProbeModel(FeatureSpec((FINAL_NORM,), "single"), "mlp", d, {"width": width})
    mapped = {f"probe.head.{k[len('net.'):]}": sd[k].detach().to(torch.float32) for k in STEP_KEYS}
    own = probe.state_dict()
    if set(mapped) - set(own):  # the registry's mlp layout moved: fail loudly, never silently mis-map
        raise StepprobeError(f"stepprobe's mlp probe has parameters {sorted(own)}; cannot place {sorted(mapped)}")
    with torch.no_grad():
        for k, v in mapped.items():
            own[k].copy_(v)
    # Identity normalization: the paper trains on raw features.
    probe.norm.mean.zero_()
    probe.norm.std.fill_(1.0)
    return probe.eval()


def convert_step_scorer(checkpoint: str | Path, out: str | Path, *, model: Mapping[str, Any],
                        tokenizer: Any | None = None, threshold: float = 0.5, overwrite: bool = False,
                        config: Mapping[str, Any] | None = None) -> Path:
    """Convert one checkpoint for the model with identity ``model``; returns the scorer directory."""
    checkpoint = Path(checkpoint)
    out = Path(out)
    if (out / CONFIG_FILE).exists() and not overwrite:
        raise StepprobeError(f"{out} already holds a scorer; pass --overwrite to replace it")
    sd, rest, form = read_step_checkpoint(checkpoint)
    d, width = check_step_state_dict(sd, str(checkpoint))
    hs = model.get("hidden_size")
    if hs is not None and int(hs) != d:
        raise ArtifactMismatch(f"{checkpoint} reads hidden size {d} (net.0.weight is [{width}, {d}]), but model "
                               f"{model.get('name')!r} has hidden size {hs}; convert it for the model it was "
                               "trained on")
    if width != PAPER_WIDTH:
        log.info("%s: hidden layer width %d (the paper's is %d); kept as is", checkpoint, width, PAPER_WIDTH)
    dtypes = sorted({str(sd[k].dtype).replace("torch.", "") for k in sd})
    probe = step_probe(sd)
    metrics, other = checkpoint_metrics(rest)
    meta_config = {
        "source": "step-paper-checkpoint",
        "converted_by": "stepprobe import-step-scorer",
        "input": "final_norm = transformers last_hidden_state (the paper's feature)",
        "normalization": "identity (the paper trains on raw features)",
        "prompt_preset": "step-paper",
        "prompt": dict(STEP_PROMPT),
        "checkpoint_form": form,
        "checkpoint_dtypes": dtypes,
        "checkpoint_other_keys": other,
        **dict(config or {}),
    }
    provenance = {"source_file": str(checkpoint.resolve()), "source_sha256": sha256_file(checkpoint),
                  "source_format": f"STEP train_scorer.py checkpoint ({form})"}
    path = save_scorer(out, probe, model=dict(model), boundary_rule=paper_boundary_rule(tokenizer),
                       metrics={f"step_checkpoint.{k}": v for k, v in metrics.items()}, config=meta_config,
                       threshold=threshold, provenance=provenance, overwrite=overwrite,
                       # run/bench default to the paper's prompt; its sampling is not in the checkpoint
                       generation={"prompt": dict(STEP_PROMPT)})
    log.info("converted %s (%s, D=%d, width %d, %s) -> %s for model %r", checkpoint, form, d, width,
             "/".join(dtypes), path, model.get("name"))
    return path


def run(config: Config) -> Path:
    # The checkpoint first: a bad or hostile file is refused before any model is read.
    check_step_state_dict(read_step_checkpoint(config.checkpoint)[0], str(config.checkpoint))
    locks.hold(config.out)  # one writer per scorer directory
    identity, tokenizer = model_identity_for(config.model)
    return convert_step_scorer(config.checkpoint, config.out, model=identity, tokenizer=tokenizer,
                               threshold=config.threshold, overwrite=config.overwrite,
                               config={"import": config.to_dict()})
