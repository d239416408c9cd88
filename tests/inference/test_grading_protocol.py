"""The grading protocol (issue 22 item 4): declared once, used by every stage that grades,
named in every artifact that carries correctness, checked by the readers that compare them."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest

from stepprobe import options as O
from stepprobe.data_collection.grading import DEFAULT_GRADING
from stepprobe.errors import ArtifactMismatch, StepprobeError
from stepprobe.inference import replay as rp
from stepprobe.inference.run import RESULTS_KIND, RESULTS_SCHEMA_VERSION

PHRASE_ONLY = "2 + 5 = 7, so the answer is 7."
BOXED = "2 + 5 = 7, so \\boxed{7}."


def test_the_option_is_declared_once_and_reaches_every_stage_that_grades():
    from stepprobe.data_collection import collect
    from stepprobe.inference import bench, run

    for cls in (collect.Config, run.Config, bench.Config):
        field = {f.name: f for f in dataclasses.fields(cls)}["grading"]
        assert field.default == DEFAULT_GRADING == "boxed-or-phrase"
        assert [k for k in cls.__mro__ if "grading" in k.__dict__.get("__annotations__", {})] == [O.GradingOption]
    b = bench.Config(policies=["none", "confidence"], grading="boxed-only")
    assert {bench._run_config(b, p, 0).grading for p in ("none", "confidence")} == {"boxed-only"}
    assert "grading" in collect.RESUME_KEYS  # a resumed traces file must keep its protocol
    with pytest.raises(StepprobeError, match="unknown grading protocol 'boxed'; known: boxed-or-phrase, boxed-only"):
        run.Config(grading="boxed")


def _trace(text: str):
    from stepprobe.inference.runner import TraceResult

    return TraceResult(index=0, text=text, token_ids=[1, 2], finish_reason="stop", pruned=False, score=None,
                       step_scores=[], step_positions=[])


@pytest.mark.parametrize("grading, correct", [("boxed-or-phrase", [True, True]), ("boxed-only", [False, True])])
def test_run_grades_with_its_protocol_and_its_summary_names_it(grading, correct):
    from stepprobe.inference import run

    cfg = run.Config(grading=grading, scorer="none", vote="majority")
    prob = SimpleNamespace(problem_id="p", gold="7", choices=None)
    rec = run.problem_record(prob, [_trace(PHRASE_ONLY), _trace(BOXED)], cfg, "none", 0.0)
    assert [t["correct"] for t in rec["traces"]] == correct
    assert run.summarize([rec], cfg)["grading"] == grading


def test_collect_grades_with_its_protocol():
    from stepprobe.data_collection.collect import grade_problem
    from stepprobe.data_collection.problems import Problem

    out = SimpleNamespace(outputs=[SimpleNamespace(text=t, token_ids=[1], finish_reason="stop")
                                   for t in (PHRASE_ONLY, BOXED)], prompt_token_ids=[0])
    p = Problem("p", "2 + 5?", "7")
    got = {g: [t.correct for t in grade_problem(p, "", out, timeout_s=5, timing={}, grading=g).traces]
           for g in ("boxed-or-phrase", "boxed-only")}
    assert got == {"boxed-or-phrase": [True, True], "boxed-only": [False, True]}


def test_artifacts_from_before_the_option_resume_as_the_default(tmp_path):
    from stepprobe.data_collection import collect
    from stepprobe.data_collection.traces import TraceWriter, make_header
    from stepprobe.inference import run

    # run and bench results: a header without the field reads as the default protocol
    old = {k: v for k, v in run.Config(scorer="none").to_dict().items() if k != "grading"}
    assert O.resume_view(old, run.Config) == O.resume_view(run.Config(scorer="none").to_dict(), run.Config)
    assert O.resume_view(old, run.Config) != O.resume_view(run.Config(scorer="none", grading="boxed-only").to_dict(),
                                                           run.Config)
    # a traces file: resumed by the default protocol, refused by another
    model = {"config_hash": "h", "name": "m"}
    header = make_header({k: v for k, v in collect.Config().to_dict().items() if k != "grading"}, model)
    path = tmp_path / "traces.jsonl"
    path.write_text(json.dumps(header) + "\n")

    def resume(grading: str) -> None:
        new = make_header(collect.Config(grading=grading).to_dict(), model)
        TraceWriter(path, new, match_keys=collect.RESUME_KEYS, absent=O.absent_values(collect.Config)).close()

    resume("boxed-or-phrase")
    with pytest.raises(ArtifactMismatch, match="grading='boxed-or-phrase', this run has grading='boxed-only'"):
        resume("boxed-only")


RUN_CONFIG = {"policy": "none", "threshold": 0.5, "warmup_steps": 1, "keep_fraction": 0.5, "keep_step": 1,
              "aggregate": "mean", "confidence_window": 2, "confidence_percentile": 50.0, "confidence_warmup": 2}


def _records():
    def t(i, answer, correct, scores):
        return {"index": i, "answer": answer, "correct": correct, "num_tokens": 6, "pruned": False,
                "step_positions": [1] * len(scores), "step_scores": scores, "score": scores[0] if scores else None,
                "confidence": 1.0, "token_confidence": [], "stop_confidence": []}

    return [{"problem_id": "A", "gold": "1", "prompt_tokens": 10, "pruned": 0,
             "traces": [t(0, "1", True, [0.9]), t(1, "2", False, [0.1])]},
            {"problem_id": "B", "gold": "7", "prompt_tokens": 10, "pruned": 0,
             "traces": [t(0, "7", True, [0.6]), t(1, None, False, [0.2])]}]


def _write_run(tmp_path, config, **header):
    d = tmp_path / "sc"
    d.mkdir()
    lines = [{"kind": RESULTS_KIND, "schema_version": RESULTS_SCHEMA_VERSION, "config": config, **header}]
    (d / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines + _records()))
    return d


def test_replay_and_calibrate_name_the_runs_protocol_and_refuse_a_bench_graded_otherwise(tmp_path):
    from stepprobe.inference import calibrate as cal
    from stepprobe.inference.bench import BENCH_KIND, BENCH_SCHEMA_VERSION

    sdir = tmp_path / "scorer"
    sdir.mkdir()
    d = _write_run(tmp_path, {**RUN_CONFIG, "grading": "boxed-only", "scorer": str(sdir), "problems": "x.jsonl"},
                   scorer={"path": str(sdir), "weights_sha256": "ab" * 32})
    out = rp.run(rp.Config(results=str(d), kv_blocks=[0], random_draws=2, policies=["none"], trust="",
                           output=str(tmp_path / "replay")))
    assert rp.read_replay(out)["grading"] == "boxed-only"
    assert "graded boxed-only" in (out / "replay.md").read_text()
    trust = cal.run(cal.Config(results=str(d), kv_blocks=[8], block_size=4, grid_points=2))
    assert json.loads(trust.read_text())["calibration_set"]["grading"] == "boxed-only"

    bench = {"kind": BENCH_KIND, "schema_version": BENCH_SCHEMA_VERSION,
             "config": {**RUN_CONFIG, "kv_blocks": [0], "policies": ["none"]}, "rows": [], "problems": {}}
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "bench.json").write_text(json.dumps(bench))  # made before the option: the default
    with pytest.raises(ArtifactMismatch, match="graded boxed-only, the bench .* boxed-or-phrase"):
        rp.run(rp.Config(results=str(d), kv_blocks=[0], policies=["none"], trust="",
                         live_bench=str(tmp_path / "bench"), output=str(tmp_path / "replay2")))


def test_the_pipeline_grades_every_stage_alike_and_the_report_says_how(tmp_path):
    from stepprobe import pipeline as pl
    from stepprobe.report import render_markdown

    cfg = pl.Config(out=str(tmp_path / "run"), stages=["collect", "sc", "bench"],
                    collect={"grading": "boxed-only"}, sc={"grading": "boxed-only"})
    with pytest.raises(StepprobeError, match="collect boxed-only, sc boxed-only, bench boxed-or-phrase"):
        pl.stage_configs(cfg, pl.RunPaths(tmp_path / "run"))
    cfg = cfg.replace(bench={"grading": "boxed-only"})
    pl.stage_configs(cfg, pl.RunPaths(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "pipeline.json").write_text(json.dumps(
        {"config": cfg.to_dict(), "stages": {"collect": {"status": "done", "settings": {"grading": "boxed-only"}}}}))
    assert "graded `boxed-only` (the last \\boxed{} only" in render_markdown(tmp_path / "run")
