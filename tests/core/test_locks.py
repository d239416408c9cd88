"""Issue 25: the output lock (stepprobe.locks) between real processes: refused at once with
the holder's PID, shared holders admitted, gone with its process (kill -9, or a forked child
left behind), re-entrant in-process (the pipeline's stages), and its file removed on release."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import pytest

from stepprobe import locks

HOLD = """
import sys, time
from stepprobe import locks
with locks.scope("holder"):
    locks.hold(sys.argv[1], shared=sys.argv[2] == "shared")
    if sys.argv[3] == "fork":
        import os
        if os.fork() == 0:  # a child that outlives its parent, as an engine process would
            time.sleep(60)
            os._exit(0)
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(path, mode="exclusive", fork="no") -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(path), mode, fork], stdout=subprocess.PIPE, text=True,
                         start_new_session=True)
    assert p.stdout.readline().strip() == "held"
    return p


def _stop(p: subprocess.Popen) -> None:
    """Kill the holder and anything it forked (one process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def test_second_writer_refused_with_holders_pid_until_the_holder_is_killed(tmp_path):
    out = tmp_path / "hs.h5"
    p = _holder(out)
    try:
        with pytest.raises(locks.OutputBusy, match=rf"\(PID {p.pid}, stepprobe holder\) is writing .*hs.h5"):
            locks.hold(out)
        with pytest.raises(locks.OutputBusy):
            locks.hold(out, shared=True)
    finally:
        _stop(p)
    with locks.scope():  # kill -9 dropped it: the rerun takes it
        locks.hold(out)
    assert not locks.lock_path(out).exists()  # released: its file is gone
    assert not out.exists()  # the lock lives beside the output, never in it


def test_a_forked_child_does_not_keep_a_killed_holders_lock(tmp_path):
    out = tmp_path / "run"
    p = _holder(out, fork="fork")
    os.kill(p.pid, signal.SIGKILL)  # the parent only; its forked child lives on
    os.waitpid(p.pid, 0)
    try:
        with locks.scope():
            locks.hold(out)
    finally:
        _stop(p)


def test_shared_holders_share_and_exclude_a_writer(tmp_path):
    out = tmp_path / "study"
    p = _holder(out, "shared")
    try:
        with locks.scope():
            locks.hold(out, shared=True)  # a second tune worker
        with pytest.raises(locks.OutputBusy, match=str(p.pid)):
            locks.hold(out)
    finally:
        _stop(p)


def test_reentrant_in_process_and_released_by_its_scope(tmp_path):
    root = tmp_path / "pipeline"
    with locks.scope("pipeline"):
        locks.hold(root)
        with locks.scope("sweep"):  # a stage the pipeline runs in-process, inside its own lock
            locks.hold(root / "sweep")
            locks.hold(root)  # the same output again: no deadlock
        assert locks.lock_path(root).exists() and not locks.lock_path(root / "sweep").exists()
    assert not locks.lock_path(root).exists()
