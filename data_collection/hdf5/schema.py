"""Schema ``stepprobe-hidden-states``: constants, attributes, tables and feature datasets.

Everything both sides of the file share: the field lists and dtypes of the three tables,
attribute encoding (dicts and lists as JSON strings), table conversion and consistency
checks, chunking of ``/features/<site>``, and the atomic single-file write used by the
writer, :func:`~.writer.consolidate_file` and :func:`~.merge.merge`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ...errors import ArtifactMismatch, StepprobeError
from ...layers import mean_name, split_feature
from ...provenance import package_versions

KIND = "stepprobe-hidden-states"
SCHEMA_VERSION = 2
# Version 2 adds the optional step means (attribute ``mean_sites``, datasets
# ``/features_mean/<site>``); a version-1 file reads as a version-2 file without them.
READABLE_VERSIONS = (1, 2)
FEATURE_GROUP = "features"
MEAN_GROUP = "features_mean"

LAYOUT_SINGLE = "single"
LAYOUT_PARTS = "parts"

# Attributes stored as JSON strings (everything else is a plain HDF5 scalar).
JSON_ATTRS = ("sites", "mean_sites", "model", "boundary_rule", "config", "packages", "source", "merged_from", "extra")

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


class WriteFailed(StepprobeError):
    """Writing an HDF5 file failed (a full disk, a file-size limit): one line naming the file."""


def _reason(exc: BaseException) -> str:
    """The operating system's words from an h5py error (HDF5 wraps them in a long message)."""
    import re

    text = str(exc)
    found = re.findall(r"error message = '([^']+)'", text)
    if found:
        return found[-1]
    return getattr(exc, "strerror", None) or " ".join(text.split())[:200]


def _abandon(f: Any) -> None:
    """Close an HDF5 file that can no longer be written (its disk is full) without crashing.

    HDF5 keeps unwritten metadata for a failed file and retries it on every close, and at
    exit, where it crashes the process (a segmentation fault). Pointing the file's descriptor
    at /dev/null lets the close finish; the caller then removes the half-written file."""
    try:
        fd = f.id.get_vfd_handle()
        null = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)
    except Exception:  # pragma: no cover - already closed, or no POSIX descriptor
        pass
    try:
        f.close()
    except Exception:  # pragma: no cover - nothing more can be done for it
        pass


@contextlib.contextmanager
def create_h5(tmp: Path, final: Path | None = None) -> Iterator[Any]:
    """``h5py.File(tmp, "w")`` for a file that is renamed into place once written. An error
    while writing or closing it (a full disk) closes it safely, removes it and becomes one line
    naming ``final`` (:class:`WriteFailed`); what was there before is untouched."""
    # No raw-data chunk cache: a chunk that cannot be written fails the assignment that writes
    # it, instead of failing later, silently, when h5py drops the dataset.
    f = _h5py().File(tmp, "w", rdcc_nbytes=0)
    try:
        try:
            yield f
            f.flush()
        except BaseException:
            _abandon(f)
            raise
        try:
            f.close()
        except BaseException:
            _abandon(f)
            raise
    except (OSError, RuntimeError) as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise WriteFailed(f"{final or tmp}: writing failed ({_reason(exc)}); free space and rerun the same "
                          "command (what it finished before is kept)") from None


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
    except OSError as exc:  # name the file (a bare fsync error has no file name)
        raise OSError(exc.errno, exc.strerror, str(path)) from None
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


def feature_path(name: str) -> str:
    """HDF5 path of a feature: ``layer_20`` -> ``features/layer_20``, ``layer_20.mean`` -> ``features_mean/layer_20``."""
    site, mean = split_feature(name)
    return f"{MEAN_GROUP if mean else FEATURE_GROUP}/{site}"


def feature_names(sites: Sequence[str], mean_sites: Sequence[str]) -> list[str]:
    """Every feature a file holds: the boundary sites, then the step means."""
    return [*sites, *(mean_name(s) for s in mean_sites)]


def _create_feature_dataset(f: Any, name: str, n: int, hidden: int, dtype: str, compression: dict[str, Any]) -> Any:
    rows = chunk_rows(hidden, dtype)
    if n > 0:  # as few chunks as the target size allows, all the same size: no half-empty last chunk
        rows = -(-n // -(-n // rows))
    return f.create_dataset(feature_path(name), shape=(n, hidden), maxshape=(None, hidden), dtype=dtype,
                            chunks=(rows, hidden), **compression)


def _base_attrs(*, sites: Sequence[str], hidden_size: int, num_layers: int, model: dict, boundary_rule: dict,
                config: dict | None, dtype: str, compression: str | None,
                mean_sites: Sequence[str] = ()) -> dict[str, Any]:
    unknown = [s for s in mean_sites if s not in sites]
    if unknown:
        raise StepprobeError(f"step means asked for site(s) {', '.join(unknown)} that are not recorded")
    return {
        "kind": KIND,
        "schema_version": SCHEMA_VERSION,
        "created": _now(),
        "sites": list(sites),
        "mean_sites": list(mean_sites),
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
    from ...layers import layer_index

    idx = [layer_index(s) for s in sites]
    idx = [i for i in idx if i is not None]
    return max(idx) + 1 if idx else 0


def _write_single(path: Path, attrs: dict[str, Any], tables: dict[str, dict[str, np.ndarray]],
                  feature_source: Any, compression: dict[str, Any]) -> None:
    """Write a self-contained file atomically. ``feature_source(name, lo, hi)`` yields rows of a feature
    (a site, or a site's step mean ``<site>.mean``)."""
    n = len(tables["steps"]["trace"])
    hidden, dtype = attrs["hidden_size"], attrs["storage_dtype"]
    block = max(1, _COPY_BLOCK_BYTES // (hidden * np.dtype(dtype).itemsize))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with create_h5(tmp, path) as f:
            for k, v in attrs.items():
                f.attrs[k] = _encode_attr(k, v)
            _write_tables(f, tables)
            f.create_group(FEATURE_GROUP)
            if attrs.get("mean_sites"):
                f.create_group(MEAN_GROUP)
            for name in feature_names(attrs["sites"], attrs.get("mean_sites") or []):
                ds = _create_feature_dataset(f, name, n, hidden, dtype, compression)
                for lo in range(0, n, block):
                    hi = min(n, lo + block)
                    ds[lo:hi] = feature_source(name, lo, hi)
                    # Flushed while the dataset is open: a failed write (a full disk) is raised
                    # here, not swallowed when the dataset is dropped.
                    f.flush()
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_path(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()



def estimate_bytes(num_steps: int, num_sites: int, hidden_size: int, dtype: str = "float16") -> int:
    """Bytes of feature data for ``num_steps`` boundaries (tables add ~40 bytes per step)."""
    return int(num_steps) * (int(num_sites) * int(hidden_size) * np.dtype(dtype).itemsize + 40)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
