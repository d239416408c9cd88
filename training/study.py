"""Where a ``stepprobe tune`` study lives: Optuna storage, its sampler, its identity.

A SQLite file in the output directory by default, or any database URL Optuna accepts
(``--storage postgresql://...``) so that several workers on several machines share one study.
The study records its data fingerprint and search space (:func:`load_study`) and refuses to
resume against other data. Only Optuna's public API is used.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

from stepprobe.errors import ArtifactMismatch
from stepprobe.options import resume_view

TUNE_KIND = "stepprobe-tune"
TUNE_SCHEMA_VERSION = 1
STUDY_ATTR = "stepprobe"
STUDY_META_KEYS = ("kind", "schema_version", "objective", "model", "num_steps", "hidden_size", "space")


def storage_url(cfg: Any, out: Path) -> str:
    return cfg.storage or f"sqlite:///{(out / 'study.db').resolve()}"


def make_storage(url: str, cfg: Any):
    import optuna

    if url.startswith(("sqlite", "postgresql", "mysql", "oracle", "mssql")):
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=cfg.heartbeat_interval,
                                          grace_period=cfg.grace_period)
    return url


def load_study(cfg: Any, out: Path, fingerprint: dict[str, Any], create: bool = True):
    import optuna

    url = storage_url(cfg, out)
    storage = make_storage(url, cfg)
    sampler = per_trial_seed_sampler(cfg.seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                         n_warmup_steps=cfg.pruner_warmup_epochs)
    study = optuna.create_study(storage=storage, study_name=cfg.study_name, direction="maximize", sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    meta = {"kind": TUNE_KIND, "schema_version": TUNE_SCHEMA_VERSION, "objective": cfg.objective,
            "space": resume_view(cfg.to_dict(), type(cfg)), "model": fingerprint["model"], "num_steps": fingerprint["num_steps"],
            "hidden_size": fingerprint["hidden_size"]}
    prev = study.user_attrs.get(STUDY_ATTR)
    if prev is None:
        study.set_user_attr(STUDY_ATTR, meta)
    else:
        for k in STUDY_META_KEYS:
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


def load_study_retrying(cfg: Any, out: Path, fingerprint: dict[str, Any], tries: int = 5):
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
