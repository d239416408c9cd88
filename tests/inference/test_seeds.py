"""Per-request seeds on vLLM's CPU build (stepprobe.inference.seeds)."""

from __future__ import annotations

import pytest
import torch
from helpers.engine_modes import in_process_engines

from stepprobe.inference.seeds import RewindableGenerator, trace_seed


def test_rewindable_generator_undoes_exactly_the_last_step():
    g = torch.Generator()
    g.manual_seed(123)
    r = RewindableGenerator.from_generator(g)
    first = torch.randint(0, 2**31, (3,), generator=r).tolist()
    assert first == torch.randint(0, 2**31, (3,), generator=g).tolist()  # same state as the original
    r.mark()
    drawn = torch.randint(0, 2**31, (2,), generator=r).tolist()
    r.set_offset(r.get_offset() - 4)  # what vLLM's runner does for a discarded token
    assert torch.randint(0, 2**31, (2,), generator=r).tolist() == drawn
    with pytest.raises(RuntimeError, match="only rewind"):
        r.set_offset(r.get_offset() - 8)


def test_trace_seed_depends_on_run_problem_and_index_only():
    assert trace_seed(0, "p1", 3) == trace_seed(0, "p1", 3)
    seeds = {trace_seed(s, p, i) for s in (0, 1) for p in ("p1", "p2") for i in range(8)}
    assert len(seeds) == 32
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.fixture(scope="module")
def seeded_runner(tiny_model_path):
    """The plugin worker without a scorer; a 64-token step budget so long prompts are prefilled
    in chunks (the rows vLLM rewinds), and 4 KV blocks so a full batch preempts."""
    from stepprobe.inference.plugin import PluginSettings
    from stepprobe.inference.runner import StepRunner

    with in_process_engines():
        runner = StepRunner(tiny_model_path, PluginSettings(policy="none"), seed=0, dtype="float32",
                            max_model_len=256, num_kv_blocks=4, enforce_eager=True, max_num_batched_tokens=64)
        try:
            yield runner
        finally:
            runner.close()


@pytest.mark.vllm
def test_seeded_traces_do_not_depend_on_the_batch(seeded_runner):
    long_prompt = "word " * 100  # > 64 tokens: partially prefilled for two steps
    others = [f"another prompt number {i} " * 6 for i in range(5)]
    seeds = [[trace_seed(0, "long", i) for i in range(3)]]
    kw = dict(n=3, max_tokens=48, temperature=1.0)
    alone = seeded_runner.generate([long_prompt], seeds=seeds, **kw)[0]
    pre = seeded_runner.preemptions()
    mixed = seeded_runner.generate(others + [long_prompt], seeds=[[trace_seed(1, f"o{k}", i) for i in range(3)]
                                                                  for k in range(5)] + seeds, **kw)[-1]
    assert seeded_runner.preemptions() > pre  # the batch really competed for the KV cache
    assert [t.token_ids for t in alone] == [t.token_ids for t in mixed]
    assert len({tuple(t.token_ids) for t in alone}) == 3  # each trace its own stream
    # Without seeds the same traces draw from the engine's shared generator.
    unseeded = seeded_runner.generate(others + [long_prompt], **kw)[-1]
    assert [t.token_ids for t in unseeded] != [t.token_ids for t in alone]
