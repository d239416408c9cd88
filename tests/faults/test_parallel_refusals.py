"""Issue 22 defect 1: data parallelism through the offline engine (``vllm.LLM`` refuses it
with a ``ValueError`` once the model is resolved) is refused in one line by ``run``, ``bench``
and ``collect`` before any engine starts, and nothing is written."""

from __future__ import annotations

import pytest

from .test_refusals import _call

DP = '{"data_parallel_size": 2}'
CASES = [
    ("run", lambda b: ["--policy", "none", "--model", b["tiny"], "--problems", "builtin:n=2", "--engine-args", DP,
                       "--output", str(b["dir"] / "dp-run")], "dp-run"),
    ("bench", lambda b: ["--policies", "none", "--model", b["tiny"], "--problems", "builtin:n=2", "--engine-args", DP,
                         "--output", str(b["dir"] / "dp-bench")], "dp-bench"),
    ("collect", lambda b: ["--model", b["tiny"], "--problems", "builtin:n=2", "--engine-args", DP,
                           "--output", str(b["dir"] / "dp-collect.jsonl")], "dp-collect.jsonl"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_data_parallel_refused_before_the_engine(case, bad, capfd):
    stage, argv, absent = case
    rc, err = _call([stage, *argv(bad)], capfd)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"stepprobe {stage}: error: ") and "data_parallel_size=2" in lines[0], lines[0]
    assert "one stepprobe process per replica" in lines[0]
    assert not (bad["dir"] / absent).exists(), f"a refused {stage} left {absent} behind"


def test_external_launcher_keeps_vllms_own_data_parallel_path():
    """Under torchrun (``external_launcher``) vLLM accepts ``data_parallel_size`` in ``vllm.LLM``;
    stepprobe's check follows vLLM's condition (a scorer is refused there by the plugin)."""
    from stepprobe.engine import check_engine_args

    check_engine_args({"data_parallel_size": 2, "distributed_executor_backend": "external_launcher"})
