"""The live-equals-recorder check the engine tests share: a runner generates two traces on
newline-forced sampling, and at every captured boundary the worker's features equal
``SiteExtractor``'s (transformers) and the scorer's live scores equal the scores of the
recorder's features."""

from __future__ import annotations

import numpy as np


def assert_live_equals_recorder(runner, model: str, scorer_path: str, sites: list[str], *, nl: int, nlnl: int,
                                rel_max: float | None = None, detector=None, label: str = "") -> int:
    """Fp32: cosine > 0.9999 per site, ``rel_max`` (if given) bounds the relative difference
    (the scale too), scores within 1e-4; ``detector`` (if given): the captured step positions
    are the rule's boundaries. Returns the number of boundaries checked (> 0)."""
    import torch

    from stepprobe.data_collection.extractor import SiteExtractor
    from stepprobe.inference.runner import captured_boundaries
    from stepprobe.probes.checkpoint import load_scorer

    prompt = "Parity check:"
    results = runner.generate([prompt], n=2, max_tokens=40, temperature=1.0, policy="none",
                              logit_bias={nl: 100.0, nlnl: 100.0})
    prompt_ids = runner.tokenizer(prompt)["input_ids"]
    scorer = load_scorer(scorer_path)
    extractor = SiteExtractor(model, dtype="float32", device="cpu")
    checked = 0
    try:
        for t in results[0]:
            assert t.features, ("record_features should return the captured features", label)
            if detector is not None:
                assert list(t.step_positions) == captured_boundaries(detector, t.token_ids), label
            got = np.asarray(t.features, dtype=np.float32)  # [steps, sites, hidden]
            feats = extractor.extract([prompt_ids + list(t.token_ids)],
                                      [[len(prompt_ids) + p for p in t.step_positions]])[0]
            for k, site in enumerate(sites):
                ref = feats[site]
                cos = (got[:, k] * ref).sum(1) / (np.linalg.norm(got[:, k], axis=1) * np.linalg.norm(ref, axis=1))
                assert cos.min() > 0.9999, (label, site, cos.min())
                if rel_max is not None:
                    rel = np.linalg.norm(got[:, k] - ref, axis=1) / np.linalg.norm(ref, axis=1)
                    assert rel.max() < rel_max, (label, site, rel.max())
            ref_scores = scorer.score({s: torch.as_tensor(feats[s]) for s in sites}).numpy()
            assert np.abs(ref_scores - np.asarray(t.step_scores)).max() < 1e-4, label
            checked += len(t.step_positions)
    finally:
        extractor.close()
    assert checked > 0, label
    return checked
