"""How often do per-trace-seeded traces still differ between two SC runs? (numerics)

With per-trace seeds (stepprobe.inference.seeds) a trace's random draws no longer depend on
the batch; what can still differ is the arithmetic: another batch composition or KV budget
changes the shapes of the matrix products (and, under preemption, recomputes a prefix in a
prefill instead of decode steps), which can move a logit by an ulp and flip a sampled token.
After the first flipped token the two traces are different samples.

Run A: every problem in one batch, vLLM's default KV cache. Run B: the problems in reverse
order, in batches of ``--batch-b`` problems, on a tight KV cache (``--kv-blocks``), where
traces are preempted. Same model, dtype, sampling and seeds. Prints and saves JSON and a
Markdown table: the share of traces identical token for token, and for the others the first
divergent generated-token position.

    .venv/bin/python benchmarks/seed_divergence.py --problems builtin:n=24,seed=7 --n 8 --out /tmp/div
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _run(problems, args, *, kv_blocks, order, batch):
    from stepprobe.data_collection.prompts import build_prompt
    from stepprobe.inference.plugin import PluginSettings
    from stepprobe.inference.runner import StepRunner
    from stepprobe.inference.seeds import trace_seed

    runner = StepRunner(args.model, PluginSettings(policy="none"), seed=0, dtype=args.dtype, max_model_len=1024,
                        num_kv_blocks=kv_blocks, enforce_eager=True)
    out, t0, pre0 = {}, time.perf_counter(), runner.preemptions()
    try:
        todo = [problems[i] for i in order]
        for s in range(0, len(todo), batch):
            part = todo[s:s + batch]
            res = runner.generate([build_prompt(p, runner.tokenizer) for p in part], n=args.n,
                                  max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                  seeds=[[trace_seed(0, p.problem_id, i) for i in range(args.n)] for p in part])
            for p, traces in zip(part, res):
                out[p.problem_id] = [t.token_ids for t in traces]
        return out, time.perf_counter() - t0, runner.preemptions() - pre0
    finally:
        runner.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--problems", default="builtin:n=24,seed=7")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-blocks", type=int, default=16)
    ap.add_argument("--batch-b", type=int, default=5)
    ap.add_argument("--out", default="seed_divergence")
    args = ap.parse_args()

    from stepprobe.data_collection.sources import load_problem_source

    problems = load_problem_source(args.problems)
    a, wall_a, pre_a = _run(problems, args, kv_blocks=None, order=list(range(len(problems))), batch=len(problems))
    b, wall_b, pre_b = _run(problems, args, kv_blocks=args.kv_blocks, order=list(reversed(range(len(problems)))),
                            batch=args.batch_b)
    same, firsts, lengths = 0, [], []
    for pid, ta in a.items():
        for x, y in zip(ta, b[pid]):
            lengths.append(len(x))
            if x == y:
                same += 1
                continue
            k = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
            firsts.append(k)
    total = len(lengths)
    firsts.sort()
    result = {
        "config": vars(args), "problems": len(problems), "traces": total, "identical": same,
        "identical_share": same / total, "diverged": len(firsts), "first_divergence": firsts,
        "first_divergence_median": firsts[len(firsts) // 2] if firsts else None,
        "mean_tokens": sum(lengths) / total, "run_a": {"wall_s": wall_a, "preemptions": pre_a, "kv_blocks": "default",
                                                        "batches": 1},
        "run_b": {"wall_s": wall_b, "preemptions": pre_b, "kv_blocks": args.kv_blocks,
                  "batches": -(-len(problems) // args.batch_b)},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    table = ("| problems x n | identical traces | diverged | first divergent token (min / median / max) "
             "| mean tokens | preemptions A / B |\n|---|---|---|---|---|---|\n"
             f"| {len(problems)} x {args.n} | {same}/{total} ({same / total:.3f}) | {len(firsts)} | "
             + (f"{firsts[0]} / {result['first_divergence_median']} / {firsts[-1]}" if firsts else "–")
             + f" | {result['mean_tokens']:.1f} | {pre_a} / {pre_b} |\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "seed_divergence.json").write_text(json.dumps(result, indent=1))
    (out / "seed_divergence.md").write_text(table)
    print(table)  # noqa: T201


if __name__ == "__main__":
    main()
