"""Policy rules the mutation run found unpinned (benchmarks/mutation.py): each test fails when
the named rule is broken."""

from __future__ import annotations

import pytest

from stepprobe.inference.policies import Live, cap_to_min_live, memory_victim, memory_victim_keys, top_fraction_losers


def test_cap_to_min_live_looks_at_every_group():
    # Group "a" has nothing flagged; group "b" (after it) has a flagged trace that may go.
    live = [Live("a0", "a", 0.9, True, 1), Live("a1", "a", 0.8, True, 1),
            Live("b0", "b", 0.7, True, 1), Live("b1", "b", 0.1, True, 1)]
    assert cap_to_min_live(["b1"], live) == ["b1"]
    assert cap_to_min_live(["b0", "b1"], live) == ["b1"]  # "b" keeps one: the lowest goes


def test_memory_victim_keys_default_rule_is_score_and_unknown_rules_are_named():
    live = [Live("x", "g", 0.9, True, 1), Live("y", "g", 0.2, True, 1), Live("z", "g", 0.5, True, 1)]
    keys = memory_victim_keys(live)
    assert keys == memory_victim_keys(live, "score")
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
