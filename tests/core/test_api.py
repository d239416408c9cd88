"""The Python API (stepprobe.api) and the README's example of it, run as written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers.synthetic_h5 import HIDDEN, IDENTITY, RULE, SIGNAL_SITE, make_synthetic
from stepprobe import api, cli
from stepprobe.errors import StepprobeError

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> str:
    """The python block after the README's ``api-example`` marker."""
    m = re.search(r"<!-- api-example[^>]*-->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert m, "README.md has no api-example block"
    return m.group(1)


def _run_dir(root: Path) -> Path:
    """``root/runs/x`` with a hidden-state file and a scorer on its signal site."""
    from stepprobe.probes.checkpoint import linear_probe, save_scorer

    run = root / "runs" / "x"
    make_synthetic(run / "hidden_states.h5", n_problems=20)
    weight = np.random.default_rng(0).normal(size=HIDDEN)
    save_scorer(run / "scorer", linear_probe([SIGNAL_SITE], weight=weight), model=IDENTITY, boundary_rule=RULE)
    return run


def test_the_readme_example_runs_and_its_scores_are_the_stages(tmp_path, monkeypatch):
    from stepprobe.training import metrics as M

    run = _run_dir(tmp_path)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(readme_example(), "README.md:api-example", "exec"), ns)  # noqa: S102
    hs, scorer, p = ns["hs"], ns["scorer"], ns["p"]
    assert p.shape == (hs.num_steps,)
    # the scores are the scorer's on the file's features, row by row
    direct = scorer.score({s: hs.features(s) for s in scorer.sites}).double().numpy()
    np.testing.assert_allclose(p, direct, rtol=1e-6, atol=1e-7)
    # and the evaluate stage it ran scored the same steps
    assert Path(ns["out"]).resolve() == (run / "eval-notebook").resolve()
    doc = json.loads((run / "eval-notebook" / "eval.json").read_text())
    assert doc["kind"] == "stepprobe-eval" and doc["config"]["bootstrap"] == 200
    assert doc["probe"]["auroc"]["value"] == pytest.approx(M.auroc(p, np.asarray(ns["labels"])))


def test_stage_config_is_the_command_lines_config(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text("evaluate:\n  scorer: s\n  data: d.h5\n  bootstrap: 50\n")
    from_api = api.stage_config("evaluate", path, seed=3)
    assert from_api == cli.stage_config(["evaluate", "--config", str(path), "--seed", "3"])
    assert (from_api.scorer, from_api.bootstrap, from_api.seed) == ("s", 50, 3)
    assert api.stage_config("evaluate", scorer="s", output="o").out == "o"  # the CLI's spellings
    with pytest.raises(StepprobeError, match="unknown field.*boostrap"):
        api.stage_config("evaluate", boostrap=5)
    with pytest.raises(StepprobeError, match="unknown stage 'evalute'.*evaluate"):
        api.stage_config("evalute")


def test_run_stage_refuses_as_the_command_does_and_releases_its_lock(tmp_path):
    run = _run_dir(tmp_path)
    cfg = api.stage_config("evaluate", scorer=str(run / "scorer"), data=str(run / "hidden_states.h5"),
                           output=str(tmp_path / "ev"), bootstrap=20)
    api.run_stage("evaluate", cfg)
    with pytest.raises(StepprobeError, match="eval.json exists; pass --overwrite"):
        api.run_stage("evaluate", cfg)
    # its output lock went with the run: another process may write there now
    take = f"from stepprobe import locks; locks.hold({str(tmp_path / 'ev')!r})"
    assert subprocess.run([sys.executable, "-c", take], capture_output=True).returncode == 0
    assert api.run_stage("evaluate", cfg, overwrite=True) == tmp_path / "ev"  # fields over a built config


def test_importing_the_api_imports_neither_torch_nor_vllm():
    code = ("import sys; from stepprobe import api; "
            "print(sorted(m for m in ('torch', 'vllm', 'h5py', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert set(api.__all__) == {"load_scorer", "open_hidden_states", "score_steps", "stage_config", "run_stage"}
    assert all(callable(getattr(api, name)) for name in api.__all__)
