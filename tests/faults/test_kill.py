"""Issue 14, item 6: a killed `run` keeps its finished problems, and its engine dies with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stepprobe.lifetime import _descendants, _start_time


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.is_file() else []


@pytest.mark.vllm
def test_sigkill_keeps_finished_problems_and_leaves_no_engine(tmp_path, tiny_model_path):
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "stepprobe.cli", "run", "--model", tiny_model_path, "--problems",
           "builtin:n=60,seed=5", "--n", "2", "--max-tokens", "24", "--policy", "none", "--vote", "majority",
           "--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "4", "--dtype", "float32",
           "--output", str(out)]
    log = open(tmp_path / "stderr.txt", "w")  # a pipe nobody reads would fill up and stall the command
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    results = out / "results.jsonl"
    seen: dict[int, int] = {}
    deadline = time.monotonic() + 600
    try:
        # Wait for the header and at least two problems, noting every process the command starts.
        while len(_lines(results)) < 3:
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "no result within 10 minutes"
            for pid in _descendants(proc.pid):
                seen.setdefault(pid, _start_time(pid))
            time.sleep(0.2)
        for pid in _descendants(proc.pid):
            seen.setdefault(pid, _start_time(pid))
        engines = [p for p in seen if _cmdline(p).startswith("VLLM")]
        assert engines, f"no VLLM::* process seen among {[_cmdline(p) for p in seen]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    lines = _lines(results)
    assert len(lines) < 61, "the run finished before it was killed; the test proves nothing"
    header = json.loads(lines[0])
    assert header["kind"] == "stepprobe-run-results"
    complete = []
    for ln in lines[1:]:
        try:
            complete.append(json.loads(ln))
        except json.JSONDecodeError:
            assert ln is lines[-1], "only the last line may be torn"
    assert len(complete) >= 2 and all(len(r["traces"]) == 2 for r in complete)
    # Every process the command started is gone within a few seconds (the watchdog stops them).
    t0 = time.monotonic()
    alive = {p for p, st in seen.items() if st is not None and _start_time(p) == st}
    while alive and time.monotonic() - t0 < 10:
        time.sleep(0.2)
        alive = {p for p in alive if _start_time(p) == seen[p]}
    assert not alive, f"still running {time.monotonic() - t0:.1f} s after SIGKILL: " + \
        ", ".join(f"{p} {_cmdline(p)}" for p in alive)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""
