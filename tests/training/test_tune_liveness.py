"""Who ran a trial, and whether that process is still alive (psutil)."""

from __future__ import annotations

import subprocess
import sys

from stepprobe.training.liveness import worker_alive, worker_identity


def test_this_process_is_alive():
    assert worker_alive(worker_identity()) is True


def test_an_ended_process_is_dead_and_a_reused_pid_is_not_it():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    import psutil

    me = worker_identity()
    record = {**me, "pid": child.pid, "create_time": psutil.Process(child.pid).create_time()}
    child.wait()
    assert worker_alive(record) is False
    assert worker_alive({**me, "create_time": me["create_time"] - 1.0}) is False  # same pid, another process


def test_a_worker_elsewhere_or_of_an_older_record_is_unknown():
    me = worker_identity()
    assert worker_alive({**me, "host": me["host"] + "-other"}) is None
    assert worker_alive({**me, "boot_time": me["boot_time"] - 60}) is None  # this machine, before its last boot
    assert worker_alive({"host": me["host"], "boot_id": "x", "pid": me["pid"], "start": 1}) is None
