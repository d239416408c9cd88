"""The DeepConf-style confidence baseline (Fu et al., "Deep Think with Confidence", online mode).

Token confidence is minus the mean of the top-k log-probabilities at that token; a trace's
group confidence is the mean over a sliding window of tokens, and its score the **lowest**
group confidence. Online: per problem, ``warmup`` traces are generated in full; as soon as
they finish, the problem's stop threshold is the ``percentile`` of their lowest group
confidences (10 keeps ~90%, DeepConf-high; 90 keeps ~10%, DeepConf-low); the remaining ``n - warmup`` traces are generated with the
scheduler's ``confidence`` policy, which finishes a trace (``stop_reason="pruned"``) as soon
as its current window falls below the threshold. Same engine, same pruning path as STEP.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import numpy as np

from stepprobe.options import ConfidenceOptions


def window_means(token_conf: Sequence[float], window: int) -> np.ndarray:
    """The mean of every full window of ``window`` consecutive token confidences; entry ``j``
    is the window ending at token ``j + window - 1`` (empty when the trace is shorter)."""
    cs = np.concatenate([[0.0], np.cumsum(np.asarray(token_conf, dtype=np.float64))])
    return (cs[window:] - cs[:-window]) / window


def trace_confidence(token_conf: Sequence[float] | None, window: int) -> float | None:
    """Lowest sliding-window mean of token confidences (whole trace if shorter than a window)."""
    if not token_conf:
        return None
    if len(token_conf) <= window:
        return float(np.mean(np.asarray(token_conf, dtype=np.float64)))
    return float(window_means(token_conf, window).min())


@dataclasses.dataclass
class ConfidenceFilter:
    """The online baseline's settings; defaults are :class:`~stepprobe.options.ConfidenceOptions`'."""

    window: int = ConfidenceOptions.confidence_window
    percentile: float = ConfidenceOptions.confidence_percentile
    warmup: int = ConfidenceOptions.confidence_warmup
    topk: int = ConfidenceOptions.confidence_topk

    def thresholds(self, warm: list[list[Any]]) -> list[float | None]:
        out = []
        for traces in warm:
            vals = [trace_confidence(t.confidence, self.window) for t in traces]
            vals = [v for v in vals if v is not None]
            out.append(float(np.percentile(vals, self.percentile)) if vals else None)
        return out

    def generate_stream(self, runner: Any, prompts: Sequence[str], *, n: int,
                        seeds: Sequence[Sequence[int]] | None = None, **kwargs: Any) -> Iterator[tuple[int, list[Any]]]:
        """Yield ``(prompt index, its n traces)`` as soon as a prompt's last trace finishes. Every
        prompt's warm-up traces are queued at once; a prompt's other ``n - warmup`` traces are
        queued, with its own threshold, as soon as its warm-up traces finish (the engine keeps
        generating the other prompts' warm-ups meanwhile), so no prompt waits for the slowest
        warm-up of the batch and each is durable once its second phase ends."""
        import contextlib

        warm_n = min(self.warmup, n)
        common = dict(logprobs=self.topk, **kwargs)
        warm_sub = runner.submit(prompts, n=warm_n, policy="none",
                                 seeds=[s[:warm_n] for s in seeds] if seeds is not None else None, **common)
        warm: dict[int, list[Any]] = {}
        second: dict[int, int] = {}  # submission -> prompt index
        with contextlib.closing(runner.stream()) as results:  # stopping early aborts what is in flight
            for sub, k, traces in results:
                if sub == warm_sub:
                    if n <= warm_n:
                        yield k, traces
                        continue
                    warm[k] = traces
                    thr = self.thresholds([traces])[0]
                    s2 = runner.submit([prompts[k]], n=n - warm_n, policy="confidence",
                                       per_prompt=[{"conf_threshold": thr, "conf_window": self.window}],
                                       seeds=[seeds[k][warm_n:]] if seeds is not None else None, **common)
                    second[s2] = k
                elif sub in second:
                    k = second.pop(sub)
                    for t in traces:
                        t.index += warm_n
                    yield k, list(warm.pop(k)) + list(traces)
