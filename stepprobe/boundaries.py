"""Step boundaries: which generated token ends a reasoning step.

Following the STEP paper, reasoning text is split at a delimiter (default ``"\\n\\n"``) and
the boundary is the token that *completes* an occurrence of it. The paper's code only
counted tokens whose own text contains ``"\\n\\n"`` (right for Qwen tokenizers); many
tokenizers, the default model's among them, often write it as two ``"\\n"`` tokens. Here
a token is a boundary when an occurrence of the delimiter ends inside its text, counting
the text carried over from the previous tokens. Occurrences do not overlap (as
``str.split``): after a boundary the carry is emptied, so four ``"\\n"`` tokens are two
boundaries, like ``"a\\n\\n\\n\\nb".split("\\n\\n")`` has two splits.

Only generated tokens are ever fed to a detector: delimiters inside the prompt are not
steps. The recorder (offline, whole traces) and the vLLM runner (live, one token at a
time) both use :class:`BoundaryDetector`, so they agree token for token.

Two modes (``BoundaryRule.mode``):

- ``completes-occurrence-nonoverlapping`` (the default, above);
- ``token-contains``: the STEP paper's rule, kept for scorers and data converted from the
  paper's own artifacts (``stepprobe import-step-scorer`` / ``import-step-dump``): a token is
  a boundary when **its own text** contains the delimiter; nothing is carried between
  tokens, so ``"\n"`` + ``"\n"`` is no boundary and ``"a\n\nb\n\nc"`` in one token is one.
  With ``end_text`` (the paper: ``"</think>"``), nothing after the first occurrence of
  ``end_text`` is a boundary (the paper forwards only the text before ``</think>``); the
  occurrence is found across tokens too (a tokenizer without a ``</think>`` token), and the
  token that completes it is a boundary only when its text *before* ``end_text`` holds the
  delimiter. :func:`step_paper_rule` builds it.

What the paper's rule covers that no detector here does: the paper also counted the blank
lines of the *prompt* (its hidden states include those rows); a detector here only ever
sees generated tokens, so at run time a converted scorer scores the generated boundaries
only (docs/coming_from_step.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

from .errors import StepprobeError

DEFAULT_DELIMITER = "\n\n"
MODE_OCCURRENCE = "completes-occurrence-nonoverlapping"
MODE_TOKEN_CONTAINS = "token-contains"
MODES = (MODE_OCCURRENCE, MODE_TOKEN_CONTAINS)
STEP_PAPER_END_TEXT = "</think>"
_STOPPED = "\x00stopped"  # carry of a token-contains detector past its end_text


@dataclasses.dataclass(frozen=True)
class BoundaryRule:
    """How steps are delimited. Stored with every HDF5 file and scorer checkpoint."""

    delimiter: str = DEFAULT_DELIMITER
    mode: str = MODE_OCCURRENCE
    end_text: str | None = None

    def __post_init__(self) -> None:
        if not self.delimiter:
            raise StepprobeError("boundary delimiter must be a non-empty string")
        if self.mode not in MODES:
            raise StepprobeError(f"unknown boundary mode {self.mode!r}; known: {', '.join(MODES)}")
        if self.end_text is not None and self.mode != MODE_TOKEN_CONTAINS:
            raise StepprobeError(f"boundary end_text is only defined for mode {MODE_TOKEN_CONTAINS!r}")
        if self.end_text == "":
            raise StepprobeError("boundary end_text must be non-empty (or absent)")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"delimiter": self.delimiter, "mode": self.mode}
        if self.end_text is not None:
            d["end_text"] = self.end_text
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BoundaryRule":
        return cls(delimiter=d.get("delimiter", DEFAULT_DELIMITER), mode=d.get("mode") or MODE_OCCURRENCE,
                   end_text=d.get("end_text"))


def step_paper_rule() -> BoundaryRule:
    """The STEP paper's segmentation: a token whose own text holds ``"\n\n"``, before ``</think>``."""
    return BoundaryRule(DEFAULT_DELIMITER, MODE_TOKEN_CONTAINS, STEP_PAPER_END_TEXT)


class BoundaryDetector:
    """Streaming boundary detection over token ids, with a per-vocabulary piece table.

    ``pieces[i]`` is the decoded text of token ``i`` alone. Tokens whose text cannot take
    part in a delimiter occurrence are skipped cheaply, which keeps the live runner's
    per-token cost near zero.
    """

    def __init__(self, rule: BoundaryRule, pieces: Sequence[str]):
        self.rule = rule
        self.pieces = list(pieces)
        self._contains = rule.mode == MODE_TOKEN_CONTAINS
        if self._contains:
            # Only a token that holds the delimiter, or can take part in an end_text occurrence, matters.
            end = rule.end_text
            self.relevant_ids = frozenset(i for i, p in enumerate(self.pieces) if rule.delimiter in p
                                          or (end is not None and _touches(p, end)))
        else:
            chars = set(rule.delimiter)
            # Tokens that can contribute to a delimiter occurrence (contain any of its chars).
            self.relevant_ids = frozenset(i for i, p in enumerate(self.pieces) if chars & set(p))
        self._keep = len(rule.delimiter) - 1

    @classmethod
    def from_tokenizer(cls, rule: BoundaryRule, tokenizer: Any) -> "BoundaryDetector":
        return cls(rule, token_pieces(tokenizer))

    def step(self, carry: str, token_id: int) -> tuple[bool, str]:
        """Feed one token. Returns (is_boundary, new_carry)."""
        if self._contains:
            return self._step_contains(carry, token_id)
        if token_id not in self.relevant_ids:
            return False, ""
        piece = self.pieces[token_id]  # relevant ids are indices of self.pieces (others returned above)
        text = carry + piece
        delim = self.rule.delimiter
        # Left-to-right, non-overlapping occurrences (the carry never holds a whole one).
        end, start = -1, 0
        while (hit := text.find(delim, start)) != -1:
            end = start = hit + len(delim)
        rest = text[end:] if end != -1 else text
        return end > len(carry), rest[-self._keep:] if self._keep else ""

    def _step_contains(self, carry: str, token_id: int) -> tuple[bool, str]:
        # The carry is the tail of the text that may begin an end_text occurrence, or _STOPPED
        # once end_text was seen (then nothing is a boundary).
        if carry == _STOPPED:
            return False, carry
        if token_id not in self.relevant_ids:
            return False, ""  # such a token cannot be part of an end_text occurrence
        piece = self.pieces[token_id]  # as in step(): only ids of self.pieces get here
        end = self.rule.end_text
        if end is None:
            return self.rule.delimiter in piece, ""
        text = carry + piece
        at = text.find(end)
        if at != -1:  # the reasoning ends inside this token: only its text before end_text counts
            return self.rule.delimiter in piece[:max(0, at - len(carry))], _STOPPED
        return self.rule.delimiter in piece, text[-(len(end) - 1):] if len(end) > 1 else ""

    def find(self, token_ids: Iterable[int]) -> list[int]:
        """Positions (indices into ``token_ids``) of boundary tokens in a generated sequence."""
        carry = ""
        out = []
        for pos, tid in enumerate(token_ids):
            hit, carry = self.step(carry, int(tid))
            if hit:
                out.append(pos)
        return out

    def boundary_token_ids(self) -> list[int]:
        """Token ids that can complete a delimiter on their own or with the carry (for the record)."""
        return sorted(self.relevant_ids)


def _touches(piece: str, text: str) -> bool:
    """Whether ``piece`` can be part of an occurrence of ``text`` spread over several tokens."""
    if not piece:
        return False
    if text in piece or piece in text:
        return True
    return any(piece.endswith(text[:k]) or piece.startswith(text[-k:]) for k in range(1, len(text)))


def token_pieces(tokenizer: Any) -> list[str]:
    """Decoded text of every token id on its own."""
    n = len(tokenizer)
    return tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                  clean_up_tokenization_spaces=False)
