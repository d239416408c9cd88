"""Group-aware features: a trace's step against its siblings' (issue 23, docs/group_signal.md).

A problem's N traces are sampled together, so when trace *t* reaches a step boundary (step
index *k*, generated-token position *p*) the scheduler also holds its siblings' boundary
states and text **so far**. The siblings' boundaries *visible* at that moment are, per
sibling, its latest boundary

- ``time`` alignment (default): at generated position <= *p* (a lockstep scheduler's view);
- ``step`` alignment: with step index <= *k*.

Nothing later of any trace is read, and neither is ``rel_position`` (it needs the trace's final
length). Feature names (:mod:`stepprobe.layers` parses them):

- ``<site>.group`` / ``<site>.group_step``: :data:`GROUP_FEATURES`, scalars from the
  site's states standardized per dimension (statistics without labels, from the training
  file): mean and max cosine to the visible siblings, cosine and distance to their centroid,
  the trace's rank in the group by mean cosine, the fraction of siblings visible;
- ``<site>.gdev``: the standardized state minus the visible siblings' centroid (hidden size);
- ``text.group``: :data:`TEXT_FEATURES` from the trace text alone (the numbers written so far
  against the siblings' numbers so far), no hidden state.

:func:`text_agreement` is the untrained text baseline and :func:`relative_to_siblings` a
single-trace score minus its visible siblings' mean. A scorer on ``<site>.group`` or
``<site>.gdev`` runs live: its checkpoint carries the standardization (:func:`checkpoint_info`)
and the worker's :mod:`stepprobe.inference.group_assembler` calls :func:`visible_siblings`,
:func:`group_features` and :func:`group_deviation` on the rows captured so far.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from stepprobe.errors import StepprobeError
from stepprobe.layers import GROUP_KINDS, TEXT_GROUP, split_group

log = logging.getLogger(__name__)

GROUP_FEATURES = ("mean_cos", "max_cos", "centroid_cos", "centroid_dist", "rank", "visible")
TEXT_FEATURES = ("number_jaccard", "last_number_match", "visible")
ALIGNMENTS = ("time", "step")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_EPS = 1e-6


def _groups(values: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(values, kind="stable")
    v = values[order]
    bounds = np.flatnonzero(np.r_[True, v[1:] != v[:-1], True]) if len(v) else np.array([0])
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def visible_siblings(problem: np.ndarray, trace: np.ndarray, step: np.ndarray, position: np.ndarray,
                     align: str = "time") -> list[np.ndarray]:
    """Per step row: the rows of its siblings' latest boundaries visible at that row (see the module doc)."""
    if align not in ALIGNMENTS:
        raise StepprobeError(f"unknown sibling alignment {align!r}; known: {', '.join(ALIGNMENTS)}")
    problem, trace = np.asarray(problem), np.asarray(trace)
    key = np.asarray(position if align == "time" else step, dtype=np.int64)
    step = np.asarray(step, dtype=np.int64)
    out: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(trace)
    for rows in _groups(problem):
        by_trace = {}
        for tr_rows in _groups(trace[rows]):
            r = rows[tr_rows]
            by_trace[int(trace[r[0]])] = r[np.argsort(step[r], kind="stable")]
        for t, own in by_trace.items():
            picks = []
            for s, sib in by_trace.items():
                if s == t:
                    continue
                j = np.searchsorted(key[sib], key[own], side="right") - 1  # keys rise with the step index
                picks.append(np.where(j >= 0, sib[np.maximum(j, 0)], -1))
            if not picks:
                continue
            m = np.stack(picks, axis=1)
            for i, row in enumerate(own):
                out[row] = m[i][m[i] >= 0]
    return out


def siblings_of(hs, align: str = "time") -> tuple[list[np.ndarray], np.ndarray]:
    """:func:`visible_siblings` of a :class:`HiddenStates` file, and each row's number of siblings."""
    st = hs.steps
    vis = visible_siblings(st["problem"], st["trace"], st["step"], st["position"], align)
    per_problem = np.bincount(np.asarray(hs.traces["problem"]).astype(np.int64))
    n_sib = np.maximum(per_problem[np.asarray(st["problem"]).astype(np.int64)] - 1, 1)
    return vis, n_sib


def standardize_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of states ``[n, H]`` (no labels involved)."""
    x = np.asarray(x, dtype=np.float64)
    return x.mean(0), np.maximum(x.std(0), _EPS)


def site_stats(read_site: Callable[[str], np.ndarray], site: str,
               memo: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The standardization a group feature of ``site`` uses by default: :func:`standardize_stats` of
    the file's states at the site (kept in ``memo``; what a trained scorer's checkpoint carries)."""
    memo = memo if memo is not None else {}
    if ("stats", site) not in memo:
        memo[("stats", site)] = standardize_stats(read_site(site))
    return memo[("stats", site)]


def alignment_of(name: str) -> str:
    """The sibling alignment a group feature reads (``.group_step``: step, else time)."""
    return "step" if split_group(name)[1] == ".group_step" else "time"


def checkpoint_info(names: list[str] | tuple[str, ...], read_site: Callable[[str], np.ndarray],
                    memo: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """What a scorer checkpoint keeps of the group features among ``names`` (None: there are none):
    ``{"features": {name: {"site", "kind", "alignment"}}, "stats": {site: {"mean", "std"}}}``,
    the standardization the training used (:func:`site_stats`)."""
    feats = {n: split_group(n) for n in names if split_group(n)[1] is not None}
    if not feats:
        return None
    info: dict[str, Any] = {"features": {}, "stats": {}}
    for name, (site, kind) in feats.items():
        info["features"][name] = {"site": site, "kind": kind, "alignment": alignment_of(name)}
        if name != TEXT_GROUP and site not in info["stats"]:
            mean, std = site_stats(read_site, site, memo)
            info["stats"][site] = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    return info


def group_features(x: np.ndarray, vis: list[np.ndarray], n_siblings: np.ndarray,
                   stats: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """:data:`GROUP_FEATURES` of every row, ``float32 [n, 6]``; a row with no visible sibling
    gets (0, 0, 0, 0, 0.5, 0)."""
    z = (np.asarray(x, dtype=np.float64) - stats[0]) / stats[1]
    u = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), _EPS)
    h = np.sqrt(z.shape[1])
    out = np.zeros((len(z), len(GROUP_FEATURES)), dtype=np.float64)
    out[:, 4] = 0.5
    for i, v in enumerate(vis):
        if len(v) == 0:
            continue
        cos = u[v] @ u[i]
        c = z[v].mean(0)
        members = np.r_[i, v]
        sims = u[members] @ u[members].T
        mean_sim = (sims.sum(1) - 1.0) / (len(members) - 1)
        rank = (np.sum(mean_sim[1:] < mean_sim[0]) + 0.5 * np.sum(mean_sim[1:] == mean_sim[0])) / len(v)
        out[i] = (cos.mean(), cos.max(), float(u[i] @ c / max(np.linalg.norm(c), _EPS)),
                  np.linalg.norm(z[i] - c) / h, rank, len(v) / n_siblings[i])
    return out.astype(np.float32)


def group_deviation(x: np.ndarray, vis: list[np.ndarray], stats: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The standardized state minus its visible siblings' centroid (zeros without one), ``float32 [n, H]``."""
    z = (np.asarray(x, dtype=np.float64) - stats[0]) / stats[1]
    out = np.zeros_like(z)
    for i, v in enumerate(vis):
        if len(v):
            out[i] = z[i] - z[v].mean(0)
    return out.astype(np.float32)


def relative_to_siblings(scores: np.ndarray, vis: list[np.ndarray]) -> np.ndarray:
    """A score minus the mean of its visible siblings' latest scores (0 without one)."""
    s = np.asarray(scores, dtype=np.float64)
    return np.array([s[i] - s[v].mean() if len(v) else 0.0 for i, v in enumerate(vis)])


# ---- text: the numbers written so far ---------------------------------------------------------------

def _prefix(text: str, k: int, delimiter: str) -> tuple[str, bool]:
    """The text up to and including the (k+1)-th non-overlapping delimiter; (whole text, False) if fewer."""
    end = -len(delimiter)
    for _ in range(k + 1):
        end = text.find(delimiter, end + len(delimiter))
        if end < 0:
            return text, False
    return text[:end + len(delimiter)], True


def step_texts(hs, traces: str | Path | None = None) -> list[str]:
    """Each step row's trace text up to and including its boundary, from the collect traces file."""
    path = resolve_traces(hs, traces)
    texts: dict[tuple[str, int], str] = {}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            rec = json.loads(line) if line.strip() else {}
            if n == 0 or "traces" not in rec:
                continue
            for t in rec["traces"]:
                texts[(str(rec["problem_id"]), int(t["sample_index"]))] = t.get("text") or ""
    ids = np.asarray(hs.problems["problem_id"]).astype(str)
    t_prob, t_sample = np.asarray(hs.traces["problem"]), np.asarray(hs.traces["sample_index"])
    delim = str(dict(hs.boundary_rule).get("delimiter", "\n\n"))
    out, short = [], 0
    for tr, k in zip(np.asarray(hs.steps["trace"]), np.asarray(hs.steps["step"])):
        key = (ids[t_prob[tr]], int(t_sample[tr]))
        if key not in texts:
            raise StepprobeError(f"{path} has no trace {key} of {getattr(hs, 'path', 'the file')}; give the traces "
                                 "file the HDF5 file was recorded from")
        text, ok = _prefix(texts[key], int(k), delim)
        short += not ok
        out.append(text)
    if short:
        log.warning("%d of %d step rows found fewer delimiters in the decoded text than boundaries; the whole text "
                    "stands for their prefix", short, len(out))
    return out


def resolve_traces(hs, traces: str | Path | None) -> Path:
    """The traces file: the one given, else the one the HDF5 file was recorded from, else ``../collect/traces.jsonl``."""
    cands = [Path(traces)] if traces else []
    src = dict(hs.header).get("source")
    if not traces:
        if isinstance(src, str):
            try:
                import ast

                src = ast.literal_eval(src)
            except (ValueError, SyntaxError):
                src = None
        if isinstance(src, dict) and src.get("path"):
            cands.append(Path(src["path"]))
        here = Path(str(getattr(hs, "path", "")))
        cands.append(here.parent.parent / "collect" / "traces.jsonl")
        cands.append(here.parent / "traces.jsonl")
    for c in cands:
        if c.is_file():
            return c
    raise StepprobeError(f"text group features need the traces file of {getattr(hs, 'path', 'the data')} "
                         f"(looked at {', '.join(map(str, cands)) or 'nothing'}); give it with --traces")


def _numbers(text: str) -> tuple[frozenset[float], float | None]:
    nums = [float(m) for m in _NUMBER.findall(text)]
    return frozenset(nums), (nums[-1] if nums else None)


def text_features(texts: list[str], vis: list[np.ndarray], n_siblings: np.ndarray) -> np.ndarray:
    """:data:`TEXT_FEATURES` per row, ``float32 [n, 3]``: mean Jaccard overlap of the number sets,
    the fraction of visible siblings whose latest number equals this one's, the fraction visible
    (0.5, 0.5, 0 when none is visible)."""
    parsed = [_numbers(t) for t in texts]
    out = np.zeros((len(texts), len(TEXT_FEATURES)), dtype=np.float64)
    out[:, :2] = 0.5
    for i, v in enumerate(vis):
        if len(v) == 0:
            continue
        mine, last = parsed[i]
        jac = [len(mine & parsed[j][0]) / len(mine | parsed[j][0]) if mine | parsed[j][0] else 0.5 for j in v]
        match = [float(last is not None and parsed[j][1] == last) for j in v]
        out[i] = (np.mean(jac), np.mean(match), len(v) / n_siblings[i])
    return out.astype(np.float32)


def text_agreement(texts: list[str], vis: list[np.ndarray], n_siblings: np.ndarray) -> np.ndarray:
    """The untrained text baseline: the mean of the Jaccard overlap and the latest-number match (0.5 alone)."""
    f = text_features(texts, vis, n_siblings)
    return f[:, :2].mean(1).astype(np.float64)


# ---- one entry point for the feature cache ----------------------------------------------------------

def compute_feature(hs, name: str, read_site: Callable[[str], np.ndarray], *, traces: str | Path | None = None,
                    stats: tuple[np.ndarray, np.ndarray] | None = None, memo: dict[str, Any] | None = None) -> np.ndarray:
    """The group feature ``name`` for every step row of ``hs`` (``read_site`` reads a plain site).

    ``stats``: the standardization of the site's states (default: this file's own, no labels);
    ``memo`` keeps the sibling index and texts between calls on one file."""
    site, kind = split_group(name)
    if kind is None:
        raise StepprobeError(f"{name!r} is not a group feature; they end in {', '.join(GROUP_KINDS)}")
    memo = memo if memo is not None else {}
    align = alignment_of(name)
    if ("vis", align) not in memo:
        memo[("vis", align)] = siblings_of(hs, align)
    vis, n_sib = memo[("vis", align)]
    if name == TEXT_GROUP:
        if "texts" not in memo:
            memo["texts"] = step_texts(hs, traces)
        return text_features(memo["texts"], vis, n_sib)
    x = read_site(site)
    st = stats if stats is not None else site_stats(read_site, site, memo)
    if kind == ".gdev":
        return group_deviation(x, vis, st)
    return group_features(x, vis, n_sib, st)
