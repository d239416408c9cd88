"""Synthetic hidden-state files where the label is a known function of one site's features."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

SIGNAL_SITE = "layer_02"
NUM_LAYERS = 4
HIDDEN = 16
IDENTITY = {"name": "synthetic-4x16", "config_hash": "synthetic0001", "vocab_hash": "vocab0001",
            "model_type": "llama", "hidden_size": HIDDEN, "num_hidden_layers": NUM_LAYERS, "vocab_size": 100}
RULE = {"delimiter": "\n\n", "mode": "completes-occurrence-nonoverlapping", "token_ids": [5, 7]}


def make_synthetic(path: Path, *, n_problems: int = 60, traces_per_problem: int = 4, signal_site: str = SIGNAL_SITE,
                   signal: float = 1.2, seed: int = 0, hidden: int = HIDDEN, model: dict | None = None,
                   config: dict | None = None, step_means: bool = False) -> Path:
    """Every site is Gaussian noise; ``signal_site`` adds ``signal * (2 * label - 1)`` along one
    direction, where label = the trace ends correct. Only that site predicts the label.

    With ``step_means``, every site also has a step-mean feature (``<site>.mean``, noise too),
    and ``signal_site`` may name one (``layer_02.mean``): then the signal lives only in that
    step mean, and every boundary-token feature is noise."""
    from stepprobe.data_collection.hdf5 import write_arrays
    from stepprobe.layers import all_sites

    rng = np.random.default_rng(seed)
    direction = rng.normal(size=hidden)
    direction /= np.linalg.norm(direction)
    t_problem, t_label, t_steps = [], [], []
    for p in range(n_problems):
        p_correct = rng.uniform(0.1, 0.7)  # imbalanced, problem-dependent difficulty
        for _ in range(traces_per_problem):
            t_problem.append(p)
            t_label.append(int(rng.random() < p_correct))
            t_steps.append(int(rng.integers(3, 9)))
    t_steps_a = np.array(t_steps)
    n = int(t_steps_a.sum())
    trace = np.repeat(np.arange(len(t_steps)), t_steps_a)
    step = np.concatenate([np.arange(k) for k in t_steps])
    label = np.array(t_label)[trace]
    features = {}
    names = all_sites(NUM_LAYERS) + ([f"{s}.mean" for s in all_sites(NUM_LAYERS)] if step_means else [])
    for site in names:
        x = rng.normal(size=(n, hidden)) * 1.0 + rng.normal(size=hidden) * 3.0  # offset: normalization matters
        if site == signal_site:
            x += signal * (2 * label - 1)[:, None] * direction[None]
        features[site] = x.astype(np.float32)
    model = model or IDENTITY
    return write_arrays(
        path, features=features,
        steps={"trace": trace, "problem": np.array(t_problem)[trace], "step": step,
               "position": step * 10 + 5, "label": label},
        traces={"problem": t_problem, "sample_index": [i % traces_per_problem for i in range(len(t_label))],
                "label": t_label, "num_steps": t_steps, "num_tokens": t_steps_a * 10 + 3,
                "finish_reason": ["stop"] * len(t_label)},
        problems={"problem_id": [f"p{p:03d}" for p in range(n_problems)],
                  "question": [f"q{p}" for p in range(n_problems)], "gold": [str(p) for p in range(n_problems)]},
        model=model, boundary_rule=RULE, config=config or {"synthetic": True, "signal_site": signal_site})


@pytest.fixture(scope="session")
def synthetic_h5(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("synthetic") / "states.h5")


@pytest.fixture(autouse=True)
def _quiet_lightning():
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
