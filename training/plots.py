"""Plots of train runs, sweeps and studies (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr, tpr


def plot_train_run(out: Path, result: Any) -> list[Path]:
    """ROC (val/test, probe and reference), calibration and score-vs-step curves."""
    from .metrics import AUROC, TEST, VAL

    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    preds = result.predictions
    # ROC
    fig, ax = plt.subplots(figsize=(5, 5))
    for split in (VAL, TEST):
        p = preds.get(split)
        if p is None or split not in result.metrics or len(set(p["labels"].tolist())) < 2:
            continue
        fpr, tpr = _roc_curve(p["scores"], p["labels"])
        ax.plot(fpr, tpr, label=f"{split} probe (AUROC {result.metrics[split][AUROC]:.3f})")
        if "reference_scores" in p:
            if "reference_" + split not in result.metrics:
                continue
            fpr, tpr = _roc_curve(p["reference_scores"], p["labels"])
            ax.plot(fpr, tpr, "--", label=f"{split} sklearn LR ({result.metrics['reference_' + split][AUROC]:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate (correct traces' steps)")
    ax.set_title(f"ROC, {result.spec.label} {result.probe.arch}")
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "roc.png"))
    # Calibration
    fig, ax = plt.subplots(figsize=(5, 5))
    bins = np.linspace(0, 1, 11)
    for split in (VAL, TEST):
        p = preds.get(split)
        if p is None:
            continue
        idx = np.clip(np.digitize(p["scores"], bins) - 1, 0, 9)
        xs, ys = [], []
        for b in range(10):
            m = idx == b
            if m.sum() >= 5:
                xs.append(p["scores"][m].mean())
                ys.append(p["labels"][m].mean())
        ax.plot(xs, ys, "o-", label=split)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("mean predicted probability (bin)")
    ax.set_ylabel("fraction of steps from correct traces")
    ax.set_title("calibration")
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "calibration.png"))
    # Score vs step
    split = TEST if TEST in preds else VAL
    p = preds[split]
    fig, ax = plt.subplots(figsize=(6, 4))
    for lab, name, color in ((1, "correct traces", "tab:green"), (0, "incorrect traces", "tab:red")):
        m = p["labels"] == lab
        if not m.any():
            continue
        steps = p["step"][m]
        sc = p["scores"][m]
        top = int(np.quantile(steps, 0.95)) if len(steps) else 0
        xs = np.arange(top + 1)
        mean = np.array([sc[steps == s].mean() if (steps == s).any() else np.nan for s in xs])
        sem = np.array([sc[steps == s].std() / np.sqrt(max((steps == s).sum(), 1)) if (steps == s).any() else np.nan
                        for s in xs])
        ax.plot(xs, mean, color=color, label=f"{name} ({len(np.unique(p['trace'][m]))})")
        ax.fill_between(xs, mean - sem, mean + sem, color=color, alpha=0.2)
    ax.set_xlabel("step index")
    ax.set_ylabel("probe score (mean ± s.e.)")
    ax.set_title(f"score vs. step ({split} split)")
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "score_vs_step.png"))
    return written


def plot_sweep(path: Path, rows: Sequence[dict[str, Any]], metric: str = "auroc") -> Path:
    """Metric against site depth, val and test with their CIs, and the sklearn reference."""
    plt = _plt()
    others = [r for r in rows if r.get("kind", "boundary") != "boundary"]
    rows = sorted([r for r in rows if r.get("kind", "boundary") == "boundary"], key=lambda r: r["depth"])
    x = np.array([r["depth"] for r in rows])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for split, color in (("val", "tab:blue"), ("test", "tab:orange")):
        y = np.array([_f(r.get(f"{split}_{metric}")) for r in rows])
        lo = np.array([_f(r.get(f"{split}_{metric}_lo")) for r in rows])
        hi = np.array([_f(r.get(f"{split}_{metric}_hi")) for r in rows])
        ax.plot(x, y, "o-", color=color, label=f"{split} probe")
        ax.fill_between(x, lo, hi, color=color, alpha=0.15)
        ref = np.array([_f(r.get(f"reference_{split}_{metric}")) for r in rows])
        if np.isfinite(ref).any():
            ax.plot(x, ref, "--", color=color, alpha=0.7, label=f"{split} sklearn LR")
    markers = {"step-mean": "s", "range-mean": "^", "range-concat": "v", "range-mean-of-means": "P",
               "range-concat-of-means": "X"}
    for kind in sorted({r["kind"] for r in others}):
        rs = sorted([r for r in others if r["kind"] == kind], key=lambda r: r["depth"])
        ax.plot([r["depth"] for r in rs], [_f(r.get(f"test_{metric}")) for r in rs], markers.get(kind, "d"),
                ls="-" if kind == "step-mean" else "none", color="tab:green" if kind == "step-mean" else None,
                alpha=0.8, label=f"test, {kind}")
    ax.axhline(0.5, color="grey", ls=":")
    ax.set_xticks(x)
    ax.set_xticklabels([r["site"].replace("layer_", "") for r in rows], rotation=90, fontsize=7)
    ax.set_xlabel("site (embed, decoder layer, final_norm)")
    ax.set_ylabel(f"step-level {metric.upper()} (95% CI by problem)")
    ax.set_title("layer sweep")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _f(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
