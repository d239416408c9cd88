"""Small atomic-write helpers: a reader never sees a half-written file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def naming_file(path: str | os.PathLike) -> Iterator[None]:
    """Give an ``OSError`` raised inside the block the file it concerns when it has none (a
    write or fsync on a full disk says only "No space left on device"): the CLI's one line then
    names the file."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with naming_file(path), os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file, read in blocks (checksums of weights and models)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_writable_dir(path: str | os.PathLike, what: str = "output") -> None:
    """Refuse (one line) an output directory that cannot be created or written, before
    anything is written: the directory itself if it exists, else its nearest existing parent."""
    from .errors import StepprobeError

    p = Path(path).expanduser().absolute()
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise StepprobeError(f"{what} {p}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise StepprobeError(f"{what} {p}: {probe} is not writable; choose another location")


@contextlib.contextmanager
def open_text(path: str | os.PathLike, newline: str | None = None) -> Iterator[Any]:
    """``open(path, encoding="utf-8")`` whose decoding errors, wherever the file is read inside
    the ``with`` block, become one line naming the file instead of a ``UnicodeDecodeError``."""
    from .errors import StepprobeError

    try:
        with open(path, encoding="utf-8", newline=newline) as fh:
            yield fh
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start:exc.start + 1]
        raise StepprobeError(f"{path}: not UTF-8 text (byte 0x{bad.hex() or '??'} cannot be decoded); "
                             "save the file as UTF-8") from None
