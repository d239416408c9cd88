"""Sample N traces per problem with vLLM, grade them, and write a resumable traces file.

Problems come from a file (JSONL/JSON/CSV/Parquet; common shapes detected) or from the
built-in generator (``--problems builtin`` or ``builtin:n=300,seed=0,families=add+sub,levels=1+2``).
Each problem is turned into a chat prompt (system prompt + question + answer instruction),
``chunk_size`` problems at a time are submitted to the engine together (N samples each, one
batch as in a ``generate`` call), and each problem is graded (``--grading``: ``\\boxed{}`` /
"The answer is ..." by default, ``\\boxed{}`` only with ``boxed-only``; option letters;
compared with math-verify) and appended to the traces file as soon
as its N samples finish, while the rest of its chunk is still generating.

Rerunning the same command resumes: finished problems are kept and not redone; a partial
last line from a killed run is cut off; a larger ``--limit`` extends the file. A kill
loses only the problems still generating. Lines are in the order problems finish. ``--overwrite``
starts afresh. A summary (sample
accuracy, majority-vote accuracy, pass@N, tokens, traces/s) is logged and saved as JSON
beside the traces file (``<traces stem>.summary.json``).

The engine is seeded once (``LLM(seed=...)``); per-request seeds crash vLLM's CPU build
with several prompts, so they are not used. A resumed run therefore draws different (but
equally valid) samples for the remaining problems than an uninterrupted run would.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable

from ..config import StageConfig, option
from ..errors import StepprobeError
from .. import locks
from ..io import atomic_write_json, check_writable_dir
from ..engine import check_context, engine_kwargs, make_llm, shutdown
from ..models import DEFAULT_MODEL, identify_model, model_display_name
from ..paths import runs_dir, traces_summary_path as summary_path
from ..options import (BUILTIN_PROMPT, BUILTIN_SAMPLING, EngineOptions, GradingOption, PromptOptions, SamplingOptions,
                       absent_values, resume_keys)
from ..provenance import package_versions
from ..voting import Ballot, vote
from .grading import DEFAULT_GRADING, extract_answer, is_correct
from .problems import Problem
from .sources import load_problem_source
from .prompts import build_prompts
from .traces import ProblemTraces, Trace, TraceWriter, make_header, read_traces

log = logging.getLogger(__name__)

SUMMARY_KIND = "stepprobe-collect-summary"
SUMMARY_SCHEMA_VERSION = 1


@dataclasses.dataclass
class Config(StageConfig, PromptOptions, SamplingOptions, EngineOptions, GradingOption):
    """``stepprobe collect`` options (prompt, sampling, engine and grading groups: ``stepprobe.options``).

    ``None`` prompt and sampling fields become the built-in defaults here, so the traces
    file (and every artifact made from it) records the values the data was made with.
    """

    SECTION = "collect"

    problems: str = option("builtin", "problem file (.jsonl/.json/.csv/.parquet) or builtin[:n=400,seed=0,"
                                      "families=add+sub,levels=1+2]")
    question_field: str | None = option(None, "question field name in the problem file (default: detected)")
    answer_field: str | None = option(None, "answer field name in the problem file (default: detected)")
    id_field: str | None = option(None, "id field name in the problem file (default: detected, else line index)")
    choices_field: str | None = option(None, "multiple-choice options field (default: detected)")
    # A rerun with a larger limit extends the file.
    limit: int | None = option(None, "use only the first LIMIT problems", resume_ok=True)
    output: str | None = option(None, "traces file (default: $STEPPROBE_HOME/runs/collect/<model>_<problems>_"
                                      "n<N>_s<seed>/traces.jsonl)", resume_ok=True)
    overwrite: bool = option(False, "start afresh instead of resuming an existing traces file", resume_ok=True)
    chunk_size: int = option(32, "problems submitted to the engine together (one batch; each is written as soon "
                                 "as its samples finish)",
                             resume_ok=True)
    grade_timeout_s: float = option(5.0, "time limit per math-verify comparison (seconds)", resume_ok=True)

    def resolve(self) -> None:
        # collect makes the data: "from the data" means the built-in defaults here.
        if self.model is None:
            self.model = DEFAULT_MODEL
        for name, value in {**BUILTIN_PROMPT, **BUILTIN_SAMPLING}.items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def check(self) -> None:
        if self.chunk_size < 1:
            raise StepprobeError(f"chunk_size must be at least 1, got {self.chunk_size}")
        if self.limit is not None and self.limit < 1:
            raise StepprobeError(f"limit must be at least 1, got {self.limit}")


RESUME_KEYS = resume_keys(Config)


def _slug(text: str) -> str:
    text = os.path.basename(str(text).rstrip("/")) or str(text)
    return re.sub(r"[^A-Za-z0-9.=+-]+", "-", text).strip("-")[:60] or "x"


def default_output(config: Config) -> Path:
    name = f"{_slug(model_display_name(config.model))}_{_slug(config.problems)}_n{config.n}_s{config.seed}"
    return runs_dir() / "collect" / name / "traces.jsonl"


def _llm_model_path(llm: Any) -> str | None:
    try:
        return str(llm.llm_engine.model_config.model)
    except AttributeError:
        return None


def sampling_params(config: Config):
    from vllm import SamplingParams

    return SamplingParams(n=config.n, **config.sampling_kwargs())


def load_config_problems(config: Config) -> list[Problem]:
    problems = load_problem_source(config.problems, question_field=config.question_field,
                                   answer_field=config.answer_field, id_field=config.id_field,
                                   choices_field=config.choices_field)
    return problems[:config.limit] if config.limit else problems


def majority_vote(answers: Iterable[str | None]) -> str | None:
    """The most common answer, merging math-equivalent ones; ties go to the first seen
    (:func:`stepprobe.voting.vote`, the vote ``run`` and ``bench`` report)."""
    return vote([Ballot(a) for a in answers], "majority").answer


def grade_problem(problem: Problem, prompt_text: str, output: Any, *, timeout_s: float,
                  timing: dict[str, float], grading: str = DEFAULT_GRADING) -> ProblemTraces:
    """A vLLM ``RequestOutput`` for ``problem`` -> :class:`ProblemTraces` graded with the protocol ``grading``."""
    traces = []
    for i, c in enumerate(output.outputs):
        extracted = extract_answer(c.text, problem.choices, grading=grading)
        traces.append(Trace(sample_index=i, output_token_ids=list(c.token_ids), text=c.text,
                            finish_reason=str(c.finish_reason), num_tokens=len(c.token_ids),
                            extracted_answer=extracted,
                            correct=is_correct(extracted, problem.gold, choices=problem.choices, timeout_s=timeout_s)))
    return ProblemTraces(problem_id=problem.problem_id, question=problem.question, gold=problem.gold,
                         prompt_text=prompt_text, prompt_token_ids=list(output.prompt_token_ids or []),
                         traces=traces, choices=problem.choices, timing=timing, meta=problem.meta)


def summarize(problems: Iterable[ProblemTraces]) -> dict[str, Any]:
    """Accuracy figures over a traces file's problems."""
    n_prob = n_traces = n_correct = n_extracted = pass_any = maj_correct = 0
    tokens = tok_right = tok_wrong = n_right = 0
    finish: collections.Counter = collections.Counter()
    fam: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for p in problems:
        n_prob += 1
        oks = [t.correct for t in p.traces]
        n_traces += len(oks)
        n_correct += sum(oks)
        pass_any += any(oks)
        n_extracted += sum(t.extracted_answer is not None for t in p.traces)
        for t in p.traces:
            tokens += t.num_tokens
            finish[t.finish_reason] += 1
            if t.correct:
                tok_right += t.num_tokens
                n_right += 1
            else:
                tok_wrong += t.num_tokens
        voted = majority_vote(t.extracted_answer for t in p.traces)
        maj_correct += is_correct(voted, p.gold, choices=p.choices)
        family = p.meta.get("family")
        if family is not None:
            key = f"{family}/L{p.meta.get('level')}" if p.meta.get("level") is not None else str(family)
            fam[key][0] += len(oks)
            fam[key][1] += sum(oks)

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 4) if b else None

    return {
        "problems": n_prob,
        "traces": n_traces,
        "sample_accuracy": ratio(n_correct, n_traces),
        "majority_vote_accuracy": ratio(maj_correct, n_prob),
        "pass_at_n": ratio(pass_any, n_prob),
        "answer_extracted_rate": ratio(n_extracted, n_traces),
        "tokens_total": tokens,
        "tokens_mean": ratio(tokens, n_traces),
        "tokens_mean_correct": ratio(tok_right, n_right),
        "tokens_mean_incorrect": ratio(tok_wrong, n_traces - n_right),
        "finish_reasons": dict(finish),
        "sample_accuracy_by_family": {k: round(v[1] / v[0], 4) for k, v in sorted(fam.items())},
    }


def run(config: Config, llm: Any = None) -> dict[str, Any]:
    """Collect (or resume) the traces file for ``config``; returns the summary."""
    problems = load_config_problems(config)
    out = Path(config.output) if config.output else default_output(config)
    model_path, identity, tokenizer = identify_model(config.model)
    header = make_header(config.to_dict(), identity, model_path=model_path, num_problems=len(problems))
    check_writable_dir(out.parent, "--output")
    locks.hold(out)  # one writer per traces file, for the whole run
    prompt_lens = [len(tokenizer(q, add_special_tokens=False)["input_ids"])
                   for q in build_prompts(problems, tokenizer, config)]
    check_context(prompt_lens, config.max_tokens, config.max_model_len)

    with TraceWriter(out, header, overwrite=config.overwrite, match_keys=RESUME_KEYS,
                     absent=absent_values(Config)) as writer:
        todo = [p for p in problems if p.problem_id not in writer.done_ids]
        unknown = writer.done_ids - {p.problem_id for p in problems}
        if unknown:
            within = f"{config.problems!r}" + (f" with limit {config.limit}" if config.limit else "")
            raise StepprobeError(f"{out} holds problems that are not in {within} "
                                 f"(e.g. {sorted(unknown)[0]!r}); pass a new output or --overwrite")
        if writer.done_ids:
            log.info("resuming %s: %d of %d problems already done", out, len(writer.done_ids), len(problems))
        stats = {"traces": 0, "tokens": 0, "seconds": 0.0}
        own_llm = None
        if todo:
            if llm is None:
                llm = own_llm = make_llm(model_path, engine_kwargs(config, seed=config.seed))
            else:
                given = _llm_model_path(llm)
                if given is not None and os.path.realpath(given) != os.path.realpath(model_path) and given != model_path:
                    raise StepprobeError(f"the engine passed to collect serves {given}, the config asks for {model_path}")
            try:
                stats = _generate(config, llm, tokenizer, todo, writer, total=len(problems))
            finally:
                if own_llm is not None:  # an engine we started must not outlive the stage (pipeline)
                    shutdown(own_llm)
        else:
            log.info("%s already holds all %d problems; nothing to generate", out, len(problems))

    header_read, probs = read_traces(out)
    summary = summarize(probs)
    summary.update({
        "grading": config.grading,  # the protocol every correct/accuracy figure here was graded with
        "this_run": {
            "traces_generated": stats["traces"],
            "output_tokens": stats["tokens"],
            "generate_seconds": round(stats["seconds"], 2),
            "traces_per_s": round(stats["traces"] / stats["seconds"], 3) if stats["seconds"] else None,
            "output_tokens_per_s": round(stats["tokens"] / stats["seconds"], 1) if stats["seconds"] else None,
        },
    })
    record = {"kind": SUMMARY_KIND, "schema_version": SUMMARY_SCHEMA_VERSION, "traces": str(out),
              **summary, "config": config.to_dict(), "model": identity, "packages": package_versions()}
    atomic_write_json(summary_path(out), record)
    _log_summary(out, summary)
    return record


def _generate(config: Config, llm: Any, tokenizer: Any, todo: list[Problem], writer: TraceWriter,
              total: int) -> dict[str, Any]:
    """Generate, grade and write ``todo``, ``chunk_size`` problems per submission. Each
    problem is written as soon as its ``n`` samples finish (the chunk's other problems still
    generating), so a kill loses only the problems in flight.

    Per problem, ``timing`` holds ``finished_after_s`` (seconds from its chunk's submission
    until its last sample finished), ``generate_s`` (an estimate of the engine time it cost:
    its output tokens times the engine's mean seconds per output token over its chunk until it
    finished, i.e. ``finished_after_s * its tokens / all output tokens the engine had made for
    the chunk by then``; over a chunk they add up to about the chunk's generate time),
    ``chunk_problems`` and ``grade_s``."""
    import contextlib

    from tqdm.auto import tqdm

    from ..engine import output_tokens_in_flight, stream_requests

    params = sampling_params(config)
    stats = {"traces": 0, "tokens": 0, "seconds": 0.0}
    done_before = total - len(todo)
    bar = tqdm(total=total * config.n, initial=done_before * config.n, unit="trace", desc="collect",
               dynamic_ncols=True)
    try:
        for start in range(0, len(todo), config.chunk_size):
            chunk = todo[start:start + config.chunk_size]
            prompts = build_prompts(chunk, tokenizer, config)
            handed_back = 0  # output tokens of the chunk's problems already written
            t0 = time.perf_counter()
            with contextlib.closing(stream_requests(llm, prompts, params)) as stream:
                for finished in stream:
                    now = time.perf_counter() - t0
                    handed_back += sum(len(c.token_ids) for _, o in finished for c in o.outputs)
                    in_flight = output_tokens_in_flight(llm)
                    made = handed_back + (in_flight or 0)
                    for k, output in finished:
                        out_tokens = sum(len(c.token_ids) for c in output.outputs)
                        g0 = time.perf_counter()
                        timing = {"finished_after_s": round(now, 4), "chunk_problems": len(chunk),
                                  "generate_s": round(now * out_tokens / made, 4) if made else 0.0}
                        pt = grade_problem(chunk[k], prompts[k], output, timeout_s=config.grade_timeout_s,
                                           timing=timing, grading=config.grading)
                        pt.timing["grade_s"] = round(time.perf_counter() - g0, 4)
                        writer.write(pt)  # durable now (flushed and fsync'ed)
                        stats["traces"] += len(pt.traces)
                        stats["tokens"] += out_tokens
                        bar.update(config.n)
                    bar.set_postfix(tok_s=f"{stats['tokens'] / max(stats['seconds'] + now, 1e-9):.0f}")
            stats["seconds"] += time.perf_counter() - t0
    finally:
        bar.close()
    return stats


def _log_summary(out: Path, s: dict[str, Any]) -> None:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    r = s["this_run"]
    log.info("collect: %d problems x %d traces -> %s", s["problems"], s["traces"] // max(s["problems"], 1), out)
    log.info("sample accuracy %s | majority vote %s | pass@N %s | answer extracted %s (grading %s)",
             pct(s["sample_accuracy"]), pct(s["majority_vote_accuracy"]), pct(s["pass_at_n"]),
             pct(s["answer_extracted_rate"]), s["grading"])
    log.info("tokens: %d total, %.1f mean per trace (correct %s, incorrect %s)", s["tokens_total"],
             s["tokens_mean"] or 0, s["tokens_mean_correct"], s["tokens_mean_incorrect"])
    if r["traces_generated"]:
        log.info("this run: %d traces in %.1f s generate time: %.2f traces/s, %.0f output tokens/s",
                 r["traces_generated"], r["generate_seconds"], r["traces_per_s"], r["output_tokens_per_s"])
    log.info("summary: %s", summary_path(out))
