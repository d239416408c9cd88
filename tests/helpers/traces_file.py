"""The one traces-file builder of the tests (``from helpers.traces_file import write_traces``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence


def write_traces(path: Path, model_path: str, problems: Sequence[tuple[str, str, str, Sequence[str]]], *,
                 model_name: str | None = None, config: dict[str, Any] | None = None, chat_template: bool = False,
                 correct: Callable[[int, int], bool] = lambda i, j: j % 2 == 0, cut_last: bool = False) -> Path:
    """A traces file in collect's format for ``model_path``'s tokenizer, one line per
    ``(problem_id, question, gold, texts)``, written line by line (so duplicate ids can be
    written, as a hand-merged file would have them). Every trace's extracted answer is the gold;
    trace ``j`` of problem ``i`` is correct when ``correct(i, j)``; ``cut_last``: the last text
    of each problem ends at max_tokens (``finish_reason="length"``). ``chat_template``: the
    prompt is the tokenizer's chat prompt (else ``Question: ...\\nAnswer:``). ``model_name``:
    the name the header gives the model (default: its path)."""
    from transformers import AutoConfig, AutoTokenizer

    from stepprobe.data_collection.traces import ProblemTraces, Trace, make_header
    from stepprobe.provenance import model_identity

    tok = AutoTokenizer.from_pretrained(model_path)
    ident = model_identity(model_name or model_path, AutoConfig.from_pretrained(model_path), tok)
    lines = [json.dumps(make_header(config or {"test": True}, ident))]
    for i, (pid, q, gold, texts) in enumerate(problems):
        if chat_template:
            prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True)
            pids = tok(prompt, add_special_tokens=False)["input_ids"]
        else:
            prompt = f"Question: {q}\nAnswer:"
            pids = tok(prompt)["input_ids"]
        traces = []
        for j, text in enumerate(texts):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            traces.append(Trace(sample_index=j, output_token_ids=ids, text=text,
                                finish_reason="length" if cut_last and j == len(texts) - 1 else "stop",
                                num_tokens=len(ids), extracted_answer=gold, correct=bool(correct(i, j))))
        lines.append(json.dumps(ProblemTraces(problem_id=pid, question=q, gold=gold, prompt_text=prompt,
                                              prompt_token_ids=pids, traces=traces).to_dict()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(path)
