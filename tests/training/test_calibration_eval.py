"""Calibration lowers ECE (pure function and inside training); the evaluate stage scores a held-out
file with intervals; a scorer that reads step means is refused for live capture."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stepprobe.errors import ArtifactMismatch
from stepprobe.probes.checkpoint import linear_probe, load_scorer, save_scorer
from stepprobe.training import evaluate, train
from stepprobe.training import metrics as M
from stepprobe.training.data import open_hidden_states
from stepprobe.training.evaluation import MIN_SLOPE, Calibration, fit_calibration, logit, metric_with_ci

from helpers.synthetic_h5 import IDENTITY, RULE, SIGNAL_SITE, make_synthetic

FAST = dict(max_epochs=8, patience=3, progress=False, plots=False, batch_size=0)


@pytest.mark.parametrize("method", ["platt", "temperature"])
def test_calibration_lowers_ece_of_a_miscalibrated_scorer(method):
    rng = np.random.default_rng(0)
    z = rng.normal(size=4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-z))).astype(int)  # calibrated: p = sigmoid(z)
    over = 1 / (1 + np.exp(-(3 * z + (1.0 if method == "platt" else 0.0))))  # overconfident (and shifted)
    cal = fit_calibration(over[:2000], y[:2000], method)  # fit on one half, measure on the other
    before, after = M.ece(over[2000:], y[2000:]), M.ece(cal.apply(over[2000:]), y[2000:])
    assert before > 0.1 and after < 0.04 and after < before / 3
    assert cal.a == pytest.approx(1 / 3, abs=0.08)
    assert method == "platt" or cal.b == 0.0
    assert np.argsort(cal.apply(over)).tolist() == np.argsort(over).tolist()  # monotone: ranking unchanged
    assert Calibration.from_dict(cal.to_dict()) == cal


def test_training_calibrates_on_validation_and_the_scorer_carries_it(tmp_path):
    h5 = make_synthetic(tmp_path / "s.h5", signal=2.0)
    hs = open_hidden_states(str(h5))
    cfg = train.Config(data=str(h5), sites=SIGNAL_SITE, arch="linear", reference=False, lr=3e-2, **FAST)
    result = train.train_probe(cfg, hs)
    cal = result.calibration
    assert cal["method"] == "platt" and cal["fitted_on"] == "val"
    # pos_weight training over-predicts the minority class: calibration must lower ECE on test
    assert cal["ece_after"]["test"] < cal["ece_before"]["test"]
    assert cal["ece_after"]["val"] < cal["ece_before"]["val"]
    assert result.metrics["test"][M.ECE] == pytest.approx(cal["ece_after"]["test"])
    none = train.train_probe(cfg.replace(calibration="none"), hs)
    assert none.calibration["method"] == "none"
    assert none.metrics["test"][M.ECE] == pytest.approx(none.calibration["ece_before"]["test"])
    # the same ranking: calibration is monotone
    assert result.metrics["test"][M.AUROC] == pytest.approx(none.metrics["test"][M.AUROC], abs=1e-9)
    out = tmp_path / "run"
    train.write_run(out, cfg, hs, result, plots=False)
    scorer = load_scorer(out / "scorer", expected_model=hs.model)
    assert scorer.calibration["a"] == pytest.approx(cal["a"]) and scorer.calibration["method"] == "platt"
    meta = json.loads((out / "scorer" / "scorer.json").read_text())
    assert meta["calibration"]["ece_after"]["test"] == pytest.approx(cal["ece_after"]["test"])
    assert meta["features"] == {"step_mean": False}
    # the exported module's output is the calibrated probability the metrics were computed on
    test_rows = result.split.rows[M.TEST]
    got = scorer.score({SIGNAL_SITE: hs.features(SIGNAL_SITE, test_rows)}).double().numpy()
    np.testing.assert_allclose(got, result.predictions[M.TEST]["scores"], rtol=1e-5, atol=1e-6)
    assert 0.0 < scorer.threshold < 1.0


def test_evaluate_on_held_out_file_with_intervals_and_reference(tmp_path):
    train_h5 = make_synthetic(tmp_path / "train.h5", signal=2.0, seed=0)
    held = make_synthetic(tmp_path / "held.h5", signal=2.0, seed=1, n_problems=30)
    hs = open_hidden_states(str(train_h5))
    cfg = train.Config(data=str(train_h5), sites=SIGNAL_SITE, arch="linear", reference=False, lr=3e-2, **FAST)
    result = train.train_probe(cfg, hs)
    out = tmp_path / "run"
    train.write_run(out, cfg, hs, result, plots=False)
    # the two synthetic files share the signal direction only if generated alike: seed 1 draws
    # another direction, so the held-out file is genuinely out of distribution for this probe
    ev = evaluate.run(evaluate.Config(scorer=str(out / "scorer"), data=str(held), reference_data=str(train_h5),
                                      out=str(tmp_path / "ev"), bootstrap=100))
    doc = json.loads((ev / "eval.json").read_text())
    assert doc["kind"] == "stepprobe-eval" and doc["size"]["problems"] == 30
    for block in (doc["probe"], doc["reference"]):
        for name in ("auroc", "ece", "within_rank50", "trace_auroc"):
            d = block[name]
            assert d["lo"] <= d["value"] <= d["hi"], (name, d)
    same = evaluate.run(evaluate.Config(scorer=str(out / "scorer"), data=str(train_h5), out=str(tmp_path / "ev2"),
                                        bootstrap=100))
    doc2 = json.loads((same / "eval.json").read_text())
    assert doc2["probe"]["auroc"]["value"] > 0.85  # its own distribution: the signal is found
    assert "reference" not in doc2 and (same / "eval.md").read_text().startswith("# Scorer evaluation")
    assert doc2["probe"]["ece"]["value"] < doc2["probe_uncalibrated_ece"]["value"]
    # --test-split-of: only the trained scorer's own test problems (the figures export reports)
    test = evaluate.run(evaluate.Config(scorer=str(out / "scorer"), data=str(train_h5), out=str(tmp_path / "ev3"),
                                        bootstrap=100, test_split_of=str(out / "scorer"), compare=str(out / "scorer")))
    doc3 = json.loads((test / "eval.json").read_text())
    assert doc3["compare"]["auroc"] == doc3["probe"]["auroc"]  # the same scorer on the same steps, paired
    assert doc3["size"]["problems"] == len(result.split.problems["test"]) and doc3["rows"].startswith("test split")
    assert doc3["size"]["steps"] == len(result.split.rows["test"])
    assert doc3["probe"]["auroc"]["value"] == pytest.approx(result.metrics["test"]["auroc"], abs=1e-6)
    with pytest.raises(Exception, match="was not trained on"):
        evaluate.run(evaluate.Config(scorer=str(out / "scorer"), data=str(held), out=str(tmp_path / "ev4"),
                                     test_split_of=str(out / "scorer")))


def test_step_mean_scorer_is_refused_for_live_capture(tmp_path):
    probe = linear_probe(["layer_02.mean"], weight=np.ones(16))
    d = save_scorer(tmp_path / "sc", probe, model=IDENTITY, boundary_rule=RULE)
    scorer = load_scorer(d, expected_model=IDENTITY)
    assert scorer.uses_step_mean and json.loads((d / "scorer.json").read_text())["features"]["step_mean"]
    with pytest.raises(ArtifactMismatch, match="step-mean features \\(layer_02.mean\\).*live runner"):
        scorer.check_live()
    load_scorer(save_scorer(tmp_path / "ok", linear_probe(["layer_02"], weight=np.ones(16)), model=IDENTITY,
                            boundary_rule=RULE)).check_live()


def test_metric_with_ci_brackets_the_value():
    rng = np.random.default_rng(1)
    s, y = rng.random(600), (rng.random(600) < 0.4).astype(int)
    for name in ("auroc", "ece"):
        d = metric_with_ci(name, s, y, np.arange(600) // 6, n=200)
        assert d.low <= d.value <= d.high and d.n == 100


def test_calibration_never_reverses_the_ranking():
    rng = np.random.default_rng(2)
    z = rng.normal(size=2000)
    y = (rng.random(2000) < 1 / (1 + np.exp(z))).astype(int)  # the score is anti-correlated with the label
    cal = fit_calibration(1 / (1 + np.exp(-z)), y, "platt")
    assert cal.a > 0
    p = cal.apply(1 / (1 + np.exp(-z)))
    assert (np.diff(p[np.argsort(z)]) >= 0).all()


def test_platt_at_the_slope_bound_still_fits_the_intercept():
    # An anti-correlated score pins a at MIN_SLOPE; b must then be the best intercept for that a:
    # the mean calibrated probability equals the base rate (d log-loss / d b = mean(p - y) = 0).
    # (The hand-written Newton steps stopped short here: b -0.0034 instead of -0.0160.)
    rng = np.random.default_rng(0)
    z = rng.normal(size=4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-z))).astype(int)
    s = 1 / (1 + np.exp(z))
    cal = fit_calibration(s, y, "platt")
    assert cal.a == MIN_SLOPE
    assert np.mean(cal.apply(s) - y) == pytest.approx(0.0, abs=1e-6)
    # where the optimum is inside the bound, the fit is the unconstrained maximum likelihood: both gradients 0
    over = 1 / (1 + np.exp(-(3 * z + 1)))
    cal = fit_calibration(over, y, "platt")
    r = cal.apply(over) - y
    assert abs(np.mean(r)) < 1e-6 and abs(np.mean(r * logit(over))) < 1e-6
