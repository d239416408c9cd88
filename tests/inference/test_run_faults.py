"""Issue 14, items 1 and 5 on a real engine: a refused `run` leaves nothing that blocks the
corrected command, and results.jsonl counts step positions in generated tokens."""

from __future__ import annotations

import json

import pytest

from stepprobe.errors import ArtifactMismatch, StepprobeError


@pytest.mark.vllm
def test_refused_run_does_not_block_the_corrected_one(tmp_path, plugin_runner, tiny_model_path, planted_scorer):
    from stepprobe.boundaries import BoundaryDetector, BoundaryRule
    from stepprobe.inference import run as R

    out = tmp_path / "r"
    common = dict(problems="builtin:n=3,seed=2", model=tiny_model_path, n=2, max_tokens=24, max_model_len=256,
                  output=str(out))
    # The repro: memory pruning without a scorer is refused before anything exists.
    with pytest.raises(StepprobeError, match="needs a scorer"):
        R.run(R.Config(policy="memory", **common))
    with pytest.raises(StepprobeError, match="unknown score aggregate"):
        R.run(R.Config(policy="memory", scorer=planted_scorer, aggregate="median", **common))
    assert not out.exists()

    # A results file holding only a header of another config (what an engine that failed to
    # start used to leave) is replaced by the corrected command, not refused.
    cfg = R.Config(policy="memory", scorer=planted_scorer, **common)
    prov = R.provenance(tiny_model_path, planted_scorer)
    out.mkdir()
    (out / "results.jsonl").write_text(json.dumps(R._header(cfg.replace(policy="none", aggregate="min"), prov)) + "\n")
    R.run(cfg, runner=plugin_runner)
    lines = (out / "results.jsonl").read_text().splitlines()
    header, records = json.loads(lines[0]), [json.loads(ln) for ln in lines[1:]]
    assert header["config"]["policy"] == "memory" and header["schema_version"] == R.RESULTS_SCHEMA_VERSION
    assert len(records) == 3 and all(len(r["traces"]) == 2 for r in records)

    # Item 5: step positions are generated-token indices (the HDF5 convention), at boundaries.
    det = BoundaryDetector.from_tokenizer(BoundaryRule(), plugin_runner.tokenizer)
    checked = 0
    for r in records:
        for t in r["traces"]:
            ids = plugin_runner.tokenizer(t["text"], add_special_tokens=False)["input_ids"]
            assert len(t["step_positions"]) == len(t["step_scores"])
            assert all(0 <= p < t["num_tokens"] for p in t["step_positions"])
            if ids and len(ids) == t["num_tokens"]:  # text re-tokenizes to the same ids
                assert set(t["step_positions"]) <= set(det.find(ids))
            checked += len(t["step_positions"])

    # Once a result exists, another config is refused (it would mix two runs in one file).
    with pytest.raises(ArtifactMismatch, match="different config"):
        R.run(cfg.replace(aggregate="min"), runner=plugin_runner)
    assert len((out / "results.jsonl").read_text().splitlines()) == 4


@pytest.mark.vllm
def test_confidence_policy_streams_each_problem_after_its_second_phase(plugin_runner, tiny_model_path):
    """The confidence baseline yields a problem once its warm-up and its own second phase are
    done (no barrier across problems); a caller that stops early leaves the engine empty."""
    from stepprobe.inference import run as R

    cfg = R.Config(problems="builtin:n=4,seed=3", model=tiny_model_path, policy="confidence", vote="confidence",
                   n=4, confidence_warmup=2, confidence_window=4, max_tokens=24, max_model_len=256)
    problems = R.load_problems(cfg)
    stream = R.solve_stream(plugin_runner, problems, cfg)
    k, first = next(stream)
    assert [t["index"] for t in first["traces"]] == [0, 1, 2, 3]
    assert not any(t["pruned"] for t in first["traces"][:2])  # the warm-up is never stopped
    stream.close()
    assert not plugin_runner.llm.llm_engine.has_unfinished_requests() and not plugin_runner._owner

    stats: dict = {}
    got = dict(R.solve_stream(plugin_runner, problems, cfg, stats=stats))
    assert sorted(got) == [0, 1, 2, 3] and "wall_s" in stats
    for i, rec in got.items():
        assert rec["problem_id"] == problems[i].problem_id
        assert [t["index"] for t in rec["traces"]] == [0, 1, 2, 3]
        assert rec["kept"] + rec["pruned"] == 4 and not any(t["pruned"] for t in rec["traces"][:2])


def test_a_torn_last_line_is_cut_before_the_resumed_run_appends(tmp_path, tiny_model_path):
    """Issue 24, defect 1: a killed run can leave half a line; the resumed run used to append
    right after it, gluing its first record onto the torn one, and every reader stopped there.
    Driven through run's own resume and open, as run() calls them (the engine test
    test_run_stage_results_summary_and_resume does the same through run())."""
    from stepprobe import jsonl
    from stepprobe.inference import run as run_stage

    cfg = run_stage.Config(model=tiny_model_path, output=str(tmp_path), policy="none")
    prov = run_stage.provenance(tiny_model_path, None)
    path = tmp_path / "results.jsonl"
    with run_stage._open_results(path, cfg, prov, {}) as w:
        w.write({"problem_id": "a"})
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"problem_id": "b", "tr')  # killed mid-line
    done = run_stage._resume(tmp_path, cfg, prov)
    assert list(done) == ["a"]
    with run_stage._open_results(path, cfg, prov, done) as w:
        w.write({"problem_id": "b"})
        w.write({"problem_id": "c"})
    header, lines = jsonl.read(path, run_stage.RESULTS_KIND, run_stage.RESULTS_SCHEMA_VERSION, "results")
    assert header["config"] == cfg.to_dict()
    assert [rec["problem_id"] for _, rec in lines] == ["a", "b", "c"]
    assert list(run_stage._resume(tmp_path, cfg, prov)) == ["a", "b", "c"]


def test_replay_reads_every_problem_and_refuses_a_glued_line(tmp_path, tiny_model_path):
    """Issue 24, defect 1, the reader's side: replay used to stop at the first line that was not
    JSON (a torn line a resumed run had glued its next record onto) and drop every later problem
    without a word; it reads through the shared reader, which leaves out only a torn last line
    and refuses a corrupt complete one by its line number."""
    from stepprobe.inference import run as run_stage
    from stepprobe.inference.replay_data import load_run

    cfg = run_stage.Config(model=tiny_model_path, output=str(tmp_path), policy="none")
    path = tmp_path / "results.jsonl"
    with run_stage._open_results(path, cfg, run_stage.provenance(tiny_model_path, None), {}) as w:
        w.write({"problem_id": "a"})
    text = path.read_text(encoding="utf-8")
    path.write_text(text + '{"problem_id": "b", "tr')
    assert [r["problem_id"] for r in load_run(tmp_path)[1]] == ["a"]  # a torn last line: left out
    path.write_text(text + '{"problem_id": "b", "tr{"problem_id": "c"}\n{"problem_id": "d"}\n')
    with pytest.raises(StepprobeError, match="results.jsonl:3: corrupt run results file line"):
        load_run(tmp_path)
