"""Issue 25: nothing lost, nothing corrupted.

- One writer per output: every stage that writes is refused at once, in one line naming the
  holder's PID, while another process writes its output (a real second process holds it);
  a second `record` of a real `record` process's output is refused, while another shard of
  the same --output records beside it, and the shards merge.
- A full disk (a file-size limit, ``RLIMIT_FSIZE``, in a real `record` process) during the
  final merge: one line naming the file, no segmentation fault, and the rerun finishes; the
  free-space check counts the merge's second copy.
- SIGTERM ends a command with one line (record here, collect in the vllm tier), and its
  rerun resumes.

The second writer runs in this process through ``stepprobe.cli.main`` (as the refusal table
does), against a holder that is another process; the record cases run the real CLI.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stepprobe import locks

from .conftest import write_traces
from .test_refusals import _call

CLI = [sys.executable, "-m", "stepprobe.cli"]

HOLDER = """
import sys, time
from stepprobe import locks
with locks.scope("holder"):
    locks.hold(sys.argv[1])
    print("held", flush=True)
    time.sleep(120)
"""

# (stage, argv builder(bad, out), output name): every stage that writes, pointed at an
# output another process is writing.
WRITERS = [
    ("collect", lambda b, o: ["--problems", "builtin:n=2", "--model", b["tiny"], "--output", str(o)], "c.jsonl"),
    ("record", lambda b, o: ["--traces", str(b["good_traces"]), "--output", str(o)], "h.h5"),
    ("record", lambda b, o: ["--merge", str(b["good_h5"]), "--output", str(o)], "merged.h5"),
    ("run", lambda b, o: ["--policy", "none", "--problems", "builtin:n=2", "--model", b["tiny"], "--output", str(o)],
     "run"),
    ("bench", lambda b, o: ["--policies", "none", "--problems", "builtin:n=2", "--model", b["tiny"],
                            "--output", str(o)], "bench"),
    ("replay", lambda b, o: ["--results", str(b["dir"] / "some-run"), "--output", str(o)], "replay"),
    ("calibrate", lambda b, o: ["--results", str(b["dir"] / "some-run"), "--output", str(o)], "trust.json"),
    ("train", lambda b, o: ["--data", str(b["good_h5"]), "--sites", "layer_01", "--out", str(o)], "train"),
    ("sweep", lambda b, o: ["--data", str(b["good_h5"]), "--sites", "layer_01", "--out", str(o)], "sweep"),
    ("tune", lambda b, o: ["--data", str(b["good_h5"]), "--sites", "layer_01", "--n-trials", "1", "--out", str(o)],
     "tune"),
    ("export", lambda b, o: ["--source", str(b["dir"]), "--out", str(o)], "scorer"),
    ("evaluate", lambda b, o: ["--scorer", str(b["dir"] / "no-scorer"), "--data", str(b["good_h5"]),
                               "--out", str(o)], "eval"),
    ("pipeline", lambda b, o: ["--problems", "builtin:n=2", "--out", str(o)], "pipeline"),
]


def _hold_elsewhere(path: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def _last_line(err: str, stage: str) -> str:
    """A real process's stderr (progress bars and logs included): no traceback, no crash, and
    one ``stepprobe STAGE:`` line."""
    assert "Traceback" not in err and "Segmentation" not in err, err[-3000:]
    ours = [ln for ln in err.splitlines() if ln.startswith(f"stepprobe {stage}: ")]
    assert len(ours) == 1, err[-3000:]
    return ours[0]


def _one_line(err: str, stage: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and " INFO " not in ln and " WARNING " not in ln]
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"stepprobe {stage}: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("case", WRITERS, ids=[f"{c[0]}-{c[2]}" for c in WRITERS])
def test_second_writer_is_refused_naming_the_holder(case, bad, tmp_path, capfd):
    stage, argv, name = case
    out = tmp_path / name
    holder = _hold_elsewhere(out)
    try:
        rc, err = _call([stage, *argv(bad, out)], capfd)
    finally:
        holder.kill()
        holder.wait()
    line = _one_line(err, stage)
    assert rc == 2 and f"(PID {holder.pid}, stepprobe holder) is writing {out}" in line, line
    assert not out.exists(), f"a refused {stage} wrote {out}"


@pytest.fixture(scope="module")
def many_steps(tmp_path_factory, tiny_model_path) -> Path:
    """Seven problems of 2 x 40 steps: as float32 on the tiny model, blocks of at most four
    problems (~350 kB) and a merged file of ~600 kB."""
    text = "".join(f"Step {i}.\n\n" for i in range(40)) + "So 1."
    return write_traces(tmp_path_factory.mktemp("many") / "many.jsonl", tiny_model_path,
                        [(f"p{k}", f"{k}+0?", [text, text]) for k in range(7)])


RECORD = ["--commit-interval-s", "0", "--storage-dtype", "float32"]


def _wait_for_lock(out: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    lock = locks.lock_path(out)
    deadline = time.monotonic() + timeout
    while not (lock.is_file() and f"pid={proc.pid}" in lock.read_text()):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the writer never took its lock"
        time.sleep(0.05)


def _complete(path: Path, problems: int) -> None:
    from stepprobe.data_collection.hdf5 import LAYOUT_SINGLE, HiddenStates

    with HiddenStates(path) as hs:
        assert hs.complete and hs.layout == LAYOUT_SINGLE and hs.num_problems == problems
        hs.validate()


def test_record_writers_shards_and_sigterm(many_steps, tmp_path, capfd):
    """One real `record --shard 0/2` process P holds its output (frozen with SIGSTOP):

    - a second writer of P's shard is refused at once, naming P (the issue's first case:
      two writers of one output used to leave a file pointing at a deleted block);
    - shard 1/2 of the same --output records here meanwhile: shards write side by side;
    - SIGTERM ends P with one line (exit 143), and the identical rerun resumes its shard;
    - the two shards merge into one complete file.
    """
    out = tmp_path / "hs.h5"
    shard0 = ["record", "--traces", str(many_steps), "--output", str(out), "--shard", "0/2", *RECORD]
    first = subprocess.Popen([*CLI, *shard0], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        mine = tmp_path / "hs.shard-0-of-2.h5"
        _wait_for_lock(mine, first)
        first.send_signal(signal.SIGSTOP)  # frozen while it holds its output
        rc, err = _call(shard0, capfd)
        line = _one_line(err, "record")
        assert rc == 2 and f"(PID {first.pid}, stepprobe record) is writing {mine}" in line, line
        rc, err = _call([*shard0[:-len(RECORD) - 1], "1/2", *RECORD], capfd)
        assert rc == 0, err[-3000:]
        first.send_signal(signal.SIGTERM)
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    line = _last_line(err, "record")
    assert first.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "terminated (SIGTERM)" in line and "rerun the same command to resume" in line, line
    rc, err = _call(shard0, capfd)
    assert rc == 0, err[-3000:]
    shards = [tmp_path / f"hs.shard-{i}-of-2.h5" for i in range(2)]
    rc, err = _call(["record", "--merge", ",".join(map(str, shards)), "--output", str(out)], capfd)
    assert rc == 0, err[-3000:]
    _complete(out, 7)


def _file_size_limit(limit: int):
    def pre() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, as on a full disk, not a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


def test_disk_full_during_the_merge_is_one_line_and_the_rerun_finishes(many_steps, tmp_path, capfd):
    """Blocks fit under the limit, the merged file does not: the issue's 57 tracebacks and
    segmentation fault become one line naming the file; the rerun merges what was kept."""
    out = tmp_path / "hs.h5"
    cmd = ["record", "--traces", str(many_steps), "--output", str(out), *RECORD]
    p = subprocess.run([*CLI, *cmd], capture_output=True, text=True, timeout=300,
                       preexec_fn=_file_size_limit(460_000))
    line = _last_line(p.stderr, "record")
    assert p.returncode == 2, p.stderr[-3000:]
    assert f"error: {out}: writing failed (File too large)" in line and "rerun" in line, line
    assert not [f for f in tmp_path.iterdir() if ".tmp" in f.name], "a half-written file was left behind"
    rc, err = _call(cmd, capfd)
    assert rc == 0, err[-3000:]
    assert "0 new" in err  # nothing recorded twice: the blocks were kept and merged
    _complete(out, 7)


def test_free_space_check_counts_the_merge(many_steps, tmp_path, capfd, monkeypatch):
    """The estimate covers blocks plus the merged copy (the issue's record passed its check
    and then filled the disk while merging)."""
    import shutil

    features = 560 * (4 * 64 * 4 + 40)  # 560 steps, 4 sites x 64 float32, tables
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=int(1.5 * features)))
    out = tmp_path / "hs.h5"
    rc, err = _call(["record", "--traces", str(many_steps), "--output", str(out), *RECORD], capfd)
    line = _one_line(err, "record")
    assert rc == 2 and "as much again while the blocks are merged" in line and "--no-consolidate" in line, line
    assert not out.exists()


# -- with an engine (the lead's GPU/vLLM tier) -------------------------------------------------

TINY = ["--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "2", "--dtype", "float32"]


@pytest.mark.vllm
def test_sigterm_to_collect_is_one_line_and_resumable(tiny_model_path, tmp_path, collect_tiny_llm, caplog):
    """A real ``collect`` process: SIGTERM is one line and exit 143, nothing survives it; the rerun
    (the same settings, in this process on the shared engine: a second engine start would test
    nothing more) resumes from the problems already written."""
    import logging

    from stepprobe.data_collection import collect

    from .test_kill import _assert_no_survivor, _complete_lines, _descendants, _start_time

    out = tmp_path / "traces.jsonl"
    args = dict(model=tiny_model_path, problems="builtin:n=16,seed=3", n=2, max_tokens=24, chunk_size=4,
                enforce_eager=True, max_model_len=256, max_num_seqs=2, dtype="float32")
    cmd = [*CLI, "collect", "--model", tiny_model_path, "--problems", args["problems"], "--n", "2",
           "--max-tokens", "24", "--chunk-size", "4", *TINY, "--output", str(out)]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: dict[int, int | None] = {}
    try:
        deadline = time.monotonic() + 600
        while len(_complete_lines(out)) < 3:  # the header and two problems
            assert p.poll() is None, p.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            for pid in _descendants(p.pid):
                seen.setdefault(pid, _start_time(pid))
            time.sleep(0.1)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    line = _last_line(err, "collect")
    assert p.returncode == 128 + signal.SIGTERM and "terminated (SIGTERM)" in line, err[-3000:]
    _assert_no_survivor(seen)
    kept = len(_complete_lines(out))
    assert kept < 1 + 16, "collect finished before the signal; the test proves nothing"
    with caplog.at_level(logging.INFO):
        summary = collect.run(collect.Config(**args, output=str(out)), llm=collect_tiny_llm)
    assert f"{kept - 1} of 16 problems already done" in caplog.text
    assert summary["this_run"]["traces_generated"] == 2 * (16 - (kept - 1))
    assert len(_complete_lines(out)) == 1 + 16


@pytest.mark.vllm
def test_full_disk_in_run_names_the_file(tiny_model_path, tmp_path):
    """The file-size limit is set on the run's own process once its engine is up and a problem
    is written (``prlimit``): set before the start, vLLM's engine processes inherit it and fail
    to size their shared memory instead."""
    import resource
    import time

    out = tmp_path / "r"
    res = out / "results.jsonl"
    p = subprocess.Popen([*CLI, "run", "--model", tiny_model_path, "--problems", "builtin:n=60,seed=5", "--n", "4",
                          "--max-tokens", "24", "--policy", "none", "--vote", "majority", *TINY, "--output", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and p.poll() is None:
        if res.exists() and res.read_text(errors="replace").count("\n") >= 2:  # header + a problem
            break
        time.sleep(0.05)
    limit = res.stat().st_size + 200  # room for less than one more problem
    resource.prlimit(p.pid, resource.RLIMIT_FSIZE, (limit, limit))
    _, stderr = p.communicate(timeout=600)
    line = _last_line(stderr, "run")
    assert p.returncode == 2 and f"{res}: File too large" in line, stderr[-3000:]
    assert os.path.getsize(res) <= limit