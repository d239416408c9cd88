"""Replay every pruning policy offline on the traces of one self-consistency run.

Example::

    stepprobe run --scorer runs/x/scorer --problems heldout.jsonl --policy none --record-confidence \\
        --output runs/x/sc
    stepprobe replay --results runs/x/sc --kv-blocks 0,16,32,64 --output runs/x/replay

A ``run`` with policy ``none`` (and ``--record-confidence``) keeps, for every trace, its step
scores at their token positions, its per-token confidences, its answer and whether it is
right. ``replay`` decides, on those same traces, what each policy would have pruned and
when, so every policy is compared on identical samples (paired), and hundreds of problems
cost seconds instead of hours:

- ``threshold``, ``top_fraction``, ``confidence``: decided exactly as the live scheduler
  decides (the same functions of :mod:`stepprobe.inference.policies` and the same
  step-by-step order), with one assumption: a problem's traces advance in lockstep (one token
  per engine step each, from the same start), which holds unless the KV cache is full. A
  score for the boundary token at generated index ``g`` arrives after engine step ``g + 1``;
  a trace flagged after step ``s`` has generated ``s + 1`` tokens when it is finished.
- ``memory``: a model of vLLM's scheduler on a KV cache of ``kv_blocks`` blocks of
  ``block_size`` tokens: FCFS admission (not while a preemption happened in the step),
  chunked prefill within ``max_num_batched_tokens``, the prompt's full blocks shared by a
  problem's traces (prefix caching), and vLLM's victim rule (the **last** running request is
  preempted; the memory policy first sorts running traces so that the last is the
  lowest-scoring prunable one, and finishes it instead). A preempted trace frees its blocks
  and recomputes its prompt and generated tokens when readmitted.
- time: engine steps and computed tokens of that same model, as
  ``steps * step_cost_tokens + computed tokens`` (token units; a ratio to self-consistency
  at the same budget is what is reported). Every policy, SC included, goes through the
  scheduler model at every budget, with its pruning points.

Beside each pruning policy: ``random`` prunes the same number of traces per problem at the
same points (which traces: uniformly at random; mean over ``random_draws`` draws) and
``oracle`` prunes wrong traces first (by the true labels). Every accuracy difference to SC
carries a paired bootstrap 95% interval over problems (:mod:`stepprobe.stats`).

Votes: pruned traces do not vote; a trace without an answer does not vote; answers are
merged into classes of equivalent answers once per problem (math-verify, as
:func:`~stepprobe.voting.merge_answers` does); **ties go to the answer class seen
first in trace-index order**, the rule of :func:`~stepprobe.voting.vote`.

Writes ``replay.json`` (``stepprobe-replay``), ``replay.md`` (bench's table with intervals
and the baselines) and ``replay.png`` (accuracy vs. output tokens and vs. model time, one
line per policy across KV budgets).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from stepprobe import locks
from stepprobe.config import StageConfig, option
from stepprobe.data_collection.grading import grading_of
from stepprobe.errors import ArtifactMismatch, StepprobeError
from stepprobe.io import atomic_write_json, atomic_write_text
from stepprobe.options import PruningOptions
from stepprobe.provenance import check_schema, package_versions
from stepprobe.voting import METHODS

from .deciders import parse_policy
from .kv_model import SchedulerModel
from .replay_data import build_problems, load_bench, load_run, load_trust, params_from
from .replay_report import live_markdown, markdown, plot
from .replay_rows import fit_step_cost, live_check, replay

log = logging.getLogger(__name__)

KIND = "stepprobe-replay"
SCHEMA_VERSION = 2  # 2: a row per (policy, vote), SC same tokens, admission-sized SC, memory+risk


@dataclasses.dataclass
class Config(StageConfig, SchedulerModel):
    SECTION = "replay"

    results: str | None = option(None, "a run's output directory or results.jsonl (policy none, --record-confidence)")
    policies: list[str] = option(factory=lambda: ["none", "memory", "threshold", "top_fraction", "confidence"],
                                 help="policies to replay; 'none' is SC; also relative, memory:<victim rule>")
    kv_blocks: list[int] = option(factory=lambda: [0, 16, 32, 64], help="KV budgets in blocks (0 = unlimited)")
    votes: list[str] = option(factory=lambda: ["majority", "score"],
                              help="votes of the pruning policies, a row each (the confidence baseline: its own and "
                                   "majority), so the effect of pruning shows apart from the vote's")
    trust: str | None = option("auto", "a scorer's trust.json (stepprobe calibrate) for the risk-controlled rows; auto: "
                                       "the run's scorer's, if it has one; none: no such rows")
    admission: bool = option(True, "add SC with max_num_seqs sized so that it never preempts (what a careful user "
                                   "configures instead of pruning)")
    threshold: float | None = option(None, "threshold policy (default: the run's, else the scorer's)")
    warmup_steps: int | None = option(None, "threshold warm-up steps (default: the run's)")
    keep_fraction: float | None = option(None, "top_fraction keep fraction (default: the run's)")
    keep_step: int | None = option(None, "top_fraction ranking step (default: the run's)")
    aggregate: str | None = option(None, "trace score aggregate (default: the run's)")
    relative_margin: float | None = option(None, "relative policy: margin below the group's best (default: the run's, else "
                                                 f"{PruningOptions.relative_margin:g})")
    random_draws: int = option(200, "draws for the random-pruning baseline")
    seed: int = option(0, "seed of the random baseline and the bootstrap")
    limit: int | None = option(None, "only the first N problems")
    live_bench: str | None = option(None, "a bench output directory: also replay its SC traces at its KV budgets "
                                          "and compare with what its live policies did (replay vs. live)")
    output: str | None = option(None, "output directory (default: <results dir>/replay)")

    def resolve(self) -> None:
        if "none" not in self.policies:  # SC, the baseline every row is compared with
            self.policies = ["none", *self.policies]

    def check(self) -> None:
        for p in self.policies:
            parse_policy(p)
        bad = [v for v in self.votes if v not in METHODS]
        if bad or not self.votes:
            raise StepprobeError(f"replay: votes must be some of {', '.join(METHODS)}, got {self.votes}")


def run(config: Config) -> Path:
    if not config.results:
        raise StepprobeError("replay needs --results (a run's output directory or results.jsonl)")
    res = Path(config.results)
    out = Path(config.output) if config.output else (res if res.is_dir() else res.parent) / "replay"
    locks.hold(out)  # one writer per output directory
    t0 = time.perf_counter()
    header, records = load_run(config.results, config.limit)
    if not records:
        raise StepprobeError(f"{config.results} has no problems")
    if "confidence" in config.policies and not any(t.get("stop_confidence") for r in records for t in r["traces"]):
        raise StepprobeError("replay of the confidence policy needs a run with --record-confidence "
                             "(per-token confidences); drop 'confidence' from --policies or rerun")
    out.mkdir(parents=True, exist_ok=True)
    grading = grading_of(header.get("config"))
    bench = load_bench(config.live_bench) if config.live_bench else None
    if bench is not None and grading_of(bench.get("config")) != grading:
        raise ArtifactMismatch(f"replay: {config.results} was graded {grading}, the bench {config.live_bench} "
                               f"{grading_of(bench.get('config'))}; their accuracies are not comparable")
    problems = build_problems(records)
    params = params_from(config, header)
    trust, trust_path = load_trust(config, header)
    result = replay(problems, config, params, trust)
    doc = {"kind": KIND, "schema_version": SCHEMA_VERSION, "config": config.to_dict(), "grading": grading,
           "trust": {"path": trust_path, "vote": trust["vote"], "calibration_set": trust["calibration_set"],
                     "holds_for": trust["holds_for"], "default": trust["default"]} if trust else None,
           "params": dataclasses.asdict(params), "package_versions": package_versions(),
           "source": {"results": str(Path(config.results).resolve()), "run_config": header.get("config"),
                      "model": header.get("model"), "scorer": header.get("scorer")},
           "problems": len(problems), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "seconds": time.perf_counter() - t0, **result}
    text = (f"Replay on {len(problems)} problems (graded {grading}; paired: the same traces for every policy; Δ vs SC with a paired "
            "bootstrap 95% interval over problems; random/oracle prune the same number of traces per problem at the "
            "same points; 'SC same tokens' samples fewer traces per problem, in full, for the same output tokens; "
            "'none+admission' is SC with max_num_seqs sized so that it never preempts; 'memory+risk' is memory "
            "pruning only below the cutoff its scorer's calibration earned; time from the scheduler model).\n\n"
            + markdown(result["rows"]))
    if bench is not None:
        doc["live_check"] = live_check(config, bench)
        doc["time_fit"] = fit_step_cost(doc["live_check"])
        text += ("\nReplay vs. live: the bench's own SC traces replayed at its KV budgets, beside what its live "
                 "policies did on the same problems.\n\n" + live_markdown(doc["live_check"]))
        if doc["time_fit"]:
            f = doc["time_fit"]
            text += (f"\nTime model fitted to the live wall times ({f['points']} runs): {f['seconds_per_step'] * 1e3:.1f} ms "
                     f"per engine step + {f['seconds_per_token'] * 1e3:.2f} ms per computed token "
                     f"(= step_cost_tokens {f['step_cost_tokens']:.0f}; largest error {f['max_relative_error']:.0%}).\n")
    atomic_write_json(out / "replay.json", doc)
    atomic_write_text(out / "replay.md", text)
    plot(result["rows"], out / "replay.png")
    log.info("replay: %d problems in %.1f s\n%s", len(problems), time.perf_counter() - t0, text)
    return out


def read_replay(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "replay.json"
    data = json.loads(p.read_text(encoding="utf-8"))
    check_schema(data, KIND, SCHEMA_VERSION, str(p))
    return data
