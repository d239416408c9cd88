"""The traces file: what ``stepprobe collect`` writes and ``stepprobe record`` reads.

Format (schema version 1): JSON Lines.

- Line 1, the header: ``{"kind": "stepprobe-traces", "schema_version": 1, "config": {...},
  "model": <provenance.model_identity>, "packages": {...}, "created": ISO time, ...}``.
- Every further line: one problem with all its sampled traces (:class:`ProblemTraces`).

Written and read with :mod:`stepprobe.jsonl`: problems are appended one line at a time and
fsync'ed, so a run killed at any point leaves every finished problem on disk; the only damage
a kill can do is a partial last line, which :class:`TraceWriter` cuts off when it resumes and
:func:`read_traces` ignores with a warning. Resuming checks that the header's config and model
match the new run.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
from pathlib import Path
from typing import Any, Iterator

from .. import jsonl
from ..errors import ArtifactMismatch, StepprobeError
from ..provenance import package_versions

KIND = "stepprobe-traces"
SCHEMA_VERSION = 1
WHAT = "traces file"


@dataclasses.dataclass
class Trace:
    """One sampled completion of one problem."""

    sample_index: int
    output_token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | ...
    num_tokens: int
    extracted_answer: str | None
    correct: bool


@dataclasses.dataclass
class ProblemTraces:
    """One problem, its prompt and its N traces."""

    problem_id: str
    question: str
    gold: str
    prompt_text: str
    prompt_token_ids: list[int]
    traces: list[Trace]
    choices: list[str] | None = None  # multiple choice options, if any
    timing: dict[str, float] = dataclasses.field(default_factory=dict)  # e.g. {"generate_s": ..}
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # family, difficulty, ...

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProblemTraces":
        d = dict(d)
        d["traces"] = [Trace(**t) for t in d["traces"]]
        return cls(**d)


def make_header(config: dict[str, Any], model: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "kind": KIND,
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "model": model,
        "packages": package_versions(),
        **extra,
    }


def _problem_line(rec: Any, path: Path, lineno: int) -> ProblemTraces:
    """One problem line, or one line saying why it is not one (a stepprobe header followed by
    lines of another format: a hand-made or concatenated file)."""
    try:
        return ProblemTraces.from_dict(rec)
    except (KeyError, TypeError, AttributeError) as exc:
        shape = f"fields {', '.join(sorted(rec)[:8])}" if isinstance(rec, dict) else f"a JSON {type(rec).__name__}"
        why = f"no {exc.args[0]!r} field" if isinstance(exc, KeyError) else " ".join(str(exc).split())
        raise ArtifactMismatch(f"{path}:{lineno}: not a problem line of collect's traces ({why}; the line has "
                               f"{shape}); the header says stepprobe-traces but the lines are of another "
                               "format") from None


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    return jsonl.read_header(path, KIND, SCHEMA_VERSION, WHAT)


def read_traces(path: str | os.PathLike) -> tuple[dict[str, Any], Iterator[ProblemTraces]]:
    """The header (checked) and an iterator over problems, streaming from disk."""
    path = Path(path)
    header, lines = jsonl.read(path, KIND, SCHEMA_VERSION, WHAT)

    def problems() -> Iterator[ProblemTraces]:
        seen: dict[str, int] = {}
        for lineno, rec in lines:
            prob = _problem_line(rec, path, lineno)
            if prob.problem_id in seen:
                raise StepprobeError(f"{path}:{lineno}: duplicate problem id {prob.problem_id!r} (first at "
                                     f"line {seen[prob.problem_id]}); give each problem line its own id")
            seen[prob.problem_id] = lineno
            yield prob

    return header, problems()


class TraceWriter:
    """Append-only, resumable writer. Use as a context manager.

    ``resume=True`` (the default) continues an existing file whose header matches
    ``match_keys`` of the new config and the model identity (a key the old header lacks counts
    as its value in ``absent``, the value files made before the key existed were made with); ``done_ids`` lists the
    problems already written. ``overwrite=True`` starts afresh.
    """

    def __init__(self, path: str | os.PathLike, header: dict[str, Any], *, overwrite: bool = False,
                 match_keys: tuple[str, ...] = (), absent: dict[str, Any] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done_ids: set[str] = set()
        if self.path.exists() and not overwrite:
            old = read_header(self.path)
            old_config = {**(absent or {}), **old["config"]}
            for key in match_keys:
                if old_config.get(key) != header["config"].get(key):
                    raise ArtifactMismatch(
                        f"{self.path} was made with {key}={old_config.get(key)!r}, this run has "
                        f"{key}={header['config'].get(key)!r}; pass a new output or --overwrite")
            if old.get("model", {}).get("config_hash") != header.get("model", {}).get("config_hash"):
                raise ArtifactMismatch(f"{self.path} was made with model {old['model'].get('name')!r}; "
                                       f"this run uses {header['model'].get('name')!r}")
            jsonl.truncate_torn_tail(self.path)
            _, probs = read_traces(self.path)
            self.done_ids = {p.problem_id for p in probs}
            self.header = old
            self._out = jsonl.append(self.path)
        else:
            self._out = jsonl.create(self.path, header)
            self.header = header

    def write(self, problem: ProblemTraces) -> None:
        if problem.problem_id in self.done_ids:
            raise StepprobeError(f"problem {problem.problem_id!r} is already in {self.path}")
        self._out.write(problem.to_dict())
        self.done_ids.add(problem.problem_id)

    def close(self) -> None:
        self._out.close()

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
