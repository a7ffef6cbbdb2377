"""What a result was computed from, by content: the key every reused result and cache is kept under.

A run's *inputs* are the hashes of the data files it reads, the model's identity (name or path,
revision, and a hash over the model folder's files: weights, config and tokenizer), the dtype
`model.dtype` resolved to, the device kind and the forgetless version. A finished run, a stored
evaluation or a cache (KL reference, EWC Fisher, forgetting-curve reference, self-replay text) is
reused only while these are unchanged, so editing `train.jsonl` in place, upgrading forgetless, swapping
the weights behind a path or moving from a CPU (float32) to a GPU (bfloat16) recomputes it.

Hashing reads each file once per process (memoised by path, size and modification time); a file in the
Hugging Face cache is named by its blob, which is already its content hash, so it is not read at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from forgetless import __version__
from forgetless.assets import resolve_builtin
from forgetless.data import (eval_source, general_domains, is_pattern, matching_paths, source_spec, split_source,
                             train_sources)
from forgetless.model import default_device, resolve_dtype, resolve_model_path

_DIGESTS: dict[tuple, str] = {}
_CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (a Hub cache blob: its name, which is that content hash)."""
    real = Path(os.path.realpath(path))
    # an LFS blob's name is its sha256 (a small git blob's 40-hex name is not a hash of what is there now)
    if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
        return real.name
    stat = real.stat()
    memo = (str(real), stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns)
    if memo not in _DIGESTS:
        h = hashlib.sha256()
        with open(real, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        _DIGESTS[memo] = h.hexdigest()
    return _DIGESTS[memo]


def folder_digest(folder: Path, patterns: tuple[str, ...] | None = None) -> str:
    """One hash over the files under `folder` (relative names and contents; hidden files skipped), or
    over its top-level files matching `patterns`."""
    h = hashlib.sha256()
    if patterns is None:
        files = [p for p in folder.rglob("*") if p.is_file()]
    else:
        files = [p for p in folder.iterdir() if p.is_file() and any(p.match(pat) for pat in patterns)
                 and p.name not in RESULT_FILES]
    for path in sorted(files):
        rel = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        h.update(f"{rel}\0{file_digest(path)}\n".encode())
    return h.hexdigest()


# What a model folder's identity is made of: weights, configs, tokenizer; not what else may sit there
# (a forgetless run used as a base holds checkpoints/, metrics and evaluations that change later)
MODEL_FILES = ("*.safetensors", "*.bin", "*.json", "*.model", "*.tiktoken", "*.txt", "*.jinja", "*.py")
RESULT_FILES = {"train_summary.json", "eval.json", "compare_eval.json", "base_eval.json", "budget.json", "report.json",
                "training_args.bin"}


def source_digest(spec: str | None) -> str | None:
    """The content hash of a data source as a config names it: a file, a glob, a `builtin:` file, a
    dataset folder, or a Hub dataset in the local cache. A source that is not a file (e.g. replay's
    `self`, or a Hub dataset not cached yet) is keyed by its spec alone."""
    if spec is None:
        return None

    base, split = split_source(spec)
    suffix = f"@{split}" if split else ""
    if is_pattern(base):  # what read_rows reads: the same matches
        h = hashlib.sha256()
        for f in matching_paths(base):  # a matched folder is a dataset folder
            h.update(f"{f}\0{folder_digest(f) if f.is_dir() else file_digest(f)}\n".encode())
        return h.hexdigest() + suffix
    path = resolve_builtin(base)
    if path.is_file():
        return file_digest(path) + suffix
    if path.is_dir():
        return folder_digest(path) + suffix
    try:  # a Hub dataset: its cached snapshot
        from huggingface_hub import snapshot_download

        return folder_digest(Path(snapshot_download(base, repo_type="dataset", local_files_only=True))) + suffix
    except Exception:  # not a dataset in the cache: nothing to hash but its name
        return f"spec:{spec}"


def digest(value: Any) -> str:
    """A short stable hash of a JSON-able value (a cache's metadata field)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:32]


def model_identity(model_cfg) -> dict[str, Any]:
    """The base model a config names: its name, revision and the hash of its resolved folder."""
    path = resolve_model_path(model_cfg.name_or_path, model_cfg.revision)
    return {"name_or_path": model_cfg.name_or_path, "revision": model_cfg.revision,
            "files": folder_digest(path, MODEL_FILES)}


def machine_identity(model_cfg) -> dict[str, str]:
    """What the same config computes differently on another machine: the dtype `auto` resolves to, the device kind."""
    return {"dtype": str(resolve_dtype(model_cfg)).replace("torch.", ""), "device": default_device().type}


def training_data_specs(config) -> list[str]:
    """Every data source a training run reads: data.train's sources, data.eval, a replay corpus."""
    specs = [source_spec(s) for s in train_sources(config.data)]
    if config.data.eval:
        specs.append(eval_source(config.data))
    if config.evaluation.every_steps > 0:  # the forgetting curve, logged with the run, reads the evaluation's data
        specs += [s for s in evaluation_data_specs(config.evaluation) if s != config.evaluation.mc]
    # what a method's options read (a replay corpus, EWC's text sample): `data_sources()` of each
    for options in config.regularizers + ([config.replay] if config.replay is not None else []):
        specs += getattr(options, "data_sources", lambda: [])()
    return specs


def evaluation_data_specs(ev) -> list[str]:
    """Every data source the evaluation suite reads."""
    specs = [s for s in (ev.task, ev.instructions, ev.mc) if s]
    specs += list(general_domains(ev.general_text).values())
    return specs


def run_inputs(config, holdout: int = 0) -> dict[str, Any]:
    """What a training run is computed from, by content (see the module docstring). `holdout`: the run trains
    on data.train's mixture less its last `holdout` examples (budget's trials: forgetless.data.split_holdout)."""
    inputs = {
        "forgetless": __version__,
        "model": model_identity(config.model),
        **machine_identity(config.model),
        "data": {spec: source_digest(spec) for spec in training_data_specs(config)},
    }
    if holdout:  # only then: the inputs of every other run stay as they were
        inputs["holdout"] = holdout
    return inputs


def evaluation_inputs(config) -> dict[str, Any]:
    """What an evaluation of the config's suite is computed from, by content (besides the model evaluated)."""
    return {
        "forgetless": __version__,
        "model": model_identity(config.model),
        **machine_identity(config.model),
        "data": {spec: source_digest(spec) for spec in evaluation_data_specs(config.evaluation)},
    }


def changed_inputs(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable names of what differs between two `run_inputs`."""
    out = []
    for key in sorted(set(old) | set(new)):
        if key == "data":
            a, b = old.get("data", {}), new.get("data", {})
            out += [f"data file {spec}" for spec in sorted(set(a) | set(b)) if a.get(spec) != b.get(spec)]
        elif old.get(key) != new.get(key):
            out.append({"model": "the base model (name, revision or files)", "forgetless": "the forgetless version",
                        "dtype": "the resolved model.dtype", "device": "the device kind",
                        "holdout": "the examples held out of training (budget.validation_examples)"}.get(key, key))
    return out
