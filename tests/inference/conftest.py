"""Fixtures for the inference tests: a planted scorer and two shared vLLM engines.

The planted scorer reads ``embed``, ``layer_00`` and ``layer_01`` (concatenated) but only
its ``embed`` weights are non-zero: ``sigmoid(w . (e(tok) - mid))`` with ``w`` along
``e("\\n") - e("\\n\\n")``. A boundary completed by a ``"\\n"`` token scores ~1, one
completed by a ``"\\n\\n"`` token scores ~0; tests force one or the other with a logit bias,
so which trace is "bad" is known exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

NL, NLNL = 198, 1116  # "\n" and "\n\n" in the default (SmolLM2) tokenizer
SITES = ["embed", "layer_00", "layer_01"]
NUM_KV_BLOCKS = 7  # the CPU backend uses 128-token blocks: 896 tokens
MAX_MODEL_LEN = 256


def good_bias() -> dict[int, float]:
    return {NL: 100.0}


def bad_bias() -> dict[int, float]:
    return {NLNL: 100.0}


def tiny_identity(model_path: str) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    from stepprobe.provenance import model_identity

    return model_identity(model_path, AutoConfig.from_pretrained(model_path), AutoTokenizer.from_pretrained(model_path))


@pytest.fixture(scope="session")
def planted_scorer(tmp_path_factory, tiny_model_path) -> str:
    from safetensors.torch import load_file

    from stepprobe.boundaries import BoundaryRule
    from stepprobe.probes.checkpoint import linear_probe, save_scorer

    import glob

    weights = {}
    for f in glob.glob(f"{tiny_model_path}/*.safetensors"):
        weights.update(load_file(f))
    emb = weights["model.embed_tokens.weight"].float().numpy()
    hidden = emb.shape[1]
    d = emb[NL] - emb[NLNL]
    mid = (emb[NL] + emb[NLNL]) / 2
    scale = 8.0 / float(d @ (emb[NL] - mid))
    w = np.zeros(hidden * len(SITES), dtype=np.float32)
    w[:hidden] = scale * d
    bias = -float(w[:hidden] @ mid)
    probe = linear_probe(SITES, weight=w, bias=bias, combine="concat")
    out = tmp_path_factory.mktemp("scorers") / "planted"
    save_scorer(out, probe, model=tiny_identity(tiny_model_path), boundary_rule=BoundaryRule().to_dict())
    return str(out)


@pytest.fixture(scope="session")
def plugin_runner(tiny_model_path, planted_scorer):
    """The tiny model in vLLM's default (compiled) mode with the plugin, a tight KV cache."""
    from stepprobe.inference.plugin import PluginSettings
    from stepprobe.inference.runner import StepRunner

    # max_accuracy_loss none: these engine tests pin the paper's memory rule (the risk-controlled
    # default, a cutoff from trust.json, is pinned on vLLM's real scheduler classes in test_scheduler_rules).
    settings = PluginSettings(scorer=planted_scorer, policy="none", keep_records=True, record_features=True,
                              warmup_steps=2, keep_step=3, keep_fraction=0.75, threshold=0.5, max_accuracy_loss=None)
    runner = StepRunner(tiny_model_path, settings, seed=0, dtype="float32", max_model_len=MAX_MODEL_LEN,
                        num_kv_blocks=NUM_KV_BLOCKS)
    yield runner
    runner.close()


@pytest.fixture(scope="session")
def plain_llm(tiny_model_path, plugin_runner):
    """Stock vLLM with the same settings and no plugin (started after the plugin engine)."""
    from vllm import LLM

    llm = LLM(tiny_model_path, seed=0, dtype="float32", max_model_len=MAX_MODEL_LEN,
              num_gpu_blocks_override=NUM_KV_BLOCKS, disable_log_stats=False)
    yield llm
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001
        pass


def blocks_for(tokens: int, block_size: int) -> int:
    return math.ceil(tokens / block_size)


@pytest.fixture(scope="session")
def helpers():
    """The constants and helpers above, for test modules (test folders are not packages)."""
    import types

    return types.SimpleNamespace(NL=NL, NLNL=NLNL, SITES=SITES, NUM_KV_BLOCKS=NUM_KV_BLOCKS,
                                 good_bias=good_bias, bad_bias=bad_bias, blocks_for=blocks_for,
                                 tiny_identity=tiny_identity)


@pytest.fixture
def build_scheduler(tiny_model_path):
    """The pruning scheduler on vLLM's real classes, on the tiny model (helpers/scheduler_harness.py)."""
    import functools

    from helpers.scheduler_harness import build_scheduler as build

    return functools.partial(build, tiny_model_path)
