"""Import traces written by the STEP paper's code (JSON Lines) so they can be recorded.

Each line is one sampled response::

    {"question": "...", "response": "<think> ... </think> ... \\boxed{42}",
     "ground_truth": "42", "extracted_answer": "42"}

Lines with the same ``question`` are the samples of one problem (in file order). Optional
fields are used when present: ``correct`` / ``is_correct`` / ``label`` (otherwise the
label is ``extracted_answer`` graded against ``ground_truth`` with
:func:`stepprobe.data_collection.grading.is_correct`), ``finish_reason``, ``id`` /
``problem_id``. The prompt is rebuilt with the model's chat template
(:func:`stepprobe.data_collection.prompts.build_prompt`, question as the whole user turn, as
written) and the response is re-tokenized with the model's tokenizer the way the paper does:
the text before the first ``</think>`` on its own (the paper cuts the text there, then
tokenizes, so a final ``"\\n\\n"`` stays one token and keeps its boundary on tokenizers without
a ``</think>`` token), then ``</think>`` and the rest (:func:`tokenize_response`). When the template's
generation prompt already opens the think block (``...<think>\\n``), a leading
``<think>`` in the response is not repeated.

Problem ids are ``step-`` + a hash of the question, so they stay the same when the file
is reordered or extended (resume and sharding depend on that).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

from ..boundaries import STEP_PAPER_END_TEXT
from ..errors import StepprobeError
from .traces import ProblemTraces, Trace

log = logging.getLogger(__name__)

FORMAT = "step-jsonl"
REQUIRED = ("question", "response")
THINK_OPEN = "<think>"


def looks_like_step(record: dict[str, Any]) -> bool:
    return isinstance(record, dict) and all(k in record for k in REQUIRED) and "kind" not in record


def tokenize_response(tokenizer: Any, response: str) -> list[int]:
    """A STEP response's token ids: the text before the first ``</think>`` tokenized alone (what
    the paper forwards), then ``</think>`` with everything after it."""
    head, end, tail = response.partition(STEP_PAPER_END_TEXT)
    ids = list(tokenizer(head, add_special_tokens=False)["input_ids"]) if head else []
    if end:
        ids += tokenizer(end + tail, add_special_tokens=False)["input_ids"]
    return ids


def problem_id_for(question: str) -> str:
    return "step-" + hashlib.sha256(question.encode("utf-8")).hexdigest()[:12]


def _index(path: Path) -> dict[str, list[int]]:
    """question -> byte offsets of its lines (first pass; holds no response text)."""
    groups: dict[str, list[int]] = {}
    with open(path, "rb") as fh:
        lineno = 0
        while True:
            offset = fh.tell()
            line = fh.readline()
            if not line:
                break
            lineno += 1
            if not line.strip():
                continue
            if not line.endswith(b"\n"):
                log.warning("%s:%d: partial last line ignored", path, lineno)
                break
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise StepprobeError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not looks_like_step(rec):
                raise StepprobeError(f"{path}:{lineno}: not a STEP trace line (needs fields "
                                     f"{', '.join(REQUIRED)}; has {', '.join(sorted(rec)) if isinstance(rec, dict) else type(rec).__name__})")
            groups.setdefault(str(rec["question"]), []).append(offset)
    return groups


def _label(rec: dict[str, Any]) -> bool:
    for key in ("correct", "is_correct", "label"):
        if key in rec and rec[key] is not None:
            return bool(rec[key])
    try:
        from .grading import is_correct
    except ImportError:  # pragma: no cover - collect's grading module is part of the package
        return _math_verify_equal(rec.get("extracted_answer"), str(rec.get("ground_truth", "")))
    return is_correct(rec.get("extracted_answer"), str(rec.get("ground_truth", "")))


def _math_verify_equal(answer: Any, gold: str) -> bool:
    if answer is None:
        return False
    from math_verify import parse, verify

    return bool(verify(parse(gold), parse(str(answer))))


def _prompt(pid: str, question: str, gold: str, tokenizer: Any, system_prompt: str | None) -> str:
    """collect's :func:`~stepprobe.data_collection.prompts.build_prompt` with the question as the user turn."""
    try:
        from .problems import Problem
        from .prompts import build_prompt
    except ImportError:  # pragma: no cover - fall back to the bare chat template
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
            [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return build_prompt(Problem(pid, question, gold), tokenizer, system_prompt=system_prompt, answer_instruction="")


def read_step_jsonl(path: str | os.PathLike, tokenizer: Any, model: dict[str, Any], *,
                    system_prompt: str | None = None) -> tuple[dict[str, Any], Iterator[ProblemTraces]]:
    """A traces-like header and a stream of :class:`ProblemTraces` built from a STEP file."""
    path = Path(path)
    if not path.is_file():
        raise StepprobeError(f"STEP traces file not found: {path}")
    groups = _index(path)
    if not groups:
        raise StepprobeError(f"{path}: no STEP trace lines")
    header = {
        "kind": FORMAT,
        "config": {"source_format": FORMAT, "path": str(path.resolve()), "system_prompt": system_prompt},
        "model": model,
    }

    def problems() -> Iterator[ProblemTraces]:
        with open(path, "rb") as fh:
            for question, offsets in groups.items():
                recs = []
                for off in offsets:
                    fh.seek(off)
                    recs.append(json.loads(fh.readline()))
                first = recs[0]
                pid = str(first.get("problem_id") or first.get("id") or problem_id_for(question))
                gold = str(first.get("ground_truth", ""))
                prompt = _prompt(pid, question, gold, tokenizer, system_prompt)
                prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                traces = []
                for i, rec in enumerate(recs):
                    response = str(rec["response"])
                    if prompt.rstrip().endswith(THINK_OPEN) and response.lstrip().startswith(THINK_OPEN):
                        response = response.lstrip()[len(THINK_OPEN):].lstrip("\n")
                    ids = tokenize_response(tokenizer, response)
                    traces.append(Trace(sample_index=i, output_token_ids=list(ids), text=response,
                                        finish_reason=str(rec.get("finish_reason", "unknown")), num_tokens=len(ids),
                                        extracted_answer=rec.get("extracted_answer"), correct=_label(rec)))
                yield ProblemTraces(problem_id=pid, question=question, gold=gold, prompt_text=prompt,
                                    prompt_token_ids=list(prompt_ids), traces=traces,
                                    meta={"source_format": FORMAT})

    return header, problems()
