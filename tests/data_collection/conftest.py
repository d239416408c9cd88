"""Fixtures of the data_collection tests. ``record_*``: recorder (hdf5, record, step_format)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

# Texts of generated parts, tokenized with the default tokenizer. They cover: "\n\n" as
# one token or as "\n" + "\n", three newlines, a trace without any boundary and one cut
# at max_tokens in the middle of its text.
RECORD_TEXTS = [
    "First, 2 + 3 = 5.\n\nThen 5 + 1 = 6.\n\nThe answer is 6.",
    "Let me think.\n\n\nWe add.\nStill one step.\n\nThe answer is 4.",
    "No paragraph break at all, the answer is 7.",
    "Step 1: write it down.\n\nStep 2: add the",  # cut at max_tokens
]


def make_traces(path: Path, model_path: str, *, num_problems: int = 3, texts: list[str] | None = None,
                question_prefix: str = "Compute.\n\nWhat is", name: str | None = None) -> Path:
    """The recorder's traces file (:func:`helpers.traces_file.write_traces`) for ``model_path``'s tokenizer.

    Problem ``i`` has one trace per text; trace ``j`` is labelled correct when ``(i + j)`` is
    even; the last text is marked ``finish_reason="length"``. The question holds a "\\n\\n",
    so every prompt has one that must not be counted.
    """
    from helpers.traces_file import write_traces

    texts = texts or RECORD_TEXTS
    problems = [(f"p{i:03d}", f"{question_prefix} {i} + 1?", str(i + 1), texts) for i in range(num_problems)]
    return write_traces(path, model_path, problems, model_name=name, config={"num_samples": len(texts), "test": True},
                        chat_template=True, correct=lambda i, j: (i + j) % 2 == 0, cut_last=True)


@pytest.fixture(scope="session")
def record_traces(tmp_path_factory, tiny_model_path) -> Path:
    """A small traces file for the tiny model (3 problems x 4 traces)."""
    return make_traces(tmp_path_factory.mktemp("record") / "traces.jsonl", tiny_model_path)


@pytest.fixture(scope="session")
def record_tokenizer(default_model_path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path)


@pytest.fixture
def record_model_identity() -> dict[str, Any]:
    return {"name": "synthetic", "config_hash": "c0ffee", "vocab_hash": "beef", "hidden_size": 8,
            "num_hidden_layers": 2, "model_type": "llama"}


@pytest.fixture(scope="session")
def record_detector(record_tokenizer) -> Any:
    """The default boundary rule over the default tokenizer (building the piece table takes ~1 s)."""
    from stepprobe.boundaries import BoundaryDetector, BoundaryRule

    return BoundaryDetector.from_tokenizer(BoundaryRule(), record_tokenizer)


@pytest.fixture(scope="session")
def record_make_traces():
    """The traces-file builder (``make_traces``) for tests that need their own."""
    return make_traces


# ---- collect_*: fixtures of the collect tests (test_collect.py; collect_tiny_llm is in tests/conftest.py) ----

@pytest.fixture(scope="session")
def collect_default_llm(default_model_path):
    """One vLLM engine on the embedded default model (the one end-to-end collect test)."""
    from stepprobe.engine import engine_kwargs, make_llm
    from stepprobe.options import EngineOptions

    llm = make_llm(default_model_path,
                   engine_kwargs(EngineOptions(max_model_len=512, dtype="float32", enforce_eager=True)))
    yield llm
    del llm
