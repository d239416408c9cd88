"""Answer extraction and grading: a table of real-looking model outputs and verdicts."""

from __future__ import annotations

import threading
import time

import pytest

from stepprobe.data_collection.collect import majority_vote
from stepprobe.data_collection.grading import answers_equivalent, extract_answer, gold_letter, is_correct, last_boxed

# (model output, gold, expected extraction, expected verdict)
FREE_FORM = [
    ("Tom has 3 apples and gets 4 more.\n3 + 4 = 7\nThe answer is 7.", "7", "7", True),
    ("Step 1: 12 - 5 = 7.\n\nThe answer is 8.", "7", "8", False),
    ("We compute $\\frac{6}{12}$, so the answer is $\\boxed{\\frac{1}{2}}$.", "0.5", "\\frac{1}{2}", True),
    ("Adding them: 500 + 500 = 1000. The answer is 1,000.", "1000", "1,000", True),
    ("The final answer is: 42", "42", "42", True),
    ("**Answer:** 15", "15", "15", True),
    ("The answer is 7 apples.", "7", "7 apples", True),
    ("The answer is \\boxed{9}. Wait, let me recheck: 4 + 4 = 8. The answer is 8.", "8", "8", True),
    ("Let me think. The answer is 6, because 2 * 3 = 6.", "6", "6", True),
    ("First I thought the answer is 5. Then: 2+2 = 4, so \\boxed{4}", "4", "4", True),
    ("\\boxed{x = 3}", "3", "x = 3", True),
    ("The answer is \\(2\\sqrt{2}\\).", "\\sqrt{8}", "2\\sqrt{2}", True),
    ("So 4 * 5 = 20, and 20 + 1 = 21.", "21", None, False),  # no final-answer form: not graded right
    ("", "3", None, False),
    ("The answer is -4.", "4", "-4", False),
    ("The answer is 3.5", "7/2", "3.5", True),
    ("\\boxed{\\frac{a}{b}", "1", None, False),  # unbalanced box, nothing else
    ("the answer is 10%", "10", "10%", True),
    ("The answer is 13. To solve this problem we add 8 and 2.", "10", "13", False),
    ("The answer is 10. To check: 8 + 2 = 10.", "10", "10", True),
]


@pytest.mark.parametrize("text, gold, extracted, verdict", FREE_FORM)
def test_free_form_table(text, gold, extracted, verdict):
    got = extract_answer(text)
    assert got == extracted
    assert is_correct(got, gold) is verdict


CHOICES = ["Oxygen", "Neon", "Iron", "Carbon"]
MULTIPLE_CHOICE = [
    ("Neon is a noble gas. The answer is (B).", "B", "B", True),
    ("The answer is B", "B", "B", True),
    ("Iron is a metal... The answer is C.", "B", "C", False),
    ("The answer is \\boxed{D}", "D", "D", True),
    ("The answer is Neon.", "B", "B", True),  # option text maps to its letter
    ("The answer is (B) Neon.", "B", "B", True),
    ("I would say Neon.", "B", None, False),
    ("The answer is (F).", "B", None, False),  # no option F
]


@pytest.mark.parametrize("text, gold, extracted, verdict", MULTIPLE_CHOICE)
def test_multiple_choice_table(text, gold, extracted, verdict):
    got = extract_answer(text, CHOICES)
    assert got == extracted
    assert is_correct(got, gold, choices=CHOICES) is verdict


def test_multiple_choice_gold_as_text_or_index():
    assert is_correct("B", "Neon", choices=CHOICES)
    assert is_correct("B", "1", choices=CHOICES)
    assert not is_correct("A", "Neon", choices=CHOICES)


@pytest.mark.parametrize("a, b, same", [
    ("0.5", "\\frac{1}{2}", True),
    ("1/2", "2/4", True),
    ("1,000", "1000", True),
    ("7", "8", False),
    ("x", "y", False),
    ("\\sqrt{4}", "2", True),
    (None, "2", False),
])
def test_answers_equivalent(a, b, same):
    assert answers_equivalent(a, b) is same
    assert answers_equivalent(b, a) is same


def test_last_boxed_nested():
    assert last_boxed("a \\boxed{\\frac{1}{\\sqrt{2}}} b") == "\\frac{1}{\\sqrt{2}}"
    assert last_boxed("\\boxed 5") == "5"
    assert last_boxed("no box") is None


def test_majority_vote_merges_equivalent_answers():
    assert majority_vote(["1/2", "3", "0.5", None, "3", "\\frac{1}{2}"]) == "1/2"
    assert majority_vote([None, None]) is None
    assert majority_vote(["4", "5"]) == "4"  # tie: first seen


def test_time_limit_stops_a_slow_comparison(monkeypatch):
    # The limit interrupts Python-level work inside math-verify: make verify hang.
    import math_verify

    calls = []

    def slow_verify(*args, **kwargs):
        calls.append("started")
        time.sleep(30)
        calls.append("finished")
        return True

    # Without a limit the comparison runs to its end (and says True); this also caches the
    # parsed answers, so below the limit can only expire inside verify.
    monkeypatch.setattr(math_verify, "verify", lambda *a, **k: calls.append("unlimited") or True)
    assert is_correct("2/3", "0.6666666", timeout_s=None) is True and calls == ["unlimited"]
    calls.clear()
    monkeypatch.setattr(math_verify, "verify", slow_verify)
    assert is_correct("2/3", "0.6666666", timeout_s=0.3) is False
    assert calls == ["started"]  # the comparison began and was cut off: it never got to return True


def test_an_alarm_during_parsing_is_not_swallowed_by_math_verify(monkeypatch):
    # math-verify catches Exception inside parse(); the time limit must get through it.
    import math_verify

    from stepprobe.data_collection import grading

    def slow_parse(*args, **kwargs):
        try:
            time.sleep(30)
        except Exception:  # what a library's broad handler does
            return []
        return ["parsed"]

    verified = []
    monkeypatch.setattr(math_verify, "parse", slow_parse)
    monkeypatch.setattr(math_verify, "verify", lambda *a, **k: verified.append(1) or True)
    grading._parse.cache_clear()
    try:
        assert is_correct("3/7", "0.4285714", timeout_s=0.3) is False
    finally:
        grading._parse.cache_clear()
    assert verified == []


def test_power_towers_are_not_handed_to_sympy():
    # sympy would evaluate 9^(9^(9^9)) in C, where no time limit can stop it.
    assert is_correct("9^{9^{9^{9}}}", "9^{9^{9^{8}}}") is False
    assert is_correct("9^{9^{9^{9}}}", "9^{9^{9^{9}}}") is True  # identical text still matches


def test_grading_off_the_main_thread():
    results = []
    t = threading.Thread(target=lambda: results.append(is_correct("0.5", "1/2")))
    t.start()
    t.join()
    assert results == [True]


@pytest.mark.parametrize("text,expected", [
    ("The answer is \\[ 42 \\].", "42"),        # display-math wrapper dropped
    ("The answer is $7$.", "7"),
    ("The answer is \\(x + 1\\)", "x + 1"),
])
def test_phrase_answers_lose_their_math_wrappers(text, expected):
    assert extract_answer(text) == expected


def test_multiple_choice_letters_and_option_texts():
    choices = ["red", "green", "blue"]
    assert gold_letter("b", choices) == "B" and gold_letter("2", choices) == "C"
    assert gold_letter("green", choices) == "B"
    assert gold_letter("Green.", choices) == "B"   # option text, trailing period ignored
    assert gold_letter("D", choices) is None        # only three options
    assert gold_letter("AB", choices) is None
    assert is_correct("(C) blue", "blue", choices=choices) and is_correct("C", "2", choices=choices)
    assert not is_correct("A", "blue", choices=choices)


def test_thousands_separators_are_one_number():
    assert answers_equivalent("1,000", "1000") and is_correct("12,345", "12345")
    assert not answers_equivalent("1,000", "1")


# --- issue 22 item 4: the paper's benchmark shapes and its grading protocol ------------------
# (model output, options, expected extraction): GPQA-style options, where models box a letter
# in LaTeX text commands or in lower case, and options that are themselves letters.
GPQA_OPTIONS = ["4", "8", "12", "16"]
LETTER_OPTIONS = ["d", "a", "c", "b"]  # "A. d", "B. a", ...: the options are letters themselves
LETTER_FORMS = [
    ("Thus the answer is \\boxed{\\text{D}}", GPQA_OPTIONS, "D"),
    ("\\boxed{\\textbf{D}}", GPQA_OPTIONS, "D"),
    ("\\boxed{\\mathrm{D}}", GPQA_OPTIONS, "D"),
    ("\\boxed{\\text{(C)}}", GPQA_OPTIONS, "C"),
    ("\\boxed{\\textbf{(B) 8}}", GPQA_OPTIONS, "B"),
    ("\\boxed{d}", GPQA_OPTIONS, "D"),
    ("The answer is (c).", GPQA_OPTIONS, "C"),
    ("The answer is b", GPQA_OPTIONS, "B"),
    ("\\boxed{d}", LETTER_OPTIONS, "D"),      # the letter D, not option A whose text is "d"
    ("\\boxed{\\text{b}}", LETTER_OPTIONS, "B"),
    ("\\boxed{e}", GPQA_OPTIONS, None),       # no option E
    ("The answer is a bit over 12.", GPQA_OPTIONS, None),  # an article, not a letter
]


@pytest.mark.parametrize("text, choices, expected", LETTER_FORMS)
def test_option_letters_in_latex_text_and_lower_case(text, choices, expected):
    assert extract_answer(text, choices) == expected
    if expected is not None:
        assert is_correct(extract_answer(text, choices), expected, choices=choices)


@pytest.mark.parametrize("text, expected", [
    ('He said: the answer is "16".', "16"),
    ('The final answer is 16".', "16"),
    ("Final answer: `42`", "42"),
    ("The answer is \u201c7\u201d.", "7"),
])
def test_phrase_answers_lose_stray_quotes(text, expected):
    assert extract_answer(text) == expected


# (model output, gold, answer under boxed-or-phrase, under boxed-only)
PROTOCOLS = [
    ("So the answer is 7.", "7", "7", None),                       # phrase only: the paper grades it wrong
    ("Thus \\boxed{7}.", "7", "7", "7"),
    ("The answer is \\boxed{7}, not 8.", "7", "7", "7"),
    ("I first got \\boxed{5}. Rechecking, the answer is 7.", "7", "7", "5"),  # the last box, not the last phrase
    ("\\boxed{\\sqrt{4^{2012}+1}}", "\\sqrt{4^{2012}+1}", "\\sqrt{4^{2012}+1}", "\\sqrt{4^{2012}+1}"),
    ("Final answer: 12", "12", "12", None),
]


@pytest.mark.parametrize("text, gold, default, boxed_only", PROTOCOLS)
def test_grading_protocols(text, gold, default, boxed_only):
    from stepprobe.data_collection.grading import DEFAULT_GRADING

    assert DEFAULT_GRADING == "boxed-or-phrase"
    assert extract_answer(text) == extract_answer(text, grading="boxed-or-phrase") == default
    assert extract_answer(text, grading="boxed-only") == boxed_only
    assert is_correct(extract_answer(text, grading="boxed-only"), gold) is (boxed_only == gold)


def test_boxed_only_multiple_choice_needs_a_box():
    assert extract_answer("The answer is (B).", GPQA_OPTIONS, grading="boxed-only") is None
    assert extract_answer("The answer is \\boxed{\\text{B}}.", GPQA_OPTIONS, grading="boxed-only") == "B"


def test_unknown_grading_protocol_is_refused_with_the_known_ones():
    from stepprobe.data_collection.grading import grading_of
    from stepprobe.errors import StepprobeError

    with pytest.raises(StepprobeError, match="known: boxed-or-phrase, boxed-only"):
        extract_answer("\\boxed{1}", grading="boxed")
    assert grading_of({}) == "boxed-or-phrase"  # artifacts written before the option: the default
    assert grading_of({"grading": "boxed-only"}) == "boxed-only"
