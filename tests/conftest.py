"""Shared fixtures: tiny random-weight models and the embedded default model.

vLLM engines are expensive (~20 s to start here): fixtures that start one are
session-scoped and shared by every test that can use them.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

# Small CPU KV cache for every vLLM engine the tests start (GiB).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs the fast tier on two pytest workers (two cores): one thread each, not two.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _release_output_locks():
    """A stage called from Python (not the CLI) keeps its output lock until the process ends;
    the test process runs many, so drop them after each test (stepprobe.locks)."""
    yield
    from stepprobe import locks

    locks.release_all()


@pytest.fixture(autouse=True)
def _seed_everything():
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def default_model_path() -> str:
    """The embedded default (SmolLM2-135M-Instruct) as an HF checkpoint directory."""
    from stepprobe.models import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory, default_model_path) -> str:
    """A random-weight Llama: 2 layers, hidden 64, 2 heads (head_dim 32), default tokenizer."""
    from stepprobe.models import build_random_model

    return str(build_random_model(tmp_path_factory.mktemp("models") / "tiny-llama",
                                  tokenizer_from=default_model_path))


# Fixtures that start a vLLM engine: a test using one must be marked `vllm`, so that the
# fast tier (`make test-fast`: -m "not vllm and not e2e") never starts an engine.
ENGINE_FIXTURES = {"collect_tiny_llm", "collect_default_llm", "collect_tiny_run", "plugin_runner", "plain_llm",
                   "bf16_case", "tp2_runner", "arch_case"}


def pytest_collection_modifyitems(config, items):
    unmarked = [item.nodeid for item in items
                if ENGINE_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("vllm") is None]
    if unmarked:
        raise pytest.UsageError(f"tests that start a vLLM engine must be marked vllm: {', '.join(unmarked)}")


@pytest.fixture(scope="session")
def collect_tiny_llm(tiny_model_path):
    """One vLLM engine on the tiny random model, shared by every collect test that
    generates (tests/data_collection, tests/faults)."""
    from stepprobe.engine import engine_kwargs, make_llm
    from stepprobe.options import EngineOptions

    llm = make_llm(tiny_model_path, engine_kwargs(EngineOptions(max_model_len=512, dtype="float32", enforce_eager=True)))
    yield llm
    del llm
