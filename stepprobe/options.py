"""The option groups every stage shares, each declared once.

A stage config is a dataclass that derives from :class:`~stepprobe.config.StageConfig` and
from the groups it takes (dataclass multiple inheritance; every field has a default). The
flat flags and YAML keys stay what they were (``--top-p``, ``top_p:``); only the
declaration is shared, so a help text, a type, a default and a check exist in one place.
The groups and their fields are described in ``docs/options.md``.

- :class:`PromptOptions`: how a problem becomes the prompt (``collect``, ``run``, ``bench``).
- :class:`SamplingOptions`: ``n``, ``temperature``, ``top_p``, ``top_k``, ``max_tokens``, ``seed``.
- :class:`PolicyOption` and :class:`PruningOptions`: the scorer and how it prunes (``run``,
  ``bench``, ``serve``, the plugin's ``PluginSettings``).
- :class:`EngineOptions`: how vLLM is started, with ``engine_args`` passed to vLLM's own
  ``EngineArgs`` (``collect``, ``run``, ``bench``, ``serve``).
- :class:`TrainingOptions` and :class:`FitOptions`: the problem split and the training loop
  (``train``, ``sweep``, ``tune``).
- :class:`GradingOption`: how a trace's final answer is found (``collect``, ``run``, ``bench``);
  every artifact that carries correctness records it.

**One rule for prompt and sampling defaults.** The prompt fields and ``temperature``,
``top_p``, ``top_k`` default to ``None``: "what the data was made with". ``collect`` makes
the data, so there ``None`` is the built-in default (:data:`BUILTIN_PROMPT`,
:data:`BUILTIN_SAMPLING`), filled in when the config is built and saved as such in the
traces file and the HDF5 file. An exported scorer records them (``generation`` in
``scorer.json``); ``run``, ``bench`` and ``serve`` fill ``None`` from the scorer, else from
the built-in default (:func:`resolve_generation`). A prompt option set to another value than
the scorer's gets a one-line warning naming both values.

**Resume.** A field that may differ between a run and the run it resumes (paths, progress
flags, ``limit``) is declared with ``option(..., resume_ok=True)``;
:func:`resume_view` drops those fields from a config dict before two are compared.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

from .config import OptionGroup, option
from .data_collection.grading import DEFAULT_GRADING, check_grading
from .data_collection.prompts import DEFAULT_SYSTEM_PROMPT, prompt_preset
from .errors import StepprobeError
from .inference.policies import AGGREGATES, POLICIES, VICTIM_RULES
from .risk import DEFAULT_DELTA, DEFAULT_TOLERANCE

log = logging.getLogger(__name__)

PROMPT_FIELDS = ("system_prompt", "answer_instruction", "use_chat_template")
TRAINED_SAMPLING_FIELDS = ("temperature", "top_p", "top_k")
# The built-in defaults behind ``None`` (collect's, the STEP paper's top_p).
BUILTIN_PROMPT: dict[str, Any] = {"system_prompt": DEFAULT_SYSTEM_PROMPT, "answer_instruction": None,
                                  "use_chat_template": True}
BUILTIN_SAMPLING: dict[str, Any] = {"temperature": 0.7, "top_p": 0.95, "top_k": 0}


@dataclasses.dataclass
class PromptOptions(OptionGroup):
    """How a problem becomes the prompt text (``data_collection.prompts.build_prompt``)."""

    system_prompt: str | None = option(
        None, "system prompt; '' for the chat template's default (default: the scorer's, else "
              "'You are a helpful assistant that solves math problems step by step.')", blank=True)
    answer_instruction: str | None = option(
        None, "instruction appended to every question; '' for none (default: the scorer's, else the "
              "'The answer is N.' form, the letter form for multiple choice)", blank=True)
    use_chat_template: bool | None = option(None, "apply the tokenizer's chat template (default: the scorer's, else yes)")
    prompt_preset: str | None = option(
        None, "named prompt settings for the fields not given: step-paper (the STEP paper's system prompt 'Please "
              "reason step by step, and put your final answer within \\boxed{}', the question as the whole user "
              "turn); the fields it sets are recorded like given ones", resume_ok=True)

    def resolve(self) -> None:
        # A preset fills the prompt fields the user left unset; given fields win.
        if self.prompt_preset:
            for name, value in prompt_preset(self.prompt_preset).items():
                if getattr(self, name) is None:
                    setattr(self, name, value)

    def prompt_kwargs(self) -> dict[str, Any]:
        """``build_prompt`` keyword arguments (``None`` fields take the built-in default)."""
        return {k: BUILTIN_PROMPT[k] if getattr(self, k) is None else getattr(self, k) for k in PROMPT_FIELDS}


@dataclasses.dataclass
class SamplingOptions(OptionGroup):
    """How traces are sampled (vLLM ``SamplingParams``)."""

    n: int = option(8, "traces sampled per problem")
    temperature: float | None = option(None, "sampling temperature (default: the scorer's, else 0.7)")
    top_p: float | None = option(None, "nucleus sampling p (default: the scorer's, else 0.95; 1.0 is about twice "
                                       "as fast on vLLM's CPU backend)")
    top_k: int | None = option(None, "top-k sampling, 0 or -1 = off (default: the scorer's, else 0)")
    max_tokens: int = option(256, "maximum generated tokens per trace")
    seed: int = option(0, "engine seed (LLM(seed=...)); with per_trace_seeds, the run seed every trace's seed "
                          "derives from")

    def resolve(self) -> None:
        if self.top_k == -1:  # vLLM's other spelling of "off"
            self.top_k = 0

    def check(self) -> None:
        if self.n < 1:
            raise StepprobeError(f"n must be at least 1, got {self.n}")
        if self.max_tokens < 1:
            raise StepprobeError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature is not None and self.temperature < 0:
            raise StepprobeError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise StepprobeError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise StepprobeError(f"top_k must be >= 0 (0 or -1 = off), got {self.top_k}")

    def sampling_kwargs(self) -> dict[str, Any]:
        """``SamplingParams`` keyword arguments of one trace (without ``n``)."""
        out = {k: BUILTIN_SAMPLING[k] if getattr(self, k) is None else getattr(self, k)
               for k in TRAINED_SAMPLING_FIELDS}
        out["max_tokens"] = self.max_tokens
        return out


@dataclasses.dataclass
class TraceSeedOption(OptionGroup):
    """Per-trace seeds (``run``, ``bench``; ``inference/seeds.py``)."""

    per_trace_seeds: bool = option(True, "give each trace its own seed from (seed, problem id, trace index), so what "
                                         "it samples does not depend on the batch or on pruning")


@dataclasses.dataclass
class GradingOption(OptionGroup):
    """How a trace is graded (``data_collection/grading.py``; ``collect``, ``run``, ``bench``)."""

    grading: str = option(
        DEFAULT_GRADING, "grading protocol: boxed-or-phrase (the last \\boxed{} or 'The answer is ...', whichever "
        "comes last) | boxed-only (the STEP paper's: the last \\boxed{} only); recorded in every artifact that "
        "carries correctness", absent=DEFAULT_GRADING)

    def check(self) -> None:
        check_grading(self.grading)


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise StepprobeError(f"unknown pruning policy {policy!r}; known: {', '.join(POLICIES)}")
    return policy


@dataclasses.dataclass
class PolicyOption(OptionGroup):
    """The default pruning policy (``bench`` takes a list of policies instead)."""

    policy: str = option("memory", "pruning policy: " + ", ".join(POLICIES))

    def check(self) -> None:
        check_policy(self.policy)


@dataclasses.dataclass
class PruningOptions(OptionGroup):
    """The scorer and how its scores prune traces (see ``inference/plugin.py``)."""

    scorer: str | None = option(None, "scorer checkpoint directory (stepprobe export); none = no scoring (default: "
                                      "the default model's released scorer, where one is shipped)")
    aggregate: str = option("mean", "trace score from step scores: " + ", ".join(AGGREGATES))
    ema_alpha: float = option(0.3, "aggregate ema: weight of the newest step score")
    threshold: float | None = option(None, "threshold policy: prune below this score (default: the scorer's)")
    warmup_steps: int = option(2, "threshold policy: steps before a trace can be pruned")
    keep_fraction: float = option(0.5, "top_fraction policy: fraction of each problem's traces kept")
    keep_step: int = option(3, "top_fraction policy: the step at which traces are ranked")
    protect_last: bool = option(True, "memory policy: never prune the last running trace of a problem")
    memory_victim: str = option("score", "memory policy: which trace goes when the KV cache is full: score (the paper's: "
                                         "lowest score of all), group_gap (furthest below its own problem's best), "
                                         "group_largest (lowest of the problem with most live traces)")
    min_live: int = option(0, "every policy keeps at least this many live traces per problem")
    relative_margin: float = option(0.1, "relative policy: prune a trace this far below its problem's best live trace")
    max_accuracy_loss: float | None = option(
        DEFAULT_TOLERANCE, "memory policy: accuracy (fraction of problems) pruning may cost against self-consistency; "
        "the cutoff comes from the scorer's trust.json (stepprobe calibrate; none there: nothing is pruned); "
        "none = the paper's rule (any scored trace may go)")
    risk_delta: float = option(DEFAULT_DELTA, "memory policy: the tolerance holds with probability 1 - risk_delta "
                                              "over the calibration problems")
    prune_below: float | None = option(None, "memory policy: prune only traces scored below this (overrides the "
                                             "calibrated cutoff)")

    def resolve(self) -> None:
        from .released import resolve_scorer

        # A stage that knows its model (run, bench, serve): the default model without --scorer gets
        # its released scorer (stepprobe/released/), where shipped. The resolved value is never
        # None ("" = no scorer), so a config rebuilt from it (replace) keeps the decision. The
        # plugin's settings (no model field) take the scorer as given: run, bench and serve
        # resolve it before they start an engine, and a raw vLLM engine gets none unless named.
        if "model" in {f.name for f in dataclasses.fields(self)}:
            self.scorer = resolve_scorer(self.model, self.scorer)
        elif self.scorer is not None:
            self.scorer = resolve_scorer(None, self.scorer)  # "none" -> ""; a path stays

    def check(self) -> None:
        if self.aggregate not in AGGREGATES:
            raise StepprobeError(f"unknown score aggregate {self.aggregate!r}; known: {', '.join(AGGREGATES)}")
        if not 0 < self.keep_fraction <= 1:
            raise StepprobeError(f"keep_fraction must be in (0, 1], got {self.keep_fraction}")
        if self.memory_victim not in VICTIM_RULES:
            raise StepprobeError(f"unknown memory victim rule {self.memory_victim!r}; known: {', '.join(VICTIM_RULES)}")
        if int(self.min_live) < 0:
            raise StepprobeError(f"min_live must be >= 0, got {self.min_live}")
        if not 0 <= self.relative_margin <= 1:
            raise StepprobeError(f"relative_margin must be in [0, 1], got {self.relative_margin}")
        if not 0 < self.ema_alpha <= 1:
            raise StepprobeError(f"ema_alpha must be in (0, 1], got {self.ema_alpha}")
        if self.max_accuracy_loss is not None and not 0 <= self.max_accuracy_loss < 1:
            raise StepprobeError(f"max_accuracy_loss must be in [0, 1) (a fraction of problems) or none, "
                                 f"got {self.max_accuracy_loss}")
        if not 0 < self.risk_delta < 1:
            raise StepprobeError(f"risk_delta must be in (0, 1), got {self.risk_delta}")

    def pruning_values(self) -> dict[str, Any]:
        return group_values(self, PruningOptions)


@dataclasses.dataclass
class EngineOptions(OptionGroup):
    """How the vLLM engine is started (``stepprobe.engine.engine_kwargs``)."""

    model: str | None = option(None, "model name, HF id or checkpoint directory (default: the embedded "
                                     "SmolLM2-135M-Instruct)")
    dtype: str = option("auto", "model dtype in vLLM: auto, float32, bfloat16, float16")
    max_model_len: int | None = option(2048, "engine context length, prompt + output (none: the model's)")
    # Speed and memory knobs: a resumed run may change them (not dtype, lengths or blocks).
    kv_cache_gib: float | None = option(None, "KV cache size in GiB (CPU: VLLM_CPU_KVCACHE_SPACE, default 2 unless "
                                              "set; GPU: kv_cache_memory_bytes, default: vLLM's)", resume_ok=True)
    num_kv_blocks: int | None = option(None, "exact number of KV-cache blocks (tight budgets)")
    max_num_seqs: int | None = option(None, "vLLM max_num_seqs", resume_ok=True)
    enforce_eager: bool = option(False, "run vLLM without compilation (the capture hooks work either way)",
                                 resume_ok=True)
    engine_args: dict = option(help="more vLLM engine arguments as a mapping (JSON on the command line), e.g. "
                                    "'{\"tensor_parallel_size\": 2}'; checked against vLLM's EngineArgs",
                               factory=dict)

    def check(self) -> None:
        if self.kv_cache_gib is not None and not self.kv_cache_gib > 0:
            raise StepprobeError(f"kv_cache_gib must be positive, got {self.kv_cache_gib}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise StepprobeError(f"num_kv_blocks must be at least 1, got {self.num_kv_blocks}")
        from .engine import check_engine_args

        check_engine_args(self.engine_args)


@dataclasses.dataclass
class ConfidenceOptions(OptionGroup):
    """The DeepConf-style confidence baseline and confidence vote (``run``, ``bench``)."""

    confidence_topk: int = option(5, "top-k log-probabilities per token for confidence voting / baseline")
    confidence_window: int = option(64, "confidence baseline: sliding window (tokens)")
    confidence_percentile: float = option(10.0, "confidence baseline: threshold percentile of warm-up traces")
    confidence_warmup: int = option(4, "confidence baseline: warm-up traces per problem")


@dataclasses.dataclass
class TrainingOptions(OptionGroup):
    """The problem split and the training loop shared by ``train``, ``sweep`` and ``tune``."""

    batch_size: int = option(256, "training batch size (0: auto, about 16 batches per epoch, 32..1024)")
    max_epochs: int = option(40, "maximum epochs (per probe)")
    patience: int = option(6, "early-stopping patience (validation epochs without improvement)")
    val_fraction: float = option(0.15, "fraction of problems in the validation split")
    test_fraction: float = option(0.15, "fraction of problems in the test split (never seen while tuning)")
    split_seed: int = option(0, "seed of the problem split")
    seed: int = option(0, "seed of initialization, shuffling and subsampling")
    max_steps_per_trace: int = option(0, "keep at most this many random steps per training trace (0: all)")


@dataclasses.dataclass
class FitOptions(OptionGroup):
    """The optimizer and objective of one probe (``train``, ``sweep``; ``tune`` searches them)."""

    lr: float = option(1e-3, "AdamW learning rate")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    monitor: str = option("val_auroc", "validation metric for early stopping and checkpointing")
    imbalance: str = option("pos_weight", "class imbalance: pos_weight (negatives/positives, the paper's), "
                                          "sampler (balanced batches), none")


def group_values(config: Any, *groups: type) -> dict[str, Any]:
    """The values of ``config``'s fields that belong to ``groups`` (to build another stage's config)."""
    names = [f.name for g in groups for f in dataclasses.fields(g)]
    return {n: getattr(config, n) for n in names}


def resume_view(data: Mapping[str, Any], config_cls: type) -> dict[str, Any]:
    """``data`` (a saved config dict) without the fields that may change on resume, with the
    fields it predates at their ``absent`` value."""
    volatile = {f.name for f in dataclasses.fields(config_cls) if f.metadata.get("resume_ok")}
    volatile.add("stepprobe_version")
    return {k: v for k, v in {**absent_values(config_cls), **data}.items() if k not in volatile}


def absent_values(config_cls: type) -> dict[str, Any]:
    """field -> the value an artifact saved before the field existed was made with."""
    return {f.name: f.metadata["absent"] for f in dataclasses.fields(config_cls) if "absent" in f.metadata}


def resume_keys(config_cls: type) -> tuple[str, ...]:
    """The fields a resumed run must share with the artifact it continues."""
    return tuple(f.name for f in dataclasses.fields(config_cls) if not f.metadata.get("resume_ok"))


def config_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


# --------------------------------------------------------------------- the scorer's generation
def generation_of(collect_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a scorer records about the data it was trained on: the prompt and sampling
    settings of collect's config (as saved in the traces file and the HDF5 file)."""
    cfg = dict(collect_config or {})
    if not cfg:
        return {}
    # Sampling keys a converted source does not know (STEP dumps) stay out: run/bench then
    # take their own defaults instead of a made-up record of the data.
    sampling_known = cfg.get("sampling_known", True)
    return {"prompt": {k: cfg.get(k, BUILTIN_PROMPT[k]) for k in PROMPT_FIELDS},
            "sampling": {k: cfg.get(k, BUILTIN_SAMPLING[k]) for k in TRAINED_SAMPLING_FIELDS
                         if sampling_known or k in cfg}}


def resolve_generation(config: Any, generation: Mapping[str, Any] | None, *, what: str = "run") -> dict[str, Any]:
    """Values for the ``None`` prompt and sampling fields of ``config``: the scorer's
    (``generation`` from its ``scorer.json``), else the built-in default. A prompt field the
    user set to another value than the scorer's is kept and warned about, in one line."""
    generation = generation or {}
    trained = {**(generation.get("prompt") or {}), **(generation.get("sampling") or {})}
    out: dict[str, Any] = {}
    for name in PROMPT_FIELDS + TRAINED_SAMPLING_FIELDS:
        if not hasattr(config, name):
            continue
        mine = getattr(config, name)
        builtin = BUILTIN_PROMPT.get(name, BUILTIN_SAMPLING.get(name))
        if mine is None:
            out[name] = trained.get(name, builtin)
        elif name in trained and _same(name, mine, trained[name]) is False:
            if name in PROMPT_FIELDS:
                log.warning("%s: %s=%r, but the scorer was trained on prompts with %s=%r", what, name, mine,
                            name, trained[name])
            else:
                log.info("%s: %s=%r; the scorer's data was sampled with %r", what, name, mine, trained[name])
    return out


def with_scorer_generation(config: Any) -> Any:
    """``config`` with its unset prompt and sampling fields taken from its scorer's
    ``generation`` record (else the built-in defaults); see :func:`resolve_generation`."""
    generation = None
    if getattr(config, "scorer", None):
        from .probes.checkpoint import read_scorer_meta

        generation = read_scorer_meta(config.scorer).get("generation")
    return config.replace(**resolve_generation(config, generation, what=getattr(config, "SECTION", "run")))


def _same(name: str, a: Any, b: Any) -> bool:
    if name == "system_prompt":  # None and '' both leave the system turn to the template
        return (a or "") == (b or "")
    return a == b


GROUPS: dict[str, type] = {
    "PromptOptions": PromptOptions, "SamplingOptions": SamplingOptions, "TraceSeedOption": TraceSeedOption,
    "PolicyOption": PolicyOption,
    "PruningOptions": PruningOptions, "EngineOptions": EngineOptions, "ConfidenceOptions": ConfidenceOptions,
    "TrainingOptions": TrainingOptions, "FitOptions": FitOptions, "GradingOption": GradingOption,
}


def markdown_table(group: type) -> str:
    """A group's fields as the Markdown table in ``docs/options.md`` (a test keeps them equal)."""
    rows = ["| flag / YAML key | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(group):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f.metadata.get("help", "").replace("|", "\\|")
        rows.append(f"| `--{f.name.replace('_', '-')}` / `{f.name}` | `{default!r}` | {text} |")
    return "\n".join(rows) + "\n"


def write_docs_tables(path: str = "docs/options.md") -> None:
    """Rewrite the group tables of ``docs/options.md`` from the declarations
    (``python -c "from stepprobe.options import write_docs_tables; write_docs_tables()"``)."""
    from pathlib import Path

    p = Path(path)
    text = p.read_text(encoding="utf-8")
    head = text[:text.index("## PromptOptions\n")]
    body = "".join(f"## {name}\n\n{(g.__doc__ or '').strip().splitlines()[0]}\n\n{markdown_table(g)}\n"
                   for name, g in GROUPS.items())
    p.write_text(head + body.rstrip() + "\n", encoding="utf-8")
