"""Probe architectures by name.

Every probe is a small ``torch.nn.Module`` that maps **normalized** features
``x[n, num_sites, hidden]`` to one logit per row (``[n]``); the feature combination
(one site, mean of a range, concatenation, learned mixture) is part of the probe, so a
probe built from ``(name, params, num_sites, hidden_size, combine)`` is fully described
by JSON. Normalization and the sigmoid live in :class:`stepprobe.probes.features.ProbeModel`.

Registered architectures:

- ``linear``: logistic regression on the combined features.
- ``mlp``: the STEP paper's probe, ``Linear(d, 512) -> ReLU -> Linear(512, 1)``.
- ``deep_mlp``: ``depth`` hidden layers of ``width`` with ReLU and dropout.
- ``mixture``: learned softmax weights over the sites, then an MLP head (``width=0`` for a
  linear head). Requires ``combine="mixture"``.

:func:`known_probes` lists the names (it feeds Optuna's ``suggest_categorical``);
an unknown name is answered with that list.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

from stepprobe.errors import StepprobeError

COMBINES = ("single", "mean", "concat", "mixture")

_REGISTRY: dict[str, type[nn.Module]] = {}


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: register a probe architecture under ``name`` (no duplicates)."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"probe architecture {name!r} is already registered ({_REGISTRY[name].__name__})")
        cls.ARCH = name  # type: ignore[attr-defined]
        _REGISTRY[name] = cls
        return cls

    return deco


def known_probes() -> list[str]:
    return list(_REGISTRY)


def probe_class(name: str) -> type[nn.Module]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise StepprobeError(f"unknown probe architecture {name!r}; known: {', '.join(known_probes())}") from None


def probe_params(name: str) -> dict[str, Any]:
    """The tunable parameters of an architecture with their defaults."""
    sig = inspect.signature(probe_class(name).__init__)
    skip = {"self", "num_sites", "hidden_size", "combine"}
    return {k: p.default for k, p in sig.parameters.items() if k not in skip}


def build_probe(name: str, *, num_sites: int, hidden_size: int, combine: str = "single", **params: Any) -> nn.Module:
    """Build architecture ``name``; unknown parameters are refused with the known ones."""
    cls = probe_class(name)
    known = probe_params(name)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise StepprobeError(f"probe {name!r}: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(known) or 'none'}")
    if combine not in COMBINES:
        raise StepprobeError(f"unknown feature combination {combine!r}; known: {', '.join(COMBINES)}")
    if (name == "mixture") != (combine == "mixture"):
        raise StepprobeError("the 'mixture' architecture and combine='mixture' go together "
                             f"(got architecture {name!r} with combine {combine!r})")
    if combine == "single" and num_sites != 1:
        raise StepprobeError(f"combine='single' reads one site, got {num_sites}; use mean, concat or mixture")
    if num_sites < 1 or hidden_size < 1:
        raise StepprobeError(f"probe needs at least one site and a positive hidden size (got {num_sites}, {hidden_size})")
    return cls(num_sites=num_sites, hidden_size=hidden_size, combine=combine, **params)


class _Combine(nn.Module):
    """Fixed combination of sites: single / mean / concat."""

    def __init__(self, combine: str, num_sites: int, hidden_size: int):
        super().__init__()
        self.combine = combine
        self.out_dim = hidden_size * num_sites if combine == "concat" else hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [n, S, H]
        if self.combine == "concat":
            return x.reshape(x.shape[0], -1)
        if self.combine == "mean":
            return x.mean(dim=1)
        return x[:, 0]


def _mlp(in_dim: int, width: int, depth: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        d = width
    layers.append(nn.Linear(d, 1))
    return nn.Sequential(*layers)


@register("linear")
class LinearProbe(nn.Module):
    """Logistic regression: one linear layer to one logit."""

    def __init__(self, *, num_sites: int, hidden_size: int, combine: str = "single"):
        super().__init__()
        self.combine = _Combine(combine, num_sites, hidden_size)
        self.head = nn.Linear(self.combine.out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.combine(x)).squeeze(-1)


@register("mlp")
class MLPProbe(nn.Module):
    """The STEP paper's probe: one hidden layer (512, ReLU), one logit."""

    def __init__(self, *, num_sites: int, hidden_size: int, combine: str = "single", width: int = 512):
        super().__init__()
        self.combine = _Combine(combine, num_sites, hidden_size)
        self.head = _mlp(self.combine.out_dim, int(width), 1, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.combine(x)).squeeze(-1)


@register("deep_mlp")
class DeepMLPProbe(nn.Module):
    """``depth`` hidden layers of ``width`` with ReLU and dropout."""

    def __init__(self, *, num_sites: int, hidden_size: int, combine: str = "single", width: int = 256,
                 depth: int = 2, dropout: float = 0.2):
        super().__init__()
        self.combine = _Combine(combine, num_sites, hidden_size)
        self.head = _mlp(self.combine.out_dim, int(width), int(depth), float(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.combine(x)).squeeze(-1)


@register("mixture")
class MixtureProbe(nn.Module):
    """Softmax weights over the sites (learned), then an MLP head (``width=0``: linear)."""

    def __init__(self, *, num_sites: int, hidden_size: int, combine: str = "mixture", width: int = 128,
                 dropout: float = 0.0):
        super().__init__()
        self.site_logits = nn.Parameter(torch.zeros(num_sites))
        self.head = _mlp(hidden_size, int(width), 1 if int(width) > 0 else 0, float(dropout))

    def site_weights(self) -> torch.Tensor:
        return torch.softmax(self.site_logits, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.einsum("nsh,s->nh", x, self.site_weights())
        return self.head(mixed).squeeze(-1)
