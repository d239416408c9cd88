"""Writing hidden-states files: in one go, or incrementally (parts, commit, resume).

Crash safety: HDF5 itself is not safe against a kill in the middle of a write, so the
writer never modifies a file that a reader could see. Each block of finished problems is
written to a new part file, closed, fsync'ed and renamed into place; then the index is
rewritten to a temporary file and atomically renamed over the output. A kill at any
point leaves the previous index, which names only complete part files. Reopening the
same path with :class:`HiddenStatesWriter` resumes: ``done_problem_ids`` lists what is
already there, and stray part files of the killed run are removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ...errors import ArtifactMismatch, StepprobeError
from ...layers import is_step_mean, site_depth, split_feature
from ...provenance import check_model_identity
from .reader import HiddenStates
from .schema import (FEATURE_GROUP, KIND, LAYOUT_PARTS, LAYOUT_SINGLE, MEAN_GROUP, _as_table, _base_attrs,
                     _check_consistency, _check_dtype, _create_feature_dataset, _empty_tables, _encode_attr, create_h5,
                     _fsync_path, _h5py, _infer_num_layers, _step_start, _write_single, _write_tables, estimate_bytes,
                     feature_names, feature_path, parse_compression, parts_dir)

log = logging.getLogger(__name__)


def write_arrays(path: str | os.PathLike, *, features: dict[str, np.ndarray], steps: dict[str, Any],
                 traces: dict[str, Any], problems: dict[str, Any], model: dict[str, Any],
                 boundary_rule: dict[str, Any], config: dict[str, Any] | None = None, dtype: str = "float16",
                 compression: str | None = None, overwrite: bool = True, complete: bool = True) -> Path:
    """Write a whole file in one go (tests, synthetic data, small conversions).

    ``features`` maps site names (see :mod:`stepprobe.layers`) to ``[num_steps, hidden]``
    arrays in step-row order; ``<site>.mean`` keys are the step means of recorded sites. ``traces.step_start`` and ``steps.rel_position`` may be
    left out; they are derived.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise StepprobeError(f"{path} exists; pass overwrite=True to replace it")
    dtype = _check_dtype(dtype)
    if not features:
        raise StepprobeError("write_arrays needs at least one feature site")
    sites = [k for k in features if not is_step_mean(k)]
    mean_sites = [split_feature(k)[0] for k in features if is_step_mean(k)]
    arrays = {s: np.asarray(a) for s, a in features.items()}
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise StepprobeError(f"features must all be [num_steps, hidden] arrays of one shape, got {sorted(shapes)}")
    n, hidden = next(iter(shapes))
    steps = dict(steps)
    traces = dict(traces)
    if "rel_position" not in steps and "step" in steps and "trace" in steps and "num_steps" in traces:
        ns = np.asarray(traces["num_steps"])[np.asarray(steps["trace"], dtype=np.int64)]
        steps["rel_position"] = np.asarray(steps["step"]) / np.maximum(ns, 1)
    tables = {"steps": _as_table("steps", steps, n), "traces": _as_table("traces", traces),
              "problems": _as_table("problems", problems)}
    if "step_start" not in tables["traces"]:
        tables["traces"]["step_start"] = _step_start(tables["traces"]["num_steps"])
    _check_consistency(tables, str(path))
    num_layers = int(model.get("num_hidden_layers") or _infer_num_layers(sites))
    for s in sites:
        site_depth(s, max(num_layers, 1))
    attrs = _base_attrs(sites=sites, mean_sites=mean_sites, hidden_size=hidden, num_layers=num_layers, model=model,
                        boundary_rule=boundary_rule, config=config, dtype=dtype, compression=compression)
    attrs["complete"] = bool(complete)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_single(path, attrs, tables, lambda site, lo, hi: arrays[site][lo:hi].astype(dtype),
                  parse_compression(compression))
    return path


class HiddenStatesWriter:
    """Incremental, block-wise, crash-safe and resumable writer.

    Usage::

        with HiddenStatesWriter(path, sites=..., hidden_size=..., model=..., boundary_rule=...,
                                config=...) as w:
            for problem in problems:
                if problem.id in w.done_problem_ids:
                    continue
                w.add_problem(problem.id, problem.question, problem.gold, traces=[
                    TraceRecord(sample_index, label, num_tokens, finish_reason, positions,
                                {site: array[num_steps, hidden], ...}), ...])

    ``mean_sites`` (a subset of ``sites``) also stores each step's mean over its tokens;
    a trace then carries ``<site>.mean`` arrays beside ``<site>``.
            w.finish()

    A problem is the unit of resumption: it is written with all its traces or not at
    all. Finished problems are buffered and committed (a new part file plus an atomic
    rewrite of the index) when ``block_bytes`` of features are buffered or
    ``commit_interval_s`` seconds have passed since the last commit, and on
    :meth:`commit`/:meth:`finish`. :meth:`finish` writes the self-contained ``single``
    layout (``consolidate=True``) and removes the part files.
    """

    def __init__(self, path: str | os.PathLike, *, sites: Sequence[str], hidden_size: int, model: dict[str, Any],
                 boundary_rule: dict[str, Any], config: dict[str, Any] | None = None, dtype: str = "float16",
                 compression: str | None = None, overwrite: bool = False, num_layers: int | None = None,
                 commit_interval_s: float = 30.0, block_bytes: int = 256 << 20,
                 extra_attrs: dict[str, Any] | None = None, match_config_keys: Sequence[str] = (),
                 mean_sites: Sequence[str] = ()):
        self.path = Path(path)
        self.dtype = _check_dtype(dtype)
        self.compression_spec = compression
        self.compression = parse_compression(compression)
        self.sites = list(sites)
        self.mean_sites = list(mean_sites)
        self.features = feature_names(self.sites, self.mean_sites)  # what each row stores, in file order
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers if num_layers is not None else
                              model.get("num_hidden_layers") or _infer_num_layers(self.sites))
        for s in self.sites:
            site_depth(s, max(self.num_layers, 1))
        self.commit_interval_s = float(commit_interval_s)
        self.block_bytes = int(block_bytes)
        self.attrs = _base_attrs(sites=self.sites, mean_sites=self.mean_sites, hidden_size=self.hidden_size,
                                 num_layers=self.num_layers,
                                 model=model, boundary_rule=boundary_rule, config=config, dtype=self.dtype,
                                 compression=compression)
        self.attrs.update(extra_attrs or {})
        self.attrs["layout"] = LAYOUT_PARTS
        self._parts: list[tuple[str, int, int]] = []  # (file relative to the index's folder, rows, merge level)
        self._seq = 0
        self._tables = _empty_tables()
        self._buffer: dict[str, list[np.ndarray]] = {s: [] for s in self.features}
        self._buffered_rows = 0
        self._last_commit = time.monotonic()
        self._n_overflow = 0
        self.done_problem_ids: set[str] = set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        pdir = parts_dir(self.path)
        if self.path.exists() and not overwrite:
            self._resume(match_config_keys)
        else:
            if self.path.exists():
                log.info("overwriting %s", self.path)
                self.path.unlink()
            shutil.rmtree(pdir, ignore_errors=True)
            self._write_index()

    # -- resume ----------------------------------------------------------------------
    def _resume(self, match_config_keys: Sequence[str]) -> None:
        old = HiddenStates(self.path)
        what = f"{self.path} (resuming)"
        check_model_identity(old.model, self.attrs["model"], what)
        for key, mine in (("sites", self.sites), ("mean_sites", self.mean_sites), ("hidden_size", self.hidden_size),
                          ("storage_dtype", self.dtype), ("boundary_rule", self.attrs["boundary_rule"])):
            theirs = old.mean_sites if key == "mean_sites" else old.header.get(key)
            if theirs != mine:
                raise ArtifactMismatch(f"{self.path} was written with {key}={theirs!r}, this run has "
                                       f"{key}={mine!r}; pass a new output or overwrite")
        for key in match_config_keys:
            a, b = _dig(old.header.get("config", {}), key), _dig(self.attrs["config"], key)
            if a != b:
                raise ArtifactMismatch(f"{self.path} was written with {key}={a!r}, this run has {key}={b!r}; "
                                       "pass a new output or overwrite")
        tables = old._load_tables()
        self._tables = {t: {k: list(v) for k, v in cols.items()} for t, cols in tables.items()}
        self.done_problem_ids = set(map(str, tables["problems"]["problem_id"]))
        self.attrs["created"] = old.header.get("created", self.attrs["created"])
        pdir = parts_dir(self.path)
        if old.layout == LAYOUT_PARTS:
            self._parts = [(p, int(n), int(lvl)) for p, n, lvl in old.header.get("extra", {}).get("parts", [])]
        else:
            # A finished single file: keep it as the first part (a hard link: no copy, and
            # the output path stays valid until the new index replaces it).
            pdir.mkdir(exist_ok=True)
            base = pdir / "part-base.h5"
            if base.exists():
                base.unlink()
            try:
                os.link(self.path, base)
            except OSError:
                shutil.copy2(self.path, base)
            self._parts = [(f"{pdir.name}/{base.name}", old.num_steps, 99)] if old.num_steps else []
        old.close()
        keep = {Path(p[0]).name for p in self._parts}
        if pdir.is_dir():
            for stray in pdir.iterdir():
                if stray.name not in keep:
                    log.info("removing %s left by an interrupted run", stray)
                    stray.unlink()
        log.info("resuming %s: %d problems, %d traces, %d steps already recorded", self.path,
                 len(self.done_problem_ids), len(self._tables["traces"]["problem"]), self.num_steps)
        self.attrs["layout"] = LAYOUT_PARTS

    # -- adding ------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(self._tables["steps"]["trace"])

    @property
    def num_traces(self) -> int:
        return len(self._tables["traces"]["problem"])

    def add_problem(self, problem_id: str, question: str, gold: str, traces: Iterable["TraceRecord"]) -> int:
        """Add one problem with all of its traces; returns its problem index."""
        problem_id = str(problem_id)
        if problem_id in self.done_problem_ids:
            raise StepprobeError(f"problem {problem_id!r} is already in {self.path}")
        traces = list(traces)
        for t in traces:
            t.check(self.features, self.hidden_size)
        T = self._tables
        p_idx = len(T["problems"]["problem_id"])
        T["problems"]["problem_id"].append(problem_id)
        T["problems"]["question"].append(str(question))
        T["problems"]["gold"].append(str(gold))
        for t in traces:
            t_idx = len(T["traces"]["problem"])
            n = len(t.positions)
            T["traces"]["problem"].append(p_idx)
            T["traces"]["sample_index"].append(int(t.sample_index))
            T["traces"]["label"].append(int(bool(t.label)))
            T["traces"]["num_steps"].append(n)
            T["traces"]["num_tokens"].append(int(t.num_tokens))
            T["traces"]["finish_reason"].append(str(t.finish_reason))
            T["traces"]["step_start"].append(self.num_steps)
            S = T["steps"]
            for k, pos in enumerate(t.positions):
                S["trace"].append(t_idx)
                S["problem"].append(p_idx)
                S["step"].append(k)
                S["position"].append(int(pos))
                S["rel_position"].append(k / n)
                S["label"].append(int(bool(t.label)))
            if n:
                for site in self.features:
                    self._buffer[site].append(self._cast(t.features[site]))
                self._buffered_rows += n
        self.done_problem_ids.add(problem_id)
        buffered = self._buffered_rows * self.hidden_size * len(self.features) * np.dtype(self.dtype).itemsize
        if buffered >= self.block_bytes or time.monotonic() - self._last_commit >= self.commit_interval_s:
            self.commit()
        return p_idx

    def _cast(self, arr: Any) -> np.ndarray:
        a = np.asarray(arr, dtype=np.float32)
        if self.dtype == "float16":
            big = np.abs(a) > np.finfo(np.float16).max
            if big.any():
                if not self._n_overflow:
                    log.warning("hidden-state values exceed the float16 range and are clipped to +-65504; "
                                "use storage dtype float32 for this model (count logged at the end)")
                self._n_overflow += int(big.sum())
                a = np.clip(a, -np.finfo(np.float16).max, np.finfo(np.float16).max)
        return a.astype(self.dtype)

    # -- committing -----------------------------------------------------------------------
    def commit(self) -> None:
        """Make every problem added so far durable (new part file + atomic index rewrite)."""
        obsolete: list[Path] = []
        if self._buffered_rows:
            data = {site: np.concatenate(self._buffer[site], axis=0) for site in self.features}
            self._parts.append((self._write_part(data), self._buffered_rows, 0))
            self._buffer = {s: [] for s in self.features}
            self._buffered_rows = 0
            obsolete = self._merge_small_parts()
        self._write_index()
        for old in obsolete:  # only now unreferenced by the index on disk
            old.unlink(missing_ok=True)
        self._last_commit = time.monotonic()

    def _write_part(self, data: dict[str, np.ndarray]) -> str:
        """Write one block file (tmp + fsync + rename); its name relative to the index's folder."""
        pdir = parts_dir(self.path)
        pdir.mkdir(exist_ok=True)
        taken = {Path(p[0]).name for p in self._parts}
        while (name := f"part-{self._seq:05d}.h5") in taken or (pdir / name).exists():
            self._seq += 1
        self._seq += 1
        tmp = pdir / f".{name}.tmp"
        with create_h5(tmp, pdir / name) as f:
            f.attrs["kind"] = KIND + "-part"
            for site in self.features:
                arr = data[site]
                ds = _create_feature_dataset(f, site, arr.shape[0], self.hidden_size, self.dtype, self.compression)
                ds[...] = arr
        _fsync_path(tmp)
        os.replace(tmp, pdir / name)
        _fsync_path(pdir)
        return f"{pdir.name}/{name}"

    def _merge_small_parts(self) -> list[Path]:
        """Binary-counter merging of small parts: O(log n) files instead of one per commit.

        Two trailing parts of the same level are rewritten as one (level + 1) as long as the
        result stays under ``block_bytes``; bigger parts are never copied again.
        """
        obsolete: list[Path] = []
        row_bytes = self.hidden_size * len(self.features) * np.dtype(self.dtype).itemsize
        base = self.path.parent
        while (len(self._parts) >= 2 and self._parts[-1][2] == self._parts[-2][2]
               and (self._parts[-1][1] + self._parts[-2][1]) * row_bytes <= self.block_bytes):
            (a, ra, lvl), (b, rb, _) = self._parts[-2], self._parts[-1]
            h5py = _h5py()
            with h5py.File(base / a, "r") as fa, h5py.File(base / b, "r") as fb:
                data = {s: np.concatenate([fa[feature_path(s)][...], fb[feature_path(s)][...]]) for s in self.features}
            name = self._write_part(data)
            self._parts[-2:] = [(name, ra + rb, lvl + 1)]
            obsolete += [base / a, base / b]
        return obsolete

    def _tables_np(self) -> dict[str, dict[str, np.ndarray]]:
        return {t: _as_table(t, cols) for t, cols in self._tables.items()}

    def _committed_tables(self) -> dict[str, dict[str, np.ndarray]]:
        tables = self._tables_np()
        if self._buffered_rows:
            raise RuntimeError("commit the buffer first")
        return tables

    def _write_index(self) -> None:
        h5py = _h5py()
        tables = self._committed_tables()
        n = len(tables["steps"]["trace"])
        attrs = dict(self.attrs)
        attrs["extra"] = {**attrs.get("extra", {}), "parts": [list(p) for p in self._parts]}
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            with create_h5(tmp, self.path) as f:
                for k, v in attrs.items():
                    f.attrs[k] = _encode_attr(k, v)
                _write_tables(f, tables)
                groups = {FEATURE_GROUP: f.create_group(FEATURE_GROUP)}
                if self.mean_sites:
                    groups[MEAN_GROUP] = f.create_group(MEAN_GROUP)
                for site in self.features:
                    if not self._parts:
                        _create_feature_dataset(f, site, 0, self.hidden_size, self.dtype, {})
                        continue
                    layout = h5py.VirtualLayout(shape=(n, self.hidden_size), dtype=self.dtype)
                    lo = 0
                    for rel, rows, _ in self._parts:
                        layout[lo:lo + rows] = h5py.VirtualSource(rel, feature_path(site), shape=(rows, self.hidden_size))
                        lo += rows
                    group, name = feature_path(site).split("/")
                    groups[group].create_virtual_dataset(name, layout, fillvalue=np.nan)
            _fsync_path(tmp)
            os.replace(tmp, self.path)
            _fsync_path(self.path.parent)
        finally:
            if tmp.exists():
                tmp.unlink()

    def finish(self, *, complete: bool = True, consolidate: bool = True) -> Path:
        """Commit, mark the file complete, and (by default) write the single-file layout."""
        self.attrs["complete"] = bool(complete)
        if self._n_overflow:
            self.attrs["extra"] = {**self.attrs.get("extra", {}), "float16_clipped_values": self._n_overflow}
            log.warning("%d hidden-state values were clipped to the float16 range", self._n_overflow)
        self.commit()
        if consolidate:
            consolidate_file(self.path)
        return self.path

    def close(self) -> None:
        """Commit what is buffered (no consolidation)."""
        if self._buffered_rows:
            self.commit()

    def __enter__(self) -> "HiddenStatesWriter":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        # Problems are added whole, so committing on an exception keeps only complete ones.
        self.close()

    def estimate_bytes(self, num_steps: int) -> int:
        return estimate_bytes(num_steps, len(self.features), self.hidden_size, self.dtype)


class TraceRecord:
    """One trace's boundaries and features, as handed to :meth:`HiddenStatesWriter.add_problem`."""

    __slots__ = ("sample_index", "label", "num_tokens", "finish_reason", "positions", "features")

    def __init__(self, sample_index: int, label: bool, num_tokens: int, finish_reason: str,
                 positions: Sequence[int], features: dict[str, np.ndarray]):
        self.sample_index = sample_index
        self.label = label
        self.num_tokens = num_tokens
        self.finish_reason = finish_reason
        self.positions = list(positions)
        self.features = features

    def check(self, sites: Sequence[str], hidden: int) -> None:
        n = len(self.positions)
        if not n:
            return
        for s in sites:
            a = self.features.get(s)
            if a is None:
                raise StepprobeError(f"trace {self.sample_index}: no features for {s!r}")
            if tuple(np.shape(a)) != (n, hidden):
                raise StepprobeError(f"trace {self.sample_index}: features for {s!r} have shape {np.shape(a)}, "
                                     f"expected {(n, hidden)}")


def _dig(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d



def consolidate_file(path: str | os.PathLike) -> Path:
    """Turn a ``parts`` layout into one self-contained file in place (atomic), drop the parts."""
    path = Path(path)
    hs = HiddenStates(path)
    if hs.layout == LAYOUT_SINGLE:
        hs.close()
        shutil.rmtree(parts_dir(path), ignore_errors=True)
        return path
    attrs = dict(hs.header)
    attrs["layout"] = LAYOUT_SINGLE
    extra = dict(attrs.get("extra") or {})
    extra.pop("parts", None)
    attrs["extra"] = extra
    try:
        tables = hs._load_tables()
        f = hs._h5()
        # A failure here (a full disk) leaves the parts layout as it was: complete and readable,
        # and the same command consolidates it when rerun.
        _write_single(path, attrs, tables, lambda site, lo, hi: f[feature_path(site)][lo:hi],
                      parse_compression(attrs.get("compression")))
    finally:
        hs.close()
    shutil.rmtree(parts_dir(path), ignore_errors=True)
    return path

