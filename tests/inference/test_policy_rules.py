"""The pruning policies' pure rules (inference/policies.py): score aggregates, thresholds and
their warm-up, top fraction, group gaps, the memory victim's order, the min-live cap and the
risk cutoff. Each test fails when the named rule is broken."""

from __future__ import annotations

import pytest

from stepprobe.inference.policies import (Live, TraceScore, aggregate_scores, below_cutoff, below_group_best,
                                          below_threshold, cap_to_min_live, group_gaps, memory_victim,
                                          memory_victim_keys, top_fraction_losers)
from stepprobe.options import PruningOptions


def test_cap_to_min_live_looks_at_every_group():
    # Group "a" has nothing flagged; group "b" (after it) has a flagged trace that may go.
    live = [Live("a0", "a", 0.9, True, 1), Live("a1", "a", 0.8, True, 1),
            Live("b0", "b", 0.7, True, 1), Live("b1", "b", 0.1, True, 1)]
    assert cap_to_min_live(["b1"], live) == ["b1"]
    assert cap_to_min_live(["b0", "b1"], live) == ["b1"]  # "b" keeps one: the lowest goes


def test_memory_victim_keys_score_rule_and_unknown_rules_are_named():
    live = [Live("x", "g", 0.9, True, 1), Live("y", "g", 0.2, True, 1), Live("z", "g", 0.5, True, 1)]
    keys = memory_victim_keys(live, "score")
    assert sorted(keys, key=keys.get)[-1] == "y"  # sorted ascending, the victim comes last
    with pytest.raises(ValueError, match="unknown memory victim rule 'worst'; known: score, group_gap, group_largest"):
        memory_victim_keys(live, "worst")


def test_top_fraction_keeps_unscored_traces():
    # An unscored trace (no step yet, but at keep_step by count) ranks above every scored one.
    assert top_fraction_losers({"a": (None, 3), "b": (0.1, 3)}, 0.5, 3) == ["b"]
    assert top_fraction_losers({"b": (0.1, 3), "a": (None, 3), "c": (0.4, 3)}, 0.3, 3) == ["c", "b"]


def test_group_gap_ties_go_to_the_lower_score():
    # Both problems have a trace exactly 0.25 below its best other trace; the tie goes to the
    # lower score (b1), whichever problem comes first.
    live = [Live("a0", "A", 1.0, True, 1), Live("a1", "A", 0.75, True, 1),
            Live("b0", "B", 0.5, True, 1), Live("b1", "B", 0.25, True, 1)]
    for order in (live, live[2:] + live[:2]):
        assert memory_victim(order, "group_gap") == "b1"
        keys = memory_victim_keys(order, "group_gap")
        assert sorted(keys, key=keys.get)[-2:] == ["a1", "b1"]


def test_the_option_group_declares_the_rules_defaults():
    """The rules take no defaults of their own; the pruning options declare them once."""
    assert (PruningOptions.aggregate, PruningOptions.ema_alpha, PruningOptions.memory_victim) == ("mean", 0.3, "score")
    assert aggregate_scores([1.0, 0.5, 0.0], "mean", 0.3) == 0.5
    assert aggregate_scores([1.0, 0.0], "ema", 0.3) == pytest.approx(0.7)  # 0.3 * 0 + 0.7 * 1
    assert aggregate_scores([1.0, 0.0], "ema", 0.5) == pytest.approx(0.5)


def test_thresholds_are_strict_and_warmup_inclusive():
    # Exactly at the threshold (or exactly margin below the best other) is not below it;
    # the warm-up counts the step that reaches it. Values are exact in binary.
    assert not below_threshold(0.5, 3, 0.5, 3) and below_threshold(0.25, 3, 0.5, 3)
    assert not below_group_best(0.5, 3, [0.75], 0.25, 3)
    assert below_group_best(0.25, 3, [0.75, None], 0.25, 3)
    assert not below_group_best(0.25, 2, [0.75], 0.25, 3)


def test_group_gaps_compare_with_the_best_other_trace():
    live = [Live("a", "g", 0.25), Live("b", "g", 1.0), Live("c", "g", 0.5), Live("u", "g", None), Live("s", "h", 0.5)]
    assert group_gaps(live) == {"a": -0.75, "b": 0.5, "c": -0.5, "u": None, "s": None}


def test_cap_to_min_live_takes_scored_before_unscored():
    live = [Live("u1", "g", None, True, 1), Live("x", "g", 0.75, True, 1), Live("u2", "g", None, True, 1),
            Live("y", "g", 0.5, True, 1)]
    assert cap_to_min_live(["u1", "x", "u2"], live) == ["x", "u1", "u2"]  # room for 3: scored first, then unscored
    assert cap_to_min_live(["u1", "u2", "x"], live[:3]) == ["x", "u1"]


def test_memory_victim_score_rule_is_lowest_overall_group_gap_within_a_problem():
    live = [Live("a0", "A", 0.9, True, 1), Live("a1", "A", 0.5, True, 1), Live("b0", "B", 0.3, True, 1),
            Live("b1", "B", 0.25, True, 1)]
    assert memory_victim(live, "score") == "b1"
    assert memory_victim(live, "group_gap") == "a1"


def test_group_gap_top_tie_may_go():
    # Two traces tied at the top of their problem: neither is above the other, so one may go.
    live = [Live("a0", "A", 0.5, True, 1), Live("a1", "A", 0.5, True, 1)]
    assert memory_victim(live, "group_gap") in {"a0", "a1"}
    assert memory_victim(live[:1] + [Live("a1", "A", 0.25, True, 1)], "group_gap") == "a1"


def test_group_largest_with_a_single_scored_trace():
    # No other scored trace to compare with: the group_largest rule ranks it by its score.
    live = [Live("a0", "A", 0.5, True, 1), Live("a1", "A", None, True, 1), Live("b0", "B", 0.75, True, 1),
            Live("b1", "B", None, True, 1)]
    assert memory_victim(live, "group_largest") == "a0"


@pytest.mark.parametrize("rule", ["score", "group_gap", "group_largest"])
def test_traces_that_may_not_go_keep_their_order(rule):
    # Unscored, unprunable, protected and (group_gap) best-of-problem traces all sort in front
    # with equal keys, so a stable sort keeps vLLM's order among them; victims come last.
    live = [Live("u", "A", None, True, 1), Live("a_best", "A", 0.75, True, 1), Live("p", "B", 0.25, False, 1),
            Live("b_best", "B", 1.0, True, 1), Live("a_low", "A", 0.5, True, 1), Live("b_low", "B", 0.5, True, 1)]
    keys = memory_victim_keys(live, rule)
    order = sorted(keys, key=keys.get)
    victims = [r for r in keys if keys[r][0] == 1]
    assert order[:len(keys) - len(victims)] == [r for r in keys if r not in victims]
    assert set(victims) >= {"a_low", "b_low"}


def test_below_cutoff_is_scored_and_strictly_below_an_earned_cutoff():
    """The risk-controlled memory rule's gate: an unscored trace never goes; no cutoff (the
    paper's rule) lets every scored trace go; a cutoff lets only scores strictly below it go,
    and a cutoff of 0 prunes nothing."""
    assert not below_cutoff(None, None) and not below_cutoff(None, 0.5)
    assert below_cutoff(0.3, None) and below_cutoff(0.99, None)
    assert below_cutoff(0.3, 0.5)
    assert not below_cutoff(0.5, 0.5) and not below_cutoff(0.7, 0.5)
    assert not below_cutoff(0.0, 0.0)


@pytest.mark.parametrize("agg,expected", [("mean", 0.5), ("last", 0.2), ("min", 0.2), ("ema", 0.3 * 0.2 + 0.7 * 0.8)])
def test_aggregates(agg, expected):
    assert aggregate_scores([0.8, 0.2], agg, ema_alpha=0.3) == pytest.approx(expected)
    assert TraceScore(agg, 0.3).value is None


def test_memory_rank_puts_lowest_prunable_last():
    traces = {"a": (0.9, True), "b": (0.1, True), "c": (None, True), "d": (0.05, False), "e": (0.5, True)}
    keys = memory_victim_keys([Live(r, "g", s, p) for r, (s, p) in traces.items()], "score")
    order = sorted(traces, key=keys.__getitem__)
    assert order[-1] == "b"
    assert set(order[:2]) == {"c", "d"}  # unscored and protected traces are never the victim


def test_threshold_and_top_fraction_rules():
    assert not below_threshold(None, 5, 0.5, 2)
    assert not below_threshold(0.1, 1, 0.5, 2)
    assert below_threshold(0.1, 2, 0.5, 2)
    assert top_fraction_losers({"a": (0.9, 3), "b": (0.1, 2)}, 0.5, 3) is None  # b not at step 3 yet
    assert top_fraction_losers({"a": (0.9, 3), "b": (0.1, 4), "c": (0.5, 3), "d": (0.3, 3)}, 0.5, 3) == ["d", "b"]
    assert top_fraction_losers({"a": (0.2, 3)}, 0.1, 3) == []  # at least one kept
