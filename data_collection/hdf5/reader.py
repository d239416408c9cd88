"""Lazy, picklable reader of a hidden-states file (either layout) and its header."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ...errors import ArtifactMismatch, StepprobeError
from ...layers import all_sites, site_depth
from ...provenance import check_model_identity, check_schema
from .schema import (_COPY_BLOCK_BYTES, KIND, LAYOUT_PARTS, LAYOUT_SINGLE, READABLE_VERSIONS, _check_consistency,
                     _decode_attr, _h5py, _read_tables, chunk_rows, feature_names, feature_path, parts_dir)


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
        # Version 1 files are version 2 files without step means: read both.
        check_schema({**self.header, "schema_version": READABLE_VERSIONS[-1]
                      if self.header.get("schema_version") in READABLE_VERSIONS else self.header.get("schema_version")},
                     KIND, READABLE_VERSIONS[-1], f"hidden-states file {self.path}")
        for key in ("sites", "hidden_size", "num_layers", "model", "boundary_rule", "storage_dtype"):
            if key not in self.header:
                raise ArtifactMismatch(f"{self.path}: attribute {key!r} is missing")
        self.sites: list[str] = list(self.header["sites"])
        # Sites whose step means (``<site>.mean``) the file holds; empty for version 1.
        self.mean_sites: list[str] = list(self.header.get("mean_sites") or [])
        # Every readable feature name: the boundary sites, then the step means.
        self.feature_names: list[str] = feature_names(self.sites, self.mean_sites)
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
                                           f"features in {parts_dir(self.path).name}/ next to the file); the file "
                                           "cannot be resumed: record it again with `stepprobe record ... "
                                           "--overwrite`")

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
        if site not in self.feature_names:
            hint = (" (step means are recorded with `stepprobe record --step-mean`)" if site.endswith(".mean")
                    else "")
            raise StepprobeError(f"unknown site {site!r} in {self.path}{hint}; known sites: {', '.join(self.feature_names)}")
        return self._h5()[feature_path(site)]

    def features(self, site: str, rows: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
        """float32 ``[len(rows), hidden]`` for step rows ``rows`` (any order), or all rows.

        ``site`` is a site (the boundary token's hidden state) or a step-mean feature
        ``<site>.mean`` where the file has one (:attr:`feature_names`)."""
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
        unknown = [s for s in self.mean_sites if s not in self.sites]
        if unknown:
            raise ArtifactMismatch(f"{what}: mean_sites lists {', '.join(unknown)}, which are not among its sites")
        for site in self.feature_names:
            path = feature_path(site)
            if path not in f:
                raise ArtifactMismatch(f"{what}: features for {site!r} are missing ({path})")
            shape = f[path].shape
            if shape != (self.num_steps, self.hidden_size):
                raise ArtifactMismatch(f"{what}: {path} has shape {shape}, "
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

