"""Optuna study over site(s), feature combination, architecture and training settings.

The objective only turns a trial into a `stepprobe train` config and calls the same
training function; it maximizes a **validation** metric, by default val_early50_auroc
(step-level AUROC on steps in the first half of each trace: pruning decisions are made
early, so that is where a probe must separate good from bad traces). The test split is
never loaded. Bad trials are stopped by Optuna's PyTorchLightningPruningCallback
(median pruner on the same metric, one report per epoch).

The study lives in storage: a SQLite file in the output directory by default, or any
database URL Optuna accepts (`--storage postgresql://...`) so that several workers on
several machines share one study. Rerunning the same command resumes the study
(load_if_exists) until `--n-trials` trials have finished (complete or pruned). Several
workers (the same command started several times, on one machine or several with one
`--storage`) share the study; together they stop at `--n-trials`, and may overshoot it by
up to one trial per extra worker (each finishes the trial it is running). A trial left
RUNNING by a killed worker is marked failed by the next worker to start a trial: at once
when the worker ran on the same machine, otherwise by Optuna's heartbeat after
`--grace-period` seconds (:mod:`.liveness`). Only Optuna's public API is used (RDBStorage
heartbeats, `fail_stale_trials`, `Study.tell`). The study records its data fingerprint and
search space and refuses to resume against other data (:mod:`.study`).

Output directory: tune.json (kind "stepprobe-tune"), study.db, trials.csv, best.json
(best trial, its params and train config), history.png, importance.png.
The search space (site, combine, step feature, architecture, width, depth, dropout, lr,
weight decay, imbalance, loss) is in :mod:`.search_space`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np

from stepprobe import locks
from stepprobe.config import StageConfig, option, stage_defaults
from stepprobe.errors import ArtifactMismatch, StepprobeError
from stepprobe.io import atomic_write_json, read_json
from stepprobe.layers import parse_sites
from stepprobe.options import TrainingOptions
from stepprobe.probes.registry import COMBINES
from stepprobe.provenance import package_versions

from . import metrics as M
from .data import (FeatureCache, check_classes, cv_splits, data_fingerprint, make_split, missing_features,
                   open_hidden_states)
from .liveness import WORKER_ATTR, fail_dead_trials, worker_identity
from .search_space import check_space, check_widths, step_feature_kinds, trial_config
from .study import TUNE_KIND, TUNE_SCHEMA_VERSION, finished, load_study_retrying
from .train import IMBALANCE, train_probe

log = logging.getLogger(__name__)


@dataclasses.dataclass
@stage_defaults(batch_size=0, max_epochs=25, patience=4)
class Config(StageConfig, TrainingOptions):
    """Optuna study."""

    SECTION = "tune"

    data: str = option("", "HDF5 file written by `stepprobe record`", resume_ok=True)
    out: str = option("", "study directory (default: <STEPPROBE_HOME>/runs/tune-<time>)", resume_ok=True)
    storage: str = option("", "Optuna storage URL (default: sqlite:///<out>/study.db)", resume_ok=True)
    study_name: str = option("stepprobe", "study name in the storage")
    n_trials: int = option(30, "finished trials (complete + pruned) the study should reach", resume_ok=True)
    timeout: float = option(0.0, "stop starting new trials after this many seconds (0: no limit)", resume_ok=True)
    objective: str = option(M.DEFAULT_TUNE_OBJECTIVE, "validation metric to maximize (also early stopping and pruning)")
    sites: str = option("layers", "candidate sites: layers, all, 10-29, layer_12,layer_20, ...; group features "
                                  "(issue 23): layer_20.group, 10-14.gdev, text.group")
    combines: str = option("single", "candidate feature combinations: " + ",".join(COMBINES))
    max_window: int = option(4, "most consecutive sites a mean/concat/mixture trial reads")
    step_features: str = option("auto", "what a site contributes: boundary (the boundary token's state), mean (the "
                                        "step's mean, `record --step-mean`), both; auto: all three where the file "
                                        "has step means for every candidate site, else boundary")
    archs: str = option("linear,mlp,deep_mlp", "candidate architectures (mixture is used when combine=mixture)")
    imbalances: str = option("pos_weight,none", "candidate imbalance handlings: " + ",".join(IMBALANCE))
    losses: str = option("bce", "candidate training losses: bce, pairwise, mixed (within-problem ranking; "
                                "mixed also tunes pair_weight); e.g. bce,pairwise with --objective val_within_auroc")
    lr_min: float = option(1e-4, "learning-rate range (log scale)")
    lr_max: float = option(1e-2, "")
    cv_folds: int = option(5, "choose trials by k-fold cross-validation over the non-test problems (the mean of the "
                              "folds' validation metric); 1 = the single validation split")
    pruner_startup_trials: int = option(5, "trials before the median pruner starts pruning")
    pruner_warmup_epochs: int = option(3, "epochs of each trial before it may be pruned")
    heartbeat_interval: int = option(30, "seconds between trial heartbeats (stale-trial detection)", resume_ok=True)
    grace_period: int = option(120, "a RUNNING trial without heartbeat this long is marked failed", resume_ok=True)
    cache_gb: float = option(4.0, "memory for sites kept in RAM across trials (GiB)", resume_ok=True)
    plots: bool = option(True, "write history.png and importance.png", resume_ok=True)
    progress: bool = option(True, "progress bar over trials", resume_ok=True)

    def check(self) -> None:
        check_space(self)


def run(cfg: Config) -> Path:
    import optuna
    from optuna_integration import PyTorchLightningPruningCallback

    from .train import prepare_out_dir

    if not cfg.data:
        raise StepprobeError("--data (an HDF5 file from `stepprobe record`) is required")
    hs = open_hidden_states(cfg.data)
    candidates = [s for s in parse_sites(cfg.sites, hs.num_layers)]
    missing = missing_features(hs, candidates)
    if missing:
        raise StepprobeError(f"{cfg.data} has no features for {', '.join(missing)}")
    check_widths(cfg, candidates)
    kinds = step_feature_kinds(cfg, candidates, hs)
    fingerprint = data_fingerprint(hs)
    split = make_split(hs, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.split_seed,
                       max_steps_per_trace=cfg.max_steps_per_trace, subsample_seed=cfg.seed)
    check_classes(split, hs, test=False)
    folds = cv_splits(hs, split, cfg.cv_folds, cfg.split_seed) if cfg.cv_folds > 1 else [split]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if cfg.out:
        # Workers share a study directory (a shared lock); any other writer of it is refused.
        locks.hold(cfg.out, shared=True)
    if cfg.out and (Path(cfg.out) / "tune.json").is_file():
        out = Path(cfg.out)
        prev = read_json(out / "tune.json")
        if prev.get("kind") != TUNE_KIND or prev.get("schema_version") != TUNE_SCHEMA_VERSION:
            raise ArtifactMismatch(f"{out}/tune.json is not a study of this stepprobe version")
    elif cfg.out and (Path(cfg.out) / "study.db").is_file():
        out = Path(cfg.out)  # another worker is creating this study right now; load_study checks it
    else:
        out = prepare_out_dir(cfg.out, "tune", False, "tune.json")
    study, url = load_study_retrying(cfg, out, fingerprint)
    doc = {"kind": TUNE_KIND, "schema_version": TUNE_SCHEMA_VERSION, "config": cfg.to_dict(), "storage": url,
           "cv_folds": [{"fold": f.info.get("cv_fold", 0), "val_problems": len(f.problems[M.VAL])} for f in folds],
           "study_name": cfg.study_name, "objective": cfg.objective, "data": fingerprint,
           "split": {**split.info, "problems": {k: v for k, v in split.problems.items() if k != M.TEST},
                     "num_test_problems": len(split.problems[M.TEST])},
           "package_versions": package_versions()}
    atomic_write_json(out / "tune.json", doc)
    cache = FeatureCache(hs, max_bytes=int(cfg.cache_gb * (1 << 30)))

    def objective(trial) -> float:
        trial.set_user_attr(WORKER_ATTR, worker_identity())
        failed = fail_dead_trials(study, cfg.grace_period)
        if failed:
            log.info("marked %d trial(s) left RUNNING by a dead worker as failed", failed)
        tcfg = trial_config(trial, cfg, candidates, kinds)
        trial.set_user_attr("train_config", tcfg.to_dict())
        t0 = time.perf_counter()
        _, metric = M.split_of(cfg.objective)
        values = []
        for k, fold in enumerate(folds):  # Optuna's pruner watches the first fold's epochs
            cbs = [PyTorchLightningPruningCallback(trial, monitor=cfg.objective)] if k == 0 else []
            result = train_probe(tcfg, hs, cache=cache, split=fold, evaluate_test=False, callbacks=cbs)
            if k == 0:
                trial.set_user_attr("val_metrics", M.clean(result.metrics[M.VAL]))
                trial.set_user_attr("threshold", result.threshold)
                trial.set_user_attr("best_epoch", result.best_epoch)
            values.append(float(result.metrics[M.VAL][metric]))
        trial.set_user_attr("cv_values", values)
        trial.set_user_attr("seconds", time.perf_counter() - t0)
        value = float(np.nanmean(values)) if not all(v != v for v in values) else float("nan")
        if value != value:  # nan: one class only in the early steps of every validation fold
            raise StepprobeError(f"{cfg.objective} is undefined on every validation fold; choose another --objective")
        return value

    failed = fail_dead_trials(study, cfg.grace_period)
    if failed:
        log.info("marked %d trial(s) left RUNNING by a dead worker as failed", failed)
    done = finished(study)
    remaining = max(0, cfg.n_trials - done)
    log.info("study %r in %s: %d finished trials, running up to %d more (objective %s)", cfg.study_name, url, done,
             remaining, cfg.objective)
    if remaining:
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        cb = optuna.study.MaxTrialsCallback(cfg.n_trials, states=(optuna.trial.TrialState.COMPLETE,
                                                                   optuna.trial.TrialState.PRUNED))
        study.optimize(objective, n_trials=remaining, timeout=cfg.timeout or None, callbacks=[cb, _log_trial],
                       gc_after_trial=False, show_progress_bar=cfg.progress)
    with locks.holding(out / "trials.csv", wait=True):  # the study's files: one worker at a time
        write_outputs(study, out, cfg)
    return out


def _log_trial(study, trial) -> None:
    log.info("trial %d %s: %s %s", trial.number, trial.state.name,
             f"{trial.value:.4f}" if trial.value is not None else "-", trial.params)


def write_outputs(study, out: Path, cfg: Config) -> None:
    import optuna

    write_trials_csv(study, out / "trials.csv")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        log.warning("no complete trial yet")
        return
    best = study.best_trial
    atomic_write_json(out / "best.json", {
        "kind": "stepprobe-tune-best", "schema_version": TUNE_SCHEMA_VERSION, "objective": cfg.objective,
        "trial": best.number, "value": best.value, "params": best.params,
        "train_config": best.user_attrs.get("train_config"), "val_metrics": best.user_attrs.get("val_metrics"),
        "finished_trials": finished(study), "complete_trials": len(complete),
        "pruned_trials": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)})
    log.info("best trial %d: %s = %.4f, params %s", best.number, cfg.objective, best.value, best.params)
    if cfg.plots:
        plot_study(study, out)


def write_trials_csv(study, path: Path) -> None:
    """One row per trial: number, state, value, seconds, params, best epoch (no pandas needed)."""
    import csv
    import io

    from stepprobe.io import atomic_write_text

    names = sorted({k for t in study.trials for k in t.params})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["number", "state", "value", "seconds", "best_epoch", *names])
    for t in study.trials:
        w.writerow([t.number, t.state.name, "" if t.value is None else f"{t.value:.6f}",
                    f"{t.user_attrs.get('seconds', float('nan')):.2f}", t.user_attrs.get("best_epoch", ""),
                    *[t.params.get(k, "") for k in names]])
    atomic_write_text(path, buf.getvalue())


def plot_study(study, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    for name, fn in (("history.png", ovm.plot_optimization_history), ("importance.png", ovm.plot_param_importances)):
        try:
            ax = fn(study)
            fig = ax.figure if hasattr(ax, "figure") else ax[0].figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            tmp = out / f".{name}.tmp.png"
            fig.savefig(tmp, dpi=110)
            os.replace(tmp, out / name)  # several workers may write the plots at once
            plt.close(fig)
        except Exception as exc:  # importance needs >= 2 complete trials with varying params
            log.warning("could not plot %s: %s", name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
