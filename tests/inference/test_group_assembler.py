"""The live group assembler (issue 23 item 3) against the offline group features: rows fed in
the order a lockstep engine captures them give the features `compute_feature` computes from the
recorded file, and a sibling captured late is what live scoring misses (documented)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stepprobe.inference.group_assembler import GroupAssembler
from stepprobe.probes import group_features as G

HIDDEN = 12
IDENTITY = {"name": "synthetic-2x12", "config_hash": "synthetic0002", "vocab_hash": "vocab0002",
            "model_type": "llama", "hidden_size": HIDDEN, "num_hidden_layers": 2, "vocab_size": 100}
RULE = {"delimiter": "\n\n", "mode": "completes-occurrence-nonoverlapping", "token_ids": [5, 7]}
PROMPT_LEN = {0: 17, 1: 9, 2: 30, 3: 4}  # per problem: live keys are absolute positions


def _file(path: Path, n_problems: int = 4, n_traces: int = 5, seed: int = 0):
    """A recorded-like file whose traces advance at their own pace (positions differ between siblings)."""
    from stepprobe.data_collection.hdf5 import HiddenStates, write_arrays

    rng = np.random.default_rng(seed)
    trace, problem, step, position, t_problem, t_steps = [], [], [], [], [], []
    for p in range(n_problems):
        for _ in range(n_traces):
            k = int(rng.integers(1, 8))
            pos = np.cumsum(rng.integers(1, 12, size=k))  # ties between siblings happen too
            trace += [len(t_problem)] * k
            problem += [p] * k
            step += list(range(k))
            position += pos.tolist()
            t_problem.append(p)
            t_steps.append(k)
    n = len(trace)
    features = {s: rng.normal(size=(n, HIDDEN)).astype(np.float32) + 0.3 for s in ("embed", "layer_00", "layer_01",
                                                                                   "final_norm")}
    label = rng.random(len(t_problem)) < 0.5
    write_arrays(path, features=features,
                 steps={"trace": trace, "problem": problem, "step": step, "position": position,
                        "label": label[np.asarray(trace)].astype(int)},
                 traces={"problem": t_problem, "sample_index": [i % n_traces for i in range(len(t_problem))],
                         "label": label.astype(int), "num_steps": t_steps, "num_tokens": [200] * len(t_problem),
                         "finish_reason": ["stop"] * len(t_problem)},
                 problems={"problem_id": [f"p{p}" for p in range(n_problems)],
                           "question": [f"q{p}" for p in range(n_problems)], "gold": ["1"] * n_problems},
                 model=IDENTITY, boundary_rule=RULE, config={"synthetic": "assembler"})
    return HiddenStates(path)


def _assembler(names, stats):
    feats = {n: {"site": G.split_group(n)[0], "kind": G.split_group(n)[1], "alignment": "time"} for n in names
             if G.split_group(n)[1] is not None}
    return GroupAssembler(names, feats, stats)


def _feed(asm, hs, sites, order_key=None, n_traces=5):
    """Register every trace (as the worker does when a request is scheduled), then feed the rows
    one engine step at a time: the rows of equal (generated) position together, in position order.
    Returns the assembled features per file row."""
    st = hs.steps
    trace, problem, position = (np.asarray(st[k]) for k in ("trace", "problem", "position"))
    for t, p in enumerate(np.asarray(hs.traces["problem"])):
        asm.add(f"{t}_req{p}", f"req{p}", PROMPT_LEN[int(p)], size=n_traces)
    x = np.stack([np.asarray(hs.features(s), dtype=np.float32) for s in sites], axis=1)
    key = position if order_key is None else order_key
    out = np.zeros((len(trace), len(asm.names), 0), dtype=np.float32)
    for k in np.unique(key):
        rows = np.flatnonzero(key == k)
        keys = [(f"{trace[r]}_req{problem[r]}", int(position[r]) + PROMPT_LEN[int(problem[r])]) for r in rows]
        f = asm.features(keys, x[rows])
        if out.shape[2] == 0:
            out = np.zeros((len(trace), len(asm.names), f.shape[2]), dtype=np.float32)
        out[rows] = f
    return out


@pytest.mark.parametrize("kind", [".group", ".gdev"])
def test_lockstep_capture_gives_the_offline_group_features(tmp_path, kind):
    hs = _file(tmp_path / "s.h5")
    names = [f"layer_01{kind}", f"layer_00{kind}"]
    read = lambda s: np.asarray(hs.features(s), dtype=np.float32)  # noqa: E731
    stats = {s: G.standardize_stats(read(s) * 1.5 + 0.2) for s in ("layer_00", "layer_01")}  # a training file's
    asm = _assembler(names, stats)
    assert asm.sites == ["layer_01", "layer_00"]
    live = _feed(asm, hs, asm.sites)
    for k, name in enumerate(names):
        offline = G.compute_feature(hs, name, read, stats=stats[G.split_group(name)[0]])
        np.testing.assert_allclose(live[:, k], offline, rtol=1e-6, atol=1e-6)
    assert asm.n_rows == hs.num_steps
    if kind == ".gdev":  # beside a plain site of the same width: that site's state as captured
        mixed = _assembler(["layer_01.gdev", "final_norm"], stats)
        assert mixed.sites == ["layer_01", "final_norm"]
        both = _feed(mixed, hs, mixed.sites)
        np.testing.assert_allclose(both[:, 0], live[:, 0], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(both[:, 1], read("final_norm"))
    for t, p in enumerate(np.asarray(hs.traces["problem"])):  # every member finished: groups forgotten
        asm.finish(f"{t}_req{p}")
    assert asm.groups == {} and asm.members == {}


def test_a_sibling_captured_late_is_not_visible_live(tmp_path):
    """Live sees what was captured so far: trace 0's rows arrive after every other row (it lagged,
    e.g. preempted), so its siblings' features are the offline ones computed without trace 0,
    while trace 0's own rows see all its siblings (they were captured before)."""
    hs = _file(tmp_path / "s.h5", n_problems=1)
    read = lambda s: np.asarray(hs.features(s), dtype=np.float32)  # noqa: E731
    stats = {"layer_01": G.standardize_stats(read("layer_01"))}
    st = hs.steps
    trace, position = np.asarray(st["trace"]), np.asarray(st["position"])
    late = np.where(trace == 0, position + 10_000, position)
    live = _feed(_assembler(["layer_01.group"], stats), hs, ["layer_01"], order_key=late)[:, 0]
    vis = G.visible_siblings(np.asarray(st["problem"]), trace, np.asarray(st["step"]), position)
    without0 = [v[trace[v] != 0] for v in vis]
    n_sib = np.full(len(trace), 4)
    expect = np.where((trace == 0)[:, None], G.group_features(read("layer_01"), vis, n_sib, stats["layer_01"]),
                      G.group_features(read("layer_01"), without0, n_sib, stats["layer_01"]))
    np.testing.assert_allclose(live, expect, rtol=1e-6, atol=1e-6)
    assert not np.allclose(live, G.compute_feature(hs, "layer_01.group", read, stats=stats["layer_01"]))


def test_a_group_lives_until_its_declared_size_has_finished():
    stats = {"layer_01": (np.zeros(HIDDEN), np.ones(HIDDEN))}
    asm = _assembler(["layer_01.group"], stats)
    asm.add("a", "g", 3, size=3)
    asm.add("b", "g", 3, size=3)
    asm.features([("a", 10)], np.ones((1, 1, HIDDEN)))
    asm.finish("a")
    asm.finish("b")
    assert "g" in asm.groups  # the third member has not been scheduled yet: keep the history
    asm.add("c", "g", 3, size=3)
    f = asm.features([("c", 10)], np.ones((1, 1, HIDDEN)))
    assert f[0, 0, 5] == pytest.approx(0.5)  # one of its two siblings visible
    asm.finish("c")
    assert asm.groups == {}
    asm.add("_warmup_0", "w", 1)  # vLLM's warm-up requests are never tracked
    assert asm.members == {}


def test_the_assembler_refuses_what_it_cannot_compute():
    stats = {"layer_01": (np.zeros(HIDDEN), np.ones(HIDDEN))}
    with pytest.raises(Exception, match="layer_01.group_step"):
        GroupAssembler(["layer_01.group_step"],
                       {"layer_01.group_step": {"site": "layer_01", "kind": ".group_step", "alignment": "step"}}, stats)
    with pytest.raises(Exception, match="text.group"):
        GroupAssembler(["text.group"], {"text.group": {"site": "text", "kind": ".group", "alignment": "time"}}, stats)
    with pytest.raises(Exception, match="layer_00.gdev"):  # a group feature the block does not describe
        GroupAssembler(["layer_00.gdev"], {}, stats)
