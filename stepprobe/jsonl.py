"""Resumable JSON Lines artifacts: one header line (``kind``, ``schema_version``, ...), then one
record per line. What ``collect`` (traces), ``run`` (results.jsonl) and ``bench`` (its cells)
write and what ``record`` and ``replay`` read.

A writer creates the file with its header atomically (a reader never sees half a header),
then appends each record as one line, flushed and fsync'ed, so a killed stage keeps every
finished record. The only damage a kill can leave is a partial last line: :func:`append`
cuts it off (and fsyncs the cut) before anything new is written, so a resumed record never
joins a torn one; :func:`read` ignores it with a warning. Any other line that is not JSON is
refused naming its line, never skipped with what follows it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

from .errors import ArtifactMismatch, StepprobeError
from .io import atomic_write_text, naming_file, open_text
from .provenance import check_schema

log = logging.getLogger(__name__)


def _parse(line: str, path: Path, lineno: int, what: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise StepprobeError(f"{path}:{lineno}: corrupt {what} line ({exc.msg})") from None


def read_header(path: str | os.PathLike, kind: str, version: int, what: str) -> dict[str, Any]:
    """The first line of ``path``, checked to be a complete header of ``kind`` at ``version``.
    ``what`` names the artifact in refusals ("traces file")."""
    path = Path(path)
    if not path.is_file():
        raise StepprobeError(f"{what} not found: {path}")
    with open_text(path) as fh:
        first = fh.readline()
    if not first.endswith("\n"):
        raise ArtifactMismatch(f"{path}: no complete header line; not a {what}")
    header = _parse(first, path, 1, what)
    if not isinstance(header, dict):
        raise ArtifactMismatch(f"{path}: the first line is not a header; not a {what}")
    check_schema(header, kind, version, str(path))
    return header


def read(path: str | os.PathLike, kind: str, version: int, what: str) -> tuple[dict[str, Any], Iterator[tuple[int, Any]]]:
    """The header (checked) and an iterator over ``(line number, record)``, streamed from disk.
    Blank lines are skipped; a partial last line (a killed writer) ends the records with a
    warning; a complete line that is not JSON is refused naming it."""
    path = Path(path)
    header = read_header(path, kind, version, what)

    def records() -> Iterator[tuple[int, Any]]:
        with open_text(path) as fh:
            fh.readline()
            for lineno, line in enumerate(fh, start=2):
                if not line.endswith("\n"):
                    log.warning("%s:%d: partial last line (interrupted run) ignored", path, lineno)
                    return
                if line.strip():
                    yield lineno, _parse(line, path, lineno, what)

    return header, records()


class Writer:
    """Appends records to a JSON Lines artifact, one durable line each. Make one with
    :func:`create` or :func:`append`; use it as a context manager."""

    def __init__(self, path: Path):
        self.path = path
        with naming_file(path):
            self._fh = open(path, "a", encoding="utf-8")

    def write(self, record: Any) -> None:
        """One record as one line, on disk (flushed and fsync'ed) when this returns."""
        with naming_file(self.path):  # a full disk names the file
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def create(path: str | os.PathLike, header: dict[str, Any]) -> Writer:
    """A new file holding only ``header`` (written atomically, replacing any file there)."""
    path = Path(path)
    atomic_write_text(path, json.dumps(header) + "\n")
    return Writer(path)


def truncate_torn_tail(path: str | os.PathLike) -> None:
    """Cut a partial last line (no newline: a writer killed mid-line) and fsync the cut."""
    path = Path(path)
    with naming_file(path), open(path, "rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            log.warning("%s: cutting a partial last line (%d bytes) left by an interrupted run", path, len(data) - cut)
            fh.truncate(cut)
            fh.flush()
            os.fsync(fh.fileno())


def append(path: str | os.PathLike) -> Writer:
    """An existing file (its header already checked by the caller), opened to add records after
    its last complete line."""
    truncate_torn_tail(path)
    return Writer(Path(path))
