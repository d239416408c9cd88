"""Replay's comparisons: one policy at one budget through the scheduler model, its baselines
(random and oracle pruning, SC with fewer traces, admission-sized SC), the table of every policy
at every budget, and the check against a bench's live policies."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from stepprobe.options import PruningOptions
from stepprobe.stats import paired_bootstrap
from stepprobe.voting import DEFAULT_VOTE

from .deciders import DECIDERS, apply_min_live, parse_policy, vote_correct
from .kv_model import simulate
from .policies import POLICIES
from .replay_data import Params, Problem, build_problems, params_from, trust_cutoffs


@dataclasses.dataclass
class Outcome:
    """One policy at one budget: per problem, which traces were pruned and at how many tokens."""

    policy: str
    kv_blocks: int
    vote: str
    pruned: list[list[bool]]
    tokens: list[list[int]]
    preemptions: int
    steps: int
    computed_tokens: int
    correct: list[bool]
    votes: list[str] = dataclasses.field(default_factory=list)


def run_policy(problems: list[Problem], policy: str, kv_blocks: int, config: Any, params: Params, *,
               cutoff: Any = None, vote: str | Sequence[str] | None = None, max_num_seqs: int | None = None,
               subset: list[int] | None = None) -> Outcome:
    """One policy at one budget. ``cutoff``: memory pruning only below it (one, or one per problem);
    ``vote``: instead of the policy's own (one, or one per problem); ``max_num_seqs``: instead of the config's; ``subset[i]``: only the first
    ``subset[i]`` traces of problem i are sampled (self-consistency with fewer traces)."""
    full = [[t.num_tokens for t in pr.traces] for pr in problems]
    name = policy
    policy, rule = parse_policy(policy, config.memory_victim)
    if policy in DECIDERS:
        cuts = [DECIDERS[policy](pr, params) for pr in problems]
        if policy != "relative":
            cuts = [apply_min_live(pr, c, params.min_live) for pr, c in zip(problems, cuts)]
        targets = [[c if c is not None else n for c, n in zip(cs, ns)] for cs, ns in zip(cuts, full)]
    else:
        cuts = [[None] * len(pr.traces) for pr in problems]
        targets = full
    phases = follow = None
    if subset is not None:
        phases = [[(i, k) for i, pr in enumerate(problems) for k in range(min(subset[i], len(pr.traces)))]]
    if policy == "confidence":  # warm-up traces first; a problem's rest once its warm-up finished
        w = params.conf_warmup
        phases = [[(i, k) for i, pr in enumerate(problems) for k in range(min(w, len(pr.traces)))]]
        follow = {i: [(i, k) for k in range(w, len(pr.traces))] for i, pr in enumerate(problems)
                  if len(pr.traces) > w}
    sim = simulate(problems, targets, kv_blocks=kv_blocks, block_size=config.block_size,
                   max_num_batched_tokens=config.max_num_batched_tokens,
                   max_num_seqs=max_num_seqs or config.max_num_seqs, memory=policy == "memory", params=params,
                   protect_last=config.protect_last, phases=phases, memory_rule=rule, follow=follow, cutoff=cutoff)
    pruned = [[(c is not None) or m for c, m in zip(cs, ms)] for cs, ms in zip(cuts, sim.memory_pruned)]
    if subset is not None:  # traces never sampled do not vote
        pruned = [[p or k >= subset[i] for k, p in enumerate(pm)] for i, pm in enumerate(pruned)]
    votes = list(vote) if isinstance(vote, (list, tuple)) else [vote or DEFAULT_VOTE.get(policy, "majority")] * len(problems)
    correct = [vote_correct(pr, pm, v) for pr, pm, v in zip(problems, pruned, votes)]
    label = votes[0] if len(set(votes)) <= 1 else "per fold"
    return Outcome(name, kv_blocks, label, pruned, sim.tokens, sum(map(sum, sim.preemptions)), sim.steps,
                   sim.computed_tokens, correct, votes)


def baselines(problems: list[Problem], outcome: Outcome, draws: int, seed: int) -> dict[str, list[float]]:
    """Random and oracle pruning of the same number of traces per problem at the same points."""
    rng = np.random.default_rng(seed)
    rand, oracle = [], []
    for pr, pm, toks, vote in zip(problems, outcome.pruned, outcome.tokens, outcome.votes):
        n = len(pr.traces)
        points = [toks[k] for k in range(n) if pm[k]]
        if not points:
            c = vote_correct(pr, [False] * n, vote)
            rand.append(float(c))
            oracle.append(float(c))
            continue
        hits = 0
        for _ in range(draws):
            who = rng.permutation(n)[: len(points)]
            mask = [False] * n
            for k, cut in zip(who, points):
                mask[k] = cut < pr.traces[k].num_tokens  # a trace shorter than the point finished on its own
            hits += vote_correct(pr, mask, vote)
        rand.append(hits / draws)
        order = sorted(range(n), key=lambda k: (pr.traces[k].correct, k))  # wrong traces first
        mask = [False] * n
        for k, cut in zip(order[: len(points)], sorted(points)):
            mask[k] = cut < pr.traces[k].num_tokens
        oracle.append(float(vote_correct(pr, mask, vote)))
    return {"random": rand, "oracle": oracle}


def fewer_traces(problems: list[Problem], outcome: Outcome) -> list[int]:
    """Self-consistency with fewer traces at the same output tokens: per problem, how many of its
    first traces (sampled in full) come closest to the tokens the policy spent on it (at least one)."""
    out = []
    for pr, toks in zip(problems, outcome.tokens):
        spent = sum(toks)
        cum = np.cumsum([t.num_tokens for t in pr.traces])
        out.append(int(np.argmin(np.abs(cum - spent))) + 1)
    return out


def admission_seqs(problems: list[Problem], kv_blocks: int, config: Any, params: Params) -> tuple[int, Outcome]:
    """The largest ``max_num_seqs`` at which self-consistency never preempts at this budget
    (what a careful user would set instead of pruning), with its outcome."""
    smallest = min(pr.prompt_tokens + 1 for pr in problems)  # no more than this many fit at once anyway
    lo, hi = 1, max(1, min(int(config.max_num_seqs), kv_blocks * config.block_size // smallest + 1))
    best = None
    while lo <= hi:  # preemptions grow with the requests admitted at once
        mid = (lo + hi) // 2
        o = run_policy(problems, "none", kv_blocks, config, params, max_num_seqs=mid)
        if o.preemptions == 0:
            best, lo = (mid, o), mid + 1
        else:
            hi = mid - 1
    if best is None:
        o = run_policy(problems, "none", kv_blocks, config, params, max_num_seqs=1)
        best = (1, o)
    return best



def replay(problems: list[Problem], config: Any, params: Params, trust: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every policy at every budget, with each vote asked for: rows of bench's table plus
    intervals and baselines (random and oracle pruning; SC with fewer traces at the same tokens;
    SC admitted so it never preempts; the risk-controlled rule of ``trust``)."""
    from tqdm import tqdm

    rows = []
    risk = trust_cutoffs(problems, trust) if trust else None
    work = [(kv, p, v) for kv in config.kv_blocks for p in config.policies for v in _votes_of(p, config.votes)]
    bar = tqdm(total=len(work) + (len(config.kv_blocks) if risk else 0), desc="replay", unit="row", leave=False)
    for kv in config.kv_blocks:
        sc = run_policy(problems, "none", kv, config, params)
        sc_time = sc.steps * config.step_cost_tokens + sc.computed_tokens
        sc_tokens = sum(map(sum, sc.tokens))
        adm_time = None
        if config.admission and kv and sc.preemptions:
            seqs, adm = admission_seqs(problems, kv, config, params)
            adm_time = adm.steps * config.step_cost_tokens + adm.computed_tokens
        todo = [(p, v, {}) for p in config.policies for v in _votes_of(p, config.votes)]
        if risk and kv:
            todo.append(("memory+risk", risk[1], {"cutoff": risk[0]}))
        done: dict[tuple[str, str], Outcome] = {}
        for policy, vote, extra in todo:
            if policy == "none":
                o = sc
            else:
                base = "memory:" + config.memory_victim if policy == "memory+risk" else policy
                same = next((x for (p, _), x in done.items() if p == policy), None)
                if same is not None and isinstance(vote, str):  # another vote on the same pruning
                    o = dataclasses.replace(same, vote=vote, votes=[vote] * len(problems), correct=[
                        vote_correct(pr, pm, vote) for pr, pm in zip(problems, same.pruned)])
                else:
                    o = run_policy(problems, base, kv, config, params, vote=vote, **extra)
                    o.policy = policy
                done[(policy, str(vote))] = o
            bar.update(1)
            t = o.steps * config.step_cost_tokens + o.computed_tokens
            toks = sum(map(sum, o.tokens))
            row = {"kv_blocks": kv, "policy": policy, "vote": o.vote, "problems": len(problems),
                   "accuracy": float(np.mean(o.correct)), "model_time": t, "time_ratio": t / sc_time,
                   "admission_time_ratio": t / adm_time if adm_time else None,
                   "output_tokens": toks, "token_ratio": toks / sc_tokens if sc_tokens else float("nan"),
                   "preemptions": o.preemptions, "pruned": sum(map(sum, o.pruned)),
                   "traces": sum(len(p.traces) for p in problems), "steps": o.steps,
                   "computed_tokens": o.computed_tokens, "correct": [bool(c) for c in o.correct]}
            if policy == "memory+risk":
                row["rule"] = f"risk <= {trust['crossfit']['tolerance']:g} ({risk[2]})"
            if policy != "none":
                row["vs_sc"] = paired_bootstrap(sc.correct, o.correct, seed=config.seed).to_dict()
                if row["pruned"]:
                    base_rows = baselines(problems, o, config.random_draws, config.seed)
                    k = fewer_traces(problems, o)
                    base_rows["sc_same_tokens"] = [  # the first k traces, sampled in full, majority vote
                        float(vote_correct(pr, [i >= ki for i in range(len(pr.traces))], "majority"))
                        for pr, ki in zip(problems, k)]
                    for name, vals in base_rows.items():
                        row[name] = {"accuracy": float(np.mean(vals)),
                                     "vs_sc": paired_bootstrap(sc.correct, vals, seed=config.seed).to_dict(),
                                     "policy_minus": paired_bootstrap(vals, o.correct, seed=config.seed).to_dict()}
                    row["sc_same_tokens"].update(traces=int(sum(k)), token_ratio=sum(
                        t.num_tokens for pr, ki in zip(problems, k) for t in pr.traces[:ki]) / sc_tokens)
            rows.append(row)
            if policy == "none" and adm_time:
                rows.append({"kv_blocks": kv, "policy": "none+admission", "vote": "majority", "problems": len(problems),
                             "accuracy": row["accuracy"], "model_time": adm_time, "time_ratio": adm_time / sc_time,
                             "admission_time_ratio": 1.0, "max_num_seqs": seqs, "output_tokens": toks,
                             "token_ratio": 1.0, "preemptions": adm.preemptions, "pruned": 0, "traces": row["traces"],
                             "steps": adm.steps, "computed_tokens": adm.computed_tokens, "correct": row["correct"]})
    bar.close()
    return {"rows": rows}


def _votes_of(policy: str, votes: Sequence[str]) -> list[str]:
    """The votes a policy is replayed with: SC majority only; the confidence baseline its own and
    majority; the STEP policies the ones asked for (confidence there means majority)."""
    if policy == "none":
        return ["majority"]
    if policy == "confidence":
        return ["confidence", "majority"] if "majority" in votes else ["confidence"]
    return list(dict.fromkeys(v for v in votes if v != "confidence")) or ["majority"]



def live_check(config: Any, bench: dict[str, Any]) -> list[dict[str, Any]]:
    """Replay the bench's own SC traces at each of its KV budgets and put each live policy's
    row beside the replayed one: accuracy, token and preemption counts, and how many traces
    the replay prunes exactly as the live engine did."""
    from .calibrate import resolve_trust

    header = {"config": {**bench["config"], "policy": "none"}}
    params = params_from(config, header)
    bc = bench["config"]
    cutoff = resolve_trust(bc.get("scorer"), bc.get("max_accuracy_loss"), bc.get("risk_delta", PruningOptions.risk_delta),
                           bc.get("prune_below")).cutoff if "max_accuracy_loss" in bc else None
    out = []
    for kv in bench["config"]["kv_blocks"]:
        sc_records = bench["problems"].get(f"{kv}/none")
        if not sc_records:
            continue
        problems = build_problems(sc_records)
        ids = [pr.problem_id for pr in problems]
        for policy in bench["config"]["policies"]:
            live_rows = [r for r in bench["rows"] if r["kv_blocks"] == kv and r["policy"] == policy]
            admission = policy == "none+admission"  # bench's SC sized not to preempt
            if not live_rows or (policy not in POLICIES and not admission):
                continue
            live = live_rows[0]
            if admission:
                o = run_policy(problems, "none", kv, config, params, max_num_seqs=live.get("max_num_seqs"))
            else:
                o = run_policy(problems, policy, kv, config, params, vote=live.get("vote"),
                               cutoff=cutoff if policy.startswith("memory") else None)
            sc = run_policy(problems, "none", kv, config, params) if policy != "none" else o
            by_id = {r["problem_id"]: r for r in bench["problems"][f"{kv}/{policy}"]}
            same_pruned = same_correct = n_traces = 0
            for pr, pm, c in zip(problems, o.pruned, o.correct):
                rec = by_id.get(pr.problem_id)
                if rec is None:
                    continue
                live_pruned = {t["index"]: bool(t["pruned"]) for t in rec["traces"]}
                same_pruned += sum(live_pruned.get(t.index) == p for t, p in zip(pr.traces, pm))
                n_traces += len(pr.traces)
                same_correct += bool(rec["correct"]) == bool(c)
            toks = sum(map(sum, o.tokens))
            out.append({
                "kv_blocks": kv, "policy": policy, "problems": len(ids),
                "live": {"accuracy": live["accuracy"], "token_ratio": live["token_ratio"],
                         "time_ratio": live["time_ratio"], "preemptions": live["preemptions"], "pruned": live["pruned"]},
                "replay": {"accuracy": float(np.mean(o.correct)), "token_ratio": toks / max(sum(map(sum, sc.tokens)), 1),
                           "time_ratio": (o.steps * config.step_cost_tokens + o.computed_tokens)
                           / (sc.steps * config.step_cost_tokens + sc.computed_tokens),
                           "preemptions": o.preemptions, "pruned": sum(map(sum, o.pruned))},
                "traces_pruned_alike": same_pruned / max(n_traces, 1),
                "problems_voted_alike": same_correct / max(len(ids), 1),
                # a resumed cell's wall time adds up batches: not a point for the time model's fit
                "model": {"steps": o.steps, "computed_tokens": o.computed_tokens,
                          "live_wall_s": None if live.get("resumed") else live.get("wall_s")}})
    return out


def fit_step_cost(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    """Least-squares ``wall_s = a * steps + b * computed_tokens`` over the live rows; ``a / b`` is
    the ``step_cost_tokens`` that makes the time model match this machine."""
    pts = [(r["model"]["steps"], r["model"]["computed_tokens"], r["model"]["live_wall_s"]) for r in rows
           if r.get("model", {}).get("live_wall_s")]
    if len(pts) < 3:
        return None
    x = np.array([[s, c] for s, c, _ in pts], dtype=np.float64)
    y = np.array([w for *_, w in pts], dtype=np.float64)
    (a, b), *_ = np.linalg.lstsq(x, y, rcond=None)
    pred = x @ np.array([a, b])
    return {"seconds_per_step": float(a), "seconds_per_token": float(b),
            "step_cost_tokens": float(a / b) if b > 0 else float("nan"),
            "max_relative_error": float(np.max(np.abs(pred - y) / y)), "points": len(pts)}

