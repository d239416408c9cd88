"""The whole pipeline, end to end, into one run directory:
collect -> record -> sweep -> tune -> export -> sc -> bench -> replay.

Each stage is the same module the stage's own command runs; this only chooses its paths
and sizes and calls ``run(config)``. The run directory holds one folder per stage and
``pipeline.json`` (kind "stepprobe-pipeline"): the resolved config of every stage, and for
each finished stage its timing and result. A rerun of the same command skips finished
stages and lets the interrupted one resume where it stopped (collect and record keep every
finished problem, sweep every finished site, tune every finished trial). A finished stage
whose settings changed is refused with one line unless ``--restart``.

The evaluation uses held-out problems the probe never saw (``bench_problems``, minus any
question also in ``problems``): ``sc`` samples them once with self-consistency (a ``run``
with policy ``none`` that keeps every trace's step scores and token confidences), ``replay``
replays every policy on those same traces across KV budgets (paired, with bootstrap
intervals and random/oracle baselines), and ``bench`` runs SC and memory pruning live on
the first ``bench`` ``limit`` of them at a tight KV budget where SC preempts, which replay
also checks itself against (``replay vs. live``).

The defaults are sized for the embedded default model on a 2-core CPU (about 20 minutes).
For a real model on a GPU, see configs/pipeline-gpu-example.yaml. It ends with
``report.md`` and ``report.html`` in the run directory.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from . import locks
from .config import OUTPUT_NAMES, StageConfig, option
from .errors import ArtifactMismatch, StepprobeError
from .io import atomic_write_json, atomic_write_text, read_json
from .models import DEFAULT_MODEL
from .paths import RunPaths, runs_dir
from .provenance import check_schema, package_versions

log = logging.getLogger(__name__)

KIND = "stepprobe-pipeline"
SCHEMA_VERSION = 1
STAGES = ["collect", "record", "sweep", "tune", "export", "evaluate", "sc", "calibrate", "bench", "replay"]
#: A pipeline stage runs the module of the command of the same name; ``sc`` is a ``run``.
_COMMAND = {"sc": "run"}


def stage_module(stage: str) -> Any:
    """The module (``Config``, ``run``) of a pipeline stage: the CLI's command of that name."""
    from . import cli

    return cli.stage_module(_COMMAND.get(stage, stage))


# Stage settings for the embedded default on 2 CPU cores (within the 20-minute budget: README, "Time").
# A config file's per-stage sections are merged over these; paths are always the pipeline's.
DEFAULTS: dict[str, dict[str, Any]] = {
    # top_p 1.0 everywhere: on the CPU backend top_p < 1 doubles generation time (vLLM sorts the
    # vocabulary per token), and the probe trains on the sampling it is evaluated with.
    "collect": {"n": 8, "max_tokens": 192, "temperature": 0.7, "top_p": 1.0, "dtype": "bfloat16"},
    "record": {"dtype": "bfloat16", "storage_dtype": "float16"},
    # sweep: every fourth layer (the plot's shape; tune chooses the layer itself, by cross-validation)
    "sweep": {"sites": "embed,0,4,8,12,16,20,24,28,29,final_norm", "arch": "linear"},
    "tune": {"n_trials": 12, "sites": "layers", "archs": "linear,mlp", "max_epochs": 15, "patience": 4},
    "export": {},
    # evaluate: the released scorer (trained on 1000 other problems) and the scorer this run trains,
    # paired on this run's test problems that neither was trained on.
    "evaluate": {"overwrite": True, "allow_empty": True},
    # Eager engines: on this CPU build torch.compile costs minutes per engine, more than the
    # short runs themselves (the compiled path is what tests/inference checks).
    # sc: one self-consistency pass over every held-out problem, keeping what replay needs.
    "sc": {"n": 8, "max_tokens": 192, "temperature": 0.7, "top_p": 1.0, "dtype": "bfloat16", "enforce_eager": True,
           "policy": "none", "vote": "majority", "record_confidence": True, "batch_problems": 40},
    # bench: live and paired (per-trace seeds) on the first 20 held-out problems, at 16 blocks of
    # 128 tokens, tight enough that self-consistency preempts; replay covers the other policies
    # and budgets on all of them.
    "bench": {"n": 8, "max_tokens": 192, "temperature": 0.7, "top_p": 1.0, "dtype": "bfloat16",
              "enforce_eager": True, "policies": ["none", "memory", "none+admission"], "kv_blocks": [16], "limit": 20},
    # calibrate: how far the scorer is trusted (the memory cutoff for a 1-point tolerance, the vote),
    # on the SC pass, at every budget the replay shows; bench's memory row then uses it.
    "calibrate": {"kv_blocks": [12, 16, 24, 32, 48, 64]},
    # replay: every policy, the within-problem ones (issue 12) included, on the same SC traces.
    "replay": {"kv_blocks": [0, 12, 16, 24, 32, 48, 64],
               "policies": ["none", "memory", "memory:group_gap", "memory:group_largest", "threshold", "relative",
                            "top_fraction", "confidence"]},
}


@dataclasses.dataclass
class Config(StageConfig):
    SECTION = "pipeline"

    out: str = option("", "run directory (default: $STEPPROBE_HOME/runs/pipeline-<model>)")
    model: str = option(DEFAULT_MODEL, "model name or path, used by every stage")
    problems: str = option("builtin:n=120,seed=0", "problems to collect and train on (file or builtin spec)")
    bench_problems: str = option("builtin:n=160,seed=1", "held-out problems for sc/replay and the bench (never "
                                 "trained on; questions also in `problems` are dropped)")
    seed: int = option(0, "seed of sampling (collect, sc, bench) and training (split, initialization, tuning; default "
                          "run directory pipeline-<model>-seed<N>); "
                          "the problems stay the same")
    stages: list[str] = option(help="stages to run, in order", factory=lambda: list(STAGES))
    restart: bool = option(False, "forget the run directory's finished stages and start again")
    report: bool = option(True, "write report.md and report.html at the end")
    collect: dict = option(help="settings for collect (see `stepprobe collect --help`)", factory=dict)
    record: dict = option(help="settings for record", factory=dict)
    sweep: dict = option(help="settings for sweep", factory=dict)
    tune: dict = option(help="settings for tune", factory=dict)
    export: dict = option(help="settings for export", factory=dict)
    evaluate: dict = option(help="settings for evaluate (the released scorer on this run's test split)", factory=dict)
    calibrate: dict = option(help="settings for calibrate (the scorer's trust.json from the sc pass)", factory=dict)
    sc: dict = option(help="settings for sc (a `stepprobe run` with policy none on the held-out problems)",
                      factory=dict)
    bench: dict = option(help="settings for bench", factory=dict)
    replay: dict = option(help="settings for replay", factory=dict)

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise StepprobeError(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGES)}")


def _wiring(stage: str, cfg: Config, paths: RunPaths) -> dict[str, Any]:
    """The fields the pipeline owns: paths between stages, the model, the problems."""
    return {
        "collect": {"model": cfg.model, "problems": cfg.problems, "output": str(paths.traces)},
        "record": {"traces": str(paths.traces), "output": str(paths.hidden_states), "model": cfg.model},
        "sweep": {"data": str(paths.hidden_states), "out": str(paths.sweep)},
        "tune": {"data": str(paths.hidden_states), "out": str(paths.tune)},
        "export": {"source": str(paths.tune), "out": str(paths.scorer)},
        "evaluate": {"scorer": str(_released_or(cfg.model, paths.scorer)), "data": str(paths.hidden_states),
                     "test_split_of": str(paths.scorer), "compare": str(paths.scorer), "out": str(paths.evaluate),
                     "exclude_problems": _released_training(cfg.model)},
        "calibrate": {"results": str(paths.sc), "output": str(paths.trust)},
        "sc": {"model": cfg.model, "problems": str(paths.bench_problems), "scorer": str(paths.scorer),
               "output": str(paths.sc)},
        "bench": {"model": cfg.model, "problems": str(paths.bench_problems), "scorer": str(paths.scorer),
                  "output": str(paths.bench)},
        "replay": {"results": str(paths.sc), "output": str(paths.replay),
                   **({"live_bench": str(paths.bench)} if "bench" in cfg.stages else {})},
    }[stage]


def _released_training(model: str) -> str:
    from .released import released_scorer, released_training_problems

    return released_training_problems(model) if released_scorer(model) else ""


def _released_or(model: str, own: Path) -> Path:
    """The model's released scorer (what the evaluate stage compares with), else the run's own."""
    from .released import released_scorer

    return released_scorer(model) or own


#: What the pipeline's ``seed`` sets in each stage (under the stage's own section).
_SEEDED = {"collect": ("seed",), "sweep": ("seed", "split_seed"), "tune": ("seed", "split_seed"), "sc": ("seed",),
           "bench": ("seed",), "calibrate": ("seed",), "replay": ("seed",)}


def stage_settings(stage: str, cfg: Config, paths: RunPaths) -> dict[str, Any]:
    settings = copy.deepcopy(DEFAULTS[stage])
    if cfg.seed:
        settings.update({k: cfg.seed for k in _SEEDED.get(stage, ())})
    settings.update(getattr(cfg, stage))
    owned = _wiring(stage, cfg, paths)
    owned_names = set(owned) | (set(OUTPUT_NAMES) if set(OUTPUT_NAMES) & set(owned) else set())
    clash = sorted(k for k in getattr(cfg, stage) if k in owned_names)
    if clash:
        raise StepprobeError(f"pipeline {stage}: {', '.join(clash)} are set by the pipeline; "
                             f"use the top-level fields (output, model, problems, bench_problems)")
    settings.update(owned)
    return settings


def write_heldout_problems(cfg: Config, paths: RunPaths) -> Path:
    """The bench's problems as a file, without any question the probe was trained on."""
    from .data_collection.sources import load_problem_source

    train_questions = {p.question.strip() for p in load_problem_source(cfg.problems)}
    bench = load_problem_source(cfg.bench_problems)
    kept = [p for p in bench if p.question.strip() not in train_questions]
    if not kept:
        raise StepprobeError(f"every bench problem ({cfg.bench_problems}) is also a training problem; "
                             "choose another --bench-problems")
    if len(kept) < len(bench):
        log.info("bench: dropped %d of %d problems that also occur in the training problems",
                 len(bench) - len(kept), len(bench))
    lines = [json.dumps({"id": p.problem_id, "question": p.question, "answer": p.gold,
                         **({"choices": p.choices} if p.choices else {})}) for p in kept]
    atomic_write_text(paths.bench_problems, "\n".join(lines) + "\n")
    return paths.bench_problems


def _load_state(paths: RunPaths, cfg: Config) -> dict[str, Any]:
    if paths.state.is_file() and not cfg.restart:
        state = read_json(paths.state)
        check_schema(state, KIND, SCHEMA_VERSION, str(paths.state))
        return state
    return {"kind": KIND, "schema_version": SCHEMA_VERSION, "packages": package_versions(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "stages": {}}


def _stage_overwrites(stage: str) -> dict[str, Any]:
    # Stages that do not resume internally start over when they did not finish before.
    return {"export": {"overwrite": True}}.get(stage, {})


def stage_configs(cfg: Config, paths: RunPaths, state: dict[str, Any] | None = None) -> dict[str, tuple[dict, StageConfig]]:
    """Every stage's settings and built (so validated) config, before any stage runs: a
    mistake in the last stage's section is refused before the first stage starts."""
    out: dict[str, tuple[dict, StageConfig]] = {}
    stages = (state or {}).get("stages", {})
    for stage in cfg.stages:
        settings = stage_settings(stage, cfg, paths)
        entry = stages.get(stage)
        if entry and entry.get("status") == "started":  # an interrupted stage resumes
            settings_run = {**settings, **_stage_overwrites(stage)}
        else:
            settings_run = settings
        module = stage_module(stage)
        source = f"pipeline {stage}"
        try:
            out[stage] = (settings, module.Config.from_dict(settings_run, source=source))
        except StepprobeError as exc:
            if str(exc).startswith(source):
                raise
            raise type(exc)(f"{source}: {exc}") from None
    # One grading protocol for the whole run: the probe's labels and every accuracy it is
    # judged by must count the same answers as right.
    grading = {stage: c.grading for stage, (_, c) in out.items() if hasattr(c, "grading")}
    if len(set(grading.values())) > 1:
        raise StepprobeError("pipeline: the stages grade with different protocols ("
                             + ", ".join(f"{s} {g}" for s, g in grading.items())
                             + "); set the same grading in the collect, sc and bench sections")
    return out


def run(cfg: Config) -> Path:
    root = Path(cfg.out) if cfg.out else runs_dir() / (f"pipeline-{Path(cfg.model).name}"
                                                        + (f"-seed{cfg.seed}" if cfg.seed else ""))
    paths = RunPaths(root)
    stage_configs(cfg, paths)  # refuse a bad section before anything is cleared or written
    # One pipeline per run directory; each stage also locks its own output inside it (other
    # lock files, so the stages run in-process under this lock without waiting for it).
    locks.hold(root)
    if cfg.restart and root.exists():
        log.info("--restart: clearing %s", root)
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    state = _load_state(paths, cfg)
    state["config"] = cfg.to_dict()
    configs = stage_configs(cfg, paths, state)
    t_all = time.perf_counter()
    for i, stage in enumerate(cfg.stages, start=1):
        settings, stage_cfg = configs[stage]
        entry = state["stages"].get(stage)
        if entry and entry.get("status") == "done":
            if entry.get("settings") != json.loads(json.dumps(settings)):
                raise ArtifactMismatch(
                    f"{root}: stage {stage} finished with other settings; pass --restart or another --output")
            log.info("[%d/%d] %s: done before, skipped", i, len(cfg.stages), stage)
            continue
        if stage in ("sc", "bench"):
            write_heldout_problems(cfg, paths)
        module = stage_module(stage)
        if entry and entry.get("status") == "started":
            log.info("[%d/%d] %s: resuming an interrupted run", i, len(cfg.stages), stage)
        state["stages"][stage] = {"status": "started", "settings": settings,
                                  "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        atomic_write_json(paths.state, state)
        log.info("[%d/%d] %s ...", i, len(cfg.stages), stage)
        t0 = time.perf_counter()
        result = module.run(stage_cfg)
        state["stages"][stage].update(status="done", seconds=round(time.perf_counter() - t0, 1),
                                      result=str(result) if not isinstance(result, dict) else result)
        atomic_write_json(paths.state, state)
        log.info("[%d/%d] %s finished in %.0f s", i, len(cfg.stages), stage, time.perf_counter() - t0)
    state["seconds_this_run"] = round(time.perf_counter() - t_all, 1)
    atomic_write_json(paths.state, state)
    if cfg.report:
        from .report import write_report

        report = write_report(root)
        print(f"report: {report}")  # noqa: T201  (the command's final output)
    return root
