"""The option groups: declared once, shared by every stage, carried by the scorer (issue 10).

No engine starts here: prompts are built with the default model's tokenizer, sampling
parameters and engine arguments are vLLM's own objects built without an engine.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import subprocess
from pathlib import Path

import numpy as np
import pytest

from stepprobe import options as O
from stepprobe.errors import StepprobeError

REPO = Path(__file__).resolve().parents[2]
GPU_EXAMPLE = REPO / "configs" / "pipeline-gpu-example.yaml"

SHARED_GROUPS = (O.PromptOptions, O.SamplingOptions, O.PruningOptions, O.PolicyOption, O.EngineOptions,
                 O.ConfidenceOptions, O.TrainingOptions, O.FitOptions)


def _config_cls(stage: str):
    from stepprobe.cli import STAGES

    return importlib.import_module(STAGES[stage][0]).Config


def _scorer(tmp_path: Path, generation: dict) -> str:
    from stepprobe.probes.checkpoint import linear_probe, save_scorer

    identity = {"name": "m", "config_hash": "c", "vocab_hash": "v", "hidden_size": 8, "num_hidden_layers": 2}
    save_scorer(tmp_path / "scorer", linear_probe(["layer_01"], np.ones(8)), model=identity,
                boundary_rule={"delimiter": "\n\n"}, generation=generation)
    return str(tmp_path / "scorer")


def _gpu_pipeline(tmp_path):
    from stepprobe.paths import RunPaths
    from stepprobe.pipeline import Config

    cfg = Config.from_file(GPU_EXAMPLE).replace(out=str(tmp_path / "run"))
    return cfg, RunPaths(Path(cfg.out))


def test_gpu_example_collect_settings_reach_bench_prompts_and_sampling(tmp_path, default_model_path, caplog):
    """Done-means (a): configs/pipeline-gpu-example.yaml collects with system_prompt "" and
    top_k 20; its bench section names neither, and its prompts and SamplingParams are collect's."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from stepprobe.data_collection import collect
    from stepprobe.data_collection.problems import Problem
    from stepprobe.data_collection.prompts import build_prompt, build_prompts
    from stepprobe.inference import bench
    from stepprobe.inference.runner import request_params
    from stepprobe.pipeline import stage_settings

    cfg, paths = _gpu_pipeline(tmp_path)
    assert "top_k" not in cfg.bench and "system_prompt" not in cfg.bench
    collected = collect.Config.from_dict(stage_settings("collect", cfg, paths))
    assert (collected.system_prompt, collected.top_k, collected.top_p, collected.temperature) == ("", 20, 0.95, 0.6)
    # What the scorer records: collect's config as the traces file and the HDF5 file carry it.
    scorer = _scorer(tmp_path, O.generation_of(collected.to_dict()))
    bench_cfg = bench.Config.from_dict({**stage_settings("bench", cfg, paths), "scorer": scorer})
    with caplog.at_level(logging.WARNING, logger="stepprobe.options"):
        resolved = O.with_scorer_generation(bench_cfg)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "stepprobe.options"]
    run_cfg = bench._run_config(resolved, "memory", 0)  # what every policy runs with

    tok = AutoTokenizer.from_pretrained(default_model_path)
    problem = Problem(problem_id="p1", question="What is 2 + 3?", gold="5")
    prompt = build_prompts([problem], tok, run_cfg)[0]
    assert prompt == build_prompt(problem, tok, system_prompt="", answer_instruction=None)
    assert O.DEFAULT_SYSTEM_PROMPT not in prompt  # the old bench's prompt had it
    assert prompt != build_prompt(problem, tok)

    params, prompts, owners = request_params([prompt], n=run_cfg.n, **run_cfg.sampling_kwargs())
    assert len(params) == 64 and prompts == [prompt] * 64 and owners[-1] == (0, 63)
    assert all(isinstance(p, SamplingParams) for p in params)
    p = params[0]
    assert (p.n, p.temperature, p.top_p, p.top_k, p.max_tokens) == (1, 0.6, 0.95, 20, 16384)
    # collect samples with the same settings
    c = collect.sampling_params(collected)
    assert (c.temperature, c.top_p, c.top_k, c.max_tokens) == (p.temperature, p.top_p, p.top_k, p.max_tokens)


def test_a_run_with_another_system_prompt_warns_in_one_line(tmp_path, caplog):
    from stepprobe.inference import run

    scorer = _scorer(tmp_path, O.generation_of({"system_prompt": "", "top_k": 20, "top_p": 0.95,
                                                 "temperature": 0.6}))
    cfg = run.Config(scorer=scorer, system_prompt="Think hard.", top_p=1.0)
    with caplog.at_level(logging.INFO, logger="stepprobe.options"):
        resolved = O.with_scorer_generation(cfg)
    assert resolved.system_prompt == "Think hard."  # the user's choice wins ...
    assert (resolved.top_p, resolved.top_k, resolved.temperature) == (1.0, 20, 0.6)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "stepprobe.options"]
    assert len(warnings) == 1 and "\n" not in warnings[0]  # ... with one line naming both values
    assert "'Think hard.'" in warnings[0] and "system_prompt=''" in warnings[0]
    # without a scorer record, the built-in defaults
    plain = O.with_scorer_generation(run.Config(scorer="none"))
    assert plain.prompt_kwargs() == O.BUILTIN_PROMPT
    assert {k: getattr(plain, k) for k in O.TRAINED_SAMPLING_FIELDS} == O.BUILTIN_SAMPLING


def test_pipeline_with_a_typo_in_its_last_section_is_refused_before_any_stage(tmp_path):
    """Done-means (b): nothing runs, nothing is written."""
    import yaml

    data = yaml.safe_load(GPU_EXAMPLE.read_text())
    data["pipeline"]["out"] = str(tmp_path / "run")
    data["pipeline"]["bench"]["temprature"] = 0.6
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    from stepprobe.cli import main

    assert main(["pipeline", "--config", str(path)]) == 2
    assert not (tmp_path / "run").exists()
    from stepprobe.pipeline import Config, run

    cfg = Config.from_file(path)
    with pytest.raises(StepprobeError, match=r"pipeline bench: unknown field\(s\) temprature"):
        run(cfg)
    with pytest.raises(StepprobeError, match="pipeline bench: top_p must be in"):
        run(cfg.replace(bench={"top_p": 2.0}))
    with pytest.raises(StepprobeError, match="pipeline tune: unknown probe architecture 'transformer'"):
        run(cfg.replace(bench={}, tune={"archs": "linear,transformer"}))
    with pytest.raises(StepprobeError, match="pipeline export: unknown refit 'all'"):
        run(cfg.replace(bench={}, export={"refit": "all"}))
    assert not (tmp_path / "run").exists()


def test_no_prompt_sampling_or_pruning_option_is_declared_twice():
    """Done-means (c), by field: every stage takes these options from the one group."""
    for group in (O.PromptOptions, O.SamplingOptions, O.PruningOptions, O.PolicyOption, O.EngineOptions):
        names = {f.name for f in dataclasses.fields(group)}
        for stage in ("collect", "run", "bench", "serve"):
            cls = _config_cls(stage)
            for name in names & {f.name for f in dataclasses.fields(cls)}:
                declared = [k for k in cls.__mro__ if name in k.__dict__.get("__annotations__", {})]
                # declared by the group; a stage may give another default (stage_defaults), never a new help
                assert group in declared, (stage, name)
                field = {f.name: f for f in dataclasses.fields(cls)}[name]
                assert field.metadata["help"] == {f.name: f for f in dataclasses.fields(group)}[name].metadata["help"]
    from stepprobe.inference.plugin import PluginSettings

    assert {f.name for f in dataclasses.fields(O.PruningOptions)} <= {f.name for f in dataclasses.fields(PluginSettings)}


def test_duplicates_finds_no_repeated_option_declarations():
    """Done-means (c), by the `duplicates` command over the stage configs and the groups."""
    import shutil

    if shutil.which("duplicates") is None:
        pytest.skip("the `duplicates` command is not installed here")
    files = ["stepprobe/options.py", "data_collection/collect.py", "inference/run.py", "inference/bench.py",
             "inference/serve.py", "inference/plugin.py", "training/train.py", "training/sweep.py", "training/tune.py"]
    out = subprocess.run(["duplicates", "--most", "200", "--seconds", "60"], cwd=REPO,
                         capture_output=True, text=True, timeout=120).stdout
    rows = [ln for ln in out.splitlines() if ln.startswith("D")]
    option_rows = [r for r in rows if sum(f in r for f in files) == 2 and "option(" in _lines_of(r)]
    assert not option_rows, option_rows


def _lines_of(row: str) -> str:
    """The text of both sides of a `duplicates` row (`D1 a.py:10-24 ~ b.py:40-54 ...`)."""
    text = []
    for side in row.split()[1:4:2]:
        path, _, span = side.rpartition(":")
        a, _, b = span.partition("-")
        lines = (REPO / path).read_text().splitlines()
        text += lines[int(a) - 1:int(b or a)]
    return "\n".join(text)


@pytest.mark.parametrize("stage", ["collect", "run", "bench", "serve"])
def test_engine_args_reach_vllm_engine_args(stage, tmp_path):
    """Done-means (d): each stage's engine_args reach vLLM's EngineArgs (no engine started)."""
    from vllm.engine.arg_utils import EngineArgs

    from stepprobe.engine import engine_kwargs

    extra = {"tensor_parallel_size": 2, "enable_prefix_caching": False, "block_size": 32}
    cls = _config_cls(stage)
    kw = {"scorer": _scorer(tmp_path, {})} if stage != "collect" else {}
    cfg = cls.from_dict({"engine_args": '{"tensor_parallel_size": 2, "enable_prefix_caching": false, '
                                        '"block_size": 32}', "max_model_len": 512, **kw}, source="test")
    assert cfg.engine_args == extra
    if stage == "serve":
        from stepprobe.inference.serve import vllm_serve_argv

        argv = vllm_serve_argv(cfg, "/m", {"sampling": {"top_k": 20}})
        assert argv[argv.index("--tensor-parallel-size") + 1] == "2" and "--no-enable-prefix-caching" in argv
        assert argv[argv.index("--override-generation-config") + 1] == '{"top_k": 20}'
        from vllm.engine.arg_utils import EngineArgs as EA
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        parsed = EA.add_cli_args(FlexibleArgumentParser()).parse_args(["--model", "/m", *argv[argv.index("--max-model-len"):]])
        args = EA.from_cli_args(parsed)
    else:
        if stage == "bench":
            from stepprobe.inference import bench

            cfg = bench._run_config(cfg, "none", 16)
        if stage in ("run", "bench"):
            from stepprobe.inference.runner import llm_kwargs_for

            kwargs = llm_kwargs_for(cfg, cfg.settings(), seed=cfg.seed)
            assert kwargs["worker_cls"].endswith("StepprobeWorker")
        else:
            kwargs = engine_kwargs(cfg, seed=cfg.seed)
        args = EngineArgs(model="/m", **kwargs)
        if stage == "bench":
            assert args.num_gpu_blocks_override == 16
    assert (args.tensor_parallel_size, args.enable_prefix_caching, args.block_size, args.max_model_len) == \
        (2, False, 32, 512)


def test_unknown_or_owned_engine_args_are_refused_in_one_line():
    from stepprobe.cli import main

    run_cls = _config_cls("run")
    with pytest.raises(StepprobeError, match=r"^engine_args: unknown vLLM engine argument\(s\) tensor_paralel_size "):
        run_cls(engine_args={"tensor_paralel_size": 2})
    with pytest.raises(StepprobeError, match="max_model_len is set by max_model_len"):
        run_cls(engine_args={"max_model_len": 2})
    assert main(["collect", "--engine-args", '{"bogus_arg": 1}']) == 2


def test_resume_ok_is_marked_where_declared():
    from stepprobe.data_collection import collect
    from stepprobe.inference import bench, run
    from stepprobe.training import sweep, tune

    assert "limit" not in collect.RESUME_KEYS and "output" not in collect.RESUME_KEYS
    assert {"top_p", "top_k", "system_prompt", "n", "seed", "model", "dtype"} <= set(collect.RESUME_KEYS)
    assert "kv_cache_gib" not in collect.RESUME_KEYS  # speed only: may change on resume
    d = run.Config(output="a", limit=3, top_p=0.9).to_dict()
    assert O.resume_view(d, run.Config) == O.resume_view({**d, "output": "b", "limit": None}, run.Config)
    assert O.resume_view(d, run.Config) != O.resume_view({**d, "top_p": 1.0}, run.Config)
    assert "output" not in O.resume_view(bench.Config(policies=["none"]).to_dict(), bench.Config)
    assert {"out", "plots", "progress"}.isdisjoint(O.resume_view(sweep.Config().to_dict(), sweep.Config))
    assert {"n_trials", "storage", "grace_period"}.isdisjoint(O.resume_view(tune.Config().to_dict(), tune.Config))


def test_sub_configs_are_built_from_the_shared_groups():
    from stepprobe.inference import bench
    from stepprobe.training import sweep, tune

    b = bench.Config(policies=["none"], top_p=0.5, top_k=3, system_prompt="", warmup_steps=7, engine_args={},
                     confidence_window=9, max_tokens=11, dtype="float32")
    r = bench._run_config(b, "none", 0)
    for group in (O.PromptOptions, O.SamplingOptions, O.PruningOptions, O.ConfidenceOptions):
        assert O.group_values(r, group) == O.group_values(b, group)
    assert (r.dtype, r.max_model_len, r.vote) == ("float32", 1024, "majority")
    s = sweep.Config(lr=0.5, patience=1, split_seed=3, max_steps_per_trace=2)
    t = sweep._train_config(s, "layer_01")
    assert (t.lr, t.patience, t.split_seed, t.max_steps_per_trace, t.sites) == (0.5, 1, 3, 2, "layer_01")
    assert (sweep.Config().lr, tune.Config().max_epochs, tune.Config().batch_size) == (1e-2, 25, 0)


def test_blank_prompt_options_stay_blank_from_files_and_flags(tmp_path):
    from stepprobe.data_collection import collect
    from stepprobe.inference import run

    assert collect.Config.from_dict({"system_prompt": ""}).system_prompt == ""
    assert collect.Config.from_dict({"answer_instruction": ""}).answer_instruction == ""
    assert collect.Config.from_dict({}).system_prompt == O.DEFAULT_SYSTEM_PROMPT
    assert run.Config.from_dict({"system_prompt": "none"}).system_prompt is None
    assert collect.Config.from_dict({"top_k": -1}).top_k == 0


def test_docs_describe_each_group_once_as_declared():
    text = (REPO / "docs" / "options.md").read_text()
    for name, group in O.GROUPS.items():
        assert text.count(f"## {name}\n") == 1
        assert O.markdown_table(group) in text, f"docs/options.md: the {name} table differs from its declaration"
