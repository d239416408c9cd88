"""The STEP paper's benchmark shapes (issue 22 item 4), on fixtures written here in those shapes:
AIME/HMMT-style ``{question, answer}`` JSONL with whitespace around questions and LaTeX answers,
GPQA-style questions that list their options, the paper's prompt reproduced verbatim, its
tokenization of responses (the text before ``</think>`` alone) and its dumps."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from stepprobe.boundaries import BoundaryDetector, step_paper_rule
from stepprobe.data_collection import hdf5
from stepprobe.data_collection.grading import extract_answer, is_correct
from stepprobe.data_collection.problems import Problem, load_problems, options_in_question
from stepprobe.data_collection.sources import load_problem_source
from stepprobe.data_collection.prompts import build_prompt, user_message
from stepprobe.step_paper import STEP_PROMPT, STEP_SYSTEM_PROMPT, model_identity_for

# AIME/HMMT-style lines: the question as the paper's files hold it (a leading newline, a
# trailing space or blank line), answers as written.
AIME = [
    {"question": "\nLet $S$ be the set of positive integers $n$ such that ... Find $|S|$.", "answer": "16"},
    {"question": "Compute $\\sqrt{4^{2012}+1}$ written in simplest form. \n\n", "answer": "\\sqrt{4^{2012}+1}"},
    {"question": "  Find the remainder when $2^{100}$ is divided by $7$.", "answer": " 2 "},
]
# GPQA-style: letter answers, the options written into the question.
GPQA = [
    {"question": "Which organism is a nematode?\nC. elegans and E. coli differ in many ways.\n"
                 "A. Drosophila\nB. Saccharomyces\nC. Caenorhabditis\nD. Arabidopsis", "answer": "C"},
    {"question": "Which letter comes first in the word 'dacb'?\nA. d\nB. a\nC. c\nD. b", "answer": "A"},
    {"question": "What is 2 + 2? (A) 3 (B) 4 (C) 5 (D) 22", "answer": "B"},
]


def _jsonl(tmp_path, rows, name):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_questions_are_kept_as_written_and_answers_stripped(tmp_path):
    ps = load_problems(_jsonl(tmp_path, AIME, "aime25.jsonl"))
    assert [p.question for p in ps] == [r["question"] for r in AIME]
    assert [p.gold for p in ps] == ["16", "\\sqrt{4^{2012}+1}", "2"]
    assert is_correct(extract_answer("So $|S| = \\boxed{16}$.", grading="boxed-only"), ps[0].gold)
    assert is_correct(extract_answer("Thus \\boxed{\\sqrt{4^{2012}+1}}", grading="boxed-only"), ps[1].gold)


def test_the_papers_user_turn_is_the_question_verbatim_and_the_default_prompt_unchanged(tmp_path):
    p = load_problems(_jsonl(tmp_path, AIME, "aime25.jsonl"))[1]
    assert user_message(p, STEP_PROMPT["answer_instruction"]) == AIME[1]["question"]  # the paper's turn
    # stepprobe's default prompt joins question and instruction by one blank line, as before
    assert user_message(p).startswith("Compute $\\sqrt{4^{2012}+1}$ written in simplest form.\n\nSolve it")

    class Template:  # records the messages a chat template is given
        chat_template = "yes"

        def apply_chat_template(self, messages, **kwargs):
            return json.dumps(messages)

    msgs = json.loads(build_prompt(p, Template(), **STEP_PROMPT))
    assert msgs == [{"role": "system", "content": STEP_SYSTEM_PROMPT}, {"role": "user", "content": AIME[1]["question"]}]


def test_builtin_problems_have_no_surrounding_whitespace():
    """Keeping a question verbatim changes no prompt of the built-in tasks (nor, with the
    default instruction, of any file): the pipeline's hidden states do not move."""
    for spec in ("builtin:n=400,seed=0", "builtin:n=400,seed=1", "builtin-ood:n=200,seed=0"):
        assert all(p.question == p.question.strip() for p in load_problem_source(spec)), spec


def test_gpqa_options_written_in_the_question(tmp_path):
    ps = load_problems(_jsonl(tmp_path, GPQA, "gpqa_diamond.jsonl"))
    # a line of the question that looks like an option ("C. elegans ...") does not hide the options
    assert ps[0].choices == ["Drosophila", "Saccharomyces", "Caenorhabditis", "Arabidopsis"] and ps[0].gold == "C"
    assert ps[1].choices == ["d", "a", "c", "b"] and ps[1].gold == "A"
    assert ps[2].choices == ["3", "4", "5", "22"] and ps[2].gold == "B"  # options on one line
    assert all(p.meta["choices_in_question"] for p in ps)
    assert options_in_question("Find x.\nA. 1") is None and options_in_question("B. 1\nC. 2") is None
    # options that are letters themselves: \boxed{d} is the letter D, not option A ("d")
    assert extract_answer("The first letter is d, so \\boxed{d}", ps[1].choices) == "D"
    assert not is_correct("D", ps[1].gold, choices=ps[1].choices)
    assert is_correct(extract_answer("\\boxed{\\textbf{A}}", ps[1].choices), ps[1].gold, choices=ps[1].choices)


def test_step_responses_are_tokenized_as_the_paper_cuts_them(default_model_path):
    """The paper cuts the response before </think>, then tokenizes: a final "\\n\\n" stays one token
    and keeps its boundary. Tokenizing through </think> (SmolLM2's tokenizer has no </think> token;
    it writes a "\\n\\n" followed by text as two "\\n") loses it."""
    from transformers import AutoTokenizer

    from stepprobe.data_collection.step_format import tokenize_response

    tok = AutoTokenizer.from_pretrained(default_model_path)
    response = "First, add.\n\nThen check it.\n\n</think>\n\nThe answer is \\boxed{4}."
    paper = BoundaryDetector.from_tokenizer(step_paper_rule(), tok)
    ids = tokenize_response(tok, response)
    head = tok("First, add.\n\nThen check it.\n\n", add_special_tokens=False)["input_ids"]
    assert ids[:len(head)] == head and tok.decode(ids) == response
    assert paper.find(ids) == [len(head) - 1]  # the final "\n\n" before </think>: one token, a boundary
    whole = tok(response, add_special_tokens=False)["input_ids"]
    assert paper.find(whole) == []  # tokenized through </think>: "\n" + "\n", no boundary
    assert tokenize_response(tok, "no think block\n\nhere") == tok("no think block\n\nhere",
                                                                  add_special_tokens=False)["input_ids"]


def _paper_prompt(tok, question: str) -> str:
    """The paper's prompt, built here from its description (not with stepprobe's builder)."""
    messages = [{"role": "system", "content": STEP_SYSTEM_PROMPT}, {"role": "user", "content": question}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_dump_of_a_question_with_surrounding_whitespace(tmp_path, tiny_model_path, caplog):
    """The paper's prompt of a question with a trailing blank line is found in the dump's ids:
    positions are response-relative, --prompt-steps drop works, num_tokens counts the response."""
    from stepprobe.data_collection.step_dump import Config, run

    identity, tok = model_identity_for(tiny_model_path)
    det = BoundaryDetector.from_tokenizer(step_paper_rule(), tok)
    entries = []
    for k, question in enumerate(["What is 1 + 2?\n\n", "\nWhat is 3 + 4?"]):
        p_ids = tok(_paper_prompt(tok, question), add_special_tokens=False)["input_ids"]
        r_ids = tok("Add them.\n\nDone.\n\n", add_special_tokens=False)["input_ids"]
        ids = p_ids + r_ids
        rows = len(det.find(ids))
        entries.append({"select_hidden_states": torch.zeros(rows, identity["hidden_size"], dtype=torch.float16),
                        "full_input_ids": torch.tensor(ids), "question": question, "is_correct": bool(k),
                        "ground_truth": "3"})
    (tmp_path / "d").mkdir()
    torch.save(entries, tmp_path / "d" / "aime_hiddenstates_0_2.pt")
    with caplog.at_level(logging.WARNING):
        out = run(Config(dumps=[str(tmp_path / "d")], model=tiny_model_path, output=str(tmp_path / "hs.h5"),
                         prompt_steps="drop"))
    assert not [r for r in caplog.records if "positions" in r.getMessage()]
    hs = hdf5.HiddenStates(out)
    assert hs.header["extra"]["positions"] == "response-relative"
    assert list(hs.traces["num_tokens"]) == [len(r_ids)] * 2 and (hs.steps["position"] >= 0).all()
    hs.close()


def test_dump_warnings_name_the_cause_and_num_tokens_never_counts_the_prompt(tmp_path, tiny_model_path, caplog):
    from stepprobe.data_collection.step_dump import Config, run

    identity, tok = model_identity_for(tiny_model_path)
    det = BoundaryDetector.from_tokenizer(step_paper_rule(), tok)
    other = tok(_paper_prompt(tok, "Another prompt entirely."), add_special_tokens=False)["input_ids"]
    r_ids = tok("Add them.\n\nDone.\n\n", add_special_tokens=False)["input_ids"]

    def dump(name: str, rows_extra: int) -> str:
        ids = other + r_ids
        rows = len(det.find(ids)) + rows_extra
        e = {"select_hidden_states": torch.zeros(rows, identity["hidden_size"], dtype=torch.float16),
             "full_input_ids": torch.tensor(ids), "question": "What is 1 + 2?", "is_correct": True}
        (tmp_path / name).mkdir()
        torch.save([e], tmp_path / name / "x_hiddenstates_0_1.pt")
        return str(tmp_path / name)

    # the rule matches the rows, the prompt is another: positions from the sequence start, said so
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        out = run(Config(dumps=[dump("seq", 0)], model=tiny_model_path, output=str(tmp_path / "seq.h5")))
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "count from the sequence start" in msg and "is not a prefix of full_input_ids" in msg
    hs = hdf5.HiddenStates(out)
    assert hs.header["extra"]["positions"] == "sequence-relative" and list(hs.traces["num_tokens"]) == [-1]
    hs.close()
    # one row more than the rule finds: positions unknown, and the warning says why (not the prompt)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        out = run(Config(dumps=[dump("unk", 1)], model=tiny_model_path, output=str(tmp_path / "unk.h5")))
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "positions are unknown" in msg and "one boundary per row of select_hidden_states" in msg
    assert "prefix" not in msg
    hs = hdf5.HiddenStates(out)
    assert hs.header["extra"]["positions"] == "unknown" and list(hs.traces["num_tokens"]) == [-1]
    assert (np.asarray(hs.steps["position"]) == -1).all()
    hs.close()
