"""The paired bootstrap on hand-made cases."""

from __future__ import annotations

import pytest

from stepprobe.errors import StepprobeError
from stepprobe.stats import paired_bootstrap


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
