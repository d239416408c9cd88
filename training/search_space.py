"""The search space of ``stepprobe tune``: a trial -> a ``stepprobe train`` config.

Site in ``--sites`` (a plain site, or a group feature of one: ``layer_20.group``, ``10-14.gdev``,
``text.group``, :mod:`stepprobe.probes.group_features`); combine in ``--combines`` (mean/concat/mixture take a window of
2..``--max-window`` consecutive sites); step feature in ``--step-features`` (the boundary
token's state, the step's mean over its tokens, or both); arch in ``--archs`` (mixture iff
combine=mixture); width, depth, dropout where the architecture has them; lr, weight_decay
(log scale); imbalance in ``--imbalances``; loss in ``--losses``. The parameter names are
the ones Optuna records (``trials.csv``, ``best.json``).
"""

from __future__ import annotations

from typing import Any

from stepprobe.errors import StepprobeError
from stepprobe.options import TrainingOptions, group_values
from stepprobe.probes.registry import COMBINES, known_probes

from . import metrics as M
from .train import IMBALANCE
from .train import Config as TrainConfig

WIDTHS = (32, 64, 128, 256, 512)


def csv_list(s: str) -> list[str]:
    return [x.strip() for x in str(s).split(",") if x.strip()]


STEP_FEATURES = ("boundary", "mean", "both")


def step_feature_kinds(cfg: Any, candidates: list[str], hs) -> list[str]:
    """The step-feature kinds a study searches (see ``--step-features``)."""
    has_means = bool(candidates) and all(s in getattr(hs, "mean_sites", []) for s in candidates)
    kinds = csv_list(cfg.step_features)
    if kinds == ["auto"]:
        return list(STEP_FEATURES) if has_means else ["boundary"]
    bad = [k for k in kinds if k not in STEP_FEATURES]
    if bad or not kinds:
        raise StepprobeError(f"unknown step feature(s) {', '.join(bad) or '(none)'}; use auto or "
                             f"{', '.join(STEP_FEATURES)}")
    if set(kinds) - {"boundary"} and not has_means:
        raise StepprobeError(f"--step-features {cfg.step_features} needs step means for every candidate site; "
                             "record them with `stepprobe record --step-mean`")
    return kinds


def check_widths(cfg: Any, candidates: list[str]) -> None:
    """Refuse (one line) a window combine over candidates of different widths: group scalars
    (``.group``, ``.group_step``; ``text.group``'s three) beside hidden-size features."""
    from stepprobe.layers import TEXT_GROUP, split_group

    widths = {s if s == TEXT_GROUP else split_group(s)[1] in (".group", ".group_step") for s in candidates}
    if len(widths) > 1 and set(csv_list(cfg.combines)) - {"single"}:
        raise StepprobeError(f"--combines {cfg.combines}: a window over --sites {cfg.sites} would join group "
                             "scalars with hidden-size features; tune them in separate studies or use --combines single")


def trial_config(trial, cfg: Any, candidates: list[str], kinds: list[str] | None = None) -> TrainConfig:
    """Translate a trial into a training config (the only thing the objective adds)."""
    combines = csv_list(cfg.combines)
    combine = trial.suggest_categorical("combine", combines) if len(combines) > 1 else combines[0]
    site = trial.suggest_categorical("site", candidates)
    sites = [site]
    if combine != "single":
        window = trial.suggest_int("window", 2, max(2, min(cfg.max_window, len(candidates))))
        i = candidates.index(site)
        start = max(0, min(i, len(candidates) - window))
        sites = candidates[start:start + window]
    kinds = kinds or ["boundary"]
    kind = trial.suggest_categorical("step_feature", kinds) if len(kinds) > 1 else kinds[0]
    if kind == "mean":
        sites = [f"{s}.mean" for s in sites]
    elif kind == "both":
        sites = [x for s in sites for x in (s, f"{s}.mean")]
        if combine == "single":
            combine = "concat"
    if combine == "mixture":
        arch = "mixture"
    else:
        archs = [a for a in csv_list(cfg.archs) if a != "mixture"]
        arch = trial.suggest_categorical("arch", archs) if len(archs) > 1 else archs[0]
    params: dict[str, Any] = {}
    if arch in ("mlp", "deep_mlp", "mixture"):
        params["width"] = trial.suggest_categorical("width", list(WIDTHS))
    if arch == "deep_mlp":
        params["depth"] = trial.suggest_int("depth", 1, 3)
    if arch in ("deep_mlp", "mixture"):
        params["dropout"] = trial.suggest_float("dropout", 0.0, 0.5)
    lr = trial.suggest_float("lr", cfg.lr_min, cfg.lr_max, log=True)
    wd = trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True)
    imbalances = csv_list(cfg.imbalances)
    imbalance = trial.suggest_categorical("imbalance", imbalances) if len(imbalances) > 1 else imbalances[0]
    losses = csv_list(cfg.losses)
    loss = trial.suggest_categorical("loss", losses) if len(losses) > 1 else losses[0]
    pair_weight = trial.suggest_float("pair_weight", 0.1, 0.9) if loss == "mixed" else 0.5
    return TrainConfig(**group_values(cfg, TrainingOptions), data=cfg.data, sites=",".join(sites), combine=combine,
                       arch=arch, params=params, lr=lr, weight_decay=wd, monitor=cfg.objective, imbalance=imbalance,
                       loss=loss, pair_weight=pair_weight, reference=False, plots=False, progress=False)


def check_space(cfg: Any) -> None:
    for c in csv_list(cfg.combines):
        if c not in COMBINES:
            raise StepprobeError(f"unknown combine {c!r}; known: {', '.join(COMBINES)}")
    for a in csv_list(cfg.archs):
        if a not in known_probes():
            raise StepprobeError(f"unknown probe architecture {a!r}; known: {', '.join(known_probes())}")
    if not [a for a in csv_list(cfg.archs) if a != "mixture"] and csv_list(cfg.combines) != ["mixture"]:
        raise StepprobeError("--archs needs an architecture other than mixture unless --combines is mixture")
    for i in csv_list(cfg.imbalances):
        if i not in IMBALANCE:
            raise StepprobeError(f"unknown imbalance handling {i!r}; known: {', '.join(IMBALANCE)}")
    from .module import LOSSES

    for loss in csv_list(cfg.losses):
        if loss not in LOSSES:
            raise StepprobeError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
    if set(csv_list(cfg.losses)) - {"bce"} and "sampler" in csv_list(cfg.imbalances):
        raise StepprobeError("the pairwise and mixed losses batch whole problems and cannot use imbalance=sampler; "
                             "drop sampler from --imbalances")
    if M.mode_of(cfg.objective) != "max" or not cfg.objective.startswith(M.VAL + "_"):
        raise StepprobeError(f"the objective must be a validation metric to maximize (val_auroc, val_early50_auroc, "
                             f"val_within_auroc, val_within_rank50, ...), got {cfg.objective!r}")
