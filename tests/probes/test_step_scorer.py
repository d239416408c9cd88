"""Converting the STEP paper's scorer checkpoints: exact scores, safe loading, model checks."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from stepprobe.cli import main as cli_main
from stepprobe.errors import ArtifactMismatch
from stepprobe.probes.checkpoint import load_scorer
from stepprobe.probes.step_scorer import Config, STEP_KEYS, check_step_state_dict, convert_step_scorer, run
from stepprobe.step_paper import model_identity_for


class MLPClassifier(nn.Module):
    """The paper's scorer, written from its description: Linear(D, 512) -> ReLU -> Linear(512, 1)."""

    def __init__(self, d: int, width: int = 512):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, width), nn.ReLU(), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Planted:
    """Unpickling this creates ``marker`` (``open(marker, 'w')`` or a shell ``touch``)."""

    def __init__(self, marker: str, how: str):
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "open":
            return (open, (self.marker, "w"))
        return (os.system, (f"touch {self.marker}",))


def _paper_checkpoint(d: int, seed: int = 0) -> tuple[MLPClassifier, dict]:
    torch.manual_seed(seed)
    clf = MLPClassifier(d)
    with torch.no_grad():  # larger than init so that scores spread over (0, 1)
        for p in clf.parameters():
            p.mul_(4.0)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    clf(torch.randn(4, d)).sum().backward()
    opt.step()
    ckpt = {"epoch": 7, "model_state_dict": clf.state_dict(), "optimizer_state_dict": opt.state_dict(),
            "val_auc": np.float64(0.71), "metrics": {"val_acc": 0.66, "val_loss": torch.tensor(0.58)},
            "loss_curve": [0.9, 0.7, 0.6], "config": {"lr": 1e-3, "hidden_dim": 512}}
    return clf, ckpt


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    identity, tok = model_identity_for(tiny_model_path)
    return tiny_model_path, identity, tok


def _features(d: int, n: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, d, generator=g) * 2.0 + 0.5


def test_dict_checkpoint_converts_and_scores_like_the_paper(tmp_path, tiny):
    model_path, identity, tok = tiny
    d = identity["hidden_size"]
    clf, ckpt = _paper_checkpoint(d)
    torch.save(ckpt, tmp_path / "best_model.pt")
    out = run(Config(checkpoint=str(tmp_path / "best_model.pt"), model=model_path, out=str(tmp_path / "scorer")))
    scorer = load_scorer(out, expected_model=identity)
    x = _features(d)
    with torch.no_grad():
        paper = torch.sigmoid(clf(x)).squeeze(-1)
    ours = scorer.score({"final_norm": x})
    assert ours.shape == paper.shape == (64,)
    assert torch.allclose(ours, paper, atol=1e-6, rtol=0)
    assert float(((paper > 0.02) & (paper < 0.98)).float().mean()) > 0.5  # scores spread: the check can fail
    assert scorer.architecture == "mlp" and scorer.sites == ["final_norm"] and scorer.hidden_size == d
    assert scorer.module.params == {"width": 512}
    assert torch.equal(scorer.module.norm.mean, torch.zeros(1, d))
    assert torch.equal(scorer.module.norm.std, torch.ones(1, d))
    rule = scorer.boundary_rule
    assert rule["mode"] == "token-contains" and rule["delimiter"] == "\n\n" and rule["end_text"] == "</think>"
    assert rule["name"] == "step-paper" and rule["scope"] == "prompt+response" and rule["token_ids"]
    assert scorer.model == identity
    assert scorer.metrics["step_checkpoint.val_auc"] == pytest.approx(0.71)
    assert scorer.metrics["step_checkpoint.metrics.val_loss"] == pytest.approx(0.58)
    assert scorer.config["checkpoint_form"] == "dict" and "optimizer_state_dict" in scorer.config["checkpoint_other_keys"]
    assert scorer.meta["provenance"]["source_sha256"]


def test_bare_state_dict_converts(tmp_path, tiny):
    _, identity, tok = tiny
    d = identity["hidden_size"]
    clf, _ = _paper_checkpoint(d, seed=1)
    torch.save(clf.state_dict(), tmp_path / "bare.pt")
    out = convert_step_scorer(tmp_path / "bare.pt", tmp_path / "s", model=identity, tokenizer=tok)
    scorer = load_scorer(out, expected_model=identity)
    x = _features(d)
    with torch.no_grad():
        paper = torch.sigmoid(clf(x)).squeeze(-1)
    assert torch.allclose(scorer.score({"final_norm": x}), paper, atol=1e-6, rtol=0)
    assert scorer.config["checkpoint_form"] == "bare"


@pytest.mark.parametrize("how,named", [("open", "io.open"), ("system", ".system")])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_hostile_checkpoint_is_refused_and_never_runs(tmp_path, tiny, capsys, how, named, legacy):
    model_path, identity, _ = tiny
    clf, ckpt = _paper_checkpoint(identity["hidden_size"])
    marker = tmp_path / "PWNED"
    ckpt["extra"] = _Planted(str(marker), how)
    torch.save(ckpt, tmp_path / "hostile.pt", _use_new_zipfile_serialization=not legacy)
    assert not marker.exists()
    rc = cli_main(["import-step-scorer", "--checkpoint", str(tmp_path / "hostile.pt"), "--model", model_path,
                   "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "needs full unpickling" in err[0] and named in err[0]
    assert not marker.exists()
    assert not (tmp_path / "s").exists()


def test_scorer_refused_for_a_model_of_another_hidden_size(tmp_path, tiny, tiny_model_path, default_model_path):
    from stepprobe.inference.runner import check_scorer_for_model
    from stepprobe.models import build_random_model

    model_path, identity, tok = tiny
    clf, ckpt = _paper_checkpoint(identity["hidden_size"])
    torch.save(ckpt, tmp_path / "best.pt")
    out = convert_step_scorer(tmp_path / "best.pt", tmp_path / "s", model=identity, tokenizer=tok)
    other = build_random_model(tmp_path / "wide", tokenizer_from=default_model_path, hidden_size=96, num_heads=3)
    with pytest.raises(ArtifactMismatch, match="reads hidden size 64, but model .* has hidden size 96"):
        check_scorer_for_model(str(out), str(other))
    # Converting for the wrong model is refused too, in one line, before anything is written.
    other_identity, _ = model_identity_for(str(other))
    with pytest.raises(ArtifactMismatch, match=r"reads hidden size 64 \(net.0.weight is \[512, 64\]\), but model"):
        convert_step_scorer(tmp_path / "best.pt", tmp_path / "s2", model=other_identity)
    assert not (tmp_path / "s2").exists()


def _sd(d: int = 8, width: int = 512) -> dict[str, torch.Tensor]:
    return MLPClassifier(d, width).state_dict()


@pytest.mark.parametrize("mutate,message", [
    (lambda sd: sd.pop("net.2.bias"), r"missing \['net.2.bias'\]"),
    (lambda sd: sd.__setitem__("net.4.weight", torch.zeros(1)), r"unexpected \['net.4.weight'\]"),
    (lambda sd: sd.__setitem__("net.2.weight", torch.zeros(2, 512)), r"net.2.weight has shape \[2, 512\], expected \[1, 512\]"),
    (lambda sd: sd.__setitem__("net.0.bias", torch.zeros(511)), r"net.0.bias has shape \[511\], expected \[512\]"),
    (lambda sd: sd["net.0.weight"].__setitem__((3, 2), float("nan")), "net.0.weight holds NaN or inf"),
    (lambda sd: sd.__setitem__("net.2.bias", torch.zeros(1, dtype=torch.long)), "expected a float tensor"),
])
def test_malformed_state_dict_refused_in_one_line(tmp_path, mutate, message, capsys, tiny_model_path):
    sd = _sd()
    mutate(sd)
    with pytest.raises(ArtifactMismatch, match=message):
        check_step_state_dict(sd, "x.pt")
    torch.save({"model_state_dict": sd}, tmp_path / "bad.pt")
    rc = cli_main(["import-step-scorer", "--checkpoint", str(tmp_path / "bad.pt"), "--model", tiny_model_path,
                   "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("stepprobe import-step-scorer: error:")
    assert not (tmp_path / "s").exists()


def test_not_a_checkpoint_and_other_layouts_refused(tmp_path):
    from stepprobe.probes.step_scorer import read_step_checkpoint

    # Fixed junk (a stray pickle BUILD opcode first once raised a bare IndexError), then seeded noise.
    rng = random.Random(0)
    for junk in [b"b" + bytes(63), b"\x80\x02b", b"", *(rng.randbytes(64) for _ in range(200))]:
        (tmp_path / "junk.pt").write_bytes(junk)
        with pytest.raises(ArtifactMismatch, match="not a readable torch.save file"):
            read_step_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": [1, 2], "epoch": 3}, tmp_path / "other.pt")
    with pytest.raises(ArtifactMismatch, match="neither model_state_dict nor a bare state dict"):
        read_step_checkpoint(tmp_path / "other.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ArtifactMismatch, match="holds a list"):
        read_step_checkpoint(tmp_path / "list.pt")
    # DataParallel prefixes are stripped; keys stay checked.
    sd = {f"module.{k}": v for k, v in _sd().items()}
    assert check_step_state_dict(sd, "dp.pt") == (8, 512)
    assert set(STEP_KEYS) == set(_sd())


def test_converted_scorer_gives_run_the_papers_prompt(tmp_path, tiny, caplog):
    """run/bench fill unset prompt fields from the scorer: a converted one gives the paper's."""
    from stepprobe.inference import run as run_stage
    from stepprobe.options import BUILTIN_SAMPLING, with_scorer_generation
    from stepprobe.step_paper import STEP_PROMPT, STEP_SYSTEM_PROMPT

    model_path, identity, tok = tiny
    clf, ckpt = _paper_checkpoint(identity["hidden_size"])
    torch.save(ckpt, tmp_path / "best.pt")
    out = convert_step_scorer(tmp_path / "best.pt", tmp_path / "s", model=identity, tokenizer=tok)
    assert load_scorer(out).generation == {"prompt": STEP_PROMPT}
    cfg = with_scorer_generation(run_stage.Config(scorer=str(out), model=model_path))
    assert cfg.system_prompt == STEP_SYSTEM_PROMPT and cfg.answer_instruction == "" and cfg.use_chat_template
    # The checkpoint says nothing about sampling: run's own defaults, not a made-up record.
    assert (cfg.temperature, cfg.top_p, cfg.top_k) == tuple(BUILTIN_SAMPLING[k] for k in ("temperature", "top_p", "top_k"))
    # The preset names the same prompt: no warning; another system prompt is warned about.
    caplog.clear()
    with_scorer_generation(run_stage.Config(scorer=str(out), model=model_path, prompt_preset="step-paper"))
    assert "trained on prompts" not in caplog.text
    with_scorer_generation(run_stage.Config(scorer=str(out), model=model_path, system_prompt="Think hard."))
    assert "but the scorer was trained on prompts with system_prompt=" in caplog.text
