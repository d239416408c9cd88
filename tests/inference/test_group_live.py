"""A group scorer live (issue 23 item 3): trained by `stepprobe train` on `record`'s group
features of tiny-model traces, it scores the same live (the worker's group assembler, through
stepprobe's runner, nothing pruned) as offline (`record` of the very traces the engine
generated, `compute_feature` with the scorer's standardization); and it drives the memory
policy end to end. One in-process engine for the module."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.engine_modes import in_process_engines

pytestmark = pytest.mark.vllm

FEATURE = "layer_01.group"
WORDS = (" one", " two")  # with "\n" and "\n\n": the four tokens every trace here is made of
N = 4


def _tokens(tok, nl: int, nlnl: int) -> list[int]:
    ids = [nl, nlnl] + [tok(w, add_special_tokens=False)["input_ids"][0] for w in WORDS]
    assert len(set(ids)) == 4
    return ids


def _write_traces(path: Path, model: str, tok, problems: list[tuple[str, list[list[int]], list[bool]]]) -> Path:
    """A collect traces file holding exactly these token ids (no re-tokenizing of decoded text)."""
    from transformers import AutoConfig

    from stepprobe.data_collection.traces import ProblemTraces, Trace, make_header
    from stepprobe.provenance import model_identity

    lines = [json.dumps(make_header({"test": "group-live"}, model_identity(model, AutoConfig.from_pretrained(model), tok)))]
    for k, (prompt, traces, correct) in enumerate(problems):
        lines.append(json.dumps(ProblemTraces(
            problem_id=f"p{k:02d}", question=prompt, gold="1", prompt_text=prompt,
            prompt_token_ids=tok(prompt)["input_ids"],
            traces=[Trace(sample_index=i, output_token_ids=list(ids), text=tok.decode(ids), finish_reason="length",
                          num_tokens=len(ids), extracted_answer="1", correct=bool(c))
                    for i, (ids, c) in enumerate(zip(traces, correct))]).to_dict()))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _record(traces: Path, model: str) -> Path:
    from stepprobe.data_collection import record

    return record.run(record.Config(traces=str(traces), output=str(traces.with_suffix(".h5")), model=model,
                                    dtype="float32", storage_dtype="float32"))


@pytest.fixture(scope="module")
def group_case(tmp_path_factory, tiny_model_path, helpers):
    """(runner, scorer path, the four tokens): a group scorer trained on recorded tiny-model traces
    (16 problems x 4 traces of the four tokens; a trace is 'correct' when it wrote more " one"
    than " two"), and an eager engine with it."""
    from transformers import AutoTokenizer

    from stepprobe.inference.plugin import PluginSettings
    from stepprobe.inference.runner import StepRunner
    from stepprobe.training import train

    tmp = tmp_path_factory.mktemp("group-live")
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    ids = _tokens(tok, helpers.NL, helpers.NLNL)
    rng = np.random.default_rng(0)
    problems = []
    for k in range(16):
        traces = [rng.choice(ids, size=int(rng.integers(20, 40))).tolist() for _ in range(N)]
        correct = [t.count(ids[2]) > t.count(ids[3]) for t in traces]
        correct[:2] = [True, False]  # both outcomes in every problem
        problems.append((f"Question {k}: count the words.", traces, correct))
    h5 = _record(_write_traces(tmp / "train.jsonl", tiny_model_path, tok, problems), tiny_model_path)
    run_dir = train.run(train.Config(data=str(h5), sites=FEATURE, out=str(tmp / "train"), max_epochs=5, plots=False,
                                     progress=False, calibration="none"))
    scorer = str(run_dir / "scorer")
    settings = PluginSettings(scorer=scorer, policy="none", keep_records=True, max_accuracy_loss=None, min_live=1)
    with in_process_engines():
        runner = StepRunner(tiny_model_path, settings, seed=0, dtype="float32", max_model_len=256,
                            num_kv_blocks=helpers.NUM_KV_BLOCKS, enforce_eager=True)
        try:
            yield runner, scorer, ids, tmp
        finally:
            runner.close()


def test_a_group_scorer_scores_the_same_live_as_offline(group_case, tiny_model_path):
    """Every live step score equals the offline score of the recorded row at the same (trace,
    position) (fp32 features of vLLM vs transformers: within 1e-4), and the scores are not a
    constant: rows see siblings at their own positions (time alignment). The traces decode in
    lockstep (a trace scheduled later, e.g. for want of KV blocks, would see its siblings only as
    far as they were captured: the documented live/offline difference)."""
    import torch

    from stepprobe.data_collection.hdf5 import HiddenStates
    from stepprobe.probes import group_features as G
    from stepprobe.probes.checkpoint import load_scorer

    runner, scorer_path, ids, tmp = group_case
    prompts = ["Parity check: one."]  # 4 traces of one KV block each: all decode together (7 blocks)
    bias = {t: 100.0 for t in ids}
    results = runner.generate(prompts, n=N, max_tokens=60, temperature=1.0, policy="none", logit_bias=bias)
    problems = [(p, [t.token_ids for t in res], [i % 2 == 0 for i in range(N)]) for p, res in zip(prompts, results)]
    h5 = _record(_write_traces(tmp / "live.jsonl", tiny_model_path, runner.tokenizer, problems), tiny_model_path)
    hs = HiddenStates(h5)
    scorer = load_scorer(scorer_path)
    read = lambda s: np.asarray(hs.features(s), dtype=np.float32)  # noqa: E731
    feats = G.compute_feature(hs, FEATURE, read, stats=scorer.group_stats()["layer_01"])
    offline = scorer.module(torch.as_tensor(feats)[:, None]).detach().numpy()
    st = hs.steps
    t_prob, t_sample = np.asarray(hs.traces["problem"]), np.asarray(hs.traces["sample_index"])
    row = {(int(t_prob[t]), int(t_sample[t]), int(p)): i
           for i, (t, p) in enumerate(zip(np.asarray(st["trace"]), np.asarray(st["position"])))}
    live, off, visible = [], [], []
    for k, res in enumerate(results):
        assert all(len(t.token_ids) == 60 and t.num_preemptions == 0 for t in res)  # lockstep, to max_tokens
        for t in res:
            assert t.step_positions, "a forced trace has boundaries"
            for p, s in zip(t.step_positions, t.step_scores):
                i = row[(k, t.index, p)]
                live.append(s)
                off.append(offline[i])
                visible.append(feats[i, 5])
    live, off = np.asarray(live), np.asarray(off)
    assert len(live) >= 20 and np.ptp(off) > 1e-3 and max(visible) == 1.0 and min(visible) < 1.0
    assert np.abs(live - off).max() < 1e-4, (np.abs(live - off).max(), np.flatnonzero(np.abs(live - off) >= 1e-4))


def test_memory_pruning_runs_on_group_scores(group_case, helpers):
    """Under KV pressure (7 blocks of 128 tokens for 8 traces that each need 2) the memory policy
    prunes on the group scores instead of preempting, and keeps a live trace in every problem."""
    runner, _, ids, _ = group_case
    bias = {t: 100.0 for t in ids}
    pre = runner.preemptions()
    results = runner.generate(["Memory one.", "Memory two."], n=N, max_tokens=200, temperature=1.0, policy="memory",
                              logit_bias=bias)
    pruned = [t.pruned for res in results for t in res]
    assert sum(pruned) >= 2, pruned
    assert all(not all(t.pruned for t in res) for res in results)
    assert all(t.step_scores and np.isfinite(t.step_scores).all() for res in results for t in res)
    assert runner.preemptions() == pre
