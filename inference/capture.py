"""One worker's capture: buffers, boundary tracking, scoring on the device.

Per step (:meth:`Capture.begin_step` before the forward pass, :meth:`Capture.end_step`
after it), the boundary rows the :class:`~stepprobe.inference.tracker.BoundaryTracker`
names are gathered (``index_select`` with a non-blocking host-to-device index), scored by
the probe on the device, and copied back non-blocking; the scores are read when the copy has
landed (at once on CPU; a step or two later on a GPU) and attached to that step's runner
output as ``stepprobe_steps`` (``{req_id: [[position, score], ...]}``). Rows whose token is
not known yet are copied device-to-device into the ring (``STASH_STEPS`` steps). The sampled
tokens are read when vLLM's own async output wrapper copies them to the host (its
``get_output``): no extra transfer, no extra sync.

Self-check: until the first ``VERIFY_BOUNDARIES`` step boundaries have been scored, the
buffers are filled with NaN before every forward pass, and a boundary row that is still NaN
afterwards (the hooks are not in the model vLLM actually ran) stops the engine with a
``StepprobeError`` instead of scoring stale features. This runs in every engine, the server
included; the client's canary (runner.py) is the same check on a forced-newline generation.

A **group scorer** (a probe on ``<site>.group`` / ``<site>.gdev``, issue 23) captures its base
sites; each boundary row's raw states are copied to the host (the only extra cost: one
``[sites, hidden]`` copy per boundary row, for group scorers only) and the
:class:`~stepprobe.inference.group_assembler.GroupAssembler` computes the row's features
against its siblings' rows so far with the offline functions; the probe runs on the host.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any

import torch

from stepprobe.boundaries import BoundaryDetector, BoundaryRule
from stepprobe.errors import StepprobeError

from .batch_layout import Layout, layout_in_order, runner_output
from .hooks import capture_rows, install_hooks
from .plugin import PluginSettings, request_group, request_overrides
from .tracker import BoundaryTracker

log = logging.getLogger(__name__)

VERIFY_BOUNDARIES = 8


@dataclasses.dataclass
class _Result:
    keys: list[tuple[str, int]]
    scores: torch.Tensor
    unwritten: torch.Tensor | None
    features: torch.Tensor | None
    event: Any = None



class Capture:
    """Hooks, buffers, boundary tracking and scoring for one worker."""

    assembler: Any = None  # a GroupAssembler for a group scorer

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
        if self.scorer.group:
            from .group_assembler import GroupAssembler

            self.assembler = GroupAssembler.for_scorer(self.scorer)
            self.sites = self.assembler.sites  # capture the base sites; features are assembled on the host
        rule = BoundaryRule.from_dict(self.scorer.boundary_rule)
        model = runner.get_model()
        device = getattr(runner, "device", None) or next(model.parameters()).device
        self._setup(BoundaryDetector.from_tokenizer(rule, tok), torch.device(device))
        # a group probe runs on the host, on the assembled features
        self.probe = self.scorer.module if self.assembler else self.scorer.module.to(self.device)
        self.max_rows = capture_rows(vcfg)
        self.stash_rows = int(vcfg.scheduler_config.max_num_seqs)
        self.buffers, self.handles = install_hooks(model, self.sites, self.scorer.state_size, self.max_rows,
                                                   mcfg.dtype, self.device)
        log.info("stepprobe: capturing %s (hidden %d) for scorer %s before compilation (%s)",
                 ", ".join(self.sites), self.scorer.state_size, settings.scorer, type(runner).__module__)

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
            if self.assembler is not None:
                over = request_overrides(getattr(new, "sampling_params", None))
                self.assembler.add(new.req_id, request_group(new.req_id, over), new.prompt_len, over.get("group_size"))
        cached = scheduler_output.scheduled_cached_reqs
        if cached.resumed_req_ids and cached.all_token_ids:  # V1: a resumed request's tokens
            for rid in cached.resumed_req_ids:
                toks = cached.all_token_ids.get(rid)
                if toks is not None:
                    self.tracker.resync(rid, toks, self.step)
        for rid in scheduler_output.finished_req_ids:
            self.tracker.finish(rid)
            if self.assembler is not None:
                self.assembler.finish(rid)
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
        if self.assembler is None:
            with torch.no_grad():
                scores = self.probe(x).float().reshape(-1)
        else:  # scored on the host once the states have landed (_consume)
            scores = x.new_zeros(len(keys))
        check = self.checking or self.verify_remaining > 0
        unwritten = (~torch.isfinite(x)).flatten(1).any(dim=1) if check else None
        keep = x if self.settings.record_features or self.assembler is not None else None
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
            if self.verify_remaining > 0 and not self.checking:  # the budget is for real traffic: the
                # start-up self-test and the canary check their own rows and leave it untouched
                self.verify_remaining = max(0, self.verify_remaining - n)
                if unwritten:
                    raise StepprobeError(
                        f"stepprobe self-check: {unwritten} of {n} step boundaries were found but the capture "
                        "hooks did not write their hidden states (the hooks are not in the model vLLM runs: "
                        "compiled or captured without them, or vLLM internals changed); refusing to score with "
                        "stale features")
        if self.assembler is not None:
            with torch.no_grad():
                feats = self.assembler.features(res.keys, res.features.numpy())
                scores = self.probe(torch.from_numpy(feats)).float().reshape(-1).tolist()
        else:
            scores = res.scores.tolist()
        for i, ((rid, p), s) in enumerate(zip(res.keys, scores)):
            steps.setdefault(rid, []).append([p, s])
            if self.settings.keep_records:
                rec = self.records.setdefault(rid, {"positions": [], "scores": [], "features": []})
                rec["positions"].append(p)
                rec["scores"].append(s)
                if res.features is not None and self.settings.record_features:
                    rec["features"].append(res.features[i].tolist())
        self.n_captured += n

