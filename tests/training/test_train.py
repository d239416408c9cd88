"""Each architecture learns the synthetic label from the one informative site; run dirs and
scorers round-trip; mismatched data is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stepprobe.cli import main as cli_main
from stepprobe.errors import ArtifactMismatch, StepprobeError
from stepprobe.probes.checkpoint import load_scorer
from stepprobe.training import metrics as M
from stepprobe.training import train
from stepprobe.training.data import open_hidden_states

from helpers.synthetic_h5 import IDENTITY, SIGNAL_SITE, make_synthetic

FAST = dict(max_epochs=12, patience=4, batch_size=128, progress=False, lr=3e-3)


@pytest.mark.parametrize("arch,sites,params", [
    ("linear", SIGNAL_SITE, {}),
    ("mlp", SIGNAL_SITE, {"width": 64}),
    ("deep_mlp", SIGNAL_SITE, {"width": 32, "depth": 2, "dropout": 0.1}),
    ("mixture", "layers", {"width": 16}),
])
def test_each_architecture_learns_the_signal_site(synthetic_h5, arch, sites, params):
    hs = open_hidden_states(str(synthetic_h5))
    cfg = train.Config(data=str(synthetic_h5), sites=sites, arch=arch, params=params, reference=False, **FAST)
    result = train.train_probe(cfg, hs)
    assert result.metrics["val"][M.AUROC] > 0.85, result.metrics["val"]
    assert result.metrics["test"][M.AUROC] > 0.8, result.metrics["test"]
    if arch == "mixture":
        weights = result.probe.probe.site_weights().detach()
        assert result.spec.sites[int(weights.argmax())] == SIGNAL_SITE, weights


def test_noise_site_stays_near_chance(synthetic_h5):
    hs = open_hidden_states(str(synthetic_h5))
    cfg = train.Config(data=str(synthetic_h5), sites="layer_00", arch="linear", reference=True, **FAST)
    result = train.train_probe(cfg, hs)
    assert abs(result.metrics["test"][M.AUROC] - 0.5) < 0.15
    assert abs(result.metrics["reference_test"][M.AUROC] - 0.5) < 0.15


def test_train_run_directory_and_scorer_round_trip(synthetic_h5, tmp_path):
    out = tmp_path / "run"
    rc = cli_main(["train", "--data", str(synthetic_h5), "--out", str(out), "--sites", "2", "--arch", "mlp",
                   "--params", '{"width": 32}', "--max-epochs", "6", "--no-progress"])
    assert rc == 0
    for f in ("run.json", "metrics.json", "scorer/scorer.json", "scorer/scorer.safetensors", "logs/metrics.csv",
              "plots/roc.png", "plots/calibration.png", "plots/score_vs_step.png"):
        assert (out / f).is_file(), f
    run_doc = json.loads((out / "run.json").read_text())
    assert run_doc["kind"] == "stepprobe-train-run" and run_doc["config"]["sites"] == "2"
    assert run_doc["data"]["model"] == IDENTITY and run_doc["split"]["by"] == "problem"
    metrics = json.loads((out / "metrics.json").read_text())
    for part in ("val", "test", "reference_val", "reference_test"):
        assert set(metrics["metrics"][part]) == set(M.METRICS) | {M.WITHIN_PROBLEMS, *M.WITHIN_METRICS} | {
            f"{m}_{b}" for m in M.WITHIN_METRICS for b in ("lo", "hi")}
    # The saved scorer gives exactly the scores the run reported.
    hs = open_hidden_states(str(synthetic_h5))
    scorer = load_scorer(out / "scorer", expected_model=hs.model)
    assert scorer.sites == [SIGNAL_SITE] and scorer.boundary_rule == hs.boundary_rule
    test_rows = np.flatnonzero(np.isin(hs.steps["problem"],
                                       [int(p[1:]) for p in run_doc["split"]["problems"]["test"]]))
    scores = scorer.score({SIGNAL_SITE: torch.from_numpy(hs.features(SIGNAL_SITE, test_rows))}).double().numpy()
    got = M.compute_metrics(scores, hs.steps["label"][test_rows], threshold=scorer.threshold)
    assert got[M.AUROC] == pytest.approx(scorer.metrics["test_auroc"], abs=1e-9)
    assert scorer.metrics["test_f1"] == pytest.approx(got[M.F1])
    # Refuses to overwrite; a bad architecture is a one-line CLI error.
    assert cli_main(["train", "--data", str(synthetic_h5), "--out", str(out)]) == 2
    assert cli_main(["train", "--data", str(synthetic_h5), "--arch", "transformer"]) == 2


def test_scorer_refuses_other_model(synthetic_h5, tmp_path):
    run = train.run(train.Config(data=str(synthetic_h5), out=str(tmp_path / "r"), arch="linear", sites=SIGNAL_SITE,
                                 plots=False, reference=False, **{**FAST, "max_epochs": 2}))
    other = make_synthetic(tmp_path / "other.h5", n_problems=6, hidden=8,
                           model={**IDENTITY, "name": "other-8", "hidden_size": 8, "config_hash": "zzz"})
    hs = open_hidden_states(str(other))
    with pytest.raises(ArtifactMismatch, match="hidden size 16, but model 'other-8' has hidden size 8"):
        load_scorer(run / "scorer", expected_model=hs.model)
    with pytest.raises(ArtifactMismatch, match="config_hash"):
        load_scorer(run / "scorer").check_compatible({**IDENTITY, "config_hash": "zzz"})


def test_scorer_records_the_prompt_and_sampling_of_its_data(tmp_path):
    """The HDF5 file carries collect's config; the exported scorer records its prompt and
    sampling settings, which run/bench/serve default to (issue 10)."""
    from stepprobe.data_collection.collect import Config as CollectConfig

    collect_cfg = CollectConfig(system_prompt="", top_k=20, top_p=0.9, temperature=0.6).to_dict()
    data = make_synthetic(tmp_path / "c.h5", n_problems=12, config={"collect": collect_cfg, "record": {}})
    run = train.run(train.Config(data=str(data), out=str(tmp_path / "r"), arch="linear", sites=SIGNAL_SITE,
                                 plots=False, reference=False, **{**FAST, "max_epochs": 1}))
    scorer = load_scorer(run / "scorer")
    assert scorer.generation == {
        "prompt": {"system_prompt": "", "answer_instruction": None, "use_chat_template": True},
        "sampling": {"temperature": 0.6, "top_p": 0.9, "top_k": 20}}
    # data that did not come from collect: nothing recorded, run falls back to the built-in defaults
    plain = train.run(train.Config(data=str(make_synthetic(tmp_path / "p.h5", n_problems=12)), out=str(tmp_path / "q"),
                                   arch="linear", sites=SIGNAL_SITE, plots=False, reference=False,
                                   **{**FAST, "max_epochs": 1}))
    assert load_scorer(plain / "scorer").generation == {}


def test_bad_inputs_are_one_line_errors(synthetic_h5, tmp_path):
    with pytest.raises(StepprobeError, match="not found"):
        train.run(train.Config(data=str(tmp_path / "missing.h5")))
    with pytest.raises(StepprobeError, match="unknown imbalance"):
        train.run(train.Config(data=str(synthetic_h5), imbalance="smote"))
    with pytest.raises(StepprobeError, match="validation metric"):
        train.run(train.Config(data=str(synthetic_h5), monitor="test_auroc"))
    with pytest.raises(StepprobeError, match="unknown site"):
        train.run(train.Config(data=str(synthetic_h5), sites="layer_09", out=str(tmp_path / "x")))
