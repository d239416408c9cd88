"""Package a finished release run as a shipped scorer with its model card.

    python -m stepprobe.training.release --run RUN_DIR --dest stepprobe/released/smollm2-135m

Reads the run of ``scripts/release_scorer.sh`` (pipeline stages collect .. export, and the
out-of-template evaluation ``eval-ood/eval.json``), refuses an incomplete one, and writes
into ``--dest``: ``scorer.safetensors`` + ``scorer.json`` (copied, hash checked on load),
``eval-ood.json``, ``metrics.json`` and ``README.md``, the model card: the data (problems,
traces, steps, accuracy), the recipe, the in-distribution test metrics and the
out-of-template metrics with intervals beside the logistic-regression reference, the
calibration, and the done-means goals (met or missed by how much). :func:`card` alone
writes the card for any run directory (also a partial one, for a report).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from stepprobe.paths import RunPaths
from stepprobe.stats import format_interval

GOALS = {"within_rank50": 0.75, "auroc": 0.80}
ECE_GOAL = 0.05
MIN_PROBLEMS, MIN_TRACES = 1000, 8000


def _load(p: Path) -> dict[str, Any]:
    return json.loads(p.read_text()) if p.is_file() else {}


def _f(v: Any, nd: int = 3) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if x != x else f"{x:.{nd}f}"


def _ci(d: dict[str, Any] | None) -> str:
    return format_interval(d)


def card(run: Path, *, recipe: str = "configs/released-smollm2-135m.yaml") -> str:
    summary = _load(RunPaths(run).collect_summary)
    metrics = _load(RunPaths(run).scorer / "metrics.json")
    ev = _load(RunPaths(run).eval_ood / "eval.json")
    sweep = _load(RunPaths(run).sweep / "sweep.json")
    meta = _load(RunPaths(run).scorer / "scorer.json")
    m = metrics.get("metrics", {})
    test, ref = m.get("test", {}), m.get("reference_test", {})
    cal = metrics.get("calibration") or meta.get("calibration") or {}
    lines = [f"# stepprobe scorer for {meta.get('model', {}).get('name', '?')}", "",
             "Predicts, from the hidden state at a reasoning-step boundary, the probability (calibrated) that the "
             "trace will end with the right answer. Trained by stepprobe on the model's own traces.", "",
             "## Data", ""]
    if summary:
        lines += [f"- {summary.get('problems')} built-in problems (varied phrasings, distractors, multi-step "
                  f"word problems; `{summary.get('config', {}).get('problems', '?')}`), "
                  f"{summary.get('traces')} traces, sampled with temperature "
                  f"{summary.get('config', {}).get('temperature')}, top_p {summary.get('config', {}).get('top_p')}, "
                  f"max {summary.get('config', {}).get('max_tokens')} tokens.",
                  f"- sample accuracy {_f(summary.get('sample_accuracy'))}, majority-of-N "
                  f"{_f(summary.get('majority_vote_accuracy'))}, pass@N {_f(summary.get('pass_at_n'))}; by family: "
                  + ", ".join(f"{k} {_f(v, 2)}" for k, v in (summary.get("sample_accuracy_by_family") or {}).items())]
    steps = metrics.get("num_steps") or {}
    if steps:
        lines.append(f"- step rows: train {steps.get('train')}, validation {steps.get('val')}, test {steps.get('test')} "
                     "(split by problem)")
    lines += ["", "## Recipe", "", f"`scripts/release_scorer.sh` = the pipeline of `{recipe}`, then the "
              "out-of-template set (`builtin-ood:n=160,seed=0`, never trained on), `stepprobe evaluate`, one "
              "self-consistency pass with this scorer on the same problems and `stepprobe replay` of every "
              "policy on it, and this card.", ""]
    spec = metrics.get("feature_spec") or meta.get("feature_spec") or {}
    lines += [f"Probe: **{metrics.get('architecture') or meta.get('architecture')}** on "
              f"{', '.join(spec.get('sites', []))} (combine {spec.get('combine')}), threshold "
              f"{_f(metrics.get('threshold'))} (a calibrated probability). Calibration: {cal.get('method')} "
              f"(a {_f(cal.get('a'))}, b {_f(cal.get('b'))}), fitted on validation.", ""]
    winners = sweep.get("winners") or []
    if winners:
        lines += ["Sweep (linear probes, test AUROC minus the best boundary site's, paired, 95% interval):", "",
                  "| kind | best by validation | test AUROC | minus best boundary |", "|---|---|---|---|"]
        for w in winners:
            d = w.get("test_auroc_minus_boundary") or {}
            lines.append(f"| {w['kind']} | {w['site']} | {_f(w.get('test_auroc'))} | {_ci(d)} |")
        lines.append("")
    lines += ["## Held-out metrics", "", "In-distribution test split (problems never trained on, same generator):", "",
              "| metric | probe | logistic regression |", "|---|---|---|"]
    for n in ("auroc", "early50_auroc", "trace_auroc", "within_rank50", "ece"):
        lines.append(f"| {n} | {_f(test.get(n))} | {_f(ref.get(n))} |")
    if cal.get("ece_before"):
        lines.append(f"| ece before calibration | {_f(cal['ece_before'].get('test'))} | |")
    lines.append("")
    if ev:
        p, r, size = ev.get("probe", {}), ev.get("reference", {}), ev.get("size", {})
        lines += [f"Out-of-template test set ({size.get('problems')} problems, {size.get('traces')} traces, "
                  f"{size.get('steps')} steps, {_f(size.get('sample_accuracy'))} of traces correct; 95% bootstrap "
                  "intervals over problems):", "", "| metric | probe | logistic regression | goal |", "|---|---|---|---|"]
        for n in ("auroc", "early50_auroc", "trace_auroc", "within_rank25", "within_rank50", "within_rank75", "ece"):
            goal = (f">= {GOALS[n]}" if n in GOALS else f"<= {ECE_GOAL}" if n == "ece" else "")
            lines.append(f"| {n} | {_ci(p.get(n))} | {_ci(r.get(n))} | {goal} |")
        lines.append(f"| ece without calibration | {_ci(ev.get('probe_uncalibrated_ece'))} | | |")
        lines.append("")
        verdicts = []
        for n, g in GOALS.items():
            v = (p.get(n) or {}).get("value")
            verdicts.append(f"{n} {_f(v)} vs goal {g}: " + ("met" if v is not None and v >= g else
                                                               f"missed by {_f(g - v) if v is not None else 'n/a'}"))
        v = (p.get("ece") or {}).get("value")
        verdicts.append(f"ECE {_f(v)} vs goal {ECE_GOAL}: " + ("met" if v is not None and v <= ECE_GOAL else
                                                              f"missed by {_f(v - ECE_GOAL) if v is not None else 'n/a'}"))
        lines += ["Goals (point estimates; see the intervals): " + "; ".join(verdicts) + ".", ""]
    lines += _replay_section(run)
    lines += ["## Use", "", "`stepprobe run/bench/serve` with the default model and no `--scorer` use this scorer. "
              "It reads boundary-token hidden states only (what live capture provides).", ""]
    return "\n".join(lines)


#: The KV budget (in blocks, as the replay's config has them) the card's pruning table shows.
CARD_KV = 16


def _replay_section(run: Path) -> list[str]:
    """Pruning with this scorer on the out-of-template problems: the replay of one SC pass
    (``ood-sc`` -> ``ood-replay``), every policy paired with SC, random and oracle beside it."""
    path = RunPaths(run).ood_replay / "replay.json"
    if not path.is_file():
        return []
    from stepprobe.inference.replay import read_replay

    doc = read_replay(path)
    budgets = sorted({r["kv_blocks"] for r in doc["rows"] if r["kv_blocks"]})  # 0 = unlimited: nothing to prune
    if not budgets:
        return []
    kv = CARD_KV if CARD_KV in budgets else budgets[0]  # one budget per table, never a mix
    rows = [r for r in doc["rows"] if r["kv_blocks"] == kv]
    lines = ["## Pruning on the out-of-template problems (replay)", "",
             f"One self-consistency pass (n={doc['source']['run_config'].get('n')}) with this scorer over "
             f"{doc['problems']} out-of-template problems, every policy replayed on those same traces at {kv} KV "
             "blocks (time from the replay's scheduler model; Δ vs SC: paired bootstrap 95% interval over problems; "
             "random prunes as many traces per problem at the same points, oracle prunes wrong traces first):", "",
             "| policy | vote | accuracy | Δ vs SC [95% CI] | random | oracle | x SC time | pruned |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r.get("vs_sc")
        iv = format_interval(d, signed=True, missing="–")
        rnd = _f(r["random"]["accuracy"]) if "random" in r else "–"
        orc = _f(r["oracle"]["accuracy"]) if "oracle" in r else "–"
        policy = r["policy"] + (f" ({r['rule']})" if r.get("rule") else "")
        lines.append(f"| {policy} | {r['vote']} | {_f(r['accuracy'])} | {iv} | {rnd} | {orc} | "
                     f"{_f(r['time_ratio'], 2)} | {r['pruned']}/{r['traces']} |")
    return lines + [""]


def trust_section(dest: Path) -> list[str]:
    """The card's section on ``dest/trust.json`` (``scripts/calibrate_released.sh``): the vote
    and the memory cutoff the scorer earned, and on what."""
    from stepprobe.inference.calibrate import read_trust

    t = read_trust(dest)
    if t is None:
        return []
    v, d, cs = t["vote"], t["default"], t["calibration_set"]
    iv = v["score_minus_majority"]
    cut = d.get("cutoff")
    what = ("**no cutoff earned**, so it prunes nothing and vLLM preempts as usual" if cut is None else
            "**the paper's rule earned** (any scored trace may go)" if cut == "inf" else
            f"**only traces scored below {float(cut):.3f}** may go")
    return ["## Trust (trust.json)", "",
            "`run`, `bench` and `serve` trust this scorer only as far as `trust.json` says: one "
            f"self-consistency pass with it on the {cs['problems']} problems of `{Path(str(cs['problems_source'])).name}` "
            f"(N={t['holds_for']['n']}, KV budgets {', '.join(map(str, t['holds_for']['kv_blocks']))} blocks), "
            "replayed at every candidate cutoff (stepprobe calibrate).", "",
            f"- vote: **{v['rule']}** (score-weighted minus majority {format_interval(iv, signed=True)}; the "
            "weighted vote needs the interval above zero);",
            f"- memory pruning at a tolerance of {d['tolerance']:g} (delta {d['delta']:g}): {what} "
            "(`--max-accuracy-loss none` restores the paper's rule).", ""]


def add_trust_to_card(dest: Path) -> None:
    """Write (or rewrite) the card's trust section from ``dest/trust.json``, before ``## Use``."""
    card_path = dest / "README.md"
    text = card_path.read_text(encoding="utf-8")
    if "## Trust (trust.json)" in text:
        a = text.index("## Trust (trust.json)")
        text = text[:a] + text[text.index("## Use", a):]
    section = "\n".join(trust_section(dest))
    if section:
        text = text.replace("## Use", section + "\n## Use", 1) if "## Use" in text else text + "\n" + section
    card_path.write_text(text, encoding="utf-8")


def release(run: Path, dest: Path) -> Path:
    from stepprobe.errors import StepprobeError
    from stepprobe.probes.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_scorer

    state = _load(RunPaths(run).state)
    stages = state.get("stages", {})
    unfinished = [s for s in ("collect", "record", "sweep", "tune", "export") if stages.get(s, {}).get("status") != "done"]
    if unfinished:
        raise StepprobeError(f"{run}: stage(s) {', '.join(unfinished)} have not finished; nothing is released")
    from stepprobe.data_collection.collect import SUMMARY_KIND, SUMMARY_SCHEMA_VERSION
    from stepprobe.provenance import check_schema

    summary_path = RunPaths(run).collect_summary
    summary = _load(summary_path)
    check_schema(summary, SUMMARY_KIND, SUMMARY_SCHEMA_VERSION, str(summary_path))
    if (summary.get("problems") or 0) < MIN_PROBLEMS or (summary.get("traces") or 0) < MIN_TRACES:
        raise StepprobeError(f"{run}: {summary.get('problems')} problems / {summary.get('traces')} traces; a "
                             f"release needs at least {MIN_PROBLEMS} / {MIN_TRACES}")
    if not (RunPaths(run).eval_ood / "eval.json").is_file():
        raise StepprobeError(f"{run}: no out-of-template evaluation (eval-ood/eval.json)")
    scorer = load_scorer(RunPaths(run).scorer)
    scorer.check_live()
    dest.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE, "metrics.json"):
        shutil.copy2(RunPaths(run).scorer / name, dest / name)
    shutil.copy2(RunPaths(run).eval_ood / "eval.json", dest / "eval-ood.json")
    if (RunPaths(run).ood_replay / "replay.json").is_file():
        shutil.copy2(RunPaths(run).ood_replay / "replay.md", dest / "replay-ood.md")
    (dest / "README.md").write_text(card(run), encoding="utf-8")
    load_scorer(dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    from stepprobe.errors import StepprobeError

    ap = argparse.ArgumentParser(prog="python -m stepprobe.training.release", description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--dest", required=True)
    ap.add_argument("--card-only", action="store_true", help="print the card of --run and write nothing")
    args = ap.parse_args(argv)
    try:
        if args.card_only:
            sys.stdout.write(card(Path(args.run)))
            return 0
        release(Path(args.run), Path(args.dest))
    except StepprobeError as exc:
        sys.stderr.write(f"release: error: {exc}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
