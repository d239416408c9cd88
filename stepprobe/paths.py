"""One base directory for caches and default outputs.

``$STEPPROBE_HOME`` overrides the default ``~/.cache/stepprobe``. Nothing is ever
written next to the code.
"""

from __future__ import annotations

import dataclasses
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


def traces_summary_path(traces: str | os.PathLike) -> Path:
    """Where collect writes the summary of a traces file: beside it, ``<stem>.summary.json``."""
    p = Path(traces)
    return p.with_name(p.stem + ".summary.json")


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """The layout of a pipeline run directory: where each stage's folder and the artifacts the
    report and the release read live. The one place these names are written (the pipeline
    wires stages with it, ``report`` and ``training.release`` read with it,
    ``scripts/release_scorer.sh`` asks ``python -m stepprobe.paths RUN NAME``)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # the pipeline's stages
    @property
    def traces(self) -> Path:
        return self.root / "collect" / "traces.jsonl"

    @property
    def collect_summary(self) -> Path:
        return traces_summary_path(self.traces)

    @property
    def hidden_states(self) -> Path:
        return self.root / "record" / "hidden_states.h5"

    @property
    def sweep(self) -> Path:
        return self.root / "sweep"

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    @property
    def scorer(self) -> Path:
        return self.root / "scorer"

    @property
    def evaluate(self) -> Path:
        return self.root / "evaluate"

    @property
    def trust(self) -> Path:
        return self.scorer / "trust.json"

    @property
    def sc(self) -> Path:
        return self.root / "sc"

    @property
    def bench(self) -> Path:
        return self.root / "bench"

    @property
    def replay(self) -> Path:
        return self.root / "replay"

    @property
    def bench_problems(self) -> Path:
        return self.root / "bench_problems.jsonl"

    @property
    def state(self) -> Path:
        return self.root / "pipeline.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    # what the release run (scripts/release_scorer.sh) adds: the out-of-template set
    @property
    def ood_traces(self) -> Path:
        return self.root / "ood" / "traces.jsonl"

    @property
    def ood_hidden_states(self) -> Path:
        return self.root / "ood" / "hidden_states.h5"

    @property
    def eval_ood(self) -> Path:
        return self.root / "eval-ood"

    @property
    def ood_sc(self) -> Path:
        return self.root / "ood-sc"

    @property
    def ood_replay(self) -> Path:
        return self.root / "ood-replay"

    @classmethod
    def names(cls) -> list[str]:
        return [n for n, v in vars(cls).items() if isinstance(v, property)]


def main(argv: list[str] | None = None) -> int:
    """``python -m stepprobe.paths RUN_DIR NAME...``: print each named path of a run directory
    (what shell scripts use instead of spelling the layout again)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or any(n not in RunPaths.names() for n in args[1:]):
        sys.stderr.write(f"usage: python -m stepprobe.paths RUN_DIR NAME...; names: {', '.join(RunPaths.names())}\n")
        return 2
    paths = RunPaths(Path(args[0]))
    sys.stdout.write("".join(f"{getattr(paths, n)}\n" for n in args[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
