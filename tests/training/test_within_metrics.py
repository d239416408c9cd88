"""Within-problem metrics on hand-made cases: each row is (problem, trace, label, rel_position, score)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stepprobe.stats import mean_interval
from stepprobe.training import metrics as M


def _cols(rows):
    p, t, y, rp, s = zip(*rows)
    return dict(problem=np.array(p), trace=np.array(t), labels=np.array(y), rel_position=np.array(rp, dtype=float),
                scores=np.array(s, dtype=float))


def _metrics(rows, **kw):
    c = _cols(rows)
    return M.compute_metrics(c["scores"], c["labels"], trace=c["trace"], rel_position=c["rel_position"],
                             problem=c["problem"], **kw)


# A ranks its traces right, B too, but all of B scores below all of A: across problems the
# ranking is poor, within each problem it is perfect.
EASY_HARD = [("A", 0, 1, 0.0, 0.9), ("A", 0, 1, 0.5, 0.8), ("A", 1, 0, 0.0, 0.6), ("A", 1, 0, 0.5, 0.5),
             ("B", 2, 1, 0.0, 0.3), ("B", 2, 1, 0.5, 0.4), ("B", 3, 0, 0.0, 0.1), ("B", 3, 0, 0.5, 0.2)]
# A perfect on 1 pair, B reversed on 2x2 traces of 3 steps (36 step pairs): the mean over
# problems is 0.5, the pooled pair fraction would be 1/37.
UNEQUAL = ([("A", 0, 1, 0.0, 0.9), ("A", 1, 0, 0.0, 0.1)]
           + [("B", t, int(t < 4), k / 3, 0.2 if t < 4 else 0.8) for t in range(2, 6) for k in range(3)])
# Problem C has only correct traces and D only wrong ones: neither counts.
ONE_OUTCOME = EASY_HARD + [("C", 10, 1, 0.0, 0.01), ("C", 11, 1, 0.0, 0.02), ("D", 12, 0, 0.0, 0.99)]
# Equal scores: every pair counts one half.
TIES = [("A", 0, 1, 0.0, 0.5), ("A", 1, 0, 0.0, 0.5), ("A", 2, 0, 0.0, 0.5)]
# The correct trace starts low and recovers: wrong order after 25 % of the steps, right
# after 50 % (mean .2,.2,.9 = .433 > .5,.5,.1 = .367) and 75 %.
LATE = [("A", 0, 1, 0.0, 0.2), ("A", 0, 1, 0.25, 0.2), ("A", 0, 1, 0.5, 0.9), ("A", 0, 1, 0.75, 0.9),
        ("A", 1, 0, 0.0, 0.5), ("A", 1, 0, 0.25, 0.5), ("A", 1, 0, 0.5, 0.1), ("A", 1, 0, 0.75, 0.1)]
# Traces of different lengths: a 2-step correct trace (rel 0, 0.5) against a 4-step wrong one;
# at 25 % the short trace has only its first step (0.7), the long one two steps (0.6, 0.8 -> 0.7): a tie.
LENGTHS = [("A", 0, 1, 0.0, 0.7), ("A", 0, 1, 0.5, 0.1),
           ("A", 1, 0, 0.0, 0.6), ("A", 1, 0, 0.25, 0.8), ("A", 1, 0, 0.5, 0.9), ("A", 1, 0, 0.75, 0.0)]

CASES = [
    ("easy_hard", EASY_HARD, {"within_auroc": 1.0, "within_rank25": 1.0, "within_rank50": 1.0,
                              "within_rank75": 1.0, "within_problems": 2}),
    ("unequal", UNEQUAL, {"within_auroc": 0.5, "within_rank50": 0.5, "within_problems": 2}),
    ("one_outcome", ONE_OUTCOME, {"within_auroc": 1.0, "within_rank50": 1.0, "within_problems": 2}),
    ("ties", TIES, {"within_auroc": 0.5, "within_rank25": 0.5, "within_rank75": 0.5, "within_problems": 1}),
    ("late", LATE, {"within_rank25": 0.0, "within_rank50": 1.0, "within_rank75": 1.0,
                    "within_auroc": 0.75}),  # steps (.2,.2,.9,.9) vs (.5,.5,.1,.1): 12 of 16 pairs
    ("lengths", LENGTHS, {"within_rank25": 0.5, "within_rank50": 0.0, "within_rank75": 0.0}),
]


@pytest.mark.parametrize("rows,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_within_problem_metrics_table(rows, expected):
    got = _metrics(rows)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value), name


def test_across_problems_is_not_within():
    got = _metrics(EASY_HARD)
    assert got["auroc"] < 0.8 and got["within_auroc"] == 1.0  # difficulty hides the within-problem ranking


def test_no_problem_with_both_outcomes_is_nan():
    got = _metrics([("C", 0, 1, 0.0, 0.5), ("C", 1, 1, 0.0, 0.4), ("D", 2, 0, 0.0, 0.3)], bootstrap=50)
    assert math.isnan(got["within_auroc"]) and math.isnan(got["within_rank50"]) and got["within_problems"] == 0
    assert math.isnan(got["within_auroc_lo"])


def test_bootstrap_interval_over_problems():
    # Per-problem values 1 (A) and 0 (B): the interval spans both; one repeated value has zero width.
    rows = EASY_HARD[:4] + [("B", 2, 1, 0.0, 0.1), ("B", 3, 0, 0.0, 0.3)]
    got = _metrics(rows, bootstrap=400)
    assert got["within_auroc"] == pytest.approx(0.5)
    assert got["within_auroc_lo"] == 0.0 and got["within_auroc_hi"] == 1.0
    same = _metrics(EASY_HARD, bootstrap=400)
    assert same["within_rank50_lo"] == same["within_rank50_hi"] == 1.0
    iv = mean_interval([0.2, 0.4, 0.9], n_boot=2000, seed=1)
    assert iv.low < 0.5 < iv.high


def test_mean_interval_without_resamples_or_values_is_nan():
    # No resamples asked for (bootstrap off) or no finite value: no interval, not an error.
    for n in (0, -1):
        iv = mean_interval([0.2, 0.4], n_boot=n)
        assert iv.value == pytest.approx(0.3) and math.isnan(iv.low) and math.isnan(iv.high)
    for values in ([float("nan")], []):
        iv = mean_interval(values, n_boot=100)
        assert all(math.isnan(x) for x in (iv.value, iv.low, iv.high)) and iv.n == 0


def test_within_metrics_are_objectives():
    for name in ("val_within_auroc", "val_within_rank50", "val_within_rank25", "val_within_rank75"):
        assert M.mode_of(name) == "max"


def test_report_shows_within_metrics_with_intervals(tmp_path):
    import json

    from stepprobe.report import render_markdown

    (tmp_path / "scorer").mkdir()
    m = {"test": {"auroc": 0.7, "within_auroc": 0.6, "within_auroc_lo": 0.5, "within_auroc_hi": 0.7,
                  "within_rank50": 0.65, "within_rank50_lo": 0.55, "within_rank50_hi": 0.75, "within_problems": 12},
         "reference_test": {"auroc": 0.66, "within_auroc": 0.58, "within_auroc_lo": 0.48, "within_auroc_hi": 0.68}}
    (tmp_path / "scorer" / "metrics.json").write_text(json.dumps({"metrics": m, "architecture": "mlp"}))
    md = render_markdown(tmp_path)
    assert "| within_auroc | 0.600 [0.500, 0.700] | 0.580 [0.480, 0.680] |" in md
    assert "| within_rank50 | 0.650 [0.550, 0.750] | None |" in md  # the reference row lacks it
    assert "the 12 test problems with both outcomes" in md
