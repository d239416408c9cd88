"""The one builder of synthetic hidden-state files for the tests (training and refusal tests).

Import it as ``from helpers.synthetic_h5 import make_synthetic`` (see ``helpers/__init__.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

SIGNAL_SITE = "layer_02"
NUM_LAYERS = 4
HIDDEN = 16
IDENTITY = {"name": "synthetic-4x16", "config_hash": "synthetic0001", "vocab_hash": "vocab0001",
            "model_type": "llama", "hidden_size": HIDDEN, "num_hidden_layers": NUM_LAYERS, "vocab_size": 100}
RULE = {"delimiter": "\n\n", "mode": "completes-occurrence-nonoverlapping", "token_ids": [5, 7]}


def make_synthetic(path: Path, *, n_problems: int = 60, traces_per_problem: int = 4, steps: tuple[int, int] = (3, 9),
                   labels: Callable[[int, int], int] | None = None, signal_site: str | None = SIGNAL_SITE,
                   signal: float = 1.2, seed: int = 0, hidden: int | None = None, model: dict | None = None,
                   config: dict | None = None, step_means: bool = False, nan_site: str | None = None,
                   questions: list[str] | None = None, dtype: str = "float16") -> Path:
    """Every site is Gaussian noise (with a per-site offset, so normalization matters);
    ``signal_site`` adds ``signal * (2 * label - 1)`` along one direction, where label = the
    trace ends correct. Only that site predicts the label.

    - ``model``: the identity (default :data:`IDENTITY`: 4 layers, hidden 16); its
      ``num_hidden_layers`` sets the sites, ``hidden`` (default: its ``hidden_size``) the width.
    - ``labels(p, j)``: the label of trace ``j`` of problem ``p`` (default: random, with a
      problem-dependent rate between 0.1 and 0.7: imbalanced difficulty).
    - ``steps``: each trace has ``lo <= k < hi`` steps.
    - ``step_means``: every site also has a step-mean feature (``<site>.mean``, noise too), and
      ``signal_site`` may name one (``layer_02.mean``): then only that step mean carries the signal.
    - ``nan_site``: one value of that site is NaN; ``questions``: each problem's question.
    """
    from stepprobe.data_collection.hdf5 import write_arrays
    from stepprobe.layers import all_sites

    model = model or IDENTITY
    hidden = hidden or int(model["hidden_size"])
    num_layers = int(model["num_hidden_layers"])
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=hidden)
    direction /= np.linalg.norm(direction)
    t_problem, t_label, t_steps = [], [], []
    for p in range(n_problems):
        p_correct = rng.uniform(0.1, 0.7)
        for j in range(traces_per_problem):
            t_problem.append(p)
            t_label.append(int(labels(p, j)) if labels else int(rng.random() < p_correct))
            t_steps.append(int(rng.integers(*steps)))
    t_steps_a = np.array(t_steps)
    n = int(t_steps_a.sum())
    trace = np.repeat(np.arange(len(t_steps)), t_steps_a)
    step = np.concatenate([np.arange(k) for k in t_steps])
    label = np.array(t_label)[trace]
    features = {}
    names = all_sites(num_layers) + ([f"{s}.mean" for s in all_sites(num_layers)] if step_means else [])
    for site in names:
        x = rng.normal(size=(n, hidden)) * 1.0 + rng.normal(size=hidden) * 3.0
        if site == signal_site:
            x += signal * (2 * label - 1)[:, None] * direction[None]
        features[site] = x.astype(np.float32)
    if nan_site:
        features[nan_site][3, 1] = np.nan
    return write_arrays(
        path, features=features,
        steps={"trace": trace, "problem": np.array(t_problem)[trace], "step": step,
               "position": step * 10 + 5, "label": label},
        traces={"problem": t_problem, "sample_index": [i % traces_per_problem for i in range(len(t_label))],
                "label": t_label, "num_steps": t_steps, "num_tokens": t_steps_a * 10 + 3,
                "finish_reason": ["stop"] * len(t_label)},
        problems={"problem_id": [f"p{p:03d}" for p in range(n_problems)],
                  "question": list(questions) if questions else [f"q{p}" for p in range(n_problems)],
                  "gold": [str(p) for p in range(n_problems)]},
        model=model, boundary_rule=RULE, config=config or {"synthetic": True, "signal_site": signal_site},
        dtype=dtype)
