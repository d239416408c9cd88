"""The bench stage without an engine (inference/bench.py): its table, plot, paired difference to
SC and config checks; resuming an interrupted bench; the report's bench section."""

from __future__ import annotations

import pytest

from stepprobe.errors import ArtifactMismatch, StepprobeError


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
