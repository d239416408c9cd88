"""The engine watchdog (stepprobe.lifetime) without an engine: a grandchild outlives its
SIGKILLed parent only until the watchdog notices."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from stepprobe.lifetime import _descendants, _start_time

PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the watchdog runs on Linux")
def test_the_watchdog_stops_what_a_killed_command_started():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert _descendants(parent.pid) == [child]
    started = _start_time(child)
    dog = subprocess.Popen([sys.executable, "-m", "stepprobe.lifetime", str(parent.pid), "0.1", "0.5"],
                           start_new_session=True)
    try:
        time.sleep(1.0)  # the watchdog has seen the child
        assert _start_time(child) == started
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        dog.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _start_time(child) == started and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _start_time(child) != started, "the child outlived the watchdog"
    finally:
        for p in (dog, parent):
            if p.poll() is None:
                p.kill()
        if _start_time(child) == started:
            os.kill(child, signal.SIGKILL)
