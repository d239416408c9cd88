"""The worker side: capture step-boundary hidden states inside vLLM and score them.

vLLM compiles the model (Dynamo + Inductor on CPU; plus CUDA graphs on a GPU) right after
loading it; hooks added later never fire. So the capture hooks go in **between** loading
and compiling: :class:`StepprobeWorker` is the platform's own worker class whose
``load_model`` installs them, and vLLM then compiles (and graph-captures) the hooked model.
A hook is pure tensor code: it copies the whole site output for the batch
(``hidden_states + residual`` for a decoder layer) into a persistent buffer registered on
the module, so it survives tracing and graph replay. Nothing else in vLLM is wrapped: no
private forward method, only the worker's public ``execute_model`` / ``sample_tokens``
(which both model runners, V1 and V2, are driven through, V2's kernel warm-up included).

Which rows are step boundaries is decided on the **host**, from data vLLM brings to the
host anyway, so a step without a boundary costs no device-to-host transfer and no sync:

- the sampled token ids of every step (``ModelRunnerOutput.sampled_token_ids``; with async
  scheduling, read when vLLM's own async output wrapper copies them, i.e. when vLLM calls
  its ``get_output``: ``.model_runner_output`` on Model Runner V2, ``._model_runner_output``
  on V1) run through the shared :class:`BoundaryDetector`; a token that completes a
  boundary at position ``p`` makes ``p`` *pending*;
- the rows of a step: V2's ``execute_model_state.input_batch`` (its sorted request order
  and ``query_start_loc_np``) or, on V1, the output's ``req_ids`` with the scheduler's
  ``num_scheduled_tokens``; the positions start at the scheduler's ``num_computed_tokens``;
- the row holding position ``p`` is in the first forward pass that feeds token ``p``
  (the next decode step, or the re-prefill of a resumed request); only those rows are
  gathered (``index_select`` with a non-blocking host-to-device index), scored by the
  probe on the device, and copied back non-blocking; the scores are read when the copy
  has landed (at once on CPU; a step or two later on a GPU) and attached to that step's
  runner output as ``stepprobe_steps`` (``{req_id: [[position, score], ...]}``).

With async scheduling the token fed in a step was sampled by the step before, which the
host may not know yet. Rows at positions whose token is not yet known (one per decoding
request) are copied device-to-device into a small ring (``STASH_STEPS`` steps); when the
token arrives and completes a boundary, its row is taken from the ring. A resumed request
(V2 re-sends it as new with all its tokens; V1 lists it in ``resumed_req_ids``) is
re-synchronised from the scheduler's tokens, so a token the scheduler dropped never shifts
positions. Positions are keys: a position is scored at most once.

Scores are computed only on the rank whose output vLLM returns (tensor parallel rank 0);
configurations whose rows this cannot read correctly are refused at start-up
(:func:`~stepprobe.inference.plugin.check_supported`). V2's kernel warm-up requests
(``_warmup_*``, run through this worker's ``execute_model``/``sample_tokens`` during
``compile_or_warm_up_model``) are not tracked.

Self-check: until the first ``VERIFY_BOUNDARIES`` step boundaries have been scored, the
buffers are filled with NaN before every forward pass, and a boundary row that is still NaN
afterwards (the hooks are not in the model vLLM actually ran) stops the engine with a
``StepprobeError`` instead of scoring stale features. This runs in every engine, the server
included; the client's canary (runner.py) is the same check on a forced-newline generation.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Sequence

import torch

from stepprobe.boundaries import BoundaryDetector, BoundaryRule
from stepprobe.errors import ArtifactMismatch, StepprobeError
from stepprobe.layers import EMBED, FINAL_NORM, layer_index

from .plugin import PluginSettings, check_supported, check_vllm_version
from .seeds import install_seed_rewind

log = logging.getLogger(__name__)

BUFFER_NAME = "_stepprobe_capture"
VERIFY_BOUNDARIES = 8
STASH_STEPS = 4  # async scheduling: steps a row waits in the ring for its token (2 suffice)
WARMUP_PREFIXES = ("_warmup_", "_v2_mixed_warmup")  # V2 warm-up request ids (vllm/v1/worker/gpu/warmup.py)

# A step's batch as the model saw it: (req_id, first row, position of that row, rows).
Layout = list[tuple[str, int, int, int]]


def _hook_plain(module, args, output):  # embed_tokens: output is [n, hidden]
    getattr(module, BUFFER_NAME)[: output.shape[0]].copy_(output)


def _hook_first(module, args, output):  # final norm with residual: (normed, residual)
    out = output[0] if isinstance(output, tuple) else output
    getattr(module, BUFFER_NAME)[: out.shape[0]].copy_(out)


def _hook_layer(module, args, output):  # decoder layer: (hidden_states, residual)
    if isinstance(output, tuple):
        hidden, residual = output[0], output[1]
        res = hidden if residual is None else hidden + residual
    else:
        res = output
    getattr(module, BUFFER_NAME)[: res.shape[0]].copy_(res)


def site_modules(model: torch.nn.Module, sites: list[str]) -> dict[str, tuple[torch.nn.Module, Any]]:
    """The module and hook for each site of a vLLM decoder (``model.model.{embed_tokens,layers,norm}``)."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise ArtifactMismatch(f"stepprobe cannot find decoder layers in {type(model).__name__} "
                               "(expected model.model.layers)")
    out = {}
    for site in sites:
        if site == EMBED:
            out[site] = (inner.embed_tokens, _hook_plain)
        elif site == FINAL_NORM:
            out[site] = (inner.norm, _hook_first)
        else:
            idx = layer_index(site)
            if idx is None or idx >= len(inner.layers):
                raise ArtifactMismatch(f"scorer reads site {site!r}; the model has {len(inner.layers)} layers")
            out[site] = (inner.layers[idx], _hook_layer)
    return out


# ---------------------------------------------------------------------- batch layout
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


# ---------------------------------------------------------------------- host-side tracking
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


@dataclasses.dataclass
class _Result:
    keys: list[tuple[str, int]]
    scores: torch.Tensor
    unwritten: torch.Tensor | None
    features: torch.Tensor | None
    event: Any = None


def is_output_rank() -> bool:
    """Whether vLLM returns this worker's output (tensor-parallel rank 0; pipeline
    parallelism is refused at start-up)."""
    try:
        from vllm.distributed.parallel_state import get_tp_group

        return get_tp_group().rank_in_group == 0
    except (AssertionError, ImportError, AttributeError):  # not initialised: a single worker
        return True


class Capture:
    """Hooks, buffers, boundary tracking and scoring for one worker."""

    def __init__(self, worker: Any, settings: PluginSettings):
        from transformers import AutoConfig, AutoTokenizer

        from stepprobe.probes.checkpoint import load_scorer
        from stepprobe.provenance import model_identity

        self.settings = settings
        runner = worker.model_runner
        vcfg = worker.vllm_config
        mcfg = vcfg.model_config
        tok = AutoTokenizer.from_pretrained(mcfg.tokenizer, trust_remote_code=mcfg.trust_remote_code)
        hf_config = AutoConfig.from_pretrained(mcfg.model, trust_remote_code=mcfg.trust_remote_code)
        identity = model_identity(mcfg.model, hf_config, tok)
        self.scorer = load_scorer(settings.scorer, expected_model=identity)
        self.sites = self.scorer.sites
        rule = BoundaryRule.from_dict(self.scorer.boundary_rule)
        model = runner.get_model()
        device = getattr(runner, "device", None) or next(model.parameters()).device
        self._setup(BoundaryDetector.from_tokenizer(rule, tok), torch.device(device))
        self.probe = self.scorer.module.to(self.device)
        self.max_rows = int(vcfg.scheduler_config.max_num_batched_tokens) + 512  # room for padding
        self.stash_rows = int(vcfg.scheduler_config.max_num_seqs)
        for site, (module, hook) in site_modules(model, self.sites).items():
            buf = torch.zeros(self.max_rows, self.scorer.hidden_size, dtype=mcfg.dtype, device=self.device)
            module.register_buffer(BUFFER_NAME, buf, persistent=False)
            self.buffers[site] = getattr(module, BUFFER_NAME)
            self.handles.append(module.register_forward_hook(hook))
        log.info("stepprobe: capturing %s (hidden %d) for scorer %s before compilation (%s)",
                 ", ".join(self.sites), self.scorer.hidden_size, settings.scorer, type(runner).__module__)

    def _setup(self, detector: BoundaryDetector, device: torch.device) -> None:
        """State shared by the real constructor and tests that drive the capture by hand."""
        self.detector = detector
        self.device = device
        self.tracker = BoundaryTracker(detector)
        self.buffers: dict[str, torch.Tensor] = {}
        self.handles: list[Any] = []
        self.stash: torch.Tensor | None = None
        self.sampled: collections.deque = collections.deque()  # (step, req_ids, tokens), any thread
        self.results: collections.deque[_Result] = collections.deque()
        self.carried_steps: dict[str, list[list[float]]] = {}
        self.records: dict[str, dict[str, Any]] = {}
        self.step = 0
        self.n_captured = 0
        self.n_steps_processed = 0
        self.checking = False  # canary: verify captured rows were written this run
        self.n_unwritten = 0
        # Self-check in every engine (the server too, which has no canary): the first
        # VERIFY_BOUNDARIES boundary rows must have been written by this step's forward.
        self.verify_remaining = VERIFY_BOUNDARIES

    # ------------------------------------------------------------------ per step
    def begin_step(self, scheduler_output: Any) -> None:
        """Before the forward pass: learn the tokens that reached the host, the step's new,
        resumed and finished requests; NaN-fill the buffers while self-checking."""
        self.step += 1
        self._drain()
        for new in scheduler_output.scheduled_new_reqs:
            self.tracker.add(new.req_id, new.prompt_len, new.prefill_token_ids, self.step)
        cached = scheduler_output.scheduled_cached_reqs
        if cached.resumed_req_ids and cached.all_token_ids:  # V1: a resumed request's tokens
            for rid in cached.resumed_req_ids:
                toks = cached.all_token_ids.get(rid)
                if toks is not None:
                    self.tracker.resync(rid, toks, self.step)
        for rid in scheduler_output.finished_req_ids:
            self.tracker.finish(rid)
        if self.verify_remaining > 0 or self.checking:
            for buf in self.buffers.values():
                buf.fill_(float("nan"))  # rows the hooks do not write stay NaN

    def end_step(self, scheduler_output: Any, out: Any, layout: Layout | None = None) -> None:
        """After the forward pass (``out`` is what the runner returned): gather and score this
        step's boundary rows, keep rows whose token is still unknown, attach ready scores."""
        mro = runner_output(out)
        if mro is None:
            return
        if layout is None:
            layout = layout_in_order(scheduler_output, mro.req_ids or [])
        gather, gkeys, stash, skeys = self.tracker.rows(layout)
        from_stash = self.tracker.take_from_stash()
        parts, keys = [], []
        if gather:
            idx = self._index(gather)
            parts.append(torch.stack([self.buffers[s].index_select(0, idx) for s in self.sites], dim=1))
            keys += gkeys
        if from_stash and self.stash is not None:
            slots = self._index([s for _, _, s, _ in from_stash])
            idxs = self._index([i for _, _, _, i in from_stash])
            parts.append(self.stash[slots, idxs])
            keys += [(r, p) for r, p, _, _ in from_stash]
        if stash:
            self._stash(stash, skeys)
        if parts:
            self._score(torch.cat(parts) if len(parts) > 1 else parts[0], keys)
        if layout:
            self.n_steps_processed += 1
        if hasattr(out, "req_ids"):  # synchronous output: vLLM already put the tokens on the host
            if mro.sampled_token_ids:
                for rid, toks in zip(mro.req_ids, mro.sampled_token_ids):
                    self.tracker.feed(rid, toks, self.step)
        else:
            self._watch(out, self.step)
        steps = self._resolve(block=False)
        if self.carried_steps:
            for rid, pairs in self.carried_steps.items():
                steps.setdefault(rid, [])[:0] = pairs
            self.carried_steps = {}
        if steps:
            mro.stepprobe_steps = steps

    def flush(self) -> None:
        """Wait for every outstanding score (RPC time, not per step); scores not yet handed to
        the scheduler go out with the next step's output."""
        self._drain()
        from_stash = self.tracker.take_from_stash()
        if from_stash and self.stash is not None:
            slots = self._index([s for _, _, s, _ in from_stash])
            idxs = self._index([i for _, _, _, i in from_stash])
            self._score(self.stash[slots, idxs], [(r, p) for r, p, _, _ in from_stash])
        for rid, pairs in self._resolve(block=True).items():
            self.carried_steps.setdefault(rid, []).extend(pairs)

    # ------------------------------------------------------------------ helpers
    def _drain(self) -> None:
        sampled = self.sampled
        while sampled:
            step, req_ids, tokens = sampled.popleft()
            for rid, toks in zip(req_ids, tokens or ()):
                self.tracker.feed(rid, toks, step)

    def _watch(self, async_out: Any, step: int) -> None:
        """Learn the step's sampled tokens when vLLM itself copies them to the host (its
        ``get_output``, possibly on another thread): no extra transfer, no extra sync."""
        get_output = getattr(async_out, "get_output", None)
        if get_output is None:
            return
        sampled = self.sampled

        def _get_output() -> Any:
            mro = get_output()
            sampled.append((step, list(mro.req_ids), mro.sampled_token_ids))
            return mro

        async_out.get_output = _get_output

    def _index(self, rows: list[int]) -> torch.Tensor:
        t = torch.tensor(rows, dtype=torch.long)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _stash(self, rows: list[int], keys: list[tuple[str, int]]) -> None:
        if self.stash is None:
            ref = next(iter(self.buffers.values()))
            self.stash = torch.empty(len(self.tracker.slot_keys), max(self.stash_rows, 1), len(self.sites),
                                     ref.shape[1], dtype=ref.dtype, device=self.device)
        if len(rows) > self.stash.shape[1]:
            self.tracker.n_lost += len(rows) - self.stash.shape[1]
            rows, keys = rows[: self.stash.shape[1]], keys[: self.stash.shape[1]]
        slot = self.step % self.stash.shape[0]
        idx = self._index(rows)
        for j, s in enumerate(self.sites):
            self.stash[slot, : len(rows), j].copy_(self.buffers[s].index_select(0, idx), non_blocking=True)
        self.tracker.put_stash(slot, keys)

    def _score(self, feats: torch.Tensor, keys: list[tuple[str, int]]) -> None:
        x = feats.float()
        with torch.no_grad():
            scores = self.probe(x).float().reshape(-1)
        check = self.checking or self.verify_remaining > 0
        unwritten = (~torch.isfinite(x)).flatten(1).any(dim=1) if check else None
        keep = x if self.settings.record_features else None
        if self.device.type == "cuda":
            host = [t.to("cpu", non_blocking=True) if t is not None else None for t in (scores, unwritten, keep)]
            event = torch.cuda.Event()
            event.record()
            self.results.append(_Result(keys, *host, event=event))
        else:
            self.results.append(_Result(keys, scores, unwritten, keep))

    def _resolve(self, block: bool) -> dict[str, list[list[float]]]:
        steps: dict[str, list[list[float]]] = {}
        while self.results:
            res = self.results[0]
            if res.event is not None:
                if not block and not res.event.query():
                    break  # read next step
                res.event.synchronize()
            self.results.popleft()
            self._consume(res, steps)
        return steps

    def _consume(self, res: _Result, steps: dict[str, list[list[float]]]) -> None:
        n = len(res.keys)
        if res.unwritten is not None:
            unwritten = int(res.unwritten.sum())
            self.n_unwritten += unwritten
            if self.verify_remaining > 0:
                self.verify_remaining = max(0, self.verify_remaining - n)
                if unwritten:
                    raise StepprobeError(
                        f"stepprobe self-check: {unwritten} of {n} step boundaries were found but the capture "
                        "hooks did not write their hidden states (the hooks are not in the model vLLM runs: "
                        "compiled or captured without them, or vLLM internals changed); refusing to score with "
                        "stale features")
        scores = res.scores.tolist()
        for i, ((rid, p), s) in enumerate(zip(res.keys, scores)):
            steps.setdefault(rid, []).append([p, s])
            if self.settings.keep_records:
                rec = self.records.setdefault(rid, {"positions": [], "scores": [], "features": []})
                rec["positions"].append(p)
                rec["scores"].append(s)
                if res.features is not None:
                    rec["features"].append(res.features[i].tolist())
        self.n_captured += n


def _platform_worker_base() -> type:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker

        return CPUWorker
    if current_platform.is_cuda_alike():
        from vllm.v1.worker.gpu_worker import Worker

        return Worker
    raise ArtifactMismatch(f"stepprobe's worker supports CPU and CUDA platforms, not {current_platform.device_name}")


class StepprobeWorkerMixin:
    """Added to the platform worker: hooks before compilation, scores after each step."""

    _stepprobe: Capture | None = None
    _stepprobe_installed = False
    _stepprobe_warming = False
    _stepprobe_sched_out: Any = None
    _stepprobe_layout: Layout | None = None

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)  # type: ignore[misc]
        check_vllm_version()
        install_seed_rewind(self.model_runner)  # type: ignore[attr-defined]  # seeded requests on CPU
        settings = PluginSettings.from_vllm_config(self.vllm_config)  # type: ignore[attr-defined]
        if settings.scorer:
            check_supported(self.vllm_config)  # type: ignore[attr-defined]
            self._stepprobe_installed = True
            if is_output_rank():  # other tensor-parallel ranks' outputs are discarded by vLLM
                self._stepprobe = Capture(self, settings)

    def compile_or_warm_up_model(self, *args: Any, **kwargs: Any) -> Any:
        # V2 sends fake "_warmup_*" requests through execute_model/sample_tokens here.
        self._stepprobe_warming = True
        try:
            return super().compile_or_warm_up_model(*args, **kwargs)  # type: ignore[misc]
        finally:
            self._stepprobe_warming = False

    def execute_model(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        cap = self._stepprobe
        if cap is None or self._stepprobe_warming:
            return super().execute_model(scheduler_output, *args, **kwargs)  # type: ignore[misc]
        cap.begin_step(scheduler_output)
        out = super().execute_model(scheduler_output, *args, **kwargs)  # type: ignore[misc]
        self._stepprobe_sched_out = scheduler_output
        ib = v2_input_batch(self.model_runner)  # type: ignore[attr-defined]
        self._stepprobe_layout = layout_from_v2_batch(ib, scheduler_output) if ib is not None else None
        if out is not None:  # the output came back without a sample_tokens call
            out = self._stepprobe_attach(out)
        return out

    def sample_tokens(self, *args: Any, **kwargs: Any) -> Any:
        out = super().sample_tokens(*args, **kwargs)  # type: ignore[misc]
        if self._stepprobe is not None and out is not None and not self._stepprobe_warming:
            out = self._stepprobe_attach(out)
        return out

    def _stepprobe_attach(self, out: Any) -> Any:
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

        so = self._stepprobe_sched_out
        if so is None or self._stepprobe is None:
            return out
        self._stepprobe_sched_out = None
        layout, self._stepprobe_layout = self._stepprobe_layout, None
        if out is EMPTY_MODEL_RUNNER_OUTPUT:
            from copy import copy

            out = copy(out)
        self._stepprobe.end_step(so, out, layout)
        return out

    # ---- collective_rpc methods (LLM.collective_rpc("stepprobe_...")) ----
    def stepprobe_info(self) -> dict[str, Any]:
        cap = self._stepprobe
        if cap is None:
            return {"installed": self._stepprobe_installed, "scoring": False}
        cap.flush()
        return {"installed": True, "scoring": True, "sites": cap.sites, "captured": cap.n_captured,
                "steps_processed": cap.n_steps_processed, "unwritten": cap.n_unwritten,
                "lost": cap.tracker.n_lost, "hidden_size": cap.scorer.hidden_size, "scorer": str(cap.settings.scorer)}

    def stepprobe_arm_check(self, on: bool = True) -> None:
        """Canary support: fill the capture buffers with NaN so rows a hook did not write show up."""
        cap = self._stepprobe
        if cap is None:
            return
        cap.flush()
        cap.checking = on
        cap.n_unwritten = 0
        if on:
            for buf in cap.buffers.values():
                buf.fill_(float("nan"))

    def stepprobe_take_records(self, clear: bool = True) -> dict[str, dict[str, Any]]:
        cap = self._stepprobe
        if cap is None:
            return {}
        cap.flush()
        recs = cap.records
        if clear:
            cap.records = {}
        return recs


StepprobeWorker = type("StepprobeWorker", (StepprobeWorkerMixin, _platform_worker_base()), {})
StepprobeWorker.__module__ = __name__
