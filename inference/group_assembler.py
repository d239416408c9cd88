"""Live group features (issue 23 item 3): a trace's boundary state against its siblings' so far.

A group scorer (a probe on ``<site>.group`` or ``<site>.gdev``, time-aligned, possibly beside
plain sites of the same width; :mod:`stepprobe.probes.group_features`) cannot be scored row by row on the device: a row's
features depend on the other traces of its problem. So the worker's capture copies each
boundary row's raw states to the host (group scorers only: one ``[sites, hidden]`` float32
copy per boundary row), and this assembler, pure host code, keeps per problem group every
trace's captured boundaries (generated-token position, states). For the rows of one step it
calls **the offline functions** on the group's rows so far: :func:`visible_siblings` (each
sibling's latest boundary at position <= the row's, rows of the same step included), then
:func:`group_features` / :func:`group_deviation` with the checkpoint's standardization; the
probe then runs on the host.

Groups: the ``group`` of ``extra_args={"stepprobe": {...}}`` (``stepprobe run``/``bench`` send
one per prompt, with ``group_size``), else the parent of an ``n > 1`` child request (vLLM names
them ``{i}_{parent}``; :func:`stepprobe.inference.plugin.request_group`), else the request alone.
The sibling count (the ``visible`` feature's denominator) is ``group_size`` where given, else
the members seen so far. A group is forgotten once ``group_size`` members (or, without it,
every member seen) have finished; a finished or pruned sibling's boundaries stay visible until then.

Where live can differ from offline on the same traces: a sibling whose boundary row at
position <= p is captured in a later step than the row at p (a sibling that lags, e.g. after
preemption, or that was scheduled later) is not visible to it live, while offline it is;
a trace's boundary at its very last token is never captured live (its hidden state is never
computed) but is in a recorded file. In lockstep decoding (no preemption) the two agree.

Pure numpy on host data; neither torch nor vLLM is imported.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from stepprobe.errors import StepprobeError
from stepprobe.layers import split_group
from stepprobe.probes.group_features import group_deviation, group_features, visible_siblings

from .tracker import WARMUP_PREFIXES


@dataclasses.dataclass
class _Group:
    size: int | None = None  # group_size where the request says it
    members: dict[str, int] = dataclasses.field(default_factory=dict)  # request id -> trace index
    finished: set[str] = dataclasses.field(default_factory=set)
    trace: list[int] = dataclasses.field(default_factory=list)  # per captured boundary row
    position: list[int] = dataclasses.field(default_factory=list)  # generated-token position
    states: list[np.ndarray] = dataclasses.field(default_factory=list)  # [sites, hidden] float32

    def n_siblings(self) -> int:
        return max(max(self.size or 0, len(self.members)) - 1, 1)


class GroupAssembler:
    """Per problem group, each trace's captured boundary states; the group features of new rows."""

    def __init__(self, names: Sequence[str], features: Mapping[str, Mapping[str, Any]],
                 stats: Mapping[str, tuple[np.ndarray, np.ndarray]]):
        """``names``: the probe's features in its order; ``features``: the group ones' {site, kind,
        alignment} (a scorer's ``group`` block; a plain site among ``names`` is its state as captured);
        ``stats``: per site, the (mean, std) the group features were trained with."""
        self.names = list(names)
        self.kinds = [(features[n]["site"], features[n]["kind"]) if n in features else (n, None) for n in self.names]
        bad = [n for n in self.names if n not in features and split_group(n)[1] is not None]
        bad += [n for n in features if features[n]["kind"] not in (".group", ".gdev")
                or features[n]["alignment"] != "time" or features[n]["site"] not in stats]
        if bad:
            raise StepprobeError(f"the live group assembler computes time-aligned <site>.group and <site>.gdev "
                                 f"features of hidden-state sites; not {', '.join(bad)}")
        self.sites = list(dict.fromkeys(site for site, _ in self.kinds))  # what the worker captures, in order
        self.stats = {s: (np.asarray(m, dtype=np.float64), np.asarray(d, dtype=np.float64)) for s, (m, d) in stats.items()}
        self.groups: dict[str, _Group] = {}
        self.members: dict[str, tuple[str, int]] = {}  # request id -> (group, prompt length)
        self.n_rows = 0

    @classmethod
    def for_scorer(cls, scorer: Any) -> "GroupAssembler":
        scorer.check_live()
        return cls(scorer.sites, scorer.group["features"], scorer.group_stats())

    def add(self, rid: str, group: str, prompt_len: int, size: int | None = None) -> None:
        """A scheduled request (again, when resumed: nothing changes then)."""
        if rid in self.members or rid.startswith(WARMUP_PREFIXES):
            return
        g = self.groups.setdefault(group, _Group())
        if size:
            g.size = int(size)
        g.members[rid] = len(g.members)
        self.members[rid] = (group, int(prompt_len))

    def finish(self, rid: str) -> None:
        """A finished (or pruned) request; its group goes once every member has finished."""
        m = self.members.get(rid)
        if m is None:
            return
        g = self.groups[m[0]]
        g.finished.add(rid)
        if len(g.finished) >= max(g.size or 0, len(g.members)):
            for r in g.members:
                self.members.pop(r, None)
            del self.groups[m[0]]

    def features(self, keys: Sequence[tuple[str, int]], states: np.ndarray) -> np.ndarray:
        """Add the rows ``keys`` (request id, absolute position) with ``states`` ``[n, sites, hidden]``
        and return their features ``float32 [n, features, width]`` (the probe's input)."""
        states = np.asarray(states, dtype=np.float32)
        if states.ndim != 3 or states.shape[:2] != (len(keys), len(self.sites)):
            raise StepprobeError(f"group assembler: expected states [{len(keys)}, {len(self.sites)}, hidden], "
                                 f"got {list(states.shape)}")
        new: dict[str, list[tuple[int, int]]] = {}
        for i, (rid, pos) in enumerate(keys):
            if rid not in self.members:  # not seen as scheduled (should not happen): a group of its own
                self.add(rid, f"\0{rid}", 0)
            group, prompt_len = self.members[rid]
            g = self.groups[group]
            g.trace.append(g.members[rid])
            g.position.append(int(pos) - prompt_len)
            g.states.append(states[i])
            new.setdefault(group, []).append((i, len(g.trace) - 1))
        self.n_rows += len(keys)
        out: np.ndarray | None = None
        for group, pairs in new.items():
            feats = self._group_rows(self.groups[group], [row for _, row in pairs])
            if out is None:
                out = np.zeros((len(keys), len(self.names), feats.shape[2]), dtype=np.float32)
            out[[i for i, _ in pairs]] = feats
        return out if out is not None else np.zeros((0, len(self.names), 0), dtype=np.float32)

    def _group_rows(self, g: _Group, rows: list[int]) -> np.ndarray:
        trace, position = np.asarray(g.trace), np.asarray(g.position)
        step = np.zeros(len(trace), dtype=np.int64)  # each trace's boundaries in position order
        for t in np.unique(trace):
            own = np.flatnonzero(trace == t)
            step[own[np.argsort(position[own], kind="stable")]] = np.arange(len(own))
        vis_all = visible_siblings(np.zeros(len(trace), dtype=np.int64), trace, step, position, "time")
        needed = sorted(set(rows).union(*(vis_all[r].tolist() for r in rows)))
        local = {r: j for j, r in enumerate(needed)}
        is_new = set(rows)
        vis = [np.asarray([local[v] for v in vis_all[r]], dtype=np.int64) if r in is_new else np.zeros(0, np.int64)
               for r in needed]
        x = np.stack([g.states[r] for r in needed])  # [m, sites, hidden]
        n_sib = np.full(len(needed), g.n_siblings())
        cols = []
        for site, kind in self.kinds:
            xs = x[:, self.sites.index(site)]
            cols.append(xs if kind is None else group_features(xs, vis, n_sib, self.stats[site]) if kind == ".group"
                        else group_deviation(xs, vis, self.stats[site]))
        return np.stack(cols, axis=1).astype(np.float32)[[local[r] for r in rows]]
