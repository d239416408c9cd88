"""Record step-boundary hidden states of every layer into HDF5.

Reads the traces of ``stepprobe collect`` (or the STEP paper's trace JSONL), finds the step
boundaries in each trace's *generated* tokens with the boundary rule (default: the token
that completes a "\\n\\n"), runs one teacher-forced transformers forward pass over
prompt + generated tokens (batched; GPU when there is one) and stores, for every boundary,
the hidden state at every site: ``embed``, ``layer_00``.. (residual stream after each
decoder layer) and ``final_norm``. The file's schema is in docs/hdf5_schema.md.

Before writing, the stage counts the boundaries and logs the bytes it will write. It
refuses to replace a finished file with different settings unless ``--overwrite``. A
killed run leaves a readable file with every problem committed so far; the same command
resumes it. ``--shard i/k`` records every k-th problem (offset i) into its own file;
``--merge a.h5,b.h5 --output all.h5`` joins shard files into one.

Examples::

    stepprobe record --traces runs/x/traces.jsonl --output runs/x/hidden.h5
    stepprobe record --traces traces.jsonl --output hs.h5 --shard 0/2   # -> hs.shard-0-of-2.h5
    stepprobe record --merge hs.shard-0-of-2.h5,hs.shard-1-of-2.h5 --output hs.h5
    stepprobe record --traces step_paper.jsonl --input-format step --model /path/to/model
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

from ..boundaries import DEFAULT_DELIMITER, BoundaryDetector, BoundaryRule, step_paper_rule
from ..config import StageConfig, option
from ..errors import ArtifactMismatch, StepprobeError
from .. import locks
from ..io import check_writable_dir, open_text
from ..layers import parse_sites
from ..models import identify_model
from ..options import absent_values
from ..provenance import check_model_identity
from . import hdf5
from .extractor import SiteExtractor
from .problems import warn_duplicate_questions
from .traces import ProblemTraces, read_traces

log = logging.getLogger(__name__)

INPUT_FORMATS = ("auto", "stepprobe", "step")


@dataclasses.dataclass
class Config(StageConfig):
    SECTION = "record"

    traces: str | None = option(None, "traces file from `stepprobe collect` (or a STEP-paper JSONL)")
    output: str | None = option(None, "HDF5 file to write (default: hidden_states.h5 next to the traces)")
    model: str | None = option(None, "model name or path (default: the model named in the traces header)")
    input_format: str = option("auto", "auto | stepprobe (collect's traces) | step (STEP paper JSONL)")
    dtype: str = option("auto", "compute dtype: auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16")
    storage_dtype: str = option("float16", "dtype stored in HDF5: float16 | float32")
    compression: str | None = option(None, "HDF5 compression: none | gzip | gzip:LEVEL | lzf")
    batch_size: int = option(8, "traces per forward pass")
    max_batch_tokens: int = option(32768, "upper bound on batch_size x padded length per forward pass")
    delimiter: str = option(DEFAULT_DELIMITER, "step delimiter, escapes like \\n decoded (the default is a blank line, \\n\\n)")
    boundary_rule: str = option("default", "default (a token that completes the delimiter, text carried across "
                                           "tokens) | step-paper (the STEP paper's: a token whose own text holds "
                                           "\\n\\n, nothing after </think>; docs/coming_from_step.md)")
    shard: str | None = option(None, "i/k: record only problems i, i+k, i+2k, ... (file order), into <output>.shard-i-of-k.h5")
    merge: list[str] = option(factory=list, help="instead of recording, merge these HDF5 files into --output")
    overwrite: bool = option(False, "replace an existing output file instead of resuming it")
    consolidate: bool = option(True, "at the end, turn the block files into one self-contained HDF5 file")
    commit_interval_s: float = option(30.0, "commit finished problems to disk at least this often (seconds)")
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    system_prompt: str | None = option(None, "STEP format only: system prompt for the rebuilt chat prompt")
    step_mean: str = option("", "also store each step's mean over its tokens for these sites ('' none, all, "
                                "layers, 10-20, layer_12,...): features <site>.mean", absent="")


# -- inputs -----------------------------------------------------------------------------------

def parse_shard(spec: str | None) -> tuple[int, int] | None:
    if not spec:
        return None
    try:
        i, k = (int(x) for x in str(spec).split("/"))
    except ValueError:
        raise StepprobeError(f"shard {spec!r}: expected i/k, e.g. 0/4") from None
    if k < 1 or not 0 <= i < k:
        raise StepprobeError(f"shard {spec!r}: need 0 <= i < k")
    return i, k


def shard_output(output: Path, shard: tuple[int, int] | None) -> Path:
    if shard is None:
        return output
    i, k = shard
    return output.with_name(f"{output.stem}.shard-{i}-of-{k}{output.suffix or '.h5'}")


def decode_delimiter(text: str) -> str:
    """``"\\n\\n"`` typed on a command line -> two newlines."""
    if "\\" in text:
        try:
            return codecs.decode(text, "unicode_escape")
        except UnicodeDecodeError:
            raise StepprobeError(f"delimiter {text!r}: bad escape sequence") from None
    return text


def detect_format(path: Path) -> str:
    if not path.is_file():
        raise StepprobeError(f"traces file not found: {path}")
    with open_text(path) as fh:
        first = fh.readline()
    try:
        rec = json.loads(first)
    except json.JSONDecodeError:
        raise StepprobeError(f"{path}: first line is not JSON; expected collect's traces or STEP-paper JSONL") from None
    if isinstance(rec, dict) and rec.get("kind") == "stepprobe-traces":
        return "stepprobe"
    from .step_format import looks_like_step

    if looks_like_step(rec):
        return "step"
    raise StepprobeError(f"{path}: neither collect's traces (kind stepprobe-traces) nor STEP-paper JSONL "
                         "(question/response lines)")


class _Source:
    """The input traces, opened the same way for the counting pass and the recording pass."""

    def __init__(self, path: Path, fmt: str, tokenizer: Any, model: dict[str, Any], system_prompt: str | None):
        self.path, self.fmt, self.tokenizer, self.model, self.system_prompt = path, fmt, tokenizer, model, system_prompt
        self.header, _ = self.open()

    def open(self) -> tuple[dict[str, Any], Iterator[ProblemTraces]]:
        if self.fmt == "step":
            from .step_format import read_step_jsonl

            return read_step_jsonl(self.path, self.tokenizer, self.model, system_prompt=self.system_prompt)
        return read_traces(self.path)

    def problems(self, shard: tuple[int, int] | None) -> Iterator[ProblemTraces]:
        _, probs = self.open()
        for idx, prob in enumerate(probs):
            if shard is None or idx % shard[1] == shard[0]:
                yield prob


# -- the stage -----------------------------------------------------------------------------

def _boundary_rule(config: Config) -> BoundaryRule:
    delimiter = decode_delimiter(config.delimiter)
    if config.boundary_rule == "default":
        return BoundaryRule(delimiter)
    if config.boundary_rule == "step-paper":
        if delimiter != DEFAULT_DELIMITER:
            raise StepprobeError(f"the step-paper boundary rule splits at \\n\\n; drop --delimiter {config.delimiter!r}")
        return step_paper_rule()
    raise StepprobeError(f"unknown boundary rule {config.boundary_rule!r}; known: default, step-paper")


@dataclasses.dataclass
class _Asked:
    problem_id: str
    question: str
    gold: str


def check_free_space(output: Path, features: int, *, consolidate: bool) -> None:
    """Refuse (one line) a run whose peak on disk does not fit. The block files hold every
    feature once; consolidating them into one file writes a second copy before the blocks are
    removed, so the peak is twice the features. What an earlier run of this output already
    wrote counts as written (a resumed run, or an overwrite that first removes it)."""
    on_disk = output.stat().st_size if output.is_file() else 0
    pdir = hdf5.parts_dir(output)
    if pdir.is_dir():
        on_disk += sum(f.stat().st_size for f in pdir.iterdir() if f.is_file())
    peak = features * (2 if consolidate else 1)
    need = max(0, peak - on_disk)
    free = shutil.disk_usage(output.parent if output.parent.exists() else Path.cwd()).free
    if need > free:
        how = (f"{hdf5.human_bytes(features)} of features, and as much again while the blocks are merged into one "
               f"file (--no-consolidate needs only the first)" if consolidate else
               f"{hdf5.human_bytes(features)} of features")
        raise StepprobeError(f"about {hdf5.human_bytes(need)} needed ({how}) but only {hdf5.human_bytes(free)} "
                             f"free at {output.parent}")


def _default_output(traces: Path) -> Path:
    return traces.with_name("hidden_states.h5")


#: The record settings a resumed file must share with this run (besides collect's config, and
#: what the writer compares itself: model, sites, hidden size, storage dtype, boundary rule).
RESUME_KEYS = ("dtype", "input_format", "shard", "traces", "step_mean")


@dataclasses.dataclass
class _Plan:
    """What the counting pass found: the inputs, the output and the sizes."""

    source: _Source
    shard: tuple[int, int] | None
    output: Path
    model_path: str
    identity: dict[str, Any]
    tokenizer: Any
    detector: BoundaryDetector
    boundary_rule: dict[str, Any]
    file_config: dict[str, Any]
    mean_sites: list[str]
    n_problems: int
    n_traces: int
    est_bytes: int


def run(config: Config) -> Path:
    if config.merge:
        if not config.output:
            raise StepprobeError("--merge needs --output")
        locks.hold(config.output)
        return hdf5.merge(config.merge, config.output, overwrite=config.overwrite)
    if not config.traces:
        raise StepprobeError("--traces is required (or --merge to join shard files)")
    t_start = time.monotonic()
    plan = _plan(config)
    output = plan.output
    if output.exists() and not config.overwrite and _already_complete(plan):
        return output
    check_free_space(output, plan.est_bytes, consolidate=config.consolidate)
    writer, done_before, t_forward = _record(config, plan)
    elapsed = time.monotonic() - t_start
    size = output.stat().st_size + sum(f.stat().st_size for f in hdf5.parts_dir(output).glob("*.h5")) \
        if hdf5.parts_dir(output).is_dir() else output.stat().st_size
    log.info("wrote %s: %d problems (%d new), %d traces, %d steps, %s on disk, %.1f s (forward %.1f s)",
             output, len(writer.done_problem_ids), len(writer.done_problem_ids) - done_before, writer.num_traces,
             writer.num_steps, hdf5.human_bytes(size), elapsed, t_forward)
    return output


def _plan(config: Config) -> _Plan:
    """Inputs, model and output checked, then the counting pass: boundaries per trace decide
    the bytes to write. Refuses a duplicate problem id before anything is written."""
    traces_path = Path(config.traces)
    fmt = config.input_format if config.input_format != "auto" else detect_format(traces_path)
    if fmt not in INPUT_FORMATS[1:]:
        raise StepprobeError(f"input format {fmt!r}: use one of {', '.join(INPUT_FORMATS)}")
    shard = parse_shard(config.shard)
    output = shard_output(Path(config.output) if config.output else _default_output(traces_path), shard)
    check_writable_dir(output.parent, "--output")
    locks.hold(output)  # one writer per file (and its parts); each --shard writes a file of its own
    storage_dtype = hdf5._check_dtype(config.storage_dtype)
    hdf5.parse_compression(config.compression)
    if config.batch_size < 1 or config.max_batch_tokens < 1:
        raise StepprobeError("batch_size and max_batch_tokens must be positive")
    rule = _boundary_rule(config)

    # Model: the one the traces were generated with, unless told otherwise.
    traces_header = read_traces(traces_path)[0] if fmt == "stepprobe" else {}
    traces_model = traces_header.get("model") or {}
    model_path, identity, tokenizer = identify_model(config.model or traces_model.get("name"))
    if traces_model:
        check_model_identity(traces_model, identity, f"traces {traces_path}")
    source = _Source(traces_path, fmt, tokenizer, identity, config.system_prompt)
    detector = BoundaryDetector.from_tokenizer(rule, tokenizer)
    record_cfg = config.to_dict()
    record_cfg.update({"input_format": fmt, "output": str(output), "model_path": model_path,
                       "traces": str(traces_path.resolve())})

    mean_sites = parse_sites(config.step_mean, identity["num_hidden_layers"]) if config.step_mean else []
    if any(s.endswith(".mean") for s in mean_sites):
        raise StepprobeError(f"--step-mean takes sites (all, layers, 10-20, ...), got {config.step_mean!r}")
    sites_n = identity["num_hidden_layers"] + 2 + len(mean_sites)
    hidden = identity["hidden_size"]
    n_problems = n_traces = n_steps = 0
    asked = []
    for prob in source.problems(shard):
        n_problems += 1
        asked.append(_Asked(prob.problem_id, prob.question, prob.gold))
        for t in prob.traces:
            n_traces += 1
            n_steps += len(detector.find(t.output_token_ids))
    warn_duplicate_questions(asked, str(traces_path))
    if n_steps == 0:
        raise StepprobeError(f"{traces_path}: {n_problems} problems, {n_traces} traces, but no step boundary "
                             f"(delimiter {rule.delimiter!r}) in any trace; nothing to record (check --delimiter)")
    est = hdf5.estimate_bytes(n_steps, sites_n, hidden, storage_dtype)
    log.info("%s: %d problems, %d traces, %d step boundaries -> about %s of features (%d sites x %d x %s)%s",
             traces_path, n_problems, n_traces, n_steps, hdf5.human_bytes(est), sites_n, hidden, storage_dtype,
             f" for shard {shard[0]}/{shard[1]}" if shard else "")
    return _Plan(source=source, shard=shard, output=output, model_path=model_path, identity=identity,
                 tokenizer=tokenizer, detector=detector,
                 boundary_rule={**rule.to_dict(), "token_ids": detector.boundary_token_ids(),
                                "scope": "generated-tokens"},
                 file_config={"collect": source.header.get("config", {}), "record": record_cfg},
                 mean_sites=mean_sites, n_problems=n_problems, n_traces=n_traces, est_bytes=est)


def _already_complete(plan: _Plan) -> bool:
    """An existing output: refuse it when made with other settings (:data:`RESUME_KEYS`, before the
    model loads); True when it already holds every problem of this run."""
    output = plan.output
    old = hdf5.HiddenStates(output)
    try:
        saved = old.header.get("config") or {}
        old_rec = {**absent_values(Config), **(saved.get("record") or {})}
        mine = plan.file_config
        for key, theirs, ours in [("collect", saved.get("collect"), mine["collect"]),
                                  *((f"record.{k}", old_rec.get(k), mine["record"].get(k)) for k in RESUME_KEYS)]:
            if theirs != ours:
                raise ArtifactMismatch(f"{output} exists and was recorded with {key}={theirs!r} "
                                       f"(this run: {ours!r}); pass --overwrite or a new --output")
        if old.complete and old.layout == hdf5.LAYOUT_SINGLE and old.num_problems >= plan.n_problems:
            have = set(map(str, old.problems["problem_id"]))
            if all(p.problem_id in have for p in plan.source.problems(plan.shard)):
                log.info("%s is complete (%d problems, %d steps); nothing to do (pass --overwrite to redo it)",
                         output, old.num_problems, old.num_steps)
                return True
        return False
    finally:
        old.close()


def _record(config: Config, plan: _Plan) -> tuple[hdf5.HiddenStatesWriter, int, float]:
    """Forward the traces in windows and write each problem as it is done; returns the writer,
    the problems it held before and the seconds spent in forward passes."""
    identity, shard = plan.identity, plan.shard
    extractor = SiteExtractor(plan.model_path, dtype=config.dtype, device=config.device, mean_sites=plan.mean_sites)
    hidden = identity["hidden_size"]
    if extractor.num_layers != identity["num_hidden_layers"] or extractor.hidden_size != hidden:
        raise ArtifactMismatch(f"model {plan.model_path} has {extractor.num_layers} layers / hidden "
                               f"{extractor.hidden_size}, its config says {identity['num_hidden_layers']} / {hidden}")
    plan.file_config["record"]["compute_dtype"] = extractor.dtype_name
    plan.file_config["record"]["device"] = str(extractor.device)
    writer = hdf5.HiddenStatesWriter(
        plan.output, sites=extractor.sites, hidden_size=hidden, model=identity, boundary_rule=plan.boundary_rule,
        config=plan.file_config, dtype=config.storage_dtype, compression=config.compression,
        overwrite=config.overwrite, num_layers=extractor.num_layers, commit_interval_s=config.commit_interval_s,
        mean_sites=plan.mean_sites,
        extra_attrs={"shard": f"{shard[0]}/{shard[1]}" if shard else None,
                     "source": {"path": str(plan.source.path.resolve()), "format": plan.source.fmt}})
    tokenizer = plan.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    done_before = len(writer.done_problem_ids)
    t_forward = 0.0
    from tqdm.auto import tqdm

    bar = tqdm(total=plan.n_traces, unit="trace", desc="record", mininterval=1.0)
    window = max(config.batch_size * 4, 1)
    pending: list[ProblemTraces] = []
    n_pending = 0
    try:
        for prob in _chain(plan.source.problems(shard)):
            if prob is not None:
                if prob.problem_id in writer.done_problem_ids:
                    bar.update(len(prob.traces))
                    continue
                pending.append(prob)
                n_pending += len(prob.traces)
                if n_pending < window:
                    continue
            if not pending:
                continue
            t0 = time.monotonic()
            records = _record_window(pending, extractor, plan.detector, config, pad_id)
            t_forward += time.monotonic() - t0
            for p, recs in zip(pending, records):
                writer.add_problem(p.problem_id, p.question, p.gold, recs)
                bar.update(len(recs))
            bar.set_postfix(steps=writer.num_steps)
            pending, n_pending = [], 0
        bar.close()
        writer.finish(complete=True, consolidate=config.consolidate)
    finally:
        bar.close()
        writer.close()
        extractor.close()
    return writer, done_before, t_forward


def _chain(it: Iterator[ProblemTraces]) -> Iterator[ProblemTraces | None]:
    """The problems, then one ``None`` that flushes the last window."""
    yield from it
    yield None


def _record_window(problems: list[ProblemTraces], extractor: SiteExtractor, detector: BoundaryDetector,
                   config: Config, pad_id: int) -> list[list[hdf5.TraceRecord]]:
    """Forward every trace with boundaries (length-sorted batches); TraceRecords per problem."""
    jobs = []  # (problem idx, trace idx, full ids, absolute positions, first generated position)
    out: list[list[Any]] = []
    for pi, prob in enumerate(problems):
        out.append([None] * len(prob.traces))
        n_prompt = len(prob.prompt_token_ids)
        for ti, t in enumerate(prob.traces):
            pos = detector.find(t.output_token_ids)
            if pos:
                jobs.append((pi, ti, list(prob.prompt_token_ids) + list(t.output_token_ids),
                             [n_prompt + p for p in pos], n_prompt))
            out[pi][ti] = (t, pos, None)
    jobs.sort(key=lambda j: len(j[2]))
    i = 0
    while i < len(jobs):
        j = i + 1
        while (j < len(jobs) and j - i < config.batch_size
               and (j - i + 1) * len(jobs[j][2]) <= config.max_batch_tokens):
            j += 1
        batch = jobs[i:j]
        feats = extractor.extract([b[2] for b in batch], [b[3] for b in batch], pad_id=pad_id,
                                  starts=[b[4] for b in batch])
        for (pi, ti, _, _, _), f in zip(batch, feats):
            t, pos, _ = out[pi][ti]
            out[pi][ti] = (t, pos, f)
        i = j
    records = []
    for row in out:
        recs = []
        for t, pos, f in row:
            recs.append(hdf5.TraceRecord(t.sample_index, t.correct, t.num_tokens, t.finish_reason, pos, f or {}))
        records.append(recs)
    return records
