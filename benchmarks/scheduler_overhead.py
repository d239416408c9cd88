"""Per-step time of the pruning scheduler, as a ratio to vLLM's own scheduler.

No model runs: both schedulers (vLLM's ``Scheduler`` or, with ``--async-scheduling``, its
``AsyncScheduler``, and stepprobe's subclass of the same class) are built from one real
``VllmConfig`` with KV room for every trace, given the same synthetic load of ``N`` live
traces (groups of 8 children named like vLLM's ``n > 1`` fan-out), and driven the way the
engine core drives them: ``schedule()``, then ``update_from_output()`` with one sampled
token per trace and, for the pruning scheduler, step scores for one trace in 8 (a step
boundary every ~8 tokens). Only decode steps are timed (after every trace is running); the
two schedulers alternate, ``--repeats`` times, and the median per-step time of each is
compared. Nothing is pruned (KV room is ample; the threshold is below every score), so both
do the same vLLM work and the difference is stepprobe's bookkeeping.

    python benchmarks/scheduler_overhead.py --sizes 64,256,1024,4096 --steps 20 --repeats 3

Prints a Markdown table and writes JSON + Markdown (``--out``, default
``$STEPPROBE_HOME/runs/bench-scheduler-overhead.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections import deque
from pathlib import Path

log = logging.getLogger("scheduler_overhead")

BLOCK = 16
PROMPT = 8
GROUP = 8


def make(model_path: str, n: int, steps: int, *, plugin: dict | None, async_scheduling: bool):
    import torch
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from stepprobe.inference.scheduler import StepprobeScheduler

    tokens = PROMPT + steps + 8
    blocks = n * (-(-tokens // BLOCK) + 1) + 1
    sched = SchedulerConfig(max_num_seqs=n, max_num_batched_tokens=max(2048, n * PROMPT), max_model_len=2048,
                            enable_chunked_prefill=True, is_encoder_decoder=False)
    cache = CacheConfig(block_size=BLOCK)
    config = VllmConfig(scheduler_config=sched, model_config=ModelConfig(model=model_path, dtype="float32", seed=0),
                        cache_config=cache, additional_config={"stepprobe": plugin} if plugin else {})
    config.scheduler_config.async_scheduling = async_scheduling  # the CPU platform forces it off
    cache.num_gpu_blocks = blocks
    kv = KVCacheConfig(num_blocks=blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(
        ["layer"], FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=32, dtype=torch.float32))])
    kwargs = dict(kv_cache_config=kv, structured_output_manager=StructuredOutputManager(config), block_size=BLOCK,
                  log_stats=True)
    if plugin:
        return StepprobeScheduler(config, **kwargs)
    return (AsyncScheduler if async_scheduling else Scheduler)(config, **kwargs)


def add_load(scheduler, n: int) -> None:
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    hasher = get_request_block_hasher(BLOCK, sha256)
    sp = SamplingParams(max_tokens=1000, ignore_eos=True)
    for i in range(n):
        parent, child = divmod(i, GROUP)
        scheduler.add_request(Request(request_id=f"{child}_p{parent}", prompt_token_ids=[100 + parent] * PROMPT,
                                      sampling_params=sp, pooling_params=None, block_hasher=hasher))


def run_steps(scheduler, steps: int, in_flight: int, scored: bool) -> list[float]:
    """Per-step seconds of schedule() + update_from_output() for ``steps`` decode steps."""
    from vllm.v1.outputs import ModelRunnerOutput

    pending: deque = deque()
    times: list[float] = []
    k = 0

    def complete(so) -> None:
        nonlocal k
        rids = list(so.num_scheduled_tokens)
        mro = ModelRunnerOutput(req_ids=rids, req_id_to_index={r: j for j, r in enumerate(rids)},
                                sampled_token_ids=[[5] for _ in rids])
        if scored:
            mro.stepprobe_steps = {r: [[k, 0.5 + (j % 7) / 20]] for j, r in enumerate(rids) if (j + k) % GROUP == 0}
        k += 1
        scheduler.update_from_output(so, mro)

    total = 0.0
    warm = 3
    for step in range(steps + warm):
        t0 = time.perf_counter()
        so = scheduler.schedule()
        pending.append(so)
        if len(pending) >= in_flight:
            complete(pending.popleft())
        dt = time.perf_counter() - t0
        if step >= warm:
            times.append(dt)
            total += dt
    while pending:
        complete(pending.popleft())
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model whose config is used (default: the embedded SmolLM2)")
    ap.add_argument("--sizes", default="64,256,1024,4096", help="live traces per load")
    ap.add_argument("--policies", default="none,memory,threshold")
    ap.add_argument("--steps", type=int, default=20, help="timed decode steps per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--async-scheduling", action="store_true", help="AsyncScheduler (vLLM's GPU default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("vllm").setLevel(logging.WARNING)

    from stepprobe.models import resolve_model
    from stepprobe.paths import runs_dir
    from stepprobe.provenance import package_versions

    model = resolve_model(args.model)
    sizes = [int(s) for s in args.sizes.split(",")]
    policies = args.policies.split(",")
    in_flight = 2 if args.async_scheduling else 1
    rows = []
    for n in sizes:
        for policy in policies:
            plugin = {"policy": policy, "scorer": "unused" if policy != "none" else None, "threshold": 0.01}
            med = {"vllm": [], "stepprobe": []}
            for _ in range(args.repeats):
                for name in ("vllm", "stepprobe"):
                    s = make(model, n, args.steps * 2 + 8, plugin=plugin if name == "stepprobe" else None,
                             async_scheduling=args.async_scheduling)
                    add_load(s, n)
                    for _ in range(4):  # prefill until every trace is running
                        if len(s.running) == n and not s.waiting:
                            break
                        run_steps(s, 1, in_flight, False)
                    assert len(s.running) == n, (len(s.running), n)
                    times = run_steps(s, args.steps, in_flight, name == "stepprobe")
                    med[name].append(statistics.median(times))
                    if name == "stepprobe":
                        assert s.stepprobe_counts["pruned"] == 0 and s.stepprobe_counts["steps"] > 0
            v, p = statistics.median(med["vllm"]), statistics.median(med["stepprobe"])
            rows.append({"live_traces": n, "policy": policy, "vllm_ms": v * 1e3, "stepprobe_ms": p * 1e3,
                         "ratio": p / v, "vllm_ms_repeats": [x * 1e3 for x in med["vllm"]],
                         "stepprobe_ms_repeats": [x * 1e3 for x in med["stepprobe"]]})
            log.info("%d traces, %s: vLLM %.2f ms/step, stepprobe %.2f ms/step (%.3fx)", n, policy, v * 1e3,
                     p * 1e3, p / v)
    sched = "AsyncScheduler" if args.async_scheduling else "Scheduler"
    table = (f"| live traces | policy | vLLM {sched} ms/step | stepprobe ms/step | ratio |\n|---|---|---|---|---|\n"
             + "".join(f"| {r['live_traces']} | {r['policy']} | {r['vllm_ms']:.2f} | {r['stepprobe_ms']:.2f} | "
                       f"{r['ratio']:.3f} |\n" for r in rows))
    print(table)  # noqa: T201 - the benchmark's output
    result = {"kind": "stepprobe-bench-scheduler-overhead", "schema_version": 1,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": model, "scheduler": sched,
              "sizes": sizes, "policies": policies, "steps": args.steps, "repeats": args.repeats,
              "scored_fraction": 1 / GROUP, "rows": rows, "package_versions": package_versions()}
    out = Path(args.out) if args.out else runs_dir() / "bench-scheduler-overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
