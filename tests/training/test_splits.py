"""Problem splits: by problem, disjoint, seeded and recorded; subsampling touches train only."""

from __future__ import annotations

import numpy as np
import pytest

from stepprobe.errors import StepprobeError
from stepprobe.training.data import make_split, open_hidden_states, row_problem_ids, split_problems


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
