"""Host-side bookkeeping: which positions complete a step boundary, and which rows hold them.

Decided on the **host**, from data vLLM brings to the host anyway, so a step without a
boundary costs no device-to-host transfer and no sync:

- the sampled token ids of every step run through the shared :class:`BoundaryDetector`; a
  token that completes a boundary at position ``p`` makes ``p`` *pending*;
- the row holding position ``p`` is in the first forward pass that feeds token ``p`` (the
  next decode step, or the re-prefill of a resumed request): :meth:`BoundaryTracker.rows`
  names those rows for a step's :data:`~stepprobe.inference.batch_layout.Layout`.

With async scheduling the token fed in a step was sampled by the step before, which the host
may not know yet. Rows at positions whose token is not yet known (one per decoding request)
are kept in a small ring (``STASH_STEPS`` steps); when the token arrives and completes a
boundary, its row is taken from the ring. A resumed request (V2 re-sends it as new with all
its tokens; V1 lists it in ``resumed_req_ids``) is re-synchronised from the scheduler's
tokens, so a token the scheduler dropped never shifts positions. Positions are keys: a
position is scored at most once. V2's kernel warm-up requests (``_warmup_*``) are not
tracked.

Pure Python on host data: no tensor is read, and neither torch nor vLLM is imported.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from stepprobe.boundaries import BoundaryDetector

from .batch_layout import Layout

STASH_STEPS = 4  # async scheduling: steps a row waits in the ring for its token (2 suffice)
WARMUP_PREFIXES = ("_warmup_", "_v2_mixed_warmup")  # V2 warm-up request ids (vllm/v1/worker/gpu/warmup.py)


@dataclasses.dataclass
class _ReqState:
    prompt_len: int
    known: int = 0  # output tokens known on the host
    carry: str = ""
    since_step: int = 0  # outputs of earlier steps are stale (set when re-synchronised)
    pending: set[int] = dataclasses.field(default_factory=set)  # boundary positions awaiting their row
    scored: set[int] = dataclasses.field(default_factory=set)
    stashed: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)  # position -> (slot, index)


class BoundaryTracker:
    """Host-side bookkeeping: which positions complete a step boundary, and which rows of a
    step hold them. Pure Python on host data; no tensor is read."""

    def __init__(self, detector: BoundaryDetector, stash_steps: int = STASH_STEPS):
        self.detector = detector
        self.requests: dict[str, _ReqState] = {}
        self.slot_keys: list[list[tuple[str, int]]] = [[] for _ in range(stash_steps)]
        self.from_stash: list[tuple[str, int, int, int]] = []  # (req, position, slot, index)
        self.n_lost = 0

    def add(self, rid: str, prompt_len: int, tokens: Sequence[int] | None = None, step: int = 0) -> None:
        """A scheduled new request; V2 re-sends a resumed request as new, with all its tokens."""
        if rid.startswith(WARMUP_PREFIXES):
            return
        st = self.requests.get(rid)
        if st is None:
            st = self.requests[rid] = _ReqState(prompt_len)
        if tokens is not None and len(tokens) > prompt_len:
            self.resync(rid, tokens, step)

    def resync(self, rid: str, tokens: Sequence[int], step: int) -> None:
        """Take a resumed request's tokens from the scheduler (a token it dropped, e.g. the
        in-flight one of a request preempted under async scheduling, must not shift positions)."""
        st = self.requests.get(rid)
        if st is None:
            return
        st.since_step = step
        outs = tokens[st.prompt_len:]
        if len(outs) == st.known:
            return
        carry, hits = "", []
        for i, t in enumerate(outs):
            hit, carry = self.detector.step(carry, int(t))
            if hit:
                hits.append(st.prompt_len + i)
        st.known, st.carry = len(outs), carry
        st.pending = {p for p in hits if p not in st.scored}
        end = st.prompt_len + st.known
        for p, (slot, idx) in list(st.stashed.items()):
            if p < end and p in st.pending:
                st.pending.discard(p)
                st.scored.add(p)
                self.from_stash.append((rid, p, slot, idx))
        st.stashed.clear()

    def feed(self, rid: str, tokens: Sequence[int], step: int) -> None:
        """Sampled tokens of ``rid`` from the output of ``step``, in order."""
        st = self.requests.get(rid)
        if st is None or step < st.since_step or not tokens:
            return
        det = self.detector
        for t in tokens:
            p = st.prompt_len + st.known
            st.known += 1
            hit, st.carry = det.step(st.carry, int(t))
            loc = st.stashed.pop(p, None) if st.stashed else None
            if hit and p not in st.scored:
                if loc is not None:
                    st.scored.add(p)
                    self.from_stash.append((rid, p, loc[0], loc[1]))
                else:
                    st.pending.add(p)

    def finish(self, rid: str) -> None:
        self.requests.pop(rid, None)

    def rows(self, layout: Layout) -> tuple[list[int], list[tuple[str, int]], list[int], list[tuple[str, int]]]:
        """(rows to score now, their keys, rows whose token is not known yet, their keys)."""
        gather: list[int] = []
        gkeys: list[tuple[str, int]] = []
        stash: list[int] = []
        skeys: list[tuple[str, int]] = []
        requests = self.requests
        for rid, start, nc, n in layout:
            st = requests.get(rid)
            if st is None:
                continue
            hi = nc + n
            known_end = st.prompt_len + st.known
            if st.pending:
                for p in sorted(st.pending):
                    if nc <= p < hi and p < known_end:
                        gather.append(start + p - nc)
                        gkeys.append((rid, p))
                        st.pending.discard(p)
                        st.scored.add(p)
            for p in range(max(nc, known_end), hi):  # empty unless async scheduling runs ahead
                if p not in st.scored:
                    stash.append(start + p - nc)
                    skeys.append((rid, p))
        return gather, gkeys, stash, skeys

    def put_stash(self, slot: int, keys: list[tuple[str, int]]) -> None:
        for rid, p in self.slot_keys[slot]:  # rows overwritten before their token arrived
            st = self.requests.get(rid)
            if st is not None and st.stashed.get(p, (None,))[0] == slot:
                del st.stashed[p]
                self.n_lost += 1
        self.slot_keys[slot] = list(keys)
        for i, (rid, p) in enumerate(keys):
            self.requests[rid].stashed[p] = (slot, i)

    def take_from_stash(self) -> list[tuple[str, int, int, int]]:
        out, self.from_stash = self.from_stash, []
        return out

