"""Collection throughput: output tokens/s of ``stepprobe collect`` vs a bare ``vllm.LLM.generate``.

Both run in this process on ONE engine, on the same prompts with the same sampling
parameters. The baseline is a single ``llm.generate(prompts, params)``; ``collect`` is the
whole ``collect.run`` call (prompt building, chunked generation, grading, fsync'ed writes,
summary). The figure is the ratio collect / bare (1.0 = no overhead). Each repeat runs
both, alternating which goes first; medians are reported.

    python benchmarks/collect_throughput.py                       # small default size
    python benchmarks/collect_throughput.py --problems builtin:n=64 --n 8 --max-tokens 128

Writes ``collect_throughput.json`` and ``.md`` under ``--out`` (default
``$STEPPROBE_HOME/runs/benchmarks``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    from stepprobe.data_collection import collect
    from stepprobe.data_collection.prompts import build_prompt
    from stepprobe.io import atomic_write_json, atomic_write_text
    from stepprobe.models import resolve_model
    from stepprobe.paths import runs_dir
    from stepprobe.provenance import package_versions

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--problems", default="builtin:n=16,seed=0")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=None, help="collect's chunk size (default: all problems)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--kv-cache-gib", type=float, default=None)
    ap.add_argument("--enforce-eager", action="store_true", help="skip torch.compile (faster engine start)")
    ap.add_argument("--out", default=None, help="output folder (default: $STEPPROBE_HOME/runs/benchmarks)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    base = collect.Config(model=args.model, problems=args.problems, n=args.n, max_tokens=args.max_tokens,
                          overwrite=True, kv_cache_gib=args.kv_cache_gib)
    problems = collect.load_config_problems(base)
    base = base.replace(chunk_size=args.chunk_size or len(problems))
    model_path = resolve_model(args.model)
    from stepprobe.engine import engine_kwargs, make_llm

    llm = make_llm(model_path, engine_kwargs(base.replace(kv_cache_gib=args.kv_cache_gib,
                                                          enforce_eager=args.enforce_eager), seed=0))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    prompts = [build_prompt(p, tok, system_prompt=base.system_prompt) for p in problems]
    params = collect.sampling_params(base)
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up

    def bare() -> dict:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        s = time.perf_counter() - t0
        toks = sum(len(c.token_ids) for o in outs for c in o.outputs)
        return {"tokens": toks, "seconds": s, "tokens_per_s": toks / s}

    def via_collect(tmp: str) -> dict:
        t0 = time.perf_counter()
        summary = collect.run(base.replace(output=os.path.join(tmp, "traces.jsonl")), llm=llm)
        s = time.perf_counter() - t0
        toks = summary["tokens_total"]
        return {"tokens": toks, "seconds": s, "tokens_per_s": toks / s,
                "generate_only_tokens_per_s": summary["this_run"]["output_tokens_per_s"]}

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            if r % 2 == 0:
                b, c = bare(), via_collect(tmp)
            else:
                c, b = via_collect(tmp), bare()
            rows.append({"repeat": r, "bare": b, "collect": c, "ratio": c["tokens_per_s"] / b["tokens_per_s"]})
    med = {
        "bare_tokens_per_s": statistics.median(x["bare"]["tokens_per_s"] for x in rows),
        "collect_tokens_per_s": statistics.median(x["collect"]["tokens_per_s"] for x in rows),
        "ratio_collect_over_bare": statistics.median(x["ratio"] for x in rows),
    }
    result = {
        "kind": "stepprobe-benchmark-collect-throughput", "schema_version": 1,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
        "setup": {"model": args.model, "problems": args.problems, "num_problems": len(problems), "n": args.n,
                  "max_tokens": args.max_tokens, "chunk_size": base.chunk_size, "repeats": args.repeats,
                  "enforce_eager": args.enforce_eager},
        "median": med, "repeats": rows, "packages": package_versions(),
    }
    md = ["| repeat | bare tok/s | collect tok/s | ratio collect/bare |", "|---|---|---|---|"]
    for x in rows:
        md.append(f"| {x['repeat']} | {x['bare']['tokens_per_s']:.1f} | {x['collect']['tokens_per_s']:.1f} | "
                  f"{x['ratio']:.3f} |")
    md.append(f"| **median** | {med['bare_tokens_per_s']:.1f} | {med['collect_tokens_per_s']:.1f} | "
              f"**{med['ratio_collect_over_bare']:.3f}** |")
    text = (f"# collect throughput ({result['date']}, {result['machine']})\n\n"
            f"{len(problems)} problems x {args.n} samples, max_tokens {args.max_tokens}, model {args.model}\n\n"
            + "\n".join(md) + "\n")
    out = Path(args.out) if args.out else runs_dir() / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "collect_throughput.json", result)
    atomic_write_text(out / "collect_throughput.md", text)
    print(text)  # noqa: T201
    print(f"saved {out / 'collect_throughput.json'} and .md")  # noqa: T201


if __name__ == "__main__":
    main()
