"""Which trials of a study were left RUNNING by a worker that is gone.

Each trial records who runs it (:func:`worker_identity`: host, boot time, pid and the
process's creation time, read with psutil, so a reused pid is not taken for the same
process). A trial whose worker ran on this machine and is gone is failed at once; one of a
worker elsewhere is failed by Optuna's heartbeat after ``--grace-period`` seconds.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import warnings
from typing import Any

import psutil

WORKER_ATTR = "worker"


def worker_identity() -> dict[str, Any]:
    """Who runs a trial: host, boot time, pid and the process's creation time."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot_time": psutil.boot_time(), "pid": pid,
            "create_time": psutil.Process(pid).create_time()}


def worker_alive(worker: dict[str, Any]) -> bool | None:
    """True/False for a worker on this machine (since its last boot); None when it runs
    elsewhere or the record is not one :func:`worker_identity` wrote."""
    if (worker.get("host"), worker.get("boot_time")) != (socket.gethostname(), psutil.boot_time()):
        return None
    if "pid" not in worker or "create_time" not in worker:
        return None
    try:
        return psutil.Process(int(worker["pid"])).create_time() == worker["create_time"]
    except psutil.NoSuchProcess:
        return False


def fail_dead_trials(study, grace_period: float) -> int:
    """Mark trials left RUNNING by dead workers as failed; returns how many (public Optuna API only).

    - A trial whose worker ran on this machine (its ``worker`` user attribute: host, boot id,
      pid, process start time) and is gone is failed at once: no grace period to wait.
    - A trial of a worker on another machine is failed by Optuna's heartbeat
      (``optuna.storages.fail_stale_trials``: no heartbeat for ``--grace-period`` seconds).
    - A trial without the attribute (killed between Optuna's ``ask`` and the objective's first
      line, where it may never have recorded a heartbeat) is failed once it is older than the
      grace period.
    """
    import optuna

    running = (optuna.trial.TrialState.RUNNING,)
    before = len(study.get_trials(deepcopy=False, states=running))
    if before == 0:
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    now = dt.datetime.now()
    for t in study.get_trials(deepcopy=False, states=running):
        worker = t.user_attrs.get(WORKER_ATTR)
        if worker is not None:
            dead = worker_alive(worker) is False
        else:
            dead = t.datetime_start is not None and (now - t.datetime_start).total_seconds() > grace_period
        if dead:
            try:
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                pass  # another worker failed (or finished) it first
    return before - len(study.get_trials(deepcopy=False, states=running))
