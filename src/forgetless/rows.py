"""Rows of one data source in a training forward, and joining several sources into one forward.

Every micro-batch is made of rows tagged by where they come from: the SFT mixture (`sft`) and, with
replay, the replay source (`replay`). Each source is trained on its own labels (-100 = not trained)
and normalised on its own: a sum over a source's trained tokens times its `scale` is the mean over
that source's tokens in the whole optimizer step (across accumulation and processes), so adding a
source never reweights another. A loss term that covers some sources reads `ctx.rows[source]` (KL's
`on: replay` is a mean over the replay tokens); replay's own NLL term is the exception, normalised by the
SFT tokens so that it weighs by its share of the step's tokens (forgetless.trainer._replay_loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from forgetless.losses import next_token_targets, prediction_mask

SFT, REPLAY = "sft", "replay"


@dataclass
class Rows:
    source: str  # SFT or REPLAY
    batch: dict[str, torch.Tensor]  # input_ids, attention_mask, labels (SFT rows also example_id, source)
    scale: float  # sum over these rows' trained tokens * scale == mean over the step's tokens of this source
    keep: torch.Tensor = field(init=False)  # [B, T] bool: positions whose next token is trained
    logits: torch.Tensor | None = None  # [N, V] the current model's logits at the `keep` positions (after the forward)
    nll: torch.Tensor | None = None  # [N] their next-token NLL

    def __post_init__(self) -> None:
        self.keep = prediction_mask(self.batch["labels"])

    @property
    def tokens(self) -> int:
        return int(self.keep.sum())

    def targets(self) -> torch.Tensor:
        return next_token_targets(self.batch["labels"], self.keep)


def joined_inputs(parts: list[Rows]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and keep of the parts' rows stacked in order, right-padded to one length
    (padding is masked and never predicted, so no real token's output changes)."""
    if len(parts) == 1:
        b = parts[0].batch
        return b["input_ids"], b["attention_mask"], parts[0].keep
    length = max(p.batch["input_ids"].shape[1] for p in parts)

    def stack(get, value) -> torch.Tensor:
        return torch.cat([F.pad(get(p), (0, length - get(p).shape[1]), value=value) for p in parts])

    return (stack(lambda p: p.batch["input_ids"], 0), stack(lambda p: p.batch["attention_mask"], 0),
            stack(lambda p: p.keep, False))


def split_outputs(parts: list[Rows], nll: torch.Tensor, logits: torch.Tensor | None) -> None:
    """Hand each part its rows of the joined forward's (nll, logits): rows come in row-major `keep` order.

    One split, not slices: its backward concatenates the parts' gradients into one [N, V] tensor, where
    each slice's backward would allocate and zero-fill a full-size one of its own to be summed."""
    if len(parts) == 1:
        parts[0].nll, parts[0].logits = nll, logits
        return
    sizes = [p.tokens for p in parts]
    split_logits = [None] * len(parts) if logits is None else torch.split(logits, sizes)  # None: train.loss_chunk
    for part, part_nll, part_logits in zip(parts, torch.split(nll, sizes), split_logits):
        part.nll, part.logits = part_nll, part_logits
