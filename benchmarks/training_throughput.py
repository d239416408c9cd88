"""Training-side throughput: data-loading rate, a layer sweep, and tune trials per minute.

    python benchmarks/training_throughput.py --data states.h5 [--trials 12] [--sweep-sites all]
    python benchmarks/training_throughput.py --synthetic 20000   # default-model shape, random data

Measured in one run, each as a ratio to a baseline from the same run:

- loading: MB/s of ``HiddenStates.features(site)`` (a whole site, float16 -> float32)
  against a raw h5py read of the same dataset (baseline = 1.0);
- sweep: seconds per site (Lightning linear probe + scikit-learn reference + bootstrap CI)
  against the scikit-learn reference alone on that site;
- tune: trials per minute of `stepprobe tune` (default search space) and seconds per
  trial against the same reference fit.

Writes benchmarks/results/training_throughput.json and .md (or --out).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("training_throughput")


def synthetic_file(path: Path, n_steps: int, hidden: int = 576, layers: int = 30) -> Path:
    """Random features in the default model's shape; label from layer 20 (weakly)."""
    from stepprobe.data_collection.hdf5 import write_arrays
    from stepprobe.layers import all_sites

    rng = np.random.default_rng(0)
    steps_per_trace = 8
    n_traces = n_steps // steps_per_trace
    n_problems = max(3, n_traces // 8)
    t_label = rng.integers(0, 2, n_traces)
    trace = np.repeat(np.arange(n_traces), steps_per_trace)
    label = t_label[trace]
    direction = rng.normal(size=hidden).astype(np.float32) / np.sqrt(hidden)
    feats = {}
    for s in all_sites(layers):
        x = rng.standard_normal((len(trace), hidden), dtype=np.float32)
        if s == "layer_20":
            x += 0.5 * (2 * label - 1)[:, None] * direction[None] * np.sqrt(hidden)
        feats[s] = x
    ident = {"name": "synthetic-default-shape", "config_hash": "bench", "vocab_hash": "bench",
             "hidden_size": hidden, "num_hidden_layers": layers}
    return write_arrays(path, features=feats,
                        steps={"trace": trace, "problem": trace // 8 % n_problems,
                               "step": np.tile(np.arange(steps_per_trace), n_traces),
                               "position": np.tile(np.arange(steps_per_trace), n_traces) * 20, "label": label},
                        traces={"problem": np.arange(n_traces) // 8 % n_problems, "sample_index": np.arange(n_traces) % 8,
                                "label": t_label, "num_steps": [steps_per_trace] * n_traces,
                                "num_tokens": [160] * n_traces, "finish_reason": ["stop"] * n_traces},
                        problems={"problem_id": [f"p{i}" for i in range(n_problems)],
                                  "question": ["q"] * n_problems, "gold": ["0"] * n_problems},
                        model=ident, boundary_rule={"delimiter": "\n\n"})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="HDF5 file from `stepprobe record`")
    ap.add_argument("--synthetic", type=int, default=0, help="build a random file with this many steps instead")
    ap.add_argument("--trials", type=int, default=8, help="tune trials to time")
    ap.add_argument("--sweep-sites", default="all", help="sites for the timed sweep")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "training_throughput"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("stepprobe").setLevel(logging.WARNING)
    import h5py

    from stepprobe.training import sweep, tune
    from stepprobe.training.data import make_split, open_hidden_states
    from stepprobe.training.reference import fit_reference

    tmp = tempfile.TemporaryDirectory(prefix="stepprobe-bench-")
    data = Path(args.data) if args.data else synthetic_file(Path(tmp.name) / "synthetic.h5", args.synthetic or 20000)
    hs = open_hidden_states(str(data))
    site = f"layer_{(2 * hs.num_layers) // 3:02d}" if f"layer_{(2 * hs.num_layers) // 3:02d}" in hs.sites else hs.sites[-1]
    results: dict = {"data": str(data), "num_steps": hs.num_steps, "hidden_size": hs.hidden_size,
                     "sites": len(hs.sites), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    # Loading: raw h5py read (baseline) vs the reader, same site, 3 repeats each.
    with h5py.File(data, "r") as f:
        ds = f["features"][site]
        nbytes = ds.size * ds.dtype.itemsize
        raw = min(_timed(lambda: ds[...]) for _ in range(3))
    ours = min(_timed(lambda: hs.features(site)) for _ in range(3))
    results["loading"] = {"site": site, "stored_mb": nbytes / 1e6, "raw_h5py_mb_s": nbytes / 1e6 / raw,
                          "reader_mb_s": nbytes / 1e6 / ours, "ratio_reader_to_raw": raw / ours,
                          "steps_per_s": hs.num_steps / ours}
    # Baseline for training: the sklearn reference on the same site and split.
    split = make_split(hs)
    x = hs.features(site)[:, None]
    t0 = time.perf_counter()
    pred = fit_reference(x[split.rows["train"]], hs.steps["label"][split.rows["train"]])
    pred(x[split.rows["val"]])
    ref_s = time.perf_counter() - t0
    results["reference_fit_s"] = ref_s
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        sweep.run(sweep.Config(data=str(data), out=f"{work}/sweep", sites=args.sweep_sites, progress=False,
                               bootstrap=1000))
        sw = time.perf_counter() - t0
        n_sites = len(json.loads(Path(f"{work}/sweep/sweep.json").read_text())["rows"])
        results["sweep"] = {"sites": n_sites, "seconds": sw, "seconds_per_site": sw / n_sites,
                            "ratio_to_reference_fit": sw / n_sites / ref_s}
        t0 = time.perf_counter()
        tune.run(tune.Config(data=str(data), out=f"{work}/tune", n_trials=args.trials, progress=False, plots=False))
        tu = time.perf_counter() - t0
        import optuna

        st = optuna.load_study(study_name="stepprobe", storage=f"sqlite:///{work}/tune/study.db")
        pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in st.trials)
        results["tune"] = {"trials": args.trials, "pruned": pruned, "seconds": tu,
                           "trials_per_minute": args.trials / tu * 60, "seconds_per_trial": tu / args.trials,
                           "ratio_trial_to_reference_fit": tu / args.trials / ref_s}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    L, S, T = results["loading"], results["sweep"], results["tune"]
    md = "\n".join([
        f"Training throughput, {results['date']}, {results['machine']}; {hs.num_steps} steps x {len(hs.sites)} sites "
        f"x hidden {hs.hidden_size} ({data.name})",
        "",
        "| measure | value | ratio | baseline (same run) |",
        "|---|---|---|---|",
        f"| load one site ({L['stored_mb']:.0f} MB stored) | {L['reader_mb_s']:.0f} MB/s, {L['steps_per_s']:.0f} steps/s "
        f"| {L['ratio_reader_to_raw']:.2f}x | raw h5py read {L['raw_h5py_mb_s']:.0f} MB/s |",
        f"| sweep ({S['sites']} sites, linear + reference + CI) | {S['seconds']:.0f} s, {S['seconds_per_site']:.1f} s/site "
        f"| {S['ratio_to_reference_fit']:.1f}x | sklearn reference fit {ref_s:.2f} s/site |",
        f"| tune ({T['trials']} trials, {T['pruned']} pruned) | {T['trials_per_minute']:.1f} trials/min "
        f"| {T['ratio_trial_to_reference_fit']:.1f}x per trial | sklearn reference fit {ref_s:.2f} s |",
        ""])
    out.with_suffix(".md").write_text(md)
    sys.stdout.write(md)
    tmp.cleanup()
    return 0


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
