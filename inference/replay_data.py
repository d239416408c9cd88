"""What replay reads: a run's results as problems and traces, the policies' parameters, a
bench's results and a scorer's trust document."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from stepprobe.errors import ArtifactMismatch, StepprobeError
from stepprobe.options import ConfidenceOptions, PruningOptions
from stepprobe.provenance import check_schema
from stepprobe.voting import merge_answers

from .policies import DEFAULT_THRESHOLD


@dataclasses.dataclass
class Trace:
    index: int
    num_tokens: int
    answer: str | None
    correct: bool
    step_gen: list[int]  # generated index of each scored boundary token
    step_scores: list[float]
    score: float | None = None  # aggregate of all step scores
    confidence: float | None = None  # trace confidence (lowest window mean), for the confidence vote
    token_confidence: list[float] | None = None
    stop_confidence: list[float] | None = None


@dataclasses.dataclass
class Problem:
    problem_id: str
    prompt_tokens: int
    traces: list[Trace]
    classes: list[int]  # answer class per trace (-1: no answer)


@dataclasses.dataclass
class Params:
    threshold: float
    warmup_steps: int
    keep_fraction: float
    keep_step: int
    aggregate: str
    ema_alpha: float
    conf_window: int
    conf_percentile: float
    conf_warmup: int
    relative_margin: float = PruningOptions.relative_margin
    min_live: int = PruningOptions.min_live


def load_run(path: str | Path, limit: int | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The header and problem records of a run's results.jsonl (schema checked)."""
    from stepprobe import jsonl

    from .run import RESULTS_KIND, RESULTS_SCHEMA_VERSION, RESULTS_WHAT

    p = Path(path)
    if p.is_dir():
        p = p / "results.jsonl"
    if not p.is_file():
        raise StepprobeError(f"no run results at {p}")
    header, lines = jsonl.read(p, RESULTS_KIND, RESULTS_SCHEMA_VERSION, RESULTS_WHAT)
    records = [rec for _, rec in lines]  # a torn last line of a killed run is left out; a corrupt one is refused
    if header.get("config", {}).get("policy") != "none" or any(r.get("pruned") for r in records):
        raise ArtifactMismatch(f"{p} is not a self-consistency run (policy none, nothing pruned); replay needs "
                               "every trace in full")
    return header, records[:limit] if limit else records


def build_problems(records: list[dict[str, Any]]) -> list[Problem]:
    out = []
    for r in records:
        plen = int(r.get("prompt_tokens") or 0)
        traces = []
        for t in sorted(r["traces"], key=lambda t: t["index"]):
            pos = [int(p) for p in t.get("step_positions", [])]
            traces.append(Trace(
                index=int(t["index"]), num_tokens=int(t["num_tokens"]), answer=t.get("answer"),
                correct=bool(t.get("correct")), step_gen=pos,  # generated-token positions (results schema 4)
                step_scores=[float(s) for s in t.get("step_scores", [])], score=t.get("score"),
                confidence=t.get("confidence"), token_confidence=t.get("token_confidence"),
                stop_confidence=t.get("stop_confidence")))
        answered = [k for k, t in enumerate(traces) if t.answer is not None]
        classes = [-1] * len(traces)
        for c, members in enumerate(merge_answers([traces[k].answer for k in answered])):  # type: ignore[misc]
            for m in members:
                classes[answered[m]] = c
        out.append(Problem(r["problem_id"], plen, traces, classes))
    return out



def trust_cutoffs(problems: list[Problem], trust: dict[str, Any]) -> tuple[list[float | None], list[str], str]:
    """Per problem, the cutoff and vote of a trust document that no choice on that problem made:
    a problem of the calibration set gets its fold's cross-fitted choice, any other the shipped one."""
    from .calibrate import _float

    def cut(choice: dict[str, Any]) -> float | None:
        c = choice["cutoff"]
        return 0.0 if c is None else (None if c == "inf" else _float(c))

    fold_of = {pid: f for f in trust["crossfit"]["folds"] for pid in f["problems"]}
    cuts, votes, inside = [], [], 0
    for pr in problems:
        f = fold_of.get(pr.problem_id)
        if f is None:
            cuts.append(cut(trust["default"]))
            votes.append(trust["vote"]["rule"])
        else:
            inside += 1
            cuts.append(cut(f["choice"]))
            votes.append(f["vote"])
    how = ("cross-fitted" if inside == len(problems) else "calibrated elsewhere" if inside == 0
           else f"cross-fitted on {inside}, calibrated elsewhere on {len(problems) - inside}")
    return cuts, votes, how


def params_from(config: Any, header: dict[str, Any]) -> Params:
    """The policies' parameters: the config's where it sets them (replay's options), else the
    run's (its header's config), else the option groups' defaults."""
    rc = header.get("config", {})

    def pick(name: str, group: type = PruningOptions) -> Any:
        v = getattr(config, name, None)
        v = rc.get(name) if v is None else v
        return getattr(group, name) if v is None else v

    thr = pick("threshold")
    if thr is None and rc.get("scorer"):
        from stepprobe.probes.checkpoint import read_scorer_meta

        try:
            thr = read_scorer_meta(rc["scorer"]).get("threshold")
        except Exception as e:  # noqa: BLE001 - a moved scorer: say what to pass
            raise StepprobeError(f"replay: cannot read the run's scorer for its threshold ({e}); pass --threshold")
    return Params(
        threshold=float(DEFAULT_THRESHOLD if thr is None else thr), warmup_steps=int(pick("warmup_steps")),
        keep_fraction=float(pick("keep_fraction")), keep_step=int(pick("keep_step")),
        aggregate=str(pick("aggregate")), ema_alpha=float(pick("ema_alpha")),
        conf_window=int(pick("confidence_window", ConfidenceOptions)),
        conf_percentile=float(pick("confidence_percentile", ConfidenceOptions)),
        conf_warmup=int(pick("confidence_warmup", ConfidenceOptions)),
        relative_margin=float(pick("relative_margin")),
        min_live=int(getattr(config, "min_live", PruningOptions.min_live)))


def load_bench(path: str | Path) -> dict[str, Any]:
    from .bench import BENCH_KIND, BENCH_SCHEMA_VERSION

    p = Path(path)
    if p.is_dir():
        p = p / "bench.json"
    if not p.is_file():
        raise StepprobeError(f"no bench results at {p}")
    data = json.loads(p.read_text(encoding="utf-8"))
    check_schema(data, BENCH_KIND, BENCH_SCHEMA_VERSION, str(p))
    return data



def load_trust(config: Any, header: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The trust.json for the risk-controlled rows: ``--trust`` (a file or a scorer directory),
    or with ``auto`` the run's scorer's, checked against the run's scorer weights."""
    from .calibrate import FILE_NAME, read_trust

    if not config.trust:
        return None, None
    weights = (header.get("scorer") or {}).get("weights_sha256")
    if config.trust == "auto":
        scorer = (header.get("config") or {}).get("scorer")
        if not scorer or not weights or not (Path(scorer) / FILE_NAME).is_file():
            return None, None
        return read_trust(scorer, weights), str(Path(scorer) / FILE_NAME)
    p = Path(config.trust)
    d = p if p.is_dir() else p.parent
    if not (d / FILE_NAME).is_file():
        raise StepprobeError(f"replay: no {FILE_NAME} at {config.trust}")
    return read_trust(d, weights), str(d / FILE_NAME)

