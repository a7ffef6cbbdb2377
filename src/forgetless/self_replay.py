"""Replay from the model itself, as Self-Synthesized Rehearsal (SSR, arXiv 2403.01244) does it: when no
pretraining-like corpus is at hand, the initial model writes the replay rows before the first update.

`self_mode: pairs` (the default), SSR's recipe for one stage of fine-tuning:
  1. instructions: the lines of `self_prompts` (a text file, one per line), cycled; or, without one,
     written by the model in context: a plain-text list of `self_shots` real training prompts
     ("Instruction: ...", a blank line between two), seeded sample each time, which the model continues
     with one more instruction (cut at the first blank line; empty ones, copies of a training prompt and
     duplicates are drawn again, up to 4x the count);
  2. answers: the initial model answers each instruction, rendered as data.train is (chat template),
     sampled at `self_temperature` / `self_top_p` (default 1 / 1: the model's own distribution, unbiased),
     end-of-sequence allowed; answers that do not end within the row's `max_length` are dropped (a chat row
     ends with an end of turn, which a cut answer never had);
  3. rows: each (instruction, answer) is rendered and masked as an SFT row (loss on the answer only).
`self_mode: text`: free-running text as before 0.2: `self_blocks` blocks of `max_length` tokens sampled
from the BOS token (or from the `self_prompts` prompts in turn), no early end, every token trained.

What the model wrote is stored with the run (CHECKPOINTS/self_replay.safetensors, atomically, with the
settings and the run's inputs that made it: cache.build_once) and reused on resume, so a resumed run
replays exactly the same rows. Generation time is returned for the run summary.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import torch

from forgetless.cache import build_once
from forgetless.data import bos_before_raw_text
from forgetless.errors import ConfigError, DataError
from forgetless.generation import complete

logger = logging.getLogger(__name__)

CACHE_FILE = "self_replay.safetensors"
# rows per generate call before replay.self_batch_size existed, and its default: settings without "batch"
GENERATION_BATCH = 16


def _prompts(tokenizer, prompts_file: str | None) -> list[list[int]]:
    if prompts_file is None:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if bos is None:
            raise ConfigError("replay.self_prompts: the tokenizer has no BOS/EOS token to start from; "
                              "give a file of prompts")
        return [[bos]]
    lines = _prompt_lines(prompts_file)
    chat = bool(getattr(tokenizer, "chat_template", None))
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             if chat else p for p in lines]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@torch.no_grad()
def generate_blocks(model, tokenizer, n_blocks: int, length: int, temperature: float, top_p: float, seed: int,
                    prompts_file: str | None = None, batch_size: int = GENERATION_BATCH) -> torch.Tensor:
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


def _strings_to_tensors(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Strings as one uint8 tensor of their UTF-8 bytes and the [n + 1] offsets (what safetensors can store)."""
    data = [t.encode("utf-8") for t in texts]
    offsets = torch.tensor([0] + [len(b) for b in data], dtype=torch.long).cumsum(0)
    return torch.tensor(list(b"".join(data)), dtype=torch.uint8), offsets


def _tensors_to_strings(data: torch.Tensor, offsets: torch.Tensor) -> list[str]:
    raw, cut = bytes(data.tolist()), offsets.tolist()
    return [raw[a:b].decode("utf-8") for a, b in zip(cut, cut[1:])]


@torch.no_grad()
def sample_completions(model, tokenizer, texts: list[str], max_new_tokens: int, temperature: float, top_p: float,
                       batch_size: int = GENERATION_BATCH) -> list[tuple[str, bool]]:
    """(completion, ended at end-of-sequence) of each already-rendered text, sampled (left-padded batches).
    Seeded by the caller's torch RNG."""
    return [(c.text, c.ended) for c in complete(model, tokenizer, texts, max_new_tokens, batch_size,
                                                 sample=(temperature, top_p))]


def write_instructions(model, tokenizer, demos: list[str], count: int, shots: int, temperature: float, top_p: float,
                       batch_size: int = GENERATION_BATCH) -> list[str]:
    """SSR's first step: `count` new instructions the model writes in context from `shots` real ones each
    (the demonstrations a seeded sample of `demos`: the caller seeds `random` and torch)."""
    demos = [" ".join(d.split("\n\n")).strip() for d in demos if d.strip()]  # one blank line ends an instruction
    if not demos:
        raise DataError("replay: data: self writes instructions from the training prompts, and there are none; "
                        "give replay.self_prompts (a file, one prompt per line)")
    known, written = set(demos), []
    demos = sorted(set(demos))  # a mixture weight > 1 repeats records: one context never shows one twice
    # raw text, no chat template: with the BOS a tokenizer puts before raw text (Llama, Gemma), as in pretraining
    bos = tokenizer.bos_token if bos_before_raw_text(tokenizer) else ""
    for _ in range(4):  # empty, copied, repeated and unfinished instructions are drawn again
        need = count - len(written)
        contexts = [bos + "".join(f"Instruction: {d}\n\n" for d in random.sample(demos, min(shots, len(demos))))
                    + "Instruction:" for _ in range(need)]
        for text, ended in sample_completions(model, tokenizer, contexts, 64, temperature, top_p, batch_size):
            if "\n\n" not in text and not ended:
                continue  # cut at 64 tokens mid-instruction
            instruction = text.split("\n\n")[0].split("Instruction:")[0].strip()
            if instruction and instruction not in known:
                known.add(instruction)
                written.append(instruction)
        if len(written) >= count:
            break
    if not written:
        raise DataError("replay: data: self: the model wrote no usable instruction from the training prompts; "
                        "give replay.self_prompts (a file, one prompt per line)")
    return written[:count]


@torch.no_grad()
def generate_pairs(model, tokenizer, settings: dict, demos: list[str], render) -> tuple[list[str], list[str]]:
    """(instructions, answers): SSR's rows, written by the initial model (see the module docstring).
    `render(instruction) -> prompt text` renders an instruction as data.train's rows are."""
    count, length, batch = settings["blocks"], settings["length"], settings.get("batch", GENERATION_BATCH)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(settings["seed"])
            state = random.getstate()
            random.seed(settings["seed"])
            try:
                if settings["prompts"] is not None:
                    lines = _prompt_lines(settings["prompts"])
                    instructions = [lines[i % len(lines)] for i in range(count)]
                else:
                    instructions = write_instructions(model, tokenizer, demos, count, settings["shots"],
                                                      settings["temperature"], settings["top_p"], batch)
            finally:
                random.setstate(state)
            prompts = [render(i) for i in instructions]
            # what follows an answer in its row: the end of turn and what the template writes after it
            room = [length - len(tokenizer(p, add_special_tokens=False)["input_ids"]) - 4 for p in prompts]
            if max(room) < 1:
                raise ConfigError(f"replay.max_length: {length} tokens leave no room for an answer after the "
                                  "self-replay prompts; raise it")
            answers = sample_completions(model, tokenizer, prompts, max(room), settings["temperature"],
                                         settings["top_p"], batch)
    finally:
        model.train(was_training)
    kept = [(i, a) for i, (a, ended), r in zip(instructions, answers, room)
            if ended and a.strip() and len(tokenizer(a, add_special_tokens=False)["input_ids"]) <= r]
    logger.info("self-replay: %d of %d answers ended within max_length=%d; the others are dropped",
                len(kept), len(answers), length)
    if not kept:
        raise DataError(f"replay: data: self: none of the initial model's {len(answers)} answers ended within "
                        f"replay.max_length={length} tokens; raise it")
    return [i for i, _ in kept], [a for _, a in kept]


def _prompt_lines(prompts_file: str) -> list[str]:
    path = Path(prompts_file)
    if not path.is_file():
        raise DataError(f"replay.self_prompts: {path} does not exist")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{path}: no prompts (one per line)")
    return lines


def load_or_generate_pairs(model, tokenizer, folder: Path, settings: dict, accelerator, demos: list[str],
                           render) -> tuple[list[str], list[str], float]:
    """The run's self-replay (instruction, answer) pairs: from the cache when it holds these settings, else
    written (on the main process; the others read them). Returns (instructions, answers, seconds; 0 when reused)."""
    seconds = 0.0

    def generate() -> dict[str, torch.Tensor]:
        nonlocal seconds
        started = time.perf_counter()
        instructions, answers = generate_pairs(model, tokenizer, settings, demos, render)
        seconds = time.perf_counter() - started
        logger.info("self-replay: wrote %d instruction-answer pairs in %.1f s", len(answers), seconds)
        (i_data, i_cut), (a_data, a_cut) = _strings_to_tensors(instructions), _strings_to_tensors(answers)
        return {"instructions": i_data, "instruction_offsets": i_cut, "answers": a_data, "answer_offsets": a_cut}

    meta = {"settings": json.dumps(settings, sort_keys=True)}
    kept = build_once(folder / CACHE_FILE, meta, generate, accelerator, "self-replay")
    return (_tensors_to_strings(kept["instructions"], kept["instruction_offsets"]),
            _tensors_to_strings(kept["answers"], kept["answer_offsets"]), seconds)


def load_or_generate(model, tokenizer, folder: Path, settings: dict, accelerator) -> tuple[torch.Tensor, float]:
    """The run's self-replay blocks: from the cache when it holds these settings, else generated (on the
    main process; the others read them: cache.build_once). Returns (blocks, generation seconds; 0 when reused)."""
    seconds = 0.0

    def generate() -> dict[str, torch.Tensor]:
        nonlocal seconds
        started = time.perf_counter()
        blocks = generate_blocks(model, tokenizer, settings["blocks"], settings["length"], settings["temperature"],
                                 settings["top_p"], settings["seed"], settings["prompts"], settings.get("batch", GENERATION_BATCH))
        seconds = time.perf_counter() - started
        logger.info("self-replay: generated %d blocks of %d tokens in %.1f s", len(blocks), settings["length"], seconds)
        return {"blocks": blocks}

    meta = {"settings": json.dumps(settings, sort_keys=True)}
    blocks = build_once(folder / CACHE_FILE, meta, generate, accelerator, "self-replay")["blocks"]
    return blocks, seconds
