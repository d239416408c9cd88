"""Problem splits and metric functions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from stepprobe.errors import StepprobeError
from stepprobe.training import metrics as M
from stepprobe.training.data import make_split, open_hidden_states, row_problem_ids, split_problems
from stepprobe.training.evaluation import metric_with_ci


def test_split_by_problem_is_disjoint_seeded_and_recorded(synthetic_h5):
    hs = open_hidden_states(str(synthetic_h5))
    split = make_split(hs, val_fraction=0.2, test_fraction=0.2, seed=3)
    pid = row_problem_ids(hs)
    sets = {s: set(pid[r]) for s, r in split.rows.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert sets == {s: set(v) for s, v in split.problems.items()}
    assert sum(len(r) for r in split.rows.values()) == hs.num_steps  # every step in exactly one split
    # Every trace lies wholly in one split.
    for r in split.rows.values():
        traces = set(hs.steps["trace"][r])
        assert sum(int(hs.traces["num_steps"][t]) for t in traces) == len(r)
    assert len(split.problems["val"]) == 12 and len(split.problems["test"]) == 12
    again = make_split(hs, val_fraction=0.2, test_fraction=0.2, seed=3)
    assert again.problems == split.problems
    other = make_split(hs, val_fraction=0.2, test_fraction=0.2, seed=4)
    assert other.problems != split.problems
    d = split.to_dict()
    assert d["by"] == "problem" and d["seed"] == 3 and d["problems"]["test"] == split.problems["test"]


def test_subsampling_only_touches_train(synthetic_h5):
    hs = open_hidden_states(str(synthetic_h5))
    full = make_split(hs, seed=0)
    sub = make_split(hs, seed=0, max_steps_per_trace=2)
    assert np.array_equal(full.rows["val"], sub.rows["val"]) and np.array_equal(full.rows["test"], sub.rows["test"])
    counts = np.bincount(hs.steps["trace"][sub.rows["train"]])
    assert counts.max() == 2 and len(sub.rows["train"]) < len(full.rows["train"])
    assert set(sub.rows["train"]) <= set(full.rows["train"])


def test_split_refuses_too_few_problems():
    with pytest.raises(StepprobeError, match="at least 3 problems"):
        split_problems(["a", "b"])


def test_auroc_matches_sklearn_and_bootstrap_weights():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + y, 1)  # ties on purpose
    assert M.auroc(s, y) == pytest.approx(roc_auc_score(y, s))
    w = rng.integers(0, 3, size=(4, 300))
    for row in w:
        keep = np.repeat(np.arange(300), row)
        assert M.weighted_auroc(s, y, row[None])[0] == pytest.approx(roc_auc_score(y[keep], s[keep]))
    groups = np.repeat(np.arange(30), 10)
    iv = metric_with_ci("auroc", s, y, groups, n=200)
    assert iv.low < M.auroc(s, y) == iv.value < iv.high and iv.high - iv.low < 0.3 and iv.n == 30
    assert np.isnan(M.auroc(s, np.ones(300)))


def test_compute_metrics_names_and_values():
    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.1, 0.6, 0.3, 0.4])
    labels = np.array([1, 1, 1, 0, 0, 1, 0, 0])
    trace = np.array([0, 0, 1, 2, 2, 3, 4, 4])
    rel = np.array([0.0, 0.5, 0.0, 0.0, 0.5, 0.0, 0.0, 0.9])
    m = M.compute_metrics(scores, labels, trace=trace, rel_position=rel, threshold=0.5, prefix="val")
    assert set(m) == {M.key("val", k) for k in M.METRICS}
    assert m["val_auroc"] == 1.0 and m["val_accuracy"] == 1.0 and m["val_f1"] == 1.0
    assert m["val_trace_auroc"] == 1.0
    assert m[M.DEFAULT_TUNE_OBJECTIVE] == 1.0
    assert m["val_ece"] == pytest.approx(np.mean([0.1, 0.2, 0.3, 0.2, 0.1, 0.4, 0.3, 0.4]))
    assert M.best_f1_threshold(scores, labels) == 0.6
    assert M.mode_of("val_ece") == "min" and M.mode_of(M.DEFAULT_TUNE_OBJECTIVE) == "max"
    with pytest.raises(StepprobeError, match="unknown metric"):
        M.mode_of("val_bogus")
