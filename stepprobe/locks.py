"""One writer per output: an OS-level lock on every output a stage writes.

Every stage that writes takes :func:`hold` on its output (a file or a directory) before it
writes the first byte, and keeps it for its whole run. The lock is a POSIX record lock
(``fcntl.lockf``) on a small file next to the output (``.<name>.lock`` in the same
folder), so

- a second writer of the same output is refused at once, in one line naming the holder's
  PID (:class:`OutputBusy`);
- the kernel drops the lock when its process ends, however it ends (kill -9 included), so
  a killed writer never blocks the rerun that resumes its output; a record lock (unlike
  ``flock``) is not inherited by forked children (vLLM's engine processes, DataLoader
  workers), so none of them can keep it alive after the command is gone;
- the lock file stays outside the output: replacing a directory output (``--overwrite``,
  ``pipeline --restart``) never deletes the lock that protects it.

A record lock belongs to the process and is dropped when the process closes *any*
descriptor of the lock file: nothing in a holding process may open a lock file but
:func:`hold` (``_holder`` reads it only in the refused process).

Locks are re-entrant within one process (the pipeline runs each stage in-process inside
its own lock; a stage that opens the same output twice holds it once). A ``shared`` hold
(``tune`` workers on one study) admits other shared holders and refuses an exclusive one.

Lifetime: a lock taken inside :func:`scope` (the CLI wraps each command in one) is released
when the scope ends; one taken outside any scope (a stage called from Python) is held until
:func:`release_all` or the end of the process. A released lock's file is removed when no
other process holds it; a stale file left by a killed process is harmless (taken over).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator

from .errors import StepprobeError


class OutputBusy(StepprobeError):
    """Another process is writing this output."""


class _Held:
    __slots__ = ("path", "fd", "count", "shared")

    def __init__(self, path: Path, fd: int, shared: bool):
        self.path, self.fd, self.count, self.shared = path, fd, 1, shared


_HELD: dict[str, _Held] = {}       # lock file -> this process's hold
_SCOPES: list[list[str]] = []      # the open scopes, innermost last: lock files taken in each
_STAGE: list[str] = []             # the command that holds locks (named in the lock file)


def lock_path(output: str | os.PathLike) -> Path:
    """The lock file of an output: ``.<name>.lock`` beside it."""
    p = Path(output).expanduser().absolute()
    return p.with_name(f".{p.name}.lock")


def _lock_owner(fd: int, shared: bool) -> int | None:
    """The PID of a process whose lock blocks ours, as the kernel reports it (F_GETLK)."""
    import struct

    fmt = "hhqqi4x"  # struct flock on Linux (64-bit): type, whence, start, len, pid
    try:
        got = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(fmt, fcntl.F_RDLCK if shared else fcntl.F_WRLCK, 0, 0, 0, 0))
        l_type, _, _, _, pid = struct.unpack(fmt, got)
    except (OSError, struct.error):
        return None
    return pid if l_type != fcntl.F_UNLCK and pid > 0 else None


def _holder(path: Path, pid: int | None) -> str:
    """Who holds ``path``: the kernel's PID, with the command its lock file names."""
    for _ in range(10):  # the holder writes its line right after locking: give it a moment
        try:
            text = path.read_text(encoding="utf-8").strip()
        except OSError:
            text = ""
        fields = dict(f.split("=", 1) for f in text.split() if "=" in f)
        if pid is None and fields.get("pid"):
            pid = int(fields["pid"])
        if pid is not None and fields.get("pid") == str(pid):
            return f"PID {pid}" + (f", stepprobe {fields['stage']}" if fields.get("stage") else "")
        time.sleep(0.05)
    return f"PID {pid}" if pid is not None else "PID unknown"


def hold(output: str | os.PathLike, *, shared: bool = False, wait: bool = False) -> Path:
    """Lock ``output`` for writing, or refuse in one line when another process writes it.

    ``shared``: admit other shared holders (several workers of one study). ``wait``: block
    until the lock is free instead of refusing (short critical sections only). Returns the
    lock file's path (for :func:`release`).
    """
    path = lock_path(output)
    key = str(path)
    held = _HELD.get(key)
    if held is not None:  # re-entrant within this process
        held.count += 1
        if _SCOPES:
            _SCOPES[-1].append(key)
        return path
    flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except PermissionError as exc:
            raise StepprobeError(f"{Path(output)}: {exc.filename or path.parent}: permission denied; the folder is "
                                 "not writable, choose another location") from None
        try:
            fcntl.lockf(fd, flags)
        except OSError as exc:
            owner = _lock_owner(fd, shared) if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputBusy(f"another stepprobe process ({_holder(path, owner)}) is writing {Path(output)}; wait for it "
                                 f"to finish or choose another output (one writer per output)") from None
            raise
        # The file may have been removed (and recreated) by a releasing holder between our
        # open and our lock: then the lock we got guards nothing; take the current file's.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stage = _STAGE[-1] if _STAGE else ""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()}{f' stage={stage}' if stage else ''}\n".encode(), 0)
    except OSError:
        pass  # the PID is a courtesy to the refused writer, the lock is what counts
    _HELD[key] = _Held(path, fd, shared)
    if _SCOPES:
        _SCOPES[-1].append(key)
    return path


def release(lock: str | os.PathLike) -> None:
    """Drop one hold of a lock file (from :func:`hold`); the last one unlocks it."""
    key = str(lock)
    held = _HELD.get(key)
    if held is None:
        return
    held.count -= 1
    if held.count > 0:
        return
    del _HELD[key]
    try:
        # Remove the file only while nobody else holds it (an exclusive lock proves that).
        fcntl.lockf(held.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with contextlib.suppress(OSError):
            if os.fstat(held.fd).st_ino == os.stat(held.path).st_ino:
                os.unlink(held.path)
    except OSError:
        pass
    finally:
        os.close(held.fd)


def release_all() -> None:
    for key in list(_HELD):
        _HELD[key].count = 1
        release(key)


atexit.register(release_all)  # the kernel would drop the locks anyway; this also removes their files


@contextlib.contextmanager
def holding(output: str | os.PathLike, *, shared: bool = False, wait: bool = False) -> Iterator[Path]:
    """:func:`hold` for the length of a ``with`` block."""
    lock = hold(output, shared=shared, wait=wait)
    if _SCOPES and _SCOPES[-1] and _SCOPES[-1][-1] == str(lock):
        _SCOPES[-1].pop()  # released by this block, not by the scope
    try:
        yield lock
    finally:
        release(lock)


@contextlib.contextmanager
def scope(stage: str = "") -> Iterator[None]:
    """Release, when the block ends, every lock :func:`hold` took inside it (the CLI runs
    each command in one; ``stage`` is written into the lock files it takes)."""
    _SCOPES.append([])
    _STAGE.append(stage or (_STAGE[-1] if _STAGE else ""))
    try:
        yield
    finally:
        _STAGE.pop()
        for key in reversed(_SCOPES.pop()):
            release(key)
