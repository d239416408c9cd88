"""``stepprobe collect``: real vLLM generation, grading, the traces file, resume, the CLI."""

from __future__ import annotations

import json
import shutil

import pytest

from stepprobe.data_collection import collect
from stepprobe.data_collection.grading import extract_answer, is_correct
from stepprobe.data_collection.sources import load_problem_source
from stepprobe.data_collection.prompts import build_prompt
from stepprobe.data_collection.traces import KIND, SCHEMA_VERSION, read_traces
from stepprobe.errors import ArtifactMismatch, StepprobeError

SPEC = "builtin:n=6,seed=1"


def _config(tiny_model_path, out, **kw):
    base = dict(model=tiny_model_path, problems=SPEC, n=3, max_tokens=12, output=str(out), chunk_size=4,
                max_model_len=512, dtype="float32")
    return collect.Config(**{**base, **kw})


def _lines(path):
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


@pytest.fixture(scope="module")
def collect_tiny_run(tmp_path_factory, tiny_model_path, collect_tiny_llm):
    """One finished collect run on the tiny model: (config, summary, traces path)."""
    out = tmp_path_factory.mktemp("collect") / "traces.jsonl"
    config = _config(tiny_model_path, out)
    summary = collect.run(config, llm=collect_tiny_llm)
    return config, summary, out


@pytest.mark.vllm
def test_collect_writes_graded_traces(collect_tiny_run, tiny_model_path):
    from transformers import AutoTokenizer

    config, summary, out = collect_tiny_run
    header, probs = read_traces(out)
    probs = list(probs)
    assert header["kind"] == KIND and header["schema_version"] == SCHEMA_VERSION
    assert header["config"]["n"] == 3 and header["config"]["problems"] == SPEC
    assert header["model"]["num_hidden_layers"] == 2 and header["model"]["vocab_hash"]
    assert "torch" in header["packages"] and "math-verify" in header["packages"]

    problems = load_problem_source(SPEC)
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    # Lines come in the order problems finish (each is written at once): every problem once.
    assert sorted(p.problem_id for p in probs) == sorted(p.problem_id for p in problems)
    by_id = {p.problem_id: p for p in problems}
    for p in probs:
        src = by_id[p.problem_id]
        assert p.gold == src.gold and p.meta["family"] == src.meta["family"]
        assert p.prompt_text == build_prompt(src, tok)
        assert p.prompt_token_ids and p.prompt_token_ids[-3:] == tok(p.prompt_text, add_special_tokens=False)["input_ids"][-3:]
        assert [t.sample_index for t in p.traces] == [0, 1, 2]
        for t in p.traces:
            assert t.num_tokens == len(t.output_token_ids) <= 12
            assert t.finish_reason in ("stop", "length")
            assert t.text == tok.decode(t.output_token_ids, skip_special_tokens=True)
            assert t.extracted_answer == extract_answer(t.text)
            assert t.correct == is_correct(t.extracted_answer, p.gold)
        assert set(p.timing) >= {"generate_s", "grade_s", "finished_after_s", "chunk_problems"}
        # its share of the engine's time until it finished: never more than that time
        assert 0 < p.timing["generate_s"] <= p.timing["finished_after_s"]
    # chunk_size=4: 4 problems in the first submission, 2 in the second
    assert [p.timing["chunk_problems"] for p in probs] == [4, 4, 4, 4, 2, 2]

    saved = json.loads(collect.summary_path(out).read_text())
    assert saved["kind"] == collect.SUMMARY_KIND and saved["config"]["n"] == 3
    assert saved["problems"] == 6 and saved["traces"] == 18
    n_correct = sum(t.correct for p in probs for t in p.traces)
    assert saved["sample_accuracy"] == round(n_correct / 18, 4)
    assert saved["pass_at_n"] == round(sum(any(t.correct for t in p.traces) for p in probs) / 6, 4)
    assert saved["tokens_total"] == sum(t.num_tokens for p in probs for t in p.traces)
    assert saved["this_run"]["traces_generated"] == 18  # this run generated every trace, so
    assert saved["this_run"]["output_tokens"] == saved["tokens_total"]  # also every token
    assert summary["sample_accuracy"] == saved["sample_accuracy"]


@pytest.mark.vllm
def test_resume_after_a_partial_last_line(collect_tiny_run, tiny_model_path, collect_tiny_llm, tmp_path):
    config, _, done = collect_tiny_run
    out = tmp_path / "traces.jsonl"
    lines = _lines(done)
    # A run killed while writing problem 5: problems 0-3 complete, half a line of problem 4.
    out.write_text("".join(lines[:5]) + lines[5][: len(lines[5]) // 2], encoding="utf-8")
    summary = collect.run(config.replace(output=str(out)), llm=collect_tiny_llm)
    assert summary["this_run"]["traces_generated"] == 2 * 3  # only problems 4 and 5 were generated
    new = _lines(out)
    assert new[:5] == lines[:5]  # finished problems kept byte for byte
    ids = [json.loads(line)["problem_id"] for line in new[1:]]
    assert sorted(ids) == sorted(json.loads(line)["problem_id"] for line in lines[1:]) and len(set(ids)) == 6
    assert summary["problems"] == 6 and summary["traces"] == 18


class _DiesMidChunk:
    """The real engine, but its steps hand back one finished problem at a time, and the
    process 'dies' (raises) once ``after`` problems came back: a kill while the rest of the
    chunk is still generating."""

    def __init__(self, llm, after: int):
        self.llm, self.after, self.handed, self._ready = llm, after, 0, []
        self.llm_engine = self  # collect steps through llm.llm_engine
        self.output_processor = llm.llm_engine.output_processor

    def enqueue(self, *args, **kwargs):
        return self.llm.enqueue(*args, **kwargs)

    def has_unfinished_requests(self):
        return bool(self._ready) or self.llm.llm_engine.has_unfinished_requests()

    def step(self):
        if self.handed == self.after:
            raise KeyboardInterrupt
        while not self._ready and self.llm.llm_engine.has_unfinished_requests():
            self._ready = [o for o in self.llm.llm_engine.step() if o.finished]
        self.handed += 1
        return [self._ready.pop(0)] if self._ready else []

    def abort_request(self, ids, internal=False):
        self.llm.llm_engine.abort_request(ids, internal=internal)


@pytest.mark.vllm
def test_interrupted_run_resumes_without_redoing(tiny_model_path, collect_tiny_llm, tmp_path):
    """Killed in its second chunk after one of the chunk's problems finished: that problem is
    on disk with the first chunk's, the engine holds no request, the rerun does the rest."""
    out = tmp_path / "traces.jsonl"
    spec = "builtin:n=5,seed=2"
    config = _config(tiny_model_path, out, chunk_size=3, problems=spec)
    with pytest.raises(KeyboardInterrupt):
        collect.run(config, llm=_DiesMidChunk(collect_tiny_llm, after=4))
    assert not collect_tiny_llm.llm_engine.has_unfinished_requests()  # the rest of the chunk was aborted
    first = _lines(out)
    assert len(first) == 1 + 4  # header + the first chunk's three problems + one of the second's
    assert all(line.endswith("\n") and json.loads(line) for line in first)
    summary = collect.run(config, llm=collect_tiny_llm)
    assert summary["this_run"]["traces_generated"] == 1 * 3  # only the missing problem
    lines = _lines(out)
    assert lines[:5] == first  # finished problems unchanged, byte for byte
    ids = [json.loads(line)["problem_id"] for line in lines[1:]]
    assert len(ids) == len(set(ids)) == 5
    assert sorted(ids) == sorted(p.problem_id for p in load_problem_source(spec))


@pytest.mark.vllm
def test_a_larger_limit_extends_the_file(tiny_model_path, collect_tiny_llm, tmp_path):
    out = tmp_path / "traces.jsonl"
    config = _config(tiny_model_path, out, n=2, problems="builtin:n=5,seed=4")
    assert collect.run(config.replace(limit=2), llm=collect_tiny_llm)["problems"] == 2
    first = _lines(out)
    summary = collect.run(config.replace(limit=4), llm=collect_tiny_llm)
    assert summary["this_run"]["traces_generated"] == 2 * 2 and summary["problems"] == 4
    assert _lines(out)[:3] == first


@pytest.mark.vllm
def test_rerun_of_a_finished_file_needs_no_engine(collect_tiny_run, tmp_path):
    config, summary, done = collect_tiny_run
    out = tmp_path / "traces.jsonl"
    shutil.copy(done, out)
    again = collect.run(config.replace(output=str(out)), llm=None)  # would start an engine if it had work
    assert again["this_run"]["traces_generated"] == 0
    assert again["sample_accuracy"] == summary["sample_accuracy"] and out.read_bytes() == done.read_bytes()


@pytest.mark.vllm
def test_resume_refuses_another_config_or_problem_set(collect_tiny_run, tmp_path):
    config, _, done = collect_tiny_run
    out = tmp_path / "traces.jsonl"
    shutil.copy(done, out)
    with pytest.raises(ArtifactMismatch, match="n=3.*n=4"):
        collect.run(config.replace(output=str(out), n=4))
    with pytest.raises(ArtifactMismatch, match="temperature"):
        collect.run(config.replace(output=str(out), temperature=0.2))
    with pytest.raises(StepprobeError, match="limit"):
        collect.run(config.replace(output=str(out), limit=2))


@pytest.mark.vllm
def test_engine_of_another_model_is_refused(collect_tiny_llm, default_model_path, tmp_path):
    config = collect.Config(model=default_model_path, problems="builtin:n=2", n=1, max_tokens=4,
                            output=str(tmp_path / "t.jsonl"))
    with pytest.raises(StepprobeError, match="serves"):
        collect.run(config, llm=collect_tiny_llm)


@pytest.mark.vllm
@pytest.mark.e2e
def test_end_to_end_on_the_default_model(collect_default_llm, default_model_path, tmp_path):
    out = tmp_path / "traces.jsonl"
    config = collect.Config(problems="builtin:n=4,seed=5", n=4, max_tokens=96, output=str(out), chunk_size=4,
                            max_model_len=512, dtype="float32")
    summary = collect.run(config, llm=collect_default_llm)
    header, probs = read_traces(out)
    probs = list(probs)
    assert header["model"]["name"] == "smollm2-135m" and header["model"]["num_hidden_layers"] == 30
    assert len(probs) == 4 and all(len(p.traces) == 4 for p in probs)
    traces = [t for p in probs for t in p.traces]
    assert all(t.text.strip() for t in traces)
    # The instruction asks for "The answer is ..."; the default model follows it most of the time.
    assert sum(t.extracted_answer is not None for t in traces) >= 4
    assert summary["traces"] == 16 and 0 <= summary["sample_accuracy"] <= 1


@pytest.mark.parametrize("cfg, message", [
    ({"n": 0}, "n must be at least 1"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"top_p": 0}, "top_p"),
    ({"problems": "/nonexistent/set.jsonl"}, "problem file not found"),
    ({"problems": "builtin:n=x"}, "must be an integer"),
])
def test_bad_config_is_a_one_line_error(cfg, message, tmp_path):
    with pytest.raises(StepprobeError, match=message):
        collect.run(collect.Config(output=str(tmp_path / "t.jsonl"), **cfg))


def test_cli_help_and_error(capsys):
    from stepprobe.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["collect", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--chunk-size" in out and "--answer-instruction" in out and "builtin" in out
    assert main(["collect", "--problems", "/nonexistent/set.jsonl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "problem file not found" in err[0]


def test_config_file_section(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text("collect:\n  n: 3\n  problems: builtin:n=10\n  temperature: 0.5\nrecord:\n  layers: all\n")
    cfg = collect.Config.from_file(path, n=5)
    assert (cfg.n, cfg.problems, cfg.temperature) == (5, "builtin:n=10", 0.5)


def test_default_output_is_under_runs_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("STEPPROBE_HOME", str(tmp_path))
    out = collect.default_output(collect.Config())
    assert out == tmp_path / "runs" / "collect" / "smollm2-135m_builtin_n8_s0" / "traces.jsonl"
