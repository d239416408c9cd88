"""Synthetic hidden-state files where the label is a known function of one site's features
(built by ``tests/helpers/synthetic_h5.py``)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from helpers.synthetic_h5 import make_synthetic


@pytest.fixture(scope="session")
def synthetic_h5(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("synthetic") / "states.h5")


@pytest.fixture(autouse=True)
def _quiet_lightning():
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
