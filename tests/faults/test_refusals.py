"""Issue 14: every stage refuses bad input in one line on stderr, exit code 2, no traceback,
before it writes anything (and before any engine starts).

The table runs in this process through ``stepprobe.cli.main`` with stderr captured at the
file-descriptor level (logging set up by ``main`` as in a fresh process), which keeps the
fast tier fast; ``test_real_entry_point`` runs a few rows as ``python -m stepprobe.cli``.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from stepprobe.cli import main

# (id, stage, argv builder(bad) -> list[str], words the one line must contain, path that must not exist)
TABLE = [
    ("run-n0", "run", lambda b: ["--n", "0", "--output", str(b["dir"] / "r1")], ["n must be at least 1"], "r1"),
    ("run-no-scorer", "run", lambda b: ["--policy", "memory", "--model", b["tiny"], "--output", str(b["dir"] / "r2")],
     ["needs a scorer", "--scorer"], "r2"),
    ("run-aggregate", "run", lambda b: ["--aggregate", "median", "--policy", "none", "--model", b["tiny"],
                                        "--output", str(b["dir"] / "r3")],
     ["unknown score aggregate", "median"], "r3"),
    ("run-keep-fraction", "run", lambda b: ["--keep-fraction", "2", "--policy", "none", "--model", b["tiny"],
                                            "--output", str(b["dir"] / "r7")], ["keep_fraction"], "r7"),
    ("run-kv-blocks", "run", lambda b: ["--policy", "none", "--num-kv-blocks", "1", "--max-model-len", "2048",
                                        "--problems", "builtin:n=2", "--output", str(b["dir"] / "r4")],
     ["--num-kv-blocks 1 holds", "--max-model-len 2048"], "r4"),
    ("run-model-path", "run", lambda b: ["--policy", "none", "--model", "/nonexistent/model", "--problems",
                                         "builtin:n=2", "--output", str(b["dir"] / "r5")],
     ["/nonexistent/model does not exist"], "r5"),
    ("run-latin1", "run", lambda b: ["--policy", "none", "--problems", str(b["latin1"]),
                                     "--output", str(b["dir"] / "r6")], ["latin1.jsonl", "not UTF-8"], "r6"),
    ("run-output-file", "run", lambda b: ["--policy", "none", "--output", str(b["afile"] / "r")],
     ["afile.txt is a file"], None),
    ("collect-latin1", "collect", lambda b: ["--problems", str(b["latin1"]), "--output", str(b["dir"] / "c1.jsonl")],
     ["latin1.jsonl", "not UTF-8"], "c1.jsonl"),
    ("collect-model-path", "collect", lambda b: ["--problems", "builtin:n=2", "--model", "./no/such/model",
                                                 "--output", str(b["dir"] / "c2.jsonl")],
     ["does not exist"], "c2.jsonl"),
    ("collect-hub-offline", "collect", lambda b: ["--problems", "builtin:n=2", "--model", "stepprobe-test/no-such",
                                                  "--output", str(b["dir"] / "c3.jsonl")],
     ["stepprobe-test/no-such"], "c3.jsonl"),
    ("record-dup-ids", "record", lambda b: ["--traces", str(b["dup_ids"]), "--output", str(b["dir"] / "h1.h5")],
     ["duplicate problem id 'a'", "line 2"], "h1.h5"),
    ("record-no-steps", "record", lambda b: ["--traces", str(b["no_steps"]), "--output", str(b["dir"] / "h2.h5")],
     ["no step boundary"], "h2.h5"),
    ("record-hub-model", "record", lambda b: ["--traces", str(b["hub_model"]), "--output", str(b["dir"] / "h3.h5")],
     ["stepprobe-test/no-such-model"], "h3.h5"),
    ("record-output-file", "record", lambda b: ["--traces", str(b["dup_ids"]), "--output",
                                                str(b["afile"] / "h.h5")], ["afile.txt is a file"], None),
    ("train-nan", "train", lambda b: ["--data", str(b["nan_h5"]), "--sites", "layer_01", "--out",
                                      str(b["dir"] / "t1")], ["NaN or inf", "layer_01 (1 steps)"], "t1"),
    ("train-missing", "train", lambda b: ["--data", str(b["dir"] / "none.h5"), "--out", str(b["dir"] / "t2")],
     ["not found"], "t2"),
    ("train-one-class", "train", lambda b: ["--data", str(b["one_class_h5"]), "--sites", "layer_01",
                                            "--split-seed", str(b["one_class_seed"]), "--out", str(b["dir"] / "t3")],
     ["validation split", "only one class", "--split-seed"], "t3"),
    ("sweep-one-class", "sweep", lambda b: ["--data", str(b["one_class_h5"]), "--sites", "layer_01",
                                            "--split-seed", str(b["one_class_seed"]), "--out", str(b["dir"] / "s2")],
     ["only one class"], "s2"),
    # A NaN is found when its site is read (each site is read once); sweep's rows so far are kept.
    ("sweep-nan", "sweep", lambda b: ["--data", str(b["nan_h5"]), "--sites", "layer_01", "--no-progress", "--out",
                                      str(b["dir"] / "s1")], ["NaN or inf"], None),
    ("tune-one-class", "tune", lambda b: ["--data", str(b["one_class_h5"]), "--sites", "layer_01",
                                          "--split-seed", str(b["one_class_seed"]), "--out", str(b["dir"] / "u2")],
     ["only one class"], "u2"),
    ("tune-missing", "tune", lambda b: ["--data", str(b["dir"] / "none.h5"), "--out", str(b["dir"] / "u1")],
     ["not found"], "u1"),
    ("export-missing", "export", lambda b: ["--source", str(b["dir"] / "nothing"), "--out", str(b["dir"] / "e1")],
     ["nothing"], "e1"),
    ("bench-kv-blocks", "bench", lambda b: ["--policies", "none", "--kv-blocks", "0,1", "--problems", "builtin:n=2",
                                            "--output", str(b["dir"] / "b1")], ["--kv-blocks 1 holds", "--max-model-len 1024"], "b1"),
    ("serve-scorer", "serve", lambda b: ["--scorer", str(b["dir"] / "no-scorer"), "--print-command"],
     ["no-scorer"], None),
    ("pipeline-config", "pipeline", lambda b: ["--config", str(b["latin1"])], ["latin1.jsonl", "not UTF-8"], None),
    ("model-path", "model", lambda b: ["--model", "/nonexistent/model"], ["does not exist"], None),
    # Issue 25: a stepprobe header, then lines of another format (was KeyError: 'traces').
    ("record-mixed-traces", "record", lambda b: ["--traces", str(b["mixed_traces"]), "--output",
                                                 str(b["dir"] / "h4.h5")],
     ["mixed.jsonl:2", "not a problem line of collect's traces", "'traces'"], "h4.h5"),
    # Issue 25: a question line over the documented limit is refused by its line number, streamed.
    ("collect-huge-line", "collect", lambda b: ["--problems", str(b["huge_line"]), "--model", b["tiny"],
                                                "--output", str(b["dir"] / "c4.jsonl")],
     ["huge.jsonl:2", "longer than 1,000,000 characters"], "c4.jsonl"),
    ("run-huge-line", "run", lambda b: ["--policy", "none", "--problems", str(b["huge_line"]), "--model", b["tiny"],
                                        "--output", str(b["dir"] / "r8")], ["huge.jsonl:2", "1,000,000"], "r8"),
    # Issue 25: another program's HDF5 file, named once ("stepprobe stepprobe-hidden-states" before).
    ("train-foreign-h5", "train", lambda b: ["--data", str(b["foreign_h5"]), "--out", str(b["dir"] / "t4")],
     ["foreign.h5 is not a stepprobe hidden-states file"], "t4"),
    # Issue 25: a file whose block file is gone says how to get a good one again.
    ("sweep-missing-block", "sweep", lambda b: ["--data", str(b["broken_parts_h5"]), "--out", str(b["dir"] / "s3")],
     ["block file", "is missing", "--overwrite"], "s3"),
]


def _call(argv: list[str], capfd) -> tuple[int, str]:
    """``stepprobe ARGV`` in this process, stderr as a fresh process would print it."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers.clear()  # so that main's logging.basicConfig installs its stderr handler
    capfd.readouterr()
    try:
        rc = main(argv)
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
    return rc, capfd.readouterr().err


@pytest.mark.parametrize("case", TABLE, ids=[c[0] for c in TABLE])
def test_refused_in_one_line(case, bad, capfd):
    name, stage, argv, words, absent = case
    rc, err = _call([stage, *argv(bad)], capfd)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"stepprobe {stage}: error: "), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    if absent:
        assert not (bad["dir"] / absent).exists(), f"a refused {stage} left {absent} behind"


@pytest.mark.parametrize("name", ["run-kv-blocks", "record-dup-ids", "train-nan"])
def test_real_entry_point(name, bad):
    _, stage, argv, words, _ = next(c for c in TABLE if c[0] == name)
    p = subprocess.run([sys.executable, "-m", "stepprobe.cli", stage, *argv(bad)], capture_output=True, text=True,
                       timeout=600)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(lines) == 1, p.stderr[-3000:]
    assert all(w in lines[0] for w in words), lines[0]


def _without_dac_override() -> None:
    """In the child, before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the
    bounding set, so that a root process meets file permissions as their owner does (the
    tests run as root, for whom a 0o555 folder would otherwise be writable)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


# (stage, argv builder(inputs, locked folder)): every stage that writes, pointed into a real
# folder of mode 0o555 (not a faked os.access).
UNWRITABLE = [
    ("run", lambda b, L: ["--policy", "none", "--problems", "builtin:n=2", "--output", str(L / "r")]),
    ("bench", lambda b, L: ["--policies", "none", "--problems", "builtin:n=2", "--output", str(L / "b")]),
    ("collect", lambda b, L: ["--problems", "builtin:n=2", "--output", str(L / "c" / "traces.jsonl")]),
    ("record", lambda b, L: ["--traces", str(b["good_traces"]), "--output", str(L / "h.h5")]),
    ("train", lambda b, L: ["--data", str(b["good_h5"]), "--sites", "layer_01", "--out", str(L / "t")]),
    ("sweep", lambda b, L: ["--data", str(b["good_h5"]), "--sites", "layer_01", "--out", str(L / "s")]),
    ("tune", lambda b, L: ["--data", str(b["good_h5"]), "--sites", "layer_01", "--n-trials", "1",
                           "--out", str(L / "u")]),
    ("pipeline", lambda b, L: ["--problems", "builtin:n=2", "--out", str(L / "p")]),
]


@pytest.mark.parametrize("case", UNWRITABLE, ids=[c[0] for c in UNWRITABLE])
def test_really_unwritable_output_is_one_line(case, bad, tmp_path):
    """Issue 14, item 3, without simulation: the command runs without the capability that lets
    root ignore permissions, against a folder it may not write; one line naming the folder,
    exit 2, no traceback, and the folder stays empty."""
    import os

    stage, argv = case
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        p = subprocess.run([sys.executable, "-m", "stepprobe.cli", stage, *argv(bad, locked)], capture_output=True,
                           text=True, timeout=600, preexec_fn=_without_dac_override if os.geteuid() == 0 else None)
    finally:
        locked.chmod(0o755)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"stepprobe {stage}: error: "), p.stderr[-3000:]
    assert str(locked) in lines[0] and ("not writable" in lines[0] or "ermission denied" in lines[0]), lines[0]
    assert not any(locked.iterdir()), f"{stage} wrote into the locked folder: {list(locked.iterdir())}"
