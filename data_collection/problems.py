"""Problems: the questions ``collect`` samples traces for.

:func:`load_problems` reads JSONL (also a ``.json`` list), CSV, or Parquet (with pyarrow)
and recognises the common shapes without configuration:

- ``{question, answer}`` (the STEP paper's AIME/HMMT/GPQA files),
- ``{problem, answer}`` (MATH-500; a ``solution`` alone is read through its last ``\\boxed{}``),
- ``{question, answer}`` with GSM8K's ``... #### 72`` answers (the gold is what follows ``####``),
- multiple choice: a ``choices``/``options`` list (or ``{"A": ..}`` mapping) with a letter,
  index or option-text answer; or a letter answer with the options written in the question
  as ``(A) ...`` / ``A. ...`` lines (the last run A, B, C, ...: a line of the question itself
  may look like an option, "C. elegans ...") or on one line as ``(A) ... (B) ...``.

The question is kept as written, surrounding whitespace included (the STEP paper's prompt is
the question as the whole user turn, unstripped); answers and options are stripped.

Field names can be given explicitly (``question_field=`` etc.). A malformed line is a
:class:`~stepprobe.errors.StepprobeError` naming the file and line; nothing is skipped
except blank lines. One problem (a JSONL line, a CSV field, a question) holds at most
``MAX_PROBLEM_CHARS`` (one million) characters; JSONL and CSV are streamed, so a longer line
is refused by its number before it is read whole.

A problem *spec* (a file or a built-in generator) is read by
:func:`stepprobe.data_collection.sources.load_problem_source`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import StepprobeError
from ..io import open_text

log = logging.getLogger(__name__)

QUESTION_FIELDS = ("question", "problem", "prompt", "input", "Question", "Problem")
ANSWER_FIELDS = ("answer", "gold", "target", "final_answer", "Answer", "correct_answer", "label")
SOLUTION_FIELDS = ("solution",)
ID_FIELDS = ("id", "problem_id", "unique_id", "idx", "qid", "ID")
CHOICE_FIELDS = ("choices", "options")
LETTERS = "ABCDEFGHIJ"

#: The most one problem may hold: a JSONL line, a CSV field, a question. Files are read line
#: by line, so a longer line is refused by its number before it is read whole (a prompt this
#: long would not fit any model's context anyway).
MAX_PROBLEM_CHARS = 1_000_000

_OPTION_LINE = re.compile(r"^\s*\(?([A-J])[).:]\s+(.+?)\s*$", re.MULTILINE)
_INLINE_OPTION = re.compile(r"\(([A-J])\)\s*(.+?)\s*(?=\([A-J]\)|$)")


@dataclasses.dataclass
class Problem:
    """One problem: an id unique within its set, the question, the gold answer, options if any."""

    problem_id: str
    question: str
    gold: str
    choices: list[str] | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def _too_long(where: str, what: str) -> StepprobeError:
    return StepprobeError(f"{where}: {what} longer than {MAX_PROBLEM_CHARS:,} characters, the limit for one problem "
                          f"(is this a problem file?)")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a text file, streamed: a line over the limit is refused by its
    number before it is read whole."""
    with open_text(path) as fh:
        lineno = 0
        while True:
            line = fh.readline(MAX_PROBLEM_CHARS + 1)
            if not line:
                return
            lineno += 1
            if len(line) > MAX_PROBLEM_CHARS and not line.endswith("\n"):
                raise _too_long(f"{path}:{lineno}", "line is")
            yield lineno, line


def _starts_with(path: Path, char: str) -> bool:
    """Whether the file's first non-blank character is ``char`` (read in small pieces)."""
    with open_text(path) as fh:
        while piece := fh.read(4096):
            if piece.strip():
                return piece.lstrip().startswith(char)
    return False


@contextlib.contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    old = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _csv_rows(reader: Any, path: Path) -> Iterator[dict]:
    try:
        yield from reader
    except csv.Error as exc:
        if "field larger than field limit" in str(exc):
            raise _too_long(f"{path}:{reader.line_num}", "a field is") from None
        raise StepprobeError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, record) pairs; line numbers are 1-based (CSV: the header is line 1)."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        if suffix == ".json" and _starts_with(path, "["):
            with open_text(path) as fh:
                text = fh.read()
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise StepprobeError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
            yield from ((i + 1, r) for i, r in enumerate(data))  # "line" = list position
            return
        for lineno, line in _lines(path):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise StepprobeError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    elif suffix in (".csv", ".tsv"):
        with open_text(path, newline="") as fh, _csv_field_limit(MAX_PROBLEM_CHARS):
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            if not reader.fieldnames:
                return
            for row in _csv_rows(reader, path):
                if None in row or any(v is None for v in row.values()):
                    count = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or [])
                    raise StepprobeError(f"{path}:{reader.line_num}: row has {count} fields, "
                                         f"the header has {len(reader.fieldnames)}")
                if not any((v or "").strip() for v in row.values()):
                    continue
                yield reader.line_num, row
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise StepprobeError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield i + 1, row
    else:
        raise StepprobeError(f"{path}: unknown problem file type {suffix!r}; use .jsonl, .json, .csv or .parquet")


def _pick(rec: dict, explicit: str | None, candidates: tuple[str, ...], what: str, where: str,
          required: bool = True) -> str | None:
    if explicit:
        if explicit not in rec:
            raise StepprobeError(f"{where}: no field {explicit!r} ({what}); fields here: {', '.join(rec)}")
        return explicit
    for c in candidates:
        if c in rec:
            return c
    if required:
        raise StepprobeError(f"{where}: no {what} field (looked for {', '.join(candidates)}; fields here: "
                             f"{', '.join(rec) or 'none'}); name it with --{what}-field")
    return None


def _as_text(value: Any, what: str, where: str, *, strip: bool = True) -> str:
    if value is None:
        raise StepprobeError(f"{where}: {what} is null")
    if isinstance(value, bool) or isinstance(value, (dict, list)):
        raise StepprobeError(f"{where}: {what} must be text or a number, got {type(value).__name__}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value)
    if not text.strip():
        raise StepprobeError(f"{where}: {what} is empty")
    return text.strip() if strip else text


def options_in_question(question: str) -> list[str] | None:
    """The options a question lists itself (GPQA-style files), in order A, B, C, ..., or ``None``:
    the last run of ``A. ..`` / ``(A) ..`` lines that starts at A, else ``(A) .. (B) ..`` on one line."""
    found = _OPTION_LINE.findall(question)
    letters = [f[0] for f in found]
    for start in reversed([i for i, c in enumerate(letters) if c == "A"]):
        if len(found) - start >= 2 and letters[start:] == list(LETTERS[:len(found) - start]):
            return [f[1] for f in found[start:]]
    for line in reversed(question.splitlines()):
        inline = _INLINE_OPTION.findall(line)
        if len(inline) >= 2 and [f[0] for f in inline] == list(LETTERS[:len(inline)]):
            return [f[1] for f in inline]
    return None


def _boxed(text: str) -> str | None:
    from .grading import last_boxed

    return last_boxed(text)


def _parse_choices(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        try:
            value = json.loads(value)  # CSV cells hold JSON lists
        except json.JSONDecodeError:
            raise StepprobeError(f"{where}: choices must be a list (or a JSON list in CSV), got {value!r}") from None
    if isinstance(value, dict):
        keys = sorted(value)
        if keys != list(LETTERS[:len(keys)]):
            raise StepprobeError(f"{where}: choice keys must be A, B, C, ...; got {', '.join(keys)}")
        value = [value[k] for k in keys]
    if not isinstance(value, list) or len(value) < 2:
        raise StepprobeError(f"{where}: choices must be a list of at least two options")
    if len(value) > len(LETTERS):
        raise StepprobeError(f"{where}: at most {len(LETTERS)} choices are supported, got {len(value)}")
    return [_as_text(v, "a choice", where) for v in value]


def _gold_to_letter(gold: str, choices: list[str], where: str) -> str:
    g = gold.strip()
    if len(g) == 1 and g.upper() in LETTERS[:len(choices)]:
        return g.upper()
    m = re.fullmatch(r"\(?([A-Ja-j])\)?", g)
    if m and m.group(1).upper() in LETTERS[:len(choices)]:
        return m.group(1).upper()
    if g.isdigit() and int(g) < len(choices):
        return LETTERS[int(g)]
    for i, c in enumerate(choices):
        if c.strip() == g:
            return LETTERS[i]
    raise StepprobeError(f"{where}: answer {gold!r} is not a letter, index or text of one of the "
                         f"{len(choices)} choices")


def _problem(rec: Any, index: int, where: str, stem: str, *, question_field: str | None,
             answer_field: str | None, id_field: str | None, choices_field: str | None) -> Problem:
    if not isinstance(rec, dict):
        raise StepprobeError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    qf = _pick(rec, question_field, QUESTION_FIELDS, "question", where)
    if isinstance(rec[qf], str) and len(rec[qf]) > MAX_PROBLEM_CHARS:  # a .json list or Parquet row
        raise _too_long(where, "the question is")
    question = _as_text(rec[qf], "the question", where, strip=False)
    meta: dict[str, Any] = {}
    af = _pick(rec, answer_field, ANSWER_FIELDS, "answer", where, required=False)
    if af is None:
        sf = _pick(rec, None, SOLUTION_FIELDS, "answer", where, required=False)
        if sf is None:
            _pick(rec, None, ANSWER_FIELDS + SOLUTION_FIELDS, "answer", where)  # raises
        solution = _as_text(rec[sf], "the solution", where)
        gold = _boxed(solution)
        if not gold:
            raise StepprobeError(f"{where}: no answer field and no \\boxed{{}} answer in {sf!r}")
        af = sf
    else:
        gold = _as_text(rec[af], "the answer", where)
    if "####" in gold:  # GSM8K: reasoning, then "#### 72"
        solution, _, final = gold.rpartition("####")
        final = final.strip().replace(",", "")
        if not final:
            raise StepprobeError(f"{where}: GSM8K-style answer has nothing after '####'")
        meta["solution"] = solution.strip()
        gold = final
    choices = None
    cf = _pick(rec, choices_field, CHOICE_FIELDS, "choices", where, required=False)
    if cf is not None:
        choices = _parse_choices(rec[cf], where)
        gold = _gold_to_letter(gold, choices, where)
    elif re.fullmatch(r"\(?[A-J]\)?", gold):
        # A letter answer with the options written into the question (GPQA-style files).
        found = options_in_question(question)
        if found:
            choices = found
            gold = _gold_to_letter(gold, choices, where)
            meta["choices_in_question"] = True
    idf = _pick(rec, id_field, ID_FIELDS, "id", where, required=False)
    pid = _as_text(rec[idf], "the id", where) if idf else f"{stem}-{index:05d}"
    used = {qf, af, cf, idf}
    for k, v in rec.items():
        if k not in used and isinstance(v, (str, int, float, bool, type(None))):
            meta.setdefault(k, v)
    return Problem(problem_id=pid, question=question, gold=gold, choices=choices, meta=meta)


def load_problems(path: str | Path, *, question_field: str | None = None, answer_field: str | None = None,
                  id_field: str | None = None, choices_field: str | None = None) -> list[Problem]:
    """Read a problem file (see the module docstring for shapes); every record must be valid."""
    path = Path(path)
    if not path.is_file():
        raise StepprobeError(f"problem file not found: {path}")
    out: list[Problem] = []
    seen: dict[str, int] = {}
    for index, (lineno, rec) in enumerate(_records(path)):
        where = f"{path}:{lineno}"
        p = _problem(rec, index, where, path.stem, question_field=question_field, answer_field=answer_field,
                     id_field=id_field, choices_field=choices_field)
        if p.problem_id in seen:
            raise StepprobeError(f"{where}: duplicate problem id {p.problem_id!r} (first at line {seen[p.problem_id]})")
        seen[p.problem_id] = lineno
        out.append(p)
    if not out:
        raise StepprobeError(f"{path}: no problems in the file")
    warn_duplicate_questions(out, str(path))
    return out


def duplicate_questions(problems: Iterable[Any]) -> dict[str, list[Any]]:
    """Question text (whitespace-normalized) -> the problems that ask it, for questions asked
    more than once."""
    by_q: dict[str, list[Any]] = {}
    for p in problems:
        by_q.setdefault(" ".join(p.question.split()), []).append(p)
    return {q: ps for q, ps in by_q.items() if len(ps) > 1}


def warn_duplicate_questions(problems: Iterable[Any], where: str) -> dict[str, list[Any]]:
    """Say (one warning) when the same question appears under several ids; the problem split
    of training keeps all of them in one split (see ``stepprobe.training.data.make_split``)."""
    dups = duplicate_questions(problems)
    if dups:
        q, ps = next(iter(dups.items()))
        golds = sorted({p.gold for p in ps})
        conflict = sum(len({p.gold for p in g}) > 1 for g in dups.values())
        log.warning("%s: %d question(s) occur under more than one problem id (e.g. %s%s)%s; training keeps "
                    "each question's problems in one split", where, len(dups), ", ".join(repr(p.problem_id)
                                                                                     for p in ps[:3]),
                    f", gold answers {golds}" if len(golds) > 1 else "",
                    f"; {conflict} of them with different gold answers" if conflict else "")
    return dups
