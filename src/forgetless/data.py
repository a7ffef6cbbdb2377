"""SFT data: read records, render them with the chat (or plain) template, mask the prompt.

Every record becomes `{"input_ids", "labels"}` where the prompt's labels are -100, so the loss
covers the response only. Errors name the file, the line (or row) and the field.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from forgetless.assets import resolve_builtin
from forgetless.config import DataConfig
from forgetless.errors import DataError
from forgetless.losses import IGNORE_INDEX

logger = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant")


@dataclass
class Record:
    """One example as chat messages, with where it came from (for error messages)."""

    messages: list[dict[str, str]]
    where: str


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start} of the line)") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of examples (or {{\"data\": [...]}})")
    for i, row in enumerate(data):
        yield f"{path}: item {i}", row


def _read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for row in reader:
                yield f"{path}:{reader.line_num}", row
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 ({exc.reason})") from None


def _read_table(path: Path) -> Iterator[tuple[str, Any]]:
    """Parquet files and `datasets.save_to_disk` folders, through the datasets library."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.Dataset.from_parquet(str(path))
    except Exception as exc:  # datasets raises many types; the user needs the file and the reason
        raise DataError(f"{path}: cannot read as a dataset ({type(exc).__name__}: {exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (has {list(ds)})")
        ds = ds["train"]
    for i, row in enumerate(ds):
        yield f"{path}: row {i}", row


def read_rows(spec: str) -> Iterator[tuple[str, Any]]:
    """Yield (location, raw row) from a file or dataset folder."""
    path = resolve_builtin(spec)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if path.is_dir() or suffix == ".parquet":
        return _read_table(path)
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    raise DataError(f"{path}: unsupported format '{suffix}' (use .jsonl, .json, .csv, .parquet or a datasets folder)")


def _text_field(row: dict, name: str, where: str) -> str:
    if name not in row or row[name] is None:
        raise DataError(f"{where}: missing field '{name}'")
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field '{name}' is empty")
    return value


def to_record(row: Any, where: str, cfg: DataConfig) -> Record:
    """Normalise a raw row (prompt/response or messages) into chat messages."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with fields, got {type(row).__name__}")
    if cfg.messages_field in row and row[cfg.messages_field] is not None:
        messages = row[cfg.messages_field]
        field = cfg.messages_field
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: field '{field}' must be a non-empty list of {{role, content}}")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise DataError(f"{where}: {field}[{i}] must be an object with 'role' and 'content'")
            role = m.get("role")
            if role not in ROLES:
                raise DataError(f"{where}: {field}[{i}].role must be one of {ROLES}, got {role!r}")
            clean.append({"role": role, "content": _text_field(m, "content", f"{where}: {field}[{i}]")})
        if clean[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message in '{field}' must be the assistant's (it is what is trained on)")
        if len(clean) < 2:
            raise DataError(f"{where}: '{field}' needs a prompt turn before the assistant's answer")
    elif cfg.prompt_field in row or cfg.response_field in row:
        clean = [
            {"role": "user", "content": _text_field(row, cfg.prompt_field, where)},
            {"role": "assistant", "content": _text_field(row, cfg.response_field, where)},
        ]
    else:
        raise DataError(
            f"{where}: expected fields '{cfg.prompt_field}' and '{cfg.response_field}', or '{cfg.messages_field}'; "
            f"found {sorted(row)}"
        )
    if cfg.system_prompt and clean[0]["role"] != "system":
        clean.insert(0, {"role": "system", "content": cfg.system_prompt})
    return Record(clean, where)


def load_records(spec: str, cfg: DataConfig) -> list[Record]:
    records = []
    for where, row in read_rows(spec):
        records.append(to_record(row, where, cfg))
        if cfg.limit is not None and len(records) >= cfg.limit:
            break
    if not records:
        raise DataError(f"{resolve_builtin(spec)}: no examples found (the file is empty)")
    return records


# ---------------------------------------------------------------- rendering and tokenising


def uses_chat_template(tokenizer, cfg: DataConfig) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if cfg.template == "chat" and not has:
        raise DataError("data.template: 'chat' requested but the tokenizer has no chat template (use 'plain' or 'auto')")
    return has if cfg.template == "auto" else cfg.template == "chat"


def _plain_prompt(messages: list[dict[str, str]]) -> str:
    parts = [f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in messages]
    return "".join(parts) + "### Assistant:\n"


def render(messages: list[dict[str, str]], tokenizer, chat: bool) -> tuple[str, str]:
    """Split an example into (prompt text, response text); only the response is trained on."""
    prompt = render_prompt(messages[:-1], tokenizer, chat)
    if chat:
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise DataError("the tokenizer's chat template does not render the prompt as a prefix; use data.template: plain")
        return prompt, full[len(prompt):]
    return prompt, messages[-1]["content"] + (tokenizer.eos_token or "")


def render_prompt(messages: list[dict[str, str]], tokenizer, chat: bool) -> str:
    """The text a model sees before it answers (used for generation at evaluation time)."""
    if chat:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _plain_prompt(messages)


def tokenize_records(records: list[Record], tokenizer, cfg: DataConfig) -> tuple[list[dict], int]:
    """Tokenise with prompt masking and truncation; return (examples, number truncated)."""
    chat = uses_chat_template(tokenizer, cfg)
    examples, truncated = [], 0
    for rec in records:
        prompt, response = render(rec.messages, tokenizer, chat)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        room = cfg.max_length - len(prompt_ids)
        if room <= 1:
            # Causal LMs predict token t+1 from t: at least the first response token must fit.
            raise DataError(
                f"{rec.where}: the prompt alone is {len(prompt_ids)} tokens, so data.max_length="
                f"{cfg.max_length} leaves no room for the response; raise data.max_length or shorten the prompt"
            )
        if len(response_ids) > room:
            response_ids = response_ids[:room]
            truncated += 1
        examples.append(
            {"input_ids": prompt_ids + response_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids}
        )
    if truncated:
        logger.warning("%d of %d examples were truncated to data.max_length=%d", truncated, len(records), cfg.max_length)
    return examples, truncated


def build_dataset(spec: str, tokenizer, cfg: DataConfig):
    """Records -> tokenised `datasets.Dataset` with input_ids and labels."""
    import datasets

    examples, _ = tokenize_records(load_records(spec, cfg), tokenizer, cfg)
    for i, example in enumerate(examples):
        example["example_id"] = i  # lets per-example caches (e.g. the KL reference cache) find their rows
    return datasets.Dataset.from_list(examples)


def collator(tokenizer):
    """Right-pads input_ids with the pad token and labels with -100 (transformers' own collator);
    an `example_id` per row, when present, comes along as a 1-D tensor."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")

    def collate(features: list[dict]) -> dict:
        ids = [f.pop("example_id") for f in features if "example_id" in f]
        batch = pad(features)
        if ids:
            batch["example_id"] = torch.tensor(ids, dtype=torch.long)
        return batch

    return collate


# ---------------------------------------------------------------- plain text corpora (replay, evaluation)


def load_texts(spec: str, text_field: str = "text") -> list[str]:
    """Documents from a text corpus: .txt / .txt.gz (blank-line separated paragraphs), or the
    `text_field` of .jsonl / .json / .csv / .parquet / a datasets folder."""
    import gzip

    path = resolve_builtin(spec)
    if not path.exists():
        raise DataError(f"text corpus {path} does not exist")
    name = path.name.lower()
    if name.endswith(".txt") or name.endswith(".txt.gz"):
        opener = gzip.open if name.endswith(".gz") else open
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                raw = f.read()
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
        texts = [doc.strip() for doc in raw.split("\n\n") if doc.strip()]
    else:
        texts = []
        for where, row in read_rows(spec):
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected an object with a '{text_field}' field")
            texts.append(_text_field(row, text_field, where))
    if not texts:
        raise DataError(f"{path}: no text found")
    return texts


def pack_blocks(texts: list[str], tokenizer, block_len: int) -> "torch.Tensor":
    """Tokenise documents, join them with eos, cut the stream into [n_blocks, block_len] (rest dropped)."""
    import torch

    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    n_blocks = len(stream) // block_len
    if n_blocks == 0:
        raise DataError(f"the text corpus has {len(stream)} tokens, fewer than one block of {block_len}")
    return torch.tensor(stream[: n_blocks * block_len], dtype=torch.long).view(n_blocks, block_len)
