"""Through real vLLM (compiled default mode) on the tiny random model with a planted scorer."""

from __future__ import annotations

import pytest
from helpers.parity import assert_live_equals_recorder

pytestmark = pytest.mark.vllm


def _sp(**kw):
    from vllm import SamplingParams

    return SamplingParams(**kw)


def _records(runner):
    return runner._take_records()


def _engine_ids(key: str, ext_ids: set[str], n: int) -> tuple[str, int] | None:
    """Engine request id -> (client request id, child index). vLLM appends ``-<8 chars>`` to a
    client id and names the children of an ``n > 1`` request ``{index}_{parent}``."""
    import re

    index = 0
    rest = key
    if n > 1:
        m = re.match(r"^(\d+)_(.+)$", key)
        if not m:
            return None
        index, rest = int(m.group(1)), m.group(2)
    if rest in ext_ids:
        return rest, index
    base = rest.rsplit("-", 1)[0]
    return (base, index) if base in ext_ids else None


def test_capture_counts_equal_boundary_counts(plugin_runner):
    """Every boundary the engine can see is captured once, at its position: for the runner's
    single-trace requests and for the children of a raw ``n > 1`` vLLM request."""
    from stepprobe.boundaries import BoundaryDetector, BoundaryRule
    from stepprobe.inference.runner import captured_boundaries

    det = BoundaryDetector.from_tokenizer(BoundaryRule(), plugin_runner.tokenizer)
    prompts = ["Hello there", "What is 2+2? Think."]
    bias = {198: 100.0, 1116: 99.0}
    results = plugin_runner.generate(prompts, n=3, max_tokens=48, temperature=1.0, policy="none", logit_bias=bias)
    total = 0
    for prompt_traces, prompt in zip(results, prompts):
        assert [t.index for t in prompt_traces] == [0, 1, 2]
        plen = len(plugin_runner.tokenizer(prompt)["input_ids"])
        for t in prompt_traces:
            # Generated-token positions (0 = first generated token), as in the HDF5 file.
            expected = captured_boundaries(det, t.token_ids)
            assert t.step_positions == expected
            assert len(t.step_scores) == len(expected)
            assert not t.pruned
            total += len(expected)
    assert total > 10, "the forced newlines should give many boundaries"

    # A raw n=3 request: vLLM fans it out into children "{i}_{id}"; each child is captured.
    outs = plugin_runner.llm.generate(prompts, _sp(n=3, max_tokens=48, temperature=1.0, logit_bias=bias,
                                                   extra_args={"stepprobe": {"policy": "none"}}), use_tqdm=False)
    records = _records(plugin_runner)
    ids = {o.request_id for o in outs}
    by_child = {_engine_ids(k, ids, 3): r["positions"] for k, r in records.items()}
    for o, prompt in zip(outs, prompts):
        assert len(o.outputs) == 3  # children aggregated into one request output
        plen = len(plugin_runner.tokenizer(prompt)["input_ids"])
        for c in o.outputs:
            assert by_child[(o.request_id, c.index)] == [plen + i for i in captured_boundaries(det, c.token_ids)]


def test_parity_with_recorder_features_fp32(plugin_runner, tiny_model_path, planted_scorer, helpers):
    """The runner's features are the recorder's (transformers) features; same scores."""
    assert_live_equals_recorder(plugin_runner, tiny_model_path, planted_scorer, helpers.SITES, nl=helpers.NL,
                                nlnl=helpers.NLNL, label="tp1")


def test_memory_policy_prunes_the_planted_low_trace(plugin_runner, helpers):
    h = helpers
    """Under KV pressure the low-scoring trace is finished as pruned; no one is preempted."""
    tok = plugin_runner.tokenizer
    bs = plugin_runner.llm.llm_engine.vllm_config.cache_config.block_size
    prompts = ["Good one.", "Good two.", "Good three.", "Bad one."]
    plen = max(len(tok(p)["input_ids"]) for p in prompts)
    max_tokens = bs + bs // 2  # every trace needs a second block on the way
    per = h.blocks_for(plen + max_tokens, bs)
    assert 3 * per <= h.NUM_KV_BLOCKS < 4 * per, "test sizing: four traces must not fit, three must"
    group = {"stepprobe": {"policy": "memory", "group": "g"}}
    params = [_sp(max_tokens=max_tokens, temperature=1.0, logit_bias=h.good_bias(), extra_args=group)
              for _ in range(3)]
    params.append(_sp(max_tokens=max_tokens, temperature=1.0, logit_bias=h.bad_bias(), extra_args=group))
    pre = plugin_runner.preemptions()
    outs = plugin_runner.llm.generate(prompts, params, use_tqdm=False)
    _records(plugin_runner)
    assert plugin_runner.preemptions() == pre
    stops = [o.outputs[0].stop_reason for o in outs]
    assert stops == [None, None, None, "pruned"]
    bad = outs[3].outputs[0]
    assert 0 < len(bad.token_ids) < max_tokens  # partial text comes back
    assert bad.finish_reason == "stop"
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs[:3])

    # The same load without pruning preempts (that is what memory pruning replaced).
    none = {"stepprobe": {"policy": "none"}}
    params = [_sp(max_tokens=max_tokens, temperature=1.0, logit_bias=h.good_bias(), extra_args=none) for _ in range(3)]
    params.append(_sp(max_tokens=max_tokens, temperature=1.0, logit_bias=h.bad_bias(), extra_args=none))
    pre = plugin_runner.preemptions()
    outs = plugin_runner.llm.generate(prompts, params, use_tqdm=False)
    _records(plugin_runner)
    assert plugin_runner.preemptions() > pre
    assert all(o.outputs[0].stop_reason is None for o in outs)


def test_per_trace_preemptions_add_up_to_the_engine_counter(plugin_runner, helpers):
    """The runner reports preemptions per trace (n > 1 included), and they add up to vLLM's own
    engine-wide counter."""
    bs = plugin_runner.llm.llm_engine.vllm_config.cache_config.block_size
    max_tokens = bs + bs // 2  # two blocks per trace: four traces do not fit in seven blocks
    pre = plugin_runner.preemptions()
    traces = plugin_runner.generate(["Preempt me."], n=4, max_tokens=max_tokens, temperature=1.0, policy="none",
                                    logit_bias=helpers.good_bias())[0]
    per_trace = [t.num_preemptions for t in traces]
    assert sum(per_trace) == plugin_runner.preemptions() - pre > 0, per_trace
    assert all(t.num_tokens == max_tokens and not t.pruned for t in traces)
    assert all(t.queued_s is not None and t.queued_s >= 0 for t in traces)


def test_threshold_and_top_fraction_prune_the_low_trace(plugin_runner, helpers):
    h = helpers
    prompts = ["Good A.", "Good B.", "Good C.", "Bad D."]
    for policy in ("threshold", "top_fraction"):
        extra = {"stepprobe": {"policy": policy, "group": f"tf-{policy}"}}
        params = [_sp(max_tokens=40, temperature=1.0, logit_bias=h.good_bias(), extra_args=extra) for _ in range(3)]
        params.append(_sp(max_tokens=40, temperature=1.0, logit_bias=h.bad_bias(), extra_args=extra))
        outs = plugin_runner.llm.generate(prompts, params, use_tqdm=False)
        _records(plugin_runner)
        assert [o.outputs[0].stop_reason for o in outs] == [None, None, None, "pruned"], policy
        # warm-up 2 steps (threshold) / ranked at step 3 (top_fraction): stopped early, not at once
        assert 2 <= len(outs[3].outputs[0].token_ids) < 40, policy


def test_runner_reports_pruned_traces_with_score_and_text(plugin_runner, helpers):
    h = helpers
    """Through StepRunner.generate: pruned traces carry their flag, score and partial text."""
    results = plugin_runner.generate(["Bad only."], n=2, max_tokens=30, temperature=1.0, policy="threshold",
                                     logit_bias=h.bad_bias())
    traces = results[0]
    # protect_last does not apply to threshold: both are low and both are pruned
    assert all(t.pruned for t in traces)
    for t in traces:
        assert t.score is not None and t.score < 0.01
        assert t.text and len(t.token_ids) < 30


def test_policy_none_equals_plain_vllm(plugin_runner, plain_llm):
    prompts = ["The capital of France is", "1 2 3 4", "Once upon a time"]
    sp = _sp(max_tokens=60, temperature=0.0)
    plain = plain_llm.generate(prompts, sp, use_tqdm=False)
    ours = plugin_runner.generate(prompts, n=1, max_tokens=60, temperature=0.0, policy="none")
    assert [list(o.outputs[0].token_ids) for o in plain] == [t[0].token_ids for t in ours]


def test_run_stage_results_summary_and_resume(plugin_runner, planted_scorer, tiny_model_path, tmp_path):
    import json

    from stepprobe.errors import ArtifactMismatch
    from stepprobe.inference import run as run_stage

    cfg = run_stage.Config(problems="builtin:n=3,seed=0", scorer=planted_scorer, model=tiny_model_path, n=2,
                           policy="memory", max_tokens=24, dtype="float32", vote="score", output=str(tmp_path / "r"),
                           batch_problems=2)
    out = run_stage.run(cfg, runner=plugin_runner)
    lines = (out / "results.jsonl").read_text().splitlines()
    header, recs = json.loads(lines[0]), [json.loads(x) for x in lines[1:]]
    assert header["kind"] == "stepprobe-run-results" and len(recs) == 3
    for r in recs:
        assert r["kept"] + r["pruned"] == 2 and len(r["traces"]) == 2
        assert set(r["votes"]) == {"majority", "score", "confidence"}
        assert r["output_tokens"] == sum(t["num_tokens"] for t in r["traces"])
        assert isinstance(r["correct"], bool)
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert summary["problems"] == 3 and summary["traces"] == 6
    # resume: nothing left to do, same results; another config is refused
    steps = plugin_runner.llm.collective_rpc("stepprobe_info")[0]["steps_processed"]
    run_stage.run(cfg, runner=plugin_runner)
    assert (out / "results.jsonl").read_text().splitlines() == lines
    assert plugin_runner.llm.collective_rpc("stepprobe_info")[0]["steps_processed"] == steps  # nothing generated
    # killed mid-line (issue 24, defect 1): the resumed run cuts the torn line before it appends
    path = out / "results.jsonl"
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:len(lines[2]) // 2])
    run_stage.run(cfg, runner=plugin_runner)
    again = path.read_text().splitlines()
    assert again[:2] == lines[:2] and len(again) == 4
    assert sorted(json.loads(x)["problem_id"] for x in again[1:]) == sorted(r["problem_id"] for r in recs)
    with pytest.raises(ArtifactMismatch, match="different config"):
        run_stage.run(cfg.replace(n=3), runner=plugin_runner)


def _remove_capture_hooks(worker) -> int:
    cap = worker._stepprobe
    for handle in cap.handles:
        handle.remove()
    return len(cap.handles)


def test_self_check_stops_the_engine_when_the_hooks_do_not_fire(tiny_model_path, planted_scorer, helpers, capfd,
                                                                monkeypatch):
    """Without the capture hooks the first boundaries would be scored from stale buffers; the
    worker's self-check (on in every engine, the server included) stops the engine instead.
    An eager engine of its own: in eager mode removing the hooks really stops them firing. It
    runs in the test process (the check is the worker's; a multi-process engine would only add
    a start-up), so the worker's error reaches the test itself."""
    from stepprobe.inference.plugin import PluginSettings
    from stepprobe.inference.runner import StepRunner

    from helpers.engine_modes import in_process_engines

    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with a test function
    with in_process_engines():
        runner = StepRunner(tiny_model_path, PluginSettings(scorer=planted_scorer, policy="none", canary=False),
                            seed=0, dtype="float32", max_model_len=256, enforce_eager=True)
        try:
            assert runner.llm.collective_rpc(_remove_capture_hooks) == [3]
            with pytest.raises(Exception) as err:
                runner.generate(["Self check:"], n=1, max_tokens=16, temperature=1.0,
                                logit_bias=helpers.good_bias())
        finally:
            runner.close()
    captured = capfd.readouterr()
    assert "stepprobe self-check: " in str(err.value) + captured.out + captured.err, type(err.value)


def test_start_up_self_test_covers_mixed_and_wider_batches(plugin_runner):
    """Issue 22 defect 4: the self-test ran single-row decodes only; it now also runs a mixed
    batch (a prefill beside a decode) and two-row decodes, and every boundary is scored once."""
    got = plugin_runner.llm.collective_rpc("_stepprobe_self_test")[0]
    assert got["requests"] == 2 and got["mixed_steps"] >= 1 and got["max_decode_rows"] == 2, got
    assert got["captured"] == got["expected"] > 0, got
