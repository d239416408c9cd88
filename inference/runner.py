"""The client: one vLLM engine with the plugin, generation, and every trace's outcome.

:class:`StepRunner` starts ``vllm.LLM`` with the plugin's engine arguments
(:func:`~stepprobe.inference.plugin.install_kwargs`), refuses a scorer made for another model
**before** the engine starts, and runs a canary self-test (a short generation pushed towards
newlines whose capture count must equal its boundary count) so that a hook that does not
fire fails loudly instead of silently scoring nothing. :meth:`StepRunner.generate` returns,
for each prompt, every trace: text, tokens, kept or pruned (``stop_reason == "pruned"``),
its step scores and aggregate score, preemptions and queueing time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import time
from typing import Any, Iterator, Sequence

from stepprobe.engine import check_kv_budget, client_request_id, engine_kwargs, finished_outputs, make_llm, shutdown
from stepprobe.errors import StepprobeError
from stepprobe.options import EngineOptions

from .plugin import PluginSettings, check_policy, check_supported, check_vllm_version, install_kwargs
from .policies import aggregate_scores
from .scheduler import PRUNED

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TraceResult:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    pruned: bool
    score: float | None
    step_scores: list[float]
    step_positions: list[int]
    num_preemptions: int = 0
    queued_s: float | None = None
    logprobs: list[float] | None = None  # chosen-token logprob per token (confidence)
    confidence: list[float] | None = None  # minus the mean logprob of the returned tokens (DeepConf)
    features: list[Any] | None = None
    prompt_tokens: int = 0
    stop_confidence: list[float] | None = None  # per token, as the scheduler's confidence policy sees it
    seed: int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def to_dict(self, token_confidence: bool = False) -> dict[str, Any]:
        """The trace for results.jsonl; ``token_confidence`` keeps both per-token confidence
        lists (what ``stepprobe replay`` needs for the confidence baseline)."""
        d = dataclasses.asdict(self)
        for k in ("features", "token_ids", "confidence", "logprobs", "stop_confidence"):
            d.pop(k, None)
        d["num_tokens"] = self.num_tokens
        if token_confidence:
            d["token_confidence"] = [round(x, 4) for x in self.confidence or []]
            d["stop_confidence"] = [round(x, 4) for x in self.stop_confidence or []]
        return d


class StepRunner:
    """A vLLM engine with stepprobe's scoring and pruning installed."""

    def __init__(self, model: str | None, settings: PluginSettings, *, engine: Any = None, seed: int = 0,
                 max_model_len: int | None = 2048, dtype: str = "auto", kv_cache_gib: float | None = None,
                 num_kv_blocks: int | None = None, enforce_eager: bool = False, max_num_seqs: int | None = None,
                 plugin: bool = True, **llm_kwargs: Any):
        """``engine``: a config with :class:`~stepprobe.options.EngineOptions` (``run``'s);
        without one, the keyword arguments build it."""
        from stepprobe.models import resolve_model

        check_vllm_version()
        self.model_path = resolve_model(model)
        self.settings = settings
        self.plugin = plugin
        self.scorer = None
        if settings.scorer:
            self.scorer = check_scorer_for_model(settings.scorer, self.model_path)
        if engine is None:
            engine = EngineOptions(model=model, dtype=dtype, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib,
                                   num_kv_blocks=num_kv_blocks, enforce_eager=enforce_eager, max_num_seqs=max_num_seqs)
        check_kv_budget(engine.num_kv_blocks, engine.max_model_len or 0)
        kwargs = llm_kwargs_for(engine, settings, seed=seed, plugin=plugin, **llm_kwargs)
        if plugin and settings.scorer:
            check_supported(kwargs, self.model_path)  # one line, before the engine starts
        t0 = time.perf_counter()
        self.llm = make_llm(self.model_path, kwargs)
        self.startup_s = time.perf_counter() - t0
        self._calls = itertools.count()
        # Traces in flight (see submit/stream): client request id -> (submission, prompt, trace, seed)
        # and -> vLLM's internal id; per submission the traces left and finished per prompt, and its logprobs.
        self._owner: dict[str, tuple[int, int, int, int | None]] = {}
        self._wanted: dict[str, str] = {}
        self._left: dict[int, list[int]] = {}
        self._done: dict[int, list[list[Any]]] = {}
        self._logprobs: dict[int, int | None] = {}
        self._pending: dict[str, dict[str, Any]] = {}  # client request id -> its score records so far
        self.tokenizer = self.llm.get_tokenizer()
        self._detector = None
        if plugin and self.scorer is not None:
            from stepprobe.boundaries import BoundaryDetector, BoundaryRule

            self._detector = BoundaryDetector.from_tokenizer(BoundaryRule.from_dict(self.scorer.boundary_rule),
                                                             self.tokenizer)
            info = self.llm.collective_rpc("stepprobe_info")
            if not info or not all(i.get("installed") for i in info):
                raise StepprobeError(f"stepprobe's worker did not install its hooks ({info}); is worker_cls set?")
            if settings.canary:
                self.canary()

    # ------------------------------------------------------------------ checks
    def canary(self, max_tokens: int = 48) -> dict[str, int]:
        """Self-test: capture count must equal boundary count on a short forced-newline run."""
        from vllm import SamplingParams

        assert self._detector is not None
        rule = self._detector.rule
        bias_ids = [i for i in self.tokenizer.encode(rule.delimiter, add_special_tokens=False)]
        bias_ids += self.tokenizer.encode(rule.delimiter[:1], add_special_tokens=False)
        sp = SamplingParams(n=2, temperature=1.0, max_tokens=max_tokens,
                            logit_bias={i: 100.0 for i in set(bias_ids)},
                            extra_args={"stepprobe": {"policy": "none"}})
        keep = self.settings.keep_records
        self.llm.collective_rpc("stepprobe_take_records")  # drop stale records
        before = self.llm.collective_rpc("stepprobe_info")[0]["captured"]
        self.llm.collective_rpc("stepprobe_arm_check", args=(True,))
        try:
            outs = self.llm.generate(["stepprobe canary:"], sp, use_tqdm=False)
        finally:
            info = self.llm.collective_rpc("stepprobe_info")[0]
            self.llm.collective_rpc("stepprobe_arm_check", args=(False,))
        records = self._take_records()
        expected = sum(len(captured_boundaries(self._detector, c.token_ids)) for o in outs for c in o.outputs)
        got = sum(len(r["positions"]) for r in records.values()) if keep else info["captured"] - before
        if info.get("unwritten"):
            raise StepprobeError(
                f"stepprobe canary: {info['unwritten']} step boundaries were found but the capture hooks did not "
                "write their hidden states (the compiled graph does not contain the hooks)")
        if expected == 0:
            raise StepprobeError("stepprobe canary produced no step boundary; cannot verify the capture hooks")
        if got != expected:
            raise StepprobeError(
                f"stepprobe canary: the hooks captured {got} step boundaries but the canary text has {expected}; "
                "scores would be wrong or missing (hooks not compiled in, or vLLM internals changed)")
        log.info("stepprobe canary passed: %d/%d boundaries captured", got, expected)
        return {"expected": expected, "captured": got}

    def _take_records(self) -> dict[str, dict[str, Any]]:
        merged: dict[str, dict[str, Any]] = {}
        for part in self.llm.collective_rpc("stepprobe_take_records") or []:
            merged.update(part or {})
        return merged

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Sequence[str], *, n: int = 1, max_tokens: int = 256, temperature: float = 0.7,
                 top_p: float = 1.0, policy: str | None = None, logprobs: int | None = None,
                 use_tqdm: bool = False, per_prompt: Sequence[dict[str, Any]] | None = None,
                 seeds: Sequence[Sequence[int]] | None = None,
                 **sampling: Any) -> list[list[TraceResult]]:
        """``n`` traces for each prompt (all of them at once; see :meth:`generate_stream`)."""
        results: list[list[TraceResult]] = [[] for _ in prompts]
        for k, traces in self.generate_stream(prompts, n=n, max_tokens=max_tokens, temperature=temperature,
                                              top_p=top_p, policy=policy, logprobs=logprobs,
                                              per_prompt=per_prompt, seeds=seeds, **sampling):
            results[k] = traces
        return results

    def generate_stream(self, prompts: Sequence[str], *, n: int = 1, max_tokens: int = 256,
                        temperature: float = 0.7, top_p: float = 1.0, policy: str | None = None,
                        logprobs: int | None = None, per_prompt: Sequence[dict[str, Any]] | None = None,
                        seeds: Sequence[Sequence[int]] | None = None,
                        **sampling: Any) -> Iterator[tuple[int, list[TraceResult]]]:
        """Yield ``(prompt index, its n traces)`` as soon as the last trace of a prompt finishes.

        All requests are queued at once (``LLM.enqueue``; they share the KV cache and the
        batch as in ``LLM.generate``) and the engine is stepped here, so a caller can make each
        prompt's result durable while the others are still generating. ``per_prompt``: extra
        stepprobe request settings for each prompt (e.g. a confidence threshold).
        ``seeds[k][i]``: trace ``i`` of prompt ``k`` samples with its own generator seeded so
        (see :mod:`stepprobe.inference.seeds`); without it, traces draw from the engine's
        shared generator, so what one samples depends on the rest of the batch.

        The ``n`` traces of a prompt are sent as ``n`` single-trace requests of one group
        (``extra_args={"stepprobe": {"group": ...}}``), which is what vLLM's front end does with
        an ``n > 1`` request anyway (it fans out into ``n`` child requests that share the
        prompt's cached KV blocks); sent this way, every trace keeps its own request metrics
        (preemptions, queueing time), which vLLM collapses into one for an ``n > 1`` request.
        ``step_positions`` count generated tokens (0 = the first generated token), the same
        convention as the HDF5 ``position`` of ``stepprobe record``.
        """

        sub = self.submit(prompts, n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, policy=policy,
                          logprobs=logprobs, per_prompt=per_prompt, seeds=seeds, **sampling)
        with contextlib.closing(self.stream()) as results:  # a caller that stops early aborts the rest
            for s, k, traces in results:
                if s == sub:
                    yield k, traces

    def submit(self, prompts: Sequence[str], *, n: int = 1, policy: str | None = None, logprobs: int | None = None,
               per_prompt: Sequence[dict[str, Any]] | None = None, seeds: Sequence[Sequence[int]] | None = None,
               **sampling: Any) -> int:
        """Queue ``n`` traces for each prompt now (arguments as :meth:`generate_stream`), also
        while :meth:`stream` runs (the confidence baseline queues a problem's second phase as
        soon as its warm-up finishes); returns the submission's number."""
        if self.scorer is not None:
            self.scorer.check_group_size(n)
        sub = next(self._calls)
        params, flat_prompts, pairs = request_params(prompts, n=n, group=f"g{sub}", policy=policy,
                                                     logprobs=logprobs, per_prompt=per_prompt, seeds=seeds,
                                                     **sampling)
        if not self._owner and self.plugin and self.scorer is not None:
            self.llm.collective_rpc("stepprobe_take_records")  # nothing in flight: start clean
        ids = self.llm.enqueue(flat_prompts, params, use_tqdm=False)
        # enqueue returns vLLM's internal ids ("<client id>-<8 random chars>"); outputs carry the client id.
        for rid, (k, i), p in zip(ids, pairs, params):
            self._owner[client_request_id(rid)] = (sub, k, i, p.seed)
            self._wanted[client_request_id(rid)] = rid
        self._left[sub] = [n] * len(prompts)
        self._done[sub] = [[] for _ in prompts]
        self._logprobs[sub] = logprobs
        return sub

    def stream(self) -> Iterator[tuple[int, int, list[TraceResult]]]:
        """Step the engine (:func:`stepprobe.engine.finished_outputs`) until every submitted
        trace has finished, yielding ``(submission, prompt index, its traces)`` as soon as the
        last trace of a prompt finishes (submissions made while iterating included). An
        exception or a caller that stops early aborts the traces still in the engine."""
        scoring = self.plugin and self.scorer is not None
        try:
            with contextlib.closing(finished_outputs(self.llm, self._wanted)) as steps:
                for outs in steps:
                    for o in outs:
                        yield from self._finish(o, scoring)
        except BaseException:
            for d in (self._owner, self._wanted, self._left, self._done, self._logprobs, self._pending):
                d.clear()
            raise
        self._pending.clear()

    def _finish(self, o: Any, scoring: bool) -> Iterator[tuple[int, int, list[TraceResult]]]:
        """One finished trace; its prompt's traces once it was the last of them."""
        sub, k, i, seed = self._owner.pop(o.request_id)
        self._done[sub][k].append((i, o, seed))
        self._left[sub][k] -= 1
        if self._left[sub][k]:
            return
        if scoring:
            for key, rec in self._take_records().items():
                acc = self._pending.setdefault(client_request_id(key), {"positions": [], "scores": [], "features": []})
                for f in acc:
                    acc[f].extend(rec.get(f) or [])
        finished, self._done[sub][k] = self._done[sub][k], []
        traces = [self._trace(i, out, self._pending, seed, self._logprobs[sub])
                  for i, out, seed in sorted(finished, key=lambda x: x[0])]
        if not any(self._left[sub]):
            for d in (self._left, self._done, self._logprobs):
                d.pop(sub, None)
        yield sub, k, traces

    def _trace(self, index: int, o: Any, pending: dict[str, dict[str, Any]], seed: int | None,
               logprobs: int | None) -> TraceResult:
        rec = pending.pop(o.request_id, {})
        metrics = getattr(o, "metrics", None)
        c = o.outputs[0]
        scores = list(rec.get("scores", []))
        prompt_len = len(o.prompt_token_ids or [])
        lp, conf, stop_conf = _token_confidence(c, logprobs)
        return TraceResult(
            index=index, text=c.text, token_ids=list(c.token_ids), finish_reason=c.finish_reason,
            pruned=c.stop_reason == PRUNED,
            score=aggregate_scores(scores, self.settings.aggregate, self.settings.ema_alpha),
            step_scores=scores, step_positions=[int(p) - prompt_len for p in rec.get("positions", [])],
            num_preemptions=int(getattr(metrics, "num_preemptions", 0) or 0),
            queued_s=_queued(metrics), logprobs=lp, confidence=conf,
            features=rec.get("features") or None, prompt_tokens=prompt_len, stop_confidence=stop_conf, seed=seed)

    def preemptions(self) -> int:
        """vLLM's cumulative preemption counter (for before/after differences)."""
        try:
            return int(sum(m.value for m in self.llm.get_metrics() if m.name == "vllm:num_preemptions"))
        except Exception:  # noqa: BLE001 - metrics off or unavailable
            return 0

    def close(self) -> None:
        shutdown(getattr(self, "llm", None))
        self.llm = None


def llm_kwargs_for(engine: Any, settings: PluginSettings, *, seed: int = 0, plugin: bool = True,
                   **extra: Any) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments (without the model) for an engine config and the
    plugin's settings: what :class:`StepRunner` starts vLLM with."""
    kwargs = {"disable_log_stats": False, **engine_kwargs(engine, seed=seed), **extra}
    if plugin:
        kwargs.update(install_kwargs(settings))
    return kwargs


def request_params(prompts: Sequence[str], *, n: int, group: str = "g0", policy: str | None = None,
                   logprobs: int | None = None, per_prompt: Sequence[dict[str, Any]] | None = None,
                   seeds: Sequence[Sequence[int]] | None = None,
                   **sampling: Any) -> tuple[list[Any], list[str], list[tuple[int, int]]]:
    """The ``SamplingParams`` of one generate call: ``n`` single-trace requests per prompt
    (one group each; ``seeds[k][i]``: trace ``i`` of prompt ``k``'s own seed), with the
    prompts and (prompt, trace) owners in the same order."""
    from vllm import SamplingParams

    params, flat_prompts, owners = [], [], []
    for k, prompt in enumerate(prompts):
        extra = dict(per_prompt[k] or {}) if per_prompt is not None else {}
        if policy is not None:
            extra["policy"] = check_policy(policy)
        extra["group"] = f"{group}-{k}"
        extra["group_size"] = n  # the worker's group features count a trace's siblings with it
        sp = SamplingParams(n=1, logprobs=logprobs, extra_args={"stepprobe": extra}, **sampling)
        if seeds is not None and len(seeds[k]) != n:
            raise StepprobeError(f"generate: {len(seeds[k])} seeds for prompt {k}, expected n={n}")
        for i in range(n):
            one = sp.clone()
            if seeds is not None:
                one.seed = int(seeds[k][i])
            params.append(one)
            flat_prompts.append(prompt)
            owners.append((k, i))
    return params, flat_prompts, owners


def captured_boundaries(detector: Any, token_ids: Sequence[int]) -> list[int]:
    """Boundary indices the engine can score: all but one at the very last token, which is
    sampled but never fed back through the model (its hidden state is never computed)."""
    last = len(token_ids) - 1
    return [i for i in detector.find(token_ids) if i < last]


def _queued(metrics: Any) -> float | None:
    if metrics is None:
        return None
    q, s = getattr(metrics, "queued_ts", 0.0), getattr(metrics, "scheduled_ts", 0.0)
    return float(s - q) if q and s else None


def _token_confidence(completion: Any, k: int | None = None
                      ) -> tuple[list[float] | None, list[float] | None, list[float] | None]:
    """Per token: the chosen token's logprob; minus the mean of the returned logprobs (the
    top-k, plus the chosen token when it is not among them: DeepConf's token confidence as
    ``trace_confidence`` reads it); and minus the mean of the top-k alone, which is what the
    scheduler's online ``confidence`` policy compares with its threshold."""
    lps = getattr(completion, "logprobs", None)
    if not lps:
        return None, None, None
    chosen, conf, stop = [], [], []
    for tid, d in zip(completion.token_ids, lps):
        if not d:
            continue
        vals = [v.logprob for v in d.values()]
        chosen.append(d[tid].logprob if tid in d else min(vals))
        conf.append(-sum(vals) / len(vals))
        top = sorted(vals, reverse=True)[: k or len(vals)]
        top = [v for v in top if v > -1e30]
        stop.append(-sum(top) / len(top) if top else float("nan"))
    return chosen, conf, stop


def check_scorer_for_model(scorer_dir: str, model_path: str, n: int | None = None) -> Any:
    """Load a scorer and refuse it (one line) if it was not made for this model, if it reads
    features the live capture does not compute (step means, text or step-aligned group features),
    or if it is a group scorer and ``n`` (traces per problem, where known) gives no siblings."""
    from stepprobe.models import identify_model
    from stepprobe.probes.checkpoint import load_scorer

    scorer = load_scorer(scorer_dir, expected_model=identify_model(model_path)[1])
    scorer.check_live()  # live capture reads boundary tokens only: refuse a step-mean scorer here
    if n is not None:
        scorer.check_group_size(n)
    return scorer
