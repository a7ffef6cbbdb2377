"""Replay from the model itself (the idea of Self-Synthesized Rehearsal, arXiv 2403.01244): when no
pretraining-like corpus is at hand, the initial model writes the replay text.

Before the first update, the model samples `self_blocks` continuations of `max_length` tokens each
(temperature / top-p sampling, no early end: every block is full length) from its BOS token, or from
the prompts of `self_prompts` (one per line, rendered with its chat template) in turn. The blocks are
stored with the run (CHECKPOINTS/self_replay.safetensors, atomically, with the settings that made
them) and reused on resume, so a resumed run replays exactly the same text. Generation time is
returned for the run summary.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from forgetless.cache import build_once
from forgetless.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

CACHE_FILE = "self_replay.safetensors"


def _prompts(tokenizer, prompts_file: str | None) -> list[list[int]]:
    if prompts_file is None:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if bos is None:
            raise ConfigError("replay.self_prompts: the tokenizer has no BOS/EOS token to start from; "
                              "give a file of prompts")
        return [[bos]]
    path = Path(prompts_file)
    if not path.is_file():
        raise DataError(f"replay.self_prompts: {path} does not exist")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{path}: no prompts (one per line)")
    chat = bool(getattr(tokenizer, "chat_template", None))
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             if chat else p for p in lines]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@torch.no_grad()
def generate_blocks(model, tokenizer, n_blocks: int, length: int, temperature: float, top_p: float, seed: int,
                    prompts_file: str | None = None, batch_size: int = 16) -> torch.Tensor:
    """[n_blocks, length] token blocks sampled from `model` (prompt tokens included, so each block is
    what the model reads and continues)."""
    prompts = _prompts(tokenizer, prompts_file)
    if max(len(p) for p in prompts) >= length:
        raise ConfigError(f"replay: a self-replay prompt is longer than max_length={length}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    blocks = torch.empty(n_blocks, length, dtype=torch.long)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, n_blocks, batch_size):
                # block i continues prompt i mod P; one generate call per prompt (equal lengths, no padding)
                for k, prompt in enumerate(prompts):
                    rows = [i for i in range(start, min(start + batch_size, n_blocks)) if i % len(prompts) == k]
                    if not rows:
                        continue
                    ids = torch.tensor([prompt] * len(rows), device=device)
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                         temperature=temperature, top_p=top_p, max_new_tokens=length - len(prompt),
                                         min_new_tokens=length - len(prompt), pad_token_id=tokenizer.pad_token_id)
                    blocks[rows] = out[:, :length].cpu()
    finally:
        model.train(was_training)
    return blocks


def load_or_generate(model, tokenizer, folder: Path, settings: dict, accelerator) -> tuple[torch.Tensor, float]:
    """The run's self-replay blocks: from the cache when it holds these settings, else generated (on the
    main process; the others read them: cache.build_once). Returns (blocks, generation seconds; 0 when reused)."""
    seconds = 0.0

    def generate() -> dict[str, torch.Tensor]:
        nonlocal seconds
        started = time.perf_counter()
        blocks = generate_blocks(model, tokenizer, settings["blocks"], settings["length"], settings["temperature"],
                                 settings["top_p"], settings["seed"], settings["prompts"])
        seconds = time.perf_counter() - started
        logger.info("self-replay: generated %d blocks of %d tokens in %.1f s", len(blocks), settings["length"], seconds)
        return {"blocks": blocks}

    meta = {"settings": json.dumps(settings, sort_keys=True)}
    blocks = build_once(folder / CACHE_FILE, meta, generate, accelerator, "self-replay")["blocks"]
    return blocks, seconds
