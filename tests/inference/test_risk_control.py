"""Risk-controlled pruning and earned votes (stepprobe.risk, inference/calibrate.py): the guarantee.

- Learn-then-Test on losses whose risk is known: the chosen cutoff's risk exceeds the
  tolerance at most at the stated rate, over many seeds;
- end to end through the replay's scheduler model on synthetic problems: a scorer that is pure
  noise earns (almost) no pruning and loses no accuracy on fresh problems; a scorer that knows
  the labels earns a cutoff that prunes mostly wrong traces; the observed loss on fresh
  problems stays within the tolerance;
- the vote: noise keeps majority, an informative score earns the weighted vote.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from stepprobe.inference import calibrate as cal
from stepprobe.inference.deciders import vote_correct
from stepprobe.inference.replay_data import Params, Problem, Trace
from stepprobe.inference.replay_rows import run_policy
from stepprobe.risk import choose_cutoff, cutoff_grid, wsr_pvalue

PARAMS = Params(threshold=0.5, warmup_steps=1, keep_fraction=0.5, keep_step=1, aggregate="mean", ema_alpha=0.3,
                   conf_window=4, conf_percentile=10.0, conf_warmup=2)


def test_wsr_pvalue_is_valid_at_the_boundary_and_powerful_with_gains():
    rng = np.random.default_rng(0)
    # true risk exactly the tolerance (6 % harm, 5 % gain): rejections at most at rate delta
    rejections = sum(wsr_pvalue(np.where((u := rng.random(300)) < 0.06, 1.0, np.where(u < 0.11, -1.0, 0.0)),
                                0.01, 0.1, seed=s) <= 0.1 for s in range(300))
    assert rejections / 300 <= 0.1 + 3 * math.sqrt(0.09 / 300)
    assert wsr_pvalue(np.zeros(300), 0.01, 0.1) < 0.1  # 300 unchanged problems certify one point
    assert wsr_pvalue(np.zeros(100), 0.01, 0.1) > 0.1  # 100 do not
    gains = np.zeros(300)
    gains[:20] = -1
    assert wsr_pvalue(gains, 0.01, 0.1) < 1e-3
    with pytest.raises(Exception, match="in \\[-1, 1\\]"):
        wsr_pvalue([2.0], 0.01, 0.1)


def test_learn_then_test_keeps_its_promise_over_many_seeds():
    # 20 cutoffs; cutoff j harms a problem with probability 0.004 j and helps with 0.002 j, so
    # its risk is 0.002 j: cutoffs 1..5 are within a tolerance of 0.01, 6.. are not.
    alpha, delta, n, trials = 0.01, 0.1, 300, 300
    j = np.arange(1, 21)
    risk = 0.002 * j
    rng = np.random.default_rng(1)
    bad = 0
    for t in range(trials):
        u = rng.random(n)[None, :]
        losses = np.where(u < 0.004 * j[:, None], 1.0, np.where(u < 0.006 * j[:, None], -1.0, 0.0))
        ch = choose_cutoff(list(j.astype(float)), losses, alpha, delta, seed=t)
        bad += ch.index > 0 and risk[ch.index - 1] > alpha
    assert bad / trials <= delta + 3 * math.sqrt(delta * (1 - delta) / trials)


def test_cutoff_grid_is_ascending_and_ends_with_the_papers_rule():
    g = cutoff_grid([0.1, 0.2, 0.2, 0.9], points=4)
    assert g == sorted(g) and g[-1] == math.inf and len(set(g)) == len(g)
    assert all(c > s for c, s in zip(g[:-1], [0.1, 0.2, 0.9]))  # each quantile's own trace falls below it
    assert cutoff_grid([], 5) == [math.inf]


# ------------------------------------------------------------------ end to end on the scheduler model
def synthetic(n_problems: int, seed: int, scorer: str) -> list[Problem]:
    """Problems of 8 traces; each problem's traces are right with its own rate. ``scorer``:
    ``noise`` (scores independent of correctness), ``oracle`` (0.8-0.95 right, 0.05-0.2 wrong)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_problems):
        p = rng.uniform(0.15, 0.7)
        traces, classes = [], []
        for k in range(8):
            right = bool(rng.random() < p)
            n_tok = int(rng.integers(60, 160))
            gens = list(range(15, n_tok - 1, 20))
            base = (rng.uniform(0.8, 0.95) if right else rng.uniform(0.05, 0.2)) if scorer == "oracle" else rng.random()
            scores = [float(np.clip(base + rng.normal(0, 0.02), 0, 1)) for _ in gens]
            cls = 0 if right else int(rng.integers(1, 4))
            traces.append(Trace(index=k, num_tokens=n_tok, answer=str(cls), correct=right, step_gen=gens,
                                   step_scores=scores, score=float(np.mean(scores)) if scores else None))
            classes.append(cls)
        # answer classes numbered by first appearance, as build_problems does
        order = list(dict.fromkeys(classes))
        out.append(Problem(f"p{seed}-{i}", 20, traces, [order.index(c) for c in classes]))
    return out


CONFIG = cal.Config(kv_blocks=[40], block_size=16, grid_points=12, folds=2)


def fresh_loss(problems, cutoff, vote="majority"):
    sc = [vote_correct(pr, [False] * 8, "majority") for pr in problems]
    o = run_policy(problems, "memory", CONFIG.kv_blocks[0], CONFIG, PARAMS, cutoff=cutoff, vote=vote)
    wrong = sum(pm[k] and not pr.traces[k].correct for pr, pm in zip(problems, o.pruned) for k in range(8))
    return float(np.mean(sc) - np.mean(o.correct)), sum(map(sum, o.pruned)), wrong


def wrong_traces(problems):
    return sum(not t.correct for pr in problems for t in pr.traces)


def _cut(choice):
    c = choice["cutoff"]
    return 0.0 if c is None else (None if c == "inf" else float(c))


def test_a_noise_scorer_earns_almost_no_pruning_and_loses_nothing():
    body = cal.calibrate(synthetic(150, 0, "noise"), PARAMS, CONFIG)
    assert body["vote"]["rule"] == "majority"
    paper_loss, paper_pruned, _ = fresh_loss(fresh := synthetic(200, 1, "noise"), None)
    loss, pruned, _ = fresh_loss(fresh, _cut(body["default"]))
    assert paper_pruned > 200 and paper_loss > 0.03  # the pressure is real, and the paper's rule pays for it
    assert pruned <= 0.1 * paper_pruned and loss <= 0.01


def test_a_scorer_that_knows_the_labels_earns_pruning_of_wrong_traces():
    body = cal.calibrate(synthetic(150, 2, "oracle"), PARAMS, CONFIG)
    assert body["default"]["index"] > 0 and body["vote"]["rule"] == "score"
    fresh = synthetic(200, 3, "oracle")
    _, paper_pruned, paper_wrong = fresh_loss(fresh, None, "score")
    loss, pruned, wrong = fresh_loss(fresh, _cut(body["default"]), "score")
    assert wrong >= 0.5 * wrong_traces(fresh) and wrong >= 0.9 * paper_wrong  # most wrong traces go
    assert loss <= 0.01


def test_observed_loss_on_fresh_problems_stays_within_the_tolerance():
    # A scorer halfway between noise and labels; over several calibration draws the chosen
    # cutoff's loss on fresh problems stays within the tolerance (up to the fresh set's noise).
    def mixed(n, seed):
        probs = synthetic(n, seed, "oracle")
        noise = synthetic(n, seed + 1000, "noise")
        rng = np.random.default_rng(seed)
        for pr, nz in zip(probs, noise):
            for t, u in zip(pr.traces, nz.traces):
                if rng.random() < 0.5 and len(u.step_scores) >= len(t.step_scores):
                    t.step_scores = u.step_scores[: len(t.step_scores)]
                    t.score = float(np.mean(t.step_scores)) if t.step_scores else None
        return probs

    fresh = mixed(300, 99)
    losses = []
    for seed in range(3):
        body = cal.calibrate(mixed(150, 10 + seed), PARAMS, CONFIG)
        losses.append(fresh_loss(fresh, _cut(body["default"]), body["vote"]["rule"])[0])
    assert max(losses) <= 0.01 + 2 * math.sqrt(0.1 / 300)


def test_vote_is_earned():
    noise = cal.calibrate(synthetic(150, 5, "noise"), PARAMS, cal.Config(kv_blocks=[40], block_size=16, grid_points=2))
    assert noise["vote"]["rule"] == "majority"
    sharp = cal.calibrate(synthetic(150, 6, "oracle"), PARAMS, cal.Config(kv_blocks=[40], block_size=16, grid_points=2))
    assert sharp["vote"]["rule"] == "score" and sharp["vote"]["score_minus_majority"]["low"] > 0
