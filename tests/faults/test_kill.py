"""Issue 14, item 6: a killed `run`, `collect`, `bench` keeps its finished problems, and its
engine dies with it."""

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


def _kill_when(cmd: list[str], ready, log_path: Path, timeout: float = 600) -> dict[int, int | None]:
    """Start ``cmd``, wait until ``ready()`` holds (noting every process the command starts),
    then SIGKILL it. Returns the processes seen (pid -> start time)."""
    log = open(log_path, "w")  # a pipe nobody reads would fill up and stall the command
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    seen: dict[int, int | None] = {}
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"not ready within {timeout} s"
            for pid in _descendants(proc.pid):
                seen.setdefault(pid, _start_time(pid))
            time.sleep(0.1)
        for pid in _descendants(proc.pid):
            seen.setdefault(pid, _start_time(pid))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    return seen


def _assert_no_survivor(seen: dict[int, int | None]) -> None:
    """Every process the command started is gone within a few seconds (the watchdog stops them)."""
    t0 = time.monotonic()
    alive = {p for p, st in seen.items() if st is not None and _start_time(p) == st}
    while alive and time.monotonic() - t0 < 10:
        time.sleep(0.2)
        alive = {p for p in alive if _start_time(p) == seen[p]}
    assert not alive, f"still running {time.monotonic() - t0:.1f} s after SIGKILL: " + \
        ", ".join(f"{p} {_cmdline(p)}" for p in alive)


def _complete_lines(path: Path) -> list[str]:
    """The lines a reader keeps: all but a torn last one (which only a kill mid-write leaves)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]
    for ln in lines:
        json.loads(ln)  # every complete line parses
    return lines


# The tiny model, eager, with few sequences at a time so that problems finish one after another.
TINY = ["--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "2", "--dtype", "float32"]


@pytest.mark.vllm
def test_sigkill_keeps_finished_problems_and_leaves_no_engine(tmp_path, tiny_model_path):
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "stepprobe.cli", "run", "--model", tiny_model_path, "--problems",
           "builtin:n=60,seed=5", "--n", "2", "--max-tokens", "24", "--policy", "none", "--vote", "majority",
           "--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "4", "--dtype", "float32",
           "--output", str(out)]
    results = out / "results.jsonl"
    seen = _kill_when(cmd, lambda: len(_lines(results)) >= 3, tmp_path / "stderr.txt")
    engines = [p for p in seen if _cmdline(p).startswith("VLLM")]
    assert engines, f"no VLLM::* process seen among {[_cmdline(p) for p in seen]}"
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
    _assert_no_survivor(seen)


@pytest.mark.vllm
def test_sigkilled_collect_keeps_problems_of_its_unfinished_chunk(tmp_path, tiny_model_path, collect_tiny_llm):
    """``collect`` writes each problem once its samples finish, not when its chunk returns: a
    kill inside the only chunk keeps the problems already done; the rerun adds only the
    missing ones and leaves the earlier lines as they were."""
    from stepprobe.data_collection import collect

    out = tmp_path / "traces.jsonl"
    args = dict(model=tiny_model_path, problems="builtin:n=16,seed=5", n=2, max_tokens=24, chunk_size=16,
                enforce_eager=True, max_model_len=256, max_num_seqs=2, dtype="float32")
    cmd = [sys.executable, "-m", "stepprobe.cli", "collect", "--model", tiny_model_path, "--problems",
           args["problems"], "--n", "2", "--max-tokens", "24", "--chunk-size", "16", *TINY, "--output", str(out)]
    seen = _kill_when(cmd, lambda: len(_complete_lines(out)) >= 1 + 2, tmp_path / "stderr.txt")
    before = _complete_lines(out)
    assert 1 + 2 <= len(before) < 1 + 16, "the chunk finished before the kill; the test proves nothing"
    done = [json.loads(ln)["problem_id"] for ln in before[1:]]
    assert all(len(json.loads(ln)["traces"]) == 2 for ln in before[1:])
    _assert_no_survivor(seen)

    # The rerun (the same settings, in this process on a shared engine) finishes only the rest.
    summary = collect.run(collect.Config(**args, output=str(out)), llm=collect_tiny_llm)
    assert summary["this_run"]["traces_generated"] == 2 * (16 - len(done))
    after = out.read_text(encoding="utf-8").splitlines(keepends=True)
    assert after[:len(before)] == before  # finished problems unchanged, byte for byte
    ids = [json.loads(ln)["problem_id"] for ln in after[1:]]
    assert len(ids) == len(set(ids)) == 16 and ids[:len(done)] == done


@pytest.mark.vllm
def test_sigkilled_bench_keeps_the_problems_of_its_cell_and_remeasures_it(tmp_path, tiny_model_path):
    """``bench`` streams each cell's problems as they finish: a kill inside the only cell keeps
    the finished problems on disk; the rerun measures the cell again from the start (a cell is
    timed as one batch), keeps the killed run's lines beside it, and finishes. The rerun's
    engine runs in the test process (its start is a tenth of a CLI engine's)."""
    out = tmp_path / "b"
    cmd = [sys.executable, "-m", "stepprobe.cli", "bench", "--model", tiny_model_path, "--problems",
           "builtin:n=16,seed=5", "--n", "2", "--max-tokens", "24", "--policies", "none", "--kv-blocks", "0",
           *TINY, "--output", str(out)]
    cell = out / "cells" / "kvdefault-none.jsonl"
    seen = _kill_when(cmd, lambda: len(_complete_lines(cell)) >= 1 + 2, tmp_path / "stderr.txt")
    before = _complete_lines(cell)
    assert 1 + 2 <= len(before) < 1 + 16, "the cell finished before the kill; the test proves nothing"
    assert not (out / "bench.json").exists()
    header = json.loads(before[0])
    assert (header["kind"], header["kv_blocks"], header["policy"]) == ("stepprobe-bench-cell", 0, "none")
    assert all(len(json.loads(ln)["traces"]) == 2 for ln in before[1:])
    _assert_no_survivor(seen)

    # The rerun (the same command line, in this process: a second CLI engine start would test nothing more).
    from helpers.engine_modes import in_process_engines
    from stepprobe.cli import stage_config
    from stepprobe.inference import bench as bench_stage

    with in_process_engines():
        bench_stage.run(stage_config(cmd[3:]))
    assert (out / "cells" / "kvdefault-none.interrupted.jsonl").read_text(encoding="utf-8").splitlines(
        keepends=True)[:len(before)] == before  # the killed run's lines, kept as they were
    after = _complete_lines(cell)
    bench = json.loads((out / "bench.json").read_text(encoding="utf-8"))
    ids = [json.loads(ln)["problem_id"] for ln in after[1:]]
    assert len(ids) == len(set(ids)) == 16
    assert sorted(r["problem_id"] for r in bench["problems"]["0/none"]) == sorted(ids)
    assert not (out / "bench.partial.json").exists()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""
