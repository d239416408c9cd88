"""Two tensor-parallel ranks for real (vLLM's CPU build, one core per rank), issue 22 item 3
and defect 2.

Every rank installs the same capture hooks (so that a GPU's compiled graphs, and the
collectives in them, stay identical across ranks; see ``worker.install_hooks``) and only
rank 0 scores. Under TP=2 the live features are the recorder's (transformers) features, the
scores are the scorer's on them, and memory pruning takes the planted bad trace, as at TP=1.
"""

from __future__ import annotations

import pytest
from helpers.parity import assert_live_equals_recorder

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def tp2_runner(tiny_model_path, planted_scorer, helpers):
    import os

    from stepprobe.inference.plugin import PluginSettings
    from stepprobe.inference.runner import StepRunner

    # The CPU build binds one OpenMP thread group per rank; "auto" refuses two ranks on one NUMA node.
    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    settings = PluginSettings(scorer=planted_scorer, policy="none", keep_records=True, record_features=True,
                              max_accuracy_loss=None)
    try:
        runner = StepRunner(tiny_model_path, settings, seed=0, dtype="float32", max_model_len=256,
                            num_kv_blocks=helpers.NUM_KV_BLOCKS, enforce_eager=True, tensor_parallel_size=2)
    finally:
        if saved is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved
    yield runner
    runner.close()


def test_every_rank_hooks_the_same_sites_and_only_rank_0_scores(tp2_runner, helpers):
    infos = tp2_runner.llm.collective_rpc("stepprobe_info")
    assert len(infos) == 2
    assert [i["sites"] for i in infos] == [helpers.SITES, helpers.SITES]
    assert [i["scoring"] for i in infos] == [True, False]


def test_tp2_features_and_scores_equal_the_recorders(tp2_runner, tiny_model_path, planted_scorer, helpers):
    assert_live_equals_recorder(tp2_runner, tiny_model_path, planted_scorer, helpers.SITES, nl=helpers.NL,
                                nlnl=helpers.NLNL, label="tp2")


def test_tp2_memory_pruning_takes_the_planted_bad_trace(tp2_runner, helpers):
    from vllm import SamplingParams

    tok = tp2_runner.tokenizer
    bs = tp2_runner.llm.llm_engine.vllm_config.cache_config.block_size
    prompts = ["Good one.", "Good two.", "Good three.", "Bad one."]
    plen = max(len(tok(p)["input_ids"]) for p in prompts)
    max_tokens = bs + bs // 2
    per = helpers.blocks_for(plen + max_tokens, bs)
    assert 3 * per <= helpers.NUM_KV_BLOCKS < 4 * per
    group = {"stepprobe": {"policy": "memory", "group": "g"}}
    params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, logit_bias=helpers.good_bias(), extra_args=group)
              for _ in range(3)]
    params.append(SamplingParams(max_tokens=max_tokens, temperature=1.0, logit_bias=helpers.bad_bias(),
                                 extra_args=group))
    pre = tp2_runner.preemptions()
    outs = tp2_runner.llm.generate(prompts, params, use_tqdm=False)
    tp2_runner._take_records()
    assert tp2_runner.preemptions() == pre
    assert [o.outputs[0].stop_reason for o in outs] == [None, None, None, "pruned"]
