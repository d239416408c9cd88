"""Train one step-level probe with Lightning on an HDF5 file from `stepprobe record`.

One config in, one run directory out:

  run.json       kind "stepprobe-train-run": resolved config, data fingerprint (model
                 identity, boundary rule, file), the problem split (seed, ids), versions
  metrics.json   val and test metrics of the probe and of the scikit-learn reference,
                 the chosen threshold (max F1 on validation), best epoch
  scorer/        the probe as a scorer checkpoint (safetensors + JSON), ready for `stepprobe run`
  plots/         roc.png, calibration.png, score_vs_step.png
  logs/          Lightning CSV logs (metrics.csv per epoch); checkpoints/best.ckpt

Splits are by problem. Early stopping and checkpointing watch `--monitor` (default val_auroc).
Example: stepprobe train --data states.h5 --sites layer_20 --arch mlp --output runs/probe
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from stepprobe.config import StageConfig, option
from stepprobe.errors import StepprobeError
from stepprobe.io import atomic_write_json
from stepprobe.options import FitOptions, TrainingOptions, generation_of
from stepprobe.probes.checkpoint import save_scorer
from stepprobe.probes.features import FeatureSpec, ProbeModel
from stepprobe.probes.registry import known_probes
from stepprobe.provenance import package_versions
from stepprobe.stats import N_BOOT

from . import metrics as M
from .data import (FeatureCache, ProbeDataModule, SplitRows, check_classes, data_fingerprint, make_split,
                   open_hidden_states)
from .module import ProbeLightningModule, predict

log = logging.getLogger(__name__)

RUN_KIND = "stepprobe-train-run"
RUN_SCHEMA_VERSION = 1
IMBALANCE = ("pos_weight", "none", "sampler")


@dataclasses.dataclass
class Config(StageConfig, FitOptions, TrainingOptions):
    """Train one probe (the training and fit groups: :mod:`stepprobe.options`)."""

    SECTION = "train"

    data: str = option("", "HDF5 file written by `stepprobe record`")
    out: str = option("", "run directory (default: <STEPPROBE_HOME>/runs/train-<time>)")
    sites: str = option("auto", "site(s) the probe reads: layer_20, 20, 10-14, final_norm, ... "
                                "(auto: the middle decoder layer)")
    combine: str = option("auto", "how several sites combine: single, mean, concat, mixture (auto: single/mean)")
    arch: str = option("mlp", "probe architecture: " + ", ".join(known_probes()))
    params: dict = option(help="architecture parameters as JSON, e.g. '{\"width\": 256}'", factory=dict)
    loss: str = option("bce", "training loss: bce (label of each step), pairwise (rank a problem's correct steps "
                              "above its wrong ones at similar relative positions), mixed (both)")
    pair_weight: float = option(0.5, "mixed loss: weight of the pairwise part (1 - weight on BCE)")
    pair_window: float = option(0.25, "pairwise loss: largest relative-position gap of a (correct, wrong) step pair")
    reference: bool = option(True, "also fit the scikit-learn logistic-regression reference")
    bootstrap: int = option(N_BOOT, "bootstrap resamples (of problems) for the within-problem metrics' intervals (0: none)")
    calibration: str = option("platt", "calibration fitted on the validation split and stored in the scorer: "
                                       "platt (a * logit + b), temperature (logit / T), none")
    plots: bool = option(True, "write ROC, calibration and score-vs-step plots")
    overwrite: bool = option(False, "replace an existing run directory", resume_ok=True)
    progress: bool = option(True, "show Lightning's progress bar", resume_ok=True)
    accelerator: str = option("cpu", "Lightning accelerator (cpu, gpu, auto)")

    def check(self) -> None:
        check_config(self)


@dataclasses.dataclass
class TrainResult:
    probe: ProbeModel
    spec: FeatureSpec
    split: SplitRows
    metrics: dict[str, dict[str, float]]  # {"val": {...}, "test": {...}, "reference_val": ..., "reference_test": ...}
    threshold: float
    best_epoch: int | None
    best_score: float | None
    epochs_run: int
    predictions: dict[str, dict[str, np.ndarray]]  # split -> scores, labels, trace, step, rel_position
    calibration: dict[str, Any] = dataclasses.field(default_factory=lambda: {"method": "none"})
    group: dict[str, Any] | None = None  # group features: what the scorer checkpoint keeps (alignment, standardization)

    def flat_metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for part, d in self.metrics.items():
            for k, v in d.items():
                out[f"{part}_{k}"] = v
        return out


def resolve_spec(config: Config, num_layers: int) -> FeatureSpec:
    sites = config.sites
    if sites in ("", "auto"):
        sites = f"layer_{num_layers // 2:02d}"
    combine = "mixture" if config.arch == "mixture" and config.combine in ("", "auto") else config.combine
    return FeatureSpec.parse(sites, combine, num_layers)


def check_config(config: Config) -> None:
    """The checks of a train config (run when it is built: ``Config.check``)."""
    if config.imbalance not in IMBALANCE:
        raise StepprobeError(f"unknown imbalance handling {config.imbalance!r}; known: {', '.join(IMBALANCE)}")
    from .module import LOSSES

    if config.loss not in LOSSES:
        raise StepprobeError(f"unknown loss {config.loss!r}; known: {', '.join(LOSSES)}")
    if config.loss != "bce" and config.imbalance == "sampler":
        raise StepprobeError(f"loss {config.loss!r} batches whole problems; it cannot use imbalance=sampler "
                             "(use pos_weight or none)")
    if not 0 <= config.pair_weight <= 1 or config.pair_window < 0:
        raise StepprobeError(f"pair_weight must be in [0, 1] and pair_window >= 0 (got {config.pair_weight}, "
                             f"{config.pair_window})")
    M.mode_of(config.monitor)
    if not config.monitor.startswith(M.VAL + "_"):
        raise StepprobeError(f"monitor must be a validation metric (val_...), got {config.monitor!r}")
    from .evaluation import CALIBRATIONS

    if config.calibration not in CALIBRATIONS:
        raise StepprobeError(f"unknown calibration {config.calibration!r}; known: {', '.join(CALIBRATIONS)}")
    if config.arch not in known_probes():
        raise StepprobeError(f"unknown probe architecture {config.arch!r}; known: {', '.join(known_probes())}")


def quiet_lightning() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.seed", "lightning.pytorch.callbacks.model_summary"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*The number of training batches.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def train_probe(config: Config, hs, *, cache: FeatureCache | None = None, out_dir: Path | None = None,
                callbacks: Sequence[Any] = (), evaluate_test: bool = True,
                split: SplitRows | None = None, fixed_epochs: int | None = None) -> TrainResult:
    """The one training function: `train`, `sweep`, `tune` and `export` all call it.

    With ``evaluate_test=False`` (tuning) the test split is never loaded or scored. With
    ``fixed_epochs`` (a refit on train+validation) there is no early stopping and the
    weights after the last epoch are kept.
    """
    import lightning.pytorch as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    quiet_lightning()
    spec = resolve_spec(config, hs.num_layers)
    cache = cache or FeatureCache(hs)
    split = split or make_split(hs, val_fraction=config.val_fraction, test_fraction=config.test_fraction,
                                seed=config.split_seed, max_steps_per_trace=config.max_steps_per_trace,
                                subsample_seed=config.seed)
    batch_size = config.batch_size or auto_batch_size(len(split.rows[M.TRAIN]))
    dm = ProbeDataModule(hs, spec, split, cache=cache, batch_size=batch_size, imbalance=config.imbalance,
                         seed=config.seed, include_test=evaluate_test, group_batches=config.loss != "bce")
    check_classes(split, hs, test=evaluate_test)
    dm.setup("fit")
    n_neg, n_pos = dm.class_counts()
    if n_pos == 0 or n_neg == 0:
        raise StepprobeError(f"the training split has only one class ({n_pos} correct, {n_neg} incorrect steps); "
                             "a probe cannot learn from it")
    L.seed_everything(config.seed, verbose=False)
    probe = ProbeModel(spec, config.arch, dm.arrays[M.TRAIN].x.shape[2], dict(config.params))  # group features: their width
    probe.norm.fit(dm.arrays[M.TRAIN].x)
    pos_weight = n_neg / n_pos if config.imbalance == "pos_weight" else None
    module = ProbeLightningModule(probe, lr=config.lr, weight_decay=config.weight_decay, pos_weight=pos_weight,
                                  loss=config.loss, pair_weight=config.pair_weight, pair_window=config.pair_window)

    mode = M.mode_of(config.monitor)
    with tempfile.TemporaryDirectory(prefix="stepprobe-ckpt-") as tmp:
        ckpt_dir = (out_dir / "checkpoints") if out_dir else Path(tmp)
        ckpt = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=config.monitor, mode=mode, save_top_k=1,
                               save_weights_only=True, enable_version_counter=False)
        stop = EarlyStopping(monitor=config.monitor, mode=mode, patience=config.patience)
        logger: Any = False
        if out_dir:
            logger = [CSVLogger(str(out_dir), name="logs", version="")]
            if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
                from lightning.pytorch.loggers import TensorBoardLogger

                logger.append(TensorBoardLogger(str(out_dir), name="logs", version="tensorboard"))
        control = [stop, ckpt] if fixed_epochs is None else []
        trainer = L.Trainer(max_epochs=fixed_epochs or config.max_epochs, accelerator=config.accelerator, devices=1,
                            callbacks=[*control, *callbacks], logger=logger, enable_progress_bar=config.progress,
                            enable_checkpointing=fixed_epochs is None,
                            enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1,
                            deterministic=False)
        trainer.fit(module, datamodule=dm)
        best_path = ckpt.best_model_path if fixed_epochs is None else ""
        if best_path:
            state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
            module.load_state_dict(state)
        best_score = float(ckpt.best_model_score) if ckpt.best_model_score is not None else None
        best_epoch = _epoch_of_best(trainer, stop) if fixed_epochs is None else fixed_epochs - 1
    probe = module.probe.cpu().eval()

    preds: dict[str, dict[str, np.ndarray]] = {}
    for s, arr in dm.arrays.items():
        if s == M.TRAIN:
            continue
        preds[s] = {"scores": predict(probe, arr.x), "labels": arr.y, "trace": arr.trace, "step": arr.step,
                    "rel_position": arr.rel_position, "problem": arr.problem}
    # Calibration on validation (stored in the probe): scores, threshold and ECE are then
    # calibrated probabilities; the uncalibrated ECE is kept beside for the report.
    uncalibrated_ece = {s: M.ece(p["scores"], p["labels"]) for s, p in preds.items()}
    calibration = fit_calibration_for(probe, preds[M.VAL], config.calibration)
    if calibration is not None:
        for s, arr in dm.arrays.items():
            if s != M.TRAIN:
                preds[s]["scores"] = predict(probe, arr.x)
    threshold = M.best_f1_threshold(preds[M.VAL]["scores"], preds[M.VAL]["labels"])
    result_metrics: dict[str, dict[str, float]] = {}
    for s, p in preds.items():
        result_metrics[s] = M.compute_metrics(p["scores"], p["labels"], trace=p["trace"],
                                              rel_position=p["rel_position"], threshold=threshold,
                                              problem=p["problem"], bootstrap=config.bootstrap)
    calibration_doc = {**(calibration.to_dict() if calibration else {"method": "none", "a": 1.0, "b": 0.0}),
                       "fitted_on": M.VAL, "ece_before": uncalibrated_ece,
                       "ece_after": {s: result_metrics[s][M.ECE] for s in preds}}
    if config.reference:
        ref = fit_reference_for(dm, spec, config.seed)
        ref_val = ref(dm.arrays[M.VAL].x)
        ref_threshold = M.best_f1_threshold(ref_val, dm.arrays[M.VAL].y)
        for s, arr in dm.arrays.items():
            if s == M.TRAIN:
                continue
            sc = ref_val if s == M.VAL else ref(arr.x)
            preds[s]["reference_scores"] = sc
            result_metrics[f"reference_{s}"] = M.compute_metrics(sc, arr.y, trace=arr.trace,
                                                                 rel_position=arr.rel_position, threshold=ref_threshold,
                                                                 problem=arr.problem, bootstrap=config.bootstrap)
    return TrainResult(probe=probe, spec=spec, split=split, metrics=result_metrics, threshold=threshold,
                       best_epoch=best_epoch, best_score=best_score, epochs_run=int(trainer.current_epoch),
                       predictions=preds, calibration=M.clean(calibration_doc), group=cache.group_info(spec.sites))


def fit_calibration_for(probe: ProbeModel, val: dict[str, np.ndarray], method: str):
    """Fit ``method`` on the validation scores and store it in ``probe``; ``None`` if not fitted."""
    from .evaluation import fit_calibration

    if method == "none":
        return None
    labels = np.asarray(val["labels"])
    if labels.size == 0 or labels.min() == labels.max():
        log.warning("validation has one class only: the scorer is left uncalibrated")
        return None
    cal = fit_calibration(val["scores"], labels, method)
    probe.set_calibration(cal.a, cal.b)
    return cal


def auto_batch_size(n_train: int) -> int:
    """About 16 optimizer steps per epoch, within 32..1024: small data still gets enough
    updates, large data keeps Lightning's per-step overhead small."""
    return int(min(1024, max(32, n_train // 16)))


def fit_reference_for(dm: ProbeDataModule, spec: FeatureSpec, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    from .reference import fit_reference

    tr = dm.arrays[M.TRAIN]
    return fit_reference(tr.x, tr.y, combine=spec.combine, seed=seed)


def _epoch_of_best(trainer, stop) -> int | None:
    # EarlyStopping counts validation checks since the best; one check per epoch here.
    try:
        return int(trainer.current_epoch) - 1 - int(stop.wait_count)
    except Exception:  # pragma: no cover - defensive
        return None


def prepare_out_dir(out: str, prefix: str, overwrite: bool, marker: str) -> Path:
    """Resolve (or create) an output directory; refuse one holding ``marker`` unless ``overwrite``.
    Locks it first (one writer per output, :mod:`stepprobe.locks`): nothing is replaced under
    another writer."""
    import datetime as dt
    import shutil

    from stepprobe import locks
    from stepprobe.paths import runs_dir

    path = Path(out) if out else runs_dir() / f"{prefix}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    locks.hold(path)
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise StepprobeError(f"{path} exists and is not empty; choose another --output or pass --overwrite")
        if not (path / marker).exists():
            raise StepprobeError(f"{path} is not a {prefix} run directory (no {marker}); refusing to replace it")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_run(out: Path, config: Config, hs, result: TrainResult, *, plots: bool = True,
              extra: dict[str, Any] | None = None, scorer_dir: Path | None = None,
              card: str | None = None) -> dict[str, Any]:
    """Write the run directory of a finished training (shared by `train` and `export`)."""
    fingerprint = data_fingerprint(hs)
    flat = M.clean(result.flat_metrics())
    save_scorer(scorer_dir or out / "scorer", result.probe, model=hs.model, boundary_rule=hs.boundary_rule, metrics=flat,
                config=config.to_dict(), threshold=result.threshold, calibration=result.calibration,
                provenance={"data": fingerprint, "split": result.split.info, **(extra or {})},
                generation=generation_of((hs.header.get("config") or {}).get("collect")), overwrite=True,
                card=card, group=result.group)
    metrics_doc = {"kind": "stepprobe-train-metrics", "schema_version": RUN_SCHEMA_VERSION,
                   "feature_spec": result.spec.to_dict(), "architecture": config.arch,
                   "threshold": result.threshold, "calibration": result.calibration,
                   "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                   "monitor": config.monitor, "best_monitor_value": result.best_score,
                   "metrics": M.clean(result.metrics), "num_steps": {k: int(len(v)) for k, v in result.split.rows.items()}}
    atomic_write_json(out / "metrics.json", metrics_doc)
    run_doc = {"kind": RUN_KIND, "schema_version": RUN_SCHEMA_VERSION, "config": config.to_dict(),
               "data": fingerprint, "split": result.split.to_dict(), "package_versions": package_versions(),
               **(extra or {})}
    atomic_write_json(out / "run.json", run_doc)
    if plots:
        from .plots import plot_train_run

        plot_train_run(out / "plots", result)
    return metrics_doc


def summary_line(result: TrainResult) -> str:
    parts = []
    for part in ("val", "test", "reference_test"):
        d = result.metrics.get(part)
        if d:
            parts.append(f"{part} AUROC {d[M.AUROC]:.3f} (early50 {d[M.EARLY_AUROC[0.5]]:.3f}, "
                         f"trace {d[M.TRACE_AUROC]:.3f}, within {d.get(M.WITHIN_AUROC, float('nan')):.3f}, "
                         f"rank50 {d.get(M.WITHIN_RANK[0.5], float('nan')):.3f})")
    return f"{result.spec.label} {result.probe.arch}: " + "; ".join(parts)


def run(config: Config) -> Path:
    if not config.data:
        raise StepprobeError("--data (an HDF5 file from `stepprobe record`) is required")
    hs = open_hidden_states(config.data)
    # The data is checked (split, classes, NaN/inf in the sites read) before the run directory exists.
    spec = resolve_spec(config, hs.num_layers)
    split = make_split(hs, val_fraction=config.val_fraction, test_fraction=config.test_fraction,
                       seed=config.split_seed, max_steps_per_trace=config.max_steps_per_trace,
                       subsample_seed=config.seed)
    check_classes(split, hs)
    cache = FeatureCache(hs)
    for site in spec.sites:
        cache.site(site)
    out = prepare_out_dir(config.out, "train", config.overwrite, "run.json")
    log.info("training %s on %s (%d steps, %d traces) -> %s", config.arch, config.data, hs.num_steps, hs.num_traces, out)
    result = train_probe(config, hs, out_dir=out, cache=cache, split=split)
    write_run(out, config, hs, result, plots=config.plots)
    log.info("%s", summary_line(result))
    log.info("run directory: %s (scorer in %s)", out, out / "scorer")
    return out
