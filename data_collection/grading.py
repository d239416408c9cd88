"""Grading: pull the final answer out of a completion and compare it with the gold answer.

- :func:`extract_answer` finds the final answer under a grading protocol
  (:data:`GRADING_PROTOCOLS`): by default (``boxed-or-phrase``) the last ``\\boxed{...}``
  (balanced braces) or the last "The answer is ..." / "Final answer: ..." phrase, whichever
  comes last; with ``boxed-only`` (the STEP paper's protocol) the last ``\\boxed{...}`` only.
  For multiple choice it returns the option letter (a letter in either case, ``(B)``,
  ``\\text{D}`` / ``\\textbf{D}`` / ``\\mathrm{D}``, or the text of an option; a bare letter
  is read as a letter before it is read as an option's text).
- :func:`is_correct` compares with math-verify (``2/4`` == ``0.5`` == ``\\frac{1}{2}``),
  with a time limit per comparison; letters for multiple choice.
- :func:`answers_equivalent` says whether two extracted answers are the same answer (the
  runner's majority vote merges equivalent answers with it).

math-verify's own time limit uses ``SIGALRM``; this module sets a fractional
``ITIMER_REAL`` around each comparison in the main thread. Off the main thread no signal
can be used, so the comparison runs without a limit (answers are capped at
:data:`MAX_ANSWER_CHARS`, which keeps the sympy work small). Work inside C code (a huge
integer power) cannot be interrupted by a signal either; answers with power towers or
40-digit literals are therefore compared as text only.
"""

from __future__ import annotations

import functools
import logging
import re
import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

log = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 200
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# How a trace's final answer is found; the comparison with the gold (math-verify, letters for
# multiple choice) is the same under both. Every artifact that carries correctness names the
# protocol its labels were made with (the ``grading`` option, :class:`stepprobe.options.GradingOption`).
GRADING_PROTOCOLS: dict[str, str] = {
    "boxed-or-phrase": "the last \\boxed{} or 'The answer is ...' / 'Final answer: ...' phrase, whichever comes last",
    "boxed-only": "the last \\boxed{} only, the STEP paper's protocol: a trace without one is wrong",
}
DEFAULT_GRADING = "boxed-or-phrase"

_ANSWER_PHRASE = re.compile(
    r"(?:the\s+(?:final\s+)?answer\s+is|final\s+answer\s*(?:is|:|=)|answer\s*:)\s*(?:[:=]\s*)?",
    re.IGNORECASE)
# An upper-case letter alone or before text: "B", "(B) 42", "B. 42", "**B**".
_LETTER_RE = re.compile(r"^\s*(?:\*\*)?\(?\s*([A-Z])\s*\)?(?:\*\*)?(?=$|[\s.,:;)*])")
# A lower-case letter counts only alone ("d", "(d)", "d.") or in parentheses before text ("(d) 42"):
# "a bit more" is no option.
_LOWER_LETTER_RE = re.compile(r"^\s*(?:\*\*)?(?:\(\s*([a-z])\s*\)|([a-z])\s*\)?\.?\s*(?:\*\*)?$)")
# LaTeX text wrappers models put around an option letter: \text{D}, \textbf{(D)}, \mathrm{D}.
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|textit|texttt|textrm|mathrm|mathbf|mathit|mbox|boldsymbol)\s*\{([^{}]*)\}")
_QUOTES = "\"\u201c\u201d`"


def check_grading(name: str) -> str:
    """``name`` if it is a grading protocol; otherwise a one-line error listing the known ones."""
    if name not in GRADING_PROTOCOLS:
        from ..errors import StepprobeError

        raise StepprobeError(f"unknown grading protocol {name!r}; known: {', '.join(GRADING_PROTOCOLS)}")
    return name


def grading_of(config: dict[str, Any] | None) -> str:
    """The grading protocol a saved config (an artifact's ``config``) graded with; a config
    written before the option existed graded with the default."""
    return str((config or {}).get("grading") or DEFAULT_GRADING)


class _Timeout(BaseException):
    """Raised by the alarm. Not an ``Exception``: math-verify and sympy catch ``Exception``
    internally, and an alarm that fires while they parse must not be swallowed there (the
    comparison would then run on without a limit)."""


@contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    if not seconds or seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` with balanced braces."""
    best = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            best = text[m.end():i - 1]
    if best is None:  # "\boxed 5" (no braces)
        m2 = list(re.finditer(r"\\boxed\s+([^\s$]+)", text))
        if m2:
            best = m2[-1].group(1)
    return best.strip() if best is not None else None


def _clean(ans: str) -> str:
    ans = ans.strip()
    ans = ans.split("\n")[0].strip()
    ans = re.sub(r"^\*\*|\*\*$", "", ans).strip()  # markdown bold
    # drop trailing sentence punctuation and wrapping $...$ / \( \)
    ans = re.sub(r"[.\s]+$", "", ans)
    for lo, hi in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if ans.startswith(lo) and ans.endswith(hi) and len(ans) > len(lo) + len(hi):
            ans = ans[len(lo):-len(hi)].strip()
    ans = re.sub(r"[.\s]+$", "", ans)
    return _strip_quotes(ans)


def _strip_quotes(ans: str) -> str:
    """``"16"`` / ``16"`` / ```16``` -> ``16``: quotes and backticks around or after an answer are no part of it."""
    return re.sub(r"[.\s]+$", "", ans.strip().strip(_QUOTES).strip())


def _phrase_answer(text: str) -> str | None:
    matches = list(_ANSWER_PHRASE.finditer(text))
    for m in reversed(matches):
        rest = text[m.end():]
        inner = last_boxed(rest[:MAX_ANSWER_CHARS * 2]) if "\\boxed" in rest[:20] else None
        cand = inner if inner is not None else _clean(rest)
        # "the answer is 7, because ..." -> keep the first clause when it is a plain value
        cand = re.split(r",\s+(?=[a-zA-Z]{2,})|\s+(?:because|since|as|which)\s", cand)[0].strip()
        cand = re.split(r"\.\s+(?=[A-Z])", cand)[0]  # "13. To check, ..." -> "13" (3.5 is kept)
        cand = _strip_quotes(cand)
        if cand:
            return cand[:MAX_ANSWER_CHARS]
    return None


def _unwrap_text(cand: str) -> str:
    prev = None
    while prev != cand:
        prev, cand = cand, _TEXT_WRAP.sub(r"\1", cand)
    return cand


def _to_letter(cand: str, choices: list[str]) -> str | None:
    n = len(choices)
    cand = _unwrap_text(cand)
    m = _LETTER_RE.match(cand)
    if m and _LETTERS.index(m.group(1)) < n:
        return m.group(1)
    m = _LOWER_LETTER_RE.match(cand)
    if m and _LETTERS.index((m.group(1) or m.group(2)).upper()) < n:
        return (m.group(1) or m.group(2)).upper()
    norm = _norm_text(cand)
    for i, c in enumerate(choices):
        if norm and norm == _norm_text(c):
            return _LETTERS[i]
    return None


def _norm_text(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().strip(".").strip("$")).lower()


def extract_answer(text: str, choices: list[str] | None = None, *, grading: str = DEFAULT_GRADING) -> str | None:
    """The final answer in ``text`` (a letter for multiple choice) under the protocol
    ``grading`` (:data:`GRADING_PROTOCOLS`), or ``None`` if none is given."""
    check_grading(grading)
    if not text:
        return None
    boxed = last_boxed(text)
    phrase = _phrase_answer(text) if grading == "boxed-or-phrase" else None
    # Whichever form comes last in the text is the final one.
    if boxed is not None and phrase is not None:
        cands = [boxed, phrase] if text.rfind("\\boxed") > max(m.start() for m in _ANSWER_PHRASE.finditer(text)) \
            else [phrase, boxed]
    else:
        cands = [c for c in (boxed, phrase) if c is not None]
    if choices:
        for c in cands:
            letter = _to_letter(c, choices)
            if letter:
                return letter
        return None
    for c in cands:
        c = c[:MAX_ANSWER_CHARS].strip()
        if c:
            return c
    return None


def gold_letter(gold: str, choices: list[str]) -> str | None:
    """A multiple-choice gold answer as its letter (given as letter, index, or option text)."""
    g = str(gold).strip()
    if len(g) == 1 and g.upper() in _LETTERS[:len(choices)]:
        return g.upper()
    if g.isdigit() and int(g) < len(choices):
        return _LETTERS[int(g)]
    return _to_letter(g, choices)


@functools.lru_cache(maxsize=1)
def _quiet_math_verify() -> None:
    """We give math-verify our own time limit; its one-time 'timeout is disabled' warning is noise."""
    import math_verify.grader
    import math_verify.parser

    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True


@functools.lru_cache(maxsize=65536)
def _parse(ans: str) -> tuple:
    from math_verify import parse
    from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig

    ans = ans.strip()[:MAX_ANSWER_CHARS]
    s = ans if "$" in ans or "\\(" in ans else f"${ans}$"
    cfg = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    parsed = parse(s, extraction_config=cfg, parsing_timeout=None)
    if not parsed:
        parsed = parse(ans, extraction_config=cfg, parsing_timeout=None)
    return tuple(parsed)


def _plain(s: str) -> str:
    s = s.strip().replace(",", "") if re.fullmatch(r"-?[\d,]+(\.\d+)?", s.strip()) else s.strip()
    return re.sub(r"\s+", "", s).lower()


def _too_costly(s: str) -> bool:
    """Power towers and huge literals make sympy compute in C, where no signal interrupts it."""
    return s.count("^") + s.count("**") > 2 or re.search(r"\d{40}", s) is not None


def _math_equal(a: str, b: str, timeout_s: float | None) -> bool:
    if _plain(a) == _plain(b):
        return True
    if _too_costly(a) or _too_costly(b):
        return False
    from math_verify import verify

    _quiet_math_verify()
    try:
        with _time_limit(timeout_s):
            pa, pb = _parse(a), _parse(b)
            if not pa or not pb:
                return False
            return bool(verify(list(pa), list(pb), timeout_seconds=None))
    except _Timeout:
        log.debug("math-verify comparison of %r and %r timed out after %ss", a, b, timeout_s)
        return False
    except Exception as exc:  # sympy can raise nearly anything on odd input
        log.debug("math-verify failed on %r vs %r: %s", a, b, exc)
        return False


def is_correct(extracted: str | None, gold: str, *, choices: list[str] | None = None,
               timeout_s: float = 5.0) -> bool:
    """Whether an extracted answer matches the gold answer (False when nothing was extracted)."""
    if extracted is None or gold is None:
        return False
    if choices:
        g = gold_letter(gold, choices)
        e = _to_letter(str(extracted), choices)
        return g is not None and e == g
    return _math_equal(str(gold), str(extracted), timeout_s)


def answers_equivalent(a: str | None, b: str | None, *, timeout_s: float = 5.0) -> bool:
    """Whether two extracted answers are the same answer (math-verify, symmetric)."""
    if a is None or b is None:
        return False
    if _plain(a) == _plain(b):
        return True
    return _math_equal(a, b, timeout_s) and _math_equal(b, a, timeout_s)
