"""The hidden-states HDF5 file: schema, crash-safe writer, lazy reader, shard merge.

Schema ``stepprobe-hidden-states`` version 1 (documented in ``docs/hdf5_schema.md``)::

    /                         attributes: kind, schema_version, layout, complete, sites,
                              num_layers, hidden_size, storage_dtype, model, boundary_rule,
                              config, packages, ... (dicts and lists as JSON strings)
    /features/<site>          [num_steps, hidden_size]  storage dtype (float16 by default),
                              chunked along the step axis; one dataset per site
    /steps/{trace, problem, step, position, rel_position, label}       one row per boundary
    /traces/{problem, sample_index, label, num_steps, num_tokens,
             finish_reason, step_start}                                one row per trace
    /problems/{problem_id, question, gold}                             one row per problem

Two layouts share that schema. ``single``: one self-contained file (what a finished run,
:func:`write_arrays` and :func:`merge` produce). ``parts``: what a run in progress
leaves: the tables live in the file, and each ``/features/<site>`` is an HDF5 virtual
dataset over finished block files in ``<name>.parts/`` next to it. Both read the same
with h5py or :class:`HiddenStates`.

Crash safety: HDF5 itself is not safe against a kill in the middle of a write, so the
writer never modifies a file that a reader could see. Each block of finished problems is
written to a new part file, closed, fsync'ed and renamed into place; then the index is
rewritten to a temporary file and atomically renamed over the output. A kill at any
point leaves the previous index, which names only complete part files. Reopening the
same path with :class:`HiddenStatesWriter` resumes: ``done_problem_ids`` lists what is
already there, and stray part files of the killed run are removed.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import ArtifactMismatch, StepprobeError
from ..layers import all_sites, site_depth
from ..provenance import check_model_identity, check_schema, package_versions

log = logging.getLogger(__name__)

KIND = "stepprobe-hidden-states"
SCHEMA_VERSION = 1

LAYOUT_SINGLE = "single"
LAYOUT_PARTS = "parts"

# Attributes stored as JSON strings (everything else is a plain HDF5 scalar).
JSON_ATTRS = ("sites", "model", "boundary_rule", "config", "packages", "source", "merged_from", "extra")

STEP_FIELDS: dict[str, Any] = {
    "trace": np.int64, "problem": np.int64, "step": np.int32, "position": np.int32,
    "rel_position": np.float32, "label": np.int8,
}
TRACE_FIELDS: dict[str, Any] = {
    "problem": np.int64, "sample_index": np.int32, "label": np.int8, "num_steps": np.int32,
    "num_tokens": np.int32, "finish_reason": str, "step_start": np.int64,
}
PROBLEM_FIELDS: dict[str, Any] = {"problem_id": str, "question": str, "gold": str}
TABLES = {"steps": STEP_FIELDS, "traces": TRACE_FIELDS, "problems": PROBLEM_FIELDS}

STORAGE_DTYPES = ("float16", "float32")
_TARGET_CHUNK_BYTES = 1 << 20  # ~1 MiB chunks: one site for all steps reads in large sequential pieces
_COPY_BLOCK_BYTES = 64 << 20


def _h5py():
    import h5py

    return h5py


def parts_dir(path: str | os.PathLike) -> Path:
    """Folder with the block files of a run in progress (``<file>.parts``)."""
    path = Path(path)
    return path.with_name(path.name + ".parts")


def chunk_rows(hidden_size: int, dtype: str) -> int:
    return max(1, _TARGET_CHUNK_BYTES // (hidden_size * np.dtype(dtype).itemsize))


def parse_compression(spec: str | None) -> dict[str, Any]:
    """``None``/``"none"``, ``"gzip"``, ``"gzip:4"`` or ``"lzf"`` -> h5py dataset kwargs."""
    if spec is None or str(spec).lower() in ("", "none", "null", "false"):
        return {}
    name, _, level = str(spec).partition(":")
    if name == "gzip":
        return {"compression": "gzip", "compression_opts": int(level or 4)}
    if name == "lzf" and not level:
        return {"compression": "lzf"}
    raise StepprobeError(f"unknown compression {spec!r}; use none, gzip, gzip:LEVEL (0-9) or lzf")


def _check_dtype(dtype: str) -> str:
    dtype = str(np.dtype(dtype))
    if dtype not in STORAGE_DTYPES:
        raise StepprobeError(f"storage dtype {dtype!r} not supported; use one of {', '.join(STORAGE_DTYPES)}")
    return dtype


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode_attr(name: str, value: Any) -> Any:
    if name in JSON_ATTRS:
        return json.dumps(value, sort_keys=True, default=str)
    if value is None:
        return "null"
    return value


def _decode_attr(name: str, value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if name in JSON_ATTRS:
        return json.loads(value)
    if isinstance(value, np.generic):
        return value.item()
    if value == "null":
        return None
    return value


def _empty_tables() -> dict[str, dict[str, list]]:
    return {t: {k: [] for k in fields} for t, fields in TABLES.items()}


def _as_table(name: str, data: dict[str, Any], n: int | None = None) -> dict[str, np.ndarray]:
    """Validate and convert one table to numpy arrays of the schema's dtypes."""
    fields = TABLES[name]
    missing = [k for k in fields if k not in data and not (name == "traces" and k == "step_start")]
    if missing:
        raise StepprobeError(f"{name} table lacks field(s) {', '.join(missing)}")
    out: dict[str, np.ndarray] = {}
    for key, dt in fields.items():
        if key not in data:
            continue
        if dt is str:
            out[key] = np.asarray([str(v) for v in data[key]], dtype=object)
        else:
            out[key] = np.asarray(data[key]).astype(dt, copy=False)
    lengths = {len(v) for v in out.values()}
    if len(lengths) > 1:
        raise StepprobeError(f"{name} table fields have different lengths: { {k: len(v) for k, v in out.items()} }")
    if n is not None and lengths and lengths != {n}:
        raise StepprobeError(f"{name} table has {lengths.pop()} rows, expected {n}")
    return out


def _write_tables(f: Any, tables: dict[str, dict[str, np.ndarray]]) -> None:
    h5py = _h5py()
    for name, fields in TABLES.items():
        g = f.create_group(name)
        for key, dt in fields.items():
            arr = tables[name][key]
            if dt is str:
                g.create_dataset(key, data=np.asarray(arr, dtype=object), dtype=h5py.string_dtype("utf-8"))
            else:
                g.create_dataset(key, data=np.asarray(arr, dtype=dt))


def _read_tables(f: Any) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, fields in TABLES.items():
        if name not in f:
            raise ArtifactMismatch(f"{f.filename}: missing group /{name}; not a complete hidden-states file")
        g = f[name]
        out[name] = {}
        for key, dt in fields.items():
            if key not in g:
                raise ArtifactMismatch(f"{f.filename}: missing dataset /{name}/{key}")
            ds = g[key]
            out[name][key] = ds.asstr()[...].astype(object) if dt is str else ds[...]
    return out


def _step_start(num_steps: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(num_steps, dtype=np.int64)[:-1]]).astype(np.int64) if len(num_steps) else \
        np.zeros(0, np.int64)


def _check_consistency(tables: dict[str, dict[str, np.ndarray]], what: str) -> None:
    steps, traces, problems = tables["steps"], tables["traces"], tables["problems"]
    n_steps, n_traces, n_probs = len(steps["trace"]), len(traces["problem"]), len(problems["problem_id"])
    if int(traces["num_steps"].sum()) != n_steps:
        raise ArtifactMismatch(f"{what}: traces.num_steps sums to {int(traces['num_steps'].sum())}, "
                               f"but there are {n_steps} step rows")
    if n_steps and (steps["trace"].min() < 0 or steps["trace"].max() >= n_traces):
        raise ArtifactMismatch(f"{what}: steps.trace points outside the {n_traces} traces")
    if n_traces and (traces["problem"].min() < 0 or traces["problem"].max() >= n_probs):
        raise ArtifactMismatch(f"{what}: traces.problem points outside the {n_probs} problems")


def _create_feature_dataset(f: Any, site: str, n: int, hidden: int, dtype: str, compression: dict[str, Any]) -> Any:
    rows = chunk_rows(hidden, dtype)
    if n > 0:  # as few chunks as the target size allows, all the same size: no half-empty last chunk
        rows = -(-n // -(-n // rows))
    return f.create_dataset(f"features/{site}", shape=(n, hidden), maxshape=(None, hidden), dtype=dtype,
                            chunks=(rows, hidden), **compression)


def _base_attrs(*, sites: Sequence[str], hidden_size: int, num_layers: int, model: dict, boundary_rule: dict,
                config: dict | None, dtype: str, compression: str | None) -> dict[str, Any]:
    return {
        "kind": KIND,
        "schema_version": SCHEMA_VERSION,
        "created": _now(),
        "sites": list(sites),
        "num_layers": int(num_layers),
        "hidden_size": int(hidden_size),
        "storage_dtype": dtype,
        "compression": compression or "none",
        "model": model,
        "boundary_rule": boundary_rule,
        "config": config or {},
        "packages": package_versions(),
        "complete": False,
        "layout": LAYOUT_SINGLE,
    }


def _infer_num_layers(sites: Sequence[str]) -> int:
    from ..layers import layer_index

    idx = [layer_index(s) for s in sites]
    idx = [i for i in idx if i is not None]
    return max(idx) + 1 if idx else 0


def _write_single(path: Path, attrs: dict[str, Any], tables: dict[str, dict[str, np.ndarray]],
                  feature_source: Any, compression: dict[str, Any]) -> None:
    """Write a self-contained file atomically. ``feature_source(site, lo, hi)`` yields rows."""
    h5py = _h5py()
    n = len(tables["steps"]["trace"])
    hidden, dtype = attrs["hidden_size"], attrs["storage_dtype"]
    block = max(1, _COPY_BLOCK_BYTES // (hidden * np.dtype(dtype).itemsize))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            for k, v in attrs.items():
                f.attrs[k] = _encode_attr(k, v)
            _write_tables(f, tables)
            f.create_group("features")
            for site in attrs["sites"]:
                ds = _create_feature_dataset(f, site, n, hidden, dtype, compression)
                for lo in range(0, n, block):
                    hi = min(n, lo + block)
                    ds[lo:hi] = feature_source(site, lo, hi)
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_path(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_arrays(path: str | os.PathLike, *, features: dict[str, np.ndarray], steps: dict[str, Any],
                 traces: dict[str, Any], problems: dict[str, Any], model: dict[str, Any],
                 boundary_rule: dict[str, Any], config: dict[str, Any] | None = None, dtype: str = "float16",
                 compression: str | None = None, overwrite: bool = True, complete: bool = True) -> Path:
    """Write a whole file in one go (tests, synthetic data, small conversions).

    ``features`` maps site names (see :mod:`stepprobe.layers`) to ``[num_steps, hidden]``
    arrays in step-row order. ``traces.step_start`` and ``steps.rel_position`` may be
    left out; they are derived.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise StepprobeError(f"{path} exists; pass overwrite=True to replace it")
    dtype = _check_dtype(dtype)
    if not features:
        raise StepprobeError("write_arrays needs at least one feature site")
    sites = list(features)
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
    attrs = _base_attrs(sites=sites, hidden_size=hidden, num_layers=num_layers, model=model,
                        boundary_rule=boundary_rule, config=config, dtype=dtype, compression=compression)
    attrs["complete"] = bool(complete)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_single(path, attrs, tables, lambda site, lo, hi: arrays[site][lo:hi].astype(dtype),
                  parse_compression(compression))
    return path


class HiddenStates:
    """Read a hidden-states file. Cheap to construct, picklable, safe in DataLoader workers.

    The constructor reads and checks the attributes only; tables load on first use and
    the HDF5 handle for features opens lazily, once per process (a forked or unpickled
    copy opens its own).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file: Any = None
        self._pid: int | None = None
        self._tables: dict[str, dict[str, np.ndarray]] | None = None
        self.header = read_header(self.path)
        check_schema(self.header, KIND, SCHEMA_VERSION, f"hidden-states file {self.path}")
        for key in ("sites", "hidden_size", "num_layers", "model", "boundary_rule", "storage_dtype"):
            if key not in self.header:
                raise ArtifactMismatch(f"{self.path}: attribute {key!r} is missing")
        self.sites: list[str] = list(self.header["sites"])
        self.hidden_size: int = int(self.header["hidden_size"])
        self.num_layers: int = int(self.header["num_layers"])
        self.model: dict[str, Any] = self.header["model"]
        self.boundary_rule: dict[str, Any] = self.header["boundary_rule"]
        self.storage_dtype: str = self.header["storage_dtype"]
        self.layout: str = self.header.get("layout", LAYOUT_SINGLE)
        self.complete: bool = bool(self.header.get("complete", False))
        if self.layout == LAYOUT_PARTS:
            for rel, *_ in (self.header.get("extra") or {}).get("parts", []):
                if not (self.path.parent / rel).is_file():
                    raise ArtifactMismatch(f"{self.path}: block file {rel} is missing (a run in progress keeps its "
                                           f"features in {parts_dir(self.path).name}/ next to the file)")

    # -- lifecycle ---------------------------------------------------------------------
    def _h5(self) -> Any:
        if self._file is None or self._pid != os.getpid():
            self._file = _h5py().File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __enter__(self) -> "HiddenStates":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_file"] = None
        state["_pid"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (f"HiddenStates({str(self.path)!r}, model={self.model.get('name')!r}, sites={len(self.sites)}, "
                f"hidden={self.hidden_size}, steps={self.num_steps}, traces={self.num_traces})")

    # -- tables --------------------------------------------------------------------------
    def _load_tables(self) -> dict[str, dict[str, np.ndarray]]:
        if self._tables is None:
            self._tables = _read_tables(self._h5())
        return self._tables

    @property
    def steps(self) -> dict[str, np.ndarray]:
        return self._load_tables()["steps"]

    @property
    def traces(self) -> dict[str, np.ndarray]:
        return self._load_tables()["traces"]

    @property
    def problems(self) -> dict[str, np.ndarray]:
        return self._load_tables()["problems"]

    @property
    def num_steps(self) -> int:
        return int(len(self.steps["trace"]))

    @property
    def num_traces(self) -> int:
        return int(len(self.traces["problem"]))

    @property
    def num_problems(self) -> int:
        return int(len(self.problems["problem_id"]))

    def trace_rows(self, trace: int) -> np.ndarray:
        """Step-row indices of one trace, in step order."""
        start = int(self.traces["step_start"][trace])
        return np.arange(start, start + int(self.traces["num_steps"][trace]), dtype=np.int64)

    # -- features ------------------------------------------------------------------------
    def _dataset(self, site: str) -> Any:
        if site not in self.sites:
            raise StepprobeError(f"unknown site {site!r} in {self.path}; known sites: {', '.join(self.sites)}")
        return self._h5()["features"][site]

    def features(self, site: str, rows: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
        """float32 ``[len(rows), hidden]`` for step rows ``rows`` (any order), or all rows."""
        ds = self._dataset(site)
        n = ds.shape[0]
        if rows is None:
            out = np.empty((n, self.hidden_size), np.float32)
            block = max(1, _COPY_BLOCK_BYTES // (self.hidden_size * 4))
            for lo in range(0, n, block):
                out[lo:lo + block] = ds[lo:min(n, lo + block)]
            self._check_snapshot(out)
            return out
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise StepprobeError(f"step rows out of range [0, {n}) for {self.path}")
        out = np.empty((rows.size, self.hidden_size), np.float32)
        if not rows.size:
            return out
        uniq, inverse = np.unique(rows, return_inverse=True)
        span = ds.chunks[0] if ds.chunks else chunk_rows(self.hidden_size, self.storage_dtype)
        got = np.empty((uniq.size, self.hidden_size), np.float32)
        groups = uniq // span
        cuts = np.flatnonzero(np.diff(groups)) + 1
        for idx in np.split(np.arange(uniq.size), cuts):
            lo, hi = int(uniq[idx[0]]), int(uniq[idx[-1]]) + 1
            got[idx] = ds[lo:hi][uniq[idx] - lo]
        out[:] = got[inverse]
        self._check_snapshot(out)
        return out

    def _check_snapshot(self, out: np.ndarray) -> None:
        # A virtual dataset reads a vanished block file as its fill value (NaN): that happens
        # only when a running writer merged blocks after this reader opened the file.
        if self.layout == LAYOUT_PARTS and out.size and np.isnan(out).any():
            raise StepprobeError(f"{self.path} changed while it was read (a run is writing it); open it again")

    def stack(self, sites: Sequence[str], rows: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
        """float32 ``[len(rows), len(sites), hidden]``."""
        return np.stack([self.features(s, rows) for s in sites], axis=1)

    # -- checks --------------------------------------------------------------------------
    def validate(self, expected_model: dict[str, Any] | None = None) -> None:
        """Check internal consistency, and the model identity against ``expected_model``."""
        what = f"hidden-states file {self.path}"
        if expected_model is not None:
            check_model_identity(self.model, expected_model, what)
        if self.sites != [s for s in all_sites(self.num_layers) if s in self.sites]:
            for s in self.sites:
                site_depth(s, self.num_layers)
        _check_consistency(self._load_tables(), what)
        f = self._h5()
        for site in self.sites:
            if f"features/{site}" not in f:
                raise ArtifactMismatch(f"{what}: features for site {site!r} are missing")
            shape = f["features"][site].shape
            if shape != (self.num_steps, self.hidden_size):
                raise ArtifactMismatch(f"{what}: features/{site} has shape {shape}, "
                                       f"expected {(self.num_steps, self.hidden_size)}")


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """Every root attribute of a hidden-states file, decoded (JSON attributes parsed)."""
    path = Path(path)
    if not path.is_file():
        raise StepprobeError(f"hidden-states file not found: {path}")
    h5py = _h5py()
    if not h5py.is_hdf5(path):
        raise ArtifactMismatch(f"{path} is not an HDF5 file")
    try:
        with h5py.File(path, "r") as f:
            return {k: _decode_attr(k, v) for k, v in f.attrs.items()}
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactMismatch(f"{path}: cannot read attributes ({str(exc).splitlines()[0]})") from None


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
                                {site: array[num_steps, hidden]}), ...])
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
                 extra_attrs: dict[str, Any] | None = None, match_config_keys: Sequence[str] = ()):
        self.path = Path(path)
        self.dtype = _check_dtype(dtype)
        self.compression_spec = compression
        self.compression = parse_compression(compression)
        self.sites = list(sites)
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers if num_layers is not None else
                              model.get("num_hidden_layers") or _infer_num_layers(self.sites))
        for s in self.sites:
            site_depth(s, max(self.num_layers, 1))
        self.commit_interval_s = float(commit_interval_s)
        self.block_bytes = int(block_bytes)
        self.attrs = _base_attrs(sites=self.sites, hidden_size=self.hidden_size, num_layers=self.num_layers,
                                 model=model, boundary_rule=boundary_rule, config=config, dtype=self.dtype,
                                 compression=compression)
        self.attrs.update(extra_attrs or {})
        self.attrs["layout"] = LAYOUT_PARTS
        self._parts: list[tuple[str, int, int]] = []  # (file relative to the index's folder, rows, merge level)
        self._seq = 0
        self._tables = _empty_tables()
        self._buffer: dict[str, list[np.ndarray]] = {s: [] for s in self.sites}
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
        for key, mine in (("sites", self.sites), ("hidden_size", self.hidden_size),
                          ("storage_dtype", self.dtype), ("boundary_rule", self.attrs["boundary_rule"])):
            if old.header.get(key) != mine:
                raise ArtifactMismatch(f"{self.path} was written with {key}={old.header.get(key)!r}, this run has "
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
            t.check(self.sites, self.hidden_size)
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
                for site in self.sites:
                    self._buffer[site].append(self._cast(t.features[site]))
                self._buffered_rows += n
        self.done_problem_ids.add(problem_id)
        buffered = self._buffered_rows * self.hidden_size * len(self.sites) * np.dtype(self.dtype).itemsize
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
            data = {site: np.concatenate(self._buffer[site], axis=0) for site in self.sites}
            self._parts.append((self._write_part(data), self._buffered_rows, 0))
            self._buffer = {s: [] for s in self.sites}
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
        with _h5py().File(tmp, "w") as f:
            f.attrs["kind"] = KIND + "-part"
            for site in self.sites:
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
        row_bytes = self.hidden_size * len(self.sites) * np.dtype(self.dtype).itemsize
        base = self.path.parent
        while (len(self._parts) >= 2 and self._parts[-1][2] == self._parts[-2][2]
               and (self._parts[-1][1] + self._parts[-2][1]) * row_bytes <= self.block_bytes):
            (a, ra, lvl), (b, rb, _) = self._parts[-2], self._parts[-1]
            h5py = _h5py()
            with h5py.File(base / a, "r") as fa, h5py.File(base / b, "r") as fb:
                data = {s: np.concatenate([fa["features"][s][...], fb["features"][s][...]]) for s in self.sites}
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
            with h5py.File(tmp, "w") as f:
                for k, v in attrs.items():
                    f.attrs[k] = _encode_attr(k, v)
                _write_tables(f, tables)
                g = f.create_group("features")
                for site in self.sites:
                    if not self._parts:
                        _create_feature_dataset(f, site, 0, self.hidden_size, self.dtype, {})
                        continue
                    layout = h5py.VirtualLayout(shape=(n, self.hidden_size), dtype=self.dtype)
                    lo = 0
                    for rel, rows, _ in self._parts:
                        layout[lo:lo + rows] = h5py.VirtualSource(rel, f"features/{site}", shape=(rows, self.hidden_size))
                        lo += rows
                    g.create_virtual_dataset(site, layout, fillvalue=np.nan)
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
        return estimate_bytes(num_steps, len(self.sites), self.hidden_size, self.dtype)


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
                raise StepprobeError(f"trace {self.sample_index}: no features for site {s!r}")
            if tuple(np.shape(a)) != (n, hidden):
                raise StepprobeError(f"trace {self.sample_index}: features for {s!r} have shape {np.shape(a)}, "
                                     f"expected {(n, hidden)}")


def _dig(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def estimate_bytes(num_steps: int, num_sites: int, hidden_size: int, dtype: str = "float16") -> int:
    """Bytes of feature data for ``num_steps`` boundaries (tables add ~40 bytes per step)."""
    return int(num_steps) * (int(num_sites) * int(hidden_size) * np.dtype(dtype).itemsize + 40)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


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
    tables = hs._load_tables()
    f = hs._h5()
    _write_single(path, attrs, tables, lambda site, lo, hi: f["features"][site][lo:hi],
                  parse_compression(attrs.get("compression")))
    hs.close()
    shutil.rmtree(parts_dir(path), ignore_errors=True)
    return path


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
    files = [HiddenStates(p) for p in inputs]
    first = files[0]
    for hs in files[1:]:
        check_model_identity(first.model, hs.model, f"hidden-states file {hs.path}")
        for key in ("sites", "hidden_size", "storage_dtype", "boundary_rule"):
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
                out.append(hs._h5()["features"][site][a - off:b - off])
        return np.concatenate(out, axis=0)

    output.parent.mkdir(parents=True, exist_ok=True)
    _write_single(output, attrs, tables, source, parse_compression(attrs.get("compression")))
    for hs in files:
        hs.close()
    log.info("merged %d files into %s: %d problems, %d traces, %d steps", len(files), output, n_probs, n_traces,
             n_steps)
    return output


__all__ = ["KIND", "SCHEMA_VERSION", "HiddenStates", "HiddenStatesWriter", "TraceRecord", "write_arrays",
           "merge", "consolidate_file", "read_header", "estimate_bytes", "parts_dir"]
