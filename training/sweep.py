"""Layer sweep: one probe per site (and per step feature and layer range), AUROC on validation and test.

Candidates: each site (embed, layer_00 .., final_norm, or the `--sites` given) as read at
the boundary token; with `--step-features` (auto: where the file has them) each site's
step mean (`layer_20.mean`, recorded by `stepprobe record --step-mean`); and with
`--ranges W` each window of W consecutive decoder layers combined by `--range-combines`
(mean and/or concat of their boundary states; and of their step means where recorded); with
`--group` each site's features against the trace's siblings (`probes/group_features.py`).
Each site is read from the HDF5
file once into memory, a probe is trained on it with the same training function as
`stepprobe train` (cheap linear probe by default; `--arch` selects another), and scored on
the validation and test problems of one fixed problem split, with 95% bootstrap
confidence intervals that resample whole problems. The scikit-learn logistic-regression
reference is fitted on the same site and split.

Output directory: sweep.csv (one row per site), sweep.json (kind "stepprobe-sweep":
config, data fingerprint, split, rows, best site by validation AUROC, and ``winners``: the
best candidate of each kind by validation and its test AUROC difference from the best
boundary site, paired on the same test steps with a problem-bootstrap interval),
predictions.npz (test scores of every candidate), sweep.png (AUROC vs. layer). Rerunning
the same command resumes: finished candidates are kept.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from stepprobe import locks
from stepprobe.config import StageConfig, option, stage_defaults
from stepprobe.errors import ArtifactMismatch, StepprobeError
from stepprobe.io import atomic_write_json, atomic_write_text, read_json
from stepprobe.options import FitOptions, TrainingOptions, group_values, resume_view
from stepprobe.layers import parse_sites, site_depth
from stepprobe.probes.registry import known_probes
from stepprobe.provenance import package_versions
from stepprobe.stats import N_BOOT, Interval, format_interval

from . import metrics as M
from .data import FeatureCache, check_classes, data_fingerprint, make_split, open_hidden_states
from .evaluation import metric_with_ci, paired_difference
from .train import Config as TrainConfig
from .train import train_probe

log = logging.getLogger(__name__)

SWEEP_KIND = "stepprobe-sweep"
SWEEP_SCHEMA_VERSION = 2  # 2: rows of several kinds (step means, layer ranges), winners


@dataclasses.dataclass
@stage_defaults(lr=1e-2, weight_decay=1e-3, batch_size=0, max_epochs=30, patience=5)
class Config(StageConfig, FitOptions, TrainingOptions):
    """Layer sweep."""

    SECTION = "sweep"

    data: str = option("", "HDF5 file written by `stepprobe record`")
    out: str = option("", "output directory (default: <STEPPROBE_HOME>/runs/sweep-<time>)", resume_ok=True)
    sites: str = option("all", "sites to sweep: all, layers, 0-29, layer_10,final_norm, ...")
    step_features: str = option("auto", "boundary, mean, or boundary,mean (auto: mean too where the file has step "
                                        "means)")
    ranges: int = option(0, "also sweep windows of this many consecutive decoder layers, e.g. 4 (0: none)")
    range_combines: str = option("mean,concat", "how a window's layers combine: mean, concat")
    group: str = option("", "also sweep group features of each site against the trace's siblings (issue 23): any of "
                            "group, group_step, gdev, text (e.g. group,text; empty: none)")
    traces: str = option("", "the collect traces of --data, for --group text (default: the file it was recorded from)")
    arch: str = option("linear", "probe architecture per site: " + ", ".join(a for a in known_probes() if a != "mixture"))
    params: dict = option(help="architecture parameters as JSON", factory=dict)
    bootstrap: int = option(N_BOOT, "bootstrap resamples (of problems) for the confidence intervals")
    reference: bool = option(True, "fit the scikit-learn reference per site too")
    overwrite: bool = option(False, "start over in an existing sweep directory", resume_ok=True)
    plots: bool = option(True, "write sweep.png", resume_ok=True)
    progress: bool = option(True, "progress bar over sites", resume_ok=True)

    def check(self) -> None:
        _train_config(self, "layer_00")  # every site's train config is checked when it is built


COLUMNS = ["site", "kind", "combine", "sites", "depth", "val_auroc", "val_auroc_lo", "val_auroc_hi", "test_auroc", "test_auroc_lo",
           "test_auroc_hi", "val_early50_auroc", "test_early50_auroc", "val_trace_auroc", "test_trace_auroc",
           "val_auprc", "test_auprc", "test_ece", "reference_val_auroc", "reference_test_auroc",
           "reference_test_early50_auroc", "val_within_auroc", "test_within_auroc", "test_within_auroc_lo",
           "test_within_auroc_hi", "test_within_rank25", "test_within_rank50", "test_within_rank50_lo",
           "test_within_rank50_hi", "test_within_rank75", "reference_test_within_auroc", "reference_test_within_rank50",
           "best_epoch", "seconds"]


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One row of the sweep: a feature (sites + combine) with a label and a kind."""

    label: str
    sites: tuple[str, ...]
    combine: str
    kind: str  # boundary, step-mean, range-mean, range-concat (+ "-of-means" for windows of step means)
    depth: float


def candidates(cfg: Config, hs) -> list[Candidate]:
    """The sweep's candidates, in the order they are trained."""
    from stepprobe.layers import layer_index, mean_name

    sites = [s for s in parse_sites(cfg.sites, hs.num_layers) if not s.endswith(".mean")]
    kinds = [k.strip() for k in cfg.step_features.split(",") if k.strip()]
    have_means = set(getattr(hs, "mean_sites", []))
    if kinds == ["auto"]:
        kinds = ["boundary", "mean"] if have_means else ["boundary"]
    bad = [k for k in kinds if k not in ("boundary", "mean")]
    if bad or not kinds:
        raise StepprobeError(f"--step-features: use auto, boundary, mean or boundary,mean (got {cfg.step_features!r})")
    if "mean" in kinds and not have_means:
        raise StepprobeError(f"{cfg.data} has no step means; record them with `stepprobe record --step-mean`")
    out: list[Candidate] = []
    if "boundary" in kinds:
        out += [Candidate(s, (s,), "single", "boundary", site_depth(s, hs.num_layers)) for s in sites]
    if "mean" in kinds:
        out += [Candidate(mean_name(s), (mean_name(s),), "single", "step-mean", site_depth(s, hs.num_layers))
                for s in sites if s in have_means]
    combines = [c.strip() for c in cfg.range_combines.split(",") if c.strip()]
    if [c for c in combines if c not in ("mean", "concat")]:
        raise StepprobeError(f"--range-combines: use mean and/or concat (got {cfg.range_combines!r})")
    if cfg.ranges and cfg.ranges > 1:
        layers = [s for s in sites if layer_index(s) is not None]
        w = int(cfg.ranges)
        windows = [layers[i:i + w] for i in range(0, len(layers) - w + 1, w)]
        for win in windows:
            depth = float(np.mean([site_depth(s, hs.num_layers) for s in win]))
            for c in combines:
                if "boundary" in kinds:
                    out.append(Candidate(f"{c}({win[0]}..{win[-1]})", tuple(win), c, f"range-{c}", depth))
                if "mean" in kinds and all(s in have_means for s in win):
                    ms = tuple(mean_name(s) for s in win)
                    out.append(Candidate(f"{c}({ms[0]}..{ms[-1]})", ms, c, f"range-{c}-of-means", depth))
    out += group_candidates(cfg.group, sites, hs.num_layers)
    if not out:
        raise StepprobeError("the sweep has no candidates; check --sites and --step-features")
    return out


def group_candidates(spec: str, sites: list[str], num_layers: int) -> list[Candidate]:
    """``--group``: per site, a probe on its group features; ``text``: one on the text features."""
    from stepprobe.layers import TEXT_GROUP

    kinds = [k.strip() for k in spec.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ("group", "group_step", "gdev", "text")]
    if bad:
        raise StepprobeError(f"--group: use group, group_step, gdev and/or text (got {spec!r})")
    out = [Candidate(f"{s}.{k}", (f"{s}.{k}",), "single", k, site_depth(s, num_layers))
           for k in kinds if k != "text" for s in sites]
    if "text" in kinds:
        out.append(Candidate(TEXT_GROUP, (TEXT_GROUP,), "single", "text", 0))
    return out


def _train_config(cfg: Config, site: str, combine: str = "single") -> TrainConfig:
    return TrainConfig(**group_values(cfg, TrainingOptions, FitOptions), data=cfg.data, sites=site, combine=combine,
                       arch=cfg.arch, params=dict(cfg.params), reference=cfg.reference, bootstrap=cfg.bootstrap,
                       plots=False, progress=False)


def _stable(cfg: Config) -> dict[str, Any]:
    return resume_view(cfg.to_dict(), Config)


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k, v in r.items():
            if k not in ("site", "kind", "combine", "sites"):
                r[k] = float(v) if v not in ("", "None", "nan") else float("nan")
        r.setdefault("kind", "boundary")
    return rows


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in sorted(rows, key=_order):
        w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def _order(r: dict[str, Any]) -> tuple:
    return (KIND_ORDER.get(r.get("kind", "boundary"), 9), float(r["depth"]), r["site"])


KIND_ORDER = {"boundary": 0, "step-mean": 1, "range-mean": 2, "range-concat": 3, "range-mean-of-means": 4,
              "range-concat-of-means": 5, "group": 6, "group_step": 7, "gdev": 8, "text": 9}


def sweep_site(cfg: Config, hs, cand: Candidate | str, split, cache: FeatureCache) -> dict[str, Any]:
    if isinstance(cand, str):
        cand = Candidate(cand, (cand,), "single", "boundary", site_depth(cand, hs.num_layers))
    t0 = time.perf_counter()
    result = train_probe(_train_config(cfg, ",".join(cand.sites), cand.combine), hs, cache=cache, split=split)
    row: dict[str, Any] = {"site": cand.label, "kind": cand.kind, "combine": cand.combine,
                           "sites": "+".join(cand.sites), "depth": cand.depth}
    row["_test_scores"] = result.predictions[M.TEST]["scores"]
    for s in (M.VAL, M.TEST):
        m = result.metrics[s]
        p = result.predictions[s]
        row[f"{s}_auroc"] = m[M.AUROC]
        iv = metric_with_ci("auroc", p["scores"], p["labels"], p["problem"], n=cfg.bootstrap, seed=cfg.seed)
        row[f"{s}_auroc_lo"], row[f"{s}_auroc_hi"] = iv.low, iv.high
        row[f"{s}_early50_auroc"] = m[M.EARLY_AUROC[0.5]]
        row[f"{s}_trace_auroc"] = m[M.TRACE_AUROC]
        row[f"{s}_auprc"] = m[M.AUPRC]
    row["test_ece"] = result.metrics[M.TEST][M.ECE]
    for s in (M.VAL, M.TEST):
        ref = result.metrics.get(f"reference_{s}")
        row[f"reference_{s}_auroc"] = ref[M.AUROC] if ref else float("nan")
    ref_t = result.metrics.get("reference_test")
    row["reference_test_early50_auroc"] = ref_t[M.EARLY_AUROC[0.5]] if ref_t else float("nan")
    row["val_within_auroc"] = result.metrics[M.VAL][M.WITHIN_AUROC]
    test = result.metrics[M.TEST]
    for name in ("within_auroc", "within_auroc_lo", "within_auroc_hi", "within_rank25", "within_rank50",
                 "within_rank50_lo", "within_rank50_hi", "within_rank75"):
        row[f"test_{name}"] = test.get(name, float("nan"))
    for name in ("within_auroc", "within_rank50"):
        row[f"reference_test_{name}"] = ref_t.get(name, float("nan")) if ref_t else float("nan")
    row["best_epoch"] = float(result.best_epoch if result.best_epoch is not None else -1)
    row["seconds"] = time.perf_counter() - t0
    return row


def run(cfg: Config) -> Path:
    from .train import prepare_out_dir

    if not cfg.data:
        raise StepprobeError("--data (an HDF5 file from `stepprobe record`) is required")
    hs = open_hidden_states(cfg.data)
    sites = parse_sites(cfg.sites, hs.num_layers)
    missing = [s for s in sites if s not in hs.feature_names]
    if missing:
        raise StepprobeError(f"{cfg.data} has no features for {', '.join(missing)}; it has {', '.join(hs.sites)}")
    cands = candidates(cfg, hs)
    labels = [c.label for c in cands]
    fingerprint = data_fingerprint(hs)
    split = make_split(hs, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.split_seed,
                       max_steps_per_trace=cfg.max_steps_per_trace, subsample_seed=cfg.seed)
    check_classes(split, hs)
    out = Path(cfg.out) if cfg.out else None
    if out:
        locks.hold(out)  # one writer per sweep directory (resumed or new)
    rows: list[dict[str, Any]] = []
    test_scores: dict[str, np.ndarray] = {}
    if out and (out / "sweep.json").is_file() and not cfg.overwrite:
        prev = read_json(out / "sweep.json")
        if prev.get("kind") != SWEEP_KIND or prev.get("schema_version") != SWEEP_SCHEMA_VERSION:
            raise ArtifactMismatch(f"{out}/sweep.json is not a sweep of this stepprobe version")
        if prev.get("stable_config") != _stable(cfg) or prev.get("data", {}).get("model") != fingerprint["model"] \
                or prev.get("data", {}).get("num_steps") != fingerprint["num_steps"]:
            raise ArtifactMismatch(f"{out} holds a sweep with another config or data; use another --output or --overwrite")
        test_scores = _read_predictions(out)
        rows = [r for r in read_rows(out / "sweep.csv") if r["site"] in labels and r["site"] in test_scores]
        log.info("resuming sweep in %s: %d of %d candidates done", out, len(rows), len(cands))
    else:
        out = prepare_out_dir(cfg.out, "sweep", cfg.overwrite, "sweep.json")
    doc = {"kind": SWEEP_KIND, "schema_version": SWEEP_SCHEMA_VERSION, "config": cfg.to_dict(),
           "stable_config": _stable(cfg), "data": fingerprint, "split": split.to_dict(),
           "candidates": [dataclasses.asdict(c) for c in cands],
           "package_versions": package_versions(), "complete": False}
    atomic_write_json(out / "sweep.json", {**doc, "rows": M.clean({"r": rows})["r"] if rows else []})
    done = {r["site"] for r in rows}
    # Whole sites in memory, least recently used out: each site is read from the file about once.
    cache = FeatureCache(hs, max_bytes=1 << 30, traces=cfg.traces or None)
    t0 = time.perf_counter()
    for cand in tqdm([c for c in cands if c.label not in done], desc="sweep", unit="candidate",
                     disable=not cfg.progress):
        row = sweep_site(cfg, hs, cand, split, cache)
        test_scores[cand.label] = row.pop("_test_scores")
        rows.append(row)
        _write_predictions(out, test_scores, hs, split)
        write_rows(out / "sweep.csv", rows)
        log.info("%s: val AUROC %s, test %s, reference test %.3f (%.1fs)", cand.label,
                 Interval.from_flat(row, "val_auroc").label(), Interval.from_flat(row, "test_auroc").label(),
                 row["reference_test_auroc"], row["seconds"])
    rows = sorted(rows, key=_order)
    best = _best(rows)
    winners = compare_winners(rows, test_scores, hs, split, n=cfg.bootstrap, seed=cfg.seed)
    doc.update(complete=True, rows=[M.clean(r) for r in rows], best_site_by_val=best["site"],
               best_val_auroc=best["val_auroc"], best_test_auroc=best["test_auroc"], winners=winners,
               seconds=time.perf_counter() - t0, site_reads=cache.reads)
    atomic_write_json(out / "sweep.json", M.clean(doc))
    write_rows(out / "sweep.csv", rows)
    if cfg.plots:
        from .plots import plot_sweep

        plot_sweep(out / "sweep.png", rows)
    log.info("best candidate by validation AUROC: %s (val %.3f, test %.3f); %s", best["site"], best["val_auroc"],
             best["test_auroc"], out)
    for w in winners:
        log.info("best %s: %s (val %.3f, test %.3f; test minus best boundary site %s)", w["kind"], w["site"],
                 w["val_auroc"], w["test_auroc"], format_interval(w["test_auroc_minus_boundary"], signed=True))
    return out


def _best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return max(rows, key=lambda r: r["val_auroc"] if np.isfinite(r["val_auroc"]) else -1)


def _write_predictions(out: Path, scores: dict[str, np.ndarray], hs, split) -> None:
    from .data import row_problem_ids

    rows = split.rows[M.TEST]
    tmp = out / ".predictions.tmp.npz"
    np.savez(tmp, __rows__=rows, __labels__=np.asarray(hs.steps["label"])[rows],
             __problem__=row_problem_ids(hs)[rows].astype(str), __names__=np.asarray(list(scores), dtype=str),
             **{f"s{i}": v for i, v in enumerate(scores.values())})
    tmp.replace(out / "predictions.npz")


def _read_predictions(out: Path) -> dict[str, np.ndarray]:
    path = out / "predictions.npz"
    if not path.is_file():
        return {}
    with np.load(path) as z:
        return {str(name): z[f"s{i}"] for i, name in enumerate(z["__names__"])}


def compare_winners(rows: list[dict[str, Any]], test_scores: dict[str, np.ndarray], hs, split, *, n: int = N_BOOT,
                    seed: int = 0) -> list[dict[str, Any]]:
    """Best candidate of each kind (by validation AUROC) and its test AUROC minus the best
    boundary site's, on the same test steps, with a paired problem-bootstrap interval."""
    from .data import row_problem_ids

    test_rows = split.rows[M.TEST]
    labels = np.asarray(hs.steps["label"])[test_rows]
    groups = row_problem_ids(hs)[test_rows]
    boundary = [r for r in rows if r.get("kind") == "boundary"]
    base = _best(boundary) if boundary else None
    out = []
    for kind in sorted({r.get("kind", "boundary") for r in rows}, key=lambda k: KIND_ORDER.get(k, 9)):
        w = _best([r for r in rows if r.get("kind", "boundary") == kind])
        entry = {"kind": kind, "site": w["site"], "val_auroc": w["val_auroc"], "test_auroc": w["test_auroc"],
                 "test_auroc_lo": w["test_auroc_lo"], "test_auroc_hi": w["test_auroc_hi"]}
        if base is not None and w["site"] in test_scores and base["site"] in test_scores:
            entry["baseline"] = base["site"]
            entry["test_auroc_minus_boundary"] = paired_difference(
                "auroc", test_scores[w["site"]], test_scores[base["site"]], labels, groups, n=n, seed=seed).to_dict()
        else:
            entry["test_auroc_minus_boundary"] = Interval(float("nan"), float("nan"), float("nan")).to_dict()
        out.append(entry)
    overall = _best(rows)
    for e in out:
        e["overall_best_by_val"] = e["site"] == overall["site"]
    return out
