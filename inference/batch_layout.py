"""A step's batch as the model saw it, read from vLLM's two model runners.

Which row of the capture buffers holds which request's position: V2's
``execute_model_state.input_batch`` (its sorted request order and ``query_start_loc_np``) or,
on V1, the output's ``req_ids`` with the scheduler's ``num_scheduled_tokens``; the positions
start at the scheduler's ``num_computed_tokens``. And where the ``ModelRunnerOutput`` is in
what ``sample_tokens``/``execute_model`` returned (plain, V2's or V1's async wrapper). Plain
Python on vLLM's objects; nothing here imports vLLM.
"""

from __future__ import annotations

from typing import Any, Sequence

# A step's batch as the model saw it: (req_id, first row, position of that row, rows).
Layout = list[tuple[str, int, int, int]]


def scheduled_positions(scheduler_output: Any) -> dict[str, int]:
    """Position of each scheduled request's first row (the scheduler's ``num_computed_tokens``)."""
    nc = {new.req_id: new.num_computed_tokens for new in scheduler_output.scheduled_new_reqs}
    cached = scheduler_output.scheduled_cached_reqs
    nc.update(zip(cached.req_ids, cached.num_computed_tokens))
    return nc


def layout_in_order(scheduler_output: Any, req_ids: Sequence[str]) -> Layout:
    """Rows laid out in ``req_ids`` order (V1: the runner output's order), each request taking
    ``num_scheduled_tokens[req_id]`` consecutive rows."""
    counts = scheduler_output.num_scheduled_tokens
    nc = scheduled_positions(scheduler_output)
    out: Layout = []
    off = 0
    for rid in req_ids:
        c = counts.get(rid, 0)
        if c and rid in nc:
            out.append((rid, off, nc[rid], c))
        off += c
    return out


def layout_from_v2_batch(input_batch: Any, scheduler_output: Any) -> Layout:
    """Rows of Model Runner V2's ``InputBatch`` (sorted decode-first, padded at the end):
    request ``i`` holds rows ``query_start_loc_np[i]:query_start_loc_np[i + 1]``."""
    nc = scheduled_positions(scheduler_output)
    qsl = input_batch.query_start_loc_np
    return [(rid, int(qsl[i]), nc[rid], int(qsl[i + 1] - qsl[i]))
            for i, rid in enumerate(input_batch.req_ids[: input_batch.num_reqs]) if rid in nc]


def v2_input_batch(model_runner: Any) -> Any:
    """V2's ``execute_model_state.input_batch`` between ``execute_model`` and ``sample_tokens``
    (V1's ``execute_model_state`` has no input batch: None)."""
    state = getattr(model_runner, "execute_model_state", None)
    ib = getattr(state, "input_batch", None)
    return ib if ib is not None and hasattr(ib, "query_start_loc_np") else None


def runner_output(out: Any) -> Any:
    """The ``ModelRunnerOutput`` inside what ``sample_tokens``/``execute_model`` returned:
    itself, V2's ``AsyncOutput.model_runner_output`` or V1's
    ``AsyncGPUModelRunnerOutput._model_runner_output``."""
    if out is None or hasattr(out, "req_ids"):
        return out
    for name in ("model_runner_output", "_model_runner_output"):
        mro = getattr(out, name, None)
        if mro is not None:
            return mro
    return None

