"""Token-level losses shared by the training step and the regularizers."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precision -> fp32 for softmax-type math; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token next-token NLL at trained positions only: a 1-D tensor, one entry per label != -100.

    Only the selected positions are upcast to fp32, so prompt and padding logits cost nothing extra.
    """
    shift_labels = labels[:, 1:]
    keep = shift_labels != IGNORE_INDEX
    selected = upcast(logits[:, :-1][keep])
    return F.cross_entropy(selected, shift_labels[keep], reduction="none")


def token_kl(
    logits: torch.Tensor, ref_logits: torch.Tensor, direction: Literal["forward", "reverse"] = "forward",
    topk: int = 0,
) -> torch.Tensor:
    """Per-position KL between next-token distributions, rows of [N, V] logits: a 1-D tensor [N].

    forward = KL(p_ref || p_theta) = sum_v p_ref (log p_ref - log p_theta); reverse swaps the two.
    topk > 0: the distributions are coarsened to the reference's top-k tokens plus one "rest" bucket
    (k + 1 outcomes). That is still a KL of two distributions, never above the exact one, and equal
    to it when the reference's mass sits in its top k.
    """
    logp = torch.log_softmax(upcast(logits), dim=-1)
    logr = torch.log_softmax(upcast(ref_logits), dim=-1).to(logp.dtype)
    if topk > 0:
        logr_k, idx = logr.topk(min(topk, logr.shape[-1]), dim=-1)
        logp_k = logp.gather(-1, idx)
        rest_r = torch.log1p(-logr_k.exp().sum(-1).clamp(max=1 - 1e-6))
        rest_p = torch.log1p(-logp_k.exp().sum(-1).clamp(max=1 - 1e-6))
        logp = torch.cat([logp_k, rest_p.unsqueeze(-1)], dim=-1)
        logr = torch.cat([logr_k, rest_r.unsqueeze(-1)], dim=-1)
    if direction == "forward":
        return (logr.exp() * (logr - logp)).sum(-1)
    return (logp.exp() * (logp - logr)).sum(-1)
