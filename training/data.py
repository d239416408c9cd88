"""Training data: splits by problem, in-memory features, and the LightningDataModule.

Splits are by **problem**: every step of every trace of a problem lands in the same split
(train / validation / test), so no question is seen in two splits (the STEP paper's
step-level split leaks). The split is a seeded permutation of the sorted problem ids; its
seed, fractions and the ids of each split are recorded in every run directory.

Features are read through :class:`stepprobe.data_collection.hdf5.HiddenStates`, one whole
site at a time, and kept in memory (:class:`FeatureCache`), so a sweep or a study reads
each site from the file once, never per epoch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from typing import Any, Sequence

import lightning.pytorch as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset, WeightedRandomSampler

from stepprobe.errors import StepprobeError
from stepprobe.layers import split_group
from stepprobe.probes.features import FeatureSpec

from .metrics import TEST, TRAIN, VAL

log = logging.getLogger(__name__)

SPLITS = (TRAIN, VAL, TEST)


def open_hidden_states(path: str):
    """Open and validate an HDF5 file written by ``stepprobe record``."""
    from pathlib import Path

    from stepprobe.data_collection.hdf5 import HiddenStates

    if not Path(path).is_file():
        raise StepprobeError(f"hidden-state file not found: {path}")
    hs = HiddenStates(path)
    hs.validate()
    if not getattr(hs, "complete", True):
        log.warning("%s is not complete (a `stepprobe record` run in progress or killed); training on the "
                    "%d steps it holds so far", path, hs.num_steps)
    return hs


def row_problem_ids(hs) -> np.ndarray:
    """The problem id (string) of every step row."""
    prob = np.asarray(hs.steps["problem"])
    ids = np.asarray(hs.problems["problem_id"]).astype(str) if "problem_id" in hs.problems else None
    if ids is not None and np.issubdtype(prob.dtype, np.integer) and (prob.size == 0 or (prob.min() >= 0 and prob.max() < len(ids))):
        return ids[prob]
    return prob.astype(str)


def data_fingerprint(hs) -> dict[str, Any]:
    """What identifies the data a probe was trained on (stored with every artifact)."""
    header = dict(hs.header)
    return {
        "path": str(getattr(hs, "path", "")),
        "kind": header.get("kind"),
        "schema_version": header.get("schema_version"),
        "model": dict(hs.model),
        "boundary_rule": dict(hs.boundary_rule),
        "num_steps": int(hs.num_steps),
        "num_traces": int(hs.num_traces),
        "hidden_size": int(hs.hidden_size),
        "num_layers": int(hs.num_layers),
    }


def split_problems(problem_ids: Sequence[str], *, val_fraction: float = 0.15, test_fraction: float = 0.15,
                   seed: int = 0, groups: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Seeded split of the distinct problem ids into train / val / test (each non-empty).

    ``groups``: problem id -> group key; problems of one group (the same question under
    several ids) land in the same split. The split is drawn over groups, each named by its
    smallest id, so data without such duplicates splits exactly as without ``groups``.
    """
    ids = sorted(set(map(str, problem_ids)))
    members: dict[str, list[str]] = {}
    for pid in ids:
        members.setdefault((groups or {}).get(pid, pid), []).append(pid)
    by_first = {m[0]: m for m in members.values()}
    uniq = sorted(by_first)
    n = len(uniq)
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise StepprobeError(f"split fractions must be in (0, 1) and sum below 1 (val {val_fraction}, test {test_fraction})")
    if n < 3:
        what = "distinct questions" if len(ids) > n else "problems with steps"
        raise StepprobeError(f"need at least 3 problems to split by problem, the data has {n} {what}")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(val_fraction * n)))
    n_test = max(1, int(round(test_fraction * n)))
    if n_val + n_test >= n:
        n_val, n_test = 1, 1
    shuffled = [uniq[i] for i in perm]

    def expand(keys: list[str]) -> list[str]:
        return sorted(pid for k in keys for pid in by_first[k])

    return {TEST: expand(shuffled[:n_test]), VAL: expand(shuffled[n_test:n_test + n_val]),
            TRAIN: expand(shuffled[n_test + n_val:])}


def question_groups(hs) -> dict[str, str]:
    """Problem id -> its question (whitespace-normalized), for problems whose question is
    asked under more than one id; empty when the file has no questions or no duplicates."""
    if "question" not in hs.problems or "problem_id" not in hs.problems:
        return {}
    ids = np.asarray(hs.problems["problem_id"]).astype(str)
    qs = [" ".join(str(q.decode() if isinstance(q, bytes) else q).split()) for q in hs.problems["question"]]
    count: dict[str, int] = {}
    for q in qs:
        count[q] = count.get(q, 0) + 1
    return {pid: q for pid, q in zip(ids, qs) if count[q] > 1}


@dataclasses.dataclass
class SplitRows:
    """Row indices (into the file's step rows) of each split, and how they were chosen."""

    rows: dict[str, np.ndarray]
    problems: dict[str, list[str]]
    info: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {**self.info, "problems": self.problems,
                "num_steps": {k: int(len(v)) for k, v in self.rows.items()}}


def make_split(hs, *, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0,
               max_steps_per_trace: int = 0, subsample_seed: int = 0) -> SplitRows:
    """Split rows by problem; optionally keep at most ``max_steps_per_trace`` random steps per
    training trace (validation and test always keep every step)."""
    if int(hs.num_steps) == 0:
        raise StepprobeError(f"{getattr(hs, 'path', 'the data')} has {int(hs.num_traces)} traces but no step "
                             "boundary; nothing to train on (was the right --delimiter recorded?)")
    pid = row_problem_ids(hs)
    groups = question_groups(hs)
    problems = split_problems(pid, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                              groups=groups)
    rows = {s: np.flatnonzero(np.isin(pid, problems[s])) for s in SPLITS}
    if max_steps_per_trace and max_steps_per_trace > 0:
        tr = rows[TRAIN]
        trace = np.asarray(hs.steps["trace"])[tr]
        rng = np.random.default_rng(subsample_seed)
        keep = np.zeros(len(tr), dtype=bool)
        order = np.argsort(trace, kind="stable")
        bounds = np.flatnonzero(np.r_[True, trace[order][1:] != trace[order][:-1], True])
        for a, b in zip(bounds[:-1], bounds[1:]):
            idx = order[a:b]
            keep[idx if len(idx) <= max_steps_per_trace else rng.choice(idx, max_steps_per_trace, replace=False)] = True
        rows[TRAIN] = tr[keep]
    for s in SPLITS:
        if len(rows[s]) == 0:
            raise StepprobeError(f"the {s} split has no steps (problems: {problems[s][:5]}...)")
    info = {"by": "question" if groups else "problem", "seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction,
            "max_steps_per_trace": max_steps_per_trace, "subsample_seed": subsample_seed}
    return SplitRows(rows, problems, info)


def cv_splits(hs, split: SplitRows, folds: int, seed: int = 0) -> list[SplitRows]:
    """K-fold cross-validation over the non-test problems of ``split`` (problems of one question
    stay together; the test split is untouched): fold k validates on its problems and trains on
    the others'. The training rows keep ``split``'s subsampling."""
    from .metrics import TEST, TRAIN, VAL

    pid = row_problem_ids(hs)
    groups = question_groups(hs)
    ids = sorted(set(split.problems[TRAIN]) | set(split.problems[VAL]))
    keys = sorted({groups.get(p, p) for p in ids})
    if len(keys) < 2 * folds:
        raise StepprobeError(f"{folds}-fold cross-validation needs at least {2 * folds} training problems, "
                             f"the split has {len(keys)}")
    fold_of_key = {k: i % folds for i, k in enumerate(np.asarray(keys)[np.random.default_rng(seed).permutation(len(keys))])}
    train_rows = set(split.rows[TRAIN].tolist()) | set(split.rows[VAL].tolist())
    out = []
    for f in range(folds):
        val_ids = sorted(p for p in ids if fold_of_key[groups.get(p, p)] == f)
        tr_ids = sorted(p for p in ids if fold_of_key[groups.get(p, p)] != f)
        val = np.flatnonzero(np.isin(pid, val_ids))
        tr = np.array(sorted(r for r in np.flatnonzero(np.isin(pid, tr_ids)).tolist() if r in train_rows), dtype=np.int64)
        out.append(SplitRows({TRAIN: tr, VAL: val, TEST: split.rows[TEST]},
                             {TRAIN: tr_ids, VAL: val_ids, TEST: split.problems[TEST]},
                             {**split.info, "cv_fold": f, "cv_folds": folds}))
    return out


def missing_features(hs, names, traces: str | None = None) -> list[str]:
    """The features among ``names`` that ``hs`` cannot give: a plain site or step mean not
    recorded; a group feature whose base site is not recorded; ``text.group`` without the
    traces file (:func:`~stepprobe.probes.group_features.resolve_traces`)."""
    from stepprobe.layers import TEXT_GROUP

    known = set(getattr(hs, "feature_names", hs.sites))
    out = []
    for name in names:
        if name == TEXT_GROUP:
            from stepprobe.probes.group_features import resolve_traces

            try:
                resolve_traces(hs, traces)
            except StepprobeError:
                out.append(name)
        elif split_group(name)[0] not in known:
            out.append(name)
    return out


class FeatureCache:
    """Whole sites of one file in memory (float32 [num_steps, hidden]), least recently used out.

    Each site is read once; ``max_bytes`` bounds the memory (a tune over many layers keeps
    the most recent ones).
    """

    def __init__(self, hs, max_bytes: int = 4 << 30, traces: str | None = None,
                 group_stats: dict[str, tuple[np.ndarray, np.ndarray]] | None = None):
        self.hs = hs
        self.max_bytes = max_bytes
        self.traces = traces  # the collect traces of ``hs``, for text group features (default: found)
        self.group_stats = group_stats or {}  # a scorer's standardization of group features (default: this file's)
        self._data: OrderedDict[str, np.ndarray] = OrderedDict()
        self._group_memo: dict = {}
        self.reads = 0

    def site(self, name: str) -> np.ndarray:
        if name in self._data:
            self._data.move_to_end(name)
            return self._data[name]
        if split_group(name)[1] is not None:  # computed from the plain site and the trace's siblings
            from stepprobe.probes.group_features import compute_feature

            return self._keep(name, compute_feature(self.hs, name, self.site, traces=self.traces,
                                                    stats=self.group_stats.get(split_group(name)[0]),
                                                    memo=self._group_memo))
        known = getattr(self.hs, "feature_names", self.hs.sites)
        if name not in known:
            hint = " (step means are recorded with `stepprobe record --step-mean`)" if name.endswith(".mean") else ""
            raise StepprobeError(f"site {name!r} is not in {getattr(self.hs, 'path', 'the file')}{hint}; "
                                 f"it has {', '.join(known)}")
        arr = np.ascontiguousarray(self.hs.features(name), dtype=np.float32)
        self.reads += 1
        return self._keep(name, arr)

    def group_info(self, names) -> dict | None:
        """What a scorer checkpoint keeps of the group features among ``names`` (None: none), with the
        standardization these features were computed with (:func:`~stepprobe.probes.group_features.checkpoint_info`)."""
        from stepprobe.probes.group_features import checkpoint_info

        return checkpoint_info(list(names), self.site, self._group_memo)

    def _keep(self, name: str, arr: np.ndarray) -> np.ndarray:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        check_finite(self.hs, arr[:, None, :], [name])
        self._data[name] = arr
        while len(self._data) > 1 and sum(a.nbytes for a in self._data.values()) > self.max_bytes:
            self._data.popitem(last=False)
        return arr

    def stack(self, sites: Sequence[str], rows: np.ndarray) -> np.ndarray:
        """``float32 [len(rows), len(sites), hidden]``."""
        return np.stack([self.site(s)[rows] for s in sites], axis=1)


@dataclasses.dataclass
class SplitArrays:
    """One split in memory: features and the per-row metadata metrics need."""

    x: np.ndarray  # [n, S, H] float32
    y: np.ndarray  # [n] int64 (1 = the trace ends correct)
    trace: np.ndarray
    problem: np.ndarray
    step: np.ndarray
    rel_position: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def split_arrays(hs, cache: FeatureCache, sites: Sequence[str], rows: np.ndarray) -> SplitArrays:
    steps = hs.steps
    pid = row_problem_ids(hs)
    return SplitArrays(
        x=cache.stack(sites, rows),
        y=np.asarray(steps["label"])[rows].astype(np.int64),
        trace=np.asarray(steps["trace"])[rows],
        problem=pid[rows],
        step=np.asarray(steps["step"])[rows],
        rel_position=np.asarray(steps["rel_position"], dtype=np.float64)[rows],
        rows=rows,
    )


class ProblemBatchSampler(Sampler):
    """Batches of whole problems: each epoch the problems are shuffled and dealt, in that
    order, into a fixed number of batches (about ``batch_size`` steps each, a problem never
    split), so a within-problem loss sees every pair of a problem's steps in one batch. The
    number of batches is the same every epoch (Lightning counts them once)."""

    def __init__(self, problem: np.ndarray, batch_size: int, seed: int = 0):
        self.groups = [np.sort(g) for g in _group_rows(problem)]
        total = sum(len(g) for g in self.groups)
        self.num_batches = max(1, min(len(self.groups), int(round(total / max(1, int(batch_size))))))
        self.seed = seed
        self.epoch = 0

    def __iter__(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        self.epoch += 1
        for chunk in np.array_split(rng.permutation(len(self.groups)), self.num_batches):
            yield np.concatenate([self.groups[i] for i in chunk]).tolist()

    def __len__(self) -> int:
        return self.num_batches


def _group_rows(values: np.ndarray) -> list[np.ndarray]:
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    v = values[order]
    bounds = np.flatnonzero(np.r_[True, v[1:] != v[:-1], True]) if len(v) else np.array([0])
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def check_finite(hs, x: np.ndarray, sites: Sequence[str]) -> None:
    """Refuse NaN/inf features (one line naming the file, the sites and how many steps)."""
    bad = ~np.isfinite(x).all(axis=2)  # [n, S]
    if bad.any():
        which = [f"{site} ({int(bad[:, k].sum())} steps)" for k, site in enumerate(sites) if bad[:, k].any()]
        raise StepprobeError(f"{getattr(hs, 'path', 'the data')}: NaN or inf features at {', '.join(which)}; "
                             "record the file again (a float16 overflow? try --dtype bfloat16 or float32)")


def check_classes(split: "SplitRows", hs, *, test: bool = True) -> None:
    """Refuse a validation split with one class (its AUROC is undefined, so the best epoch
    and any threshold would be picked blind); warn about a one-class test split."""
    label = np.asarray(hs.steps["label"])
    for s in (VAL, TEST) if test else (VAL,):
        y = label[split.rows[s]]
        n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
        if n_pos and n_neg:
            continue
        msg = (f"the {'validation' if s == VAL else s} split ({len(split.problems[s])} problems) has only one class ({n_pos} correct, {n_neg} "
               f"incorrect steps)")
        if s == VAL:
            raise StepprobeError(f"{msg}: its AUROC is undefined and the best epoch would be picked blind; use more "
                                 "problems, a larger --val-fraction or another --split-seed")
        log.warning("%s: test AUROC is undefined; use more problems or another --split-seed", msg)


class ProbeDataModule(L.LightningDataModule):
    """Train / val / test tensors for one feature spec, built over a :class:`HiddenStates`.

    ``imbalance="sampler"`` draws training batches with class-balanced weights; otherwise
    batches are shuffled uniformly (``pos_weight`` is handled by the loss). With
    ``group_batches`` (the within-problem losses) each training batch holds whole problems
    (:class:`ProblemBatchSampler`) and carries each row's problem index and relative position.
    """

    def __init__(self, hs, spec: FeatureSpec, split: SplitRows, *, cache: FeatureCache | None = None,
                 batch_size: int = 256, imbalance: str = "pos_weight", seed: int = 0, include_test: bool = True,
                 group_batches: bool = False):
        super().__init__()
        self.hs = hs
        self.spec = spec
        self.split = split
        self.cache = cache or FeatureCache(hs)
        self.batch_size = int(batch_size)
        self.imbalance = imbalance
        self.seed = seed
        self.include_test = include_test
        self.group_batches = group_batches
        self.arrays: dict[str, SplitArrays] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.arrays:
            return
        for s in SPLITS:
            if s == TEST and not self.include_test:
                continue
            self.arrays[s] = split_arrays(self.hs, self.cache, self.spec.sites, self.split.rows[s])

    def class_counts(self) -> tuple[int, int]:
        y = self.arrays[TRAIN].y
        return int((y == 0).sum()), int((y == 1).sum())

    def _dataset(self, s: str) -> TensorDataset:
        a = self.arrays[s]
        return TensorDataset(torch.from_numpy(a.x), torch.from_numpy(a.y).float())

    def train_dataloader(self) -> DataLoader:
        ds = self._dataset(TRAIN)
        g = torch.Generator().manual_seed(self.seed)
        if self.group_batches:
            a = self.arrays[TRAIN]
            _, pidx = np.unique(a.problem, return_inverse=True)
            ds = TensorDataset(torch.from_numpy(a.x), torch.from_numpy(a.y).float(), torch.from_numpy(pidx.astype(np.int64)),
                               torch.from_numpy(a.rel_position.astype(np.float32)))
            return DataLoader(ds, batch_sampler=ProblemBatchSampler(a.problem, self.batch_size, self.seed))
        if self.imbalance == "sampler":
            y = self.arrays[TRAIN].y
            n_neg, n_pos = self.class_counts()
            w = np.where(y == 1, 0.5 / max(n_pos, 1), 0.5 / max(n_neg, 1))
            sampler = WeightedRandomSampler(torch.as_tensor(w, dtype=torch.double), len(y), replacement=True, generator=g)
            return DataLoader(ds, batch_size=self.batch_size, sampler=sampler)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=True, generator=g)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset(VAL), batch_size=4096, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if TEST not in self.arrays:
            raise StepprobeError("the test split is not loaded here (tuning never sees it)")
        return DataLoader(self._dataset(TEST), batch_size=4096, shuffle=False)
