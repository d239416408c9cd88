"""Concatenating hidden-states files (the shards of one run) into one self-contained file."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ...errors import ArtifactMismatch, StepprobeError
from ...provenance import check_model_identity
from .reader import HiddenStates
from .schema import (LAYOUT_SINGLE, PROBLEM_FIELDS, STEP_FIELDS, TABLES, TRACE_FIELDS, _as_table, _now,
                     _write_single, feature_path, parse_compression)

log = logging.getLogger(__name__)


def merge(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, *, overwrite: bool = False,
          compression: str | None = "same") -> Path:
    """Concatenate several files (e.g. the shards of one run) into one self-contained file.

    All inputs must share model identity, sites, hidden size, storage dtype and boundary
    rule; problem ids must be unique across them. Features are copied in bounded blocks.
    """
    output = Path(output)
    if not inputs:
        raise StepprobeError("merge needs at least one input file")
    if output.exists() and not overwrite:
        raise StepprobeError(f"{output} exists; pass overwrite to replace it")
    files: list[HiddenStates] = []
    try:
        for p in inputs:
            files.append(HiddenStates(p))
        first = files[0]
        for hs in files[1:]:
            check_model_identity(first.model, hs.model, f"hidden-states file {hs.path}")
            for key in ("sites", "mean_sites", "hidden_size", "storage_dtype", "boundary_rule"):
                if key == "mean_sites" and hs.mean_sites == first.mean_sites:
                    continue
                if hs.header.get(key) != first.header.get(key):
                    raise ArtifactMismatch(f"cannot merge {hs.path}: {key}={hs.header.get(key)!r} differs from "
                                           f"{first.path} ({first.header.get(key)!r})")
        cols: dict[str, dict[str, list[np.ndarray]]] = {t: {k: [] for k in f} for t, f in TABLES.items()}
        offsets = []  # (file, step offset)
        seen: dict[str, str] = {}
        n_steps = n_traces = n_probs = 0
        for hs in files:
            hs.validate()
            for pid in hs.problems["problem_id"]:
                if pid in seen:
                    raise ArtifactMismatch(f"problem {pid!r} is in both {seen[pid]} and {hs.path}; shards overlap")
                seen[pid] = str(hs.path)
            s, t, p = hs.steps, hs.traces, hs.problems
            for k in STEP_FIELDS:
                v = s[k]
                cols["steps"][k].append(v + n_traces if k == "trace" else v + n_probs if k == "problem" else v)
            for k in TRACE_FIELDS:
                v = t[k]
                cols["traces"][k].append(v + n_probs if k == "problem" else v + n_steps if k == "step_start" else v)
            for k in PROBLEM_FIELDS:
                cols["problems"][k].append(p[k])
            offsets.append((hs, n_steps))
            n_steps += hs.num_steps
            n_traces += hs.num_traces
            n_probs += hs.num_problems
        tables = {t: {k: np.concatenate(v) if v else np.zeros(0) for k, v in c.items()} for t, c in cols.items()}
        tables = {t: _as_table(t, c) for t, c in tables.items()}
        attrs = dict(first.header)
        attrs["layout"] = LAYOUT_SINGLE
        attrs["created"] = _now()
        attrs["complete"] = all(hs.complete for hs in files)
        attrs["merged_from"] = [{"path": str(hs.path), "shard": hs.header.get("shard"), "num_steps": hs.num_steps,
                                 "complete": hs.complete} for hs in files]
        attrs["shard"] = None
        extra = dict(attrs.get("extra") or {})
        extra.pop("parts", None)
        attrs["extra"] = extra
        if compression != "same":
            attrs["compression"] = compression or "none"

        def source(site: str, lo: int, hi: int) -> np.ndarray:
            out = []
            for hs, off in offsets:
                a, b = max(lo, off), min(hi, off + hs.num_steps)
                if a < b:
                    out.append(hs._h5()[feature_path(site)][a - off:b - off])
            return np.concatenate(out, axis=0)

        output.parent.mkdir(parents=True, exist_ok=True)
        _write_single(output, attrs, tables, source, parse_compression(attrs.get("compression")))
    finally:  # open handles must not outlive a failed write (HDF5 may crash at exit)
        for hs in files:
            hs.close()
    log.info("merged %d files into %s: %d problems, %d traces, %d steps", len(files), output, n_probs, n_traces,
             n_steps)
    return output

