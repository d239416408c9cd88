"""Converting the STEP paper's hidden-state dumps into the HDF5 file: exact features and labels,
the reader's validation, safe loading, and training on the result."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from stepprobe.boundaries import MODE_TOKEN_CONTAINS, BoundaryDetector, BoundaryRule
from stepprobe.cli import main as cli_main
from stepprobe.data_collection import hdf5
from stepprobe.data_collection.problems import Problem
from stepprobe.data_collection.prompts import build_prompt
from stepprobe.data_collection.step_dump import Config, find_dumps, run
from stepprobe.errors import ArtifactMismatch, StepprobeError
from stepprobe.step_paper import STEP_PROMPT, model_identity_for

PARAGRAPHS = ["Let me think about this.", "First, add the two numbers.", "Then check the result again.",
              "Hmm, that looks right.", "So the sum is what we want.", "Double-check: yes."]


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    identity, tok = model_identity_for(tiny_model_path)
    return tiny_model_path, identity, tok


def make_entries(tok, hidden: int, *, n_questions: int = 16, per_q: int = 4, signal: float = 1.5, seed: int = 0):
    """Entries as the paper's data_hidden_state.py writes them, boundaries by the paper's rule over
    prompt + reasoning; features carry a label signal along one direction. Interleaved: the samples
    of one question are not next to each other."""
    det = BoundaryDetector.from_tokenizer(BoundaryRule("\n\n", MODE_TOKEN_CONTAINS), tok)
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=hidden)
    direction /= np.linalg.norm(direction)
    out = []
    for s in range(per_q):
        for q in range(n_questions):
            question = f"Problem {q}: what is {q} + {q + 1}?" + ("\n\nShow your work." if q % 2 == 0 else "")
            prompt = build_prompt(Problem("x", question, str(2 * q + 1)), tok, **STEP_PROMPT)
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            k = int(rng.integers(2, len(PARAGRAPHS) + 1))
            reasoning = "\n\n".join(PARAGRAPHS[:k]) + "\n\n"
            ids = p_ids + tok(reasoning, add_special_tokens=False)["input_ids"]
            pos = det.find(ids)
            label = bool(rng.random() < 0.5)
            x = rng.normal(size=(len(pos), hidden)) * 2.0 + signal * (2 * label - 1) * direction
            out.append({"select_hidden_states": torch.tensor(x, dtype=torch.float16),
                        "full_input_ids": torch.tensor(ids), "full_forward_text": prompt + reasoning,
                        "original_response": reasoning + "</think>\nThe answer is \\boxed{%d}." % (2 * q + 1),
                        "question": question, "ground_truth": str(2 * q + 1), "is_correct": label,
                        "_prompt_steps": len(det.find(p_ids))})
    return out


def write_dumps(entries, folder, cut: int, prefix: str = "qwen3") -> list:
    folder.mkdir(parents=True, exist_ok=True)
    clean = [{k: v for k, v in e.items() if not k.startswith("_")} for e in entries]
    a, b = folder / f"{prefix}_hiddenstates_0_{cut}.pt", folder / f"{prefix}_hiddenstates_{cut}_{len(entries)}.pt"
    torch.save(clean[cut:], b)  # written first: order comes from the names, not the disk
    torch.save(clean[:cut], a)
    return [a, b]


def _check_exact(h5, entries):
    hs = hdf5.HiddenStates(h5)
    by_q: dict[str, list] = {}
    for e in entries:
        by_q.setdefault(e["question"], []).append(e)
    assert hs.num_traces == len(entries) and hs.num_problems == len(by_q)
    assert hs.num_steps == sum(int(e["select_hidden_states"].shape[0]) for e in entries)
    for t in range(hs.num_traces):
        q = hs.problems["question"][hs.traces["problem"][t]]
        e = by_q[q][int(hs.traces["sample_index"][t])]
        rows = hs.trace_rows(t)
        want = e["select_hidden_states"].float().numpy()
        assert np.array_equal(hs.features("final_norm", rows), want)
        assert hs.traces["label"][t] == int(e["is_correct"])
        assert (hs.steps["label"][rows] == int(e["is_correct"])).all()
        pos = hs.steps["position"][rows]
        assert int((pos < 0).sum()) == e["_prompt_steps"] and (np.diff(pos) > 0).all()
    return hs


def test_dump_converts_exactly_and_validates(tmp_path, tiny):
    model_path, identity, tok = tiny
    entries = make_entries(tok, identity["hidden_size"])
    files = write_dumps(entries, tmp_path / "dumps", cut=37)
    assert find_dumps([str(tmp_path / "dumps")]) == [f.resolve() for f in files]
    out = run(Config(dumps=[str(tmp_path / "dumps" / "*_hiddenstates_*.pt")], model=model_path,
                     output=str(tmp_path / "hs.h5")))
    hs = _check_exact(out, entries)
    hs.validate(expected_model=identity)
    assert hs.sites == ["final_norm"] and hs.storage_dtype == "float16" and hs.complete
    assert hs.header["layout"] == "single" and hs.header["extra"]["positions"] == "response-relative"
    rule = hs.boundary_rule
    assert rule["mode"] == "token-contains" and rule["name"] == "step-paper" and rule["scope"] == "prompt+response"
    assert hs.model == identity
    q0 = entries[0]["question"]
    assert list(hs.problems["gold"][list(hs.problems["question"]).index(q0):][:1]) == [entries[0]["ground_truth"]]
    assert any(pid.startswith("step-") for pid in hs.problems["problem_id"])
    hs.close()
    # Same command again: resumes a finished file, writes nothing twice.
    again = run(Config(dumps=[str(tmp_path / "dumps")], model=model_path, output=str(tmp_path / "hs.h5")))
    _check_exact(again, entries)


def test_prompt_steps_drop(tmp_path, tiny):
    model_path, identity, tok = tiny
    entries = make_entries(tok, identity["hidden_size"], n_questions=4, per_q=2)
    write_dumps(entries, tmp_path / "d", cut=3)
    out = run(Config(dumps=[str(tmp_path / "d")], model=model_path, output=str(tmp_path / "hs.h5"),
                     prompt_steps="drop"))
    hs = hdf5.HiddenStates(out)
    hs.validate()
    total = sum(int(e["select_hidden_states"].shape[0]) for e in entries)
    assert hs.num_steps == total - sum(e["_prompt_steps"] for e in entries) > 0
    assert (hs.steps["position"] >= 0).all() and hs.boundary_rule["scope"] == "response"


def test_hostile_dump_refused_and_never_runs(tmp_path, tiny, capsys):
    model_path, identity, tok = tiny
    entries = make_entries(tok, identity["hidden_size"], n_questions=2, per_q=1)
    marker = tmp_path / "PWNED"

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    clean = [{k: v for k, v in e.items() if not k.startswith("_")} for e in entries]
    clean[1]["question"] = Planted()
    torch.save(clean, tmp_path / "x_hiddenstates_0_2.pt")
    rc = cli_main(["import-step-dump", "--dumps", str(tmp_path / "x_hiddenstates_0_2.pt"), "--model", model_path,
                   "--output", str(tmp_path / "hs.h5")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "needs full unpickling" in err[0] and "system" in err[0]
    assert not marker.exists() and not (tmp_path / "hs.h5").exists()


def test_malformed_dumps_refused(tmp_path, tiny, default_model_path):
    from stepprobe.models import build_random_model

    model_path, identity, tok = tiny
    entries = make_entries(tok, identity["hidden_size"], n_questions=2, per_q=1)
    clean = [{k: v for k, v in e.items() if not k.startswith("_")} for e in entries]

    def attempt(name, data, message, model=model_path):
        torch.save(data, tmp_path / name)
        with pytest.raises(StepprobeError, match=message):
            run(Config(dumps=[str(tmp_path / name)], model=model, output=str(tmp_path / f"{name}.h5")))
        assert not (tmp_path / f"{name}.h5").exists()

    attempt("a_hiddenstates_0_1.pt", [{"question": "q", "is_correct": True}], r"lacks select_hidden_states")
    attempt("b_hiddenstates_0_1.pt", {"x": torch.zeros(3)}, r"list of dicts; this file holds a dict")
    bad = dict(clean[0], select_hidden_states=clean[0]["select_hidden_states"].clone())
    bad["select_hidden_states"][0, 0] = float("nan")
    attempt("c_hiddenstates_0_1.pt", [bad], r"holds NaN or inf")
    attempt("d_hiddenstates_0_1.pt", [dict(clean[0], is_correct="maybe")], r"is_correct is 'maybe'")
    wide = build_random_model(tmp_path / "wide", tokenizer_from=default_model_path, hidden_size=96, num_heads=3)
    attempt("e_hiddenstates_0_1.pt", clean, r"D=64, but the model has hidden size 96", model=str(wide))
    (tmp_path / "o").mkdir()
    torch.save(clean, tmp_path / "o" / "p_hiddenstates_0_2.pt")
    torch.save(clean, tmp_path / "o" / "p_hiddenstates_1_3.pt")
    with pytest.raises(StepprobeError, match="overlapping index ranges"):
        find_dumps([str(tmp_path / "o")])


def test_sweep_tune_export_train_run_on_converted_dumps(tmp_path, tiny):
    from stepprobe.probes.checkpoint import load_scorer

    model_path, identity, tok = tiny
    entries = make_entries(tok, identity["hidden_size"], n_questions=40, per_q=4, signal=2.0)
    write_dumps(entries, tmp_path / "d", cut=70)
    h5 = tmp_path / "hs.h5"
    assert cli_main(["import-step-dump", "--dumps", str(tmp_path / "d"), "--model", model_path,
                     "--output", str(h5)]) == 0
    # The file has one site; the default `--sites all` names what is missing, in one line.
    assert cli_main(["sweep", "--data", str(h5), "--out", str(tmp_path / "sw0"), "--no-progress"]) == 2
    assert cli_main(["sweep", "--data", str(h5), "--out", str(tmp_path / "sw"), "--sites", "final_norm",
                     "--bootstrap", "50", "--max-epochs", "4", "--no-progress"]) == 0
    doc = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [r["site"] for r in doc["rows"]] == ["final_norm"] and doc["complete"]
    assert cli_main(["tune", "--data", str(h5), "--out", str(tmp_path / "study"), "--sites", "final_norm",
                     "--archs", "linear,mlp", "--n-trials", "2", "--max-epochs", "3", "--patience", "2",
                     "--no-progress", "--no-plots"]) == 0
    assert cli_main(["export", "--source", str(tmp_path / "study"), "--out", str(tmp_path / "exported")]) == 0
    exported = load_scorer(tmp_path / "exported", expected_model=identity)
    assert exported.sites == ["final_norm"]
    assert cli_main(["train", "--data", str(h5), "--out", str(tmp_path / "run"), "--sites", "final_norm",
                     "--arch", "mlp", "--max-epochs", "8", "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["metrics"]["test"]["auroc"] > 0.8, metrics["metrics"]["test"]
    scorer = load_scorer(tmp_path / "run" / "scorer", expected_model=identity)
    # Scorers trained on converted dumps segment like the paper at run time.
    for sc in (scorer, exported):
        assert sc.boundary_rule["mode"] == "token-contains" and sc.boundary_rule["end_text"] == "</think>"
        # ... and record the paper's prompt (the dumps do not know the sampling settings)
        assert sc.generation == {"prompt": STEP_PROMPT, "sampling": {}}


def test_prompt_preset_step_paper():
    from stepprobe.data_collection import collect
    from stepprobe.step_paper import STEP_SYSTEM_PROMPT

    cfg = collect.Config(prompt_preset="step-paper")
    assert (cfg.system_prompt, cfg.answer_instruction, cfg.use_chat_template) == (STEP_SYSTEM_PROMPT, "", True)
    # A field given explicitly wins over the preset; the rest come from it.
    cfg = collect.Config(prompt_preset="step-paper", system_prompt="")
    assert cfg.system_prompt == "" and cfg.answer_instruction == ""
    with pytest.raises(StepprobeError, match="unknown prompt preset 'paper'; known: step-paper"):
        collect.Config(prompt_preset="paper")
    # The text: the paper's system turn, the question alone as the user turn.
    from transformers import AutoTokenizer

    from stepprobe.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(None))
    text = build_prompt(Problem("p", "What is 2 + 3?", "5"), tok, **STEP_PROMPT)
    assert text == tok.apply_chat_template([{"role": "system", "content": STEP_SYSTEM_PROMPT},
                                            {"role": "user", "content": "What is 2 + 3?"}],
                                           tokenize=False, add_generation_prompt=True)
