"""Completions of already-rendered texts in left-padded batches: the evaluation's greedy answers and
self-replay's sampled ones share this one loop (evaluate.greedy_answers, self_replay.sample_completions).

A leaf: it imports data (the end-of-sequence ids) only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from forgetless.data import end_of_sequence_ids, first_end


class Completion(NamedTuple):
    text: str  # decoded, without the end-of-sequence token and what follows it
    ended: bool  # stopped at end-of-sequence within max_new_tokens
    ids: list[int]  # the generated ids, up to and including that end-of-sequence token (a cut one: all of them)


@torch.no_grad()
def complete(model, tokenizer, texts: list[str], max_new_tokens: int, batch_size: int, *,
             sample: tuple[float, float] | None = None, desc: str | None = None) -> list[Completion]:
    """A completion of each text, in input order; greedy, or sampled at `sample` = (temperature, top_p) with
    the caller's torch RNG. Greedy batches texts of similar length (less padding); sampling keeps the input
    order, so each text's draw does not depend on the others' lengths."""
    ends = end_of_sequence_ids(model, tokenizer)  # the EOS, and a chat model's end-of-turn token
    device = next(model.parameters()).device
    order = list(range(len(texts))) if sample else sorted(range(len(texts)), key=lambda i: len(texts[i]))
    decoding = dict(do_sample=False) if sample is None else dict(do_sample=True, temperature=sample[0], top_p=sample[1])
    out: list[Completion | None] = [None] * len(texts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, leave=False, disable=desc is None):
            chunk = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=ends, **decoding)
            for i, ids in zip(chunk, gen[:, enc["input_ids"].shape[1]:].tolist()):
                end = first_end(ids, ends)  # what follows the end-of-sequence token is padding
                kept = ids if end is None else ids[:end]
                out[i] = Completion(tokenizer.decode(kept, skip_special_tokens=True), end is not None,
                                    ids if end is None else ids[:end + 1])
    finally:
        tokenizer.padding_side = side
    return out  # type: ignore[return-value]  (every index is filled)
