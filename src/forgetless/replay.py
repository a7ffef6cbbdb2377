"""Approximate replay (arXiv 2512.22337) as a data source, as specified in docs/methods/replay.md.

The original pre-training data is unavailable, so a similar open corpus stands in. Replay is a second
source of rows beside the SFT mixture (forgetless.rows), set by the run's top-level `replay:` section
(forgetless.sections.ReplayConfig; null = none), never a regularizer entry: micro-batch u of the run (u = step *
grad_accum + its index in the step) brings floor(r * (u + 1)) - floor(r * u) replay rows,
r = ratio * batch_size: `ratio` rows per SFT example of a full micro-batch, exactly over a run, and a
function of the step alone, so a resumed run draws what an uninterrupted one does (no count of
examples seen to guess). Draw j of the run (across processes: slot j * world + rank) is position
slot mod N of a permutation reshuffled every cycle through the source, seeded by the run's seed.

What a row is (`format`):
- text (the shipped KJV excerpt, a user's .txt/.jsonl `text_field`): the documents, as written, are
  packed into blocks of `max_length` tokens (forgetless.data.pack_blocks), every token but the first a
  target, no chat template;
- chat (prompt/response, messages, alpaca, ... as data.train reads them): rendered and masked like
  SFT rows (only assistant turns trained), cut at `max_length`;
- `data: self` (forgetless.self_replay): rows the initial model writes before training: SSR's
  instruction-answer pairs, chat rows (`self_mode: pairs`, the default), or free-running text blocks
  (`self_mode: text`).

The replay term weighs the rows as if they were mixed into the batch (the spec's "interleave"; data
mixing as LLaMA-Factory and axolotl do it): with S the SFT tokens and R the replay tokens trained in the
optimizer step (across accumulation and processes),
    loss = l_sft + weight * (sum of replay-token NLL) / S = l_sft + weight * (R / S) * mean replay NLL,
the same relative weights as one mean over all S + R tokens, divided by S instead of S + R so that l_sft
(and what the learning rate means) does not change with the ratio. So `ratio` sets the strength: the term
grows with the replay tokens' share of the step, and `weight` multiplies it. Mind what a row holds: a text
block trains all its max_length - 1 tokens, an SFT row only its response, so with short answers a
small ratio already gives replay most of the step's tokens (`replay_token_ratio`, R / S, is logged).
Replay never changes the number of optimizer steps or the LR schedule: each step simply carries ratio x
more rows. Penalties that cover the replay rows (KL's `on: replay`) normalise over the replay tokens
(Rows.scale: their mean). Whether the rows join the SFT rows' forward or
get their own is the training step's choice (`forward`, see forgetless.trainer).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from forgetless import data as data_mod
from forgetless.assets import resolve_builtin
from forgetless.registry import Strength, register
from forgetless.regularizers.base import RunInfo
from forgetless.rows import REPLAY, Rows
from forgetless.sections import SELF, DataConfig, ReplayConfig  # noqa: F401  (ReplayConfig: re-exported)
from forgetless.self_replay import GENERATION_BATCH, load_or_generate, load_or_generate_pairs


def self_replay_settings(c: ReplayConfig, seed: int, inputs_key: str) -> dict:
    """What the model's replay text is written from, the key of its cache (forgetless.self_replay). The rows per
    generate call only when not GENERATION_BATCH, so text cached before the option existed stays reusable."""
    settings = {"mode": c.self_mode, "blocks": c.self_blocks, "length": c.max_length,
                "temperature": c.self_temperature, "top_p": c.self_top_p, "prompts": c.self_prompts,
                "seed": seed, "inputs": inputs_key}
    if c.self_batch_size != GENERATION_BATCH:
        settings["batch"] = c.self_batch_size
    return settings


class ReplaySource:
    """The replay rows of a run; `setup` loads (or generates) them, `draw` hands each micro-batch its share."""

    def __init__(self, cfg: ReplayConfig, data_cfg: Any = None) -> None:
        self.cfg = cfg
        self.data_cfg = data_cfg  # how data.train is rendered (chat template, train_on): chat replay rows alike
        self.blocks: torch.Tensor | None = None  # [N, max_length] text blocks
        self.examples: list[dict] | None = None  # chat rows: {input_ids, labels}
        self.trained: list[int] = []  # trained tokens of each row
        self.generation_seconds: float | None = None
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def weight(self) -> float:
        return self.cfg.weight

    def __len__(self) -> int:
        return len(self.trained)

    def setup(self, run: RunInfo) -> None:
        """Load the rows; `data: self` generates them with the initial model, once per run (cached with
        it, reused on resume)."""
        c = self.cfg
        self.seed, self.world, self.rank = run.seed, run.accelerator.num_processes, run.accelerator.process_index
        self.accum, self.batch_size = run.grad_accum, run.batch_size
        if c.ratio == 0:
            return
        # chat rows are rendered as data.train is (template, train_on, system prompt), their format detected per row
        render = replace(self.data_cfg or DataConfig(), format="auto", max_length=c.max_length, limit=None)
        if c.data == SELF:
            settings = self_replay_settings(c, run.seed, run.inputs_key)
            # before the first update the model is the initial one (on resume the cache already exists)
            if c.self_mode == "text":
                self.blocks, self.generation_seconds = load_or_generate(run.model, run.tokenizer, run.output_dir,
                                                                        settings, run.accelerator)
            else:
                self._self_pairs(run, render, dict(settings, shots=c.self_shots, system=render.system_prompt))
        elif row_format(c) == "text":
            self.blocks = data_mod.pack_blocks(data_mod.load_texts(c.data, c.text_field), run.tokenizer, c.max_length)
        else:
            self.examples, _ = data_mod.tokenize_records(data_mod.load_records(c.data, render), run.tokenizer, render)
            self.collate = data_mod.collator(run.tokenizer)  # chat rows of unequal length: padded per draw
        if self.blocks is not None:
            self.trained = [c.max_length - 1] * self.blocks.shape[0]
        else:
            self.trained = [sum(label != -100 for label in ex["labels"][1:]) for ex in self.examples]

    def _self_pairs(self, run: RunInfo, render: DataConfig, settings: dict) -> None:
        """SSR's rows: instructions (self_prompts, or written in context from the run's training prompts),
        answered by the initial model, rendered and masked as SFT rows (forgetless.self_replay)."""
        demos = []
        if self.data_cfg is not None and settings["prompts"] is None:
            # the run's training examples: its mixture less what budget holds out (the dataset's first rows)
            records = [record for record, _ in data_mod.training_records(self.data_cfg, run.seed)]
            if run.train_dataset is not None:
                records = records[:len(run.train_dataset)]
            demos = [record.messages[-2]["content"] for record in records if record.messages[-2]["role"] == "user"]
        chat = data_mod.uses_chat_template(run.tokenizer, render)
        # data.system_prompt, as every SFT row has it: in the prompt the model answers and in the rows trained
        system = [{"role": "system", "content": render.system_prompt}] if render.system_prompt else []
        instructions, answers, self.generation_seconds = load_or_generate_pairs(
            run.model, run.tokenizer, run.output_dir, settings, run.accelerator, demos,
            lambda instruction: data_mod.render_prompt([*system, {"role": "user", "content": instruction}],
                                                       run.tokenizer, chat))
        records = [data_mod.Record([*system, {"role": "user", "content": i}, {"role": "assistant", "content": a}],
                                   f"self-replay pair {k + 1}") for k, (i, a) in enumerate(zip(instructions, answers))]
        self.examples, _ = data_mod.tokenize_records(records, run.tokenizer, render)
        self.collate = data_mod.collator(run.tokenizer)

    def summary(self) -> dict[str, float]:
        """What train_summary.json records of the source (self-replay's generation cost)."""
        if self.generation_seconds is None:
            return {}
        return {"self_replay_generation_seconds": round(self.generation_seconds, 3),
                "self_replay_rows": len(self)}

    def row_indices(self, first: int, count: int, rank: int | None = None) -> list[int]:
        """Rows for process `rank`'s draws first..first+count-1 (disjoint across processes)."""
        n, rank = len(self), self.rank if rank is None else rank
        out = []
        for j in range(first, first + count):
            cycle, pos = divmod(j * self.world + rank, n)
            if cycle not in self._perms:
                if len(self._perms) > 4:
                    self._perms.clear()
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + cycle)
                self._perms[cycle] = torch.randperm(n, generator=g)
            out.append(int(self._perms[cycle][pos]))
        return out

    def draws(self, micro: int) -> tuple[int, int]:
        """(first draw, count) of micro-batch `micro` of the run, on every process alike."""
        per_micro = self.cfg.ratio * self.batch_size  # replay rows per nominal micro-batch (fractional)
        first = math.floor(per_micro * micro)
        return first, math.floor(per_micro * (micro + 1)) - first

    def step_tokens(self, micro: int, micro_batches_in_step: int) -> int:
        """Trained replay tokens of the optimizer step that micro-batch `micro` is in, over every process."""
        if not len(self):
            return 0
        start = (micro // self.accum) * self.accum
        step_first, _ = self.draws(start)
        step_count = self.draws(start + micro_batches_in_step)[0] - step_first
        return sum(self.trained[i] for rank in range(self.world) for i in self.row_indices(step_first, step_count, rank))

    def draw(self, micro: int, micro_batches_in_step: int, device: torch.device) -> Rows | None:
        """This process's rows for micro-batch `micro` of the run, with the scale that makes their NLL sum
        the mean over all replay tokens of the optimizer step (every process's draws are known: no sync)."""
        first, count = self.draws(micro)
        if count == 0 or not len(self):
            return None
        indices = self.row_indices(first, count)
        step_tokens = self.step_tokens(micro, micro_batches_in_step)
        these = sum(self.trained[i] for i in indices)
        scale = self.world / max(step_tokens, these, 1)  # `these` only counts when in_step is off (bench)
        if self.blocks is not None:
            ids = self.blocks[indices].to(device)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        else:
            batch = {k: v.to(device) for k, v in self.collate([dict(self.examples[i]) for i in indices]).items()}
        return Rows(REPLAY, batch, scale)

    def fraction(self, micro: int, sft_rows: int) -> float:
        """Share of replay rows in micro-batch `micro` (logged as replay_fraction)."""
        _, count = self.draws(micro)
        return count / (count + sft_rows) if len(self) else 0.0


def row_format(cfg: ReplayConfig) -> str:
    """`text` or `chat`: the config's, or for `auto` what the source holds (its first row)."""
    if cfg.format != "auto":
        return cfg.format

    name = str(resolve_builtin(cfg.data)).lower()
    if name.endswith(".txt") or name.endswith(".txt.gz"):
        return "text"
    for _, row in data_mod.read_rows(cfg.data):
        return "text" if isinstance(row, dict) and cfg.text_field in row else "chat"
    return "text"  # empty: load_texts says so, naming the file


def replay_documents(cfg: ReplayConfig, data_cfg: Any = None) -> list[str]:
    """The texts a replay source trains on (documents, or every turn of its chat rows), for the check that
    evaluation text is never replayed; empty for `data: self` (the model's own text)."""
    if cfg.data == SELF:
        return []
    if row_format(cfg) == "text":
        return data_mod.load_texts(cfg.data, cfg.text_field)

    records = data_mod.load_records(cfg.data, replace(data_cfg or DataConfig(), format="auto", limit=None))
    return [m["content"] for r in records for m in r.messages]


# replay's presets and strength (its options are the `replay:` section, forgetless.sections.ReplayConfig)
register("replay", ReplayConfig, None, strength=(
    # more replay keeps the NLL of text *like the replay corpus*; on other text it can rise (KJV replay on the
    # embedded default: ratio 0.1 -> validation perplexity +28%, bench/RESULTS.md)
    Strength("ratio", (0.01, 0.03, 0.1, 0.3), holds="general_nll"),
    Strength("weight", (0.3, 1.0, 3.0), holds="general_nll")), presets={
    "replay": {"replay": {}},
    # replay of rows the initial model writes itself: SSR instruction-answer pairs (forgetless.self_replay)
    "replay-self": {"replay": {"data": SELF}},
})
