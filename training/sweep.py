"""Layer sweep: one probe per site, AUROC against layer on validation and test.

Each site (embed, layer_00 .., final_norm, or the `--sites` given) is read from the HDF5
file once into memory, a probe is trained on it with the same training function as
`stepprobe train` (cheap linear probe by default; `--arch` selects another), and scored on
the validation and test problems of one fixed problem split, with 95% bootstrap
confidence intervals that resample whole problems. The scikit-learn logistic-regression
reference is fitted on the same site and split.

Output directory: sweep.csv (one row per site), sweep.json (kind "stepprobe-sweep":
config, data fingerprint, split, rows, best site by validation AUROC), sweep.png (AUROC
vs. layer). Rerunning the same command resumes: finished sites are kept.
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

from stepprobe.config import StageConfig, option, stage_defaults
from stepprobe.errors import ArtifactMismatch, StepprobeError
from stepprobe.io import atomic_write_json, atomic_write_text, read_json
from stepprobe.options import FitOptions, TrainingOptions, group_values, resume_view
from stepprobe.layers import parse_sites, site_depth
from stepprobe.probes.registry import known_probes
from stepprobe.provenance import package_versions

from . import metrics as M
from .data import FeatureCache, data_fingerprint, make_split, open_hidden_states
from .train import Config as TrainConfig
from .train import train_probe

log = logging.getLogger(__name__)

SWEEP_KIND = "stepprobe-sweep"
SWEEP_SCHEMA_VERSION = 1
@dataclasses.dataclass
@stage_defaults(lr=1e-2, weight_decay=1e-3, batch_size=0, max_epochs=30, patience=5)
class Config(StageConfig, FitOptions, TrainingOptions):
    """Layer sweep."""

    SECTION = "sweep"

    data: str = option("", "HDF5 file written by `stepprobe record`")
    out: str = option("", "output directory (default: <STEPPROBE_HOME>/runs/sweep-<time>)", resume_ok=True)
    sites: str = option("all", "sites to sweep: all, layers, 0-29, layer_10,final_norm, ...")
    arch: str = option("linear", "probe architecture per site: " + ", ".join(a for a in known_probes() if a != "mixture"))
    params: dict = option(help="architecture parameters as JSON", factory=dict)
    bootstrap: int = option(1000, "bootstrap resamples (of problems) for the confidence intervals")
    reference: bool = option(True, "fit the scikit-learn reference per site too")
    overwrite: bool = option(False, "start over in an existing sweep directory", resume_ok=True)
    plots: bool = option(True, "write sweep.png", resume_ok=True)
    progress: bool = option(True, "progress bar over sites", resume_ok=True)

    def check(self) -> None:
        _train_config(self, "layer_00")  # every site's train config is checked when it is built


COLUMNS = ["site", "depth", "val_auroc", "val_auroc_lo", "val_auroc_hi", "test_auroc", "test_auroc_lo",
           "test_auroc_hi", "val_early50_auroc", "test_early50_auroc", "val_trace_auroc", "test_trace_auroc",
           "val_auprc", "test_auprc", "test_ece", "reference_val_auroc", "reference_test_auroc",
           "reference_test_early50_auroc", "val_within_auroc", "test_within_auroc", "test_within_auroc_lo",
           "test_within_auroc_hi", "test_within_rank25", "test_within_rank50", "test_within_rank50_lo",
           "test_within_rank50_hi", "test_within_rank75", "reference_test_within_auroc", "reference_test_within_rank50",
           "best_epoch", "seconds"]


def _train_config(cfg: Config, site: str) -> TrainConfig:
    return TrainConfig(**group_values(cfg, TrainingOptions, FitOptions), data=cfg.data, sites=site, combine="single",
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
            if k != "site":
                r[k] = float(v) if v not in ("", "None", "nan") else float("nan")
        r["depth"] = int(r["depth"])
    return rows


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in sorted(rows, key=lambda r: r["depth"]):
        w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def sweep_site(cfg: Config, hs, site: str, split, cache: FeatureCache) -> dict[str, Any]:
    t0 = time.perf_counter()
    result = train_probe(_train_config(cfg, site), hs, cache=cache, split=split)
    row: dict[str, Any] = {"site": site, "depth": site_depth(site, hs.num_layers)}
    for s in (M.VAL, M.TEST):
        m = result.metrics[s]
        p = result.predictions[s]
        row[f"{s}_auroc"] = m[M.AUROC]
        lo, hi = M.bootstrap_auroc_ci(p["scores"], p["labels"], p["problem"], n=cfg.bootstrap, seed=cfg.seed)
        row[f"{s}_auroc_lo"], row[f"{s}_auroc_hi"] = lo, hi
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
    missing = [s for s in sites if s not in hs.sites]
    if missing:
        raise StepprobeError(f"{cfg.data} has no features for {', '.join(missing)}; it has {', '.join(hs.sites)}")
    fingerprint = data_fingerprint(hs)
    out = Path(cfg.out) if cfg.out else None
    rows: list[dict[str, Any]] = []
    if out and (out / "sweep.json").is_file() and not cfg.overwrite:
        prev = read_json(out / "sweep.json")
        if prev.get("kind") != SWEEP_KIND or prev.get("schema_version") != SWEEP_SCHEMA_VERSION:
            raise ArtifactMismatch(f"{out}/sweep.json is not a sweep of this stepprobe version")
        if prev.get("stable_config") != _stable(cfg) or prev.get("data", {}).get("model") != fingerprint["model"] \
                or prev.get("data", {}).get("num_steps") != fingerprint["num_steps"]:
            raise ArtifactMismatch(f"{out} holds a sweep with another config or data; use another --out or --overwrite")
        rows = [r for r in read_rows(out / "sweep.csv") if r["site"] in sites]
        log.info("resuming sweep in %s: %d of %d sites done", out, len(rows), len(sites))
    else:
        out = prepare_out_dir(cfg.out, "sweep", cfg.overwrite, "sweep.json")
    split = make_split(hs, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.split_seed,
                       max_steps_per_trace=cfg.max_steps_per_trace, subsample_seed=cfg.seed)
    doc = {"kind": SWEEP_KIND, "schema_version": SWEEP_SCHEMA_VERSION, "config": cfg.to_dict(),
           "stable_config": _stable(cfg), "data": fingerprint, "split": split.to_dict(),
           "package_versions": package_versions(), "complete": False}
    atomic_write_json(out / "sweep.json", {**doc, "rows": M.clean({"r": rows})["r"] if rows else []})
    done = {r["site"] for r in rows}
    # One site in memory at a time: each is read from the file exactly once.
    cache = FeatureCache(hs, max_bytes=1)
    t0 = time.perf_counter()
    for site in tqdm([s for s in sites if s not in done], desc="sweep", unit="site", disable=not cfg.progress):
        row = sweep_site(cfg, hs, site, split, cache)
        rows.append(row)
        write_rows(out / "sweep.csv", rows)
        log.info("%s: val AUROC %.3f [%.3f, %.3f], test %.3f [%.3f, %.3f], reference test %.3f (%.1fs)",
                 site, row["val_auroc"], row["val_auroc_lo"], row["val_auroc_hi"], row["test_auroc"],
                 row["test_auroc_lo"], row["test_auroc_hi"], row["reference_test_auroc"], row["seconds"])
    rows = sorted(rows, key=lambda r: r["depth"])
    best = max(rows, key=lambda r: r["val_auroc"] if np.isfinite(r["val_auroc"]) else -1)
    doc.update(complete=True, rows=[M.clean(r) for r in rows], best_site_by_val=best["site"],
               best_val_auroc=best["val_auroc"], best_test_auroc=best["test_auroc"],
               seconds=time.perf_counter() - t0, site_reads=cache.reads)
    atomic_write_json(out / "sweep.json", M.clean(doc))
    write_rows(out / "sweep.csv", rows)
    if cfg.plots:
        from .plots import plot_sweep

        plot_sweep(out / "sweep.png", rows)
    log.info("best site by validation AUROC: %s (val %.3f, test %.3f); %s", best["site"], best["val_auroc"],
             best["test_auroc"], out)
    return out
