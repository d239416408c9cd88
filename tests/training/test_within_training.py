"""Within-problem training: a probe that ranks a problem's traces beats one that learns difficulty.

The synthetic file: each problem has a large random offset along the label direction, and
that offset also sets how often its traces are right, the wrong way round: the further a
problem lies along the direction, the harder it is. Within a problem, a correct trace lies a
little further along it than a wrong one (a small within-problem signal). Across problems
the direction therefore points to *wrong* answers and a probe trained with BCE learns that
(problem difficulty), which orders one problem's traces backwards or not at all; the
pairwise loss sees only differences within a problem, where the offset cancels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stepprobe.training import metrics as M
from stepprobe.training import train
from stepprobe.training.data import ProblemBatchSampler, open_hidden_states
from stepprobe.training.module import pairwise_loss

from helpers.synthetic_h5 import IDENTITY, NUM_LAYERS, RULE

SITE = "layer_02"


def make_confounded(path: Path, *, n_problems: int = 100, traces: int = 8, hidden: int = 16, offset: float = 4.0,
                    signal: float = 0.5, seed: int = 0) -> Path:
    from stepprobe.data_collection.hdf5 import write_arrays
    from stepprobe.layers import all_sites

    rng = np.random.default_rng(seed)
    direction = rng.normal(size=hidden)
    direction /= np.linalg.norm(direction)
    t_problem, t_label, t_steps, t_offset = [], [], [], []
    for p in range(n_problems):
        z = rng.normal()
        p_correct = 1 / (1 + np.exp(-2.0 * z))  # z (minus the offset) decides the problem's difficulty
        for _ in range(traces):
            t_problem.append(p)
            t_label.append(int(rng.random() < p_correct))
            t_steps.append(int(rng.integers(3, 8)))
            t_offset.append(-offset * z)
    steps_a = np.array(t_steps)
    trace = np.repeat(np.arange(len(t_steps)), steps_a)
    step = np.concatenate([np.arange(k) for k in t_steps])
    label = np.array(t_label)[trace]
    n = len(trace)
    features = {}
    for site in all_sites(NUM_LAYERS):
        x = rng.normal(size=(n, hidden))
        if site == SITE:
            x += (np.array(t_offset)[trace] + signal * (2 * label - 1))[:, None] * direction[None]
        features[site] = x.astype(np.float32)
    return write_arrays(
        path, features=features,
        steps={"trace": trace, "problem": np.array(t_problem)[trace], "step": step, "position": step * 10 + 5,
               "label": label},
        traces={"problem": t_problem, "sample_index": [i % traces for i in range(len(t_label))], "label": t_label,
                "num_steps": t_steps, "num_tokens": steps_a * 10 + 3, "finish_reason": ["stop"] * len(t_label)},
        problems={"problem_id": [f"p{p:03d}" for p in range(n_problems)], "question": [f"q{p}" for p in range(n_problems)],
                  "gold": [str(p) for p in range(n_problems)]},
        model=IDENTITY, boundary_rule=RULE, config={"synthetic": "problem offset + small within-problem signal"})


@pytest.fixture(scope="module")
def confounded_h5(tmp_path_factory) -> Path:
    return make_confounded(tmp_path_factory.mktemp("confounded") / "states.h5")


def _train(path: Path, loss: str, **kw):
    cfg = train.Config(data=str(path), sites=SITE, arch="linear", loss=loss, **kw, lr=1e-2, max_epochs=10, patience=10,
                       monitor=M.key(M.VAL, M.WITHIN_AUROC), val_fraction=0.2, test_fraction=0.3, progress=False, plots=False,
                       reference=False, bootstrap=200)
    return train.train_probe(cfg, open_hidden_states(str(path)))


def test_pairwise_training_beats_plain_within_problems(confounded_h5):
    plain = _train(confounded_h5, "bce").metrics[M.TEST]
    ranked = _train(confounded_h5, "pairwise").metrics[M.TEST]
    # The plain probe learns difficulty: good across problems, not within them.
    assert plain[M.AUROC] > 0.65 and plain[M.WITHIN_AUROC] < 0.55
    assert ranked[M.WITHIN_AUROC] > plain[M.WITHIN_AUROC] + 0.1, (plain[M.WITHIN_AUROC], ranked[M.WITHIN_AUROC])
    assert ranked[f"{M.WITHIN_AUROC}_lo"] > plain[M.WITHIN_AUROC]  # outside the interval, not noise
    assert ranked[M.WITHIN_RANK[0.5]] > plain[M.WITHIN_RANK[0.5]]
    assert ranked[M.WITHIN_PROBLEMS] >= 10


def test_mixed_loss_trains_and_bad_combinations_are_refused(confounded_h5):
    # Mostly pairwise: still ranks within problems (measured 0.52 at pair_weight 0.5, where BCE's
    # across-problem pull still wins on this file).
    mixed = _train(confounded_h5, "mixed", pair_weight=0.9).metrics[M.TEST]
    assert mixed[M.WITHIN_AUROC] > 0.6
    from stepprobe.errors import StepprobeError

    with pytest.raises(StepprobeError, match="unknown loss"):
        train.check_config(train.Config(data="x", loss="hinge"))
    with pytest.raises(StepprobeError, match="sampler"):
        train.check_config(train.Config(data="x", loss="pairwise", imbalance="sampler"))


def test_problem_batches_keep_problems_whole():
    problem = np.array(["a", "b", "a", "c", "b", "c", "c", "d"])
    s = ProblemBatchSampler(problem, batch_size=3, seed=0)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(len(problem)))
    for b in batches:
        for p in set(problem[b]):
            assert set(np.flatnonzero(problem == p)) <= set(b)  # never split
    assert len(batches) == len(s) == 3  # 8 steps / 3 per batch, the same count every epoch
    epochs = [list(s) for _ in range(5)]
    assert all(len(e) == len(s) for e in epochs)
    assert any(e != batches for e in epochs)  # later epochs reshuffle (seeded)


def test_pairwise_loss_values():
    logits = torch.tensor([2.0, 0.0, 5.0, -5.0], requires_grad=True)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    problem = torch.tensor([0, 0, 1, 2])  # problem 1 and 2 have one outcome each: no pair
    rel = torch.zeros(4)
    loss = pairwise_loss(logits, y, problem, rel)
    assert loss.item() == pytest.approx(float(torch.nn.functional.softplus(torch.tensor(-2.0))))
    loss.backward()
    assert logits.grad[2] == 0 and logits.grad[0] < 0 < logits.grad[1]
    # Pairs too far apart in relative position do not count.
    far = pairwise_loss(logits.detach(), y, problem, torch.tensor([0.0, 0.9, 0.0, 0.0]), window=0.25)
    assert far.item() == 0.0
    # Adding the same constant to a problem's logits changes nothing.
    shifted = pairwise_loss(logits.detach() + torch.tensor([3.0, 3.0, 0.0, 0.0]), y, problem, rel)
    assert shifted.item() == pytest.approx(loss.item())


def test_tune_may_choose_pairwise_on_the_within_objective_and_export_reports_within(confounded_h5, tmp_path):
    import json

    import optuna

    from stepprobe.training import export, tune

    cfg = tune.Config(data=str(confounded_h5), out=str(tmp_path / "study"), n_trials=4, max_epochs=4, patience=4,
                      archs="linear", sites=SITE, losses="bce,pairwise,mixed", objective=M.key(M.VAL, M.WITHIN_AUROC),
                      pruner_startup_trials=10, progress=False, plots=False)
    out = tune.run(cfg)
    study = optuna.load_study(study_name="stepprobe", storage=f"sqlite:///{(out / 'study.db').resolve()}")
    assert {t.params["loss"] for t in study.trials} <= {"bce", "pairwise", "mixed"}
    best = json.loads((out / "best.json").read_text())
    assert best["objective"] == "val_within_auroc" and best["train_config"]["loss"] == best["params"]["loss"]
    exp = export.run(export.Config(source=str(out), out=str(tmp_path / "scorer"), plots=False))
    test = json.loads((exp / "metrics.json").read_text())["metrics"]["test"]
    assert test["within_auroc_lo"] <= test["within_auroc"] <= test["within_auroc_hi"]
    assert "within_rank50" in json.loads((exp / "metrics.json").read_text())["metrics"]["reference_test"]
    with pytest.raises(Exception, match="sampler"):
        tune.run(cfg.replace(imbalances="pos_weight,sampler", out=str(tmp_path / "s2")))
