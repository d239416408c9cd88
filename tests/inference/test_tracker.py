"""The host-side boundary tracker, apart from vLLM: imports, positions, the async ring."""

from __future__ import annotations

import json
import subprocess
import sys

from stepprobe.boundaries import BoundaryDetector, BoundaryRule
from stepprobe.inference.tracker import WARMUP_PREFIXES, BoundaryTracker

# Token ids: 0 "a", 1 "\n", 2 "\n\n" (one token that completes the delimiter), 3 "b".
PIECES = ["a", "\n", "\n\n", "b"]


def _tracker() -> BoundaryTracker:
    return BoundaryTracker(BoundaryDetector(BoundaryRule("\n\n"), PIECES))


def test_importing_the_tracker_imports_neither_vllm_nor_torch():
    code = ("import sys, json; import stepprobe.inference.tracker, stepprobe.inference.batch_layout; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'torch'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.splitlines()[-1]) == []


def test_the_capture_and_hooks_import_no_vllm_worker():
    code = ("import sys, json; import stepprobe.inference.capture, stepprobe.inference.hooks; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('vllm'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.splitlines()[-1]) == []


def test_a_boundary_is_scored_from_the_row_that_feeds_its_token():
    tr = _tracker()
    tr.add("r", prompt_len=3)
    tr.feed("r", [0, 1, 1, 3], step=1)  # "a\n\nb": "\n" + "\n" completes at output 2 = position 5
    assert tr.requests["r"].pending == {5}
    # The decode step that feeds position 5 (and 6): rows 10.. of the batch.
    gather, gkeys, stash, skeys = tr.rows([("r", 10, 5, 2)])
    assert (gather, gkeys) == ([10], [("r", 5)])
    assert (stash, skeys) == ([], [])  # position 6's token is known (no boundary): nothing to keep
    assert tr.rows([("r", 0, 5, 1)])[:2] == ([], [])  # scored once


def test_a_row_whose_token_is_unknown_waits_in_the_ring():
    tr = _tracker()
    tr.add("r", prompt_len=2)
    tr.feed("r", [0], step=1)  # position 2 known
    gather, _, stash, skeys = tr.rows([("r", 4, 3, 1)])  # the forward feeds position 3, not sampled yet
    assert gather == [] and (stash, skeys) == ([4], [("r", 3)])
    tr.put_stash(0, skeys)
    tr.feed("r", [2], step=2)  # position 3's token is "\n\n": a boundary, its row is in slot 0
    assert tr.take_from_stash() == [("r", 3, 0, 0)]
    assert tr.requests["r"].scored == {3}


def test_a_slot_overwritten_before_its_token_arrives_counts_as_lost():
    tr = _tracker()
    tr.add("r", prompt_len=1)
    tr.put_stash(0, [("r", 1)])
    tr.put_stash(0, [("r", 2)])
    assert tr.n_lost == 1


def test_resync_takes_the_schedulers_tokens_and_drops_stale_outputs():
    tr = _tracker()
    tr.add("r", prompt_len=1)
    tr.feed("r", [0, 3], step=1)
    tr.resync("r", [9, 2, 0, 3], step=5)  # the scheduler's tokens: prompt 9, then "\n\n" at position 1
    st = tr.requests["r"]
    assert (st.known, st.pending) == (3, {1})
    tr.feed("r", [2], step=4)  # an output of a step before the resync: ignored
    assert st.known == 3


def test_warmup_requests_are_not_tracked():
    tr = _tracker()
    for prefix in WARMUP_PREFIXES:
        tr.add(prefix + "0", prompt_len=1)
    assert tr.requests == {}
