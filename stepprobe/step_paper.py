"""What the STEP paper's own code does, in one place, for importing its artifacts.

Taken from the description of the paper's public training code (``STEP/train_scorer/``:
``data_pre_process.py``, ``data_hidden_state.py``, ``train_scorer.py``) in stepprobe issue 17
and that folder's README; no released checkpoint or dump could be downloaded where this was
written, so the formats are as described there, not as observed.

- Prompt: the model's chat template with the system prompt :data:`STEP_SYSTEM_PROMPT` and
  the question as the whole user turn (no answer instruction).
- Segmentation: over prompt + response, only the text before ``</think>`` forwarded, a
  token is a boundary when its own text contains ``"\\n\\n"``
  (:func:`stepprobe.boundaries.step_paper_rule`).
- Feature: ``model.model(...).last_hidden_state`` of transformers, i.e. stepprobe's
  ``final_norm`` site, at every boundary.
- Scorer: ``MLPClassifier``, ``Linear(D, 512) -> ReLU -> Linear(512, 1)`` on raw features,
  sigmoid for the probability (:mod:`stepprobe.probes.step_scorer`).
- Dumps: ``*_hiddenstates_<start>_<end>.pt``, a list of dicts with ``select_hidden_states``
  (float16 ``[steps, D]``), ``full_input_ids``, ``question``, ``is_correct``, ...
  (:mod:`stepprobe.data_collection.step_dump`).
"""

from __future__ import annotations

from typing import Any

from .boundaries import BoundaryDetector, step_paper_rule
from .errors import StepprobeError

STEP_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}"
# PromptOptions / build_prompt fields that reproduce the paper's prompt.
STEP_PROMPT: dict[str, Any] = {"system_prompt": STEP_SYSTEM_PROMPT, "answer_instruction": "",
                               "use_chat_template": True}
STEP_SOURCE = ("STEP paper, train_scorer/ (MLPClassifier on transformers' last_hidden_state; segmentation of "
               "data_pre_process.py), as described in stepprobe issue 17; not checked against a released file")


def paper_boundary_rule(tokenizer: Any | None = None, *, scope: str = "prompt+response") -> dict[str, Any]:
    """The paper's segmentation as recorded in converted artifacts (``scope``: what it covered)."""
    rule = step_paper_rule()
    out: dict[str, Any] = {**rule.to_dict(), "name": "step-paper", "scope": scope, "source": STEP_SOURCE}
    if tokenizer is not None:
        out["token_ids"] = BoundaryDetector.from_tokenizer(rule, tokenizer).boundary_token_ids()
    return out


def model_identity_for(name: str) -> tuple[dict[str, Any], Any]:
    """``(identity, tokenizer)`` of a model by name, path or HF id (config and tokenizer only)."""
    from .models import identify_model

    try:
        _, identity, tok = identify_model(name)
    except (OSError, ValueError) as exc:
        raise StepprobeError(f"cannot read the config and tokenizer of model {name!r} "
                             f"({str(exc).strip().splitlines()[0][:160]})") from None
    return identity, tok
