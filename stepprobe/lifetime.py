"""Engine processes never outlive the command that started them.

vLLM runs its engine in child processes (``VLLM::EngineCore``, and ``VLLM::Worker`` under it
with the multiprocessing executor). When the command is killed with SIGKILL (or dies in any
way that skips vLLM's shutdown), those children are re-parented and keep running: on a GPU
they keep its memory and the next start fails.

:func:`guard_children` (called by :func:`stepprobe.engine.prepare_engine`, i.e. before every
engine stepprobe starts) starts one small watchdog process per command, in its own session
so that a signal to the command's process group does not reach it. It notes the command's
descendants every ``interval`` seconds; when the command is gone, it sends SIGTERM to the
descendants it saw that are still alive (same pid and start time), then SIGKILL after
``grace`` seconds, and exits. When the command ends normally its engines are already shut
down and the watchdog only finds nothing left to stop.

A parent-death signal (``prctl(PR_SET_PDEATHSIG)``) would need a hook inside vLLM's own
child processes before they start their work; a watchdog needs none and also covers
grandchildren (the workers under the engine core).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import psutil

log = logging.getLogger(__name__)

_WATCHDOG: subprocess.Popen | None = None


def guard_children(interval: float = 0.5, grace: float = 2.0) -> None:
    """Start the watchdog for this process (once; later calls do nothing)."""
    global _WATCHDOG
    if _WATCHDOG is not None and _WATCHDOG.poll() is None:
        return
    if not sys.platform.startswith("linux") or os.environ.get("STEPPROBE_NO_WATCHDOG"):
        return
    _WATCHDOG = subprocess.Popen(
        [sys.executable, "-m", "stepprobe.lifetime", str(os.getpid()), str(interval), str(grace)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True)
    log.debug("engine watchdog %d guards process %d", _WATCHDOG.pid, os.getpid())


def _start_time(pid: int) -> float | None:
    """The process's creation time (psutil), which tells a reused pid from the process; None when gone."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None


def _descendants(pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def watch(parent: int, interval: float = 0.5, grace: float = 2.0) -> None:
    """Wait for ``parent`` to end, then stop the descendants it had (the watchdog's loop)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the command's business
    me = os.getpid()
    parent_start = _start_time(parent)
    if parent_start is None:
        return
    seen: dict[int, float] = {}
    while _start_time(parent) == parent_start:
        for pid in _descendants(parent):
            if pid != me and pid not in seen:
                st = _start_time(pid)
                if st is not None:
                    seen[pid] = st
        time.sleep(interval)
    alive = {pid: st for pid, st in seen.items() if _start_time(pid) == st}
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
        for pid, st in list(alive.items()):
            if _start_time(pid) != st:
                alive.pop(pid)
                continue
            try:
                os.kill(pid, sig)
            except OSError:
                alive.pop(pid)
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = {pid: st for pid, st in alive.items() if _start_time(pid) == st}
        if not alive:
            break


if __name__ == "__main__":
    watch(int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]))
