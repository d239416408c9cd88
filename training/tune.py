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
when the worker ran on the same machine (each trial records host, pid and process start
time), otherwise by Optuna's heartbeat after `--grace-period` seconds. Only Optuna's
public API is used (RDBStorage heartbeats, `fail_stale_trials`, `Study.tell`). The study
records its data fingerprint and search space and refuses to resume against other data.

Output directory: tune.json (kind "stepprobe-tune"), study.db, trials.csv, best.json
(best trial, its params and train config), history.png, importance.png.
Search space: site in --sites; combine in --combines (mean/concat/mixture take a window
of 2..--max-window consecutive sites); step feature in --step-features (the boundary
token's state, the step's mean over its tokens, or both); arch in --archs (mixture iff combine=mixture);
width, depth, dropout where the architecture has them; lr, weight_decay (log scale);
imbalance in --imbalances.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from stepprobe import locks
from stepprobe.config import StageConfig, option, stage_defaults
from stepprobe.errors import ArtifactMismatch, StepprobeError
from stepprobe.io import atomic_write_json, read_json
from stepprobe.options import TrainingOptions, group_values, resume_view
from stepprobe.layers import parse_sites
from stepprobe.probes.registry import COMBINES, known_probes
from stepprobe.provenance import package_versions

from . import metrics as M
from .data import FeatureCache, check_classes, cv_splits, data_fingerprint, make_split, open_hidden_states
from .train import IMBALANCE
from .train import Config as TrainConfig
from .train import train_probe

log = logging.getLogger(__name__)

TUNE_KIND = "stepprobe-tune"
TUNE_SCHEMA_VERSION = 1
STUDY_ATTR = "stepprobe"
WIDTHS = (32, 64, 128, 256, 512)
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
    sites: str = option("layers", "candidate sites: layers, all, 10-29, layer_12,layer_20, ...")
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
        _check_space(self)


def _csv(s: str) -> list[str]:
    return [x.strip() for x in str(s).split(",") if x.strip()]


def _stable(cfg: Config) -> dict[str, Any]:
    return resume_view(cfg.to_dict(), Config)


def storage_url(cfg: Config, out: Path) -> str:
    return cfg.storage or f"sqlite:///{(out / 'study.db').resolve()}"


def make_storage(url: str, cfg: Config):
    import optuna

    if url.startswith(("sqlite", "postgresql", "mysql", "oracle", "mssql")):
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=cfg.heartbeat_interval,
                                          grace_period=cfg.grace_period)
    return url


STEP_FEATURES = ("boundary", "mean", "both")


def step_feature_kinds(cfg: Config, candidates: list[str], hs) -> list[str]:
    """The step-feature kinds a study searches (see ``--step-features``)."""
    has_means = bool(candidates) and all(s in getattr(hs, "mean_sites", []) for s in candidates)
    kinds = _csv(cfg.step_features)
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


def trial_config(trial, cfg: Config, candidates: list[str], kinds: list[str] | None = None) -> TrainConfig:
    """Translate a trial into a training config (the only thing the objective adds)."""
    combines = _csv(cfg.combines)
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
        archs = [a for a in _csv(cfg.archs) if a != "mixture"]
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
    imbalances = _csv(cfg.imbalances)
    imbalance = trial.suggest_categorical("imbalance", imbalances) if len(imbalances) > 1 else imbalances[0]
    losses = _csv(cfg.losses)
    loss = trial.suggest_categorical("loss", losses) if len(losses) > 1 else losses[0]
    pair_weight = trial.suggest_float("pair_weight", 0.1, 0.9) if loss == "mixed" else 0.5
    return TrainConfig(**group_values(cfg, TrainingOptions), data=cfg.data, sites=",".join(sites), combine=combine,
                       arch=arch, params=params, lr=lr, weight_decay=wd, monitor=cfg.objective, imbalance=imbalance,
                       loss=loss, pair_weight=pair_weight, reference=False, plots=False, progress=False)


def _check_space(cfg: Config) -> None:
    for c in _csv(cfg.combines):
        if c not in COMBINES:
            raise StepprobeError(f"unknown combine {c!r}; known: {', '.join(COMBINES)}")
    for a in _csv(cfg.archs):
        if a not in known_probes():
            raise StepprobeError(f"unknown probe architecture {a!r}; known: {', '.join(known_probes())}")
    if not [a for a in _csv(cfg.archs) if a != "mixture"] and _csv(cfg.combines) != ["mixture"]:
        raise StepprobeError("--archs needs an architecture other than mixture unless --combines is mixture")
    for i in _csv(cfg.imbalances):
        if i not in IMBALANCE:
            raise StepprobeError(f"unknown imbalance handling {i!r}; known: {', '.join(IMBALANCE)}")
    from .module import LOSSES

    for loss in _csv(cfg.losses):
        if loss not in LOSSES:
            raise StepprobeError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
    if set(_csv(cfg.losses)) - {"bce"} and "sampler" in _csv(cfg.imbalances):
        raise StepprobeError("the pairwise and mixed losses batch whole problems and cannot use imbalance=sampler; "
                             "drop sampler from --imbalances")
    if M.mode_of(cfg.objective) != "max" or not cfg.objective.startswith(M.VAL + "_"):
        raise StepprobeError(f"the objective must be a validation metric to maximize (val_auroc, val_early50_auroc, "
                             f"val_within_auroc, val_within_rank50, ...), got {cfg.objective!r}")


def load_study(cfg: Config, out: Path, fingerprint: dict[str, Any], create: bool = True):
    import optuna

    url = storage_url(cfg, out)
    storage = make_storage(url, cfg)
    sampler = per_trial_seed_sampler(cfg.seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                         n_warmup_steps=cfg.pruner_warmup_epochs)
    study = optuna.create_study(storage=storage, study_name=cfg.study_name, direction="maximize", sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    meta = {"kind": TUNE_KIND, "schema_version": TUNE_SCHEMA_VERSION, "objective": cfg.objective,
            "space": _stable(cfg), "model": fingerprint["model"], "num_steps": fingerprint["num_steps"],
            "hidden_size": fingerprint["hidden_size"]}
    prev = study.user_attrs.get(STUDY_ATTR)
    if prev is None:
        study.set_user_attr(STUDY_ATTR, meta)
    else:
        for k in ("kind", "schema_version", "objective", "model", "num_steps", "hidden_size", "space"):
            if prev.get(k) != meta[k]:
                raise ArtifactMismatch(f"study {cfg.study_name!r} in {url} was made with another {k} "
                                       f"({_short(prev.get(k))} vs {_short(meta[k])}); use another --study-name or --out")
    return study, url


def per_trial_seed_sampler(seed: int):
    """Optuna's TPE sampler, seeded anew for every trial from ``seed`` and the trial's number.

    A trial's number is unique in its study (the storage hands them out), so parallel workers
    and a resumed study never replay each other's random draws, as one ``TPESampler(seed)``
    per worker would: every worker would draw the same startup trials, and a resumed study
    would repeat its first ones. One worker from scratch stays reproducible (trial k always
    gets the same seed). Public :class:`optuna.samplers.BaseSampler` interface only; the
    worker that ran each trial is in its ``worker`` user attribute.
    """
    import optuna

    def make(number: int):
        # A fixed mix of (seed, trial number): no Python hash randomisation involved.
        return optuna.samplers.TPESampler(seed=(int(seed) * 1_000_003 + number * 7_919 + 12_345) % (2 ** 32))

    class PerTrialSeedSampler(optuna.samplers.BaseSampler):
        def __init__(self) -> None:
            self.inner = make(0)

        def before_trial(self, study, trial) -> None:
            self.inner = make(trial.number)
            self.inner.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self.inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self.inner.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self.inner.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values) -> None:
            self.inner.after_trial(study, trial, state, values)

        def reseed_rng(self) -> None:
            self.inner.reseed_rng()

    return PerTrialSeedSampler()


def _load_study_retrying(cfg: Config, out: Path, fingerprint: dict[str, Any], tries: int = 5):
    """load_study, retried when another worker is creating the same SQLite schema at the same moment."""
    import sqlalchemy.exc

    for k in range(tries):
        try:
            return load_study(cfg, out, fingerprint)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):  # locked, or the schema's
            # version row inserted by the other worker a moment earlier
            if k == tries - 1:
                raise
            time.sleep(0.5 * (k + 1))
    raise AssertionError("unreachable")


def _short(v: Any) -> str:
    s = str(v)
    return s if len(s) < 80 else s[:77] + "..."


def finished(study) -> int:
    import optuna

    return sum(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in study.trials)


def run(cfg: Config) -> Path:
    import optuna
    from optuna_integration import PyTorchLightningPruningCallback

    from .train import prepare_out_dir

    if not cfg.data:
        raise StepprobeError("--data (an HDF5 file from `stepprobe record`) is required")
    hs = open_hidden_states(cfg.data)
    candidates = [s for s in parse_sites(cfg.sites, hs.num_layers)]
    missing = [s for s in candidates if s not in hs.feature_names]
    if missing:
        raise StepprobeError(f"{cfg.data} has no features for {', '.join(missing)}")
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
    study, url = _load_study_retrying(cfg, out, fingerprint)
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


WORKER_ATTR = "worker"


def worker_identity() -> dict[str, Any]:
    """Who runs a trial: host, kernel boot id, pid and the process's start time (so that a
    reused pid is not taken for the same process)."""
    import os
    import socket

    from stepprobe.lifetime import _start_time

    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(), "start": _start_time(os.getpid())}


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _worker_alive(worker: dict[str, Any]) -> bool | None:
    """True/False for a worker on this machine; None when it runs elsewhere (or is unknown)."""
    import socket

    from stepprobe.lifetime import _start_time

    mine = (socket.gethostname(), _boot_id())
    if (worker.get("host"), worker.get("boot_id")) != mine or mine[1] is None or "pid" not in worker:
        return None
    return _start_time(int(worker["pid"])) == worker.get("start")


def fail_dead_trials(study, grace_period: float) -> int:
    """Mark trials left RUNNING by dead workers as failed; returns how many (public Optuna API only).

    - A trial whose worker ran on this machine (its ``worker`` user attribute: host, boot id,
      pid, process start time) and is gone is failed at once: no grace period to wait.
    - A trial of a worker on another machine is failed by Optuna's heartbeat
      (``optuna.storages.fail_stale_trials``: no heartbeat for ``--grace-period`` seconds).
    - A trial without the attribute (killed between Optuna's ``ask`` and the objective's first
      line, where it may never have recorded a heartbeat) is failed once it is older than the
      grace period.
    """
    import datetime as dt

    import optuna

    running = (optuna.trial.TrialState.RUNNING,)
    before = len(study.get_trials(deepcopy=False, states=running))
    if before == 0:
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    now = dt.datetime.now()
    for t in study.get_trials(deepcopy=False, states=running):
        worker = t.user_attrs.get(WORKER_ATTR)
        if worker is not None:
            dead = _worker_alive(worker) is False
        else:
            dead = t.datetime_start is not None and (now - t.datetime_start).total_seconds() > grace_period
        if dead:
            try:
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                pass  # another worker failed (or finished) it first
    return before - len(study.get_trials(deepcopy=False, states=running))


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
