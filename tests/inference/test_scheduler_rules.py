"""The pruning rules pinned on vLLM's real ``Scheduler`` and ``AsyncScheduler`` (no engine).

Each test is built so that breaking one rule changes which request finishes how:

- memory victim: the lowest-scored request is the FIRST one added, while vLLM's own
  preemption victim is the last one; without the score sort the wrong request is pruned;
- ``protect_last`` on and off: a group's only running trace is (or is not) spared;
- unscored traces are never memory victims: vLLM preempts as usual;
- the confidence policy (DeepConf-style) with fed log-probabilities: a window mean below the
  request's threshold prunes, one at the threshold does not, ``-inf`` filler entries are
  ignored, no threshold means no pruning, and nothing is decided before the window is full.

The schedulers are built by helpers/scheduler_harness.py (the ``build_scheduler`` fixture)
and stepped by its ``engine_core_loop`` (one step in flight for the sync scheduler, two for the
async engine core).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.scheduler_harness import BLOCK, MAX_TOKENS, PROMPT, engine_core_loop

MODES = pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])


def add(scheduler, specs: dict[str, dict], *, logprobs: int | None = None) -> None:
    """Add one request per ``specs`` item (request id -> its ``stepprobe`` extra args), in order."""
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    hasher = get_request_block_hasher(BLOCK, sha256)
    for i, (rid, extra) in enumerate(specs.items()):
        sp = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=logprobs,
                            extra_args={"stepprobe": dict(extra)})
        scheduler.add_request(Request(request_id=rid, prompt_token_ids=[100 + i] * PROMPT, sampling_params=sp,
                                      pooling_params=None, block_hasher=hasher))


def drive(scheduler, *, in_flight: int, scores: dict[str, float | None] | None = None,
          rows: dict[str, list[float]] | None = None, at_step: dict | None = None,
          events: dict | None = None) -> dict[str, tuple]:
    """Run to completion; every token is a step boundary scored ``scores[rid]`` (``None``:
    no step completed) and comes with the log-probability row ``rows[rid]`` (the sampled
    token's, then the top-k). ``at_step[i]`` is called before step ``i``; ``events`` (a dict)
    receives the number of each engine-core event type the outputs carried. Returns each
    request's (finish_reason, stop_reason, tokens)."""
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, LogprobsLists, ModelRunnerOutput

    done: dict[str, tuple] = {}
    tokens: dict[str, int] = {}

    def complete(so):
        rids = list(so.num_scheduled_tokens)
        if not rids:
            deliver(scheduler.update_from_output(so, EMPTY_MODEL_RUNNER_OUTPUT))
            return
        mro = ModelRunnerOutput(req_ids=rids, req_id_to_index={r: k for k, r in enumerate(rids)},
                                sampled_token_ids=[[5] for _ in rids])
        if scores is not None:
            mro.stepprobe_steps = {r: [[0, scores[r]]] for r in rids if scores.get(r) is not None}
        if rows is not None:
            lp = np.array([rows[r] for r in rids], dtype=np.float32)
            mro.logprobs = LogprobsLists(logprob_token_ids=np.full(lp.shape, 5, dtype=np.int32), logprobs=lp,
                                         sampled_token_ranks=np.ones(len(rids), dtype=np.int32))
        deliver(scheduler.update_from_output(so, mro))

    def deliver(outputs):
        for eco in outputs.values():
            for o in eco.outputs:
                if events is not None:
                    for e in o.events or ():
                        events[e.type.name] = events.get(e.type.name, 0) + 1
                tokens[o.request_id] = tokens.get(o.request_id, 0) + len(o.new_token_ids)
                if o.finish_reason is not None:
                    done[o.request_id] = (str(o.finish_reason), o.stop_reason, tokens[o.request_id])

    engine_core_loop(scheduler, complete, in_flight, at_step)
    return done


def memory_scheduler(build_scheduler, async_scheduling, **settings):
    return build_scheduler(async_scheduling=async_scheduling,
                           settings={"policy": "memory", "scorer": "unused", "threshold": 0.5, **settings})


FULL = ("length", None, MAX_TOKENS)


@MODES
def test_memory_victim_is_the_lowest_score_not_the_last_arrival(build_scheduler, async_scheduling):
    # vLLM's own victim would be r3 (the last added); the lowest score is r0 (the first).
    s = memory_scheduler(build_scheduler, async_scheduling)
    add(s, {r: {"group": "g"} for r in ("r0", "r1", "r2", "r3")})
    done = drive(s, in_flight=2 if async_scheduling else 1, scores={"r0": 0.1, "r1": 0.9, "r2": 0.8, "r3": 0.7})
    assert done["r0"][:2] == ("stop", "pruned") and 0 < done["r0"][2] < MAX_TOKENS
    assert all(done[r] == FULL for r in ("r1", "r2", "r3"))
    assert s.stepprobe_counts == {"pruned": 1, "preempted": 0, "steps": s.stepprobe_counts["steps"]}


@MODES
def test_memory_victim_in_the_middle_of_the_queue(build_scheduler, async_scheduling):
    s = memory_scheduler(build_scheduler, async_scheduling)
    add(s, {r: {"group": "g"} for r in ("r0", "r1", "r2", "r3")})
    done = drive(s, in_flight=2 if async_scheduling else 1, scores={"r0": 0.6, "r1": 0.2, "r2": 0.8, "r3": 0.7})
    assert done["r1"][:2] == ("stop", "pruned")
    assert all(done[r] == FULL for r in ("r0", "r2", "r3"))


@MODES
def test_risk_controlled_memory_prunes_only_below_the_cutoff(build_scheduler, async_scheduling):
    # The same pressure as above: with a cutoff of 0.5 only r1 (0.2) may go; with 0.1 nobody
    # may, so vLLM preempts as it would without stepprobe.
    scores = {"r0": 0.6, "r1": 0.2, "r2": 0.8, "r3": 0.7}
    s = memory_scheduler(build_scheduler, async_scheduling, max_accuracy_loss=0.01, prune_below=0.5)
    add(s, {r: {"group": "g"} for r in scores})
    done = drive(s, in_flight=2 if async_scheduling else 1, scores=scores)
    assert done["r1"][:2] == ("stop", "pruned") and s.stepprobe_counts["pruned"] == 1
    s = memory_scheduler(build_scheduler, async_scheduling, max_accuracy_loss=0.01, prune_below=0.1)
    add(s, {r: {"group": "g"} for r in scores})
    done = drive(s, in_flight=2 if async_scheduling else 1, scores=scores)
    assert all(done[r] == FULL for r in scores)
    assert s.stepprobe_counts["pruned"] == 0 and s.stepprobe_counts["preempted"] > 0


def _calibrated_scorer(path, cutoff: float, problems: int):
    """A scorer directory whose trust.json measured no accuracy loss at ``cutoff`` on ``problems``
    calibration problems (the scheduler reads only trust.json and the weights hash)."""
    import json

    from stepprobe.inference import calibrate as cal
    from stepprobe.probes.checkpoint import CONFIG_FILE, SCORER_KIND, SCORER_SCHEMA_VERSION

    path.mkdir()
    sha = "ab" * 32
    (path / CONFIG_FILE).write_text(json.dumps({
        "kind": SCORER_KIND, "schema_version": SCORER_SCHEMA_VERSION, "weights_sha256": sha, "architecture": "linear",
        "params": {}, "feature_spec": {}, "hidden_size": 4, "model": {}, "boundary_rule": {}}))
    (path / cal.FILE_NAME).write_text(json.dumps({
        "kind": cal.KIND, "schema_version": cal.SCHEMA_VERSION, "config": {"seed": 0, "max_tolerance": 0.1},
        "scorer": {"weights_sha256": sha}, "vote": {"rule": "majority"}, "cutoffs": [cutoff],
        "losses": [[0.0] * problems], "calibration_set": {"problems": problems, "problems_source": "cal.jsonl"},
        "holds_for": {"n": 4, "kv_blocks": [7]}}))
    return str(path)


@MODES
def test_the_cutoff_is_the_one_trust_json_earned_at_the_runs_tolerance_and_risk(build_scheduler, async_scheduling,
                                                                                 tmp_path):
    # No loss at cutoff 0.5 on 100 problems: at a tolerance of 5 points that is certain enough
    # for a risk of 20 % (p = 0.015), not of 1 % (p = 0.011). Certified, r1 (0.2) may go; not,
    # nobody may and vLLM preempts.
    scores = {"r0": 0.6, "r1": 0.2, "r2": 0.8, "r3": 0.7}
    scorer = _calibrated_scorer(tmp_path / "scorer", 0.5, 100)
    for risk, pruned in ((0.2, ["r1"]), (0.01, [])):
        s = memory_scheduler(build_scheduler, async_scheduling, scorer=scorer, max_accuracy_loss=0.05,
                             risk_delta=risk)
        add(s, {r: {"group": "g"} for r in scores})
        done = drive(s, in_flight=2 if async_scheduling else 1, scores=scores)
        assert [r for r in scores if done[r][:2] == ("stop", "pruned")] == pruned
        assert all(done[r] == FULL for r in scores if r not in pruned)


@MODES
def test_default_tolerance_without_calibration_prunes_nothing(build_scheduler, async_scheduling):
    # The default (a tolerance of 1 point) with a scorer that has no trust.json: no cutoff was
    # earned, so memory pruning prunes nothing; the paper's rule is one setting away.
    scores = {"r0": 0.1, "r1": 0.9, "r2": 0.8, "r3": 0.7}
    from stepprobe.inference.plugin import PluginSettings

    s = memory_scheduler(build_scheduler, async_scheduling, max_accuracy_loss=PluginSettings().max_accuracy_loss)
    add(s, {r: {"group": "g"} for r in scores})
    done = drive(s, in_flight=2 if async_scheduling else 1, scores=scores)
    assert all(done[r] == FULL for r in scores) and s.stepprobe_counts["pruned"] == 0


@MODES
def test_protect_last_spares_a_groups_only_trace(build_scheduler, async_scheduling):
    # r0 is alone in group "a" and scores lowest; group "b" has three traces.
    specs = {"r0": {"group": "a"}, "r1": {"group": "b"}, "r2": {"group": "b"}, "r3": {"group": "b"}}
    scores = {"r0": 0.1, "r1": 0.9, "r2": 0.3, "r3": 0.8}
    s = memory_scheduler(build_scheduler, async_scheduling)  # protect_last defaults to on
    add(s, specs)
    done = drive(s, in_flight=2 if async_scheduling else 1, scores=scores)
    assert done["r2"][:2] == ("stop", "pruned")  # the lowest prunable one
    assert all(done[r] == FULL for r in ("r0", "r1", "r3"))

    s = memory_scheduler(build_scheduler, async_scheduling, protect_last=False)
    add(s, specs)
    done = drive(s, in_flight=2 if async_scheduling else 1, scores=scores)
    assert done["r0"][:2] == ("stop", "pruned")  # unprotected, the lowest overall goes
    assert all(done[r] == FULL for r in ("r1", "r2", "r3"))


@MODES
def test_protect_last_with_singleton_groups_falls_back_to_preemption(build_scheduler, async_scheduling):
    scores = {"r0": 0.1, "r1": 0.9, "r2": 0.8, "r3": 0.7}
    s = memory_scheduler(build_scheduler, async_scheduling)
    add(s, {r: {"group": r} for r in scores})  # every trace is its group's last one
    done = drive(s, in_flight=2 if async_scheduling else 1, scores=scores)
    assert all(done[r] == FULL for r in scores)
    assert s.stepprobe_counts["pruned"] == 0 and s.stepprobe_counts["preempted"] > 0

    s = memory_scheduler(build_scheduler, async_scheduling, protect_last=False)
    add(s, {r: {"group": r} for r in scores})
    done = drive(s, in_flight=2 if async_scheduling else 1, scores=scores)
    assert done["r0"][:2] == ("stop", "pruned")
    assert s.stepprobe_counts["pruned"] == 1 and s.stepprobe_counts["preempted"] == 0


@MODES
def test_preemption_count_equals_vllms_preempted_events(build_scheduler, async_scheduling):
    scores = {"r0": 0.1, "r1": 0.9, "r2": 0.8, "r3": 0.7}
    s = memory_scheduler(build_scheduler, async_scheduling)
    add(s, {r: {"group": r} for r in scores})  # all protected: vLLM preempts
    events: dict = {}
    drive(s, in_flight=2 if async_scheduling else 1, scores=scores, events=events)
    assert events.get("PREEMPTED", 0) == s.stepprobe_counts["preempted"] > 0


@MODES
def test_preempt_everything_outside_schedule_is_never_a_prune(build_scheduler, async_scheduling):
    # reset_prefix_cache(reset_running_requests=True) preempts every running request; that is
    # not a shortage of KV blocks, so even scored, unprotected memory traces are not pruned.
    s = memory_scheduler(build_scheduler, async_scheduling, protect_last=False)
    add(s, {"r0": {"group": "g"}, "r1": {"group": "g"}})
    events: dict = {}
    done = drive(s, in_flight=2 if async_scheduling else 1, scores={"r0": 0.1, "r1": 0.9}, events=events,
                 at_step={4: lambda: s.reset_prefix_cache(reset_running_requests=True)})
    assert done == {"r0": FULL, "r1": FULL}
    assert s.stepprobe_counts["pruned"] == 0 and s.stepprobe_counts["preempted"] == 2 == events["PREEMPTED"]


@MODES
def test_unscored_traces_are_never_memory_victims(build_scheduler, async_scheduling):
    s = memory_scheduler(build_scheduler, async_scheduling)
    add(s, {r: {"group": "g"} for r in ("r0", "r1", "r2", "r3")})
    done = drive(s, in_flight=2 if async_scheduling else 1, scores={"r0": None, "r1": None, "r2": None, "r3": None})
    assert all(done[r] == FULL for r in ("r0", "r1", "r2", "r3"))
    assert s.stepprobe_counts["pruned"] == 0 and s.stepprobe_counts["preempted"] > 0
    assert s.stepprobe_counts["steps"] == 0


@MODES
def test_a_scored_trace_goes_before_unscored_ones(build_scheduler, async_scheduling):
    # r3 (last, vLLM's victim) has no step yet; r0 (first) is scored, even high: it goes.
    s = memory_scheduler(build_scheduler, async_scheduling)
    add(s, {r: {"group": "g"} for r in ("r0", "r1", "r2", "r3")})
    done = drive(s, in_flight=2 if async_scheduling else 1, scores={"r0": 0.95, "r1": None, "r2": None, "r3": None})
    assert done["r0"][:2] == ("stop", "pruned")
    assert all(done[r] == FULL for r in ("r1", "r2", "r3"))


# --------------------------------------------------------------------- confidence policy
WINDOW = 4
THRESHOLD = 2.0
#: log-probability rows: [sampled token, top-1, top-2]; confidence = -mean(top-k).
SURE = [-0.01, -5.0, -0.5]  # confidence 2.75 (the sampled token's own -0.01 is not counted)
UNSURE = [-0.7, -0.5, -1.0]  # confidence 0.75
AT_THRESHOLD = [-0.1, -2.0, -2.0]  # confidence exactly 2.0: not below
UNSURE_WITH_FILLER = [-0.7, -0.5, -np.inf]  # vLLM's filler for a missing entry; confidence 0.5


def confidence_run(build_scheduler, async_scheduling, specs, rows):
    s = build_scheduler(async_scheduling=async_scheduling, settings={"policy": "confidence"})
    add(s, specs, logprobs=2)
    return s, drive(s, in_flight=2 if async_scheduling else 1, rows=rows)


@MODES
def test_confidence_policy_prunes_below_threshold_after_a_full_window(build_scheduler, async_scheduling):
    conf = {"conf_threshold": THRESHOLD, "conf_window": WINDOW}
    specs = {"sure": dict(conf), "unsure": dict(conf), "at": dict(conf), "filler": dict(conf),
             "nothreshold": {"conf_window": WINDOW}}
    rows = {"sure": SURE, "unsure": UNSURE, "at": AT_THRESHOLD, "filler": UNSURE_WITH_FILLER, "nothreshold": UNSURE}
    s, done = confidence_run(build_scheduler, async_scheduling, specs, rows)
    for rid in ("unsure", "filler"):
        assert done[rid][:2] == ("stop", "pruned")
        # decided once WINDOW tokens are seen, carried out at the next schedule()
        assert WINDOW <= done[rid][2] <= WINDOW + 2
    for rid in ("sure", "at", "nothreshold"):
        assert done[rid] == FULL
    assert s.stepprobe_counts["pruned"] == 2


@MODES
def test_confidence_window_mean_not_single_tokens(build_scheduler, async_scheduling):
    # A longer window needs more low-confidence tokens before it can decide.
    specs = {"w8": {"conf_threshold": THRESHOLD, "conf_window": 8}, "w2": {"conf_threshold": THRESHOLD, "conf_window": 2}}
    s, done = confidence_run(build_scheduler, async_scheduling, specs, {"w8": UNSURE, "w2": UNSURE})
    assert done["w2"][:2] == ("stop", "pruned") and 2 <= done["w2"][2] <= 4
    assert done["w8"][:2] == ("stop", "pruned") and 8 <= done["w8"][2] <= 10


def test_confidence_without_logprobs_prunes_nothing(build_scheduler):
    specs = {"a": {"conf_threshold": THRESHOLD, "conf_window": WINDOW}}
    s = build_scheduler(async_scheduling=False, settings={"policy": "confidence"})
    add(s, specs)
    done = drive(s, in_flight=1)
    assert done["a"] == FULL and s.stepprobe_counts["pruned"] == 0


def test_top_fraction_policy_keeps_the_best_half_of_a_group(build_scheduler):
    s = build_scheduler(async_scheduling=False,
                        settings={"policy": "top_fraction", "scorer": "unused", "threshold": 0.5,
                        "keep_fraction": 0.5, "keep_step": 3})
    add(s, {"r0": {"group": "g"}, "r1": {"group": "g"}, "r2": {"group": "g"}})
    done = drive(s, in_flight=1, scores={"r0": 0.9, "r1": 0.1, "r2": 0.8})
    assert done["r0"] == FULL and done["r2"] == FULL
    assert done["r1"][:2] == ("stop", "pruned") and 3 <= done["r1"][2] < MAX_TOKENS


# --------------------------------------------------------------------- found by the mutation run
def _saved_scorer(path, *, threshold: float | None):
    """A real scorer directory; ``threshold=None`` writes one whose scorer.json has no
    threshold (scorers saved before thresholds were recorded)."""
    import json

    from stepprobe.probes.checkpoint import CONFIG_FILE, linear_probe, save_scorer

    probe = linear_probe(["layer_01"], np.ones(64))
    d = save_scorer(path, probe, model={"name": "tiny", "config_hash": "c0ffee", "vocab_hash": "beef", "hidden_size": 64},
                    boundary_rule={"delimiter": "\n\n"}, threshold=0.3 if threshold is None else threshold)
    if threshold is None:
        meta = json.loads((d / CONFIG_FILE).read_text())
        del meta["threshold"]
        (d / CONFIG_FILE).write_text(json.dumps(meta))
    return str(d)


@pytest.mark.parametrize("recorded,pruned", [(None, {"r0"}), (0.3, set()), (0.75, {"r0", "r1"})],
                         ids=["unrecorded-0.5", "recorded-0.3", "recorded-0.75"])
def test_threshold_comes_from_the_scorer_else_one_half(build_scheduler, tmp_path, recorded, pruned):
    # No threshold in the settings: the scorer's recorded one applies, 0.5 when it records none.
    scorer = _saved_scorer(tmp_path / "sc", threshold=recorded)
    s = build_scheduler(async_scheduling=False, num_blocks=16,
                        settings={"policy": "threshold", "scorer": scorer, "warmup_steps": 2})
    add(s, {"r0": {}, "r1": {}, "r2": {}})
    done = drive(s, in_flight=1, scores={"r0": 0.4, "r1": 0.6, "r2": 0.9})
    assert {r for r, d in done.items() if d[:2] == ("stop", "pruned")} == pruned
    assert all(done[r] == FULL for r in done if r not in pruned)


@MODES
def test_steps_counts_every_scored_step(build_scheduler, async_scheduling):
    # Enough KV blocks for everyone: each of the MAX_TOKENS tokens of each request is one
    # scored step (policy none: nothing pruned); an unscored request adds none.
    s = build_scheduler(async_scheduling=async_scheduling, num_blocks=16, settings={"policy": "none"})
    add(s, {"r0": {}, "r1": {}, "r2": {}})
    done = drive(s, in_flight=2 if async_scheduling else 1, scores={"r0": 0.2, "r1": 0.9, "r2": None})
    assert done == {"r0": FULL, "r1": FULL, "r2": FULL}
    assert s.stepprobe_counts == {"pruned": 0, "preempted": 0, "steps": 2 * MAX_TOKENS}


@MODES
def test_memory_victim_among_requests_of_another_policy(build_scheduler, async_scheduling):
    # Group "h" runs under policy none (a per-request override) and is added last, so vLLM's
    # own victim would be h1. The memory rule ranks only group "g"; h's requests keep vLLM's
    # order in front, and the lowest memory trace (g0, added first) is the one pruned.
    s = memory_scheduler(build_scheduler, async_scheduling, protect_last=False)
    add(s, {"g0": {"group": "g"}, "g1": {"group": "g"}, "h0": {"group": "h", "policy": "none"},
            "h1": {"group": "h", "policy": "none"}})
    done = drive(s, in_flight=2 if async_scheduling else 1, scores={"g0": 0.3, "g1": 0.9, "h0": 0.05, "h1": 0.1})
    assert done["g0"][:2] == ("stop", "pruned") and 0 < done["g0"][2] < MAX_TOKENS
    assert all(done[r] == FULL for r in ("g1", "h0", "h1"))
    assert s.stepprobe_counts["pruned"] == 1 and s.stepprobe_counts["preempted"] == 0
