"""Export a probe as a scorer checkpoint for `stepprobe run`, with its test metrics.

`--source` is one of:

- a `stepprobe tune` directory (or `--storage URL --study-name NAME`): the best trial's
  training config is trained again (same problem split, same seed, early stopping on
  validation: it reproduces the trial) and then, for the first time in the study's life,
  scored on the test split. With `--refit train_val` it is instead retrained on train +
  validation problems for the trial's best number of epochs, keeping the threshold chosen
  on validation during the trial (more data, but no held-out validation left; the default
  `none` keeps the early-stopped model, which is what the study measured);
- a `stepprobe train` run directory: its scorer (already scored on test) is validated
  and copied.

The output directory is itself the scorer (scorer.json + scorer.safetensors, loadable
with `stepprobe.probes.checkpoint.load_scorer`), plus export.json (kind
"stepprobe-export": source, trial, metrics), metrics.json, run.json and plots/.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from stepprobe.config import StageConfig, option
from stepprobe.errors import ArtifactMismatch, StepprobeError
from stepprobe.io import atomic_write_json, read_json
from stepprobe.probes.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_scorer
from stepprobe.provenance import package_versions

from . import metrics as M
from .data import SplitRows, data_fingerprint, make_split, open_hidden_states
from .train import Config as TrainConfig
from .train import prepare_out_dir, summary_line, train_probe, write_run

log = logging.getLogger(__name__)

EXPORT_KIND = "stepprobe-export"
EXPORT_SCHEMA_VERSION = 1
REFITS = ("none", "train_val")


@dataclasses.dataclass
class Config(StageConfig):
    """Export a scorer."""

    SECTION = "export"

    source: str = option("", "a `stepprobe tune` directory or a `stepprobe train` run directory")
    storage: str = option("", "Optuna storage URL (instead of a tune directory)")
    study_name: str = option("stepprobe", "study name in --storage")
    trial: int = option(-1, "trial number to export (-1: the best trial)")
    data: str = option("", "HDF5 file (default: the one the study or run was trained on)")
    out: str = option("", "output scorer directory (default: <STEPPROBE_HOME>/runs/scorer-<time>)")
    refit: str = option("none", "none (keep the early-stopped model) or train_val (retrain on train+validation)")
    plots: bool = option(True, "write ROC, calibration and score-vs-step plots")
    overwrite: bool = option(False, "replace an existing export directory")

    def check(self) -> None:
        if self.refit not in REFITS:
            raise StepprobeError(f"unknown refit {self.refit!r}; known: {', '.join(REFITS)}")


def _check_data(hs, expected: dict[str, Any], what: str) -> None:
    got = data_fingerprint(hs)
    for k in ("model", "num_steps", "hidden_size", "num_layers"):
        if expected.get(k) is not None and expected.get(k) != got.get(k):
            raise ArtifactMismatch(f"{hs.path} does not match the data {what} was trained on ({k} differs)")


def _study_trial(cfg: Config):
    import optuna

    from .tune import Config as TuneConfig
    from .study import STUDY_ATTR, make_storage

    tune_doc: dict[str, Any] | None = None
    if cfg.storage:
        url = cfg.storage
        study_name = cfg.study_name
    else:
        tune_doc = read_json(Path(cfg.source) / "tune.json")
        url, study_name = tune_doc["storage"], tune_doc["study_name"]
    try:
        study = optuna.load_study(study_name=study_name, storage=make_storage(url, TuneConfig()))
    except KeyError:
        raise StepprobeError(f"no study named {study_name!r} in {url}") from None
    meta = study.user_attrs.get(STUDY_ATTR)
    if not meta:
        raise ArtifactMismatch(f"study {study_name!r} in {url} was not made by `stepprobe tune`")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise StepprobeError(f"study {study_name!r} has no complete trial yet")
    if cfg.trial >= 0:
        match = [t for t in complete if t.number == cfg.trial]
        if not match:
            raise StepprobeError(f"trial {cfg.trial} is not a complete trial of {study_name!r}")
        trial = match[0]
    else:
        trial = study.best_trial
    return study, trial, meta, tune_doc, url


def export_from_study(cfg: Config, out: Path) -> dict[str, Any]:
    study, trial, meta, tune_doc, url = _study_trial(cfg)
    tcfg = TrainConfig.from_dict({k: v for k, v in trial.user_attrs["train_config"].items()}, source="trial config")
    data = cfg.data or tcfg.data
    tcfg = tcfg.replace(data=data, plots=cfg.plots, reference=True, progress=False)
    hs = open_hidden_states(data)
    _check_data(hs, {"model": meta["model"], "num_steps": meta["num_steps"], "hidden_size": meta["hidden_size"]},
                f"study {study.study_name!r}")
    split = make_split(hs, val_fraction=tcfg.val_fraction, test_fraction=tcfg.test_fraction, seed=tcfg.split_seed,
                       max_steps_per_trace=tcfg.max_steps_per_trace, subsample_seed=tcfg.seed)
    if tune_doc is not None and tune_doc["split"]["problems"][M.VAL] != split.problems[M.VAL]:
        raise ArtifactMismatch("the problem split differs from the study's (different data or split code)")
    fixed = None
    if cfg.refit == "train_val":
        rows = dict(split.rows)
        rows[M.TRAIN] = np.sort(np.concatenate([split.rows[M.TRAIN], split.rows[M.VAL]]))
        split = SplitRows(rows, split.problems, {**split.info, "refit": "train_val"})
        fixed = int(trial.user_attrs.get("best_epoch") or tcfg.max_epochs - 1) + 1
    log.info("exporting trial %d of study %r (%s = %.4f): %s", trial.number, study.study_name,
             meta["objective"], trial.value, trial.params)
    result = train_probe(tcfg, hs, out_dir=out, split=split, fixed_epochs=fixed)
    if fixed is not None:
        # Validation is now inside the training data: its metrics are in-sample; keep the
        # threshold the trial chose on held-out validation.
        result.metrics["val_in_sample"] = result.metrics.pop(M.VAL)
        result.metrics.pop("reference_val", None)
        result.threshold = float(trial.user_attrs.get("threshold", result.threshold))
        for s in (M.TEST,):
            p = result.predictions[s]
            result.metrics[s] = M.compute_metrics(p["scores"], p["labels"], trace=p["trace"],
                                                  rel_position=p["rel_position"], threshold=result.threshold,
                                                  problem=p["problem"], bootstrap=tcfg.bootstrap)
    extra = {"export": {"source": "study", "storage": url, "study_name": study.study_name, "trial": trial.number,
                        "objective": meta["objective"], "trial_value": trial.value, "params": trial.params,
                        "refit": cfg.refit}}
    write_run(out, tcfg, hs, result, plots=cfg.plots, extra=extra, scorer_dir=out)
    log.info("%s", summary_line(result))
    return {**extra["export"], "metrics": M.clean(result.metrics), "threshold": result.threshold}


def export_from_run(cfg: Config, src: Path, out: Path) -> dict[str, Any]:
    run_doc = read_json(src / "run.json")
    if run_doc.get("kind") != "stepprobe-train-run":
        raise ArtifactMismatch(f"{src}/run.json is not a `stepprobe train` run")
    scorer = load_scorer(src / "scorer")
    if cfg.refit != "none":
        raise StepprobeError("--refit applies to a study export; retrain a run with `stepprobe train` instead")
    if cfg.data:
        hs = open_hidden_states(cfg.data)
        scorer.check_compatible(hs.model)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copy2(src / "scorer" / name, out / name)
    for name in ("metrics.json", "run.json"):
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
    if (src / "plots").is_dir():
        shutil.copytree(src / "plots", out / "plots", dirs_exist_ok=True)
    return {"source": "train_run", "run": str(src.resolve()), "metrics": scorer.metrics, "threshold": scorer.threshold}


def run(cfg: Config) -> Path:
    if not cfg.source and not cfg.storage:
        raise StepprobeError("--source (a tune or train directory) or --storage is required")
    src = Path(cfg.source) if cfg.source else None
    if src is not None and not src.is_dir():
        raise StepprobeError(f"export source not found: {src}")
    out = prepare_out_dir(cfg.out, "scorer", cfg.overwrite, "export.json")
    if cfg.storage or (src / "tune.json").is_file():
        info = export_from_study(cfg, out)
    elif (src / "run.json").is_file():
        info = export_from_run(cfg, src, out)
    else:
        raise StepprobeError(f"{src} is neither a `stepprobe tune` directory (tune.json) nor a `stepprobe train` "
                             "run (run.json)")
    scorer = load_scorer(out)  # what the runner will do: must load
    atomic_write_json(out / "export.json", {"kind": EXPORT_KIND, "schema_version": EXPORT_SCHEMA_VERSION,
                                            "config": cfg.to_dict(), **info, "sites": scorer.sites,
                                            "architecture": scorer.architecture, "model": scorer.model,
                                            "package_versions": package_versions()})
    test = scorer.metrics
    log.info("scorer %s: %s on %s; test AUROC %s, early50 %s, trace %s", out, scorer.architecture, scorer.sites,
             _fmt(test.get("test_auroc")), _fmt(test.get("test_early50_auroc")), _fmt(test.get("test_trace_auroc")))
    return out


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.3f}"
