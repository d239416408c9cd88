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
