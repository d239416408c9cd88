"""Recording throughput of ``stepprobe record``, as ratios to baselines of the same traces.

Baselines:

- ``generate``: the time vLLM took to generate these traces (from ``collect``'s per-problem
  timing in the traces file; not re-measured here).
- ``forward``: measured in this run: the same teacher-forced forward passes (same batches) on
  the base model with no hooks and nothing written.

Measured in this run: ``extract`` (forward + hooks gathering every site at the boundary
rows, no writing) and ``stage`` (the whole ``record.run``: counting pass, model load,
forward, HDF5 writes, final consolidation). Reported: seconds, ratios
``stage/generate``, ``stage/forward``, ``extract/forward``, boundaries/s and MB/s written.

    python benchmarks/record_throughput.py --traces runs/x/traces.jsonl [--problems 12]
    python benchmarks/record_throughput.py --synthetic 64 --model /path/to/model --device cuda

``--synthetic N`` builds N problems x 8 traces of random tokens with a blank line every ~40
tokens for ``--model`` (any checkpoint, e.g. a random-weight 8B configuration on a GPU) and
has no ``generate`` baseline. Prints a Markdown table and writes JSON (``--out``, default
``$STEPPROBE_HOME/runs/bench-record-throughput.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

log = logging.getLogger("record_throughput")


def synthetic_traces(path: Path, model_path: str, problems: int, samples: int = 8, gen_len: int = 512,
                     seed: int = 0) -> Path:
    import numpy as np
    from transformers import AutoConfig, AutoTokenizer

    from stepprobe.data_collection.traces import ProblemTraces, Trace, TraceWriter, make_header
    from stepprobe.provenance import model_identity

    tok = AutoTokenizer.from_pretrained(model_path)
    ident = model_identity(model_path, AutoConfig.from_pretrained(model_path), tok)
    blank = tok("a\n\nb", add_special_tokens=False)["input_ids"][1:-1]
    rng = np.random.default_rng(seed)
    with TraceWriter(path, make_header({"synthetic": True, "n": samples}, ident), overwrite=True) as w:
        for p in range(problems):
            prompt = list(rng.integers(100, 20000, size=120))
            traces = []
            for s in range(samples):
                ids: list[int] = []
                while len(ids) < gen_len:
                    ids += list(rng.integers(100, 20000, size=int(rng.integers(20, 60)))) + blank
                ids = [int(i) for i in ids[:gen_len]]
                traces.append(Trace(s, ids, "", "length", len(ids), None, bool(rng.integers(0, 2))))
            w.write(ProblemTraces(f"s{p}", "synthetic", "0", "", [int(i) for i in prompt], traces))
    return path


def batches(traces_path: Path, detector, batch_size: int, max_batch_tokens: int):
    """The same length-sorted windows and batches as record.run (sequences, positions)."""
    from stepprobe.data_collection.traces import read_traces

    _, problems = read_traces(traces_path)
    jobs = []
    for prob in problems:
        for t in prob.traces:
            pos = detector.find(t.output_token_ids)
            if pos:
                n = len(prob.prompt_token_ids)
                jobs.append((prob.prompt_token_ids + t.output_token_ids, [n + q for q in pos]))
    window = batch_size * 4
    out = []
    for w0 in range(0, len(jobs), window):
        win = sorted(jobs[w0:w0 + window], key=lambda j: len(j[0]))
        i = 0
        while i < len(win):
            j = i + 1
            while j < len(win) and j - i < batch_size and (j - i + 1) * len(win[j][0]) <= max_batch_tokens:
                j += 1
            out.append(win[i:j])
            i = j
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", default=None, help="traces file from `stepprobe collect`")
    ap.add_argument("--synthetic", type=int, default=0, help="instead: N synthetic problems for --model")
    ap.add_argument("--problems", type=int, default=0, help="use only the first N problems of --traces (0: all)")
    ap.add_argument("--model", default=None, help="model (default: the traces header's)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-batch-tokens", type=int, default=32768)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--storage-dtype", default="float16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    from stepprobe.boundaries import BoundaryDetector, BoundaryRule
    from stepprobe.data_collection import record
    from stepprobe.data_collection.hdf5 import HiddenStates
    from stepprobe.data_collection.traces import read_traces
    from stepprobe.models import resolve_model
    from stepprobe.paths import runs_dir

    tmp = Path(tempfile.mkdtemp(prefix="bench-record-"))
    if args.synthetic:
        if not args.model:
            raise SystemExit("--synthetic needs --model")
        traces = synthetic_traces(tmp / "traces.jsonl", resolve_model(args.model), args.synthetic)
    elif args.traces:
        traces = Path(args.traces)
        if args.problems:
            with open(traces, encoding="utf-8") as src, open(tmp / "traces.jsonl", "w", encoding="utf-8") as dst:
                for i, line in enumerate(src):
                    if i > args.problems:
                        break
                    dst.write(line)
            traces = tmp / "traces.jsonl"
    else:
        raise SystemExit("give --traces or --synthetic N --model M")
    header, problems = read_traces(traces)
    gen_s = sum(float(p.timing.get("generate_s", 0.0)) for p in problems) or None
    model_path = resolve_model(args.model or header["model"]["name"])

    # Stage, end to end.
    out = tmp / "hs.h5"
    t0 = time.perf_counter()
    record.run(record.Config(traces=str(traces), output=str(out), model=model_path, batch_size=args.batch_size,
                             max_batch_tokens=args.max_batch_tokens, dtype=args.dtype,
                             storage_dtype=args.storage_dtype, device=args.device))
    stage_s = time.perf_counter() - t0
    hs = HiddenStates(out)
    steps, size = hs.num_steps, out.stat().st_size

    # Baselines on the same batches.
    from stepprobe.data_collection.extractor import SiteExtractor

    ex = SiteExtractor(model_path, dtype=args.dtype, device=args.device)
    from transformers import AutoTokenizer

    det = BoundaryDetector.from_tokenizer(BoundaryRule(), AutoTokenizer.from_pretrained(model_path))
    bl = batches(traces, det, args.batch_size, args.max_batch_tokens)

    def sync():
        if ex.device.type == "cuda":
            torch.cuda.synchronize()

    def plain(batch):
        T = max(len(s) for s, _ in batch)
        ids = torch.zeros((len(batch), T), dtype=torch.long)
        for i, (s, _) in enumerate(batch):
            ids[i, :len(s)] = torch.as_tensor(s)
        with torch.inference_mode():
            ex.model(input_ids=ids.to(ex.device), use_cache=False)

    ex._index = None  # hooks see no positions: they return at once
    sync()
    t0 = time.perf_counter()
    for b in bl:
        plain(b)
    sync()
    forward_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in bl:
        ex.extract([s for s, _ in b], [p for _, p in b])
    sync()
    extract_s = time.perf_counter() - t0

    res = {
        "model": hs.model["name"], "hidden_size": hs.hidden_size, "sites": len(hs.sites),
        "traces": hs.num_traces, "boundaries": steps, "file_bytes": size, "storage_dtype": args.storage_dtype,
        "compute_dtype": ex.dtype_name, "device": str(ex.device), "batch_size": args.batch_size,
        "generate_s": gen_s, "forward_s": forward_s, "extract_s": extract_s, "stage_s": stage_s,
        "stage_over_generate": stage_s / gen_s if gen_s else None,
        "stage_over_forward": stage_s / forward_s, "extract_over_forward": extract_s / forward_s,
        "boundaries_per_s": steps / stage_s, "mb_per_s": size / 1e6 / stage_s,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads"
                   + (f", {torch.cuda.get_device_name()}" if ex.device.type == "cuda" else ""),
        "date": time.strftime("%Y-%m-%d"),
    }
    rows = [("generate (collect, vLLM)", gen_s, 1.0 if gen_s else None),
            ("forward, no hooks (this run)", forward_s, forward_s / gen_s if gen_s else None),
            ("extract: forward + all-site hooks", extract_s, extract_s / gen_s if gen_s else None),
            ("record stage end to end", stage_s, stage_s / gen_s if gen_s else None)]
    lines = [f"{res['traces']} traces, {steps} boundaries, {res['sites']} sites x {res['hidden_size']}, "
             f"{res['device']} {res['compute_dtype']} -> {args.storage_dtype}, file {size / 1e6:.1f} MB", "",
             "| part | seconds | / generate | / forward |", "|---|---|---|---|"]
    for name, s, rg in rows:
        if s is None:
            continue
        lines.append(f"| {name} | {s:.2f} | {f'{rg:.2f}' if rg is not None else 'n/a'} | {s / forward_s:.2f} |")
    lines += ["", f"boundaries/s: {res['boundaries_per_s']:.1f}; MB/s written: {res['mb_per_s']:.2f}"]
    table = "\n".join(lines)
    print(table)  # noqa: T201
    res["table"] = table
    dest = Path(args.out) if args.out else runs_dir() / "bench-record-throughput.json"
    dest.write_text(json.dumps(res, indent=2) + "\n")
    log.info("wrote %s", dest)


if __name__ == "__main__":
    main()
