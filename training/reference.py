"""The token-free reference: scikit-learn logistic regression on the same features and split.

Every train report and every sweep row carries it, so a reader sees whether the Lightning
probe earns its keep. Features are standardized with training-split statistics and the
sites combined as the probe's feature spec says (``mixture`` falls back to ``mean``);
``class_weight="balanced"`` mirrors the probe's positive weighting.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

log = logging.getLogger(__name__)


def _combine(x: np.ndarray, combine: str) -> np.ndarray:
    if combine == "concat":
        return x.reshape(len(x), -1)
    return x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]


def fit_reference(x_train: np.ndarray, y_train: np.ndarray, *, combine: str = "single", C: float = 1.0,
                  max_iter: int = 500, seed: int = 0):
    """Fit on ``x_train[n, S, H]``; returns ``predict(x) -> probabilities``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    mean = x_train.mean(0, dtype=np.float64).astype(np.float32)
    std = np.maximum(x_train.std(0, dtype=np.float64), 1e-6).astype(np.float32)

    def feats(x: np.ndarray) -> np.ndarray:
        return _combine((x - mean) / std, combine)

    clf = LogisticRegression(C=C, max_iter=max_iter, class_weight="balanced", random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(feats(x_train), np.asarray(y_train))

    def predict(x: np.ndarray) -> np.ndarray:
        return clf.predict_proba(feats(x))[:, 1]

    return predict
