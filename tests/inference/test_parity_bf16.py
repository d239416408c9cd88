"""Parity in the dtype users run: the default model in bfloat16 (what ``make pipeline``
collects, records and benches in), vLLM's captured features against the recorder's.

The fp32 parity test (test_engine.py) shows the capture is exact on the tiny model. Here the
question is numeric: does a probe trained on the recorder's bf16 features see the same
features, and give the same scores, inside a bf16 vLLM engine, through 30 layers and the final
norm? The scorer is a random linear probe over four sites, normalized with real feature
statistics so its scores spread over (0, 1) instead of saturating (a saturated score would
hide any difference). The engine is eager: compiling the default model costs minutes here,
and the compiled capture path is covered by the fp32 test.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.engine_modes import in_process_engines

pytestmark = pytest.mark.vllm

SITES = ["embed", "layer_14", "layer_29", "final_norm"]
SAMPLE = "Let's add 3 and 4.\n\nFirst, 3 + 4 = 7.\n\nSo the answer is \\boxed{7}.\n\nDone."


@pytest.fixture(scope="module")
def bf16_case(tmp_path_factory, default_model_path):
    """Generate with the plugin on the default model in bf16; return the traces and prompts."""
    from transformers import AutoConfig, AutoTokenizer

    from stepprobe.boundaries import BoundaryRule
    from stepprobe.data_collection.sources import load_problem_source
    from stepprobe.data_collection.prompts import build_prompt
    from stepprobe.data_collection.extractor import SiteExtractor
    from stepprobe.inference.plugin import PluginSettings
    from stepprobe.inference.runner import StepRunner
    from stepprobe.probes.checkpoint import linear_probe, save_scorer
    from stepprobe.provenance import model_identity

    tok = AutoTokenizer.from_pretrained(default_model_path)
    ext = SiteExtractor(default_model_path, dtype="float32", device="cpu")
    try:
        ids = tok(SAMPLE)["input_ids"]
        feats = ext.extract([ids], [list(range(len(ids)))])[0]
    finally:
        ext.close()
    mean = np.stack([feats[s].mean(0) for s in SITES])
    std = np.stack([feats[s].std(0) + 1e-3 for s in SITES])
    dim = len(SITES) * mean.shape[1]
    # Scale 2: the logits of a unit-scale random probe spread too little (score std 0.0465 on
    # some sampled traces, under the guard below).
    weight = 2.0 * np.random.default_rng(0).normal(size=dim).astype(np.float32) / np.sqrt(dim)
    scorer = tmp_path_factory.mktemp("scorers") / "random-bf16"
    save_scorer(scorer, linear_probe(SITES, weight=weight, combine="concat", mean=mean, std=std),
                model=model_identity(default_model_path, AutoConfig.from_pretrained(default_model_path), tok),
                boundary_rule=BoundaryRule().to_dict())
    with in_process_engines():
        runner = StepRunner(default_model_path, PluginSettings(scorer=str(scorer), policy="none", keep_records=True,
                                                               record_features=True),
                            seed=0, dtype="bfloat16", max_model_len=512, enforce_eager=True)
        try:
            prompts = [build_prompt(p, runner.tokenizer) for p in load_problem_source("builtin:n=4,seed=3")]
            results = runner.generate(prompts, n=3, max_tokens=128, temperature=0.7)
        finally:
            runner.close()
    return str(scorer), prompts, results, tok


@pytest.mark.parametrize("recorder_dtype", ["bfloat16", "float32"])
def test_bf16_engine_features_and_scores_match_the_recorder(bf16_case, default_model_path, recorder_dtype):
    import torch

    from stepprobe.data_collection.extractor import SiteExtractor
    from stepprobe.probes.checkpoint import load_scorer

    scorer_dir, prompts, results, tok = bf16_case
    scorer = load_scorer(scorer_dir)
    ext = SiteExtractor(default_model_path, dtype=recorder_dtype, device="cpu")
    cosines = {s: [] for s in SITES}
    diffs, scores = [], []
    try:
        for prompt, traces in zip(prompts, results):
            prompt_ids = tok(prompt)["input_ids"]
            for t in traces:
                if not t.step_positions:
                    continue
                ref = ext.extract([prompt_ids + t.token_ids], [[len(prompt_ids) + p for p in t.step_positions]])[0]
                got = np.asarray(t.features, dtype=np.float32)  # [steps, sites, hidden]
                for k, site in enumerate(SITES):
                    r = ref[site].astype(np.float32)
                    cosines[site] += list((got[:, k] * r).sum(1) / (np.linalg.norm(got[:, k], axis=1)
                                                                   * np.linalg.norm(r, axis=1)))
                ref_scores = scorer.score({s: torch.as_tensor(ref[s]) for s in SITES}).numpy()
                diffs += list(np.abs(ref_scores - np.asarray(t.step_scores)))
                scores += list(t.step_scores)
    finally:
        ext.close()
    print(f"bf16 engine vs {recorder_dtype} recorder, {len(diffs)} boundaries: min cosine "  # noqa: T201
          + ", ".join(f"{s} {min(c):.5f}" for s, c in cosines.items()) + f"; max |score diff| {max(diffs):.4f}")
    assert len(diffs) >= 10, "too few step boundaries to compare"
    # Not vacuous: the scores differ across boundaries, and by more than twice the largest
    # engine-recorder difference, so a wrong feature would show.
    assert np.std(scores) > 0.05, "scores saturated; the comparison would be vacuous"
    assert max(diffs) < 0.5 * np.std(scores), (max(diffs), np.std(scores))
    # Measured here (24 boundaries): cosine >= 0.9997 at every site; |score difference| <= 0.012
    # against the bf16 recorder, <= 0.0063 against fp32.
    for site, cos in cosines.items():
        assert min(cos) > 0.999, (site, min(cos))
    assert max(diffs) < 0.03, max(diffs)
