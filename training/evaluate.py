"""Evaluate a scorer on recorded traces it never saw (e.g. the out-of-template test set).

    stepprobe evaluate --scorer runs/x/scorer --data runs/ood/hidden_states.h5 \\
        --reference-data runs/x/record/hidden_states.h5 --output runs/x/eval-ood

Every step of every trace in ``--data`` is scored with the scorer exactly as exported
(normalization and calibration included). Reported, each with a 95% bootstrap interval
that resamples whole problems (``--bootstrap`` resamples):

- step AUROC, early-50 AUROC, trace AUROC;
- within-problem ranking (:func:`stepprobe.training.metrics.within_problem_metrics`):
  ``within_rank25/50/75`` = mean over problems (with both outcomes) of the share of
  (correct, wrong) trace pairs ordered right by the running-mean score after 25/50/75%
  of their steps; ``within_auroc``;
- ECE of the calibrated score, and of the same scorer without its calibration;
- with ``--reference-data`` (the file the scorer was trained on), the scikit-learn
  logistic-regression reference fitted on that file's training split (same split seed and
  fractions as the scorer's) on the same features, scored on the same steps.

The data must come from the scorer's model (identity checked) and boundary rule. Output:
``eval.json`` (kind ``stepprobe-eval``: scorer, data fingerprint, numbers) and ``eval.md``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from stepprobe import locks
from stepprobe.config import StageConfig, option
from stepprobe.errors import ArtifactMismatch, StepprobeError
from stepprobe.io import atomic_write_json, atomic_write_text
from stepprobe.provenance import check_model_identity, package_versions
from stepprobe.stats import N_BOOT, Interval, format_interval

from . import metrics as M
from .data import FeatureCache, data_fingerprint, open_hidden_states, row_problem_ids
from .evaluation import Calibration, metric_with_ci

log = logging.getLogger(__name__)

EVAL_KIND = "stepprobe-eval"
EVAL_SCHEMA_VERSION = 1


@dataclasses.dataclass
class Config(StageConfig):
    """Evaluate a scorer on held-out recorded traces."""

    SECTION = "evaluate"

    scorer: str = option("", "scorer directory (stepprobe export)")
    data: str = option("", "HDF5 file of held-out traces (stepprobe record)")
    reference_data: str = option("", "HDF5 file the scorer was trained on: fit the logistic-regression reference "
                                     "on its training split and score it here too ('' to skip)")
    out: str = option("", "output directory (default: next to --data, eval-<scorer name>)")
    bootstrap: int = option(N_BOOT, "bootstrap resamples of problems for the intervals")
    seed: int = option(0, "bootstrap seed")
    overwrite: bool = option(False, "replace an existing eval.json")
    test_split_of: str = option("", "a scorer trained on --data: evaluate only on the problems of its test split "
                                    "(so another scorer is compared with it on problems neither trained on)")
    exclude_problems: str = option("", "a problem source (file or builtin spec) whose questions are left out, e.g. "
                                       "the problems --scorer was trained on")
    compare: str = option("", "a second scorer, scored on the same steps beside --scorer (paired)")
    allow_empty: bool = option(False, "when no problem is left to evaluate (or one outcome only), write eval.json "
                                      "saying so instead of failing (the pipeline's stage)")


def score_steps(scorer, hs, cache: FeatureCache | None = None) -> np.ndarray:
    """The scorer's probability of a correct trace at every step row of the hidden-state file
    ``hs`` (``[num_steps]``, float64), from the features it reads (sites, step means or group
    features); ``cache`` keeps the sites read for another scorer of the same file."""
    from stepprobe.training.module import predict

    cache = FeatureCache(hs) if cache is None else cache
    if scorer.group:  # group features standardized as in the scorer's training, as the live runner does
        cache = FeatureCache(hs, traces=cache.traces, group_stats=scorer.group_stats())
    return predict(scorer.module, cache.stack(scorer.sites, np.arange(hs.num_steps)))


def _block(scores: np.ndarray, hs, labels: np.ndarray, problem: np.ndarray, cfg: Config,
           rows: np.ndarray | None = None) -> dict[str, Any]:
    steps = hs.steps
    trace = np.asarray(steps["trace"])
    rel = np.asarray(steps["rel_position"], dtype=np.float64)
    if rows is not None:
        scores, labels, problem, trace, rel = scores[rows], labels[rows], problem[rows], trace[rows], rel[rows]
    out: dict[str, Any] = {}
    for name in ("auroc", "ece"):
        out[name] = metric_with_ci(name, scores, labels, problem, n=cfg.bootstrap, seed=cfg.seed).to_dict()
    early = M.up_to(rel, 0.5)
    out["early50_auroc"] = metric_with_ci("auroc", scores[early], labels[early], problem[early], n=cfg.bootstrap,
                                          seed=cfg.seed).to_dict()
    ts, tl = M.trace_scores(scores, labels, trace)
    t_problem = problem[np.unique(trace, return_index=True)[1]]
    out["trace_auroc"] = metric_with_ci("auroc", ts, tl, t_problem, n=cfg.bootstrap, seed=cfg.seed).to_dict()
    within = M.within_problem_metrics(scores, labels, trace=trace, problem=problem, rel_position=rel,
                                      bootstrap=cfg.bootstrap, seed=cfg.seed)
    n_within = int(within[M.WITHIN_PROBLEMS])
    for name in (M.WITHIN_AUROC, *M.WITHIN_RANK.values()):
        out[name] = Interval.from_flat(within, name, n_within).to_dict()
    out["within_problems"] = n_within
    return out


def run(cfg: Config) -> Path:
    from stepprobe.probes.checkpoint import load_scorer

    if not cfg.scorer or not cfg.data:
        raise StepprobeError("--scorer and --data are required")
    out = Path(cfg.out) if cfg.out else Path(cfg.data).parent / f"eval-{Path(cfg.scorer).name}"
    locks.hold(out)  # one writer per output directory
    hs = open_hidden_states(cfg.data)
    scorer = load_scorer(cfg.scorer, expected_model=hs.model)
    if scorer.boundary_rule.get("delimiter") != hs.boundary_rule.get("delimiter"):
        raise ArtifactMismatch(f"{cfg.data} was segmented with delimiter {hs.boundary_rule.get('delimiter')!r}, the "
                               f"scorer with {scorer.boundary_rule.get('delimiter')!r}")
    if (out / "eval.json").exists() and not cfg.overwrite:
        raise StepprobeError(f"{out}/eval.json exists; pass --overwrite or another --output")
    out.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(hs.steps["label"]).astype(np.int64)
    problem = row_problem_ids(hs)
    try:
        rows = _test_rows(cfg, hs)
        if cfg.exclude_problems:
            rows = _drop_questions(hs, np.arange(int(hs.num_steps)) if rows is None else rows, cfg.exclude_problems)
        if (labels if rows is None else labels[rows]).min() == (labels if rows is None else labels[rows]).max():
            raise StepprobeError(f"{cfg.data}: every evaluated step has the same label; nothing to evaluate")
    except StepprobeError as exc:
        if not cfg.allow_empty:
            raise
        doc = {"kind": EVAL_KIND, "schema_version": EVAL_SCHEMA_VERSION, "config": cfg.to_dict(),
               "skipped": str(exc), "package_versions": package_versions()}
        atomic_write_json(out / "eval.json", doc)
        atomic_write_text(out / "eval.md", f"# Scorer evaluation skipped\n\n{exc}\n")
        log.warning("evaluate: skipped: %s", exc)
        return out
    cache = FeatureCache(hs)
    scores = score_steps(scorer, hs, cache)
    cal = Calibration.from_dict(scorer.meta.get("calibration"))
    uncal = Calibration.from_dict(scorer.calibration).invert(scores)  # the same scorer without its calibration
    n_traces = int(hs.num_traces)
    tr_labels = np.asarray(hs.traces["label"])
    doc: dict[str, Any] = {
        "kind": EVAL_KIND, "schema_version": EVAL_SCHEMA_VERSION, "config": cfg.to_dict(),
        "scorer": {"path": str(Path(cfg.scorer).resolve()), "sites": scorer.sites,
                   "architecture": scorer.architecture, "calibration": cal.to_dict(),
                   "weights_sha256": scorer.meta.get("weights_sha256")},
        "data": data_fingerprint(hs),
        "size": _size(hs, rows, tr_labels),
        "rows": "all" if rows is None else f"test split of {Path(cfg.test_split_of).resolve()}",
        "probe": _block(scores, hs, labels, problem, cfg, rows),
        "probe_uncalibrated_ece": metric_with_ci("ece", uncal if rows is None else uncal[rows],
                                                 labels if rows is None else labels[rows],
                                                 problem if rows is None else problem[rows], n=cfg.bootstrap,
                                                 seed=cfg.seed).to_dict(),
        "package_versions": package_versions(),
    }
    if cfg.compare:
        other = load_scorer(cfg.compare, expected_model=hs.model)
        doc["compare"] = {"path": str(Path(cfg.compare).resolve()), "sites": other.sites,
                          "architecture": other.architecture,
                          **_block(score_steps(other, hs, cache), hs, labels, problem, cfg, rows)}
    if cfg.reference_data:
        doc["reference"] = _reference(cfg, scorer, hs, cache, labels, problem, rows)
    atomic_write_json(out / "eval.json", M.clean(doc))
    atomic_write_text(out / "eval.md", render(doc))
    p = doc["probe"]
    log.info("%s on %s (%d problems, %d traces, %d steps): step AUROC %s, within_rank50 %s, ECE %s (uncalibrated "
             "%.3f)", Path(cfg.scorer).name, cfg.data, doc["size"]["problems"], doc["size"]["traces"],
             doc["size"]["steps"], format_interval(p["auroc"]), format_interval(p["within_rank50"]),
             format_interval(p["ece"]), doc["probe_uncalibrated_ece"]["value"])
    return out


def _test_rows(cfg: Config, hs) -> np.ndarray | None:
    """The step rows of ``--test-split-of``'s test problems (``None``: every row)."""
    if not cfg.test_split_of:
        return None
    from stepprobe.probes.checkpoint import read_scorer_meta

    from .data import make_split

    meta = read_scorer_meta(cfg.test_split_of)
    fp = ((meta.get("provenance") or {}).get("data") or {}).get("num_steps")
    if fp is not None and int(fp) != int(hs.num_steps):
        raise ArtifactMismatch(f"{cfg.test_split_of} was not trained on {cfg.data} ({fp} steps, the file has "
                               f"{int(hs.num_steps)}); --test-split-of needs the scorer trained on --data")
    tc = meta.get("config") or {}
    split = make_split(hs, val_fraction=tc.get("val_fraction", 0.15), test_fraction=tc.get("test_fraction", 0.15),
                       seed=tc.get("split_seed", 0))
    return split.rows[M.TEST]


def _drop_questions(hs, rows: np.ndarray, source: str) -> np.ndarray:
    """``rows`` without the steps of problems whose question is in ``source``."""
    from stepprobe.data_collection.sources import load_problem_source

    if "question" not in hs.problems:
        raise StepprobeError(f"{getattr(hs, 'path', 'the data')} records no questions; --exclude-problems cannot match them")
    seen = {" ".join(p.question.split()) for p in load_problem_source(source)}
    qs = [" ".join(str(q.decode() if isinstance(q, bytes) else q).split()) for q in hs.problems["question"]]
    drop = np.array([q in seen for q in qs], dtype=bool)
    prob = np.asarray(hs.steps["problem"])
    kept = rows[~drop[prob[rows]]]
    if not len(kept):
        raise StepprobeError(f"every evaluated problem's question is in {source}; nothing left to evaluate")
    return kept


def _size(hs, rows: np.ndarray | None, tr_labels: np.ndarray) -> dict[str, Any]:
    if rows is None:
        n = int(hs.num_traces)
        return {"problems": int(hs.num_problems), "traces": n, "steps": int(hs.num_steps),
                "sample_accuracy": float(tr_labels.mean()) if n else float("nan")}
    traces = np.unique(np.asarray(hs.steps["trace"])[rows])
    return {"problems": len(set(row_problem_ids(hs)[rows].tolist())), "traces": int(len(traces)),
            "steps": int(len(rows)), "sample_accuracy": float(tr_labels[traces].mean()) if len(traces) else float("nan")}


def _reference(cfg: Config, scorer, hs, cache: FeatureCache, labels, problem, eval_rows=None) -> dict[str, Any]:
    from .data import make_split
    from .reference import fit_reference

    train_hs = open_hidden_states(cfg.reference_data)
    check_model_identity(train_hs.model, hs.model, f"reference data {cfg.reference_data}")
    tc = scorer.config
    split = make_split(train_hs, val_fraction=tc.get("val_fraction", 0.15), test_fraction=tc.get("test_fraction", 0.15),
                       seed=tc.get("split_seed", 0))
    rows = split.rows[M.TRAIN]
    x_tr = FeatureCache(train_hs).stack(scorer.sites, rows)
    y_tr = np.asarray(train_hs.steps["label"])[rows]
    predict = fit_reference(x_tr, y_tr, combine=scorer.feature_spec.combine, seed=tc.get("seed", 0))
    ref = predict(cache.stack(scorer.sites, np.arange(hs.num_steps)))
    return {"fitted_on": {"path": str(Path(cfg.reference_data).resolve()), "split": "train",
                          "steps": int(len(rows))},
            **_block(ref, hs, labels, problem, cfg, eval_rows)}


def render(doc: dict[str, Any]) -> str:
    size = doc["size"]
    p, r = doc["probe"], doc.get("reference")
    lines = [f"# Scorer evaluation on {doc['data']['path']}", "",
             f"{size['problems']} problems, {size['traces']} traces, {size['steps']} steps; "
             f"{size['sample_accuracy']:.1%} of traces end correct. Scorer: {doc['scorer']['architecture']} on "
             f"{', '.join(doc['scorer']['sites'])}, calibration {doc['scorer']['calibration']['method']}. "
             "Intervals: 95%, bootstrap over problems.", "",
             "| metric | probe | logistic regression |" + (" compare |" if doc.get("compare") else ""),
             "|---|---|---|" + ("---|" if doc.get("compare") else "")]
    c = doc.get("compare")
    names = ["auroc", "early50_auroc", "trace_auroc", "within_auroc", "within_rank25", "within_rank50",
             "within_rank75", "ece"]
    for n in names:
        lines.append(f"| {n} | {format_interval(p.get(n))} | {format_interval(r.get(n)) if r else 'n/a'} |" + (f" {format_interval(c.get(n))} |" if c else ""))
    lines.append(f"| ece without calibration | {format_interval(doc.get('probe_uncalibrated_ece'))} | |")
    lines += ["", f"within_*: over the {p.get('within_problems')} problems with both outcomes.", ""]
    return "\n".join(lines)
