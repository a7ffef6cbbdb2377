"""SFT data: read records, render them with the chat (or plain) template, mask the prompt.

Every record becomes `{"input_ids", "labels"}` where the prompt's labels are -100, so the loss
covers the response only. Errors name the file, the line (or row) and the field.

datasets, transformers and huggingface_hub are imported in the functions that use them, for the
reason model.py gives (a config check imports this module).
"""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import logging
import re
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from forgetless.assets import resolve_builtin
from forgetless.sections import DataConfig, DataSource
from forgetless.errors import ConfigError, DataError
from forgetless.losses import IGNORE_INDEX

logger = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Record:
    """One example as chat messages, with where it came from (for error messages)."""

    messages: list[dict[str, str]]
    where: str


def _json_problem(exc: Exception) -> str:
    """Why json.loads failed: JSONDecodeError, or the ValueError / RecursionError of a valid but unloadable
    document (an integer over Python's 4300-digit limit, nesting deeper than the interpreter's stack)."""
    if isinstance(exc, json.JSONDecodeError):
        return f"malformed JSON ({exc.msg} at column {exc.colno})"
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply to load; flatten the row"
    # the message minus its advice to call sys.set_int_max_str_digits (process-wide state)
    return f"unloadable JSON ({str(exc).split(';')[0]}); store such numbers as strings"


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
                row = json.loads(line)
            except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
                raise DataError(f"{where}: {_json_problem(exc)}") from None
            yield where, row


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: {_json_problem(exc)}") from None
    except (ValueError, RecursionError) as exc:
        raise DataError(f"{path}: {_json_problem(exc)}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of examples (or {{\"data\": [...]}})")
    for i, row in enumerate(data):
        yield f"{path}: item {i}", row


def _read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    """Rows as {header: value}. A row whose field count differs from the header's is an error (an unquoted
    comma would otherwise shift or drop text), and so is any csv.Error: the csv module's 128 KiB field
    limit is process-wide state (csv.field_size_limit) that a library must leave alone."""
    reader = None
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: drop the BOM spreadsheets write
            reader = csv.reader(f)
            header = next((fields for fields in reader if fields), None)
            if header and len(set(header)) < len(header):
                twice = sorted({name for name in header if header.count(name) > 1})
                raise DataError(f"{path}:{reader.line_num}: the header names columns {twice} more than once; "
                                "rename them")
            for fields in reader:
                where = f"{path}:{reader.line_num}"
                if not fields:  # a blank line
                    continue
                if len(fields) != len(header):
                    hint = ('quote fields that contain commas ("like, this")' if len(fields) > len(header)
                            else "give every column a value, and quote fields that contain line breaks")
                    raise DataError(f"{where}: {len(fields)} field{'s' * (len(fields) != 1)} where the header has "
                                    f"{len(header)} ({', '.join(header)}); {hint}")
                yield where, dict(zip(header, fields))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 ({exc.reason})") from None
    except csv.Error as exc:
        where = f"{path}:{reader.line_num}" if reader else str(path)
        fix = "store long texts as JSONL instead" if "field limit" in str(exc) else "check the quoting near this line"
        raise DataError(f"{where}: cannot parse CSV ({exc}); {fix}") from None


def _read_table(path: Path, split: str | None = None) -> Iterator[tuple[str, Any]]:
    """Parquet files and `datasets.save_to_disk` folders, through the datasets library."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.Dataset.from_parquet(str(path))
    except Exception as exc:  # datasets raises many types; the user needs the file and the reason
        raise DataError(f"{path}: cannot read as a dataset ({type(exc).__name__}: {exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        if (split or "train") not in ds:
            raise DataError(f"{path}: no split '{split or 'train'}' (it has {list(ds)}); name one as {path}@SPLIT")
        ds = ds[split or "train"]
    elif split not in (None, "train"):
        raise DataError(f"{path}: a single dataset without splits; drop @{split}")
    for i, row in enumerate(ds):
        yield f"{path}: row {i}", row


def split_source(spec: str) -> tuple[str, str | None]:
    """`SOURCE@SPLIT` -> (SOURCE, SPLIT); a spec without a split suffix (or an existing path with an @) -> (spec, None)."""
    base, sep, split = spec.rpartition("@")
    if sep and base and re.fullmatch(r"[\w.-]+", split) and not Path(spec).exists():
        return base, split
    return spec, None


def train_sources(cfg: DataConfig) -> list[DataSource]:
    """data.train as a list of sources (one plain string is one source of weight 1)."""
    if isinstance(cfg.train, str):
        return [DataSource(path=cfg.train)]
    return list(cfg.train)


def source_spec(source: DataSource) -> str:
    return source.path + (f"@{source.split}" if source.split else "")


def eval_source(cfg: DataConfig) -> str | None:
    """data.eval as a source: `@SPLIT` alone names that split of data.train's (single) source."""
    if cfg.eval and cfg.eval.startswith("@"):
        return split_source(source_spec(train_sources(cfg)[0]))[0] + cfg.eval
    return cfg.eval


def training_records(cfg: DataConfig, seed: int) -> list[tuple[Record, int]]:
    """The training mixture: each source's records taken `weight` times (whole copies, then a seeded
    sample for the fraction), each with its source's index. Deterministic given the seed; the Trainer's
    sampler then shuffles the mixture and, on resume, skips exactly the batches it has drawn."""
    mixture: list[tuple[Record, int]] = []
    for index, source in enumerate(train_sources(cfg)):
        records = load_records(source_spec(source), replace(cfg, format=source.format or cfg.format))
        whole, fraction = divmod(source.weight, 1.0)
        picked = records * int(whole)
        extra = round(fraction * len(records))
        if extra:
            order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed * 1_000_003 + index))
            picked += [records[i] for i in sorted(order[:extra].tolist())]
        mixture += [(record, index) for record in picked]
    return mixture


def split_holdout(mixture: list[tuple[Record, int]], holdout: int
                  ) -> tuple[list[tuple[Record, int]], list[tuple[Record, int]]]:
    """The mixture without its last `holdout` examples, and those examples, each with its source tag: what
    budget's trials train on (in memory, in the mixture's order) and what it validates them on."""
    if holdout <= 0:
        return mixture, []
    if len(mixture) < holdout + 8:
        raise DataError(f"budget.validation_examples: {holdout} held out of {len(mixture)} training examples leaves "
                        "too few to train on; lower it")
    return mixture[:-holdout], mixture[-holdout:]


def _looks_like_hub_dataset(spec: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", spec)) and not Path(spec).suffix


def _read_hub_dataset(repo_id: str, split: str | None) -> Iterator[tuple[str, Any]]:
    """A Hub dataset: its snapshot from the local Hugging Face cache first (downloaded only when online,
    as for models), its data files then read by `datasets` (split by file name, e.g. train.jsonl / test.jsonl)."""
    import datasets
    from huggingface_hub import constants, is_offline_mode, snapshot_download

    fetch = f"`hf download --repo-type dataset {repo_id}`"
    try:
        folder = snapshot_download(repo_id, repo_type="dataset", local_files_only=True)
    except Exception:  # not cached
        if is_offline_mode():
            raise DataError(f"{repo_id}: not a local file, and not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
                            f"while HF_HUB_OFFLINE is set; fetch it with {fetch} where there is a network, or give "
                            "a local file") from None
        try:
            folder = snapshot_download(repo_id, repo_type="dataset")
        except Exception as exc:  # unknown id, gated, network
            raise DataError(f"{repo_id}: neither a local file nor a downloadable Hub dataset ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); check the id or fetch it with {fetch}") from None
    try:
        ds = datasets.load_dataset(folder, split=split or "train")
    except Exception as exc:  # no such split, unreadable files
        raise DataError(f"{repo_id}@{split or 'train'}: cannot read it from {folder} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    where = f"{repo_id}@{split or 'train'}"
    for i, row in enumerate(ds):
        yield f"{where}: row {i}", row


def is_pattern(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def matching_paths(pattern: str) -> list[Path]:
    """The paths a glob pattern (relative to the working directory, or absolute) matches, sorted."""
    if Path(pattern).is_absolute():
        return sorted(Path("/").glob(pattern.lstrip("/")))
    return sorted(Path().glob(pattern))


def read_rows(spec: str) -> Iterator[tuple[str, Any]]:
    """Yield (location, raw row) from a file, a glob of files, a dataset folder or a Hub dataset id
    (`@SPLIT` picks a split of a folder or Hub dataset)."""
    base, split = split_source(spec)
    if is_pattern(base):
        files = matching_paths(base)
        if not files:
            raise DataError(f"{base}: no file matches this pattern")
        return itertools.chain.from_iterable(read_rows(str(f)) for f in files)
    path = resolve_builtin(base)
    if not path.exists():
        if _looks_like_hub_dataset(base):
            return _read_hub_dataset(base, split)
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if path.is_dir() or suffix == ".parquet":
        return _read_table(path, split)
    if split is not None:
        raise DataError(f"{spec}: a split (@{split}) applies to a dataset folder or a Hub dataset, not to a {suffix} file")
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


FORMATS = {
    "messages": "a list of {role, content} under data.messages_field (OpenAI roles; tool turns are context)",
    "sharegpt": "'conversations': a list of {from, value} (human / gpt / system / observation / function_call)",
    "alpaca": "'instruction', an optional 'input' (added to the prompt), 'output'; optional 'system', 'history'",
    "prompt_completion": "TRL's 'prompt' and 'completion' (strings, or lists of messages)",
    "prompt_response": "data.prompt_field and data.response_field ('prompt' / 'response' by default)",
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "model": "assistant", "function_call": "assistant", "system": "system", "observation": "tool",
                  "tool": "tool", "function": "tool"}
PASSED_KEYS = ("tool_calls", "tool_call_id", "name")  # kept for the chat template to render


def detect_format(row: dict, where: str, cfg: DataConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    if row.get(cfg.messages_field) is not None:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if cfg.prompt_field in row or cfg.response_field in row:
        return "prompt_response"
    known = "; ".join(f"{name}: {text}" for name, text in FORMATS.items())
    raise DataError(f"{where}: cannot tell the format from the fields {sorted(row, key=str)}. "
                    f"Expected one of - {known}; or set data.format")


def _content(value: Any, where: str) -> str:
    """A message's text: a string, or OpenAI-style content parts of type text."""
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise DataError(f"{where}[{i}]: only text content parts ({{type: text, text: ...}}) are supported")
            parts.append(part["text"])
        return "".join(parts)
    if not isinstance(value, str):
        raise DataError(f"{where}: must be a string, got {type(value).__name__}")
    return value


def _message_list(value: Any, field: str, where: str, role_key: str = "role", content_key: str = "content",
                  roles: dict[str, str] | None = None) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of {{{role_key}, {content_key}}}")
    out = []
    for i, m in enumerate(value):
        at = f"{where}: {field}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{at} must be an object with '{role_key}' and '{content_key}'")
        role = m.get(role_key)
        role = roles.get(role, role) if roles and isinstance(role, str) else role  # a list is unhashable
        if not isinstance(role, str) or role not in ROLES:
            allowed = sorted(roles) if roles else list(ROLES)
            raise DataError(f"{at}.{role_key} must be one of {allowed}, got {m.get(role_key)!r}")
        message = {k: m[k] for k in PASSED_KEYS if m.get(k) is not None}
        # chat templates iterate tool_calls and print the others: wrong types would fail inside Jinja
        if "tool_calls" in message and not (isinstance(message["tool_calls"], list)
                                            and all(isinstance(c, dict) for c in message["tool_calls"])):
            raise DataError(f"{at}.tool_calls must be a list of objects, got {type(message['tool_calls']).__name__}")
        for key in ("tool_call_id", "name"):
            if key in message and not isinstance(message[key], str):
                raise DataError(f"{at}.{key} must be a string, got {type(message[key]).__name__}")
        content = m.get(content_key)
        if content is None and message.get("tool_calls"):
            content = ""
        if content is None:
            raise DataError(f"{at}: missing field '{content_key}'")
        message = {"role": role, "content": _content(content, f"{at}.{content_key}"), **message}
        if not message["content"].strip() and not message.get("tool_calls"):
            raise DataError(f"{at}.{content_key} is empty")
        out.append(message)
    return out


def _as_messages(value: Any, field: str, where: str, role: str) -> list[dict]:
    """A TRL prompt / completion: a string (one `role` turn) or a list of messages."""
    if isinstance(value, list):
        return _message_list(value, field, where)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string or a list of {{role, content}} messages, "
                        f"got {type(value).__name__}")
    return [{"role": role, "content": _text_field({field: value}, field, where)}]


def _system(row: dict, where: str) -> list[dict]:
    """An optional 'system' field (sharegpt, alpaca) as a leading system turn."""
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: field 'system' must be a string, got {type(system).__name__}")
    return [{"role": "system", "content": system}] if system and system.strip() else []


def row_messages(row: dict, where: str, cfg: DataConfig) -> list[dict]:
    """A raw row of any supported format as chat messages (see FORMATS)."""
    fmt = detect_format(row, where, cfg)
    if fmt == "messages":
        return _message_list(row.get(cfg.messages_field), cfg.messages_field, where)
    if fmt == "sharegpt":
        messages = _message_list(row.get("conversations"), "conversations", where, "from", "value", SHAREGPT_ROLES)
        system = _system(row, where)
        return (system if messages[0]["role"] != "system" else []) + messages
    if fmt == "alpaca":
        instruction = _text_field(row, "instruction", where)
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise DataError(f"{where}: field 'input' must be a string, got {type(extra).__name__}")
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction  # the input is never dropped
        messages = _system(row, where)
        history = row.get("history")
        if history is not None and not isinstance(history, (list, tuple)):
            raise DataError(f"{where}: field 'history' must be a list of [prompt, response] pairs, "
                            f"got {type(history).__name__}")
        for i, turn in enumerate(history or []):
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                raise DataError(f"{where}: history[{i}] must be a [prompt, response] pair of strings")
            messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
        return messages + [{"role": "user", "content": prompt},
                           {"role": "assistant", "content": _text_field(row, "output", where)}]
    if fmt == "prompt_completion":
        return (_as_messages(row.get("prompt"), "prompt", where, "user")
                + _as_messages(row.get("completion"), "completion", where, "assistant"))
    return [{"role": "user", "content": _text_field(row, cfg.prompt_field, where)},
            {"role": "assistant", "content": _text_field(row, cfg.response_field, where)}]


def check_encodable(text: str, at: str) -> None:
    """JSON's "\\ud800" escapes load as strings that are not UTF-8 text: the tokenizer would raise a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{at} holds an unpaired surrogate (a \\ud800-style escape without its pair); "
                        "fix or drop that escape") from None


def to_record(row: Any, where: str, cfg: DataConfig) -> Record:
    """Normalise a raw row of any supported format into chat messages ending with an assistant turn."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with fields, got {type(row).__name__}")
    clean = row_messages(row, where, cfg)
    if clean[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation must end with an assistant turn (it is what is trained on)")
    if not any(m["role"] != "assistant" for m in clean[:clean.index(next(m for m in clean if m["role"] == "assistant"))]):
        raise DataError(f"{where}: the conversation needs a prompt turn before the first assistant turn")
    for i, m in enumerate(clean):
        for key in ("content", "name", "tool_call_id"):
            check_encodable(m.get(key, ""), f"{where}: message {i} ({m['role']}) field '{key}'")
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


def _plain(messages: list[dict], tokenizer) -> str:
    """The plain template: each turn as `### Role:\ncontent`, an assistant turn ending with eos."""
    eos = tokenizer.eos_token or ""
    return "".join(f"### {m['role'].capitalize()}:\n{m['content']}{eos if m['role'] == 'assistant' else ''}\n\n"
                   for m in messages)


def render_prompt(messages: list[dict[str, str]], tokenizer, chat: bool) -> str:
    """The text a model sees before it answers (used for generation at evaluation time)."""
    if chat:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _plain(messages, tokenizer) + "### Assistant:\n"


def _render_through(messages: list[dict], tokenizer, chat: bool) -> str:
    """The conversation up to and including its last (assistant) turn."""
    if chat:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return render_prompt(messages[:-1], tokenizer, chat) + messages[-1]["content"] + (tokenizer.eos_token or "")


def render(messages: list[dict[str, str]], tokenizer, chat: bool) -> tuple[str, str]:
    """Split an example into (prompt text, last response text): what evaluation scores."""
    prompt = render_prompt(messages[:-1], tokenizer, chat)
    full = _render_through(messages, tokenizer, chat)
    if not full.startswith(prompt):
        raise DataError("the tokenizer's chat template does not render the prompt as a prefix; use data.template: plain")
    return prompt, full[len(prompt):]


def task_pairs(records: list[Record], tokenizer, cfg: DataConfig) -> tuple[list[tuple[str, str]], list[list[int]]]:
    """The task examples as the target NLL scores them: (prompt text, reference answer text) rendered with the
    training template, and each answer's token ids (their count is what NLL per answer token divides by).
    The one rendering of the evaluation's target NLL, budget's validation and the forgetting curve."""
    chat = uses_chat_template(tokenizer, cfg)
    pairs = [render(r.messages, tokenizer, chat) for r in records]
    return pairs, [tokenizer(response, add_special_tokens=False)["input_ids"] for _, response in pairs]


def render_pieces(record: Record, tokenizer, chat: bool, train_on: str) -> list[tuple[str, bool]]:
    """The conversation as consecutive text pieces (text, trained?): each trained assistant turn is the
    text the template adds for it after its prompt, checked against the tokenizer's own rendering of
    the conversation up to that turn (a template that renders earlier turns differently once later ones
    exist cannot be split this way: the error says what to do)."""
    from jinja2 import TemplateError  # what a template's raise_exception raises (jinja2 comes with torch)

    messages = record.messages
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last_assistant":
        turns = turns[-1:]
    pieces, done = [], ""
    for i in turns:
        try:
            prompt = render_prompt(messages[:i], tokenizer, chat)
            through = _render_through(messages[:i + 1], tokenizer, chat)
        except TemplateError as exc:  # the template's raise_exception, e.g. roles that do not alternate
            raise DataError(f"{record.where}: the tokenizer's chat template rejects this conversation ({exc}); "
                            "change its turns or use data.template: plain") from None
        if not prompt.startswith(done) or not through.startswith(prompt):
            raise DataError(f"{record.where}: the chat template renders an earlier turn differently once the "
                            f"conversation goes on (seen at messages[{i}]), so the assistant turns' tokens cannot be "
                            "located; use data.train_on: last_assistant or data.template: plain")
        pieces += [(prompt[len(done):], False), (through[len(prompt):], True)]
        done = through
    return pieces


def tokenize_records(records: list[Record], tokenizer, cfg: DataConfig) -> tuple[list[dict], int]:
    """Tokenise with every non-trained piece masked, and truncation; return (examples, number truncated)."""
    chat = uses_chat_template(tokenizer, cfg)
    examples, truncated = [], 0
    for rec in records:
        input_ids, labels = [], []
        for text, trained in render_pieces(rec, tokenizer, chat, cfg.train_on):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            input_ids += ids
            labels += ids if trained else [IGNORE_INDEX] * len(ids)
        first_trained = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        if first_trained >= cfg.max_length - 1:
            # Causal LMs predict token t+1 from t: at least the first trained token must fit.
            raise DataError(
                f"{rec.where}: the prompt alone is {first_trained} tokens, so data.max_length="
                f"{cfg.max_length} leaves no room for the response; raise data.max_length or shorten the prompt"
            )
        if len(input_ids) > cfg.max_length:
            if any(label != IGNORE_INDEX for label in labels[cfg.max_length:]):
                truncated += 1
            input_ids, labels = input_ids[:cfg.max_length], labels[:cfg.max_length]
        examples.append({"input_ids": input_ids, "labels": labels})
    if truncated:
        logger.warning("%d of %d examples were truncated to data.max_length=%d", truncated, len(records), cfg.max_length)
    return examples, truncated


def build_dataset(spec: str, tokenizer, cfg: DataConfig):
    """A source's records -> tokenised `datasets.Dataset` with input_ids and labels."""
    return records_dataset(load_records(spec, cfg), tokenizer, cfg)


def records_dataset(records: list[Record], tokenizer, cfg: DataConfig):
    """Records already read -> tokenised `datasets.Dataset` with input_ids and labels."""
    return _as_dataset([(record, 0) for record in records], tokenizer, cfg)


def build_training_dataset(mixture: list[tuple[Record, int]], tokenizer, cfg: DataConfig):
    """The training mixture as read (training_records, less split_holdout's examples) tokenised, each row tagged
    with its `source`."""
    return _as_dataset(mixture, tokenizer, cfg)


def _as_dataset(tagged: list[tuple[Record, int]], tokenizer, cfg: DataConfig):
    import datasets

    examples, _ = tokenize_records([record for record, _ in tagged], tokenizer, cfg)
    for i, (example, (_, source)) in enumerate(zip(examples, tagged)):
        example["example_id"] = i  # lets per-example caches (e.g. the KL reference cache) find their rows
        example["source"] = source  # the data.train source the row came from
    return datasets.Dataset.from_list(examples)


ROW_TAGS = ("example_id", "source")  # per-row integers that ride along with a batch as 1-D tensors


def collator(tokenizer):
    """Right-pads input_ids with the pad token and labels with -100 (transformers' own collator);
    each row's tags (ROW_TAGS), when present, come along as 1-D tensors."""
    from transformers import DataCollatorForSeq2Seq

    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")

    def collate(features: list[dict]) -> dict:
        tags = {key: [f.pop(key) for f in features if key in f] for key in ROW_TAGS}
        batch = pad(features)
        for key, values in tags.items():
            if values:
                batch[key] = torch.tensor(values, dtype=torch.long)
        return batch

    return collate


# ---------------------------------------------------------------- plain text corpora (replay, evaluation)


# a line holding only a form feed (the plain-text page break) ends a document inside one .txt file
DOCUMENT_BREAK = re.compile(r"\n?^[ \t]*\f[ \t\f]*$\n?", re.M)


def load_texts(spec: str, text_field: str = "text") -> list[str]:
    """Documents of a text corpus, as written (newlines and paragraph breaks kept): a .txt / .txt.gz file is
    one document, or several separated by lines holding only a form feed; .jsonl / .json / .csv / .parquet / a
    datasets folder: the `text_field` of each row."""
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
        except (EOFError, OSError, zlib.error) as exc:  # truncated or corrupt gzip (BadGzipFile is an OSError)
            raise DataError(f"{path}: cannot read it ({type(exc).__name__}: {exc}); the file is truncated or "
                            "corrupt, fetch or compress it again") from None
        # only the blank lines around a document go: what is inside it stays as written
        texts = [doc.strip("\n").rstrip() for doc in DOCUMENT_BREAK.split(raw) if doc.strip()]
    else:
        texts = []
        for where, row in read_rows(spec):
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected an object with a '{text_field}' field")
            texts.append(_text_field(row, text_field, where))
            check_encodable(texts[-1], f"{where}: field '{text_field}'")
    if not texts:
        raise DataError(f"{path}: no text found")
    return texts


def paragraphs(texts: list[str], shortest: int = 40) -> set[str]:
    """The blank-line separated paragraphs of the documents, whitespace-normalised: what the check that
    evaluation text is never replayed compares (a shared paragraph is shared text, whole documents or not).
    Paragraphs under `shortest` characters ("Amen.", "See also") are common to unrelated texts: left out."""
    found = (" ".join(p.split()) for text in texts for p in re.split(r"\n\s*\n", text))
    return {p for p in found if len(p) >= shortest}


def bos_before_raw_text(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token before raw text (Llama, Mistral, Gemma), as in pretraining."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def document_separator(tokenizer) -> tuple[list[int], list[int], str]:
    """What marks a document boundary in the stream of documents: (token ids before each document, after
    each, text between two documents when there is no such token). The separator the model was pretrained
    with, not the chat end-of-turn (unless the two are one token, as in OLMo-2's instruct models):
      - `<|endoftext|>` when the vocabulary has it (GPT-2, SmolLM, Qwen, Phi, StarCoder: their
        pretraining document separator, whatever the instruct model's eos became), after each document;
      - else the BOS token when the tokenizer puts it before raw text (Llama, Mistral, Gemma), before each;
      - else the EOS token when it is not the chat template's end of turn, after each;
      - else none: documents are joined by a paragraph break."""
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return [], [vocab["<|endoftext|>"]], ""
    if bos_before_raw_text(tokenizer):
        return [tokenizer.bos_token_id], [], ""
    eos, template = tokenizer.eos_token, getattr(tokenizer, "chat_template", None) or ""
    template = template if isinstance(template, str) else " ".join(map(str, dict(template).values()))
    if eos is not None and eos not in template and "eos_token" not in template:
        return [], [tokenizer.eos_token_id], ""
    return [], [], "\n\n"


def end_of_sequence_ids(model, tokenizer) -> list[int]:
    """Every token that ends a generated answer: the tokenizer's EOS and the model's generation config's
    (Gemma's <end_of_turn>, Phi-3's <|end|>: chat models whose turn ends with another token than the EOS)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    config = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in config if isinstance(config, (list, tuple)) else [config]:
        if i is not None and i not in ids:
            ids.append(int(i))
    return ids


def first_end(ids: list[int], ends: list[int]) -> int | None:
    """Index of the first end-of-sequence token in `ids`, or None when the answer did not end."""
    return next((k for k, t in enumerate(ids) if t in ends), None)


def document_stream(texts: list[str], tokenizer) -> list[int]:
    """The documents tokenised whole (no special tokens inside), joined with `document_separator`."""
    before, after, between = document_separator(tokenizer)
    gap = tokenizer(between, add_special_tokens=False)["input_ids"] if between else []
    stream: list[int] = []
    for i, text in enumerate(texts):
        stream.extend(gap if i else [])
        stream.extend(before)
        stream.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        stream.extend(after)
    return stream


def pack_blocks(texts: list[str], tokenizer, block_len: int) -> "torch.Tensor":
    """The document stream (document_stream) cut into [n_blocks, block_len] (the rest dropped): blocks cross
    document boundaries only where a document ends, at its separator, as pretraining packs text."""
    stream = document_stream(texts, tokenizer)
    n_blocks = len(stream) // block_len
    if n_blocks == 0:
        raise DataError(f"the text corpus has {len(stream)} tokens, fewer than one block of {block_len}")
    return torch.tensor(stream[: n_blocks * block_len], dtype=torch.long).view(n_blocks, block_len)


def general_domains(general_text: str | dict[str, str] | None) -> dict[str, str]:
    """evaluation.general_text as {domain: source}: one source is the domain "general"."""
    if not general_text:
        return {}
    if isinstance(general_text, str):
        return {"general": general_text}
    for domain, spec in general_text.items():
        if not isinstance(spec, str) or not spec:
            raise ConfigError(f"evaluation.general_text.{domain}: expected a text source (a path or builtin:...), "
                              f"got {spec!r}")
    return dict(general_text)


def general_blocks(general_text, tokenizer, block_len: int, reported: int) -> dict[str, tuple["torch.Tensor", "torch.Tensor"]]:
    """Each general-text domain's blocks as (reported, held out): its first `reported` blocks are what the
    evaluation reports on; the rest are never reported (budget validation, the forgetting curve)."""
    out = {}
    for domain, spec in general_domains(general_text).items():
        blocks = pack_blocks(load_texts(spec), tokenizer, block_len)
        out[domain] = (blocks[:reported], blocks[reported:])
    return out


def held_out_blocks(general_text, tokenizer, block_len: int, reported: int, limit: int,
                    fallback: bool = False) -> "torch.Tensor":
    """Up to `limit` general-text blocks the evaluation never reports on: each domain's blocks after its first
    `reported` (general_blocks), a block of each domain in turn. What budget validates on and the forgetting
    curve watches. `fallback`: when the texts are too short to hold any, their reported blocks, last first
    (the curve then watches those rather than nothing)."""
    domains = list(general_blocks(general_text, tokenizer, block_len, reported).values())
    blocks = interleave_blocks([held for _, held in domains], limit)
    if fallback and len(blocks) == 0:
        blocks = interleave_blocks([rep.flip(0) for rep, _ in domains], limit)
    return blocks


def interleave_blocks(parts: list["torch.Tensor"], limit: int) -> "torch.Tensor":
    """Up to `limit` blocks taken from the parts in turn (a block of each domain, then the next of each)."""
    rows = [part[i] for i in range(max((len(p) for p in parts), default=0)) for part in parts if i < len(part)]
    width = parts[0].shape[1] if parts else 0
    return torch.stack(rows[:limit]) if rows and limit > 0 else torch.zeros((0, width), dtype=torch.long)
