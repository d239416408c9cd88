"""The sweep finds the informative layer; a killed tune resumes the same study; export
reproduces the best trial and adds test metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from stepprobe.errors import ArtifactMismatch
from stepprobe.probes.checkpoint import load_scorer
from stepprobe.training import export, sweep, tune

from helpers.synthetic_h5 import SIGNAL_SITE, make_synthetic


def test_sweep_finds_the_signal_layer_and_resumes(synthetic_h5, tmp_path):
    cfg = sweep.Config(data=str(synthetic_h5), out=str(tmp_path / "sw"), bootstrap=200, max_epochs=10, progress=False)
    out = sweep.run(cfg)
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["kind"] == "stepprobe-sweep" and doc["complete"]
    assert doc["best_site_by_val"] == SIGNAL_SITE
    rows = {r["site"]: r for r in sweep.read_rows(out / "sweep.csv")}
    assert list(rows) == ["embed", "layer_00", "layer_01", "layer_02", "layer_03", "final_norm"]
    assert doc["site_reads"] == 6  # each site read from the file once
    sig = rows[SIGNAL_SITE]
    assert sig["val_auroc_lo"] < sig["val_auroc"] < sig["val_auroc_hi"]
    assert sig["test_auroc_lo"] > max(r["test_auroc"] for s, r in rows.items() if s != SIGNAL_SITE)
    assert sig["reference_test_auroc"] > 0.8
    assert (out / "sweep.png").is_file()
    # Rerun: nothing to do, same rows.
    again = sweep.run(cfg)
    doc2 = json.loads((again / "sweep.json").read_text())
    assert doc2["site_reads"] == 0
    assert [(r["site"], r["test_auroc"]) for r in doc2["rows"]] == \
        [(r["site"], pytest.approx(r["test_auroc"], abs=1e-6)) for r in doc["rows"]]
    with pytest.raises(ArtifactMismatch, match="another config"):
        sweep.run(cfg.replace(arch="mlp"))


def _finished(url: str, name: str) -> tuple[int, list]:
    try:
        study = optuna.load_study(study_name=name, storage=url)
    except KeyError:
        return 0, []
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return sum(t.state in states for t in study.trials), study.trials


def test_tune_killed_and_resumed_continues_the_same_study_then_export(synthetic_h5, tmp_path):
    out = tmp_path / "study"
    args = ["--data", str(synthetic_h5), "--out", str(out), "--max-epochs", "3", "--patience", "2",
            "--archs", "linear,mlp", "--sites", "1-3", "--no-progress", "--no-plots"]
    url = f"sqlite:///{(out / 'study.db').resolve()}"
    proc = subprocess.Popen([sys.executable, "-m", "stepprobe.cli", "tune", *args, "--n-trials", "100"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            # tune.json is written after the study exists: polling earlier would race the
            # subprocess creating the SQLite schema.
            n, _ = _finished(url, "stepprobe") if (out / "tune.json").exists() else (0, [])
            if n >= 2:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(3)  # > the resumed run's grace period (1 s, at the database's 1 s clock resolution)
    n_before, trials_before = _finished(url, "stepprobe")
    assert n_before >= 2
    before = {t.number: (t.params, t.value) for t in trials_before if t.value is not None}
    study_id = optuna.load_study(study_name="stepprobe", storage=url)._study_id

    target = n_before + 2
    cfg = tune.Config(data=str(synthetic_h5), out=str(out), n_trials=target, max_epochs=3, patience=2,
                      archs="linear,mlp", sites="1-3", progress=False, grace_period=1, heartbeat_interval=1)
    tune.run(cfg)
    study = optuna.load_study(study_name="stepprobe", storage=url)
    assert study._study_id == study_id
    n_after, trials_after = _finished(url, "stepprobe")
    assert n_after == target
    after = {t.number: (t.params, t.value) for t in trials_after if t.value is not None}
    assert all(after[k] == v for k, v in before.items() if k in after)  # earlier trials kept as they were
    assert max(after) > max(before)
    # The trial the kill interrupted was failed by the heartbeat check, not resurrected.
    assert not [t for t in trials_after if t.state == optuna.trial.TrialState.RUNNING]
    best = json.loads((out / "best.json").read_text())
    assert best["finished_trials"] == target
    assert "test" not in json.dumps(best["val_metrics"])  # tuning never scored the test split
    tune_doc = json.loads((out / "tune.json").read_text())
    assert "test" not in tune_doc["split"]["problems"]
    assert (out / "history.png").is_file()

    # Resuming against other data is refused.
    other = make_synthetic(tmp_path / "other.h5", n_problems=20, seed=5)
    with pytest.raises(ArtifactMismatch, match="another num_steps"):
        tune.run(cfg.replace(data=str(other)))

    # Export: reproduces the best trial's validation value, adds test metrics, loads.
    exp = export.run(export.Config(source=str(out), out=str(tmp_path / "scorer")))
    scorer = load_scorer(exp)
    edoc = json.loads((exp / "export.json").read_text())
    assert edoc["trial"] == study.best_trial.number
    # Trials are chosen by 5-fold cross-validation over the non-test problems: the value is the
    # folds' mean, and the export (trained on the study's own split) reports it beside test.
    cv = study.best_trial.user_attrs["cv_values"]
    assert len(cv) == 5 and study.best_value == pytest.approx(sum(cv) / 5)
    assert edoc["trial_value"] == pytest.approx(study.best_value)
    assert [f["fold"] for f in tune_doc["cv_folds"]] == [0, 1, 2, 3, 4]
    assert scorer.metrics["test_auroc"] is not None and scorer.metrics["reference_test_auroc"] is not None
    assert scorer.sites[0] in ("layer_01", "layer_02", "layer_03")


def test_cv_folds_partition_the_non_test_problems_and_one_fold_reproduces_on_export(synthetic_h5, tmp_path):
    from stepprobe.training import metrics as M
    from stepprobe.training.data import cv_splits, make_split, open_hidden_states

    hs = open_hidden_states(str(synthetic_h5))
    split = make_split(hs)
    folds = cv_splits(hs, split, 4, seed=0)
    vals = [set(f.problems[M.VAL]) for f in folds]
    assert set().union(*vals) == set(split.problems[M.TRAIN]) | set(split.problems[M.VAL])
    assert sum(map(len, vals)) == len(set().union(*vals))  # disjoint
    for f in folds:
        assert not set(f.problems[M.TRAIN]) & set(f.problems[M.VAL])
        assert f.problems[M.TEST] == split.problems[M.TEST] and (f.rows[M.TEST] == split.rows[M.TEST]).all()
    with pytest.raises(Exception, match="cross-validation needs"):
        cv_splits(hs, split, 1000)
    # cv_folds 1: the single validation split, and the export reproduces the trial exactly
    out = tmp_path / "study1"
    tune.run(tune.Config(data=str(synthetic_h5), out=str(out), n_trials=2, max_epochs=3, patience=2, archs="linear",
                         sites="1-2", progress=False, cv_folds=1, plots=False))
    exp = export.run(export.Config(source=str(out), out=str(tmp_path / "scorer1"), plots=False))
    metrics = json.loads((exp / "metrics.json").read_text())["metrics"]
    value = json.loads((exp / "export.json").read_text())["trial_value"]
    assert metrics["val"]["early50_auroc"] == pytest.approx(value, abs=1e-9)


def test_sweep_finds_a_signal_that_lives_only_in_the_step_mean(tmp_path):
    """Boundary-token features are all noise; only layer_02's step mean carries the label. The
    sweep (step features auto, windows of 2 layers) must rank that step mean first and report
    it as beating the best boundary site on test, with an interval above zero."""
    from helpers.synthetic_h5 import make_synthetic

    h5 = make_synthetic(tmp_path / "mean.h5", signal_site="layer_02.mean", step_means=True, seed=3)
    cfg = sweep.Config(data=str(h5), out=str(tmp_path / "sw"), bootstrap=200, max_epochs=10, progress=False,
                       ranges=2, reference=False, plots=True)
    out = sweep.run(cfg)
    doc = json.loads((out / "sweep.json").read_text())
    kinds = {r["kind"] for r in doc["rows"]}
    assert kinds == {"boundary", "step-mean", "range-mean", "range-concat", "range-mean-of-means",
                     "range-concat-of-means"}
    rows = {r["site"]: r for r in doc["rows"]}
    # the best candidate reads layer_02's step mean (alone, or in a window of step means)
    assert "layer_02.mean" in rows[doc["best_site_by_val"]]["sites"].split("+")
    assert max(r["test_auroc"] for r in doc["rows"] if r["kind"] == "boundary") < 0.65
    winners = {w["kind"]: w for w in doc["winners"]}
    mean_win = winners["step-mean"]
    assert mean_win["site"] == "layer_02.mean"
    assert mean_win["test_auroc_minus_boundary"]["lo"] > 0.1
    assert rows["layer_02.mean"]["test_auroc_lo"] > 0.75
    assert (out / "predictions.npz").is_file() and (out / "sweep.png").is_file()
