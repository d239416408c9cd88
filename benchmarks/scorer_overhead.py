"""Decode throughput with the stepprobe scorer installed, as a ratio to stock vLLM.

Two engines in one process, same model, same prompts, same sampling, same KV budget: one
stock, one with the plugin (capture hooks compiled in, a linear probe on ``--sites``, policy
``none`` so nothing is pruned and both generate the same amount). Each is timed ``--repeats``
times, alternating; the ratio of median output tokens/s is the overhead figure.

    python benchmarks/scorer_overhead.py --prompts 32 --max-tokens 128

Prints a Markdown table and writes JSON (``--out``, default
``$STEPPROBE_HOME/runs/bench-scorer-overhead.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

log = logging.getLogger("scorer_overhead")


def planted_scorer(model_path: str, sites: list[str], out: Path) -> str:
    import numpy as np
    from transformers import AutoConfig, AutoTokenizer

    from stepprobe.boundaries import BoundaryRule
    from stepprobe.probes.checkpoint import linear_probe, save_scorer
    from stepprobe.provenance import model_identity

    cfg = AutoConfig.from_pretrained(model_path)
    ident = model_identity(model_path, cfg, AutoTokenizer.from_pretrained(model_path))
    w = np.random.default_rng(0).normal(size=cfg.hidden_size).astype(np.float32) / cfg.hidden_size
    probe = linear_probe(sites, weight=w, combine="mean" if len(sites) > 1 else "single")
    save_scorer(out, probe, model=ident, boundary_rule=BoundaryRule().to_dict(), overwrite=True)
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--sites", default="layer_15", help="comma-separated sites the probe reads")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--enforce-eager", action="store_true", help="time both engines without compilation")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from vllm import LLM, SamplingParams

    from stepprobe.data_collection.sources import load_problem_source
    from stepprobe.data_collection.prompts import build_prompt
    from stepprobe.inference.plugin import PluginSettings, install_kwargs
    from stepprobe.models import resolve_model
    from stepprobe.paths import runs_dir
    from stepprobe.provenance import package_versions

    from stepprobe.engine import prepare_engine

    model = resolve_model(args.model)
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="stepprobe-overhead-"))
    scorer = planted_scorer(model, sites, tmp / "scorer")
    common = dict(seed=0, max_model_len=1024, enforce_eager=args.enforce_eager, **prepare_engine())
    t0 = time.perf_counter()
    plain = LLM(model, **common)
    plain_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    scored = LLM(model, **common, **install_kwargs(PluginSettings(scorer=scorer, policy="none")))
    scored_start = time.perf_counter() - t0
    tok = plain.get_tokenizer()
    problems = load_problem_source(f"builtin:n={args.prompts},seed=1")
    prompts = [build_prompt(p, tok) for p in problems]
    sp = SamplingParams(n=1, temperature=0.8, max_tokens=args.max_tokens, ignore_eos=True)

    def timed(llm) -> float:
        t = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        return sum(len(o.outputs[0].token_ids) for o in outs) / dt

    timed(plain), timed(scored)  # warm both
    rates = {"plain": [], "scored": []}
    for _ in range(args.repeats):
        rates["plain"].append(timed(plain))
        rates["scored"].append(timed(scored))
    info = scored.collective_rpc("stepprobe_info")[0]
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = med["scored"] / med["plain"]
    result = {
        "kind": "stepprobe-bench-scorer-overhead", "schema_version": 1,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": model, "sites": sites,
        "prompts": args.prompts, "max_tokens": args.max_tokens, "repeats": args.repeats,
        "enforce_eager": args.enforce_eager, "tokens_per_s": rates, "median_tokens_per_s": med,
        "ratio_scored_to_plain": ratio, "boundaries_scored": info.get("captured"),
        "startup_s": {"plain": plain_start, "scored": scored_start}, "package_versions": package_versions(),
    }
    table = ("| engine | decode tokens/s (median) | ratio to stock |\n|---|---|---|\n"
             f"| stock vLLM | {med['plain']:.1f} | 1.000 |\n"
             f"| with scorer ({', '.join(sites)}) | {med['scored']:.1f} | {ratio:.3f} |\n")
    print(table)  # noqa: T201 - the benchmark's output
    out = Path(args.out) if args.out else runs_dir() / "bench-scorer-overhead.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
