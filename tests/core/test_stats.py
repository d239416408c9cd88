"""The problem bootstrap, the paired difference and the interval type, on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from stepprobe.errors import StepprobeError
from stepprobe.stats import (LEVEL, N_BOOT, QUANTILE_METHOD, Interval, bootstrap, format_interval, mean_interval,
                             paired_bootstrap, percentile_interval, resample_counts)


def test_three_problems_one_gained():
    # Differences (b - a) per problem: 1, 0, 0. A resample's mean is k/3 with k ~ Binomial(3, 1/3):
    # P(0) = 8/27 = 0.296 > 0.025, P(k <= 2) = 26/27 = 0.963 < 0.975, so the 95% interval is [0, 1].
    r = paired_bootstrap([0, 1, 1], [1, 1, 1])
    assert r.diff == pytest.approx(1 / 3)
    assert (r.low, r.high) == (0.0, 1.0)
    assert r.n == 3 and r.verdict == "no difference"
    assert r.label() == "+0.333 [+0.000, +1.000]"


def test_pairing_cancels_what_both_methods_share():
    # Unpaired, 50% vs 50% on 40 problems would have a wide interval; paired and identical, none.
    a = [1, 0] * 20
    r = paired_bootstrap(a, list(a))
    assert (r.diff, r.low, r.high) == (0.0, 0.0, 0.0)


def test_always_better_and_always_worse():
    assert paired_bootstrap([0] * 5, [1] * 5).verdict == "better"
    assert paired_bootstrap([1] * 5, [0] * 5).verdict == "worse"


def test_hundred_problems_ten_gained_matches_the_normal_approximation():
    a = [0] * 100
    b = [1] * 10 + [0] * 90
    r = paired_bootstrap(a, b)
    se = (0.1 * 0.9 / 100) ** 0.5  # 0.03
    assert r.diff == pytest.approx(0.1)
    assert r.low == pytest.approx(0.1 - 1.96 * se, abs=0.015)
    assert r.high == pytest.approx(0.1 + 1.96 * se, abs=0.015)
    assert r.verdict == "better"


def test_mismatched_or_empty_inputs_are_refused():
    with pytest.raises(StepprobeError):
        paired_bootstrap([1, 0], [1])
    with pytest.raises(StepprobeError):
        paired_bootstrap([], [])


# ------------------------------------------------------------------ the one problem bootstrap

def test_resample_counts_draw_each_problem_with_replacement():
    c = resample_counts(7, n_boot=500, seed=3)
    assert c.shape == (500, 7) and (c.sum(axis=1) == 7).all()
    assert (c == 0).any() and (c > 1).any()  # with replacement: some problems out, some twice
    draws = np.random.default_rng(3).integers(0, 7, size=(500, 7))  # the draws, one call
    assert (c == np.stack([np.bincount(d, minlength=7) for d in draws])).all()
    assert (resample_counts(7, n_boot=500, seed=3) == c).all() and (resample_counts(7, n_boot=500, seed=4) != c).any()


def test_bootstrap_weights_rows_by_their_problem_and_takes_the_declared_quantile():
    rng = np.random.default_rng(0)
    groups = np.repeat(["b", "a", "c", "d", "e"], 3)  # rows of one problem share its draw count
    x = rng.normal(size=15)
    seen = []

    def stat(w):
        seen.append(w)
        return w @ x / w.sum(axis=1)

    low, high = bootstrap(stat, groups, n_boot=600, level=0.8, seed=2)  # 256 + 256 + 88
    w = np.concatenate(seen)
    assert [len(s) for s in seen] == [256, 256, 88] and w.shape == (600, 15)
    counts = resample_counts(5, n_boot=600, seed=2)
    assert (w == counts[:, np.unique(groups, return_inverse=True)[1]]).all()
    ref = np.quantile(counts[:, [1, 0, 2, 3, 4]].repeat(3, axis=1) @ x / 15, [0.1, 0.9], method=QUANTILE_METHOD)
    assert (low, high) == (pytest.approx(ref[0], abs=1e-12), pytest.approx(ref[1], abs=1e-12))
    assert QUANTILE_METHOD == "inverted_cdf" and N_BOOT == 4000 and LEVEL == 0.95


def test_percentile_interval_drops_undefined_resamples():
    assert percentile_interval(np.array([np.nan, 1.0, 2.0, 3.0, np.inf]), level=0.5) == (1.0, 3.0)
    assert all(np.isnan(percentile_interval(np.array([np.nan]))))
    assert all(np.isnan(bootstrap(lambda w: w.sum(1), [], n_boot=10)))
    assert all(np.isnan(bootstrap(lambda w: w.sum(1), [1, 2], n_boot=0)))


def test_mean_interval_one_problem_and_defaults():
    iv = mean_interval([0.75, float("nan")], n_boot=20)
    assert (iv.value, iv.low, iv.high, iv.n) == (0.75, 0.75, 0.75, 1)
    v = np.random.default_rng(8).random(13)
    assert mean_interval(v) == mean_interval(v, n_boot=N_BOOT, level=LEVEL, seed=0)
    assert mean_interval(v) != mean_interval(v, seed=1)


# ------------------------------------------------------------------ one interval type, one formatter

def test_interval_label_and_both_artifact_shapes():
    iv = Interval(0.7, 0.5043, 0.8379, 14)
    assert iv.label() == "0.700 [0.504, 0.838]" and iv.label(2) == "0.70 [0.50, 0.84]"
    assert iv.label(signed=True) == "+0.700 [+0.504, +0.838]"
    assert Interval(0.5, float("nan"), float("nan")).label() == "0.500 [n/a, n/a]"
    # eval.json / sweep.json keys, and the paired difference's (replay, bench, trust.json): unchanged
    assert iv.to_dict() == {"value": 0.7, "lo": 0.5043, "hi": 0.8379, "n": 14}
    d = paired_bootstrap([0, 1, 1], [1, 1, 1])
    assert set(d.to_dict()) == {"diff", "low", "high", "n", "level", "verdict"}
    for doc in (iv.to_dict(), {"value": 0.7, "lo": 0.5043, "hi": 0.8379}, d.to_dict()):
        assert format_interval(doc) == Interval.from_dict(doc).label()
    assert format_interval(d.to_dict(), signed=True) == d.label() == "+0.333 [+0.000, +1.000]"
    assert format_interval({"value": 0.5, "lo": None, "hi": None}) == "0.500 [n/a, n/a]"  # nan -> None in JSON
    assert format_interval(None) == "n/a" and format_interval({}, missing="–") == "–"
    assert Interval.from_flat({"auroc": 0.6, "auroc_lo": 0.5, "auroc_hi": 0.7}, "auroc").label() == "0.600 [0.500, 0.700]"
    assert not Interval.from_flat({"auroc": 0.6}, "auroc").has_bounds
