"""The architecture matrix (issue 22 item 1): tiny random-weight models of several families,
each run in vLLM's CPU build with the plugin.

For every architecture: the live capture (vLLM) and the recorder (``SiteExtractor``,
transformers) give the same features at ``embed``, a middle layer, the last layer and
``final_norm`` at the same step boundaries (fp32: cosine > 0.9999); a logistic probe fit on
the recorder's features scores the same live (< 1e-4); and memory pruning takes the trace
pushed onto the low-scoring delimiter token. One eager engine per architecture, started one
after another (module-scoped, parametrised) and closed before the next, each in the test
process (``helpers.engine_modes.in_process_engines``: the worker's code is the same, start-up is half).

The models are 4 layers, hidden 64, head_dim 32 (vLLM's CPU attention rejects 16), built by
``stepprobe.models.build_random_model`` with norm weights and biases perturbed, so that
Gemma's ``1 + weight`` norms, Qwen2's biases and Qwen3's q/k norms are exercised. The Gemma 3
model alternates sliding-window (32 tokens) and full-attention layers, and the parity traces
are longer than the window. What each site reads per architecture: ``stepprobe.layers``.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from helpers.parity import assert_live_equals_recorder
from helpers.engine_modes import in_process_engines

pytestmark = pytest.mark.vllm

NUM_LAYERS = 4
SITES = ["embed", "layer_01", "layer_03", "final_norm"]  # embed, a middle layer, the last layer, final_norm
ARCHITECTURES = ["llama", "qwen2", "qwen3", "phi3", "qwen3_moe", "gemma3_text"]
TRAIN_PROMPTS = ["Solve the problem.", "Think step by step:", "Question: what is two plus two?", "Let us see.",
                 "First, read the question.", "Answer carefully.", "Here is a plan:", "Start."]


def _fit_probe(extractor, tok, detector, nl: int, nlnl: int, seed: int = 0):
    """A logistic probe over SITES fit on the recorder's features at the boundaries of
    sequences that continue a prompt with "\\n" / "\\n\\n" tokens (runs of one, and mixes):
    label 1 at a boundary completed by "\\n", 0 by "\\n\\n"."""
    import torch

    from stepprobe.probes.checkpoint import linear_probe

    rng = np.random.default_rng(seed)
    seqs, positions, labels = [], [], []
    for i, prompt in enumerate(TRAIN_PROMPTS):
        ids = tok(prompt)["input_ids"]
        kind = i % 3
        gen = ([nl] * 40 if kind == 0 else [nlnl] * 40 if kind == 1 else
               [int(t) for t in rng.choice([nl, nlnl], size=40)])
        found = detector.find(gen)
        seqs.append(ids + gen)
        positions.append([len(ids) + p for p in found])
        labels.extend(1.0 if gen[p] == nl else 0.0 for p in found)
    feats = extractor.extract(seqs, positions)
    x = np.concatenate([np.stack([f[s] for s in SITES], axis=1) for f in feats])  # [n, sites, hidden]
    y = np.asarray(labels, dtype=np.float32)
    assert 0 < y.mean() < 1
    mean = x.mean(0)
    std = np.maximum(x.std(0), 1e-3)
    z = torch.as_tensor(((x - mean) / std).reshape(len(x), -1), dtype=torch.float32)
    t = torch.as_tensor(y)
    w = torch.zeros(z.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, t) + 1e-2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return linear_probe(SITES, weight=w.detach().numpy(), bias=float(b), combine="concat", mean=mean, std=std)


def kv_groups(model: str) -> int:
    """vLLM's KV cache groups: one per attention type (Gemma 3: full and sliding-window layers,
    "kv cache group sizes (128, 128)"). Every group takes its own blocks from the one pool, so a
    trace needs blocks in each: the memory test scales the pool by this."""
    from transformers import AutoConfig

    return len(set(getattr(AutoConfig.from_pretrained(model), "layer_types", None) or ["full_attention"]))


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch_case(request, tmp_path_factory, default_model_path, helpers):
    """(architecture, model path, scorer path, runner, seconds to build/fit/start) for one architecture."""
    from transformers import AutoTokenizer

    from stepprobe.boundaries import BoundaryDetector, BoundaryRule
    from stepprobe.data_collection.extractor import SiteExtractor
    from stepprobe.inference.plugin import PluginSettings
    from stepprobe.inference.runner import StepRunner
    from stepprobe.models import build_random_model
    from stepprobe.probes.checkpoint import save_scorer

    arch = request.param
    t0 = time.perf_counter()
    model = str(build_random_model(tmp_path_factory.mktemp("arch-models") / arch, arch=arch,
                                   tokenizer_from=default_model_path, num_layers=NUM_LAYERS, perturb=0.1))
    tok = AutoTokenizer.from_pretrained(model)
    rule = BoundaryRule()
    extractor = SiteExtractor(model, dtype="float32", device="cpu")
    try:
        probe = _fit_probe(extractor, tok, BoundaryDetector.from_tokenizer(rule, tok), helpers.NL, helpers.NLNL)
    finally:
        extractor.close()
    scorer = tmp_path_factory.mktemp("arch-scorers") / arch
    save_scorer(scorer, probe, model=helpers.tiny_identity(model), boundary_rule=rule.to_dict())
    settings = PluginSettings(scorer=str(scorer), policy="none", keep_records=True, record_features=True,
                              max_accuracy_loss=None)
    groups = kv_groups(model)
    with in_process_engines():  # the worker computes the same in the test process, in half the start-up
        runner = StepRunner(model, settings, seed=0, dtype="float32", max_model_len=256,
                            num_kv_blocks=helpers.NUM_KV_BLOCKS * groups, enforce_eager=True)
        print(f"\n[{arch}] model, probe and engine ready in {time.perf_counter() - t0:.1f} s")
        try:
            yield arch, model, str(scorer), runner, groups
        finally:
            runner.close()


def test_live_features_and_scores_equal_the_recorders(arch_case, helpers):
    """Same boundaries, same features at every site (cosine > 0.9999 in fp32, and the scale:
    Gemma's embedding scale), same scores."""
    arch, model, scorer_path, runner, _ = arch_case
    assert_live_equals_recorder(runner, model, scorer_path, SITES, nl=helpers.NL, nlnl=helpers.NLNL, rel_max=1e-3,
                                detector=runner._detector, label=arch)


def test_memory_pruning_takes_the_low_trace(arch_case, helpers):
    """Under KV pressure the trace pushed onto "\\n\\n" (scored low by the probe) is pruned."""
    from vllm import SamplingParams

    arch, _, _, runner, groups = arch_case
    tok = runner.tokenizer
    bs = runner.llm.llm_engine.vllm_config.cache_config.block_size
    prompts = ["Good one.", "Good two.", "Good three.", "Bad one."]
    plen = max(len(tok(p)["input_ids"]) for p in prompts)
    max_tokens = bs + bs // 2  # every trace needs a second block on the way
    # in every group: a sliding window (32) straddles the block edge from token 128 to 160
    per = groups * helpers.blocks_for(plen + max_tokens, bs)
    blocks = helpers.NUM_KV_BLOCKS * groups
    assert 4 * groups <= blocks and 3 * per <= blocks < 4 * per, "test sizing: four traces must not fit, three must"
    group = {"stepprobe": {"policy": "memory", "group": "g"}}
    params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, logit_bias=helpers.good_bias(), extra_args=group)
              for _ in range(3)]
    params.append(SamplingParams(max_tokens=max_tokens, temperature=1.0, logit_bias=helpers.bad_bias(),
                                 extra_args=group))
    pre = runner.preemptions()
    outs = runner.llm.generate(prompts, params, use_tqdm=False)
    runner._take_records()
    assert runner.preemptions() == pre, arch
    assert [o.outputs[0].stop_reason for o in outs] == [None, None, None, "pruned"], arch
    bad = outs[3].outputs[0]
    assert 0 < len(bad.token_ids) < max_tokens and bad.finish_reason == "stop"
