"""Issue 14, item 7: two `stepprobe tune` workers on one study at once, and a killed
worker's trial failed by the next worker without waiting for the grace period."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna

from stepprobe.training import tune
from stepprobe.training.liveness import WORKER_ATTR

# --cv-folds 1: these tests pin how workers share a study (timing-sensitive), not how trials are
# chosen; cross-validated choice has its own tests in test_sweep_tune_export.py.
ARGS = ["--max-epochs", "3", "--patience", "2", "--archs", "linear,mlp", "--sites", "1-3", "--no-progress",
        "--no-plots", "--cv-folds", "1"]


def _worker(data, out, log, *extra):
    # stderr to a file: a pipe read only at the end could fill up and stall a worker.
    with open(log, "w") as fh:
        return subprocess.Popen([sys.executable, "-m", "stepprobe.cli", "tune", "--data", str(data), "--out",
                                 str(out), *ARGS, *extra], stdout=subprocess.DEVNULL, stderr=fh,
                                start_new_session=True)


def test_two_workers_share_one_study(synthetic_h5, tmp_path):
    out = tmp_path / "study"
    target = 8
    logs = [tmp_path / f"worker{k}.txt" for k in range(2)]
    procs = [_worker(synthetic_h5, out, log, "--n-trials", str(target)) for log in logs]
    try:
        for p in procs:
            p.wait(timeout=600)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log.read_text()[-3000:]
    study = optuna.load_study(study_name="stepprobe", storage=f"sqlite:///{(out / 'study.db').resolve()}")
    trials = study.trials
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert all(t.state in done for t in trials), [t.state.name for t in trials]  # none lost, none left RUNNING
    # Together they stop at the target (each may finish the trial it runs when the other reaches it).
    assert target <= len(trials) <= target + 1
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    by_worker: dict[int, list[int]] = {}
    for t in trials:
        by_worker.setdefault(t.user_attrs[WORKER_ATTR]["pid"], []).append(t.number)
    assert set(by_worker) == {p.pid for p in procs}, "both workers ran trials"
    assert sum(len(v) for v in by_worker.values()) == len(trials)  # each trial run by exactly one worker
    # Issue 25: the workers drew distinct trials (one seed per worker made identical pairs).
    assert len({_params(t) for t in trials}) == len(trials), [t.params for t in trials]


def _params(trial) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in trial.params.items()))


def test_a_resumed_study_draws_new_trials(synthetic_h5, tmp_path):
    """Issue 25: the rerun that resumes a study continues it instead of repeating its first
    trials (a sampler seeded only with --seed drew them again); a fresh study with the same
    seed draws the same trials (reproducible)."""
    def study(out, n):
        cfg = tune.Config(data=str(synthetic_h5), out=str(out), n_trials=n, max_epochs=1, patience=1, cv_folds=1,
                          archs="linear,mlp", sites="1-3", progress=False, plots=False)
        tune.run(cfg)
        return optuna.load_study(study_name="stepprobe", storage=f"sqlite:///{(out / 'study.db').resolve()}").trials

    first = study(tmp_path / "a", 1)
    resumed = study(tmp_path / "a", 2)
    assert _params(resumed[0]) == _params(first[0])
    assert _params(resumed[1]) != _params(first[0]), [t.params for t in resumed]
    assert [_params(t) for t in study(tmp_path / "b", 1)] == [_params(first[0])]


def test_killed_workers_trial_is_failed_at_once_by_the_next_worker(synthetic_h5, tmp_path):
    out = tmp_path / "study"
    url = f"sqlite:///{(out / 'study.db').resolve()}"
    # Long trials, and a grace period no test waits for: only the dead-pid rule can fail the trial.
    log = tmp_path / "worker.txt"
    proc = _worker(synthetic_h5, out, log, "--n-trials", "100", "--max-epochs", "40", "--patience", "40",
                   "--grace-period", "3600", "--heartbeat-interval", "1")
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no running trial within 5 minutes"
            if (out / "tune.json").exists():
                running = optuna.load_study(study_name="stepprobe", storage=url).get_trials(
                    states=(optuna.trial.TrialState.RUNNING,))
                if running and WORKER_ATTR in running[0].user_attrs:
                    break
            time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    study = optuna.load_study(study_name="stepprobe", storage=url)
    orphans = [t.number for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))]
    assert orphans, "the kill should leave a RUNNING trial"
    finished = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)))
    cfg = tune.Config(data=str(synthetic_h5), out=str(out), n_trials=finished + 1, max_epochs=40, patience=40, cv_folds=1,
                      archs="linear,mlp", sites="1-3", progress=False, plots=False, grace_period=3600,
                      heartbeat_interval=1)
    tune.run(cfg)
    study = optuna.load_study(study_name="stepprobe", storage=url)
    states = {t.number: t.state for t in study.trials}
    assert all(states[n] == optuna.trial.TrialState.FAIL for n in orphans)
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))) \
        == finished + 1
