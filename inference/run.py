"""Generate N traces per problem with vLLM, score each reasoning step with the exported
probe inside the engine, prune traces by policy, and vote.

Example::

    stepprobe run --scorer runs/x/scorer --problems builtin:n=50 --n 16 --policy memory

Writes ``OUTPUT/results.jsonl`` (one line per problem: voted answer and correctness per
voting method, kept/pruned traces with scores and partial text, tokens, preemptions,
queueing time) and ``OUTPUT/summary.json``. Problems are run in batches of
``batch_problems`` (default: all at once); each problem's line is appended as soon as its
last trace finishes, so a killed run keeps every finished problem, and rerunning the same
command skips problems already done. ``step_positions`` count generated tokens (0 = the first
generated token), as the HDF5 ``position`` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Iterator

from stepprobe import jsonl
from stepprobe.config import StageConfig, option
from stepprobe.errors import ArtifactMismatch, StepprobeError
from stepprobe.io import atomic_write_json
from stepprobe.paths import runs_dir
from stepprobe.provenance import package_versions
from stepprobe.voting import METHODS, Ballot, vote

from stepprobe.options import (
    ConfidenceOptions, EngineOptions, GradingOption, PolicyOption, PromptOptions, PruningOptions, SamplingOptions,
    TraceSeedOption, config_diff, resume_view, with_scorer_generation,
)

from .plugin import PluginSettings

log = logging.getLogger(__name__)

RESULTS_KIND = "stepprobe-run-results"
RESULTS_WHAT = "run results file"
RESULTS_SCHEMA_VERSION = 4  # 2: model and scorer provenance; 3: per-trace seeds, prompt_tokens, token confidences;
# 4: step_positions count generated tokens (0 = the first generated token), as the HDF5 position does


@dataclasses.dataclass
class Config(StageConfig, PromptOptions, SamplingOptions, TraceSeedOption, PruningOptions, PolicyOption,
             EngineOptions, ConfidenceOptions, GradingOption):
    """``stepprobe run`` options. The prompt, sampling, pruning, engine and grading groups are
    :mod:`stepprobe.options`; prompt and sampling fields left unset take the scorer's."""

    SECTION = "run"

    problems: str = option("builtin:n=20", "problem file (JSONL/JSON/CSV) or builtin[:n=..,seed=..]")
    vote: str = option("auto", "voting method for the reported answer: majority, score, confidence; auto = the one "
                               "the scorer earned on its calibration problems (trust.json), else majority")
    include_pruned: bool = option(False, "let pruned traces vote")
    record_confidence: bool = option(False, "keep every trace's per-token confidences in results.jsonl (what "
                                            "stepprobe replay needs for the confidence baseline; asks for top-k logprobs)")
    batch_problems: int = option(0, "problems per generate call (0 = all at once; they share the KV cache)")
    limit: int | None = option(None, "only the first N problems", resume_ok=True)
    output: str | None = option(None, "output directory (default: $STEPPROBE_HOME/runs/run-<time>)", resume_ok=True)
    overwrite: bool = option(False, "start over in a non-empty output directory", resume_ok=True)

    def check(self) -> None:
        if self.vote not in (*METHODS, "auto"):
            raise StepprobeError(f"unknown voting method {self.vote!r}; known: auto, {', '.join(METHODS)}")

    def settings(self) -> PluginSettings:
        return PluginSettings(**self.pruning_values(), policy="none" if self.policy == "confidence" else self.policy,
                              keep_records=True)


def load_problems(config: Config) -> list[Any]:
    from stepprobe.data_collection.sources import load_problem_source

    problems = load_problem_source(config.problems)
    return problems[: config.limit] if config.limit else problems


def make_runner(config: Config, **overrides: Any) -> Any:
    from .runner import StepRunner

    return StepRunner(config.model, config.settings(), engine=config, seed=config.seed, **overrides)


def solve_stream(runner: Any, problems: list[Any], config: Config, *, policy: str | None = None,
                 stats: dict[str, Any] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield ``(index, record)`` for each problem as soon as its traces finish (the whole
    batch shares the engine; with the confidence policy, when its second-phase traces finish).
    ``stats`` is filled with the batch's wall time and engine preemptions when it ends."""
    from stepprobe.data_collection.prompts import build_prompts
    from stepprobe.engine import check_context

    from .confidence import ConfidenceFilter
    from .seeds import trace_seed

    policy = policy or config.policy
    stats = {} if stats is None else stats
    prompts = build_prompts(problems, runner.tokenizer, config)
    check_context([len(runner.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts],
                  config.max_tokens, config.max_model_len)
    sampling = config.sampling_kwargs()
    seeds = ([[trace_seed(config.seed, p.problem_id, i) for i in range(config.n)] for p in problems]
             if config.per_trace_seeds else None)
    use_conf = policy == "confidence" or config.vote == "confidence" or config.record_confidence
    pre0 = runner.preemptions()
    t0 = time.perf_counter()
    if policy == "confidence":
        filt = ConfidenceFilter(window=config.confidence_window, percentile=config.confidence_percentile,
                                warmup=config.confidence_warmup, topk=config.confidence_topk)
        stream: Any = filt.generate_stream(runner, prompts, n=config.n, seeds=seeds, **sampling)
    else:
        stream = runner.generate_stream(prompts, n=config.n, policy=policy, seeds=seeds,
                                        logprobs=config.confidence_topk if use_conf else None, **sampling)
    with contextlib.closing(stream):  # stopped early: the engine aborts what is still in flight
        for k, traces in stream:
            yield k, problem_record(problems[k], traces, config, policy, time.perf_counter() - t0)
    stats.update(wall_s=time.perf_counter() - t0, preemptions=runner.preemptions() - pre0)


def problem_record(prob: Any, traces: list[Any], config: Config, policy: str, wall: float) -> dict[str, Any]:
    """One line of results.jsonl: every trace graded, every voting method's answer."""
    from stepprobe.data_collection.grading import extract_answer, is_correct

    from .confidence import trace_confidence

    ballots, tdicts = [], []
    for t in traces:
        ans = extract_answer(t.text, prob.choices, grading=config.grading)
        conf = trace_confidence(t.confidence, config.confidence_window) if t.confidence else None
        ballots.append(Ballot(ans, t.pruned, t.score, conf))
        d = t.to_dict(token_confidence=config.record_confidence)
        d.update(answer=ans, correct=is_correct(ans, prob.gold, choices=prob.choices), confidence=conf)
        tdicts.append(d)
    votes = {}
    for m in METHODS:
        v = vote(ballots, m, include_pruned=config.include_pruned)
        votes[m] = {"answer": v.answer, "correct": is_correct(v.answer, prob.gold, choices=prob.choices),
                    "voters": v.voters}
    return {
        "problem_id": prob.problem_id, "gold": prob.gold, "policy": policy,
        "prompt_tokens": traces[0].prompt_tokens if traces else 0,
        "answer": votes[config.vote]["answer"], "correct": votes[config.vote]["correct"], "votes": votes,
        "kept": sum(not t.pruned for t in traces), "pruned": sum(t.pruned for t in traces),
        "output_tokens": sum(t.num_tokens for t in traces),
        "preemptions": sum(t.num_preemptions for t in traces),
        "queued_s": max((t.queued_s or 0.0) for t in traces) if traces else 0.0,
        "pass_at_n": any(d["correct"] for d in tdicts),
        "finished_after_s": wall, "traces": tdicts,
    }


def summarize(records: list[dict], config: Config, extra: dict | None = None) -> dict[str, Any]:
    n = max(len(records), 1)
    out = {
        "problems": len(records),
        "grading": config.grading,  # the protocol every correct/accuracy figure was graded with
        "accuracy": sum(r["correct"] for r in records) / n,
        "accuracy_by_vote": {m: sum(r["votes"][m]["correct"] for r in records) / n for m in METHODS},
        "pass_at_n": sum(r["pass_at_n"] for r in records) / n,
        "traces": sum(r["kept"] + r["pruned"] for r in records),
        "pruned": sum(r["pruned"] for r in records),
        "output_tokens": sum(r["output_tokens"] for r in records),
        "preemptions": sum(r["preemptions"] for r in records),
    }
    out.update(extra or {})
    return out


def provenance(model: str | None, scorer: str | None) -> dict[str, Any]:
    """What produced a run's or bench's results: the model's identity and the scorer's."""
    from stepprobe.models import identify_model
    from stepprobe.probes.checkpoint import read_scorer_meta

    out: dict[str, Any] = {"model": identify_model(model)[1], "scorer": None, "package_versions": package_versions()}
    if scorer:
        meta = read_scorer_meta(scorer)
        out["scorer"] = {"path": str(Path(scorer).resolve()), "weights_sha256": meta["weights_sha256"],
                         "architecture": meta["architecture"], "sites": list(meta["feature_spec"].get("sites", [])),
                         "model": meta["model"].get("name")}
    return out


def check_provenance(theirs: dict[str, Any], mine: dict[str, Any], what: str,
                     remedy: str = "pass --overwrite or another --output") -> None:
    """Refuse to continue an artifact made with another model or another scorer."""
    from stepprobe.provenance import check_model_identity

    if "model" not in theirs:
        raise ArtifactMismatch(f"{what} has no model provenance; {remedy}")
    check_model_identity(theirs["model"], mine["model"], what)
    a, b = theirs.get("scorer") or {}, mine.get("scorer") or {}
    if a.get("weights_sha256") != b.get("weights_sha256"):
        def desc(x: dict) -> str:
            return f"weights {str(x['weights_sha256'])[:12]} at {x.get('path')}" if x else "no scorer"

        raise ArtifactMismatch(f"{what} was written with another scorer ({desc(a)}; this run: {desc(b)}); {remedy}")


def with_trust(config: Any) -> tuple[Any, Any]:
    """The config with ``vote: auto`` (or ``step_vote: auto``) resolved, and the run's trust in its
    scorer (the memory cutoff and the earned vote: ``calibrate.resolve_trust``)."""
    from .calibrate import resolve_trust

    trust = resolve_trust(config.scorer, config.max_accuracy_loss, config.risk_delta, config.prune_below)
    for name in ("vote", "step_vote"):
        if getattr(config, name, None) == "auto":
            config = config.replace(**{name: trust.vote})
    return config, trust


def describe_scorer(scorer: str | None) -> str:
    """The scorer as a log line names it (a released one says so)."""
    from stepprobe.released import released_root

    if not scorer:
        return "none"
    p = Path(scorer).resolve()
    return f"{p} (released with stepprobe)" if p.is_relative_to(released_root().resolve()) else str(p)


def _header(config: Config, prov: dict[str, Any]) -> dict[str, Any]:
    return {"kind": RESULTS_KIND, "schema_version": RESULTS_SCHEMA_VERSION, "config": config.to_dict(), **prov}


def _resume(out: Path, config: Config, prov: dict[str, Any]) -> dict[str, dict]:
    path = out / "results.jsonl"
    if not path.is_file() or config.overwrite:
        return {}  # an overwritten file is replaced once the engine has started
    with open(path, "rb") as fh:
        if not fh.read(1 << 16).strip():
            return {}
    try:
        header, lines = jsonl.read(path, RESULTS_KIND, RESULTS_SCHEMA_VERSION, RESULTS_WHAT)
        done = {rec["problem_id"]: rec for _, rec in lines}
    except StepprobeError as exc:
        raise ArtifactMismatch(f"{exc}; pass --overwrite or another --output") from None
    mine, theirs = resume_view(config.to_dict(), Config), resume_view(header.get("config", {}), Config)
    try:
        if mine != theirs:
            diff = config_diff(mine, theirs)
            raise ArtifactMismatch(f"{path} was written with a different config ({', '.join(diff)}); "
                                   "pass --overwrite or another --output")
        check_provenance(header, prov, str(path))
    except ArtifactMismatch as exc:
        if done:
            raise
        # Only a header: nothing to lose, so a corrected command replaces it.
        log.info("%s holds no result yet (%s); starting it again", path, str(exc).split(";")[0])
        return {}
    return done


def _open_results(path: Path, config: Config, prov: dict[str, Any], done: dict[str, dict]) -> jsonl.Writer:
    """The results file, opened to append after its last complete line when resuming (a torn
    line from a killed run is cut first), else written anew with its header."""
    if done:
        return jsonl.append(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return jsonl.create(path, _header(config, prov))


def run(config: Config, runner: Any = None) -> Path:
    """Run the stage. ``runner``: an already started :class:`StepRunner` to use (not closed here).

    Everything is checked before the first byte is written (settings, output directory,
    problems, model, scorer, KV budget); the results header is written once the engine is
    up, and each problem's line as soon as its traces finish, so a killed run keeps every
    finished problem and a refused one leaves nothing that blocks the corrected command.
    """
    from tqdm import tqdm

    from stepprobe.engine import check_kv_budget
    from stepprobe import locks
    from stepprobe.io import check_writable_dir

    out = Path(config.output) if config.output else runs_dir() / time.strftime("run-%Y%m%d-%H%M%S")
    check_writable_dir(out, "--output")
    locks.hold(out)  # one writer per output directory, for the whole run
    config = with_scorer_generation(config)
    config.settings()  # aggregate, keep_fraction, a scorer the policy needs: refused before anything is written
    config, trust = with_trust(config)
    problems = load_problems(config)
    prov = provenance(config.model, config.scorer)
    if runner is None:
        check_kv_budget(config.num_kv_blocks, config.max_model_len)
        if config.scorer:
            from stepprobe.models import resolve_model

            from .runner import check_scorer_for_model

            check_scorer_for_model(config.scorer, resolve_model(config.model), config.n)
    done = _resume(out, config, prov)
    todo = [p for p in problems if p.problem_id not in done]
    path = out / "results.jsonl"
    log.info("run: %d problems (%d already done), n=%d, policy=%s, scorer %s, vote %s", len(problems), len(done),
             config.n, config.policy, describe_scorer(config.scorer), config.vote)
    if config.policy == "memory" and config.scorer:
        log.info("run: %s", trust.note)
    wall, engine_preemptions = 0.0, 0
    own = runner is None
    if todo:
        try:
            if own:
                runner = make_runner(config)
            with _open_results(path, config, prov, done) as fh:
                size = config.batch_problems or len(todo)
                with tqdm(total=len(todo), desc=f"run ({config.policy})", unit="problem") as bar:
                    for i in range(0, len(todo), size):
                        batch = todo[i:i + size]
                        stats: dict[str, Any] = {}
                        for _, r in solve_stream(runner, batch, config, stats=stats):
                            fh.write(r)  # durable problem by problem: a kill loses only those in flight
                            done[r["problem_id"]] = r
                            bar.update(1)
                        wall += stats["wall_s"]
                        engine_preemptions += stats["preemptions"]
        finally:
            if own and runner is not None:
                runner.close()
    records = [done[p.problem_id] for p in problems if p.problem_id in done]
    summary = summarize(records, config, {"wall_s_this_session": wall,
                                          "engine_preemptions_this_session": engine_preemptions})
    atomic_write_json(out / "summary.json", {**_header(config, prov), "summary": summary})
    log.info("run: accuracy %.3f (%s vote, graded %s), %d/%d traces pruned, %d preemptions -> %s", summary["accuracy"],
             config.vote, config.grading, summary["pruned"], summary["traces"], summary["preemptions"], out)
    return out
