"""How far pruning and votes may trust a scorer: calibrated on held-out problems, with a guarantee.

Example::

    stepprobe run --scorer SCORER --problems heldout.jsonl --policy none --record-confidence --output sc
    stepprobe calibrate --results sc            # writes SCORER/trust.json

The paper's rules trust the probe fully: under memory pressure the lowest-scored trace goes,
and votes are weighted by score. With a weak probe both cost accuracy. ``calibrate`` measures
on one self-consistency run with the scorer (policy ``none``; every trace in full with its step
scores, as ``replay`` needs) what trusting the scorer would have cost, and stores two choices
in ``trust.json`` (kind ``stepprobe-trust``) beside the scorer's weights:

- **the vote rule**: the score-weighted vote replaces the majority vote only if its paired
  bootstrap interval against majority, on these problems, lies above zero;
- **the pruning cutoff**: under memory pressure a trace may be pruned only while its score is
  below the cutoff (else vLLM preempts, as it would without stepprobe). For every candidate
  cutoff (quantiles of the traces' scores, the most cautious first, the paper's rule last) the
  replay's scheduler model gives each problem's loss, SC's correctness minus the pruned
  run's, as the **worst over the KV budgets** calibrated; Learn-then-Test
  (:mod:`stepprobe.risk`) picks the cutoff. The loss table is stored, so ``run``/``bench``/
  ``serve`` derive the cutoff for any ``--max-accuracy-loss`` and ``--risk-delta`` at start.

The guarantee: with probability at least ``1 - delta`` over the calibration problems, the
expected accuracy lost against SC (same N, a KV budget among those calibrated, the same
sampling) is at most the tolerance, on problems exchangeable with the calibration set.
``trust.json`` also holds a **cross-fitted** choice (folds of the calibration problems, each
fold's cutoff and vote chosen on the others), which ``replay`` uses to evaluate the rule on
the same problems without using any problem to choose its own cutoff.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stepprobe import locks
from stepprobe.config import StageConfig, option
from stepprobe.data_collection.grading import grading_of
from stepprobe.errors import ArtifactMismatch, StepprobeError
from stepprobe.io import atomic_write_json
from stepprobe.provenance import check_schema, package_versions
from stepprobe.risk import DEFAULT_DELTA, DEFAULT_TOLERANCE, choose_cutoff, choose_vote, cutoff_grid
from stepprobe.stats import format_interval

from .deciders import vote_correct
from .kv_model import SchedulerModel
from .replay_data import build_problems, load_run, params_from
from .replay_rows import run_policy

log = logging.getLogger(__name__)

KIND = "stepprobe-trust"
SCHEMA_VERSION = 1
FILE_NAME = "trust.json"
#: Vote rules a scorer can earn (beside majority).
WEIGHTED_VOTES = ("score",)


@dataclasses.dataclass
class Config(StageConfig, SchedulerModel):
    SECTION = "calibrate"

    results: str | None = option(None, "a run with the scorer, policy none and every trace in full (its output "
                                       "directory or results.jsonl)")
    kv_blocks: list[int] = option(factory=lambda: [12, 16, 24, 32, 48, 64],
                                  help="KV budgets (blocks) the cutoff must hold for: a problem's loss is its worst")
    grid_points: int = option(40, "candidate cutoffs: this many score quantiles, then the paper's rule")
    max_tolerance: float = option(0.05, "the largest --max-accuracy-loss the table serves: cutoffs past the first "
                                        "whose observed loss exceeds it are not replayed (no such tolerance can reach them)")
    folds: int = option(2, "cross-fitted choice for replay: folds of the calibration problems")
    seed: int = option(0, "seed of the problem order in the test, the folds and the bootstrap")
    output: str | None = option(None, "where to write trust.json (default: into the run's scorer directory)")

    def check(self) -> None:
        if not self.kv_blocks or any(int(k) <= 0 for k in self.kv_blocks):
            raise StepprobeError("calibrate: --kv-blocks needs one or more positive budgets (memory pruning "
                                 "only acts when the KV cache is full)")
        if self.grid_points < 1 or self.folds < 2:
            raise StepprobeError("calibrate: grid_points must be >= 1 and folds >= 2")


# ---------------------------------------------------------------------------------- the tables
def loss_tables(problems: list, cutoffs: Sequence[float], config: Any, params: Any,
                votes: Sequence[str]) -> dict[str, np.ndarray]:
    """``tables[vote][j, i]``: SC's (majority) correctness minus memory pruning's at cutoff j with
    ``vote``, the worst over ``config.kv_blocks``, for problem i. Cutoffs are replayed in order
    until each vote's observed loss exceeds ``config.max_tolerance``; later rows are not replayed and
    hold the largest loss (1), so the fixed-sequence test never passes them."""
    from tqdm import tqdm

    sc = np.array([vote_correct(pr, [False] * len(pr.traces), "majority") for pr in problems], dtype=np.int8)
    out = {v: np.zeros((len(cutoffs), len(problems)), dtype=np.int8) for v in votes}
    policy = f"memory:{config.memory_victim}"
    last = len(cutoffs) - 1
    with tqdm(total=len(cutoffs), desc="calibrate", unit="cutoff", leave=False) as bar:
        for j, c in enumerate(cutoffs):
            worst = {v: np.full(len(problems), -1, dtype=np.int8) for v in votes}
            for kv in config.kv_blocks:
                o = run_policy(problems, policy, int(kv), config, params, cutoff=c)
                for v in votes:  # the vote does not change what is pruned: one replay serves every vote
                    ok = np.array([vote_correct(pr, pm, v) for pr, pm in zip(problems, o.pruned)], dtype=np.int8)
                    worst[v] = np.maximum(worst[v], sc - ok)
            for v in votes:
                out[v][j] = worst[v]
            bar.update(1)
            if all(out[v][j].mean() > config.max_tolerance for v in votes):
                last = j
                break
    for v in votes:
        out[v][last + 1:] = 1
    return out


def choose(doc: dict[str, Any], tolerance: float, delta: float, *, rows: Sequence[int] | None = None,
           seed: int | None = None) -> dict[str, Any]:
    """The cutoff of a trust document for a tolerance and delta (optionally on some problems only)."""
    cutoffs = [_float(c) for c in doc["cutoffs"]]
    losses = np.asarray(doc["losses"], dtype=np.float64)
    if rows is not None:
        losses = losses[:, list(rows)]
    ch = choose_cutoff(cutoffs, losses, tolerance, delta, seed=doc["config"]["seed"] if seed is None else seed)
    return ch.to_dict()


def _float(x: Any) -> float:
    return math.inf if x == "inf" else float(x)


def _problem_ids_sha(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def calibrate(problems: list, params: Any, config: Config) -> dict[str, Any]:
    """The vote rule, the loss table and the cross-fitted choices (the body of trust.json)."""
    n = len(problems)
    majority = [float(vote_correct(pr, [False] * len(pr.traces), "majority")) for pr in problems]
    scored = [float(vote_correct(pr, [False] * len(pr.traces), "score")) for pr in problems]
    use_score, interval = choose_vote(majority, scored, seed=config.seed)
    vote = "score" if use_score else "majority"
    scores = [t.score for pr in problems for t in pr.traces if t.score is not None]
    cutoffs = cutoff_grid(scores, config.grid_points)
    t0 = time.perf_counter()
    tables = loss_tables(problems, cutoffs, config, params, list(dict.fromkeys(("majority", vote))))
    log.info("calibrate: %d cutoffs x %d KV budgets x %d problems in %.1f s", len(cutoffs), len(config.kv_blocks), n,
             time.perf_counter() - t0)
    rng = np.random.default_rng(config.seed)
    fold_of = rng.permutation(n) % config.folds
    folds = []
    for f in range(config.folds):
        train = [i for i in range(n) if fold_of[i] != f]
        uf, _ = choose_vote([majority[i] for i in train], [scored[i] for i in train], seed=config.seed)
        vf = "score" if uf else "majority"
        ch = choose_cutoff(cutoffs, tables[vf][:, train].astype(np.float64), DEFAULT_TOLERANCE, DEFAULT_DELTA,
                           seed=config.seed)
        folds.append({"fold": f, "problems": [problems[i].problem_id for i in range(n) if fold_of[i] == f],
                      "vote": vf, "choice": ch.to_dict()})
    return {"vote": {"rule": vote, "majority_accuracy": float(np.mean(majority)),
                     "score_accuracy": float(np.mean(scored)), "score_minus_majority": interval},
            "cutoffs": ["inf" if math.isinf(c) else c for c in cutoffs],
            "losses": tables[vote].tolist(),
            "default": choose_cutoff(cutoffs, tables[vote].astype(np.float64), DEFAULT_TOLERANCE, DEFAULT_DELTA,
                                     seed=config.seed).to_dict(),
            "crossfit": {"folds": folds, "tolerance": DEFAULT_TOLERANCE, "delta": DEFAULT_DELTA}}


def _trust_path(config: Config, scorer_dir: str) -> Path:
    out = Path(config.output) if config.output else Path(scorer_dir) / FILE_NAME
    return out / FILE_NAME if out.is_dir() else out


def run(config: Config) -> Path:
    if not config.results:
        raise StepprobeError("calibrate needs --results (a run with the scorer and policy none)")
    if config.output:
        locks.hold(_trust_path(config, ""))  # one writer per trust file
    header, records = load_run(config.results)
    if not records:
        raise StepprobeError(f"{config.results} has no problems")
    scorer_info = header.get("scorer") or {}
    scorer_dir = (header.get("config") or {}).get("scorer") or scorer_info.get("path")
    if not scorer_dir or not scorer_info.get("weights_sha256"):
        raise ArtifactMismatch(f"{config.results} was run without a scorer: nothing to calibrate")
    out = _trust_path(config, scorer_dir)
    locks.hold(out)  # one writer per trust file
    problems = build_problems(records)
    if not any(t.score is not None for pr in problems for t in pr.traces):
        raise ArtifactMismatch(f"{config.results} has no step scores: nothing to calibrate")
    params = params_from(config, header)
    t0 = time.perf_counter()
    body = calibrate(problems, params, config)
    rc = header.get("config") or {}
    ns = sorted({len(pr.traces) for pr in problems})
    doc = {"kind": KIND, "schema_version": SCHEMA_VERSION, "config": config.to_dict(),
           "package_versions": package_versions(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "scorer": {"path": str(Path(scorer_dir).resolve()), "weights_sha256": scorer_info["weights_sha256"]},
           "model": header.get("model"),
           "calibration_set": {"results": str(Path(config.results).resolve()), "problems_source": rc.get("problems"),
                               "problems": len(problems), "problem_ids_sha256":
                                   _problem_ids_sha([pr.problem_id for pr in problems]),
                               "traces_per_problem": ns[0] if len(ns) == 1 else ns,
                               "grading": grading_of(rc),
                               "sampling": {k: rc.get(k) for k in ("temperature", "top_p", "top_k", "max_tokens",
                                                                   "seed", "per_trace_seeds")}},
           "holds_for": {"policy": f"memory:{config.memory_victim}", "kv_blocks": list(config.kv_blocks),
                         "block_size": config.block_size, "aggregate": params.aggregate,
                         "n": ns[0] if len(ns) == 1 else ns},
           "seconds": round(time.perf_counter() - t0, 1), **body}
    atomic_write_json(out, doc)
    d = body["default"]
    log.info("calibrate: %d problems; vote %s (score - majority %s); memory pruning %s "
             "(loss <= %.0f pt with probability >= %.0f%%) -> %s", len(problems), body["vote"]["rule"],
             format_interval(body["vote"]["score_minus_majority"], signed=True), _cut_label(d["cutoff"]),
             100 * d["tolerance"], 100 * (1 - d["delta"]), out)
    return out


def _cut_label(c: Any) -> str:
    if c is None:
        return "prunes nothing (no cutoff earned; vLLM preempts as usual)"
    return "any scored trace may go (the paper's rule earned)" if c == "inf" else \
        f"only traces scored below {float(c):.3f} may go"


# ---------------------------------------------------------------------------------- readers
def read_trust(scorer: str | Path, weights_sha256: str | None = None) -> dict[str, Any] | None:
    """The scorer's trust.json (``None`` when it has none); refused when it was made for other weights."""
    p = Path(scorer) / FILE_NAME
    if not p.is_file():
        return None
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ArtifactMismatch(f"{p}: not valid JSON ({e.msg}); recalibrate with `stepprobe calibrate`") from None
    check_schema(doc, KIND, SCHEMA_VERSION, str(p))
    if weights_sha256 is None:
        from stepprobe.probes.checkpoint import read_scorer_meta

        weights_sha256 = read_scorer_meta(scorer).get("weights_sha256")
    if doc.get("scorer", {}).get("weights_sha256") != weights_sha256:
        raise ArtifactMismatch(f"{p} was calibrated for other scorer weights; recalibrate with `stepprobe calibrate`")
    return doc


@dataclasses.dataclass(frozen=True)
class Trust:
    """What a run trusts its scorer with: the memory policy's cutoff and the vote."""

    cutoff: float | None  # None: no cutoff (the paper's rule); 0.0: prune nothing
    vote: str
    note: str  # one line for the start of a run

    def describe(self) -> str:
        return self.note


def resolve_trust(scorer: str | None, max_accuracy_loss: float | None, risk_delta: float,
                  prune_below: float | None = None) -> Trust:
    """The one place a run's cutoff and default vote are decided (run, bench, serve, the scheduler)."""
    if not scorer:
        return Trust(None, "majority", "no scorer")
    doc = read_trust(scorer)
    vote = doc["vote"]["rule"] if doc else "majority"
    src = (f"{doc['calibration_set']['problems']} problems of {doc['calibration_set']['problems_source']}, "
           f"N={doc['holds_for']['n']}, KV blocks {','.join(map(str, doc['holds_for']['kv_blocks']))}") if doc else ""
    if prune_below is not None:
        return Trust(float(prune_below), vote, f"memory pruning below score {prune_below:g} (set by prune_below)")
    if max_accuracy_loss is None:
        return Trust(None, vote, "memory pruning by the paper's rule (no tolerance): any scored trace may go")
    if doc is None:
        return Trust(0.0, vote, f"the scorer has no trust.json: with a tolerance of {max_accuracy_loss:g}, memory "
                                "pruning prunes nothing (vLLM preempts as usual); calibrate it with `stepprobe "
                                "calibrate`, or pass --max-accuracy-loss none for the paper's rule")
    cap = doc["config"].get("max_tolerance", 1.0)
    if max_accuracy_loss > cap:
        raise StepprobeError(f"{scorer}/{FILE_NAME} serves tolerances up to {cap:g}; recalibrate with a larger "
                             f"--max-tolerance for --max-accuracy-loss {max_accuracy_loss:g}")
    ch = choose(doc, float(max_accuracy_loss), float(risk_delta))
    c = ch["cutoff"]
    cutoff = 0.0 if c is None else _float(c)
    return Trust(None if math.isinf(cutoff) else cutoff, vote,
                 f"memory pruning {_cut_label(c)}: accuracy loss vs SC <= {max_accuracy_loss:g} with "
                 f"probability >= {1 - risk_delta:.0%} (calibrated on {src}); vote {vote}")
