"""The worker's capture driven by hand with V1- and V2-shaped batches, sync and async.

No engine: vLLM's own data classes (``SchedulerOutput``, ``NewRequestData``,
``CachedRequestData``, ``ModelRunnerOutput``, V2's ``InputBatch`` and ``AsyncOutput``, V1's
``AsyncGPUModelRunnerOutput``) are built the way vLLM's scheduler and model runners build
them, and a stand-in "forward pass" writes into the capture buffers a code that names the
request and position of every row (padding rows get NaN). The probe returns the code it
reads, so every score says exactly which row was scored. Covered: V2's sorted and padded
batches, V2's warm-up requests, async scheduling (tokens reach the host a step late), a
resumed request re-sent as new (V2) or as resumed (V1) after the scheduler dropped its
in-flight token, and the number of host syncs on steps without a boundary (zero).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

A, B, NL = 0, 1, 2
VOCAB = ["a", "b", "\n"]
ROWS = 64


class RowCode(torch.nn.Module):
    """A probe whose score is the first feature of the first site: the row's code."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 0]


def code(rid: str, pos: int) -> float:
    return 1000.0 * (int(rid.strip("_warmupr")) + 1) + pos


def make_capture():
    from stepprobe.boundaries import BoundaryDetector, BoundaryRule
    from stepprobe.inference.plugin import PluginSettings
    from stepprobe.inference.capture import Capture

    cap = Capture.__new__(Capture)
    cap.settings = PluginSettings(keep_records=True)
    cap._setup(BoundaryDetector(BoundaryRule("\n"), VOCAB), torch.device("cpu"))
    cap.sites = ["embed", "layer_00"]
    cap.buffers = {s: torch.zeros(ROWS, 4) for s in cap.sites}
    cap.probe = RowCode()
    cap.stash_rows = 8
    return cap


class _CopyDone:
    """vLLM's async outputs wait on a CUDA event; the CPU has none and the copy is done."""

    def synchronize(self) -> None:
        pass


def v2_async_output(mro, tokens):
    from vllm.v1.worker.gpu.async_utils import AsyncOutput

    out = AsyncOutput.__new__(AsyncOutput)  # __init__ starts CUDA-stream copies
    width = max([len(t) for t in tokens] + [1])
    out.model_runner_output = mro
    out.sampled_token_ids = np.array([t + [0] * (width - len(t)) for t in tokens], dtype=np.int64).reshape(-1, width)
    out.num_sampled_tokens_np = np.array([len(t) for t in tokens], dtype=np.int32)
    out.copy_event = _CopyDone()
    out.sampling_mask_tensors = out.num_nans = out.logprobs_tensors = out.pending_aux_output = out._has_fault = None
    out.prompt_logprobs_dict, out.prompt_token_id_logprobs_dict = {}, {}
    return out


def v1_async_output(mro, tokens):
    from vllm.v1.worker.gpu_model_runner import AsyncGPUModelRunnerOutput

    out = AsyncGPUModelRunnerOutput.__new__(AsyncGPUModelRunnerOutput)
    out._model_runner_output = mro
    out._invalid_req_indices = [i for i, t in enumerate(tokens) if not t]
    out.sampled_token_ids_cpu = torch.tensor([t[0] if t else 0 for t in tokens], dtype=torch.int64).reshape(-1, 1)
    out._sampled_token_ids = out.sampled_token_ids_cpu
    out.async_copy_ready_event = _CopyDone()
    out._logprobs_tensors = out._logprobs_tensors_cpu = out._num_nans_cpu = out._num_nans = out._has_fault = None
    out.vocab_size = len(VOCAB)
    return out


@dataclasses.dataclass
class _SimReq:
    prompt: list[int]
    script: list[int]
    nc: int = 0
    sampled: int = 0  # tokens sampled so far (the scheduler knows the count, not always the values)
    sent: bool = False
    resumed: bool = False
    paused: bool = False


class Sim:
    """vLLM's engine loop in miniature: schedule, forward, sample; with async scheduling the
    sampled tokens reach the host one step late (vLLM's ``get_output``)."""

    def __init__(self, cap, *, v2: bool, async_: bool, pad: int = 3):
        self.cap, self.v2, self.async_, self.pad = cap, v2, async_, pad
        self.reqs: dict[str, _SimReq] = {}
        self.finished: set[str] = set()
        self.in_flight = None

    def add(self, rid, prompt, script):
        self.reqs[rid] = _SimReq(list(prompt), list(script))

    def preempt(self, rid):
        """The scheduler frees the request; under async scheduling its in-flight token is dropped."""
        r = self.reqs[rid]
        if self.async_:
            r.sampled -= 1
        r.nc, r.resumed, r.paused = 0, True, True
        r.sent = not self.v2  # V2 re-sends it as new; V1 as a cached request in resumed_req_ids

    def step(self):
        from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
        from vllm.v1.outputs import ModelRunnerOutput

        so = SchedulerOutput.make_empty()
        so.finished_req_ids, self.finished = self.finished, set()
        cached = CachedRequestData.make_empty()
        nums = {}
        for rid, r in self.reqs.items():
            if r.paused:
                r.paused = False
                continue
            total = len(r.prompt) + r.sampled
            n = total - r.nc
            if n <= 0:
                continue
            nums[rid] = n
            known = r.prompt + r.script[: r.sampled]
            if not r.sent:
                so.scheduled_new_reqs.append(NewRequestData(
                    req_id=rid, prompt_token_ids=r.prompt, mm_features=[], sampling_params=None, pooling_params=None,
                    block_ids=([],), num_computed_tokens=r.nc, lora_request=None,
                    prefill_token_ids=known if self.v2 else None))
                r.sent = True
            else:
                cached.req_ids.append(rid)
                cached.num_computed_tokens.append(r.nc)
                cached.new_block_ids.append(None)
                cached.num_output_tokens.append(r.sampled)
                if r.resumed and not self.v2:  # V1: resumed requests come back as cached, with their tokens
                    cached.resumed_req_ids.add(rid)
                    cached.all_token_ids[rid] = known
            r.resumed = False
        so.scheduled_cached_reqs = cached
        so.num_scheduled_tokens = nums
        so.total_num_scheduled_tokens = sum(nums.values())
        if not nums:
            self.cap.begin_step(so)  # finished requests still reach the worker
            return None
        if self.v2:
            from vllm.v1.worker.gpu.model_runner import sort_batch_req_ids

            order = sort_batch_req_ids(nums, {}, 1)
        else:
            order = list(nums)
        self.cap.begin_step(so)
        # "forward": every row gets the code of its request and position; padding stays NaN
        for buf in self.cap.buffers.values():
            buf.fill_(float("nan"))
        off, starts = 0, {}
        for rid in order:
            starts[rid] = off
            for j in range(nums[rid]):
                for buf in self.cap.buffers.values():
                    buf[off + j] = code(rid, self.reqs[rid].nc + j)
            off += nums[rid]
        layout = None
        if self.v2:
            from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers

            ib = InputBatch.make_dummy(len(order), off + self.pad, InputBuffers(16, ROWS, torch.device("cpu")))
            ib.req_ids = order
            ib.query_start_loc_np = np.array([starts[r] for r in order] + [off], dtype=np.int32)
            from stepprobe.inference.batch_layout import layout_from_v2_batch

            layout = layout_from_v2_batch(ib, so)
        # sample: a request whose rows reach its last token samples its next one
        tokens = []
        for rid in order:
            r = self.reqs[rid]
            r.nc += nums[rid]
            if r.nc == len(r.prompt) + r.sampled and r.sampled < len(r.script):
                tokens.append([r.script[r.sampled]])
                r.sampled += 1
                if r.sampled == len(r.script):
                    self.finished.add(rid)
            else:
                tokens.append([])
        mro = ModelRunnerOutput(req_ids=list(order), req_id_to_index={r: i for i, r in enumerate(order)},
                                sampled_token_ids=None if self.async_ else tokens)
        if self.async_:
            out = (v2_async_output if self.v2 else v1_async_output)(mro, tokens)
        else:
            out = mro
        self.cap.end_step(so, out, layout)
        if self.async_:  # the engine core reads step k's output while step k + 1 runs
            if self.in_flight is not None:
                self.in_flight.get_output()
            self.in_flight = out
        for rid in [r for r in self.finished if r in self.reqs]:
            del self.reqs[rid]
        return out

    def run(self, max_steps=60, preempt_at=None):
        for k in range(max_steps):
            if preempt_at and k == preempt_at[0] and preempt_at[1] in self.reqs:
                self.preempt(preempt_at[1])
            if self.step() is None and not self.reqs:
                break
        if self.in_flight is not None:
            self.in_flight.get_output()
            self.in_flight = None
        self.cap.flush()


SCRIPTS = {"r0": [A, NL, B, NL, NL, A, NL, B, NL],
           "r1": [NL, A, A, B, NL, A, NL],
           "r2": [B, B, NL, A, NL, NL, B, A, A, NL, B]}
PROMPTS = {"r0": [A, B, A], "r1": [B] * 5, "r2": [A, A]}


def expected(rid):
    """Boundary positions of a trace the engine can score (not its last token, never fed
    back) and the code of the row each must be read from."""
    from stepprobe.boundaries import BoundaryDetector, BoundaryRule
    from stepprobe.inference.runner import captured_boundaries

    det = BoundaryDetector(BoundaryRule("\n"), VOCAB)
    p0 = len(PROMPTS[rid])
    return [(p0 + i, code(rid, p0 + i)) for i in captured_boundaries(det, SCRIPTS[rid])]


@pytest.mark.parametrize("v2", [True, False], ids=["v2", "v1"])
@pytest.mark.parametrize("async_", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("preempt", [None, (6, "r2")], ids=["plain", "resumed"])
def test_capture_scores_exactly_the_boundary_rows(v2, async_, preempt):
    cap = make_capture()
    sim = Sim(cap, v2=v2, async_=async_)
    # V2's kernel warm-up requests come through the same worker calls first
    sim.add("_warmup_0_", [A, A], [NL, NL, A])
    sim.run()
    assert cap.records == {} and cap.verify_remaining == 8 and cap.tracker.requests == {}
    for rid in SCRIPTS:
        sim.add(rid, PROMPTS[rid], SCRIPTS[rid])
    sim.run(preempt_at=preempt)
    for rid in SCRIPTS:
        rec = cap.records.get(rid, {"positions": [], "scores": []})
        got = sorted(zip(rec["positions"], rec["scores"]))
        assert got == expected(rid), rid
    assert cap.n_unwritten == 0 and cap.tracker.n_lost == 0
    assert cap.verify_remaining == 0


def test_scores_reach_the_scheduler_on_the_runner_output():
    cap = make_capture()
    sim = Sim(cap, v2=True, async_=False)
    sim.add("r1", PROMPTS["r1"], SCRIPTS["r1"])
    attached = {}
    for _ in range(12):
        out = sim.step()
        if out is None:
            break
        for rid, pairs in getattr(out, "stepprobe_steps", {}).items():
            attached.setdefault(rid, []).extend(tuple(p) for p in pairs)
    assert sorted(attached["r1"]) == expected("r1")


class SyncCounter:
    """Counts the calls that make the host wait for the device (or read device memory)."""

    NAMES = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        self.on = False
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, orig))
        monkeypatch.setattr(torch.cuda, "synchronize", self._wrap("cuda.synchronize", torch.cuda.synchronize))
        orig_is = torch.Tensor.index_select
        monkeypatch.setattr(torch.Tensor, "index_select", self._wrap("index_select", orig_is))

    def _wrap(self, name, orig):
        counter = self

        def wrapped(*args, **kwargs):
            if counter.on:
                counter.calls.append(name)
            return orig(*args, **kwargs)

        return wrapped


@pytest.mark.parametrize("v2", [True, False], ids=["v2", "v1"])
@pytest.mark.parametrize("async_", [False, True], ids=["sync", "async"])
def test_no_host_sync_on_steps_without_a_boundary(monkeypatch, v2, async_):
    cap = make_capture()
    sim = Sim(cap, v2=v2, async_=async_)
    for i in range(4):
        sim.add(f"r{i}", [A, B], [A, B] * 6)  # no newline: never a boundary
    counter = SyncCounter(monkeypatch)
    orig_begin, orig_end = cap.begin_step, cap.end_step

    def counted(fn):
        def run(*args, **kwargs):
            counter.on = True
            try:
                return fn(*args, **kwargs)
            finally:
                counter.on = False
        return run

    cap.begin_step, cap.end_step = counted(orig_begin), counted(orig_end)
    for _ in range(8):
        sim.step()
    syncs = [c for c in counter.calls if c != "index_select"]
    assert syncs == []
    if async_:  # rows whose token is not on the host yet are kept device-side (a copy, not a sync)
        assert "index_select" in counter.calls
    else:  # nothing is even gathered
        assert counter.calls == []
    assert cap.n_captured == 0
