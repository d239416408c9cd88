"""What a probe reads and how: the feature spec, input normalization, and the full model.

A :class:`FeatureSpec` names the sites (``stepprobe.layers`` names: ``embed``,
``layer_00`` .., ``final_norm``) and how they combine:

- ``single``: one site;
- ``mean``: the mean of several sites (e.g. a range ``layer_10``..``layer_14``);
- ``concat``: their concatenation;
- ``mixture``: learned softmax weights over the sites (the ``mixture`` architecture).

Inputs are standardized per site and per dimension with mean/std computed on the
**training split only**; the statistics are buffers of :class:`ProbeModel`, so they are
saved with the weights and travel with the probe. So is the **calibration** ``(a, b)``
(buffer ``output_calibration``)
(fitted on the validation split, Platt or temperature scaling): the probability is
``sigmoid(a * logit + b)``; ``(1, 0)`` is none. Scores, thresholds and the threshold
policy all use that calibrated probability.

A site may be a step-mean feature (``layer_20.mean``, see :mod:`stepprobe.layers`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from stepprobe.errors import StepprobeError
from stepprobe.layers import parse_sites

from .registry import COMBINES, build_probe


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """Sites in the order the probe reads them, and how they combine."""

    sites: tuple[str, ...]
    combine: str = "single"

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", tuple(self.sites))
        if not self.sites:
            raise StepprobeError("a feature spec needs at least one site")
        if len(set(self.sites)) != len(self.sites):
            raise StepprobeError(f"feature spec lists a site twice: {list(self.sites)}")
        if self.combine not in COMBINES:
            raise StepprobeError(f"unknown feature combination {self.combine!r}; known: {', '.join(COMBINES)}")
        if self.combine == "single" and len(self.sites) != 1:
            raise StepprobeError(f"combine='single' takes one site, got {list(self.sites)}")

    @classmethod
    def parse(cls, sites: str | Sequence[str], combine: str | None, num_layers: int) -> "FeatureSpec":
        """From a user's site list (``layer_20``, ``20``, ``10-14``, ``all``...) and combine mode."""
        names = parse_sites(list(sites) if not isinstance(sites, str) else sites, num_layers)
        if combine in (None, "", "auto"):
            combine = "single" if len(names) == 1 else "mean"
        return cls(tuple(names), combine)

    def to_dict(self) -> dict[str, Any]:
        return {"sites": list(self.sites), "combine": self.combine}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FeatureSpec":
        return cls(tuple(d["sites"]), d.get("combine", "single"))

    @property
    def label(self) -> str:
        if len(self.sites) == 1:
            return self.sites[0]
        return f"{self.combine}({self.sites[0]}..{self.sites[-1]})"


class Normalizer(nn.Module):
    """``(x - mean) / std`` per site and dimension; statistics are buffers (saved with the probe)."""

    def __init__(self, num_sites: int, hidden_size: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_sites, hidden_size))
        self.register_buffer("std", torch.ones(num_sites, hidden_size))

    @torch.no_grad()
    def fit(self, x: np.ndarray | torch.Tensor, eps: float = 1e-6) -> "Normalizer":
        """Set the statistics from training features ``x[n, S, H]`` (float64 accumulation)."""
        t = torch.as_tensor(np.asarray(x), dtype=torch.float64)
        if t.ndim != 3 or tuple(t.shape[1:]) != tuple(self.mean.shape):
            raise StepprobeError(f"normalizer expects features [n, {self.mean.shape[0]}, {self.mean.shape[1]}], got {list(t.shape)}")
        self.mean.copy_(t.mean(0).float())
        self.std.copy_(t.std(0, unbiased=False).clamp_min(eps).float())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ProbeModel(nn.Module):
    """Normalization + probe. ``logits(x)`` for training; ``forward(x)`` is the probability.

    ``x`` is ``float32 [n, len(spec.sites), hidden_size]`` of raw (unnormalized) hidden states.
    """

    def __init__(self, spec: FeatureSpec, arch: str, hidden_size: int, params: dict[str, Any] | None = None):
        super().__init__()
        self.spec = spec
        self.arch = arch
        self.hidden_size = int(hidden_size)
        self.params = dict(params or {})
        self.norm = Normalizer(len(spec.sites), self.hidden_size)
        # (a, b) of sigmoid(a * logit + b); fitted on validation after training.
        self.register_buffer("output_calibration", torch.tensor([1.0, 0.0]))
        self.probe = build_probe(arch, num_sites=len(spec.sites), hidden_size=self.hidden_size,
                                 combine=spec.combine, **self.params)

    def describe(self) -> dict[str, Any]:
        return {"architecture": self.arch, "params": dict(self.params), "feature_spec": self.spec.to_dict(),
                "hidden_size": self.hidden_size}

    def _check(self, x: torch.Tensor) -> None:
        want = (len(self.spec.sites), self.hidden_size)
        if x.ndim != 3 or tuple(x.shape[1:]) != want:
            raise StepprobeError(f"probe expects features [n, {want[0]}, {want[1]}], got {list(x.shape)}")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self.probe(self.norm(x.float()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated probability that the trace ends correct."""
        return torch.sigmoid(self.output_calibration[0] * self.logits(x) + self.output_calibration[1])

    @torch.no_grad()
    def set_calibration(self, a: float, b: float) -> None:
        self.output_calibration.copy_(torch.tensor([float(a), float(b)]))

    @property
    def uses_step_mean(self) -> bool:
        return any(s.endswith(".mean") for s in self.spec.sites)
