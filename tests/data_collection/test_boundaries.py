"""Step boundaries: a table of tokenizations, the streaming API, and the real tokenizer."""

from __future__ import annotations

import re

import pytest

from stepprobe.boundaries import (MODE_OCCURRENCE, MODE_TOKEN_CONTAINS, BoundaryDetector, BoundaryRule,
                                  step_paper_rule)
from stepprobe.errors import StepprobeError


def _case_id(i: int, pieces: list[str]) -> str:
    """A plain-ASCII test id (mutmut selects tests by node id; escaped newlines break that)."""
    text = "".join(pieces).replace("\n", "NL")
    return f"{i:02d}-" + (re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:24] or "blank")


def _stream(det: BoundaryDetector, pieces: list[str], ids: list[int], bound: int) -> list[int]:
    """Feed ``ids`` one by one through the streaming API (what the vLLM runner calls on live
    tokens); returns the boundary positions. Checks what the runner relies on to keep one
    short string per request: the carry is always the tail of the text fed so far, at most
    ``bound`` characters, until an end_text has been seen (after which nothing is a boundary)."""
    carry, live, text = "", [], ""
    end = det.rule.end_text
    for pos, tid in enumerate(ids):
        hit, carry = det.step(carry, tid)
        text += pieces[pos]
        if hit:
            live.append(pos)
        if end is None or end not in text:
            assert text.endswith(carry) and len(carry) <= bound, (pos, carry)
    return live


def _detector(pieces: list[str], delimiter: str = "\n\n") -> tuple[BoundaryDetector, list[int]]:
    vocab = sorted(set(pieces))
    det = BoundaryDetector(BoundaryRule(delimiter), vocab)
    return det, [vocab.index(p) for p in pieces]


# (pieces of the generated part, delimiter, expected boundary positions)
TABLE = [
    (["a", "\n\n", "b"], "\n\n", [1]),                        # "\n\n" as one token (Qwen style)
    (["a", "\n", "\n", "b"], "\n\n", [2]),                    # "\n" + "\n": the second completes it
    (["First.\n\n", "Then"], "\n\n", [0]),                    # multi-char token containing "\n\n"
    (["x", ".\n\nY", "z"], "\n\n", [1]),                      # "\n\n" inside a token
    (["a\n", "\nb"], "\n\n", [1]),                            # split across two multi-char tokens
    (["a", "\n\n\n", "b"], "\n\n", [1]),                      # three newlines: one step
    (["\n", "\n", "\n", "\n"], "\n\n", [1, 3]),               # non-overlapping, like str.split
    (["a", "\n\n", "\n\n", "b"], "\n\n", [1, 2]),
    (["a", "\n", "b", "\n"], "\n\n", []),                     # single newlines are not steps
    (["no", " break", " here"], "\n\n", []),                  # a trace with no boundary
    (["one", "\n\n", "two", "\n"], "\n\n", [1]),              # cut at max_tokens half-way through "\n\n"
    (["a\n\nb\n\nc"], "\n\n", [0]),                           # two occurrences in one token: one boundary
    (["Step", " 1", ":", " x", "\n", "Step", " 2", ":"], "Step", [0, 5]),   # another delimiter
    (["x", "\n", "Step", " 2"], "\nStep", [2]),
    (["St", "ep 1", " St", "ep"], "Step", [1, 3]),            # delimiter split across tokens
    (["a Ste", "p 2"], "Step", [1]),                          # the carry keeps len(delimiter) - 1 chars
    (["a\n", "x", "\n"], "\n\n", []),                           # an unrelated token empties the carry
]


@pytest.mark.parametrize("pieces,delimiter,expected", TABLE, ids=[_case_id(i, t[0]) for i, t in enumerate(TABLE)])
def test_boundary_table(pieces, delimiter, expected):
    det, ids = _detector(pieces, delimiter)
    assert det.find(ids) == expected
    # The streaming API (what the vLLM runner calls on live tokens) agrees token for token.
    assert _stream(det, pieces, ids, len(delimiter) - 1) == expected


def test_token_ids_outside_the_piece_table_are_no_boundary():
    # A model's (padded) vocabulary can be larger than its tokenizer's piece table.
    pieces = ["a", "\n", "\n\n"]
    for rule in (BoundaryRule(), step_paper_rule()):
        det = BoundaryDetector(rule, pieces)
        assert det.find([1, 3, 1, 2, 99, -1]) == [3]  # the unknown id between the two "\n" breaks them


def test_prompt_side_delimiter_is_not_a_step():
    # The prompt ends with "\n" (chat templates do) and the answer starts with "\n": over
    # prompt + answer that completes a "\n\n", over the generated part alone it does not.
    prompt, generated = ["Q", "\n\n", "assistant", "\n"], ["\n", "Sure", "\n\n", "ok"]
    det, ids = _detector(prompt + generated)
    assert det.find(ids) == [1, 4, 6]
    assert det.find(ids[len(prompt):]) == [2]


def test_rule_roundtrip_and_bad_rule():
    rule = BoundaryRule("Step ")
    assert BoundaryRule.from_dict(rule.to_dict()) == rule
    assert BoundaryRule.from_dict({}).delimiter == "\n\n"
    with pytest.raises(StepprobeError):
        BoundaryRule("")
    # The default rule's record is unchanged (files and scorers written before modes existed).
    assert BoundaryRule().to_dict() == {"delimiter": "\n\n", "mode": MODE_OCCURRENCE}
    paper = step_paper_rule()
    assert paper.to_dict() == {"delimiter": "\n\n", "mode": MODE_TOKEN_CONTAINS, "end_text": "</think>"}
    assert BoundaryRule.from_dict(paper.to_dict()) == paper
    with pytest.raises(StepprobeError, match="unknown boundary mode 'paper'; known"):
        BoundaryRule.from_dict({"delimiter": "\n\n", "mode": "paper"})
    with pytest.raises(StepprobeError, match="end_text"):
        BoundaryRule("\n\n", MODE_OCCURRENCE, "</think>")


# The STEP paper's rule: a token is a boundary when its own text holds "\n\n"; nothing is
# carried across tokens; nothing at or after the token holding "</think>" is a boundary.
PAPER_TABLE = [
    (["a", "\n\n", "b"], [1]),
    (["a", "\n", "\n", "b"], []),                       # two "\n" tokens: no boundary (differs from the default)
    (["a\n", "\nb"], []),                               # split across tokens: none either
    (["x", ".\n\nY", "z", "\n\n\n"], [1, 3]),
    (["a\n\nb\n\nc"], [0]),                            # two in one token: one boundary
    (["a", "\n\n", "</think>", "\n\n", "B", "\n\n"], [1]),  # nothing after </think>
    (["a", "\n\n</think>", "\n\n"], [1]),              # its text before </think> holds "\n\n"
    (["a", "</think>\n\n", "\n\n"], []),               # ... here it does not
    (["x\n\n", "</", "think", ">", "\n\n"], [0]),       # </think> split over tokens
    (["x\n\n</", "think>\n\nB", "\n\n"], [0]),        # split, with blank lines around it
    (["</", "b>", "\n\n", "<", "/think", "\n\n"], [2, 5]),  # partial matches that never complete
    (["think", "\n\n", "</", "x", "think>", "\n\n"], [1, 5]),  # a token in between breaks "</" + "think>"
    (["\n\n", "b</", "think>c", "\n\n"], [0]),              # </think> across tokens that hold more text
    (["a\n\n", "b<", "/think>", "\n\n"], [0]),              # ... split after its first character
    (["a\n\n", "</thi", "nk>", "\n\n"], [0]),
    (["x", "a</think>\n\n</think>", "\n\n"], []),            # only the text before the FIRST </think> counts
]


@pytest.mark.parametrize("pieces,expected", PAPER_TABLE, ids=[_case_id(i, t[0]) for i, t in enumerate(PAPER_TABLE)])
def test_step_paper_rule_table(pieces, expected):
    vocab = sorted(set(pieces) | {"unused"})
    det = BoundaryDetector(step_paper_rule(), vocab)
    ids = [vocab.index(p) for p in pieces]
    assert det.find(ids) == expected
    assert _stream(det, pieces, ids, len("</think>") - 1) == expected
    # Without end_text, the same rule keeps counting after </think>.
    plain = BoundaryDetector(BoundaryRule("\n\n", MODE_TOKEN_CONTAINS), vocab)
    assert plain.find(ids) == [i for i, p in enumerate(pieces) if "\n\n" in p]


# token-contains with other end_text lengths: (end_text, pieces, expected)
END_TABLE = [
    ("]]", ["a\n\n", "]", "]", "\n\n"], [0]),          # a two-character end_text split over two tokens
    ("]]", ["a\n\n", "]", "x", "]", "\n\n"], [0, 4]),  # ... not when a token comes between
    ("#", ["a\n\n", "b", "\n\n", "#", "\n\n"], [0, 2]),
    ("#", ["a\n\n", "b#\n\n", "\n\n"], [0]),                 # its text after the end_text does not count
]


@pytest.mark.parametrize("end,pieces,expected", END_TABLE, ids=[f"{i:02d}" for i in range(len(END_TABLE))])
def test_token_contains_with_short_end_texts(end, pieces, expected):
    vocab = sorted(set(pieces))
    det = BoundaryDetector(BoundaryRule("\n\n", MODE_TOKEN_CONTAINS, end), vocab)
    ids = [vocab.index(p) for p in pieces]
    assert det.find(ids) == expected
    assert _stream(det, pieces, ids, len(end) - 1) == expected
    # No end_text: nothing to carry at all.
    plain = BoundaryDetector(BoundaryRule("\n\n", MODE_TOKEN_CONTAINS), vocab)
    assert _stream(plain, pieces, ids, 0) == [i for i, p in enumerate(pieces) if "\n\n" in p]


def test_recorded_boundary_token_ids_of_the_paper_rule():
    # What a recorded file lists: tokens holding the delimiter, and tokens that can be part
    # of a "</think>" spread over several tokens; not "", "x", or a lone "\n".
    pieces = ["", "x", "a\n\n", "</", "think>", "b<", ">c", "</think>", "\n", "hink", "k>\n"]
    det = BoundaryDetector(step_paper_rule(), pieces)
    assert det.boundary_token_ids() == [2, 3, 4, 5, 6, 7, 9, 10]
    assert BoundaryDetector(BoundaryRule(), pieces).boundary_token_ids() == [2, 8, 10]


PARAGRAPHS = [
    "Let me solve this.\n\nFirst, 3 + 4 = 7.\n\nThen 7 * 2 = 14.\n\nThe answer is 14.",
    "Step 1: read.\n\n\nStep 2: think.\n\nStep 3: answer.\n",
    "We have x = 2.\n\n- a list item\n- another\n\n**Bold**: done.\n\n",
    "Okay.\n\nSo, (1/2).\n\n$$x^2$$\n\nAnswer: 4",
    "one line only",
]


@pytest.mark.parametrize("text", PARAGRAPHS, ids=[f"paragraphs{i}" for i in range(len(PARAGRAPHS))])
def test_default_tokenizer_counts_every_paragraph_break(record_tokenizer, record_detector, text):
    """With the real default tokenizer ("\\n\\n" often two tokens) every break is found."""
    det = record_detector
    ids = record_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert record_tokenizer.decode(ids) == text
    found = det.find(ids)
    assert len(found) == len(text.split("\n\n")) - 1
    # Each boundary token completes a "\n\n": the text up to it has one more split.
    for k, pos in enumerate(found, start=1):
        upto = record_tokenizer.decode(ids[:pos + 1])
        assert len(upto.split("\n\n")) - 1 == k
        assert len(record_tokenizer.decode(ids[:pos]).split("\n\n")) - 1 == k - 1


def test_default_tokenizer_writes_blank_lines_both_ways(record_tokenizer, record_detector):
    """The reason the paper's single-token rule is not enough for the default model."""
    det = record_detector
    ids = record_tokenizer(" ".join(PARAGRAPHS), add_special_tokens=False)["input_ids"]
    pieces = [det.pieces[i] for i in det.find(ids)]
    single_token = [p for p in pieces if "\n\n" in p]
    assert len(pieces) > len(single_token)


def test_token_pieces_keep_special_tokens_and_spacing(record_tokenizer):
    """Each token's own text, exactly: special tokens are kept (a boundary rule may name one)
    and no clean-up of spaces (" ." stays " .", or offsets across tokens would shift)."""
    from stepprobe.boundaries import token_pieces

    pieces = token_pieces(record_tokenizer)
    assert len(pieces) == len(record_tokenizer)
    eos = record_tokenizer.eos_token_id
    assert pieces[eos] == record_tokenizer.eos_token != ""
    dot = record_tokenizer.convert_tokens_to_ids("\u0120.")  # byte-level BPE: " ."
    assert pieces[dot] == " ."
    nl2 = record_tokenizer.convert_tokens_to_ids("\u010a\u010a")  # "\n\n"
    assert pieces[nl2] == "\n\n"
    det = BoundaryDetector(BoundaryRule(), pieces)
    assert det.boundary_token_ids() == sorted(i for i, p in enumerate(pieces) if "\n" in p)
    assert nl2 in det.boundary_token_ids() and dot not in det.boundary_token_ids()


def test_bad_rules_are_refused_with_their_reason():
    """Each refusal names what is wrong (a hand-written rule in a config or a converted file)."""
    with pytest.raises(StepprobeError, match=r"^boundary delimiter must be a non-empty string$"):
        BoundaryRule("")
    with pytest.raises(StepprobeError, match=re.escape(
            "unknown boundary mode 'lines'; known: completes-occurrence-nonoverlapping, token-contains")):
        BoundaryRule(mode="lines")
    with pytest.raises(StepprobeError, match=r"^boundary end_text must be non-empty \(or absent\)$"):
        BoundaryRule(mode=MODE_TOKEN_CONTAINS, end_text="")
    assert BoundaryRule(mode=MODE_TOKEN_CONTAINS, end_text="XXXX").end_text == "XXXX"


def test_a_token_holding_an_odd_run_of_newlines_leaves_one_for_the_next():
    """Occurrences are found left to right without overlap: "\\n\\n\\n" completes one and leaves
    one "\\n" over, which the next "\\n" completes ("\\n" * 4 splits twice)."""
    det, ids = _detector(["\n\n\n", "\n", "x", "\n\n\n"])
    assert det.find(ids) == [0, 1, 3]


def test_nothing_before_the_first_generated_token_counts():
    """``find`` starts from an empty carry: a first token can only complete a delimiter with
    its own text, whatever the delimiter is made of."""
    for delim in ("\n\n", "XXXXX", "ab"):
        det = BoundaryDetector(BoundaryRule(delim), ["X", "b", delim])
        assert det.find([0]) == [] and det.find([1]) == [] and det.find([2]) == [0]


def test_end_text_begun_in_an_earlier_token_hides_the_delimiter_inside_it():
    """Token-contains with an end_text that starts in the previous token: the completing token's
    text is all end_text, so even a delimiter inside end_text does not make it a boundary."""
    rule = BoundaryRule("\n", MODE_TOKEN_CONTAINS, end_text="x\ny")
    det = BoundaryDetector(rule, ["x", "\ny", "a\n"])
    assert det.find([0, 1]) == []
    assert det.find([2, 0, 1, 2]) == [0]  # a step before end_text; nothing after it
