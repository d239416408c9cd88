"""`stepprobe record`: boundaries and all-site vectors from traces, resume, shards, STEP import."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from stepprobe.boundaries import BoundaryDetector, BoundaryRule
from stepprobe.data_collection import record
from stepprobe.data_collection.hdf5 import HiddenStates
from stepprobe.data_collection.traces import read_traces
from stepprobe.errors import ArtifactMismatch, StepprobeError


def _run(traces, output, **kw):
    cfg = record.Config(traces=str(traces), output=str(output), commit_interval_s=0, **kw)
    return record.run(cfg)


@pytest.fixture(scope="module")
def record_fp32(record_traces, tmp_path_factory):
    """The small traces recorded one trace per forward pass, stored in float32."""
    out = tmp_path_factory.mktemp("rec") / "hs.h5"
    _run(record_traces, out, storage_dtype="float32", dtype="float32", batch_size=1)
    return out


def _direct(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids]), output_hidden_states=True).hidden_states


def test_recorded_vectors_equal_direct_forward(record_fp32, record_traces, tiny_model_path, record_detector):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    hs = HiddenStates(record_fp32)
    hs.validate()
    n = hs.num_layers
    assert hs.sites == ["embed"] + [f"layer_{i:02d}" for i in range(n)] + ["final_norm"]
    _, problems = read_traces(record_traces)
    t_idx = 0
    checked = 0
    for p_idx, prob in enumerate(problems):
        assert hs.problems["problem_id"][p_idx] == prob.problem_id and hs.problems["gold"][p_idx] == prob.gold
        for t in prob.traces:
            expected = record_detector.find(t.output_token_ids)
            rows = hs.trace_rows(t_idx)
            assert hs.traces["num_steps"][t_idx] == len(expected) == len(rows)
            assert hs.traces["finish_reason"][t_idx] == t.finish_reason
            assert hs.traces["label"][t_idx] == int(t.correct) and hs.traces["num_tokens"][t_idx] == t.num_tokens
            np.testing.assert_array_equal(hs.steps["position"][rows], expected)
            np.testing.assert_allclose(hs.steps["rel_position"][rows], np.arange(len(rows)) / max(len(rows), 1))
            assert (hs.steps["label"][rows] == int(t.correct)).all()
            if rows.size:
                ids = prob.prompt_token_ids + t.output_token_ids
                ref = _direct(model, ids)
                at = [len(prob.prompt_token_ids) + q for q in expected]
                pairs = [("embed", ref[0]), ("final_norm", ref[n])] + [(f"layer_{i:02d}", ref[i + 1]) for i in range(n - 1)]
                for site, h in pairs:  # exact, bit for bit
                    np.testing.assert_array_equal(hs.features(site, rows), h[0, at].numpy(), err_msg=site)
                last = torch.from_numpy(hs.features(f"layer_{n - 1:02d}", rows))
                assert not torch.equal(last, ref[n][0, at])  # the last layer is read before the final norm
                with torch.no_grad():
                    assert torch.equal(model.model.norm(last), ref[n][0, at])
                checked += 1
            t_idx += 1
    assert t_idx == hs.num_traces == 12 and checked == 9
    # The traces cover: no boundary at all, a trace cut at max_tokens, "\n\n" split in two tokens.
    assert 0 in hs.traces["num_steps"] and "length" in set(hs.traces["finish_reason"])


def test_prompt_side_breaks_not_counted(record_fp32, record_traces, record_detector):
    hs = HiddenStates(record_fp32)
    _, problems = read_traces(record_traces)
    prob = next(problems)
    assert "\n\n" in prob.prompt_text
    full = record_detector.find(prob.prompt_token_ids + prob.traces[0].output_token_ids)
    gen = record_detector.find(prob.traces[0].output_token_ids)
    assert len(full) > len(gen) == hs.traces["num_steps"][0]
    assert hs.steps["position"].max() < hs.traces["num_tokens"].max()


def test_header_attributes(record_fp32, record_traces, tiny_model_path):
    hs = HiddenStates(record_fp32)
    h = hs.header
    assert h["complete"] and h["layout"] == "single" and h["storage_dtype"] == "float32"
    assert h["config"]["collect"] == read_traces(record_traces)[0]["config"]
    assert h["config"]["record"]["batch_size"] == 1 and h["config"]["record"]["compute_dtype"] == "float32"
    assert hs.boundary_rule["delimiter"] == "\n\n" and len(hs.boundary_rule["token_ids"]) > 1
    assert hs.model["name"] == tiny_model_path and hs.model["num_hidden_layers"] == 2
    assert h["source"]["format"] == "stepprobe"


def test_batched_and_float16_match_unbatched(record_fp32, record_traces, tmp_path):
    out = _run(record_traces, tmp_path / "b.h5", batch_size=4, max_batch_tokens=4096)
    a, b = HiddenStates(record_fp32), HiddenStates(out)
    assert b.storage_dtype == "float16" and b.num_steps == a.num_steps
    for key in ("trace", "problem", "step", "position", "label"):
        np.testing.assert_array_equal(a.steps[key], b.steps[key])
    for site in a.sites:
        x, y = a.features(site), b.features(site)
        np.testing.assert_allclose(y, x, rtol=2e-3, atol=2e-3 * np.abs(x).max())


def test_rerun_is_a_no_op_and_overwrite_is_explicit(record_traces, tmp_path, caplog):
    out = _run(record_traces, tmp_path / "hs.h5")
    stamp = os.stat(out).st_mtime_ns
    with caplog.at_level("INFO"):
        _run(record_traces, out)
    assert os.stat(out).st_mtime_ns == stamp and "nothing to do" in caplog.text
    with pytest.raises(ArtifactMismatch, match="dtype"):
        _run(record_traces, out, dtype="bfloat16")
    _run(record_traces, out, dtype="bfloat16", overwrite=True)
    assert HiddenStates(out).header["config"]["record"]["compute_dtype"] == "bfloat16"


def test_shards_then_merge_equal_one_run(record_traces, tmp_path):
    full = HiddenStates(_run(record_traces, tmp_path / "full.h5", batch_size=1))
    outs = [_run(record_traces, tmp_path / "hs.h5", batch_size=1, shard=f"{i}/2") for i in range(2)]
    assert [o.name for o in outs] == ["hs.shard-0-of-2.h5", "hs.shard-1-of-2.h5"]
    assert [HiddenStates(o).num_problems for o in outs] == [2, 1]
    merged = HiddenStates(record.run(record.Config(merge=[str(o) for o in outs], output=str(tmp_path / "m.h5"))))
    merged.validate()
    assert merged.num_steps == full.num_steps and sorted(merged.problems["problem_id"]) == list(full.problems["problem_id"])
    for pid in full.problems["problem_id"]:
        rf = np.flatnonzero(full.problems["problem_id"][full.steps["problem"]] == pid)
        rm = np.flatnonzero(merged.problems["problem_id"][merged.steps["problem"]] == pid)
        np.testing.assert_array_equal(full.features("layer_01", rf), merged.features("layer_01", rm))
    with pytest.raises(StepprobeError, match="i/k"):
        _run(record_traces, tmp_path / "x.h5", shard="2")


def test_step_format_import(tmp_path, tiny_model_path, record_detector):
    from transformers import AutoTokenizer

    lines = [
        {"question": "What is 2 + 2?", "response": "<think>\nTwo plus two.\n\nThat is 4.\n</think>\n\n\\boxed{4}",
         "ground_truth": "4", "extracted_answer": "4"},
        {"question": "What is 2 + 2?", "response": "<think>\nHmm.\n\nFive?\n</think>\n\n\\boxed{5}",
         "ground_truth": "4", "extracted_answer": "5"},
        {"question": "Name 3 * 3.", "response": "<think>nine</think> 9", "ground_truth": "9",
         "extracted_answer": "9", "correct": False},  # an explicit label wins over grading
    ]
    src = tmp_path / "step.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = _run(src, tmp_path / "hs.h5", model=tiny_model_path, storage_dtype="float32", batch_size=1)
    hs = HiddenStates(out)
    assert hs.header["source"]["format"] == "step" and hs.num_problems == 2 and hs.num_traces == 3
    assert list(hs.traces["label"]) == [1, 0, 0] and list(hs.traces["sample_index"]) == [0, 1, 0]
    assert all(p.startswith("step-") for p in hs.problems["problem_id"]) and hs.problems["gold"][1] == "9"
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    for t, line in enumerate(lines):
        ids = tok(line["response"], add_special_tokens=False)["input_ids"]
        np.testing.assert_array_equal(hs.steps["position"][hs.trace_rows(t)], record_detector.find(ids))
        assert hs.traces["num_tokens"][t] == len(ids)
    assert list(hs.traces["num_steps"]) == [2, 2, 0]
    with pytest.raises(StepprobeError, match="not a STEP trace line"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"question": "x"}) + "\n")
        _run(bad, tmp_path / "bad.h5", model=tiny_model_path, input_format="step")


def test_step_format_import_with_the_papers_rule(tmp_path, tiny_model_path):
    """--boundary-rule step-paper: the paper's segmentation (own-text "\\n\\n", nothing after </think>)."""
    from transformers import AutoTokenizer

    from stepprobe.boundaries import step_paper_rule
    from stepprobe.step_paper import STEP_SYSTEM_PROMPT

    lines = [{"question": "What is 2 + 2?", "ground_truth": "4", "extracted_answer": "4",
              "response": "<think>\nTwo plus two.\n\nThat is 4.\n\nYes.\n</think>\n\nSo.\n\n\\boxed{4}"},
             {"question": "What is 2 + 2?", "ground_truth": "4", "extracted_answer": "5",
              "response": "<think>\nHmm.\n\n\n\nFive?\n\n</think>\n\n\\boxed{5}"}]
    src = tmp_path / "step.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = _run(src, tmp_path / "hs.h5", model=tiny_model_path, storage_dtype="float32", batch_size=1,
               boundary_rule="step-paper", system_prompt=STEP_SYSTEM_PROMPT)
    hs = HiddenStates(out)
    assert {k: hs.boundary_rule[k] for k in ("delimiter", "mode", "end_text")} == step_paper_rule().to_dict()
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    paper = BoundaryDetector.from_tokenizer(step_paper_rule(), tok)
    default = BoundaryDetector.from_tokenizer(BoundaryRule(), tok)
    for t, line in enumerate(lines):
        head, _, tail = line["response"].partition("</think>")  # the paper tokenizes the text before </think> alone
        ids = tok(head, add_special_tokens=False)["input_ids"] + tok("</think>" + tail, add_special_tokens=False)["input_ids"]
        got = list(hs.steps["position"][hs.trace_rows(t)])
        assert got == paper.find(ids)
        end = tok.decode(ids).index("</think>")
        assert all(len(tok.decode(ids[:p + 1])) <= end + 1 for p in got)  # nothing after </think>
        assert len(default.find(ids)) > len(got)  # the default also counts the answer's blank lines
    assert hs.num_steps > 0
    with pytest.raises(StepprobeError, match="unknown boundary rule 'paper'"):
        _run(src, tmp_path / "x.h5", model=tiny_model_path, boundary_rule="paper")
    with pytest.raises(StepprobeError, match="step-paper boundary rule splits"):
        _run(src, tmp_path / "y.h5", model=tiny_model_path, boundary_rule="step-paper", delimiter="Step ")


def test_cli_help_and_one_line_errors(capsys, tmp_path):
    from stepprobe.cli import main

    with pytest.raises(SystemExit):
        main(["record", "--help"])
    out = capsys.readouterr().out
    assert "--shard" in out and "--merge" in out and "--storage-dtype" in out
    assert main(["record", "--traces", str(tmp_path / "none.jsonl")]) == 2
    assert "traces file not found" in capsys.readouterr().err
    (tmp_path / "x.jsonl").write_text('{"a": 1}\n')
    assert main(["record", "--traces", str(tmp_path / "x.jsonl")]) == 2
    assert "neither collect's traces" in capsys.readouterr().err


def test_killed_record_resumes_without_duplicates(tmp_path, tiny_model_path, record_detector, record_make_traces):
    """SIGKILL `stepprobe record` mid-run, read the file it left, rerun, compare counts."""
    traces = record_make_traces(tmp_path / "traces.jsonl", tiny_model_path, num_problems=24)
    out = tmp_path / "hs.h5"
    cmd = [sys.executable, "-m", "stepprobe.cli", "record", "--traces", str(traces), "--output", str(out),
           "--batch-size", "1", "--commit-interval-s", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    seen = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists():
            try:
                seen = HiddenStates(out).num_problems
            except StepprobeError:
                pass
            if seen >= 3:
                break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert seen >= 3, "the run ended before it could be killed"
    partial = HiddenStates(out)
    partial.validate()
    assert partial.layout == "parts" and not partial.complete and 3 <= partial.num_problems < 24
    from stepprobe.cli import main

    assert main(cmd[3:]) == 0  # the same command again (in-process, to save an interpreter start)
    hs = HiddenStates(out)
    hs.validate()
    _, problems = read_traces(traces)
    expected_steps = sum(len(record_detector.find(t.output_token_ids)) for p in problems for t in p.traces)
    assert hs.complete and hs.num_problems == 24 and hs.num_traces == 96 and hs.num_steps == expected_steps
    assert list(hs.problems["problem_id"]) == [f"p{i:03d}" for i in range(24)]


def test_step_mean_equals_mean_of_direct_forward(record_traces, tiny_model_path, record_detector, tmp_path):
    """``--step-mean`` stores, per boundary, the mean of the site over the step's tokens (from
    the token after the previous boundary, or the first generated token, to the boundary)."""
    import torch
    from transformers import AutoModelForCausalLM

    out = _run(record_traces, tmp_path / "hs.h5", storage_dtype="float32", dtype="float32", batch_size=3,
               step_mean="embed,0")
    hs = HiddenStates(out)
    hs.validate()
    assert hs.mean_sites == ["embed", "layer_00"] and "layer_00.mean" in hs.feature_names
    assert hs.header["config"]["record"]["step_mean"] == "embed,0"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    _, problems = read_traces(record_traces)
    t_idx = checked = 0
    for prob in problems:
        for t in prob.traces:
            rows = hs.trace_rows(t_idx)
            t_idx += 1
            if not rows.size:
                continue
            ref = _direct(model, prob.prompt_token_ids + t.output_token_ids)
            n0 = len(prob.prompt_token_ids)
            pos = [n0 + q for q in record_detector.find(t.output_token_ids)]
            starts = [n0] + [q + 1 for q in pos[:-1]]
            for site, h in (("embed", ref[0]), ("layer_00", ref[1])):
                want = np.stack([h[0, a:b + 1].mean(0).numpy() for a, b in zip(starts, pos)])
                np.testing.assert_allclose(hs.features(f"{site}.mean", rows), want, rtol=1e-4, atol=1e-4)
                # the boundary token alone differs from the mean whenever a step has several tokens
                assert not np.allclose(hs.features(site, rows), want)
            checked += 1
    assert checked == 9
    with pytest.raises(ArtifactMismatch, match="step_mean"):
        _run(record_traces, out, storage_dtype="float32", dtype="float32", batch_size=3)


def test_a_file_of_other_traces_settings_is_refused_before_the_model_loads(record_traces, tmp_path):
    """The resume settings (collect's config and record.RESUME_KEYS) are compared in one place, on the
    existing file, before the model loads; the file stays as it was."""
    traces = tmp_path / "traces.jsonl"
    lines = record_traces.read_text().splitlines(keepends=True)
    traces.write_text("".join(lines))
    out = _run(traces, tmp_path / "hs.h5")
    stamp = os.stat(out).st_mtime_ns
    header = json.loads(lines[0])
    header["config"] = {**header.get("config", {}), "temperature": 1.25}
    traces.write_text(json.dumps(header) + "\n" + "".join(lines[1:]))
    with pytest.raises(ArtifactMismatch, match="collect"):
        _run(traces, out, device="no-such-device")  # would fail when the model loads
    assert os.stat(out).st_mtime_ns == stamp
    assert set(record.RESUME_KEYS) <= set(record.Config.__dataclass_fields__)
