"""Pure-Python parts of the runner: aggregates, pruning rules, voting, confidence, id mapping."""

from __future__ import annotations

import pytest

from stepprobe.errors import ArtifactMismatch, StepprobeError
from stepprobe.inference.confidence import ConfidenceFilter, trace_confidence
from stepprobe.inference.plugin import PluginSettings, install_kwargs, request_overrides, serve_args
from stepprobe.inference.policies import (Live, TraceScore, aggregate_scores, below_threshold, memory_victim_keys,
                                          top_fraction_losers)
from stepprobe.voting import Ballot, vote


@pytest.mark.parametrize("agg,expected", [("mean", 0.5), ("last", 0.2), ("min", 0.2), ("ema", 0.3 * 0.2 + 0.7 * 0.8)])
def test_aggregates(agg, expected):
    assert aggregate_scores([0.8, 0.2], agg, ema_alpha=0.3) == pytest.approx(expected)
    assert TraceScore(agg, 0.3).value is None


def test_memory_rank_puts_lowest_prunable_last():
    traces = {"a": (0.9, True), "b": (0.1, True), "c": (None, True), "d": (0.05, False), "e": (0.5, True)}
    keys = memory_victim_keys([Live(r, "g", s, p) for r, (s, p) in traces.items()], "score")
    order = sorted(traces, key=keys.__getitem__)
    assert order[-1] == "b"
    assert set(order[:2]) == {"c", "d"}  # unscored and protected traces are never the victim


def test_threshold_and_top_fraction_rules():
    assert not below_threshold(None, 5, 0.5, 2)
    assert not below_threshold(0.1, 1, 0.5, 2)
    assert below_threshold(0.1, 2, 0.5, 2)
    assert top_fraction_losers({"a": (0.9, 3), "b": (0.1, 2)}, 0.5, 3) is None  # b not at step 3 yet
    assert top_fraction_losers({"a": (0.9, 3), "b": (0.1, 4), "c": (0.5, 3), "d": (0.3, 3)}, 0.5, 3) == ["d", "b"]
    assert top_fraction_losers({"a": (0.2, 3)}, 0.1, 3) == []  # at least one kept


def test_voting_merges_equivalent_answers_and_skips_pruned():
    ballots = [Ballot("1/2", score=0.3), Ballot("0.5", score=0.3), Ballot("7", score=0.9),
               Ballot("7", pruned=True, score=0.9), Ballot(None, score=1.0)]
    assert vote(ballots, "majority").answer == "1/2"
    assert vote(ballots, "majority").voters == 3
    assert vote(ballots, "score").answer == "7"
    assert vote(ballots, "majority", include_pruned=True).tally == [("1/2", 2.0), ("7", 2.0)]
    assert vote([Ballot("3", confidence=2.0), Ballot("4", confidence=5.0)], "confidence").answer == "4"
    assert vote([], "score").answer is None
    with pytest.raises(StepprobeError):
        vote(ballots, "plurality")


def test_trace_confidence_is_lowest_window_mean():
    assert trace_confidence([1, 1, 5, 5, 1], 2) == pytest.approx(1.0)
    assert trace_confidence([4, 2], 8) == pytest.approx(3.0)
    assert trace_confidence(None, 4) is None

    class T:
        def __init__(self, c):
            self.confidence = c

    f = ConfidenceFilter(window=2, percentile=50.0)
    assert f.thresholds([[T([1, 1]), T([3, 3]), T([5, 5])]]) == [pytest.approx(3.0)]


def test_settings_validation_and_flags(tmp_path):
    with pytest.raises(StepprobeError, match="unknown pruning policy"):
        PluginSettings(policy="sometimes")
    with pytest.raises(StepprobeError, match="needs a scorer"):  # "none": not even the released one
        PluginSettings(policy="memory", scorer="none")
    with pytest.raises(StepprobeError, match="unknown stepprobe setting"):
        PluginSettings.from_mapping({"scorer": "x", "polcy": "none"})
    s = PluginSettings(scorer=str(tmp_path), policy="memory")
    kw = install_kwargs(s)
    assert kw["additional_config"]["stepprobe"]["policy"] == "memory"
    args = serve_args(s)
    assert args[0] == "--worker-cls" and "--additional-config" in args

    class P:
        extra_args = {"stepprobe": {"policy": "none"}, "stepprobe_group": "g"}

    assert request_overrides(P()) == {"policy": "none", "group": "g"}


def test_scorer_for_another_model_is_refused_before_start(tmp_path, tiny_model_path, default_model_path, helpers):
    """A scorer exported for another model (here: the 576-wide default) is refused, one line."""
    import numpy as np

    from stepprobe.boundaries import BoundaryRule
    from stepprobe.inference.plugin import PluginSettings
    from stepprobe.inference.runner import StepRunner
    from stepprobe.probes.checkpoint import linear_probe, save_scorer

    ident = helpers.tiny_identity(default_model_path)
    probe = linear_probe(["layer_03"], weight=np.zeros(ident["hidden_size"], dtype=np.float32))
    save_scorer(tmp_path / "s", probe, model=ident, boundary_rule=BoundaryRule().to_dict())
    with pytest.raises(ArtifactMismatch, match="hidden size 576") as err:
        StepRunner(tiny_model_path, PluginSettings(scorer=str(tmp_path / "s"), policy="memory"))
    assert "\n" not in str(err.value)


def test_bench_table_plot_and_config(tmp_path):
    from stepprobe.inference import bench

    rows = [{"kv_blocks": 0, "policy": "none", "vote": "majority", "accuracy": 0.5, "wall_s": 10.0, "time_ratio": 1.0,
             "output_tokens": 1000, "token_ratio": 1.0, "preemptions": 3, "pruned": 0, "traces": 16},
            {"kv_blocks": 16, "policy": "memory", "vote": "score", "accuracy": 0.5625, "wall_s": 6.0,
             "time_ratio": 0.6, "output_tokens": 700, "token_ratio": 0.7, "preemptions": 0, "pruned": 5, "traces": 16,
             "vs_sc": {"diff": 0.0625, "low": -0.125, "high": 0.25}}]
    table = bench.markdown_table(rows)
    assert "| default | none | majority | 0.500 | – | 10.0 | 1.00 | – | 1000 | 1.00 | 3 | 0/16 |" in table
    assert "| 16 | memory | score | 0.562 | +0.062 [-0.125, +0.250] | 6.0 | 0.60 | – | 700 | 0.70 | 0 | 5/16 |" in table
    sc = [{"problem_id": f"p{i}", "correct": i < 2} for i in range(4)]
    other = [{"problem_id": f"p{i}", "correct": i < 3} for i in reversed(range(4))]  # matched by id, not order
    d = bench.paired_vs_sc(sc, other)
    assert d["diff"] == 0.25 and d["n"] == 4 and d["low"] == 0.0
    bench.plot(rows, tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 1000
    with pytest.raises(StepprobeError, match="baseline"):
        bench.Config(policies=["memory"], scorer="x")
    with pytest.raises(StepprobeError, match="needs --scorer"):
        bench.Config(policies=["none", "memory"], scorer="none")


def test_bench_resume_keeps_only_fully_measured_kv_budgets(tmp_path, tiny_model_path, planted_scorer):
    """An interrupted bench keeps KV budgets whose policies all finished; another config,
    model or scorer is refused."""
    import json

    import numpy as np

    from stepprobe.boundaries import BoundaryRule
    from stepprobe.inference import bench
    from stepprobe.inference import run as run_stage
    from stepprobe.probes.checkpoint import linear_probe, save_scorer
    from stepprobe.provenance import model_identity

    cfg = bench.Config(scorer=planted_scorer, model=tiny_model_path, policies=["none", "memory"], kv_blocks=[0, 4],
                       output=str(tmp_path))
    prov = run_stage.provenance(cfg.model, cfg.scorer)
    assert prov["model"]["hidden_size"] == 64 and len(prov["scorer"]["weights_sha256"]) == 64
    row = {"accuracy": 0.5, "wall_s": 1.0, "output_tokens": 10, "preemptions": 0, "pruned": 0, "traces": 4}
    partial = {"kind": bench.BENCH_KIND, "schema_version": bench.BENCH_SCHEMA_VERSION, "config": cfg.to_dict(),
               **prov, "rows": [{**row, "kv_blocks": 0, "policy": "none"}, {**row, "kv_blocks": 0, "policy": "memory"},
                                {**row, "kv_blocks": 4, "policy": "none"}],
               "problems": {"0/none": [], "0/memory": [], "4/none": []}}
    path = tmp_path / "bench.partial.json"
    path.write_text(json.dumps(partial))
    kept = bench._resume(path, cfg, prov)
    assert list(kept) == [0] and [r["policy"] for r in kept[0][0]] == ["none", "memory"]
    # SC sized not to preempt is measured only at a set budget: its absence at vLLM's default is no gap
    adm = cfg.replace(policies=["none", "memory", bench.ADMISSION])
    path.write_text(json.dumps({**partial, "config": adm.to_dict()}))
    assert list(bench._resume(path, adm, prov)) == [0]
    path.write_text(json.dumps(partial))
    with pytest.raises(StepprobeError, match="list it after 'none'"):
        bench.Config(scorer=planted_scorer, model=tiny_model_path, policies=[bench.ADMISSION, "none"])
    with pytest.raises(StepprobeError, match="another config .*n"):
        bench._resume(path, cfg.replace(n=3), prov)
    # another scorer for the same model
    from transformers import AutoConfig, AutoTokenizer

    ident = model_identity(tiny_model_path, AutoConfig.from_pretrained(tiny_model_path),
                           AutoTokenizer.from_pretrained(tiny_model_path))
    save_scorer(tmp_path / "other", linear_probe(["embed"], weight=np.ones(64, dtype=np.float32)), model=ident,
                boundary_rule=BoundaryRule().to_dict())
    other = run_stage.provenance(cfg.model, str(tmp_path / "other"))
    with pytest.raises(ArtifactMismatch, match="another scorer .*delete it or pass another --output"):
        bench._resume(path, cfg, other)
    path.write_text(json.dumps({**partial, "schema_version": 1}))
    with pytest.raises(ArtifactMismatch, match="schema version 1"):
        bench._resume(path, cfg, prov)


def test_report_bench_section_checks_the_bench_schema(tmp_path):
    import json

    from stepprobe.inference.bench import BENCH_KIND, BENCH_SCHEMA_VERSION
    from stepprobe.report import _bench_section

    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "bench.md").write_text("| KV blocks | policy |\n|---|---|\n| default | none |\n")
    assert "bench has not run." in _bench_section(tmp_path)  # no bench.json
    data = {"kind": BENCH_KIND, "schema_version": BENCH_SCHEMA_VERSION, "date": "2026-11-28 22:00 UTC",
            "model": {"name": "m"}, "scorer": {"architecture": "mlp", "sites": ["layer_20"], "weights_sha256": "ab" * 32}}
    (tmp_path / "bench" / "bench.json").write_text(json.dumps(data))
    text = "\n".join(_bench_section(tmp_path))
    assert "Model `m`, scorer `mlp` on layer_20" in text and "| default | none |" in text
    (tmp_path / "bench" / "bench.json").write_text(json.dumps({**data, "schema_version": 1}))
    text = "\n".join(_bench_section(tmp_path))
    assert "schema version 1" in text and "rerun the bench stage" in text and "| default | none |" not in text
