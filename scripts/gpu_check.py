"""GPU check for what the CPU machine cannot run (issue 22, defects 2 and 4). Under ten minutes.

    pip install -e ".[gpu]"
    python scripts/gpu_check.py                    # TP=1, and TP=2 when two GPUs are visible
    python scripts/gpu_check.py --tp 2 --model Qwen/Qwen2.5-0.5B-Instruct

For each tensor-parallel size it starts, in a child process with a time limit, vLLM's
default GPU path (compiled at -O2 with CUDA graphs, model runner V2, async scheduling) with
a random linear scorer on a middle layer, ``embed`` and ``final_norm`` of ``--model``, then:

- **the TP fusion hang (defect 2)**: the engine must start and generate within the limit
  (the all-reduce + RMSNorm fusion is on at -O2 on Hopper/Blackwell; the script prints
  whether it is). A child that does not answer in time is reported as a hang;
- **the self-test and capture coverage (defect 4)**: the start-up self-test passed (a prefill
  beside a decode, one- and two-row decodes); then 16 prompts of different lengths with
  ``n=4`` (mixed prefill+decode batches, many CUDA-graph sizes): every step boundary in every
  trace but the last token's is scored exactly once, none was lost;
- **parity**: the live features equal transformers' (what ``stepprobe record`` computes) at
  each site, and the live scores equal the scorer's on them (bf16 tolerance).

Prints one line per check and ``ALL OK`` or ``FAILED``; exit code 0 or 1. Nothing is written
outside a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"  # 14 query / 2 KV heads: TP=2 divides them
PROMPTS = [("Compute " + " + ".join(str(i) for i in range(k + 2)) + ". Think step by step.") for k in range(16)]


def make_scorer(model: str, out: Path) -> Path:
    """A random linear scorer (seeded) on embed, a middle layer and final_norm of ``model``."""
    import numpy as np
    from transformers import AutoConfig, AutoTokenizer

    from stepprobe.boundaries import BoundaryRule
    from stepprobe.probes.checkpoint import linear_probe, save_scorer
    from stepprobe.provenance import model_identity

    cfg = AutoConfig.from_pretrained(model)
    hidden, layers = int(cfg.hidden_size), int(cfg.num_hidden_layers)
    sites = ["embed", f"layer_{layers // 2:02d}", "final_norm"]
    rng = np.random.default_rng(0)
    w = (rng.standard_normal(hidden * len(sites)) / np.sqrt(hidden * len(sites))).astype(np.float32)
    probe = linear_probe(sites, weight=w, bias=0.0, combine="concat")
    return save_scorer(out, probe, model=model_identity(model, cfg, AutoTokenizer.from_pretrained(model)),
                       boundary_rule=BoundaryRule().to_dict())


def child(model: str, scorer: str, tp: int, q: mp.Queue) -> None:
    import numpy as np
    import torch

    from stepprobe.boundaries import BoundaryDetector, BoundaryRule
    from stepprobe.data_collection.extractor import SiteExtractor
    from stepprobe.inference.plugin import PluginSettings
    from stepprobe.inference.runner import StepRunner, captured_boundaries
    from stepprobe.probes.checkpoint import load_scorer

    out: dict = {"tp": tp}
    t0 = time.perf_counter()
    settings = PluginSettings(scorer=scorer, policy="none", keep_records=True, record_features=True,
                              max_accuracy_loss=None)
    runner = StepRunner(model, settings, seed=0, dtype="bfloat16", max_model_len=2048, tensor_parallel_size=tp)
    out["startup_s"] = round(time.perf_counter() - t0, 1)
    vcfg = runner.llm.llm_engine.vllm_config
    pc = vcfg.compilation_config.pass_config
    out["fusion"] = {k: v for k, v in vars(pc).items() if "allreduce" in k or "all_reduce" in k}
    out["v2_runner"] = bool(getattr(vcfg, "use_v2_model_runner", False))
    out["async_scheduling"] = bool(getattr(vcfg.scheduler_config, "async_scheduling", False))
    out["ranks"] = runner.llm.collective_rpc("stepprobe_info")
    t1 = time.perf_counter()
    results = runner.generate(PROMPTS, n=4, max_tokens=192, temperature=0.8)
    out["generate_s"] = round(time.perf_counter() - t1, 1)
    det = BoundaryDetector.from_tokenizer(BoundaryRule(), runner.tokenizer)
    expected = scored = extra = 0
    for traces in results:
        for t in traces:
            want = set(captured_boundaries(det, t.token_ids))
            got = set(t.step_positions)
            expected += len(want)
            scored += len(want & got)
            extra += len(got - want - {len(t.token_ids) - 1})  # a last-token score is allowed (docs)
    out["boundaries"] = {"expected": expected, "scored": scored, "unexpected": extra}
    info = runner.llm.collective_rpc("stepprobe_info")[0]
    out["lost"], out["unwritten"] = info.get("lost"), info.get("unwritten")
    sc = load_scorer(scorer)
    ext = SiteExtractor(model, dtype="bfloat16", device="cuda")
    cos_min, score_diff = 1.0, 0.0
    try:
        for prompt, traces in zip(PROMPTS[:4], results[:4]):
            ids = runner.tokenizer(prompt)["input_ids"]
            for t in traces[:2]:
                if not t.step_positions:
                    continue
                feats = ext.extract([ids + t.token_ids], [[len(ids) + p for p in t.step_positions]])[0]
                got = np.asarray(t.features, dtype=np.float32)
                for k, site in enumerate(sc.sites):
                    ref = feats[site].astype(np.float32)
                    cos = (got[:, k] * ref).sum(1) / (np.linalg.norm(got[:, k], axis=1) * np.linalg.norm(ref, axis=1))
                    cos_min = min(cos_min, float(cos.min()))
                ref_scores = sc.score({s: torch.as_tensor(feats[s]) for s in sc.sites}).float().numpy()
                score_diff = max(score_diff, float(np.abs(ref_scores - np.asarray(t.step_scores)).max()))
    finally:
        ext.close()
    out["parity"] = {"cos_min": round(cos_min, 5), "max_score_diff": round(score_diff, 5)}
    runner.close()
    q.put(out)


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--tp", type=int, nargs="*", help="tensor-parallel sizes (default: 1, and 2 with two GPUs)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per engine before it counts as a hang")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this script checks the GPU path", file=sys.stderr)
        return 2
    sizes = args.tp or ([1, 2] if torch.cuda.device_count() >= 2 else [1])
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        scorer = str(make_scorer(args.model, Path(tmp) / "scorer"))
        ctx = mp.get_context("spawn")
        for tp in sizes:
            q = ctx.Queue()
            p = ctx.Process(target=child, args=(args.model, scorer, tp, q))
            p.start()
            p.join(args.timeout)
            if p.is_alive():
                p.kill()
                print(f"TP={tp}: HANG: no answer in {args.timeout:.0f} s (defect 2: ranks in different collectives?)")
                ok = False
                continue
            if q.empty():
                print(f"TP={tp}: FAILED: the child exited with {p.exitcode} (its output is above)")
                ok = False
                continue
            r = q.get()
            b, par = r["boundaries"], r["parity"]
            checks = {
                "started and generated (no hang)": True,
                "every rank hooks the same sites": len({json.dumps(i.get("sites")) for i in r["ranks"]}) == 1,
                "every boundary scored once": b["scored"] == b["expected"] > 0 and b["unexpected"] == 0,
                "no lost or unwritten rows": not r["lost"] and not r["unwritten"],
                "live features = transformers' (cos > 0.99)": par["cos_min"] > 0.99,
                "live scores = scorer on them (< 0.02)": par["max_score_diff"] < 0.02,
            }
            print(f"TP={tp}: start {r['startup_s']} s, generate {r['generate_s']} s, V2 runner {r['v2_runner']}, "
                  f"async {r['async_scheduling']}, fusion passes {r['fusion']}")
            print(f"TP={tp}: boundaries {b}, parity {par}")
            for name, good in checks.items():
                print(f"TP={tp}: {'ok  ' if good else 'FAIL'} {name}")
                ok &= bool(good)
    print("ALL OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
