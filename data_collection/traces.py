"""The traces file: what ``stepprobe collect`` writes and ``stepprobe record`` reads.

Format (schema version 1): JSON Lines.

- Line 1, the header: ``{"kind": "stepprobe-traces", "schema_version": 1, "config": {...},
  "model": <provenance.model_identity>, "packages": {...}, "created": ISO time, ...}``.
- Every further line: one problem with all its sampled traces (:class:`ProblemTraces`).

Problems are appended one line at a time and fsync'ed, so a run killed at any point
leaves every finished problem on disk; the only damage a kill can do is a partial last
line, which :class:`TraceWriter` cuts off when it resumes and :func:`read_traces` ignores
with a warning. Resuming checks that the header's config and model match the new run.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

from ..errors import ArtifactMismatch, StepprobeError
from ..io import open_text
from ..provenance import check_schema, package_versions

log = logging.getLogger(__name__)

KIND = "stepprobe-traces"
SCHEMA_VERSION = 1


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


def _parse_line(line: str, path: Path, lineno: int) -> dict[str, Any]:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise StepprobeError(f"{path}:{lineno}: corrupt traces line ({exc.msg})") from None


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
    path = Path(path)
    if not path.is_file():
        raise StepprobeError(f"traces file not found: {path}")
    with open_text(path) as fh:
        first = fh.readline()
    if not first.endswith("\n"):
        raise ArtifactMismatch(f"{path}: no complete header line; not a traces file")
    header = _parse_line(first, path, 1)
    check_schema(header, KIND, SCHEMA_VERSION, str(path))
    return header


def read_traces(path: str | os.PathLike) -> tuple[dict[str, Any], Iterator[ProblemTraces]]:
    """The header (checked) and an iterator over problems, streaming from disk."""
    path = Path(path)
    header = read_header(path)

    def problems() -> Iterator[ProblemTraces]:
        seen: dict[str, int] = {}
        with open_text(path) as fh:
            fh.readline()
            for lineno, line in enumerate(fh, start=2):
                if not line.endswith("\n"):
                    log.warning("%s:%d: partial last line (interrupted run) ignored", path, lineno)
                    return
                if line.strip():
                    prob = _problem_line(_parse_line(line, path, lineno), path, lineno)
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
            self._truncate_partial_tail()
            _, probs = read_traces(self.path)
            self.done_ids = {p.problem_id for p in probs}
            self.header = old
        else:
            from ..io import atomic_write_text
            atomic_write_text(self.path, json.dumps(header) + "\n")
            self.header = header
        self._fh = open(self.path, "a", encoding="utf-8")

    def _truncate_partial_tail(self) -> None:
        with open(self.path, "rb+") as fh:
            data = fh.read()
            if data and not data.endswith(b"\n"):
                cut = data.rfind(b"\n") + 1
                log.warning("%s: cutting a partial last line left by an interrupted run", self.path)
                fh.truncate(cut)

    def write(self, problem: ProblemTraces) -> None:
        if problem.problem_id in self.done_ids:
            raise StepprobeError(f"problem {problem.problem_id!r} is already in {self.path}")
        from ..io import naming_file

        with naming_file(self.path):  # a full disk names the file
            self._fh.write(json.dumps(problem.to_dict()) + "\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())
        self.done_ids.add(problem.problem_id)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
