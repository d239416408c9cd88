"""Convert the STEP paper's hidden-state dumps into the stepprobe HDF5 file.

The paper's ``data_hidden_state.py`` writes ``<prefix>_hiddenstates_<start>_<end>.pt``: a
``torch.save`` list with one dict per sampled response, holding ``select_hidden_states``
(float16 ``[steps, D]``: transformers' ``last_hidden_state`` at every step boundary, i.e.
stepprobe's ``final_norm`` site), ``full_input_ids``, ``question``, ``is_correct`` and more
(``full_forward_text``, ``original_response``, sometimes ``ground_truth``). (Format as
described from the paper's code; no released dump could be downloaded where this was
written.)

This stage reads every dump with ``torch.load(weights_only=True)`` only (a file that needs
full unpickling is refused in one line and nothing in it runs), groups the responses by
``question`` (one problem per question, id ``step-`` + a hash of the question, as the STEP
JSONL import of ``stepprobe record`` names it), labels every trace with ``is_correct`` and
writes the features unchanged (float16 in, float16 stored) through
:class:`~stepprobe.data_collection.hdf5.HiddenStatesWriter`, so the file is crash-safe,
resumable and read by ``sweep``, ``train``, ``tune`` and ``export`` like a recorded one. The
file has one site, ``final_norm``.

Token positions: with the model's tokenizer the paper's rule is re-run over
``full_input_ids``; when it finds as many boundaries as the dump has rows, their positions
are stored, relative to the first response token when the rebuilt paper prompt
(``stepprobe.step_paper.STEP_PROMPT``) is a prefix of the ids (prompt boundaries then have
negative positions), else from the sequence start; otherwise positions are unknown (-1).
``attrs["extra"]["positions"]`` says which. ``num_tokens`` counts the response tokens (the ids
after the rebuilt prompt); -1 where that prompt is not a prefix of the ids. The paper's rows include the prompt's blank
lines; ``--prompt-steps drop`` leaves those out (a stepprobe detector only ever sees
generated tokens), which needs response-relative positions.

Example::

    stepprobe import-step-dump --dumps 'runs/step/qwen3_hiddenstates_*.pt' \\
        --model Qwen/Qwen3-4B-Thinking-2507 --output runs/step/hidden_states.h5
    stepprobe sweep --data runs/step/hidden_states.h5 --output runs/step/sweep
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .. import locks
from ..config import StageConfig, option
from ..errors import ArtifactMismatch, StepprobeError
from ..layers import FINAL_NORM
from ..step_paper import STEP_PROMPT, model_identity_for, paper_boundary_rule
from . import hdf5

log = logging.getLogger(__name__)

DUMP_RE = re.compile(r"^(?P<prefix>.*)_hiddenstates_(?P<start>\d+)_(?P<end>\d+)\.pt$")
REQUIRED = ("select_hidden_states", "question", "is_correct")
PROMPT_STEPS = ("keep", "drop")
POSITIONS_RESPONSE = "response-relative"   # 0 = first response token, negative = inside the prompt
POSITIONS_SEQUENCE = "sequence-relative"   # index into full_input_ids
POSITIONS_UNKNOWN = "unknown"              # -1


@dataclasses.dataclass
class Config(StageConfig):
    SECTION = "import_step_dump"

    dumps: list[str] = option(help="STEP hidden-state dumps: files, folders (their *_hiddenstates_*_*.pt) or "
                                   "glob patterns, comma-separated")
    model: str = option(help="the model the dumps were made with (name, local path or HF id; config and "
                             "tokenizer are read, no weights)")
    output: str = option(help="HDF5 file to write")
    prompt_steps: str = option("keep", "keep | drop the rows of boundaries inside the prompt (the paper keeps "
                                       "them; drop needs positions the tokenizer can recover)")
    storage_dtype: str = option("auto", "auto (float16 when every dump is float16, else float32) | float16 | float32")
    compression: str | None = option(None, "HDF5 compression: none | gzip | gzip:LEVEL | lzf")
    overwrite: bool = option(False, "replace an existing output instead of resuming it")
    commit_interval_s: float = option(30.0, "commit finished problems to disk at least this often (seconds)")


# -- reading dumps ---------------------------------------------------------------------------

def find_dumps(specs: Sequence[str]) -> list[Path]:
    """Dump files from paths, folders and globs; ordered by (prefix, start index)."""
    files: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(p.glob("*_hiddenstates_*_*.pt"))
            if not found:
                raise StepprobeError(f"{p}: no *_hiddenstates_<start>_<end>.pt files in this folder")
            files += found
        elif any(c in spec for c in "*?["):
            found = sorted(Path(m) for m in glob.glob(spec))
            if not found:
                raise StepprobeError(f"no file matches {spec!r}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise StepprobeError(f"STEP hidden-state dump not found: {p}")
    if not files:
        raise StepprobeError("no STEP hidden-state dumps given (--dumps)")
    uniq = list(dict.fromkeys(f.resolve() for f in files))

    def key(f: Path) -> tuple:
        m = DUMP_RE.match(f.name)
        return (0, m["prefix"], int(m["start"]), int(m["end"])) if m else (1, f.name, 0, 0)

    uniq.sort(key=key)
    ranges: dict[str, list[tuple[int, int, str]]] = {}
    for f in uniq:
        m = DUMP_RE.match(f.name)
        if m:
            ranges.setdefault(str(f.parent / m["prefix"]), []).append((int(m["start"]), int(m["end"]), f.name))
    for rs in ranges.values():
        for (a0, a1, an), (b0, b1, bn) in zip(rs, rs[1:]):
            if b0 < a1:
                raise StepprobeError(f"dumps {an} and {bn} cover overlapping index ranges; pass one of them")
    return uniq


def read_dump(path: Path) -> list[dict[str, Any]]:
    """One dump's entries (weights-only load; tensors memory-mapped)."""
    from ..safe_load import load_torch_file

    obj = load_torch_file(path, what="STEP hidden-state dump", mmap=True,
                          hint="If you trust it, re-save it with only tensors, numbers, strings, lists and dicts.")
    if isinstance(obj, dict) and all(isinstance(v, dict) for v in obj.values()):
        obj = list(obj.values())
    if not isinstance(obj, (list, tuple)):
        raise ArtifactMismatch(f"{path}: a STEP hidden-state dump is a list of dicts; this file holds a "
                               f"{type(obj).__name__}")
    for i, e in enumerate(obj):
        if not isinstance(e, dict):
            raise ArtifactMismatch(f"{path}[{i}]: entry is a {type(e).__name__}, expected a dict")
        missing = [k for k in REQUIRED if k not in e]
        if missing:
            raise ArtifactMismatch(f"{path}[{i}]: entry lacks {', '.join(missing)} (has {', '.join(sorted(map(str, e)))})")
    return list(obj)


def _ids(value: Any) -> list[int] | None:
    if value is None:
        return None
    import torch

    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, (list, tuple)):
        flat = value[0] if len(value) == 1 and isinstance(value[0], (list, tuple)) else value
        return [int(v) for v in flat]
    return None


def _label(value: Any, where: str) -> bool:
    import torch

    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ArtifactMismatch(f"{where}: is_correct has {value.numel()} values, expected one")
        value = value.item()
    if isinstance(value, (bool, int, float, np.bool_, np.integer)) and value in (0, 1):
        return bool(value)
    raise ArtifactMismatch(f"{where}: is_correct is {value!r}, expected true/false")


@dataclasses.dataclass
class _Entry:
    where: str
    question: str
    gold: str
    label: bool
    states: Any            # torch.Tensor [steps, D]
    ids: list[int] | None
    finish_reason: str


def _entries(files: Sequence[Path], hidden: int, vocab: int) -> Iterator[_Entry]:
    import torch

    for f in files:
        dump = read_dump(f)
        log.info("%s: %d entries", f, len(dump))
        for i, e in enumerate(dump):
            where = f"{f.name}[{i}]"
            x = e["select_hidden_states"]
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                raise ArtifactMismatch(f"{where}: select_hidden_states is {type(x).__name__}, expected a float tensor")
            if x.ndim == 3 and x.shape[0] == 1:
                x = x[0]
            if x.ndim != 2:
                raise ArtifactMismatch(f"{where}: select_hidden_states has shape {list(x.shape)}, expected [steps, D]")
            if int(x.shape[1]) != hidden:
                raise ArtifactMismatch(f"{where}: select_hidden_states has D={int(x.shape[1])}, but the model has "
                                       f"hidden size {hidden}; give the model the dumps were made with")
            if not torch.isfinite(x).all():
                raise ArtifactMismatch(f"{where}: select_hidden_states holds NaN or inf")
            ids = _ids(e.get("full_input_ids"))
            if ids and (min(ids) < 0 or max(ids) >= vocab):
                raise ArtifactMismatch(f"{where}: full_input_ids go up to {max(ids)}, but the model's vocabulary has "
                                       f"{vocab} tokens; give the model the dumps were made with")
            gold = e.get("ground_truth", e.get("gold", e.get("answer", "")))
            yield _Entry(where, str(e["question"]), "" if gold is None else str(gold),
                         _label(e["is_correct"], where), x, ids, str(e.get("finish_reason", "unknown")))


# -- positions ---------------------------------------------------------------------------------

def _positions(entry: _Entry, detector: Any, prompt_ids: list[int]) -> tuple[list[int] | None, int | None]:
    """(absolute boundary positions when the rule finds one per row, prompt length when the
    rebuilt prompt is a prefix of the ids); each ``None`` when not recoverable."""
    if entry.ids is None:
        return None, None
    n = len(prompt_ids)
    plen = n if n and entry.ids[:n] == prompt_ids else None
    pos = detector.find(entry.ids)
    return (pos if len(pos) == int(entry.states.shape[0]) else None), plen


# -- the stage -------------------------------------------------------------------------------

def run(config: Config) -> Path:
    from tqdm.auto import tqdm

    from ..boundaries import BoundaryDetector, BoundaryRule, MODE_TOKEN_CONTAINS
    from .step_format import problem_id_for
    from .problems import Problem
    from .prompts import build_prompt

    if config.prompt_steps not in PROMPT_STEPS:
        raise StepprobeError(f"prompt_steps {config.prompt_steps!r}: use one of {', '.join(PROMPT_STEPS)}")
    if config.storage_dtype not in ("auto", *hdf5.STORAGE_DTYPES):
        raise StepprobeError(f"storage dtype {config.storage_dtype!r}: use auto, float16 or float32")
    hdf5.parse_compression(config.compression)
    files = find_dumps(config.dumps)
    identity, tok = model_identity_for(config.model)
    hidden = int(identity["hidden_size"])
    vocab = max(int(identity.get("vocab_size") or 0), len(tok))
    output = Path(config.output)
    locks.hold(output)  # one writer per file

    # First pass: read, check and group every entry (tensors stay memory-mapped).
    groups: dict[str, list[_Entry]] = {}
    dtypes: set[str] = set()
    for e in _entries(files, hidden, vocab):  # no bar: a refusal here stays one line
        groups.setdefault(e.question, []).append(e)
        dtypes.add(str(e.states.dtype).replace("torch.", ""))
    if not groups:
        raise StepprobeError(f"the dumps hold no entries: {', '.join(f.name for f in files)}")
    storage = config.storage_dtype
    if storage == "auto":
        storage = "float16" if dtypes == {"float16"} else "float32"
    elif storage == "float16" and dtypes - {"float16"}:
        log.warning("dumps hold %s features; float16 storage rounds them", "/".join(sorted(dtypes)))

    # Positions: the paper's rule over full_input_ids (the forwarded text ends before </think>).
    detector = BoundaryDetector.from_tokenizer(BoundaryRule("\n\n", MODE_TOKEN_CONTAINS), tok)
    info: dict[int, tuple[list[int] | None, int | None]] = {}
    for question, entries in groups.items():
        prompt = build_prompt(Problem(problem_id_for(question), question, entries[0].gold), tok, **STEP_PROMPT)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        for e in entries:
            info[id(e)] = _positions(e, detector, prompt_ids)
    n_no_rows = sum(pos is None for pos, _ in info.values())
    n_no_prompt = sum(pl is None for _, pl in info.values())
    if n_no_rows:
        origin = POSITIONS_UNKNOWN
        log.warning("token positions are unknown: for %d of %d traces the paper's rule over full_input_ids does not "
                    "give one boundary per row of select_hidden_states (or full_input_ids is missing); were the dumps "
                    "made with this model's tokenizer?", n_no_rows, len(info))
    elif n_no_prompt:
        origin = POSITIONS_SEQUENCE
        log.warning("token positions count from the sequence start: for %d of %d traces the paper's prompt, rebuilt "
                    "with this model's chat template, is not a prefix of full_input_ids (another system prompt or "
                    "template?)", n_no_prompt, len(info))
    else:
        origin = POSITIONS_RESPONSE
    drop = config.prompt_steps == "drop"
    if drop and origin != POSITIONS_RESPONSE:
        raise StepprobeError("--prompt-steps drop needs to know which rows lie in the prompt, but the positions "
                             f"are {origin} with this model's tokenizer and the paper's prompt; use keep")

    rule = paper_boundary_rule(tok, scope="response" if drop else "prompt+response")
    import_cfg = config.to_dict()
    import_cfg.update({"dumps": [str(f) for f in files], "storage_dtype": storage, "positions": origin})
    writer = hdf5.HiddenStatesWriter(
        output, sites=[FINAL_NORM], hidden_size=hidden, model=identity, boundary_rule=rule,
        # "collect": what the traces were made with, as far as known (the paper's prompt; its
        # sampling is not in a dump): a scorer exported from this file records it.
        config={"import_step_dump": import_cfg,
                "collect": {**STEP_PROMPT, "sampling_known": False, "source": "STEP paper hidden-state dumps"}},
        dtype=storage,
        compression=config.compression, overwrite=config.overwrite, num_layers=identity["num_hidden_layers"],
        commit_interval_s=config.commit_interval_s,
        extra_attrs={"source": {"format": "step-hiddenstates-pt", "files": [str(f) for f in files]},
                     "extra": {"positions": origin, "prompt_steps": config.prompt_steps}},
        match_config_keys=("import_step_dump.dumps", "import_step_dump.prompt_steps",
                           "import_step_dump.positions"))
    done_before = len(writer.done_problem_ids)
    bar = tqdm(total=sum(len(v) for v in groups.values()), desc="write", unit="trace", mininterval=1.0)
    n_dropped = 0
    try:
        for question, entries in groups.items():
            pid = problem_id_for(question)
            if pid in writer.done_problem_ids:
                bar.update(len(entries))
                continue
            records = []
            for k, e in enumerate(entries):
                pos, plen = info[id(e)]
                feats = e.states.float().numpy()
                if origin == POSITIONS_RESPONSE:
                    rel = [p - plen for p in pos]
                elif origin == POSITIONS_SEQUENCE:
                    rel = list(pos)
                else:
                    rel = [-1] * feats.shape[0]
                if drop:
                    keep = [i for i, p in enumerate(rel) if p >= 0]
                    n_dropped += len(rel) - len(keep)
                    rel, feats = [rel[i] for i in keep], feats[keep]
                n_tokens = (len(e.ids) - plen) if (e.ids is not None and plen is not None) else -1  # -1: unknown
                records.append(hdf5.TraceRecord(k, e.label, n_tokens, e.finish_reason, rel, {FINAL_NORM: feats}))
            writer.add_problem(pid, question, entries[0].gold, records)
            bar.update(len(entries))
        bar.close()
        writer.finish(complete=True)
    finally:
        bar.close()
        writer.close()
    log.info("wrote %s: %d problems (%d new), %d traces, %d steps (%s, positions %s%s) from %d dump file(s)",
             output, len(writer.done_problem_ids), len(writer.done_problem_ids) - done_before, writer.num_traces,
             writer.num_steps, storage, origin, f", {n_dropped} prompt rows dropped" if drop else "", len(files))
    return output
