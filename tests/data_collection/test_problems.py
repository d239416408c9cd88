"""Problem loaders: every supported shape, and every malformed case names file and line."""

from __future__ import annotations

import json

import pytest

from stepprobe.data_collection.problems import load_problems
from stepprobe.data_collection.sources import load_problem_source, parse_builtin_spec
from stepprobe.errors import StepprobeError


def _jsonl(tmp_path, rows, name="set.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_question_answer_shape(tmp_path):
    path = _jsonl(tmp_path, [{"question": "What is 2+2?", "answer": "4", "id": "aime-1", "year": 2024},
                             {"question": "Find x.", "answer": 17, "id": "aime-2"}])
    ps = load_problems(path)
    assert [p.problem_id for p in ps] == ["aime-1", "aime-2"]
    assert ps[0].question == "What is 2+2?" and ps[0].gold == "4" and ps[0].choices is None
    assert ps[1].gold == "17"  # numbers become text
    assert ps[0].meta == {"year": 2024}


def test_problem_answer_shape_math500(tmp_path):
    path = _jsonl(tmp_path, [{"problem": "Compute $\\frac{1}{2}+\\frac{1}{2}$.", "solution": "... \\boxed{1}",
                              "answer": "1", "subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"}])
    (p,) = load_problems(path)
    assert p.problem_id == "test/algebra/1.json" and p.gold == "1"
    assert p.meta["subject"] == "Algebra" and p.meta["solution"].endswith("\\boxed{1}")


def test_solution_only_reads_last_boxed(tmp_path):
    path = _jsonl(tmp_path, [{"problem": "p", "solution": "First \\boxed{2}, then \\boxed{\\frac{3}{4}}."}])
    assert load_problems(path)[0].gold == "\\frac{3}{4}"


def test_gsm8k_hash_answers(tmp_path):
    path = _jsonl(tmp_path, [{"question": "Natalia sold clips ...", "answer": "She sold 48/2 = <<48/2=24>>24.\n#### 1,072"}])
    (p,) = load_problems(path)
    assert p.gold == "1072"
    assert p.meta["solution"].startswith("She sold")
    assert p.problem_id == "set-00000"  # no id field: file stem + index


@pytest.mark.parametrize("choices, answer, gold", [
    (["3", "4", "5", "6"], "B", "B"),
    (["3", "4", "5", "6"], "b", "B"),
    (["3", "4", "5", "6"], 2, "C"),
    (["3", "4", "5", "6"], "6", "D"),
    ({"A": "red", "B": "blue"}, "(A)", "A"),
])
def test_multiple_choice(tmp_path, choices, answer, gold):
    path = _jsonl(tmp_path, [{"question": "Pick one.", "choices": choices, "answer": answer}])
    (p,) = load_problems(path)
    assert p.gold == gold and len(p.choices) == len(choices)


def test_gpqa_style_letter_with_options_in_question(tmp_path):
    q = "Which is a noble gas?\n(A) Oxygen\n(B) Neon\n(C) Iron\n(D) Carbon"
    (p,) = load_problems(_jsonl(tmp_path, [{"question": q, "answer": "B"}]))
    assert p.gold == "B" and p.choices == ["Oxygen", "Neon", "Iron", "Carbon"]
    assert p.meta["choices_in_question"] is True


def test_explicit_field_names(tmp_path):
    path = _jsonl(tmp_path, [{"q": "1+1?", "a": "2", "key": "k1", "opts": ["1", "2"]}])
    (p,) = load_problems(path, question_field="q", answer_field="a", id_field="key", choices_field="opts")
    assert (p.problem_id, p.question, p.gold, p.choices) == ("k1", "1+1?", "B", ["1", "2"])


def test_csv_and_json_list(tmp_path):
    csv_path = tmp_path / "set.csv"
    csv_path.write_text('id,question,answer\nc1,"What is 3, plus 4?",7\nc2,What is 1+1?,2\n', encoding="utf-8")
    ps = load_problems(csv_path)
    assert [(p.problem_id, p.question, p.gold) for p in ps] == [("c1", "What is 3, plus 4?", "7"), ("c2", "What is 1+1?", "2")]
    js = tmp_path / "set.json"
    js.write_text(json.dumps([{"question": "a", "answer": "1"}, {"question": "b", "answer": "2"}]))
    assert [p.gold for p in load_problems(js)] == ["1", "2"]


def test_blank_lines_are_not_problems(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text('{"question": "a", "answer": "1"}\n\n   \n{"question": "b", "answer": "2"}\n')
    assert len(load_problems(path)) == 2


@pytest.mark.parametrize("rows, line, message", [
    (['{"question": "a", "answer": "1"}', '{"question": "b", "answer": '], 2, "not valid JSON"),
    (['{"question": "a", "answer": "1"}', '["a", "1"]'], 2, "expected a JSON object"),
    (['{"question": "a", "answer": "1"}', '{"question": "b"}'], 2, "no answer field"),
    (['{"text": "a", "answer": "1"}'], 1, "no question field"),
    (['{"question": "", "answer": "1"}'], 1, "the question is empty"),
    (['{"question": "a", "answer": null}'], 1, "the answer is null"),
    (['{"question": "a", "answer": ["1"]}'], 1, "must be text or a number"),
    (['{"question": "a", "answer": "x #### "}'], 1, "nothing after '####'"),
    (['{"question": "a", "choices": ["1", "2"], "answer": "E"}'], 1, "not a letter, index or text"),
    (['{"question": "a", "choices": ["1"], "answer": "A"}'], 1, "at least two options"),
    (['{"question": "a", "choices": "one", "answer": "A"}'], 1, "choices must be a list"),
    (['{"id": 1, "question": "a", "answer": "1"}', '{"id": 1, "question": "b", "answer": "2"}'], 2, "duplicate problem id"),
    (['{"problem": "a", "solution": "no box here"}'], 1, "no \\boxed{} answer"),
])
def test_malformed_lines_name_file_and_line(tmp_path, rows, line, message):
    path = _jsonl(tmp_path, rows)
    with pytest.raises(StepprobeError) as err:
        load_problems(path)
    assert f"{path}:{line}:" in str(err.value)
    assert message in str(err.value)


def test_malformed_csv_row(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("question,answer\nwhat is 1+1?,2\nonly-one-field\n")
    with pytest.raises(StepprobeError, match=rf"{path}:3: row has 1 fields"):
        load_problems(path)


def test_explicit_field_missing(tmp_path):
    path = _jsonl(tmp_path, [{"question": "a", "answer": "1"}])
    with pytest.raises(StepprobeError, match=rf"{path}:1: no field 'q'"):
        load_problems(path, question_field="q")


@pytest.mark.parametrize("content, name, message", [
    ("", "empty.jsonl", "no problems"),
    ("question,answer\n", "empty.csv", "no problems"),
    ("{}", "set.txt", "unknown problem file type"),
])
def test_whole_file_errors(tmp_path, content, name, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(StepprobeError, match=message):
        load_problems(path)


def test_missing_file():
    with pytest.raises(StepprobeError, match="problem file not found"):
        load_problems("/nonexistent/problems.jsonl")


def test_problem_source_builtin_and_file(tmp_path):
    ps = load_problem_source("builtin:n=12,seed=3,families=add+word_sub,levels=1")
    assert len(ps) == 12 and {p.meta["family"] for p in ps} == {"add", "word_sub"}
    assert len(load_problem_source("builtin")) >= 200
    path = _jsonl(tmp_path, [{"q": "x", "a": "1"}])
    assert load_problem_source(str(path), question_field="q", answer_field="a")[0].gold == "1"


@pytest.mark.parametrize("spec, message", [
    ("builtin:n=ten", "must be an integer"),
    ("builtin:size=3", "unknown key 'size'"),
    ("builtin:n", "expected key=value"),
    ("builtin:families=cube", "unknown family cube"),
    ("builtin:levels=7", "levels must be among"),
])
def test_bad_builtin_specs(spec, message):
    with pytest.raises(StepprobeError, match=message):
        load_problem_source(spec)


def test_parse_builtin_spec():
    assert parse_builtin_spec("builtin") == {}
    assert parse_builtin_spec("builtin:n=5, seed=2,families=add+mul,levels=1+3") == {
        "n": 5, "seed": 2, "families": ["add", "mul"], "levels": [1, 3]}
