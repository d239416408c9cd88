"""Released scorers: run/bench/serve fall back to the default model's shipped scorer; the shipped
one (where there is one) loads, matches the default model and scores a recorded step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stepprobe.models import DEFAULT_MODEL
from stepprobe.released import released_root, released_scorer, resolve_scorer


def _plant(root, identity):
    from stepprobe.probes.checkpoint import linear_probe, save_scorer

    d = root / "smollm2-135m"
    save_scorer(d, linear_probe(["layer_20"], weight=np.ones(identity["hidden_size"])), model=identity,
                boundary_rule={"delimiter": "\n\n"})
    return d


def test_default_model_falls_back_to_the_released_scorer(tmp_path, monkeypatch):
    from stepprobe.inference import bench, run, serve

    monkeypatch.setenv("STEPPROBE_RELEASED_DIR", str(tmp_path / "none-here"))
    assert released_scorer(None) is None and resolve_scorer(None, None) == ""
    assert not run.Config(policy="none").scorer
    ident = {"name": DEFAULT_MODEL, "hidden_size": 576, "num_hidden_layers": 30}
    d = _plant(tmp_path / "rel", ident)
    monkeypatch.setenv("STEPPROBE_RELEASED_DIR", str(tmp_path / "rel"))
    assert released_root() == tmp_path / "rel"
    for cls in (run.Config, serve.Config):
        assert cls().scorer == str(d)  # default model, no --scorer
        assert cls(scorer="none").scorer == ""  # explicitly no scoring
        mine, other = str(tmp_path / "mine"), str(tmp_path / "other-model")  # names only, never opened
        assert cls(scorer=mine).scorer == mine  # an explicit scorer wins
        assert cls(model=other).scorer == ""  # only the default model has one
    assert bench.Config().scorer == str(d)


def test_no_scorer_stays_no_scorer_through_the_stages(tmp_path, monkeypatch):
    """``--scorer none`` and another model keep "no scorer" when a stage rebuilds its config
    (the scorer's sampling is filled in with ``replace``) and in the plugin settings the engine
    gets; the plugin itself never picks a released scorer (it does not know the model)."""
    from stepprobe.inference import bench, run
    from stepprobe.inference.plugin import PluginSettings
    from stepprobe.options import with_scorer_generation

    ident = {"name": DEFAULT_MODEL, "hidden_size": 576, "num_hidden_layers": 30}
    d = _plant(tmp_path / "rel", ident)
    monkeypatch.setenv("STEPPROBE_RELEASED_DIR", str(tmp_path / "rel"))
    other = str(tmp_path / "other-model")  # a name only, never opened
    for cfg in (run.Config(scorer="none", policy="none"), run.Config(model=other, policy="none")):
        again = with_scorer_generation(cfg)
        assert again.scorer == "" and again.settings().scorer == ""
        assert again.replace(n=2).scorer == ""
    assert with_scorer_generation(run.Config(policy="none")).settings().scorer == str(d)
    assert not bench._run_config(bench.Config(scorer="none", policies=["none"]), "none", 0).scorer
    assert PluginSettings(policy="none").scorer is None  # a raw vLLM engine: no scorer unless named


def test_shipped_released_scorer_loads_matches_the_default_model_and_scores(default_model_path, tmp_path):
    shipped = released_scorer(None) if "STEPPROBE_RELEASED_DIR" not in __import__("os").environ else None
    if shipped is None:
        pytest.skip("no released scorer is shipped in stepprobe/released/ (see its README.md)")
    from transformers import AutoConfig, AutoTokenizer

    from stepprobe.probes.checkpoint import load_scorer
    from stepprobe.provenance import model_identity

    tok = AutoTokenizer.from_pretrained(default_model_path)
    ident = model_identity(DEFAULT_MODEL, AutoConfig.from_pretrained(default_model_path), tok)
    scorer = load_scorer(shipped, expected_model=ident)
    scorer.check_live()
    assert (shipped / "README.md").is_file()
    # a recorded step: the hidden states of the default model at a boundary token
    from stepprobe.data_collection.extractor import SiteExtractor

    ex = SiteExtractor(default_model_path, dtype="float32")
    ids = tok("First, 2 + 3 = 5.\n\nThe answer is 5.", add_special_tokens=False)["input_ids"]
    feats = ex.extract([ids], [[len(ids) // 2]])[0]
    p = float(scorer.score({s: feats[s] for s in scorer.sites})[0])
    assert 0.0 <= p <= 1.0


def test_release_refuses_an_unfinished_or_small_run(tmp_path):
    import json

    from stepprobe.errors import StepprobeError
    from stepprobe.training.release import main, release

    with pytest.raises(StepprobeError, match="have not finished; nothing is released"):
        release(tmp_path, tmp_path / "dest")
    (tmp_path / "collect").mkdir()
    (tmp_path / "pipeline.json").write_text(json.dumps({"stages": {s: {"status": "done"} for s in
                                                                   ("collect", "record", "sweep", "tune", "export")}}))
    from stepprobe.data_collection.collect import SUMMARY_KIND, SUMMARY_SCHEMA_VERSION

    summary = tmp_path / "collect" / "traces.summary.json"
    summary.write_text(json.dumps({"problems": 96, "traces": 768}))  # no kind: not collect's summary
    with pytest.raises(StepprobeError, match="traces.summary.json"):
        release(tmp_path, tmp_path / "dest")
    # the summary as collect writes it (its counts under "problems" and "traces")
    summary.write_text(json.dumps({"kind": SUMMARY_KIND, "schema_version": SUMMARY_SCHEMA_VERSION,
                                   "problems": 96, "traces": 768}))
    with pytest.raises(StepprobeError, match="96 problems / 768 traces; a release needs at least 1000 / 8000"):
        release(tmp_path, tmp_path / "dest")
    assert main(["--run", str(tmp_path), "--dest", str(tmp_path / "dest")]) == 2
    assert not (tmp_path / "dest").exists()


def test_card_shows_pruning_on_the_out_of_template_replay(tmp_path):
    """The card's pruning table is read from the run's ood-replay (schema checked): SC, and each
    policy with its paired interval, random and oracle baselines."""
    from stepprobe.inference import replay as rp
    from stepprobe.training.release import card
    from tests.inference.test_replay import RUN_CONFIG, synthetic_records, write_run

    assert "Pruning on the out-of-template problems" not in card(tmp_path)
    sc = write_run(tmp_path, synthetic_records(), config={**RUN_CONFIG, "n": 4})
    rp.run(rp.Config(results=str(sc), kv_blocks=[0, 16], policies=["none", "memory", "threshold"],
                     random_draws=10, output=str(tmp_path / "ood-replay")))
    text = card(tmp_path)
    assert "## Pruning on the out-of-template problems (replay)" in text
    assert "n=4) with this scorer over 2 out-of-template problems" in text and "at 16 KV blocks" in text
    assert "| none | majority | 0.500 | – | – | – | 1.00 | 0/8 |" in text
    assert "| threshold | score | 0.500 | +0.000 [" in text and "| threshold | majority | " in text


def test_card_replay_table_is_one_budget_when_16_was_not_replayed(tmp_path):
    from stepprobe.inference import replay as rp
    from stepprobe.training.release import card
    from tests.inference.test_replay import RUN_CONFIG, synthetic_records, write_run

    sc = write_run(tmp_path, synthetic_records(), config={**RUN_CONFIG, "n": 4})
    rp.run(rp.Config(results=str(sc), kv_blocks=[0, 24, 12], policies=["none", "memory"], random_draws=10,
                     votes=["majority"], output=str(tmp_path / "ood-replay")))
    table = card(tmp_path).split("## Pruning on the out-of-template problems (replay)")[1].split("## Use")[0]
    assert "at 12 KV blocks" in table
    assert [ln.split("|")[1].strip() for ln in table.splitlines() if ln.startswith("| ") and "---" not in ln][1:] \
        == ["none", "memory"]  # the header, then one row per policy: a single budget


def test_released_training_problems_match_the_recipe():
    import yaml

    from stepprobe.released import TRAINED_ON

    recipe = yaml.safe_load((Path(__file__).parents[2] / "configs" / "released-smollm2-135m.yaml").read_text())
    assert TRAINED_ON["smollm2-135m"] == recipe["pipeline"]["problems"]
