"""Self-consistency vs. STEP pruning vs. the confidence baseline, side by side.

The same problems, model, N and sampling settings go through every policy on the same
engine (one engine per KV-cache budget), so the comparison is fair: ``none`` (plain
self-consistency, majority vote), the STEP policies (``memory``, ``threshold``,
``top_fraction``, score-weighted vote) and ``confidence`` (DeepConf-style online filter,
confidence-weighted vote). Each KV budget is a number of KV-cache blocks (``0`` = vLLM's
default, generous); pick one tight enough that self-consistency preempts.

Writes ``bench.json``, ``bench.md`` (accuracy, wall time, output tokens, preemptions, pruned
traces, ratios to self-consistency) and ``bench.png`` (accuracy vs. wall time).

Durable problem by problem: each cell (one policy at one KV budget) streams its problems to
``cells/kv<blocks>-<policy>.jsonl`` (a header, then one line per problem as soon as its traces
finish), so a killed bench keeps what it had measured. Resumable: results are saved to
``bench.partial.json`` after every policy; rerunning the same command (same config, model and
scorer) keeps each KV budget whose policies all finished and measures the others again **from
the start**: a cell is timed as one batch on one engine (its wall time and its pruning depend
on every problem in flight together), so the finished problems of a killed cell are kept on
disk (renamed ``*.interrupted.jsonl``) but never mixed into a measurement, and every ratio
still compares runs of one engine measured in one session.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from stepprobe import jsonl
from stepprobe.config import StageConfig, option, stage_defaults
from stepprobe.errors import StepprobeError
from stepprobe.io import atomic_write_json, atomic_write_text
from stepprobe.paths import runs_dir
from stepprobe.options import (
    ConfidenceOptions, EngineOptions, GradingOption, PromptOptions, PruningOptions, SamplingOptions, TraceSeedOption,
    check_policy, config_diff, group_values, resume_view, with_scorer_generation,
)
from stepprobe.provenance import package_versions
from stepprobe.stats import format_interval
from stepprobe.voting import DEFAULT_VOTE

from . import run as run_stage

log = logging.getLogger(__name__)

BENCH_KIND = "stepprobe-bench"
CELL_KIND = "stepprobe-bench-cell"
BENCH_SCHEMA_VERSION = 5  # 2: model and scorer provenance; resumable by KV budget; 3: paired intervals, per-trace seeds;
# 4: step_positions count generated tokens (as results.jsonl schema 4)
# 5: none+admission rows (SC sized not to preempt), admission_time_ratio


@dataclasses.dataclass
@stage_defaults(max_model_len=1024)
class Config(StageConfig, PromptOptions, SamplingOptions, TraceSeedOption, PruningOptions, EngineOptions,
             ConfidenceOptions, GradingOption):
    """``stepprobe bench`` options. The prompt, sampling, pruning, engine, confidence and grading groups
    are :mod:`stepprobe.options` and reach every policy's ``run`` config unchanged; prompt
    and sampling fields left unset take the scorer's."""

    SECTION = "bench"

    problems: str = option("builtin:n=20", "problem file or builtin[:n=..,seed=..]")
    policies: list[str] = option(factory=lambda: ["none", "memory", "threshold", "top_fraction", "confidence"],
                                 help="policies to compare; 'none' is the self-consistency baseline")
    kv_blocks: list[int] = option(factory=lambda: [0, 64], help="KV-cache budgets in blocks (0 = vLLM's default)")
    step_vote: str = option("auto", "vote used for the STEP policies: majority, score; auto = the one the scorer "
                                    "earned (trust.json), else majority")
    limit: int | None = option(None, "only the first N problems")
    output: str | None = option(None, "output directory (default: $STEPPROBE_HOME/runs/bench-<time>)", resume_ok=True)

    def check(self) -> None:
        for p in self.policies:
            if p != ADMISSION:
                check_policy(p)
        if ADMISSION in self.policies and self.policies.index(ADMISSION) < self.policies.index("none"):
            raise StepprobeError(f"bench: {ADMISSION} is sized from the 'none' cell; list it after 'none'")
        if "none" not in self.policies:
            raise StepprobeError("bench needs the 'none' policy (self-consistency) as its baseline")
        if not self.scorer and any(p not in ("none", "confidence") for p in self.policies):
            raise StepprobeError("bench needs --scorer DIR for the STEP policies")
        if self.num_kv_blocks is not None:
            raise StepprobeError("bench sets the KV blocks per budget: use kv_blocks, not num_kv_blocks")
        if self.step_vote not in ("majority", "score", "auto"):
            raise StepprobeError(f"step_vote must be auto, majority or score, got {self.step_vote!r}")


#: Self-consistency with ``max_num_seqs`` sized so that it never preempts at the cell's KV budget
#: (what a careful user configures instead of pruning): sized by the replay's scheduler model on
#: the SC cell's own traces at that budget, then measured live on an engine of its own.
ADMISSION = "none+admission"


def admission_size(records: list[dict[str, Any]], kv: int, header: dict[str, Any]) -> int:
    """The largest ``max_num_seqs`` at which SC (these traces) does not preempt at ``kv`` blocks."""
    from .replay import Config as ReplayConfig
    from .replay_data import build_problems, params_from
    from .replay_rows import admission_seqs

    rcfg = ReplayConfig(kv_blocks=[kv])
    return admission_seqs(build_problems(records), kv, rcfg, params_from(rcfg, header))[0]


def _run_config(config: Config, policy: str, kv_blocks: int) -> run_stage.Config:
    """One policy's ``run`` config: every shared group as bench has it."""
    shared = group_values(config, PromptOptions, SamplingOptions, TraceSeedOption, PruningOptions, EngineOptions,
                          ConfidenceOptions, GradingOption)
    shared["num_kv_blocks"] = kv_blocks or None
    if policy == ADMISSION:
        return run_stage.Config(**shared, problems=config.problems, policy="none", vote="majority", limit=config.limit)
    return run_stage.Config(**shared, problems=config.problems, policy=policy,
                            vote=DEFAULT_VOTE.get(policy, config.step_vote), record_confidence=policy == "none",
                            limit=config.limit)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ("| KV blocks | policy | vote | accuracy | Δ vs SC [95% CI] | wall s | x SC time | x admission-SC time "
            "| output tokens | x SC tokens | preemptions | pruned |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        d = r.get("vs_sc")
        iv = format_interval(d, signed=True, missing="–")
        adm = r.get("admission_time_ratio")
        policy = r["policy"] + (f" (max_num_seqs {r['max_num_seqs']})" if r.get("max_num_seqs") else "")
        lines.append(f"| {r['kv_blocks'] or 'default'} | {policy} | {r['vote']} | {r['accuracy']:.3f} | {iv} | "
                     f"{r['wall_s']:.1f} | {r['time_ratio']:.2f} | {'–' if adm is None else f'{adm:.2f}'} | "
                     f"{r['output_tokens']} | {r['token_ratio']:.2f} | {r['preemptions']} | {r['pruned']}/{r['traces']} |")
    return head + "\n".join(lines) + "\n"


def paired_vs_sc(sc: list[dict[str, Any]], other: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy difference to SC on the same problems, with its paired bootstrap interval."""
    from stepprobe.stats import paired_bootstrap

    theirs = {r["problem_id"]: bool(r["correct"]) for r in other}
    ids = [r["problem_id"] for r in sc if r["problem_id"] in theirs]
    mine = {r["problem_id"]: bool(r["correct"]) for r in sc}
    return paired_bootstrap([mine[i] for i in ids], [theirs[i] for i in ids]).to_dict()


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    markers = {"none": "o", "memory": "s", "threshold": "^", "top_fraction": "D", "confidence": "x", "relative": "v"}
    for kv in sorted({r["kv_blocks"] for r in rows}):
        sub = [r for r in rows if r["kv_blocks"] == kv]
        for r in sub:
            ax.scatter(r["wall_s"], r["accuracy"], marker=markers.get(r["policy"], "o"),
                       label=f"{r['policy']} (KV {kv or 'default'})")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy vs. wall time")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _warm_up(runner: Any, problems: list[Any], config: Config) -> None:
    """An untimed short generation, so the first timed policy (self-consistency) does not pay
    the engine's first-batch costs alone."""
    from stepprobe.data_collection.prompts import build_prompts

    prompts = build_prompts(problems[:4], runner.tokenizer, config)
    runner.generate(prompts, n=2, policy="none", **{**config.sampling_kwargs(), "max_tokens": 32})


def _resume(partial: Path, config: Config, prov: dict[str, Any]) -> dict[int, tuple[list, dict]]:
    """KV budgets fully measured by an earlier, interrupted run of the same bench."""
    import json

    from stepprobe.provenance import check_schema

    if not partial.is_file():
        return {}
    try:
        data = json.loads(partial.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        log.warning("bench: %s is unreadable; starting over", partial)
        return {}
    check_schema(data, BENCH_KIND, BENCH_SCHEMA_VERSION, str(partial))
    mine, theirs = resume_view(config.to_dict(), Config), resume_view(data.get("config", {}), Config)
    if mine != theirs:
        diff = config_diff(mine, theirs)
        raise StepprobeError(f"{partial} is from a bench with another config ({', '.join(diff)}); "
                             "delete it or pass another --output")
    run_stage.check_provenance(data, prov, str(partial), remedy="delete it or pass another --output")
    kept: dict[int, tuple[list, dict]] = {}
    for kv in config.kv_blocks:
        kv_rows = [r for r in data.get("rows", []) if r["kv_blocks"] == kv]
        want = [p for p in config.policies if kv or p != ADMISSION]
        if sorted(r["policy"] for r in kv_rows) == sorted(want):
            kept[kv] = (kv_rows, {f"{kv}/{p}": data["problems"][f"{kv}/{p}"] for p in want})
    return kept


def cell_path(out: Path, kv: int, policy: str) -> Path:
    """Where one cell (a policy at a KV budget) streams its problems."""
    return out / "cells" / f"kv{kv or 'default'}-{policy}.jsonl"


def _measure_cell(runner: Any, problems: list[Any], rc: run_stage.Config, policy: str, kv: int, out: Path,
                  header: dict[str, Any], name: str | None = None) -> tuple[list[dict], dict]:
    """One timed cell: every problem in one batch, each line written and flushed as soon as its
    traces finish (a kill loses only the problems in flight)."""
    path = cell_path(out, kv, name or policy)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():  # from a killed bench: kept beside, never mixed into this measurement
        path.replace(path.with_suffix(".interrupted.jsonl"))
        log.info("bench: %s is from an interrupted bench; measuring the cell again from the start (kept as %s)",
                 path.name, path.with_suffix(".interrupted.jsonl").name)
    records: list[dict | None] = [None] * len(problems)
    stats: dict[str, Any] = {}
    with jsonl.create(path, {**header, "kind": CELL_KIND, "kv_blocks": kv, "policy": name or policy}) as fh:
        for k, rec in run_stage.solve_stream(runner, problems, rc, policy=policy, stats=stats):
            records[k] = rec
            fh.write(rec)
    for rec in records:
        rec["batch_wall_s"] = stats["wall_s"]  # the whole cell's time
    return records, stats


def run(config: Config) -> Path:
    from tqdm import tqdm

    from stepprobe.engine import check_kv_budget
    from stepprobe import locks
    from stepprobe.io import check_writable_dir

    out = Path(config.output) if config.output else runs_dir() / time.strftime("bench-%Y%m%d-%H%M%S")
    check_writable_dir(out, "--output")
    locks.hold(out)  # one writer per output directory, for the whole run
    config = with_scorer_generation(config)
    config, trust = run_stage.with_trust(config)
    base = _run_config(config, "none", 0)
    for kv in config.kv_blocks:  # every cell's settings are refused now, not after an hour of benching
        check_kv_budget(kv or None, config.max_model_len, flag="--kv-blocks")
        for policy in config.policies:
            _run_config(config, policy, kv)
    problems = run_stage.load_problems(base)
    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {}
    header = {"kind": BENCH_KIND, "schema_version": BENCH_SCHEMA_VERSION, "config": config.to_dict(),
              "package_versions": package_versions(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    prov = run_stage.provenance(config.model, config.scorer)
    header.update(prov)
    if config.scorer:
        from stepprobe.models import resolve_model

        from .runner import check_scorer_for_model

        check_scorer_for_model(config.scorer, resolve_model(config.model), config.n)
    log.info("bench: %d problems, policies %s, KV budgets %s, scorer %s", len(problems), ", ".join(config.policies),
             ", ".join(str(k or "default") for k in config.kv_blocks), run_stage.describe_scorer(config.scorer))
    if config.scorer and "memory" in config.policies:
        log.info("bench: %s", trust.note)
    kept = _resume(out / "bench.partial.json", config, prov)
    out.mkdir(parents=True, exist_ok=True)
    for kv, (kv_rows, kv_details) in kept.items():
        rows += kv_rows
        details.update(kv_details)
    with tqdm(total=len(config.kv_blocks) * len(config.policies), desc="bench", unit="run",
              initial=len(kept) * len(config.policies)) as bar:
        for kv in config.kv_blocks:
            if kv in kept:
                log.info("bench: KV budget %s already measured (bench.partial.json); kept", kv or "default")
                continue
            runner = run_stage.make_runner(_run_config(config, "none", kv))
            try:
                _warm_up(runner, problems, config)
                for policy in config.policies:
                    rc = _run_config(config, policy, kv)
                    if policy == ADMISSION:
                        if not kv:
                            continue  # vLLM's default budget: nothing to size
                        seqs = admission_size(details[f"{kv}/none"], kv, header)
                        log.info("bench: SC admitted %d at a time does not preempt at %d KV blocks", seqs, kv)
                        rc = rc.replace(max_num_seqs=seqs)
                        own = run_stage.make_runner(rc)
                        try:
                            _warm_up(own, problems, config)
                            records, stats = _measure_cell(own, problems, rc, "none", kv, out, header, name=policy)
                        finally:
                            own.close()
                    else:
                        records, stats = _measure_cell(runner, problems, rc, policy, kv, out, header)
                    s = run_stage.summarize(records, rc)
                    rows.append({"kv_blocks": kv, "policy": policy, "vote": rc.vote, "accuracy": s["accuracy"],
                                 **({"max_num_seqs": rc.max_num_seqs} if policy == ADMISSION else {}),
                                 "accuracy_by_vote": s["accuracy_by_vote"], "pass_at_n": s["pass_at_n"],
                                 "wall_s": stats["wall_s"], "output_tokens": s["output_tokens"],
                                 "preemptions": s["preemptions"], "engine_preemptions": stats["preemptions"],
                                 "pruned": s["pruned"], "traces": s["traces"]})
                    details[f"{kv}/{policy}"] = records
                    # Nothing already measured is lost if a later run dies.
                    atomic_write_json(out / "bench.partial.json", {**header, "rows": rows, "problems": details})
                    bar.update(1)
            finally:
                runner.close()
    rows.sort(key=lambda r: (config.kv_blocks.index(r["kv_blocks"]), config.policies.index(r["policy"])))
    for r in rows:
        sc = next(x for x in rows if x["kv_blocks"] == r["kv_blocks"] and x["policy"] == "none")
        r["time_ratio"] = r["wall_s"] / sc["wall_s"] if sc["wall_s"] else float("nan")
        adm = next((x for x in rows if x["kv_blocks"] == r["kv_blocks"] and x["policy"] == ADMISSION), None)
        r["admission_time_ratio"] = r["wall_s"] / adm["wall_s"] if adm and adm["wall_s"] else None
        r["token_ratio"] = r["output_tokens"] / sc["output_tokens"] if sc["output_tokens"] else float("nan")
        r["problems"] = len(details[f"{r['kv_blocks']}/{r['policy']}"])
        if r["policy"] != "none":
            r["vs_sc"] = paired_vs_sc(details[f"{r['kv_blocks']}/none"], details[f"{r['kv_blocks']}/{r['policy']}"])
    table = f"{len(problems)} problems, n={config.n}, graded {config.grading}; Δ vs SC: paired bootstrap 95% " \
        "interval over problems.\n\n" + \
        markdown_table(rows)
    atomic_write_json(out / "bench.json", {**header, "rows": rows, "problems": details})
    (out / "bench.partial.json").unlink(missing_ok=True)
    atomic_write_text(out / "bench.md", table)
    plot(rows, out / "bench.png")
    log.info("bench:\n%s", table)
    return out
