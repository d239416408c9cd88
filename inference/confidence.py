"""The DeepConf-style confidence baseline (Fu et al., "Deep Think with Confidence", online mode).

Token confidence is minus the mean of the top-k log-probabilities at that token; a trace's
group confidence is the mean over a sliding window of tokens, and its score the **lowest**
group confidence. Online: per problem, ``warmup`` traces are generated in full; the stop
threshold is the ``percentile`` of their lowest group confidences (10 keeps ~90%, DeepConf-high;
90 keeps ~10%, DeepConf-low); the remaining ``n - warmup`` traces are generated with the
scheduler's ``confidence`` policy, which finishes a trace (``stop_reason="pruned"``) as soon
as its current window falls below the threshold. Same engine, same pruning path as STEP.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np


def trace_confidence(token_conf: Sequence[float] | None, window: int) -> float | None:
    """Lowest sliding-window mean of token confidences (whole trace if shorter than a window)."""
    if not token_conf:
        return None
    c = np.asarray(token_conf, dtype=np.float64)
    if len(c) <= window:
        return float(c.mean())
    cs = np.concatenate([[0.0], np.cumsum(c)])
    return float(((cs[window:] - cs[:-window]) / window).min())


@dataclasses.dataclass
class ConfidenceFilter:
    window: int = 64
    percentile: float = 10.0
    warmup: int = 4
    topk: int = 5

    def thresholds(self, warm: list[list[Any]]) -> list[float | None]:
        out = []
        for traces in warm:
            vals = [trace_confidence(t.confidence, self.window) for t in traces]
            vals = [v for v in vals if v is not None]
            out.append(float(np.percentile(vals, self.percentile)) if vals else None)
        return out

    def generate(self, runner: Any, prompts: Sequence[str], *, n: int, seeds: Sequence[Sequence[int]] | None = None,
                 **kwargs: Any) -> list[list[Any]]:
        warm_n = min(self.warmup, n)
        warm = runner.generate(prompts, n=warm_n, policy="none", logprobs=self.topk,
                               seeds=[s[:warm_n] for s in seeds] if seeds is not None else None, **kwargs)
        if n <= warm_n:
            return warm
        thr = self.thresholds(warm)
        per_prompt = [{"conf_threshold": t, "conf_window": self.window} for t in thr]
        rest = runner.generate(prompts, n=n - warm_n, policy="confidence", logprobs=self.topk,
                               per_prompt=per_prompt, seeds=[s[warm_n:] for s in seeds] if seeds is not None else None,
                               **kwargs)
        out = []
        for w, r in zip(warm, rest):
            for t in r:
                t.index += warm_n
            out.append(list(w) + list(r))
        return out
