"""A scorer converted from a STEP-paper checkpoint, served by stock vLLM with the plugin: the
worker segments with the paper's rule and scores with the paper's MLP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.engine_modes import in_process_engines
from torch import nn

pytestmark = pytest.mark.vllm

NL, NLNL = 198, 1116  # "\n" and "\n\n" in the default (SmolLM2) tokenizer


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_model_path):
    from stepprobe.probes.step_scorer import convert_step_scorer
    from stepprobe.step_paper import model_identity_for

    identity, tok = model_identity_for(tiny_model_path)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(identity["hidden_size"], 512), nn.ReLU(), nn.Linear(512, 1))
    folder = tmp_path_factory.mktemp("step")
    torch.save({"model_state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "epoch": 3},
               folder / "best_model.pt")
    out = convert_step_scorer(folder / "best_model.pt", folder / "scorer", model=identity, tokenizer=tok)
    return str(out), net


def test_converted_scorer_in_vllm(tiny_model_path, converted):
    from stepprobe.boundaries import BoundaryDetector, BoundaryRule, step_paper_rule
    from stepprobe.inference.plugin import PluginSettings
    from stepprobe.inference.runner import StepRunner, captured_boundaries

    scorer, net = converted
    settings = PluginSettings(scorer=scorer, policy="none", keep_records=True, record_features=True)
    with in_process_engines():
        runner = StepRunner(tiny_model_path, settings, seed=0, dtype="float32", max_model_len=256, enforce_eager=True)
        try:
            paper = BoundaryDetector.from_tokenizer(step_paper_rule(), runner.tokenizer)
            default = BoundaryDetector.from_tokenizer(BoundaryRule(), runner.tokenizer)
            prompt = "Count the steps:"
            results = runner.generate([prompt], n=3, max_tokens=48, temperature=1.0, policy="none",
                                      logit_bias={NL: 100.0, NLNL: 99.5})
            n_steps, differs = 0, False
            for t in results[0]:
                want = list(captured_boundaries(paper, t.token_ids))  # generated-token indices (docs/inference.md)
                assert t.step_positions == want
                differs |= want != list(captured_boundaries(default, t.token_ids))
                n_steps += len(want)
                x = torch.as_tensor(np.asarray(t.features, dtype=np.float32))[:, 0]  # [steps, hidden] at final_norm
                with torch.no_grad():
                    expected = torch.sigmoid(net(x)).squeeze(-1).numpy()
                assert np.allclose(t.step_scores, expected, atol=1e-6, rtol=0)
            assert n_steps >= 5, "forced blank lines should give boundaries"
            assert differs, "with '\\n' tokens in the mix the paper's rule and the default must disagree somewhere"
        finally:
            runner.close()
