"""Prompts: one problem -> the exact text the model is given.

:func:`build_prompt` is shared by ``collect``, the inference runner and the recorder's
STEP-format import, so that the same problem always becomes the same prompt. The chat
template of the model's tokenizer is applied when it has one (the default does).
"""

from __future__ import annotations

import string
from typing import Any, Sequence

from .problems import Problem

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant that solves math problems step by step."
# Small models copy placeholders ("The answer is N."), so the instructions name none.
DEFAULT_ANSWER_INSTRUCTION = "Solve it step by step. Finish with \"The answer is\" followed by the final number."
DEFAULT_CHOICE_INSTRUCTION = ("Solve it step by step. Finish with \"The answer is\" followed by the letter "
                              "of the correct option.")

LETTERS = string.ascii_uppercase


def format_choices(choices: list[str]) -> str:
    """``A. first\\nB. second ...``"""
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def user_message(problem: Problem, answer_instruction: str | None = None) -> str:
    """The user turn: question, options (unless the question already lists them), instruction.

    A question that is the whole turn (the STEP paper's prompt: no options added, no
    instruction) is given as written, surrounding whitespace included; beside other parts
    it is stripped, so the parts are joined by one blank line."""
    rest = []
    if problem.choices and not problem.meta.get("choices_in_question"):
        rest.append(format_choices(problem.choices))
    if answer_instruction is None:
        answer_instruction = DEFAULT_CHOICE_INSTRUCTION if problem.choices else DEFAULT_ANSWER_INSTRUCTION
    if answer_instruction:
        rest.append(answer_instruction.strip())
    return "\n\n".join([problem.question.strip(), *rest]) if rest else problem.question


def build_prompt(problem: Problem, tokenizer: Any, *, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                 answer_instruction: str | None = None, use_chat_template: bool = True) -> str:
    """The prompt text for ``problem``.

    ``answer_instruction=None`` picks :data:`DEFAULT_ANSWER_INSTRUCTION`, or
    :data:`DEFAULT_CHOICE_INSTRUCTION` for multiple choice; ``""`` adds none.
    ``system_prompt=None`` or ``""`` leaves the system turn to the template's default.
    Without a chat template (or ``use_chat_template=False``) the turns are joined as plain text.
    """
    user = user_message(problem, answer_instruction)
    has_template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if use_chat_template and has_template:
        messages = []
        if system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        messages.append({"role": "user", "content": user})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head = f"{system_prompt.strip()}\n\n" if system_prompt else ""
    return f"{head}{user}\n\nAnswer:"


# Named prompt settings (``build_prompt`` keyword arguments). ``step-paper`` reproduces the
# STEP paper's prompt (chat template, its system prompt, the question as the whole user
# turn), the distribution a scorer converted with ``stepprobe import-step-scorer`` was
# trained on.
def prompt_presets() -> dict[str, dict[str, Any]]:
    from ..step_paper import STEP_PROMPT

    return {"step-paper": dict(STEP_PROMPT)}


def prompt_preset(name: str) -> dict[str, Any]:
    """The ``build_prompt`` keyword arguments of a named preset; an unknown name lists the known ones."""
    presets = prompt_presets()
    if name not in presets:
        from ..errors import StepprobeError

        raise StepprobeError(f"unknown prompt preset {name!r}; known: {', '.join(presets)}")
    return dict(presets[name])


def build_prompts(problems: Sequence[Problem], tokenizer: Any, options: Any) -> list[str]:
    """The prompts of ``problems`` with a config's prompt options
    (:class:`~stepprobe.options.PromptOptions`; ``None`` fields take the built-in defaults)."""
    kwargs = options.prompt_kwargs()
    return [build_prompt(p, tokenizer, **kwargs) for p in problems]
