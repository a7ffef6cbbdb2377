"""Token-level losses shared by the training step and the regularizers."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from forgetless.environment import environment_kept

IGNORE_INDEX = -100


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precision -> fp32 for softmax-type math; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def prediction_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: True at position t when the token at t+1 is trained on (label != -100).

    Passed to the model as `logits_to_keep`, so the LM head runs on these positions only
    (transformers returns their logits as rows [N, V], in row-major order)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def next_token_targets(labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The [N] tokens predicted at the `keep` positions, in the same order as the logit rows."""
    return labels[:, 1:][keep[:, :-1]]


def forward_rows(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor,
                 use_cache: bool = False, **kwargs):
    """Forward that computes logits only where `keep` is True: returns (outputs, logits rows [N, V]).
    (`use_cache` with `past_key_values` in kwargs: `input_ids` continue that cache; `keep` is over them.)

    transformers >= 5.2x takes the [B, T] mask as `logits_to_keep`; older releases (5.17 on the GPU image
    we checked) index with it wrongly, so there every position's logits are computed and then selected."""
    mask_ok = logits_mask_supported()
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep if mask_ok else 0,
                    use_cache=use_cache, **kwargs)
    logits = outputs.logits
    return outputs, (logits if logits.dim() == 2 else logits[keep])


def logits_mask_supported() -> bool:
    """Whether this transformers slices hidden states with a boolean [B, T] `logits_to_keep` (models that
    call modeling_utils.slice_logits_to_keep do)."""
    global _LOGITS_MASK
    if _LOGITS_MASK is None:
        with environment_kept():  # forgetless.environment: its import loads torch._dynamo
            from transformers import modeling_utils

        _LOGITS_MASK = hasattr(modeling_utils, "slice_logits_to_keep")
    return _LOGITS_MASK


_LOGITS_MASK: bool | None = None


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of logit rows [N, V] against targets [N] (half precision upcast to fp32)."""
    return F.cross_entropy(upcast(logits), targets, reduction="none")


def rest_logprob(logp_k: torch.Tensor) -> torch.Tensor:
    """log(1 - sum of the k probabilities): the mass of everything outside a top-k set."""
    return torch.log1p(-logp_k.exp().sum(-1).clamp(max=1 - 1e-6))


def topk_kl(logp: torch.Tensor, ref_idx: torch.Tensor, ref_logp_k: torch.Tensor, ref_rest: torch.Tensor,
            direction: Literal["forward", "reverse"] = "forward") -> torch.Tensor:
    """KL over the reference's top-k tokens plus one "rest" bucket (k + 1 outcomes), per row.

    logp: the current model's log-probs [N, V]; ref_idx / ref_logp_k: the reference's top-k token ids
    and log-probs [N, k]; ref_rest: the reference's rest mass (log) [N]. Still the KL of two
    distributions, never above the exact one, and equal to it when the reference's mass is in its top k.
    """
    logp_k = logp.gather(-1, ref_idx)
    cur = torch.cat([logp_k, rest_logprob(logp_k).unsqueeze(-1)], dim=-1)
    ref = torch.cat([ref_logp_k, ref_rest.unsqueeze(-1)], dim=-1).to(cur.dtype)
    if direction == "forward":
        return (ref.exp() * (ref - cur)).sum(-1)
    return (cur.exp() * (cur - ref)).sum(-1)


# rows per chunk of the exact KL: ~2^22 logits (16 MiB in fp32) of temporaries at a time
KL_CHUNK_ELEMENTS = 2**22


class _ExactKL(torch.autograd.Function):
    """Per-row KL over the full vocabulary, computed in row chunks; its backward keeps one [N, V] tensor.

    Autograd through log_softmax/exp/mul would keep several [N, V] fp32 tensors alive until the
    backward (log-probs of both sides, the reference's probabilities, their difference). The
    gradient w.r.t. the current logits z has a closed form, so the forward computes it chunk by
    chunk and saves only that:
      forward  KL(r || p): dKL/dz = p - r
      reverse  KL(p || r): dKL/dz = p * (log p - log r - KL)
    The reference logits get no gradient (they come from a no_grad forward).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, ref_logits: torch.Tensor, reverse: bool) -> torch.Tensor:
        n, vocab = logits.shape
        # upcast's dtype, without upcasting the whole [N, V] tensor just to read it
        out = torch.empty(n, dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        step = max(1, KL_CHUNK_ELEMENTS // max(vocab, 1))
        for start in range(0, n, step):
            rows = slice(start, start + step)
            logp = torch.log_softmax(upcast(logits[rows]), dim=-1)
            logr = torch.log_softmax(upcast(ref_logits[rows]), dim=-1).to(logp.dtype)
            if reverse:
                p = logp.exp()
                diff = logp.sub_(logr)  # log p - log r, in place of logp
                kl = (p * diff).sum(-1)
                if grad is not None:
                    grad[rows] = p.mul_(diff.sub_(kl.unsqueeze(-1)))
            else:
                r = logr.exp()
                kl = (r * (logr - logp)).sum(-1)
                if grad is not None:
                    grad[rows] = logp.exp_().sub_(r)
            out[rows] = kl
        ctx.save_for_backward(grad)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.unsqueeze(-1).to(grad.dtype), None, None


def token_kl(
    logits: torch.Tensor, ref_logits: torch.Tensor, direction: Literal["forward", "reverse"] = "forward",
    topk: int = 0,
) -> torch.Tensor:
    """Per-position KL between next-token distributions, rows of [N, V] logits: a 1-D tensor [N].

    forward = KL(p_ref || p_theta) = sum_v p_ref (log p_ref - log p_theta); reverse swaps the two.
    topk > 0: coarsened to the reference's top-k tokens plus a "rest" bucket (see topk_kl).
    The exact KL (topk = 0) is differentiable w.r.t. `logits` only (the reference is a target).
    """
    if topk > 0:
        logp = torch.log_softmax(upcast(logits), dim=-1)
        logr = torch.log_softmax(upcast(ref_logits), dim=-1).to(logp.dtype)
        logr_k, idx = logr.topk(min(topk, logr.shape[-1]), dim=-1)
        return topk_kl(logp, idx, logr_k, rest_logprob(logr_k), direction)
    return _ExactKL.apply(logits, ref_logits.detach(), direction == "reverse")


class _ChunkedHeadNLL(torch.autograd.Function):
    """nll_i = logsumexp(h_i W^T) - (h_i W^T)[y_i], with the logits made `chunk` rows at a time in the forward
    and again in the backward: never more than [chunk, V] logits alive (the whole [N, V] logits, their fp32
    copy and log-softmax are what the plain head + cross-entropy keeps for its backward). Saved: the hidden
    states and one logsumexp per row."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        lse, picked = [], []
        for start in range(0, hidden.shape[0], chunk):
            logits = upcast(hidden[start:start + chunk] @ weight.T)
            lse.append(torch.logsumexp(logits, -1))
            picked.append(logits.gather(1, targets[start:start + chunk, None]).squeeze(1))
        lse = torch.cat(lse) if lse else hidden.new_zeros(0, dtype=upcast(hidden[:0]).dtype)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        return lse - (torch.cat(picked) if picked else lse)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=upcast(weight[:0]).dtype) if want_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = start + ctx.chunk
            h = hidden[start:end]
            # d nll / d logits = softmax - onehot(y), times the incoming gradient of each row
            g = torch.exp(upcast(h @ weight.T) - lse[start:end, None])
            g[torch.arange(g.shape[0], device=g.device), targets[start:end]] -= 1
            g = (g * grad[start:end, None]).to(hidden.dtype)
            if want_hidden:
                grad_hidden[start:end] = g @ weight
            if want_weight:
                grad_weight += upcast(g.T @ h)
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None


def chunked_head_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per-row NLL [N] of the LM head `weight` [V, d] (no bias) on hidden states [N, d] against targets [N],
    computed `chunk` rows at a time (forward and backward): token_nll(hidden @ weight.T, targets) without
    ever holding the [N, V] logits. Gradients reach the hidden states and, when it is trained, the head."""
    return _ChunkedHeadNLL.apply(hidden.to(weight.dtype), weight, targets, chunk)
