"""Edge cases of ``stepprobe.training.metrics``, on small data where the rule decides the result.

Each test pins behaviour on small data where the rule decides the result: ECE bin edges and
clamping, the F1 threshold at ties and at the lowest score, running means at exact fractions,
the empty results' types, default arguments (threshold, seed, number of resamples), the
percentile bounds of the problem bootstrap, which problems the within-problem dicts keep, and
that degenerate inputs give ``nan`` quietly (no RuntimeWarning in the logs).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from stepprobe.errors import StepprobeError
from stepprobe.stats import N_BOOT, mean_interval, resample_counts
from stepprobe.training import metrics as M
from stepprobe.training.evaluation import metric_with_ci


def _quiet():
    """Context in which any warning is an error."""
    cm = warnings.catch_warnings()
    cm.__enter__()
    warnings.simplefilter("error")
    return cm


# --------------------------------------------------------------------------- names / modes

def test_mode_of_error_lists_every_known_validation_name():
    with pytest.raises(StepprobeError) as e:
        M.mode_of("val_nonsense")
    msg = str(e.value)
    expected = ", ".join(f"val_{m}" for m in (*M.ALL_METRICS, M.LOSS))
    assert msg.endswith(expected)
    assert "val_auroc, val_auprc" in msg and "None" not in msg


#: what within_problem_metrics writes, without and with the interval bounds
BASE = {"within_auroc", "within_rank25", "within_rank50", "within_rank75", "within_problems"}
BOUNDS = {f"{m}_{b}" for m in ("within_auroc", "within_rank25", "within_rank50", "within_rank75") for b in ("lo", "hi")}


# --------------------------------------------------------------------------- auroc

def test_auroc_one_class_is_nan_without_warnings():
    cm = _quiet()
    try:
        assert np.isnan(M.auroc(np.array([0.1, 0.7, 0.4]), np.array([1, 1, 1])))
        assert np.isnan(M.auroc(np.array([0.1, 0.7, 0.4]), np.array([0, 0, 0])))
        assert np.isnan(M.auroc(np.array([]), np.array([])))
    finally:
        cm.__exit__(None, None, None)


# --------------------------------------------------------------------------- ece

def test_ece_edges_clamping_and_count_weighting():
    # score 1.0 falls in the top bin (index 14), not outside the bins
    assert M.ece(np.array([1.0]), np.array([0])) == pytest.approx(1.0)
    assert M.ece(np.array([1.0, 0.99]), np.array([1, 0])) == pytest.approx(abs(0.995 - 0.5))
    # scores outside [0, 1] are clamped into the edge bins
    assert M.ece(np.array([-0.2]), np.array([0])) == pytest.approx(0.2)
    assert M.ece(np.array([-0.2, 0.01]), np.array([0, 0])) == pytest.approx(abs(-0.095))
    assert M.ece(np.array([1.3, 0.95]), np.array([1, 1])) == pytest.approx(abs(1.125 - 1.0))
    # bin 0 = [0, 1/15) and bin 1 = [1/15, 2/15) are separate
    s, y = np.array([0.01, 0.1]), np.array([1, 0])
    assert M.ece(s, y) == pytest.approx((0.99 + 0.1) / 2)
    # bin 13 = [13/15, 14/15) and bin 14 = [14/15, 1] are separate
    s, y = np.array([0.9, 0.95]), np.array([0, 1])
    assert M.ece(s, y) == pytest.approx((0.9 + 0.05) / 2)
    # weighting by count: a bin of 3 weighs three times a bin of 1
    s, y = np.array([0.2, 0.2, 0.2, 0.8]), np.array([1, 1, 1, 1])
    assert M.ece(s, y) == pytest.approx((3 * 0.8 + 0.2) / 4)
    # empty input
    assert np.isnan(M.ece(np.array([]), np.array([])))


def test_ece_is_computed_in_float64_whatever_the_input_dtype():
    rng = np.random.default_rng(3)
    s32 = rng.random(101).astype(np.float32)
    y32 = (rng.random(101) < 0.4).astype(np.float32)  # BCE targets are float32 tensors
    ref = M.ece(s32.astype(np.float64), y32.astype(np.float64))
    assert M.ece(s32, y32) == ref
    assert M.ece(s32, y32.astype(np.int64)) == ref
    assert M.ece(s32.astype(np.float64), y32) == ref
    # binning too: float32(0.7) is 0.69999998..., bin 6 of 10 (float32 arithmetic would put 0.7f * 10 in bin 7)
    s, y = np.array([0.7, 0.65], dtype=np.float32), np.array([1, 0])
    assert M.ece(s, y, bins=10) == M.ece(s.astype(np.float64), y, bins=10)
    assert M.ece(s, y, bins=10) == pytest.approx(abs(float(s[0]) + float(s[1]) - 1) / 2)
    # row weights (float32 from torch) are summed in float64 as well
    w32 = rng.random((2, 101)).astype(np.float32)
    assert (M.ece(s32, y32, weights=w32) == M.ece(s32, y32, weights=w32.astype(np.float64))).all()
    assert M.ece(s32, y32, weights=w32[0]) == M.ece(s32, y32, weights=w32[0].astype(np.float64))


def test_ece_weights_count_rows_and_many_weightings_at_once():
    rng = np.random.default_rng(4)
    s, y = rng.random(40), (rng.random(40) < 0.5).astype(int)
    w = rng.integers(0, 4, size=(3, 40))
    got = M.ece(s, y, weights=w)
    assert isinstance(got, np.ndarray) and got.shape == (3,)
    for row, g in zip(w, got):
        keep = np.repeat(np.arange(40), row)  # a weight of k = the row k times
        assert g == pytest.approx(M.ece(s[keep], y[keep]), abs=1e-12)
        one = M.ece(s, y, weights=row)
        assert isinstance(one, float) and one == pytest.approx(g, abs=1e-12)
    assert M.ece(s, y, weights=np.ones(40)) == pytest.approx(M.ece(s, y), abs=1e-15)
    assert M.ece(s, y, bins=3, weights=np.ones(40)) == pytest.approx(M.ece(s, y, bins=3), abs=1e-15)
    cm = _quiet()
    try:  # rows that weigh nothing: nan, quietly
        zero = M.ece(s, y, weights=np.zeros((2, 40)))
        assert np.isnan(zero).all() and np.isnan(M.ece(s, y, weights=np.zeros(40)))
    finally:
        cm.__exit__(None, None, None)


# --------------------------------------------------------------------------- best_f1_threshold

def _f1_at(scores, labels, t):
    return f1_score(labels, (scores >= t).astype(int), zero_division=0.0)


def test_best_f1_threshold_single_score_and_lowest_score():
    assert M.best_f1_threshold(np.array([0.3]), np.array([1])) == pytest.approx(0.3)
    assert M.best_f1_threshold(np.array([0.3]), np.array([0])) == 0.5  # no positive: the default
    assert M.best_f1_threshold(np.array([]), np.array([])) == 0.5
    # every row correct: the best cut predicts all correct, i.e. the lowest score
    s, y = np.array([0.9, 0.1, 0.5]), np.array([1, 1, 1])
    assert M.best_f1_threshold(s, y) == pytest.approx(0.1)
    assert _f1_at(s, y, 0.1) == 1.0


def test_best_f1_threshold_cuts_only_between_distinct_scores():
    # ties not at the top: cutting inside the 0.6 group would count one positive, which a
    # threshold cannot do; the true optimum is at 0.6 (both tied rows predicted correct)
    s = np.array([0.9, 0.6, 0.6, 0.6, 0.2])
    y = np.array([0, 1, 0, 1, 0])
    t = M.best_f1_threshold(s, y)
    cands = np.unique(s)
    best = max(_f1_at(s, y, c) for c in cands)
    assert _f1_at(s, y, t) == pytest.approx(best)
    assert t == pytest.approx(0.6)
    # here the running tp/fp inside a tie would look best at a cut inside the tie
    s = np.array([0.8, 0.8, 0.7, 0.3, 0.3, 0.3])
    y = np.array([1, 0, 1, 1, 0, 0])
    t = M.best_f1_threshold(s, y)
    best = max(_f1_at(s, y, c) for c in np.unique(s))
    assert _f1_at(s, y, t) == pytest.approx(best)
    assert t in set(s.tolist())


def test_best_f1_threshold_against_brute_force_on_random_ties():
    rng = np.random.default_rng(5)
    for _ in range(30):
        n = int(rng.integers(2, 15))
        s = rng.integers(0, 5, n) / 4.0
        y = rng.integers(0, 2, n)
        if not y.any():
            continue
        t = M.best_f1_threshold(s, y)
        best = max(_f1_at(s, y, c) for c in np.unique(s))
        assert _f1_at(s, y, t) == pytest.approx(best)


# --------------------------------------------------------------------------- running_mean_at

def test_running_mean_at_exact_fractions_and_one_step_trace():
    # trace 7: 4 steps (rel 0, .25, .5, .75); trace 9: one step (rel 0)
    trace = np.array([7, 7, 7, 7, 9])
    rel = np.array([0.0, 0.25, 0.5, 0.75, 0.0])
    s = np.array([0.1, 0.3, 0.5, 0.9, 0.4])
    for frac, exp7 in ((0.25, 0.2), (0.5, 0.3), (0.75, 0.45), (1.0, 0.45), (0.0, 0.1)):
        ids, means = M.running_mean_at(s, trace, rel, frac)
        assert ids.tolist() == [7, 9]
        assert means == pytest.approx([exp7, 0.4])
    # the tolerance is inclusive: a step at exactly fraction + REL_TOLERANCE counts, one beyond does not
    tol = M.REL_TOLERANCE
    ids, means = M.running_mean_at(np.array([0.2, 0.6]), np.array([1, 1]), np.array([0.0, 0.5 + tol]), 0.5)
    assert means == pytest.approx([0.4])
    ids, means = M.running_mean_at(np.array([0.2, 0.6]), np.array([1, 1]), np.array([0.0, 0.5 + 2 * tol]), 0.5)
    assert means == pytest.approx([0.2])
    # a trace whose steps all start later is left out
    ids, means = M.running_mean_at(s, trace, np.array([0.0, 0.25, 0.5, 0.75, 0.6]), 0.5)
    assert ids.tolist() == [7] and means == pytest.approx([0.3])


def test_running_mean_at_no_step_keeps_the_trace_dtype():
    for trace in (np.array([3, 3, 4]), np.array(["a", "a", "b"])):
        ids, means = M.running_mean_at(np.array([0.1, 0.2, 0.3]), trace, np.array([0.5, 0.6, 0.9]), 0.25)
        assert ids.shape == (0,) and means.shape == (0,)
        assert ids.dtype == trace.dtype
        assert means.dtype == np.float64


def test_a_step_at_the_fraction_counts_though_the_file_stores_its_position_in_float32():
    """Steps k / n of a trace are stored as float32: step 1 of 3 lies 1e-8 above 1/3, and is
    still one third of the way through (7 steps: 2/7 and 3/7 below 3/7, 4/7 above)."""
    for n, frac in ((3, 1 / 3), (3, 2 / 3), (7, 3 / 7), (10, 0.3)):
        rel = (np.arange(n) / n).astype(np.float32)
        k = round(frac * n)
        assert M.up_to(rel, frac).tolist() == [i <= k for i in range(n)]
        scores = np.linspace(0.1, 0.9, n)
        ids, means = M.running_mean_at(scores, np.zeros(n, dtype=int), rel, frac)
        assert means == pytest.approx([scores[:k + 1].mean()])


def test_early_auroc_tolerance_is_inclusive():
    rel = np.array([0.0, 0.0, 0.5 + M.REL_TOLERANCE, 0.5 + M.REL_TOLERANCE])
    s = np.array([0.5, 0.5, 0.9, 0.1])
    y = np.array([1, 0, 1, 0])
    m = M.compute_metrics(s, y, rel_position=rel)
    assert m["early50_auroc"] == pytest.approx(roc_auc_score(y, s))
    assert m["early25_auroc"] == pytest.approx(0.5)


# --------------------------------------------------------------------------- groups / within

def test_within_problem_auroc_of_one_row_none_and_the_problem_order():
    assert M.within_problem_auroc(np.array([0.3]), np.array([1]), np.array([7])) == {}
    assert M.within_problem_auroc(np.array([]), np.array([]), np.array([])) == {}
    s = np.array([0.9, 0.2, 0.1, 0.4, 0.5, 0.6])
    y = np.array([1, 0, 1, 0, 1, 1])
    got = M.within_problem_auroc(s, y, np.array([2, 2, 1, 1, 3, 3]))  # problem 3 has one outcome only
    assert list(got) == ["1", "2"] and got == {"1": 0.0, "2": 1.0}
    none_right = M.within_problem_auroc(s, 1 - y, np.array([2, 2, 1, 1, 3, 3]))  # problem 3: none right
    assert none_right == {"1": 1.0, "2": 0.0}
    # ties count one half; many problems are scored together
    s = np.array([0.5, 0.5, 0.2, 0.9, 0.1, 0.1, 0.3])
    y = np.array([1, 0, 0, 1, 0, 1, 1])
    got = M.within_problem_auroc(s, y, np.array([0, 0, 0, 5, 5, 7, 7]))
    assert got == {"0": pytest.approx(roc_auc_score([1, 0, 0], [0.5, 0.5, 0.2])), "5": 1.0}


def test_within_problem_auroc_scores_each_problem_once_within_the_memory_budget(monkeypatch):
    """One weighting row per problem, each problem once, and the one-hot weights of a batch kept
    to 4,000,000 cells (one row at a time once the rows alone reach half of that)."""
    shapes = []
    real = M.weighted_auroc

    def spy(scores, labels, weights):
        shapes.append(weights.shape)
        return real(scores, labels, weights)

    monkeypatch.setattr(M, "weighted_auroc", spy)
    rng = np.random.default_rng(7)
    problem = np.repeat(np.arange(30), 4)
    y = np.tile([1, 0, 1, 0], 30)
    got = M.within_problem_auroc(rng.random(120), y, problem)
    assert len(got) == 30 and sum(s[0] for s in shapes) == 30 and len(shapes) == 1
    shapes.clear()
    n = 2_000_001  # 4,000,000 // n == 1: two problems take two batches of one row
    problem, y = np.arange(n) % 2, (np.arange(n) // 2) % 2
    got = M.within_problem_auroc(rng.random(n), y, problem)
    assert len(got) == 2 and shapes == [(1, n), (1, n)]


def test_within_problem_rank_keeps_only_problems_with_both_outcomes():
    # problem "p": traces 1 (correct) and 2 (wrong); problem "q": traces 3, 4 both correct
    trace = np.array([1, 1, 2, 2, 3, 4])
    problem = np.array(["p", "p", "p", "p", "q", "q"])
    labels = np.array([1, 1, 0, 0, 1, 1])
    rel = np.array([0.0, 0.5, 0.0, 0.5, 0.0, 0.0])
    s = np.array([0.6, 0.8, 0.7, 0.2, 0.1, 0.9])
    r = M.within_problem_rank(s, labels, trace, problem, rel, 0.25)
    assert r == {"p": 0.0}  # 0.6 < 0.7 at 25 %
    r = M.within_problem_rank(s, labels, trace, problem, rel, 0.5)
    assert r == {"p": 1.0}  # 0.7 > 0.45 at 50 %
    a = M.within_problem_auroc(s, labels, problem)
    assert list(a) == ["p"] and a["p"] == pytest.approx(roc_auc_score([1, 1, 0, 0], s[:4]))
    # one trace only: nothing to rank
    assert M.within_problem_rank(s[:2], labels[:2], trace[:2], problem[:2], rel[:2], 0.5) == {}


def test_within_problem_rank_counts_pairs_with_ties_half():
    # one problem, 2 correct traces and 2 wrong (one step each): 4 pairs
    trace = np.array([1, 2, 3, 4])
    problem = np.array([5, 5, 5, 5])
    labels = np.array([1, 1, 0, 0])
    rel = np.zeros(4)
    s = np.array([0.8, 0.4, 0.4, 0.1])  # pairs: (0.8>0.4), (0.8>0.1), (0.4=0.4 -> 1/2), (0.4>0.1)
    assert M.within_problem_rank(s, labels, trace, problem, rel, 0.5) == {"5": pytest.approx(3.5 / 4)}


def test_mean_of_no_finite_value_is_nan_quietly():
    cm = _quiet()
    try:
        assert np.isnan(M._mean({}))
        assert np.isnan(M._mean({"a": float("nan")}))
        m = M.within_problem_metrics(np.array([0.2, 0.4]), np.array([1, 1]), trace=np.array([1, 2]),
                                     problem=np.array([0, 0]), rel_position=np.zeros(2))
        assert all(np.isnan(m[k]) for k in M.WITHIN_METRICS) and m[M.WITHIN_PROBLEMS] == 0.0
    finally:
        cm.__exit__(None, None, None)
    assert M._mean({"a": 0.2, "b": float("nan"), "c": 0.6}) == pytest.approx(0.4)


# --------------------------------------------------------------------------- within_problem_metrics

def _within_data():
    rng = np.random.default_rng(11)
    rows = []
    for p in range(12):
        for t in range(4):
            y = int(t % 2 == 0) if p % 3 else 1  # every third problem has one outcome only
            n = int(rng.integers(1, 6))
            for i in range(n):
                rows.append((rng.random() * 0.5 + 0.3 * y, y, p * 10 + t, p, i / n))
    s, y, tr, pr, rel = map(np.array, zip(*rows))
    return s, y.astype(int), tr, pr, rel


def test_within_problem_metrics_keys_and_bootstrap_arguments():
    s, y, tr, pr, rel = _within_data()
    kw = dict(trace=tr, problem=pr, rel_position=rel)
    plain = M.within_problem_metrics(s, y, **kw)  # default: no intervals
    assert set(plain) == BASE
    assert set(M.within_problem_metrics(s, y, bootstrap=0, **kw)) == BASE
    one = M.within_problem_metrics(s, y, bootstrap=1, **kw)
    assert set(one) == BASE | BOUNDS
    assert plain[M.WITHIN_PROBLEMS] == 8.0
    per_auroc = M.within_problem_auroc(s, y, pr)
    assert plain[M.WITHIN_AUROC] == pytest.approx(np.mean(list(per_auroc.values())))
    for seed in (0, 3):
        b = M.within_problem_metrics(s, y, bootstrap=40, seed=seed, **kw)
        ci = mean_interval(list(per_auroc.values()), n_boot=40, seed=seed)
        assert (b["within_auroc_lo"], b["within_auroc_hi"]) == (ci.low, ci.high)
        for frac, name in M.WITHIN_RANK.items():
            d = mean_interval(list(M.within_problem_rank(s, y, tr, pr, rel, frac).values()), n_boot=40, seed=seed)
            assert (b[f"{name}_lo"], b[f"{name}_hi"]) == (d.low, d.high)
    # default seed is 0 and the result is reproducible
    assert M.within_problem_metrics(s, y, bootstrap=40, **kw) == M.within_problem_metrics(s, y, bootstrap=40,
                                                                                          seed=0, **kw)
    assert M.within_problem_metrics(s, y, bootstrap=40, **kw) != M.within_problem_metrics(s, y, bootstrap=40,
                                                                                          seed=1, **kw)


# --------------------------------------------------------------------------- the AUROC's interval

def _boot_data():
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(15), 6)
    labels = rng.integers(0, 2, groups.size)
    scores = rng.normal(size=groups.size) + labels * 0.7 + rng.normal(size=15)[groups]
    return scores, labels, groups


def test_auroc_interval_defaults_and_one_resample():
    s, y, g = _boot_data()
    d = metric_with_ci("auroc", s, y, g)
    assert d == metric_with_ci("auroc", s, y, g, n=N_BOOT, level=0.95, seed=0) and d.n == 15
    assert d != metric_with_ci("auroc", s, y, g, n=N_BOOT // 2, seed=0)
    assert d != metric_with_ci("auroc", s, y, g, seed=1)
    one = metric_with_ci("auroc", s, y, g, n=1, seed=5)
    assert np.isfinite(one.low) and one.low == one.high
    # one resample = the AUROC of the rows of the drawn problems, with multiplicity
    counts = resample_counts(15, n_boot=1, seed=5)[0][np.unique(g, return_inverse=True)[1]]
    assert one.low == pytest.approx(roc_auc_score(y, s, sample_weight=counts), abs=1e-12)
    assert np.isnan(metric_with_ci("auroc", s, y, g, n=0).low)
    # one class everywhere: every resample degenerate
    iv = metric_with_ci("auroc", s, np.ones_like(y), g, n=20)
    assert np.isnan(iv.low) and np.isnan(iv.high) and np.isnan(iv.value)


# --------------------------------------------------------------------------- compute_metrics

def test_compute_metrics_default_threshold_and_auprc_edges():
    s = np.array([0.9, 0.6, 0.45, 0.3, 0.55])
    y = np.array([1, 0, 1, 0, 0])
    m = M.compute_metrics(s, y)
    pred = (s >= 0.5).astype(int)
    assert m[M.ACCURACY] == pytest.approx(np.mean(pred == y))
    assert m[M.F1] == pytest.approx(f1_score(y, pred))
    assert m == M.compute_metrics(s, y, threshold=0.5)
    assert set(m) == {M.AUROC, M.AUPRC, M.ACCURACY, M.F1, M.ECE}  # default: no bootstrap keys
    # exactly one correct row: AUPRC is defined
    assert m[M.AUPRC] == pytest.approx(average_precision_score(y, s))
    y1 = np.array([0, 0, 1, 0, 0])
    assert M.compute_metrics(s, y1)[M.AUPRC] == pytest.approx(average_precision_score(y1, s))
    # every row correct: AUPRC (like AUROC) is nan
    m_all = M.compute_metrics(s, np.ones(5, dtype=int))
    assert np.isnan(m_all[M.AUPRC]) and np.isnan(m_all[M.AUROC])
    assert m_all[M.F1] == pytest.approx(f1_score(np.ones(5), pred))


def test_float32_scores_are_compared_with_the_threshold_exactly():
    """A score is predicted correct when it is at least the threshold, compared exactly: a
    float32 score just below a threshold is below it (in float32 the threshold would round onto it)."""
    t = 0.5 + 1e-9  # float32(t) == 0.5
    s = np.array([0.5, 0.5, 0.9, 0.1], dtype=np.float32)
    y = np.array([1, 0, 1, 0])
    m = M.compute_metrics(s, y, threshold=t)
    assert m[M.ACCURACY] == pytest.approx(0.75)  # only 0.9 predicted correct
    assert m[M.F1] == pytest.approx(f1_score(y, [0, 0, 1, 0]))
    assert m == M.compute_metrics(s.astype(np.float64), y, threshold=t)


def test_compute_metrics_defaults_with_problems_have_no_intervals():
    s, y, tr, pr, rel = _within_data()
    m = M.compute_metrics(s, y, trace=tr, rel_position=rel, problem=pr)
    assert set(m) == set(M.METRICS) | BASE
    mb = M.compute_metrics(s, y, trace=tr, rel_position=rel, problem=pr, bootstrap=30, prefix="val")
    assert set(mb) == {f"val_{k}" for k in set(M.METRICS) | BASE | BOUNDS}
    assert mb["val_within_auroc_lo"] <= mb["val_within_auroc"] <= mb["val_within_auroc_hi"]


def test_compute_metrics_empty_split_is_nan_quietly():
    cm = _quiet()
    try:
        m = M.compute_metrics(np.array([]), np.array([], dtype=int))
    finally:
        cm.__exit__(None, None, None)
    assert np.isnan(m[M.ACCURACY]) and np.isnan(m[M.AUROC]) and np.isnan(m[M.AUPRC]) and np.isnan(m[M.ECE])
    assert m[M.F1] == 0.0


# --------------------------------------------------------------------------- weighted_auroc

def test_weighted_auroc_smallest_and_degenerate_weightings_quietly():
    scores = np.array([0.9, 0.3, 0.5, 0.3])
    labels = np.array([0, 1, 0, 0])
    w = np.array([[1, 1, 0, 0],   # one correct vs one wrong (den = 1): defined, 0
                  [0, 1, 0, 1],   # a tie: 1/2
                  [1, 0, 1, 0],   # no correct row: nan
                  [0, 1, 0, 0],   # no wrong row: nan
                  [2, 3, 1, 0]])
    cm = _quiet()
    try:
        got = M.weighted_auroc(scores, labels, w)
    finally:
        cm.__exit__(None, None, None)
    assert got[0] == 0.0 and got[1] == 0.5
    assert np.isnan(got[2]) and np.isnan(got[3])
    assert got[4] == pytest.approx(roc_auc_score(labels, scores, sample_weight=w[4]))


def test_best_f1_threshold_accepts_hard_and_unsigned_scores():
    # a baseline's hard predictions (bool) and 8-bit scores must be ordered as numbers
    assert M.best_f1_threshold(np.array([True, False, True]), np.array([1, 0, 0])) == 1.0
    s = np.array([0, 200, 100, 255], dtype=np.uint8)
    y = np.array([0, 1, 0, 1])
    assert M.best_f1_threshold(s, y) == 200.0
