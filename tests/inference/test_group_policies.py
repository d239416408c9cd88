"""The within-problem pruning rules as pure functions (what the scheduler and a replay call)."""

from __future__ import annotations

import pytest

from stepprobe.inference.policies import (Live, allowed_losers, below_group_best, cap_to_min_live, effective_min_keep,
                                          group_gaps, memory_victim, memory_victim_keys, relative_losers)


def _live(spec, min_keep=1, prunable=True):
    return [Live(r, g, s, prunable, min_keep) for r, g, s in spec]


# B easy, A hard; the paper's rule takes A's lowest, the group rules B's lowest.
EASY_HARD = [("b0", "B", 0.9), ("b1", "B", 0.5), ("a0", "A", 0.30), ("a1", "A", 0.25)]


@pytest.mark.parametrize("rule,expected", [("score", "a1"), ("group_gap", "b1"), ("group_largest", "b1")])
def test_memory_victim_rules(rule, expected):
    assert memory_victim(_live(EASY_HARD), rule) == expected


def test_victim_order_is_the_one_by_one_order():
    # Sorted ascending, victims come last: taking from the end honours min_keep at every step.
    live = _live([("a0", "A", 0.9), ("a1", "A", 0.8), ("a2", "A", 0.5), ("b0", "B", 0.3), ("b1", "B", 0.25),
                  ("b2", "B", 0.2)], min_keep=2)
    keys = memory_victim_keys(live, "group_gap")
    order = sorted(keys, key=keys.get)
    assert order[-2:] == ["b2", "a2"]  # a2 is 0.4 below a0, b2 0.1 below b0; nothing else may go
    assert all(keys[r][0] == 0 for r in order[:-2])
    # group_largest: A has 4 live, B 2: A gives two before B gives any.
    live = _live([("a0", "A", 0.9), ("a1", "A", 0.8), ("a2", "A", 0.7), ("a3", "A", 0.6), ("b0", "B", 0.3),
                  ("b1", "B", 0.1)], min_keep=1)
    keys = memory_victim_keys(live, "group_largest")
    # a3 (A at 4 live), a2 (A at 3), then a1 and b1 (both groups at 2; b1 is further below its best)
    assert sorted(keys, key=keys.get)[-4:] == ["a1", "b1", "a2", "a3"]


def test_unscored_unprunable_and_lone_traces_are_never_victims():
    live = [Live("u", "A", None), Live("s", "A", 0.1), Live("x", "B", 0.05, prunable=False), Live("y", "B", 0.9),
            Live("z", "C", 0.01)]  # min_keep 0 everywhere
    assert memory_victim(live, "score") == "z"  # x is another policy's, u unscored
    # group_gap: C's lone trace has nothing to compare with; A's s neither (u is unscored);
    # y is the best of B (x, below it, is another policy's): never group_gap's victim.
    assert memory_victim(live, "group_gap") is None
    assert group_gaps(live)["y"] == pytest.approx(0.85) and group_gaps(live)["s"] is None
    # min_keep counts the unscored trace as live: A keeps 2, so s may not go.
    assert "s" not in allowed_losers([Live("u", "A", None, True, 2), Live("s", "A", 0.1, True, 2)])


def test_min_keep_and_protect_last():
    assert effective_min_keep("memory", 0, True) == 1 and effective_min_keep("memory", 0, False) == 0
    assert effective_min_keep("threshold", 0, True) == 0 and effective_min_keep("relative", 3, True) == 3
    live = _live([("a0", "A", 0.2), ("a1", "A", 0.1)], min_keep=1)
    assert allowed_losers(live) == {"a1": 0}
    assert memory_victim(_live([("a0", "A", 0.2)], min_keep=1), "score") is None


@pytest.mark.parametrize("score,n,others,margin,warmup,expected", [
    (0.5, 3, [0.9, None], 0.1, 2, True),
    (0.85, 3, [0.9], 0.1, 2, False),   # within the margin
    (0.5, 1, [0.9], 0.1, 2, False),    # before warm-up
    (0.5, 3, [None], 0.1, 2, False),   # nothing to compare with
    (None, 3, [0.9], 0.1, 2, False),   # unscored
])
def test_below_group_best(score, n, others, margin, warmup, expected):
    assert below_group_best(score, n, others, margin, warmup) is expected


def test_relative_losers_and_cap():
    members = {"a0": (0.9, 3), "a1": (0.7, 3), "a2": (0.6, 3)}
    assert sorted(relative_losers(members, 0.1, 2)) == ["a1", "a2"]
    live = _live([("a0", "A", 0.9), ("a1", "A", 0.7), ("a2", "A", 0.6), ("b0", "B", 0.1)], min_keep=2)
    assert cap_to_min_live(["a1", "a2", "b0"], live) == ["a2"]  # A keeps 2, B (1 live) keeps all
    assert sorted(cap_to_min_live(["a1", "a2", "b0"], _live([(r, g, s) for r, g, s in
                                                               [("a0", "A", .9), ("a1", "A", .7), ("a2", "A", .6),
                                                                ("b0", "B", .1)]], min_keep=0))) == ["a1", "a2", "b0"]


def test_settings_carry_the_group_options_and_refuse_bad_ones():
    from stepprobe.errors import StepprobeError
    from stepprobe.inference import bench, run, serve
    from stepprobe.inference.plugin import PluginSettings, request_overrides

    s = run.Config(policy="relative", scorer="x", memory_victim="group_gap", min_live=2, relative_margin=0.2).settings()
    assert (s.policy, s.memory_victim, s.min_live, s.relative_margin) == ("relative", "group_gap", 2, 0.2)
    assert serve.Config(scorer="x", memory_victim="group_largest").settings().memory_victim == "group_largest"
    b = bench._run_config(bench.Config(scorer="x", policies=["none", "relative"], min_live=3), "relative", 16)
    assert b.settings().min_live == 3 and b.settings().policy == "relative"
    with pytest.raises(StepprobeError, match="memory victim"):
        PluginSettings(policy="memory", scorer="x", memory_victim="lowest")
    with pytest.raises(StepprobeError, match="min_live"):
        PluginSettings(min_live=-1)

    class SP:
        extra_args = {"stepprobe": {"min_live": 2}, "stepprobe_relative_margin": 0.3}

    assert request_overrides(SP()) == {"min_live": 2, "relative_margin": 0.3}
