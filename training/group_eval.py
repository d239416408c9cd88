"""Issue 23's measurement: group-aware variants and baselines on the protocol's sets.

``python -m stepprobe.training.group_eval --train-h5 T.h5 --test NAME=H5[,TRACES] ... --out DIR``

1. choose, on the training file only: a sweep (``stepprobe sweep --group group,group_step,gdev,text``,
   the pipeline's split) and, per feature kind, the candidate with the best validation
   within-problem AUROC (docs/group_signal.md);
2. retrain each chosen candidate with the sweep's own config and split (same seed: the sweep's probe);
3. score every test set with them and with the baselines (the released scorer, a further
   scorer such as the main job's, the logistic-regression reference on the released scorer's
   site, the untrained text agreement, a scorer's score relative to its siblings);
4. within-problem ranking at 25 % / 50 % of steps with bootstrap intervals over problems, the
   paired difference to the released scorer, and the replay at 16 KV blocks (memory and
   memory:group_gap: accuracy minus random pruning and Δ vs SC) on each set's collected traces.

Writes ``group_eval.json`` and ``group_eval.md`` into ``--out``. Offline only.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np

from stepprobe.io import atomic_write_json, atomic_write_text
from stepprobe.layers import TEXT_GROUP, split_group
from stepprobe.probes import group_features as G
from stepprobe.stats import Interval, mean_interval, paired_bootstrap

from . import metrics as M
from .data import FeatureCache, open_hidden_states, row_problem_ids

log = logging.getLogger(__name__)

KINDS = ("boundary", "group", "group_step", "gdev", "text")
FRACTIONS = (0.25, 0.5)
BOOT = 1000  # the protocol's resample count (docs/group_signal.md), fixed before any result, not stats.N_BOOT
REPLAY_RULES = (("memory", "score"), ("memory", "majority"), ("memory:group_gap", "majority"))


def ranking(scores: np.ndarray, hs, keep: np.ndarray) -> dict[str, Any]:
    """Within-problem ranking at 25 / 50 % with intervals, and the per-problem values (for pairing)."""
    st = hs.steps
    pid = row_problem_ids(hs)
    out: dict[str, Any] = {}
    for f in FRACTIONS:
        per = M.within_problem_rank(scores[keep], np.asarray(st["label"])[keep], np.asarray(st["trace"])[keep],
                                    pid[keep], np.asarray(st["rel_position"])[keep], f)
        iv = mean_interval(list(per.values()), n_boot=BOOT)
        out[f"rank{int(f * 100)}"] = {"value": float(np.mean(list(per.values()))) if per else float("nan"),
                                      "lo": iv.low, "hi": iv.high, "problems": len(per), "per_problem": per}
    return out


def paired(per_a: dict[str, float], per_b: dict[str, float]) -> dict[str, float]:
    """mean(b) - mean(a) over the problems both rank, paired bootstrap over problems."""
    common = sorted(set(per_a) & set(per_b))
    d = paired_bootstrap([per_a[p] for p in common], [per_b[p] for p in common])
    return {"value": d.diff, "lo": d.low, "hi": d.high}


def choose(train_h5: str, out: Path, sites: str) -> tuple[dict[str, str], Any]:
    """Run (or resume) the sweep with group candidates on the training file, in ``out``; the best
    candidate of each kind by validation within-problem AUROC (ties: validation AUROC)."""
    from . import sweep

    cfg = sweep.Config(data=train_h5, out=str(out), sites=sites, group="group,group_step,gdev,text",
                       step_features="boundary", progress=False)
    done = out / "sweep.json"
    if not (done.is_file() and json.loads(done.read_text()).get("complete")):  # a finished choice is reused as is
        sweep.run(cfg)
    rows = sweep.read_rows(out / "sweep.csv")
    chosen = {}
    for kind in KINDS:
        cand = [r for r in rows if r["kind"] == kind and np.isfinite(r["val_within_auroc"])]
        if cand:
            chosen[kind] = max(cand, key=lambda r: (r["val_within_auroc"], r["val_auroc"]))["site"]
    return chosen, cfg


def train_chosen(cfg, hs, label: str):
    from .data import make_split
    from .sweep import _train_config
    from .train import train_probe

    split = make_split(hs, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.split_seed,
                       max_steps_per_trace=cfg.max_steps_per_trace, subsample_seed=cfg.seed)
    return train_probe(_train_config(cfg, label), hs, cache=FeatureCache(hs), split=split), split


def features_on(hs, label: str, train_hs, traces: str | None, memo: dict) -> np.ndarray:
    """``label``'s features on a test file: group features standardized with the training file's statistics."""
    site, kind = split_group(label)
    if kind is None:
        return np.asarray(hs.features(label), dtype=np.float32)
    stats = None if label == TEXT_GROUP else G.standardize_stats(train_hs.features(site))
    return G.compute_feature(hs, label, lambda s: np.asarray(hs.features(s), dtype=np.float32), traces=traces,
                             stats=stats, memo=memo)


def replay_rows(hs, traces: str, scores: np.ndarray, keep_problems: set[str]) -> dict[str, Any]:
    """Replay at 16 KV blocks of the collected traces with these step scores (inference/replay.py)."""
    st = hs.steps
    ids = np.asarray(hs.problems["problem_id"]).astype(str)
    t_prob, t_sample = np.asarray(hs.traces["problem"]), np.asarray(hs.traces["sample_index"])
    by_trace: dict[tuple[str, int], tuple[list[int], list[float]]] = {}
    for r, (tr, pos) in enumerate(zip(np.asarray(st["trace"]), np.asarray(st["position"]))):
        key = (ids[t_prob[tr]], int(t_sample[tr]))
        by_trace.setdefault(key, ([], []))
        by_trace[key][0].append(int(pos))
        by_trace[key][1].append(float(scores[r]))
    records = []
    with open(traces, encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            rec = json.loads(line) if line.strip() else {}
            if n == 0 or "traces" not in rec or str(rec["problem_id"]) not in keep_problems:
                continue
            pid = str(rec["problem_id"])
            tr = []
            for t in rec["traces"]:
                pos, sc = by_trace.get((pid, int(t["sample_index"])), ([], []))
                order = np.argsort(pos)
                tr.append({"index": int(t["sample_index"]), "num_tokens": int(t["num_tokens"]),
                           "answer": t.get("extracted_answer"), "correct": bool(t.get("correct")),
                           "step_positions": [pos[i] for i in order], "step_scores": [sc[i] for i in order],
                           "score": float(np.mean(sc)) if sc else None})  # the score vote's weight: the mean
            records.append({"problem_id": pid, "prompt_tokens": len(rec.get("prompt_token_ids") or []), "traces": tr})
    return replay_records(records)


def replay_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    from stepprobe.inference import replay as R

    problems = R.build_problems(records)
    cfg = R.Config(kv_blocks=[16], policies=["none", "memory", "memory:group_gap"], votes=["majority", "score"],
                   trust=None, admission=False)
    params = R.params_from(cfg, {"config": {}})
    out: dict[str, Any] = {}
    for row in R.replay(problems, cfg, params)["rows"]:
        if row["policy"] == "none":
            out["sc_accuracy"] = row["accuracy"]
            continue
        key = f"{row['policy']}/{row['vote']}"
        vs = row.get("vs_sc", {})
        rnd = row.get("random", {}).get("policy_minus", {})
        out[key] = {"accuracy": row["accuracy"], "pruned": row["pruned"], "traces": row["traces"],
                    "vs_sc": [vs.get("diff"), vs.get("low"), vs.get("high")],
                    "minus_random": [rnd.get("diff"), rnd.get("low"), rnd.get("high")]}
    return out


def evaluate_set(name: str, h5: str, traces: str, scorers: dict[str, Callable], exclude_questions: set[str]) -> dict:
    hs = open_hidden_states(h5)
    qs = [" ".join(str(q).split()) for q in np.asarray(hs.problems["question"]).astype(str)]
    ids = np.asarray(hs.problems["problem_id"]).astype(str)
    keep_problems = {i for i, q in zip(ids, qs) if q not in exclude_questions}
    keep = np.isin(row_problem_ids(hs), sorted(keep_problems))
    memo: dict = {}
    res: dict[str, Any] = {"problems": len(keep_problems), "steps": int(keep.sum()), "variants": {}}
    vis_n = G.siblings_of(hs, "time")
    for label, fn in scorers.items():
        scores = np.asarray(fn(hs, traces, memo, vis_n), dtype=np.float64)
        entry = {"ranking": ranking(scores, hs, keep)}
        entry["replay16"] = replay_rows(hs, traces, scores, keep_problems)
        res["variants"][label] = entry
        r = entry["ranking"]
        log.info("%s %s: rank25 %s rank50 %s", name, label, Interval.from_dict(r["rank25"]).label(),
                 Interval.from_dict(r["rank50"]).label())
    base = res["variants"].get("released scorer")
    if base:
        for label, e in res["variants"].items():
            for f in ("rank25", "rank50"):
                e["ranking"][f]["minus_released"] = paired(base["ranking"][f]["per_problem"], e["ranking"][f]["per_problem"])
    return res


def sc_pass(results: str) -> dict[str, Any]:
    """On a run's SC pass (policy none, --record-confidence): ranking of token confidence (mean of
    the last 64 tokens' confidences up to the boundary), the untrained text agreement and the
    run's own scorer, on the same traces."""
    from stepprobe.inference.replay import load_run

    _, records = load_run(results)
    problem, trace, step, position, label, conf, live, texts = [], [], [], [], [], [], [], []
    t_id = 0
    for r in records:
        for t in r["traces"]:
            tc = np.asarray(t.get("token_confidence") or [], dtype=np.float64)
            for k, (pos, s) in enumerate(zip(t.get("step_positions", []), t.get("step_scores", []))):
                problem.append(r["problem_id"]); trace.append(t_id); step.append(k); position.append(int(pos))
                label.append(int(bool(t.get("correct")))); live.append(float(s))
                conf.append(float(tc[max(0, pos - 63):pos + 1].mean()) if len(tc) else 0.0)
                texts.append(G._prefix(t.get("text") or "", k, "\n\n")[0])
            t_id += 1
    problem, trace, step = np.asarray(problem), np.asarray(trace), np.asarray(step)
    n_steps = np.bincount(trace)[trace]
    rel = step / n_steps
    vis = G.visible_siblings(problem, trace, step, np.asarray(position), "time")
    text = G.text_agreement(texts, vis, np.full(len(trace), 7))
    out = {"problems": len(records), "steps": len(trace)}
    for name, s in (("token confidence", np.asarray(conf)), ("text agreement", text), ("run's scorer (live)", np.asarray(live))):
        per = {f: M.within_problem_rank(s, np.asarray(label), trace, problem, rel, f) for f in FRACTIONS}
        ivs = {f: mean_interval(list(p.values()), n_boot=BOOT) for f, p in per.items()}
        out[name] = {f"rank{int(f * 100)}": {"value": float(np.mean(list(p.values()))), "problems": len(p),
                                             "lo": ivs[f].low, "hi": ivs[f].high} for f, p in per.items()}
    return out


def build_scorers(args, train_hs, chosen: dict[str, Any], cfg) -> dict[str, Callable]:
    """Every variant and baseline as ``fn(hs, traces, memo, (vis, n_sib)) -> step scores``."""
    from stepprobe.probes.checkpoint import load_scorer

    from .module import predict
    from .reference import fit_reference

    def scorer_fn(path: str) -> Callable:
        sc = load_scorer(path)
        return lambda hs, tr, memo, vn: sc.score({s: np.asarray(hs.features(s), dtype=np.float32)
                                                 for s in sc.sites}).double().numpy()

    released = scorer_fn(args.released)
    fns: dict[str, Callable] = {"released scorer": released}
    for spec in args.scorer:
        name, _, path = spec.partition("=")
        fns[name] = scorer_fn(path)
    site = load_scorer(args.released).sites[0]
    from .data import make_split

    tr_rows = make_split(train_hs, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                         seed=cfg.split_seed).rows[M.TRAIN]
    ref = fit_reference(np.asarray(train_hs.features(site), dtype=np.float32)[tr_rows][:, None, :],
                        np.asarray(train_hs.steps["label"])[tr_rows], seed=0)
    fns[f"logistic-regression reference ({site})"] = lambda hs, tr, memo, vn: ref(
        np.asarray(hs.features(site), dtype=np.float32)[:, None, :])
    fns["text agreement (untrained)"] = lambda hs, tr, memo, vn: G.text_agreement(G.step_texts(hs, tr), *vn)
    fns["released scorer minus siblings"] = lambda hs, tr, memo, vn: G.relative_to_siblings(
        released(hs, tr, memo, vn), vn[0])
    for kind, label in chosen.items():
        res, _ = train_chosen(cfg, train_hs, label)
        log.info("chosen %s: %s (training file's test split: rank50 %.3f)", kind, label,
                 res.metrics[M.TEST].get("within_rank50", float("nan")))

        def fn(hs, tr, memo, vn, label=label, probe=res.probe):
            return predict(probe, features_on(hs, label, train_hs, tr, memo)[:, None, :])

        fns[f"probe on {label} ({kind})"] = fn
    return fns


def render(doc: dict[str, Any]) -> str:
    def ci(d: dict | list | None, signed: bool = True) -> str:
        if not d:
            return "–"
        iv = Interval.from_dict(d) if isinstance(d, dict) else Interval(*(np.nan if x is None else x for x in d))
        return "–" if not np.isfinite(iv.value) else iv.label(signed=signed)

    out = [f"Chosen on the training file's validation split: {doc['chosen']}", ""]
    for name, res in doc["sets"].items():
        out += [f"### {name} ({res['problems']} problems, {res['steps']} steps)", "",
                "| scorer | ranking @25% | ranking @50% | @50% minus released | SC @16 | memory (score vote): minus random / Δ vs SC "
                "| memory (majority): minus random / Δ vs SC | memory:group_gap: minus random / Δ vs SC |",
                "|---|---|---|---|---|---|---|---|"]
        for label, e in res["variants"].items():
            r, rp = e["ranking"], e["replay16"]
            cells = [f"{ci(rp[k]['minus_random'])} / {ci(rp[k]['vs_sc'])}" if k in rp else "–"
                     for k in ("memory/score", "memory/majority", "memory:group_gap/majority")]
            out.append(f"| {label} | {ci(r['rank25'], False)} | {ci(r['rank50'], False)} | {ci(r['rank50'].get('minus_released'))} "
                       f"| {rp.get('sc_accuracy', float('nan')):.3f} | " + " | ".join(cells) + " |")
        out.append("")
    if doc.get("sc_pass"):
        s = doc["sc_pass"]
        out += [f"### The main job's SC pass ({s['problems']} problems, {s['steps']} steps; token confidences recorded)", "",
                "| score | ranking @25% | ranking @50% |", "|---|---|---|"]
        for k, v in s.items():
            if isinstance(v, dict):
                out.append(f"| {k} | {ci(v['rank25'], False)} | {ci(v['rank50'], False)} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-h5", required=True)
    p.add_argument("--sites", default="3,7,11,15,19,21,23,25,27,28,29,final_norm")
    p.add_argument("--test", action="append", default=[], help="NAME=H5,TRACES (repeatable)")
    p.add_argument("--released", default=str(Path(__file__).resolve().parents[1] / "stepprobe/released/smollm2-135m"))
    p.add_argument("--scorer", action="append", default=[], help="NAME=DIR: a further scorer to compare")
    p.add_argument("--sc-pass", default="", help="a run's SC pass with token confidences (baselines on it)")
    p.add_argument("--out", required=True)
    p.add_argument("--sweep-dir", default="", help="the choice's sweep (default: <out>/sweep; resumed when there)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_hs = open_hidden_states(args.train_h5)
    chosen, cfg = choose(args.train_h5, Path(args.sweep_dir) if args.sweep_dir else out / "sweep", args.sites)
    exclude = {" ".join(str(q).split()) for q in np.asarray(train_hs.problems["question"]).astype(str)}
    fns = build_scorers(args, train_hs, chosen, cfg)
    doc: dict[str, Any] = {"chosen": chosen, "sites": args.sites, "sets": {}}
    for spec in args.test:
        name, _, paths = spec.rpartition("=")
        h5, _, traces = paths.partition(",")
        doc["sets"][name] = evaluate_set(name, h5, traces, fns, exclude)
        atomic_write_json(out / "group_eval.json", M.clean(doc))
    if args.sc_pass:
        doc["sc_pass"] = sc_pass(args.sc_pass)
    atomic_write_json(out / "group_eval.json", M.clean(doc))
    atomic_write_text(out / "group_eval.md", render(doc))
    log.info("wrote %s", out / "group_eval.md")


if __name__ == "__main__":
    main()
