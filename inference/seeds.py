"""Per-request seeds on vLLM's CPU build, and the seed of each trace.

vLLM gives a request with ``SamplingParams(seed=...)`` its own ``torch.Generator``. When a
request's prompt is only partly prefilled in a step, the runner still samples a token for
it, discards that token and rewinds the request's generator with
``gen.set_offset(gen.get_offset() - 4)`` (the ``discard_request_mask`` loop in
``gpu_model_runner._bookkeeping_sync``). Offsets are a Philox (CUDA) notion: a CPU
generator raises ``RuntimeError: CPU Generator does not use offset`` and the engine dies.

:func:`install_seed_rewind` fixes this without changing vLLM: it wraps the runner's
``_sample`` so that, just before sampling, the generator of every row whose token will be
discarded is swapped for a :class:`RewindableGenerator` (a ``torch.Generator`` subclass,
same state) that remembers its state; the runner's ``set_offset(get_offset() - 4)`` then
restores that state, which is exactly "as if this step had not sampled". Rows whose token
is kept are not touched (and cost nothing). The worker calls it once after loading the
model, on the CPU platform only (CUDA generators have offsets).

:func:`trace_seed` derives one seed per trace from (run seed, problem id, trace index), so
what a trace samples depends neither on the batch it ran in nor on what else was pruned.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

# vLLM's rewind step (one sampling call advances a Philox offset by 4).
_OFFSET_STEP = 4


class RewindableGenerator(torch.Generator):
    """A CPU generator that supports vLLM's one-step rewind through get_state/set_state.

    :meth:`mark` (called just before a sampling step) saves the state and advances a virtual
    offset by one step; ``set_offset(get_offset() - 4)`` restores the saved state. Any other
    offset is refused: that would be a use this class does not model.
    """

    _virtual_offset = 0  # torch.Generator is built in __new__; instance values set on use
    _saved: torch.Tensor | None = None

    @classmethod
    def from_generator(cls, gen: torch.Generator) -> "RewindableGenerator":
        new = cls(device=gen.device)
        new.set_state(gen.get_state())
        return new

    def mark(self) -> None:
        self._saved = self.get_state()
        self._virtual_offset += _OFFSET_STEP

    def get_offset(self) -> int:  # type: ignore[override]
        return self._virtual_offset

    def set_offset(self, offset: int) -> "RewindableGenerator":  # type: ignore[override]
        if offset == self._virtual_offset:
            return self
        if offset != self._virtual_offset - _OFFSET_STEP or self._saved is None:
            raise RuntimeError(f"stepprobe RewindableGenerator can only rewind the last sampling step "
                               f"(offset {self._virtual_offset} -> {offset})")
        self.set_state(self._saved)
        self._saved = None
        self._virtual_offset = offset
        return self


def install_seed_rewind(runner: Any) -> bool:
    """Make seeded requests work on a CPU model runner (see the module docstring).

    Returns whether it was installed (False where the runner has offsets anyway or lacks the
    attributes this relies on, which is logged)."""
    needed = ("_sample", "input_batch", "discard_request_mask", "requests")
    if str(getattr(runner, "device", "cpu")) != "cpu":
        return False
    if not all(hasattr(runner, a) for a in needed):
        log.warning("stepprobe: cannot install the per-request seed rewind on %s (missing %s)",
                    type(runner).__name__, [a for a in needed if not hasattr(runner, a)])
        return False
    inner_sample = runner._sample

    def _sample(*args: Any, **kwargs: Any) -> Any:
        batch = runner.input_batch
        gens = batch.generators
        if gens:
            mask = runner.discard_request_mask.np[: batch.num_reqs]
            for i in mask.nonzero()[0].tolist():
                gen = gens.get(i)
                if gen is None:
                    continue
                if not isinstance(gen, RewindableGenerator):
                    gen = RewindableGenerator.from_generator(gen)
                    gens[i] = gen
                    state = runner.requests.get(batch.req_ids[i])
                    if state is not None:  # a resumed request re-enters with this generator
                        state.generator = gen
                gen.mark()
        return inner_sample(*args, **kwargs)

    runner._sample = _sample
    return True


def trace_seed(run_seed: int, problem_id: str, index: int) -> int:
    """A trace's own sampling seed: a hash of (run seed, problem id, trace index), 63 bits."""
    h = hashlib.blake2b(f"{int(run_seed)}\x1f{problem_id}\x1f{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1
