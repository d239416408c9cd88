"""One base directory for caches and default outputs.

``$STEPPROBE_HOME`` overrides the default ``~/.cache/stepprobe``. Nothing is ever
written next to the code.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_HOME = "STEPPROBE_HOME"


def base_dir() -> Path:
    """The base directory (created on first use)."""
    root = os.environ.get(ENV_HOME) or os.path.join(os.path.expanduser("~"), ".cache", "stepprobe")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    """Where converted models live (e.g. the embedded default as an HF checkpoint)."""
    path = base_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def runs_dir() -> Path:
    """Default parent of run directories when a stage is not given an output path."""
    path = base_dir() / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path
