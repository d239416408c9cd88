"""The worker side: capture step-boundary hidden states inside vLLM and score them.

vLLM compiles the model (Dynamo + Inductor on CPU, plus CUDA graphs on a GPU) right after
loading it; hooks added later never fire. So the capture hooks go in **between** loading
and compiling: :class:`StepprobeWorker` is the platform's own worker class whose
``load_model`` installs them, and vLLM then compiles the hooked model. A hook is pure
tensor code: it copies the whole site output for the batch (``hidden_states + residual`` for
a decoder layer, read at once since later layers reuse those buffers in place) into a
persistent buffer registered on the module, so it survives tracing and graph replay.

After the forward pass (in ``sample_tokens``, once the runner output exists) the worker
walks the batch: rows are laid out in the order of ``ModelRunnerOutput.req_ids``, each
request taking ``SchedulerOutput.num_scheduled_tokens[req_id]`` consecutive rows, and the
runner hands ``input_ids`` and ``positions`` to ``_model_forward``. Generated tokens
(position >= prompt length) go through the shared :class:`BoundaryDetector`; a boundary
row's features are gathered from the buffers, scored in one batched call of the probe, and
the new step scores are attached to the runner output as ``stepprobe_steps``
(``{req_id: [[position, score], ...]}``), which is pickled to the scheduler's process.
Positions are keys: a position recomputed after a preemption is not scored twice.

Self-check: until the first ``VERIFY_BOUNDARIES`` step boundaries have been scored, the
buffers are filled with NaN before every forward pass, and a boundary row that is still NaN
afterwards (the hooks are not in the model vLLM actually ran) stops the engine with a
``StepprobeError`` instead of scoring stale features. This runs in every engine, the server
included; the client's canary (runner.py) is the same check on a forced-newline generation.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from stepprobe.boundaries import BoundaryDetector, BoundaryRule
from stepprobe.errors import ArtifactMismatch, StepprobeError
from stepprobe.layers import EMBED, FINAL_NORM, layer_index

from .plugin import PluginSettings, check_vllm_version
from .seeds import install_seed_rewind

log = logging.getLogger(__name__)

BUFFER_NAME = "_stepprobe_capture"
VERIFY_BOUNDARIES = 8


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


@dataclasses.dataclass
class _ReqState:
    prompt_len: int
    next_pos: int
    carry: str = ""


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
        self.detector = BoundaryDetector.from_tokenizer(rule, tok)
        model = runner.get_model()
        device = next(model.parameters()).device
        dtype = mcfg.dtype
        self.device = device
        self.probe = self.scorer.module.to(device)
        rows = int(vcfg.scheduler_config.max_num_batched_tokens) + 512  # room for padding
        self.buffers: dict[str, torch.Tensor] = {}
        self.handles = []
        for site, (module, hook) in site_modules(model, self.sites).items():
            buf = torch.zeros(rows, self.scorer.hidden_size, dtype=dtype, device=device)
            module.register_buffer(BUFFER_NAME, buf, persistent=False)
            self.buffers[site] = getattr(module, BUFFER_NAME)
            self.handles.append(module.register_forward_hook(hook))
        self.requests: dict[str, _ReqState] = {}
        self.records: dict[str, dict[str, Any]] = {}
        self.last_inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.n_captured = 0
        self.n_steps_processed = 0
        self.checking = False  # canary: verify captured rows were written this run
        self.n_unwritten = 0
        # Self-check in every engine (the server too, which has no canary): the first
        # VERIFY_BOUNDARIES boundary rows must have been written by this step's forward.
        self.verify_remaining = VERIFY_BOUNDARIES
        # Wrap the runner's forward helper (which both the CPU and GPU runners call with the
        # step's input ids and positions) to see the batch's tokens and positions.
        inner_forward = runner._model_forward

        def _model_forward(*args: Any, **kwargs: Any) -> Any:
            if self.verify_remaining > 0 or self.checking:
                for buf in self.buffers.values():
                    buf.fill_(float("nan"))  # rows the hooks do not write stay NaN
            out = inner_forward(*args, **kwargs)
            ids = kwargs.get("input_ids", args[0] if args else None)
            pos = kwargs.get("positions", args[1] if len(args) > 1 else None)
            self.last_inputs = (ids, pos) if ids is not None and pos is not None else None
            return out

        runner._model_forward = _model_forward
        log.info("stepprobe: capturing %s (hidden %d) for scorer %s before compilation",
                 ", ".join(self.sites), self.scorer.hidden_size, settings.scorer)

    # ------------------------------------------------------------------ per step
    def process(self, scheduler_output: Any, output: Any) -> None:
        """Find this step's boundary rows, score them, attach the scores to ``output``."""
        for new in scheduler_output.scheduled_new_reqs:
            if new.req_id not in self.requests:  # a re-sent request keeps its progress (no double count)
                plen = len(new.prompt_token_ids or [])
                self.requests[new.req_id] = _ReqState(plen, plen)
        mro = output if hasattr(output, "req_ids") else getattr(output, "_model_runner_output", None)
        counts = scheduler_output.num_scheduled_tokens
        steps: dict[str, list[list[float]]] = {}
        if mro is not None and counts and self.last_inputs is not None:
            total = sum(counts.values())
            ids_t, pos_t = self.last_inputs
            ids = ids_t[:total].tolist()
            pos = pos_t[:total].tolist()
            rows, keys = [], []
            off = 0
            for rid in mro.req_ids:
                c = counts.get(rid, 0)
                st = self.requests.get(rid)
                if st is not None:
                    for r in range(off, off + c):
                        p = pos[r]
                        if p < st.next_pos:
                            continue  # prompt, or a position recomputed after preemption
                        st.next_pos = p + 1
                        hit, st.carry = self.detector.step(st.carry, ids[r])
                        if hit:
                            rows.append(r)
                            keys.append((rid, p))
                off += c
            self.last_inputs = None
            if rows:
                idx = torch.tensor(rows, device=self.device)
                x = torch.stack([self.buffers[s].index_select(0, idx) for s in self.sites], dim=1).float()
                if self.checking or self.verify_remaining > 0:
                    unwritten = int((~torch.isfinite(x)).any(dim=(1, 2)).sum())
                    self.n_unwritten += unwritten
                    if self.verify_remaining > 0:
                        self.verify_remaining = max(0, self.verify_remaining - len(rows))
                        if unwritten:
                            raise StepprobeError(
                                f"stepprobe self-check: {unwritten} of {len(rows)} step boundaries were found but the "
                                "capture hooks did not write their hidden states (the hooks are not in the model "
                                "vLLM runs: compiled or captured without them, or vLLM internals changed); "
                                "refusing to score with stale features")
                with torch.no_grad():
                    scores = self.probe(x).float().cpu().tolist()
                feats = x.cpu() if self.settings.record_features else None
                for i, ((rid, p), s) in enumerate(zip(keys, scores)):
                    steps.setdefault(rid, []).append([p, s])
                    if self.settings.keep_records:
                        rec = self.records.setdefault(rid, {"positions": [], "scores": [], "features": []})
                        rec["positions"].append(p)
                        rec["scores"].append(s)
                        if feats is not None:
                            rec["features"].append(feats[i].tolist())
                self.n_captured += len(rows)
            self.n_steps_processed += 1
        if mro is not None and steps:
            mro.stepprobe_steps = steps
        for rid in scheduler_output.finished_req_ids:
            self.requests.pop(rid, None)


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

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)  # type: ignore[misc]
        check_vllm_version()
        install_seed_rewind(self.model_runner)  # type: ignore[attr-defined]  # seeded requests on CPU
        settings = PluginSettings.from_vllm_config(self.vllm_config)  # type: ignore[attr-defined]
        if settings.scorer:
            self._stepprobe = Capture(self, settings)

    def execute_model(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        self._stepprobe_sched_out = scheduler_output
        out = super().execute_model(scheduler_output, *args, **kwargs)  # type: ignore[misc]
        if out is not None and self._stepprobe is not None and hasattr(out, "req_ids"):
            out = self._stepprobe_attach(out)
        return out

    def sample_tokens(self, *args: Any, **kwargs: Any) -> Any:
        out = super().sample_tokens(*args, **kwargs)  # type: ignore[misc]
        if self._stepprobe is not None and out is not None:
            out = self._stepprobe_attach(out)
        return out

    def _stepprobe_attach(self, out: Any) -> Any:
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

        so = getattr(self, "_stepprobe_sched_out", None)
        if so is None:
            return out
        self._stepprobe_sched_out = None
        if out is EMPTY_MODEL_RUNNER_OUTPUT:
            from copy import copy

            out = copy(out)
        self._stepprobe.process(so, out)
        return out

    # ---- collective_rpc methods (LLM.collective_rpc("stepprobe_...")) ----
    def stepprobe_info(self) -> dict[str, Any]:
        cap = self._stepprobe
        if cap is None:
            return {"installed": False}
        return {"installed": True, "sites": cap.sites, "captured": cap.n_captured,
                "steps_processed": cap.n_steps_processed, "unwritten": cap.n_unwritten, "hidden_size": cap.scorer.hidden_size,
                "scorer": str(cap.settings.scorer)}

    def stepprobe_arm_check(self, on: bool = True) -> None:
        """Canary support: fill the capture buffers with NaN so rows a hook did not write show up."""
        cap = self._stepprobe
        if cap is None:
            return
        cap.checking = on
        cap.n_unwritten = 0
        if on:
            for buf in cap.buffers.values():
                buf.fill_(float("nan"))

    def stepprobe_take_records(self, clear: bool = True) -> dict[str, dict[str, Any]]:
        cap = self._stepprobe
        if cap is None:
            return {}
        recs = cap.records
        if clear:
            cap.records = {}
        return recs


StepprobeWorker = type("StepprobeWorker", (StepprobeWorkerMixin, _platform_worker_base()), {})
StepprobeWorker.__module__ = __name__
