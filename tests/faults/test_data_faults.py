"""Issue 14, items 2-5 without an engine: duplicates, the context length, one-class and
empty splits, unwritable outputs, and the position convention."""

from __future__ import annotations

import json
import logging
import types

import numpy as np
import pytest

from stepprobe.errors import StepprobeError

from .conftest import synthetic_h5


def test_duplicate_questions_warned_and_kept_in_one_split(tmp_path, caplog):
    """Item 2: the same question under several ids (here with different gold answers) is
    named in one warning, and the problem split keeps all its ids in one split."""
    from stepprobe.data_collection.problems import load_problems
    from stepprobe.training.data import SPLITS, make_split, open_hidden_states

    f = tmp_path / "p.jsonl"
    rows = [{"id": f"p{i}", "question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(6)]
    rows.append({"id": "dup", "question": "What is  3 + 1?", "answer": "five"})
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with caplog.at_level(logging.WARNING):
        probs = load_problems(f)
    assert len(probs) == 7  # kept: the split, not the loader, deals with them
    msgs = [r.getMessage() for r in caplog.records if "more than one problem id" in r.getMessage()]
    assert len(msgs) == 1 and "'p3', 'dup'" in msgs[0] and "different gold answers" in msgs[0]

    # 30 problems, every 5th asks the question of the one before it: across many split seeds
    # each pair always lands in one split.
    questions = [f"q{p - 1 if p % 5 == 4 else p}" for p in range(30)]
    hs = open_hidden_states(synthetic_h5(tmp_path / "dups.h5", questions=questions))
    for seed in range(20):
        split = make_split(hs, seed=seed)
        where = {pid: s for s in SPLITS for pid in split.problems[s]}
        for p in range(30):
            if p % 5 == 4:
                assert where[f"p{p:03d}"] == where[f"p{p - 1:03d}"], (seed, p)
        assert split.info["by"] == "question"


def test_split_without_duplicates_is_unchanged(tmp_path):
    """Grouping by question changes nothing for data without duplicate questions."""
    from stepprobe.training.data import split_problems

    ids = [f"p{i:03d}" for i in range(40)]
    for seed in range(5):
        assert split_problems(ids, seed=seed) == split_problems(ids, seed=seed, groups={})


def test_context_length_refused_or_warned(caplog):
    """Item 4: prompt + max_tokens beyond max_model_len is said, a prompt that fills it is refused."""
    from stepprobe.engine import check_context

    with caplog.at_level(logging.WARNING):
        check_context([20, 60], 96, 128)
    (msg,) = [r.getMessage() for r in caplog.records]
    assert "1 of 2 prompts" in msg and "stop at 128 total tokens" in msg and "as few as 68 generated" in msg
    with pytest.raises(StepprobeError, match="no room to generate"):
        check_context([40, 130], 96, 128)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_context([40, 30], 88, 128)
    assert not caplog.records


def test_no_steps_and_one_class_test_split(tmp_path, caplog):
    """Item 4: a file with traces but no step says so (not "0 problems"); a one-class test
    split is a warning, a one-class validation split a refusal."""
    from stepprobe.training.data import TEST, VAL, SplitRows, check_classes, make_split

    empty = types.SimpleNamespace(num_steps=0, num_traces=8, path="x.h5")
    with pytest.raises(StepprobeError, match="x.h5 has 8 traces but no step boundary"):
        make_split(empty)
    hs = types.SimpleNamespace(steps={"label": np.array([0, 1, 1, 1, 0, 1])})
    rows = {"train": np.array([0, 1]), VAL: np.array([1, 4]), TEST: np.array([2, 3])}
    split = SplitRows(rows, {"train": ["a"], VAL: ["b"], TEST: ["c"]}, {})
    with caplog.at_level(logging.WARNING):
        check_classes(split, hs)
    assert any("the test split (1 problems) has only one class" in r.getMessage() for r in caplog.records)
    split.rows[VAL] = np.array([2, 3])
    with pytest.raises(StepprobeError, match="validation split .* only one class"):
        check_classes(split, hs)


def test_unwritable_output_is_one_line(tmp_path, monkeypatch, capfd):
    """Item 3: an output folder that cannot be written (as root, simulated through os.access)
    is refused by name before anything is written, and an OSError a stage still meets (here a
    PermissionError) is one line, not a traceback."""
    import os

    from stepprobe.cli import main
    from stepprobe.io import check_writable_dir

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(locked) else real(p, m))
    with pytest.raises(StepprobeError, match=f"{locked} is not writable"):
        check_writable_dir(locked / "sub" / "out")

    import stepprobe.training.train as train

    def denied(config):
        raise PermissionError(13, "Permission denied", str(locked / "run.json"))

    monkeypatch.setattr(train, "run", denied)
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    try:
        assert main(["train", "--data", "x.h5"]) == 2
    finally:
        root.handlers[:] = saved
    err = capfd.readouterr().err
    assert err.strip() == f"stepprobe train: error: {locked / 'run.json'}: Permission denied"


def test_compile_note_said_once(caplog, monkeypatch):
    """Where vLLM compiles on CPU, the wait and the --enforce-eager trade are said once."""
    import stepprobe.engine as engine
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the note is for the CPU backend")
    monkeypatch.setattr(engine, "_COMPILE_NOTED", False)
    with caplog.at_level(logging.INFO, logger="stepprobe.engine"):
        engine.note_compile(True)
        engine.note_compile(False)
        engine.note_compile(False)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "--enforce-eager" in msgs[0] and "minutes" in msgs[0]
