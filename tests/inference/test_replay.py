"""stepprobe replay on a synthetic run whose table is computed by hand (see the comments)."""

from __future__ import annotations

import json

import pytest

from stepprobe.inference import replay as rp
from stepprobe.inference.deciders import vote_correct
from stepprobe.inference.kv_model import simulate
from stepprobe.inference.replay_data import Params, Problem, Trace, build_problems, load_bench, load_run, params_from
from stepprobe.inference.replay_report import live_markdown
from stepprobe.inference.replay_rows import admission_seqs, fewer_traces, live_check, replay, run_policy
from stepprobe.inference.run import RESULTS_KIND, RESULTS_SCHEMA_VERSION

PLEN = 10
RUN_CONFIG = {"policy": "none", "threshold": 0.5, "warmup_steps": 1, "keep_fraction": 0.5, "keep_step": 1,
              "aggregate": "mean", "confidence_window": 2, "confidence_percentile": 50.0, "confidence_warmup": 2}


def _trace(i, answer, correct, n, gens=(), scores=(), conf=None, stop=None):
    return {"index": i, "answer": answer, "correct": correct, "num_tokens": n, "pruned": False,
            "step_positions": list(gens), "step_scores": list(scores),
            "score": sum(scores) / len(scores) if scores else None, "confidence": conf,
            "token_confidence": stop or [], "stop_confidence": stop or []}


def synthetic_records():
    # Problem A (gold 1): two right, two wrong, 6 tokens each, one step at generated index 1.
    a = [_trace(0, "1", True, 6, [1], [0.9], 2.0, [2.0] * 6),
         _trace(1, "2", False, 6, [1], [0.1], 1.0, [2.0] * 6),
         _trace(2, "2", False, 6, [1], [0.2], 5.0, [2, 2, 1, 1, 2, 2]),
         _trace(3, "1", True, 6, [1], [0.8], 3.0, [2.0] * 6)]
    # Problem B (gold 7): t1's mean score is 0.52 after one step and 0.41 after two.
    b = [_trace(0, "5", False, 8, [2, 4], [0.6, 0.6], 1.0, [3.0] * 8),
         _trace(1, "7", True, 8, [2, 4], [0.52, 0.3], 3.0, [3.0] * 8),
         _trace(2, "7", True, 3, [], [], 0.5, [1.0] * 3),
         _trace(3, "5", False, 8, [2], [0.55], 2.5, [3.0] * 8)]
    return [{"problem_id": "A", "gold": "1", "prompt_tokens": PLEN, "pruned": 0, "traces": a},
            {"problem_id": "B", "gold": "7", "prompt_tokens": PLEN, "pruned": 0, "traces": b}]


def write_run(tmp_path, records, config=RUN_CONFIG, **header):
    d = tmp_path / "sc"
    d.mkdir()
    with open(d / "results.jsonl", "w") as fh:
        fh.write(json.dumps({"kind": RESULTS_KIND, "schema_version": RESULTS_SCHEMA_VERSION, "config": config,
                             **header}) + "\n")
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return d


# Hand-computed, unlimited KV (every trace runs from step 1; no preemption):
#   none (majority): A ties 2-2, the first-seen answer "1" wins (right); B ties 2-2, "5" wins (wrong).
#   memory (score vote, nothing to prune): A 1.7 vs 0.3 right; B "7" = 0.41 + 0.52 (t2 unscored votes
#     with the mean of the scored voters, (0.6 + 0.41 + 0.55) / 3) loses to "5" = 1.15: wrong.
#   threshold: A t1, t2 score < 0.5 after their step at g=1 -> flagged after step 2, 3 tokens;
#     B t1 falls to 0.41 at its second step (g=4) -> 6 tokens. B's vote: "5" 1.15 vs "7" 1.0: wrong.
#   top_fraction (keep 1/2 at step 1): A decided at step 2: t1, t2 lose -> 3 tokens.
#     B: t2 finishes at step 2; at step 3 t0 .6, t1 .52, t3 .55 keep 2 -> t1 cut at 4 tokens.
#   confidence (warm-up t0, t1; threshold = median of their confidences; window 2):
#     A thr 1.5: t2's window (1, 1) after token 3 -> 4 tokens. B thr 2.0: t2 window (1, 1) after
#     token 1 -> 2 tokens (of 3). Votes by confidence: A "1" 5.0 vs 1.0 right; B "5" 3.5 vs 3.0 wrong.
EXPECTED = {  # policy: (accuracy, output tokens, pruned)
    "none": (0.5, 51, 0), "memory": (0.5, 51, 0), "threshold": (0.5, 43, 3),
    "top_fraction": (0.5, 41, 3), "confidence": (0.5, 48, 2)}


def test_replay_reproduces_the_hand_computed_table(tmp_path):
    d = write_run(tmp_path, synthetic_records())
    out = rp.run(rp.Config(results=str(d), kv_blocks=[0], random_draws=6000, step_cost_tokens=64, votes=["score"]))
    data = rp.read_replay(out)
    rows = {r["policy"]: r for r in data["rows"] if r["vote"] != "majority" or r["policy"] == "none"}
    assert set(rows) == set(EXPECTED)
    for policy, (acc, tokens, pruned) in EXPECTED.items():
        r = rows[policy]
        assert (r["accuracy"], r["output_tokens"], r["pruned"], r["preemptions"]) == (acc, tokens, pruned, 0), policy
        # time model: 80 prompt tokens + every generated token but each trace's last; 8 steps
        # (the confidence baseline: A's second phase starts at step 7 when its warm-up ends,
        # B's at step 9; B's last trace ends at step 16).
        assert r["computed_tokens"] == 80 + tokens - 8
        assert r["steps"] == (16 if policy == "confidence" else 8)
    assert rows["none"]["time_ratio"] == 1.0
    assert rows["threshold"]["time_ratio"] == pytest.approx((8 * 64 + 115) / (8 * 64 + 123))
    assert rows["memory"]["vs_sc"]["diff"] == 0.0
    # Baselines for threshold: A prunes 2 of 4; oracle drops the two wrong traces (right);
    # random keeps one of the 6 pairs, 5 of which vote right -> 5/6. B prunes 1 of 4 at 6 tokens
    # (t2 has only 3, so drawing it prunes nothing; unscored t2 votes with the mean of the scored
    # voters): drop t0 -> "7" .41 + .48 vs .55 right; t1 -> "5" 1.15 vs .575 wrong; t2 -> all vote,
    # "7" .41 + .52 vs 1.15 wrong; t3 -> "7" .41 + .505 vs .6 right: random 2/4; oracle drops t0: right.
    th = rows["threshold"]
    assert th["oracle"]["accuracy"] == 1.0
    assert th["random"]["accuracy"] == pytest.approx((5 / 6 + 2 / 4) / 2, abs=0.02)
    md = (out / "replay.md").read_text()
    assert "| unlimited | threshold | score | 0.500 | +0.000" in md
    assert (out / "replay.png").is_file()


def test_memory_policy_on_a_tight_cache_by_hand():
    # One problem, 3-token prompt, 3 traces of 6 tokens, a step at generated index 0 (position 3,
    # scored once 4 tokens are computed, i.e. after step 2); 5 KV blocks of 4 tokens.
    recs = [{"problem_id": "M", "prompt_tokens": 3, "traces": [
        _trace(0, "1", True, 6, [0], [0.9]), _trace(1, "2", False, 6, [0], [0.2]),
        _trace(2, "1", True, 6, [0], [0.5])]}]
    for t in recs[0]["traces"]:
        t["step_positions"] = [0]
    problems = build_problems(recs)
    params = Params(0.5, 1, 0.5, 1, "mean", 0.3, 2, 50.0, 2)
    cfg = rp.Config(block_size=4, kv_blocks=[5], max_num_batched_tokens=100)
    # SC: step 3 needs a second block for each trace; 2 are free: t2 (last) is preempted,
    # readmitted after t0 and t1 finish at step 6 (recomputing 5 tokens), done at step 10.
    # Computed tokens: 9 + 3 + 2 + 2 + 2 + 2 + 5 + 1 + 1 + 1 = 28.
    sc = run_policy(problems, "none", 5, cfg, params)
    assert (sc.steps, sc.computed_tokens, sc.preemptions, sc.tokens) == (10, 28, 1, [[6, 6, 6]])
    # memory: at step 3 the running traces are sorted t0 (.9), t2 (.5), t1 (.2); t1 is the victim
    # and is pruned at 2 tokens instead of preempted; t0 and t2 finish at step 6.
    mem = run_policy(problems, "memory", 5, cfg, params)
    assert (mem.steps, mem.computed_tokens, mem.preemptions, mem.tokens) == (6, 20, 0, [[6, 2, 6]])
    assert mem.pruned == [[False, True, False]] and mem.correct == [True]


def test_fast_vote_equals_the_voting_module(tmp_path):
    from stepprobe.voting import Ballot, vote

    problems = build_problems(synthetic_records())
    for pr in problems:
        for mask in range(16):
            pruned = [bool(mask >> k & 1) for k in range(4)]
            for method in ("majority", "score", "confidence"):
                ballots = [Ballot(t.answer, p, t.score, t.confidence) for t, p in zip(pr.traces, pruned)]
                v = vote(ballots, method)
                expect = v.answer is not None and any(t.correct for t in pr.traces if t.answer == v.answer)
                assert vote_correct(pr, pruned, method) == expect


def test_replay_refuses_a_pruned_run_and_a_missing_file(tmp_path):
    from stepprobe.errors import StepprobeError

    recs = synthetic_records()
    recs[0]["pruned"] = 1
    d = write_run(tmp_path, recs)
    with pytest.raises(StepprobeError, match="not a self-consistency run"):
        rp.run(rp.Config(results=str(d)))
    with pytest.raises(StepprobeError, match="no run results"):
        rp.run(rp.Config(results=str(tmp_path / "nope")))


def test_live_check_compares_a_bench_trace_by_trace(tmp_path):
    import copy

    from stepprobe.inference.bench import BENCH_KIND, BENCH_SCHEMA_VERSION

    sc = synthetic_records()
    live = copy.deepcopy(sc)
    for rec, pruned in zip(live, ([1, 2], [1, 3])):  # the live engine pruned A's t1, t2 and B's t1, t3
        for t in rec["traces"]:
            t["pruned"] = t["index"] in pruned
        rec["correct"] = rec["problem_id"] == "A"
    for rec, ok in zip(sc, (True, False)):
        rec["correct"] = ok
    row = {"kv_blocks": 0, "accuracy": 0.5, "token_ratio": 1.0, "time_ratio": 1.0, "preemptions": 0}
    bench = {"kind": BENCH_KIND, "schema_version": BENCH_SCHEMA_VERSION,
             "config": {**RUN_CONFIG, "kv_blocks": [0], "policies": ["none", "threshold"]},
             "rows": [{**row, "policy": "none", "pruned": 0}, {**row, "policy": "threshold", "pruned": 4}],
             "problems": {"0/none": sc, "0/threshold": live}}
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "bench.json").write_text(json.dumps(bench))
    rows = live_check(rp.Config(), load_bench(tmp_path / "bench"))
    th = next(r for r in rows if r["policy"] == "threshold")
    # replay prunes A's t1, t2 and B's t1: 7 of 8 traces alike (B's t3 differs); both problems vote alike
    assert th["traces_pruned_alike"] == 7 / 8 and th["problems_voted_alike"] == 1.0
    assert th["replay"]["pruned"] == 3 and th["live"]["pruned"] == 4
    assert "| default | threshold | 0.500 / 0.500 |" in live_markdown(rows)


def test_relative_policy_and_min_live_by_hand(tmp_path):
    # relative (margin 0.15, warm-up 1): A's scores arrive after step 2: t1 (.1) and t2 (.2) are
    # more than .15 below the best other (.9, .8) -> cut at 3 tokens; t3 (.8 vs .9) is not.
    # B: after step 3, t0 .6, t1 .52, t3 .55 (t2 finished): none below .45; after step 5 t1's
    # mean is .41 -> cut at 6. The same cuts as threshold here: 43 tokens, 3 pruned.
    # With min_live 3: A keeps 3 of 4 (t1, the lowest, goes); B has 3 live at step 5 -> t1 stays.
    d = write_run(tmp_path, synthetic_records())
    problems = build_problems(load_run(d)[1])
    params = Params(0.5, 1, 0.5, 1, "mean", 0.3, 2, 50.0, 2, relative_margin=0.15)
    cfg = rp.Config(kv_blocks=[0])
    rel = run_policy(problems, "relative", 0, cfg, params)
    assert rel.pruned == [[False, True, True, False], [False, True, False, False]]
    assert sum(map(sum, rel.tokens)) == 43
    capped = run_policy(problems, "relative", 0, cfg, Params(**{**params.__dict__, "min_live": 3}))
    assert capped.pruned == [[False, True, False, False], [False] * 4]
    assert sum(map(sum, capped.tokens)) == 48
    # min_live caps the other deciders too: threshold would cut A's t1, t2 and B's t1.
    th = run_policy(problems, "threshold", 0, cfg, Params(**{**params.__dict__, "min_live": 3}))
    assert th.pruned == [[False, True, False, False], [False] * 4]


def test_memory_victim_rules_in_the_scheduler_model():
    # Two problems on a tight cache (3-token prompt, 6 tokens each, blocks of 4, 7 blocks: 5
    # traces hold 5, and when every trace needs its second block, two must go). M is easy (.9, .2, .5), H hard (.15, .1).
    # The paper's rule takes the lowest scores overall: H's t1, then M's t1 (H's t0 is its last).
    # group_gap takes the traces furthest below their own problem's best: M's t1 (-.7), t2 (-.4).
    recs = [{"problem_id": "M", "prompt_tokens": 3, "traces": [
        _trace(0, "1", True, 6, [0], [0.9]), _trace(1, "2", False, 6, [0], [0.2]),
        _trace(2, "1", True, 6, [0], [0.5])]},
        {"problem_id": "H", "prompt_tokens": 3, "traces": [
            _trace(0, "3", True, 6, [0], [0.15]), _trace(1, "4", False, 6, [0], [0.1])]}]
    for r in recs:
        for t in r["traces"]:
            t["step_positions"] = [0]
    problems = build_problems(recs)
    params = Params(0.5, 1, 0.5, 1, "mean", 0.3, 2, 50.0, 2)
    cfg = rp.Config(block_size=4, kv_blocks=[7], max_num_batched_tokens=100, memory_victim="group_gap")
    sc = run_policy(problems, "none", 7, cfg, params)
    assert sc.preemptions == 2 and sc.pruned == [[False] * 3, [False] * 2]
    paper = run_policy(problems, "memory:score", 7, cfg, params)
    assert paper.pruned == [[False, True, False], [False, True]] and paper.preemptions == 0
    group = run_policy(problems, "memory", 7, cfg, params)  # the config's rule: group_gap
    assert group.policy == "memory" and group.pruned == [[False, True, True], [False, False]]
    # min_live 2: each problem may lose one trace at most; the rest is preempted.
    capped = run_policy(problems, "memory:group_gap", 7, cfg, Params(**{**params.__dict__, "min_live": 2}))
    assert capped.pruned == [[False, True, False], [False, False]] and capped.preemptions > 0
    with pytest.raises(Exception, match="unknown policy"):
        rp.Config(policies=["none", "memory:bogus"])


def test_report_shows_the_replay_and_checks_its_schema(tmp_path):
    from stepprobe.report import _replay_section

    assert "replay has not run." in _replay_section(tmp_path)
    d = write_run(tmp_path, synthetic_records())
    out = rp.run(rp.Config(results=str(d), kv_blocks=[0], random_draws=10, output=str(tmp_path / "replay")))
    text = "\n".join(_replay_section(tmp_path))
    assert "2 held-out problems" in text and "| unlimited | memory | score | 0.500 | +0.000" in text
    data = json.loads((out / "replay.json").read_text())
    (out / "replay.json").write_text(json.dumps({**data, "schema_version": 0}))
    assert "rerun the replay stage" in "\n".join(_replay_section(tmp_path))


def test_second_phase_of_a_problem_starts_when_its_own_warm_up_ends():
    """The live confidence baseline queues a problem's second phase as soon as its own warm-up
    finishes (no barrier across problems); the scheduler model does the same."""
    def problem(pid, warm, rest):
        traces = [Trace(k, t, "1", True, [], []) for k, t in enumerate([warm, warm, rest, rest])]
        return Problem(pid, 10, traces, [0] * 4)

    probs = [problem("short-warm-up", 2, 10), problem("long-warm-up", 10, 2)]
    params = Params(threshold=0.5, warmup_steps=2, keep_fraction=0.5, keep_step=1, aggregate="mean",
                       ema_alpha=0.5, conf_window=2, conf_percentile=50.0, conf_warmup=2)
    targets = [[t.num_tokens for t in p.traces] for p in probs]
    kw = dict(kv_blocks=0, block_size=16, max_num_batched_tokens=4096, max_num_seqs=256, memory=False,
              params=params)
    warm = [[(i, k) for i in range(2) for k in range(2)]]
    per_problem = simulate(probs, targets, phases=warm, follow={i: [(i, 2), (i, 3)] for i in range(2)}, **kw)
    barrier = simulate(probs, targets, phases=warm + [[(i, k) for i in range(2) for k in (2, 3)]], **kw)
    # per problem: the short warm-up's rest runs in steps 3-12, the long one's in steps 11-12
    assert per_problem.steps == 12 and barrier.steps == 20
    assert per_problem.tokens == barrier.tokens == targets



def test_baselines_a_careful_user_would_pick(tmp_path):
    """SC admitted so that it never preempts (the largest such max_num_seqs), and SC with fewer
    traces at the same output tokens as a pruning policy, beside every pruning row."""
    d = write_run(tmp_path, synthetic_records())
    cfg = rp.Config(results=str(d), kv_blocks=[8], block_size=4, policies=["none", "threshold"], votes=["majority"],
                    random_draws=10)
    header, records = load_run(d)
    problems = build_problems(records)
    params = params_from(cfg, header)
    assert run_policy(problems, "none", 8, cfg, params).preemptions > 0
    seqs, adm = admission_seqs(problems, 8, cfg, params)
    assert adm.preemptions == 0 and run_policy(problems, "none", 8, cfg, params, max_num_seqs=seqs + 1).preemptions > 0
    rows = replay(problems, cfg, params)["rows"]
    a = next(r for r in rows if r["policy"] == "none+admission")
    assert a["max_num_seqs"] == seqs and a["preemptions"] == 0 and a["accuracy"] == rows[0]["accuracy"]
    th = next(r for r in rows if r["policy"] == "threshold")
    assert th["admission_time_ratio"] == pytest.approx(th["model_time"] / a["model_time"])
    # threshold spends 43 of 51 tokens; per problem the first traces closest to what it spent:
    # A 3 of 4 traces (18 vs 12+3+3+... ), B all 4 -> fewer traces, majority over them
    k = fewer_traces(problems, run_policy(problems, "threshold", 8, cfg, params))
    assert all(1 <= x <= 4 for x in k) and th["sc_same_tokens"]["traces"] == sum(k)


def test_calibrate_writes_trust_and_replay_shows_the_risk_controlled_rule(tmp_path):
    """The plumbing end to end: calibrate on a run with a scorer writes trust.json beside it
    (provenance, loss table, cross-fitted folds); replay finds it and adds memory+risk rows;
    run/bench/serve resolve the cutoff from it; a trust file for other weights is refused."""
    from stepprobe.errors import ArtifactMismatch
    from stepprobe.inference import calibrate as cal

    sdir = tmp_path / "scorer"
    sdir.mkdir()
    sha = "ab" * 32
    d = write_run(tmp_path, synthetic_records(), config={**RUN_CONFIG, "scorer": str(sdir), "problems": "x.jsonl"},
                  scorer={"path": str(sdir), "weights_sha256": sha})
    out = cal.run(cal.Config(results=str(d), kv_blocks=[8], block_size=4, grid_points=4))
    assert out == sdir / "trust.json"
    doc = cal.read_trust(sdir, sha)
    assert doc["kind"] == "stepprobe-trust" and doc["calibration_set"]["problems"] == 2
    assert doc["holds_for"]["kv_blocks"] == [8] and len(doc["losses"]) == len(doc["cutoffs"])
    assert sorted(p for f in doc["crossfit"]["folds"] for p in f["problems"]) == ["A", "B"]
    # two problems certify nothing: the default prunes nothing and votes by majority
    assert doc["default"]["cutoff"] is None and doc["vote"]["rule"] == "majority"
    with pytest.raises(ArtifactMismatch, match="other scorer weights"):
        cal.read_trust(sdir, "cd" * 32)
    rows = rp.read_replay(rp.run(rp.Config(results=str(d), kv_blocks=[0, 8], block_size=4, random_draws=5,
                                           policies=["none", "memory"])))["rows"]
    risk = [r for r in rows if r["policy"] == "memory+risk"]
    assert [r["kv_blocks"] for r in risk] == [8] and risk[0]["rule"].endswith("(cross-fitted)")
    assert risk[0]["pruned"] == 0 and risk[0]["accuracy"] == rows[0]["accuracy"]
    paper = next(r for r in rows if r["policy"] == "memory" and r["kv_blocks"] == 8 and r["vote"] == "majority")
    assert paper["pruned"] > 0  # the pressure is there; the paper's rule prunes
    # what a run resolves from it (the scorer meta is not read when the weights are given)
    import json as _json

    from stepprobe.probes.checkpoint import SCORER_KIND, SCORER_SCHEMA_VERSION

    (sdir / "scorer.json").write_text(_json.dumps({
        "kind": SCORER_KIND, "schema_version": SCORER_SCHEMA_VERSION, "weights_sha256": sha, "architecture": "linear",
        "params": {}, "feature_spec": {}, "hidden_size": 4, "model": {}, "boundary_rule": {}}))
    t = cal.resolve_trust(str(sdir), 0.01, 0.1)
    assert t.cutoff == 0.0 and t.vote == "majority" and "nothing" in t.note and "2 problems of x.jsonl" in t.note
    assert cal.resolve_trust(str(sdir), None, 0.1).cutoff is None  # the paper's rule
    assert cal.resolve_trust(str(sdir), 0.01, 0.1, prune_below=0.3).cutoff == 0.3
    with pytest.raises(Exception, match="serves tolerances up to 0.05"):
        cal.resolve_trust(str(sdir), 0.2, 0.1)
    assert cal.resolve_trust(str(tmp_path), 0.01, 0.1).cutoff == 0.0  # no trust.json: nothing is pruned


def test_replay_scores_traces_with_the_runs_ema_alpha(tmp_path):
    """Defect 2 of issue 24: replay took ema_alpha 0.3 whatever the run used. A trace scored
    (.6, .4): with the run's alpha .9 its ema falls to .42 < .5 at its second step (g=3) and the
    threshold policy cuts it at 5 tokens; with .3 it stays at .54 and is never cut."""
    traces = [_trace(0, "1", True, 8, [1, 3], [0.6, 0.4]), _trace(1, "1", True, 8, [1, 3], [0.9, 0.9])]
    recs = [{"problem_id": "A", "gold": "1", "prompt_tokens": PLEN, "pruned": 0, "traces": traces}]
    d = write_run(tmp_path, recs, config={**RUN_CONFIG, "aggregate": "ema", "ema_alpha": 0.9})
    data = rp.read_replay(rp.run(rp.Config(results=str(d), kv_blocks=[0], random_draws=2,
                                           policies=["none", "threshold"])))
    assert data["params"]["ema_alpha"] == 0.9 and data["params"]["aggregate"] == "ema"
    th = next(r for r in data["rows"] if r["policy"] == "threshold")
    assert th["pruned"] == 1 and th["output_tokens"] == 5 + 8


def test_params_missing_from_the_run_are_the_option_groups_defaults():
    from stepprobe.options import ConfidenceOptions, PruningOptions

    p = params_from(rp.Config(), {"config": {"policy": "none", "threshold": 0.4}})
    assert (p.warmup_steps, p.keep_fraction, p.keep_step, p.aggregate, p.ema_alpha, p.relative_margin, p.min_live) == (
        PruningOptions.warmup_steps, PruningOptions.keep_fraction, PruningOptions.keep_step, PruningOptions.aggregate,
        PruningOptions.ema_alpha, PruningOptions.relative_margin, PruningOptions.min_live)
    assert (p.conf_window, p.conf_percentile, p.conf_warmup) == (
        ConfidenceOptions.confidence_window, ConfidenceOptions.confidence_percentile,
        ConfidenceOptions.confidence_warmup)
    # the replay's own options win over the run's
    assert params_from(rp.Config(keep_step=7), {"config": {"keep_step": 5, "threshold": 0.4}}).keep_step == 7
