"""Pipeline rules that need no engine: ``--restart``, skipping finished stages, and the
filter that keeps training questions out of the bench problems."""

from __future__ import annotations

import json

import pytest

from stepprobe.errors import ArtifactMismatch, StepprobeError
from stepprobe.paths import RunPaths
from stepprobe.pipeline import Config, run, stage_settings, write_heldout_problems


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


TRAIN = [{"id": "t1", "question": "What is 2 + 3?", "answer": "5"},
         {"id": "t2", "question": "What is 7 * 6?", "answer": "42"},
         {"id": "t3", "question": "What is 9 - 4?", "answer": "5"}]


def test_bench_problems_drop_every_training_question(tmp_path):
    bench = [{"id": "b1", "question": "  What is 7 * 6?  ", "answer": "42"},  # same question, other spacing
             {"id": "b2", "question": "What is 8 + 8?", "answer": "16"},
             {"id": "b3", "question": "What is 2 + 3?", "answer": "5"},
             {"id": "b4", "question": "Pick one.", "answer": "B", "choices": ["x", "y"]},
             {"id": "b5", "question": "What is 2 + 3 + 1?", "answer": "6"}]
    cfg = Config(out=str(tmp_path / "run"), problems=_jsonl(tmp_path / "train.jsonl", TRAIN),
                 bench_problems=_jsonl(tmp_path / "bench.jsonl", bench))
    paths = RunPaths(tmp_path / "run")
    paths.root.mkdir()
    out = write_heldout_problems(cfg, paths)
    assert out == paths.bench_problems
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [k["id"] for k in kept] == ["b2", "b4", "b5"]
    assert kept[0] == {"id": "b2", "question": "What is 8 + 8?", "answer": "16"}
    assert kept[1]["choices"] == ["x", "y"] and "choices" not in kept[2]


def test_bench_problems_all_seen_in_training_is_an_error(tmp_path):
    cfg = Config(out=str(tmp_path / "run"), problems=_jsonl(tmp_path / "train.jsonl", TRAIN),
                 bench_problems=_jsonl(tmp_path / "bench.jsonl", TRAIN[:2]))
    (tmp_path / "run").mkdir()
    with pytest.raises(StepprobeError, match="every bench problem .* is also a training problem"):
        write_heldout_problems(cfg, RunPaths(tmp_path / "run"))


def _finished(root, cfg: Config, stage: str, settings: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    state = {"kind": "stepprobe-pipeline", "schema_version": 1, "stages": {stage: {"status": "done",
                                                                                 "settings": settings}}}
    (root / "pipeline.json").write_text(json.dumps(state))


def test_restart_forgets_finished_stages_and_clears_the_run_directory(tmp_path):
    root = tmp_path / "run"
    train = _jsonl(tmp_path / "train.jsonl", TRAIN)
    # bench problems = training problems: once the bench stage really starts it stops at the
    # held-out filter, before any engine.
    cfg = Config(out=str(root), problems=train, bench_problems=train, stages=["bench"], report=False)
    _finished(root, cfg, "bench", {"n": 99})
    (root / "stale.txt").write_text("from the earlier run")
    with pytest.raises(ArtifactMismatch, match="stage bench finished with other settings; pass --restart"):
        run(cfg)
    assert (root / "stale.txt").is_file()  # refused, nothing touched

    with pytest.raises(StepprobeError, match="every bench problem"):
        run(Config(out=str(root), problems=train, bench_problems=train, stages=["bench"], report=False,
                   restart=True))
    assert not (root / "stale.txt").exists()
    assert not (root / "pipeline.json").exists()  # the old state is gone with the directory


def test_a_finished_stage_with_the_same_settings_is_skipped(tmp_path):
    root = tmp_path / "run"
    train = _jsonl(tmp_path / "train.jsonl", TRAIN)
    cfg = Config(out=str(root), problems=train, bench_problems=train, stages=["bench"], report=False)
    _finished(root, cfg, "bench", stage_settings("bench", cfg, RunPaths(root)))
    assert run(cfg) == root  # no error from the filter: the stage did not run again
    assert not RunPaths(root).bench_problems.exists()
    state = json.loads((root / "pipeline.json").read_text())
    assert state["stages"]["bench"]["status"] == "done" and state["config"]["stages"] == ["bench"]


def test_run_layout_is_asked_by_name(tmp_path, capsys):
    """Shell scripts ask stepprobe.paths for a run directory's paths instead of spelling them."""
    from stepprobe import paths

    assert paths.main([str(tmp_path), "scorer", "ood_replay", "collect_summary"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "scorer"), str(tmp_path / "ood-replay"),
                                              str(tmp_path / "collect" / "traces.summary.json")]
    assert paths.main([str(tmp_path), "nope"]) == 2 and "names: traces" in capsys.readouterr().err
