"""The metric rules pinned against independent references (scikit-learn, closed forms).

Built so that a plausible wrong version fails: early-k AUROC that ignores ``rel_position``
(only late steps carry signal here), trace AUROC that is not the mean of a trace's steps or
ignores the trace grouping, a bootstrap that resamples steps instead of problems (scores
correlate within a problem here), ECE with the wrong bins, F1/threshold off by a cut.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, roc_auc_score

from stepprobe.errors import StepprobeError
from stepprobe.stats import QUANTILE_METHOD
from stepprobe.training import metrics as M
from stepprobe.training.evaluation import metric_with_ci


def auroc_ci(scores, labels, groups, *, n, level=0.95, seed=0):
    """The AUROC's problem-bootstrap interval as the stages compute it."""
    iv = metric_with_ci("auroc", scores, labels, groups, n=n, seed=seed, level=level)
    return iv.low, iv.high


def late_signal_data(seed: int = 0):
    """60 traces of 8 steps (rel_position 0, 1/8, ..., 7/8, rows shuffled); steps with
    rel_position > 0.5 score ``label + noise``, earlier steps pure noise."""
    rng = np.random.default_rng(seed)
    n_traces, steps = 60, 8
    trace = np.repeat(np.arange(n_traces), steps)
    labels = np.repeat(rng.integers(0, 2, n_traces), steps)
    rel = np.tile(np.arange(steps) / steps, n_traces)
    scores = rng.normal(size=trace.size) + np.where(rel > 0.5, 2.0 * labels, 0.0)
    order = rng.permutation(trace.size)
    return scores[order], labels[order], trace[order] * 7 + 3, rel[order]  # ids neither 0..n nor sorted


def test_early_k_auroc_uses_only_steps_up_to_k_against_sklearn():
    scores, labels, trace, rel = late_signal_data()
    m = M.compute_metrics(scores, labels, trace=trace, rel_position=rel)
    for frac, name in M.EARLY_AUROC.items():
        keep = rel <= frac + 1e-12  # inclusive: rel_position exactly 0.25 / 0.5 / 0.75 counts
        assert m[name] == pytest.approx(roc_auc_score(labels[keep], scores[keep]), abs=1e-12)
        assert m[name] != pytest.approx(roc_auc_score(labels[rel < frac], scores[rel < frac]), abs=1e-6)
    assert m[M.AUROC] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    # Only late steps carry signal: the early figures are near chance, the full one is not.
    assert abs(m[M.EARLY_AUROC[0.25]] - 0.5) < 0.15 and abs(m[M.EARLY_AUROC[0.5]] - 0.5) < 0.15
    assert m[M.AUROC] > 0.6 and m[M.EARLY_AUROC[0.75]] > m[M.EARLY_AUROC[0.5]] + 0.05
    assert M.DEFAULT_TUNE_OBJECTIVE == "val_early50_auroc"


def test_trace_auroc_is_the_auroc_of_each_traces_mean_step_score():
    rng = np.random.default_rng(1)
    rows_s, rows_y, rows_t = [], [], []
    means, sums, lasts, y_t = [], [], [], []
    for t in range(80):
        n = int(rng.integers(1, 12))  # unequal lengths: mean, sum and last rank traces differently
        y = int(rng.integers(0, 2))
        s = rng.normal(size=n) + 0.8 * y
        rows_s += list(s)
        rows_y += [y] * n
        rows_t += [1000 - 3 * t] * n
        means.append(s.mean()), sums.append(s.sum()), lasts.append(s[-1]), y_t.append(y)
    order = rng.permutation(len(rows_s))
    scores, labels, trace = np.array(rows_s)[order], np.array(rows_y)[order], np.array(rows_t)[order]
    expected = roc_auc_score(y_t, means)
    assert expected != pytest.approx(roc_auc_score(y_t, sums), abs=1e-3)  # the data tell them apart
    assert expected != pytest.approx(roc_auc_score(y_t, lasts), abs=1e-3)
    assert expected != pytest.approx(roc_auc_score(labels, scores), abs=1e-3)
    m = M.compute_metrics(scores, labels, trace=trace)
    assert m[M.TRACE_AUROC] == pytest.approx(expected, abs=1e-12)
    ts, tl = M.trace_scores(scores, labels, trace)
    by_id = {1000 - 3 * t: (means[t], y_t[t]) for t in range(80)}
    for tid, s, y in zip(sorted(by_id), ts, tl):
        assert (s, y) == (pytest.approx(by_id[tid][0], abs=1e-12), by_id[tid][1])
    assert M.TRACE_AUROC not in M.compute_metrics(scores, labels)  # no trace ids, no trace metric


def _reference_bootstrap(scores, labels, groups, n, level, seed):
    """The same resampling of problems (the same draws: one ``[n, problems]`` call), scored by scikit-learn."""
    uniq, inv = np.unique(groups, return_inverse=True)
    draws = np.random.default_rng(seed).integers(0, len(uniq), size=(n, len(uniq)))
    vals = []
    for d in draws:
        w = np.bincount(d, minlength=len(uniq))[inv]
        y = labels[w > 0]
        if y.min() != y.max():
            vals.append(roc_auc_score(labels, scores, sample_weight=w))
    a = (1 - level) / 2
    return tuple(np.quantile(vals, [a, 1 - a], method=QUANTILE_METHOD))


def correlated_problems(seed: int = 0):
    """40 problems x 15 steps; each problem has its own offset and mostly one outcome, so
    steps of a problem are far from independent."""
    rng = np.random.default_rng(seed)
    p, k = 40, 15
    groups = np.repeat(np.arange(p), k)
    offset = np.repeat(rng.normal(size=p), k)
    labels = (rng.random(p * k) < np.repeat(rng.choice([0.15, 0.85], p), k)).astype(int)
    scores = offset + 0.5 * labels + 0.3 * rng.normal(size=p * k)
    return scores, labels, groups


def test_bootstrap_resamples_problems_and_matches_a_reference():
    scores, labels, groups = correlated_problems()
    lo, hi = auroc_ci(scores, labels, groups, n=300, level=0.9, seed=3)
    ref_lo, ref_hi = _reference_bootstrap(scores, labels, groups, 300, 0.9, 3)
    assert (lo, hi) == (pytest.approx(ref_lo, abs=1e-9), pytest.approx(ref_hi, abs=1e-9))
    # Over problems the interval is much wider than over steps (each step its own group).
    s_lo, s_hi = auroc_ci(scores, labels, np.arange(labels.size), n=300, level=0.9, seed=3)
    assert hi - lo > 2 * (s_hi - s_lo)
    assert lo < M.auroc(scores, labels) < hi
    # A higher level is a wider interval; a different seed a different one.
    w_lo, w_hi = auroc_ci(scores, labels, groups, n=300, level=0.99, seed=3)
    assert w_lo < lo and w_hi > hi
    assert auroc_ci(scores, labels, groups, n=300, level=0.9, seed=4) != (lo, hi)
    assert all(np.isnan(auroc_ci(scores, labels, groups, n=0)))
    assert all(np.isnan(auroc_ci(scores, np.ones_like(labels), groups, n=20)))


def test_bootstrap_more_than_one_batch_of_resamples():
    scores, labels, groups = correlated_problems(1)
    got = auroc_ci(scores, labels, groups, n=600, seed=5)  # 256 + 256 + 88
    ref = _reference_bootstrap(scores, labels, groups, 600, 0.95, 5)
    assert got == (pytest.approx(ref[0], abs=1e-9), pytest.approx(ref[1], abs=1e-9))


def test_weighted_auroc_matches_sklearn_sample_weights_with_ties():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.normal(size=200) + y, 1)
    w = rng.integers(0, 4, size=(5, 200))
    got = M.weighted_auroc(s, y, w)
    for row, g in zip(w, got):
        assert g == pytest.approx(roc_auc_score(y, s, sample_weight=row), abs=1e-12)
    only_pos = np.where(y == 1, 1, 0)[None]
    assert np.isnan(M.weighted_auroc(s, y, only_pos))[0]


def test_auroc_ties_and_one_class():
    assert M.auroc(np.array([0.5, 0.5, 0.5, 0.5]), np.array([1, 0, 1, 0])) == 0.5
    assert M.auroc(np.array([0.1, 0.9]), np.array([1, 0])) == 0.0
    assert np.isnan(M.auroc(np.array([0.1, 0.2]), np.array([0, 0])))
    assert np.isnan(M.auroc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_ece_on_a_known_miscalibration():
    # Over-confident: says 0.9 and is right 60%; says 0.1 and is right 30%.
    scores = np.r_[np.full(10, 0.9), np.full(10, 0.1)]
    labels = np.r_[np.ones(6), np.zeros(4), np.ones(3), np.zeros(7)]
    assert M.ece(scores, labels) == pytest.approx((10 * 0.3 + 10 * 0.2) / 20)
    # Perfectly calibrated in every bin: zero.
    assert M.ece(np.full(4, 0.5), np.array([1, 0, 1, 0])) == pytest.approx(0.0)
    # 15 equal-width bins: 0.61 and 0.65 share the bin [0.6, 0.667), so their errors average
    # out (|0.63 - 0.5|), while 0.55 and 0.61 do not share one.
    assert M.ece(np.array([0.61, 0.65]), np.array([1, 0])) == pytest.approx(0.13)
    assert M.ece(np.array([0.55, 0.61]), np.array([1, 0])) == pytest.approx((0.45 + 0.61) / 2)
    assert M.ece(np.array([0.62, 0.68]), np.array([1, 0])) == pytest.approx((0.38 + 0.68) / 2)  # 10 bins would merge
    assert M.ece(np.array([0.61, 0.65]), np.array([1, 0]), bins=30) == pytest.approx((0.39 + 0.65) / 2)
    # A score of exactly 1.0 falls in the last bin, 0.0 in the first.
    assert M.ece(np.array([1.0, 0.95]), np.array([1, 0])) == pytest.approx(abs(0.975 - 0.5))
    assert M.ece(np.array([0.0, 0.05]), np.array([1, 0])) == pytest.approx(abs(0.025 - 0.5))
    assert np.isnan(M.ece(np.array([]), np.array([])))


def test_threshold_metrics_against_sklearn():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 300)
    s = np.clip(np.round(rng.normal(0.5, 0.2, 300) + 0.15 * y, 2), 0, 1)
    for t in (0.3, 0.5, 0.62):
        m = M.compute_metrics(s, y, threshold=t)
        assert m[M.F1] == pytest.approx(f1_score(y, s >= t), abs=1e-12)
        assert m[M.ACCURACY] == pytest.approx(accuracy_score(y, s >= t), abs=1e-12)
        assert m[M.AUPRC] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    t = M.best_f1_threshold(s, y)
    best = max(f1_score(y, s >= c) for c in np.unique(s))
    assert f1_score(y, s >= t) == pytest.approx(best, abs=1e-12)
    assert t in set(s)
    assert M.best_f1_threshold(s, np.zeros_like(y)) == 0.5
    assert M.best_f1_threshold(np.array([]), np.array([])) == 0.5
    none = M.compute_metrics(np.array([0.2, 0.1]), np.array([0, 0]), threshold=0.5)
    assert none[M.F1] == 0.0 and np.isnan(none[M.AUPRC]) and np.isnan(none[M.AUROC])
    assert none[M.ACCURACY] == 1.0


def test_metric_names_modes_and_clean():
    assert M.key("test", M.AUROC) == "test_auroc" and M.split_of("val_early50_auroc") == ("val", "early50_auroc")
    assert [M.EARLY_AUROC[f] for f in M.EARLY_FRACTIONS] == ["early25_auroc", "early50_auroc", "early75_auroc"]
    assert M.mode_of("val_loss") == "min" and M.mode_of("test_trace_auroc") == "max"
    assert M.mode_of("train_f1") == "max" and M.mode_of("val_ece") == "min"
    assert M.clean({"a": float("nan"), "b": np.float32(0.5), "c": {"d": float("inf")}, "e": "x", "f": 3}) == \
        {"a": None, "b": 0.5, "c": {"d": None}, "e": "x", "f": 3}
    m = M.compute_metrics(np.array([0.9, 0.1]), np.array([1, 0]), prefix="test")
    assert set(m) == {M.key("test", k) for k in (M.AUROC, M.AUPRC, M.ACCURACY, M.F1, M.ECE)}


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
