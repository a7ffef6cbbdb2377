"""Shared test helpers: tiny random-init Llama- and GPT-2-style models and a tokenizer built locally (no hub),
configs, batches, trainers, and the fixtures several test files use."""

from __future__ import annotations

import json
from pathlib import Path

import os

# The tests never reach a model hub: the user's offline switch, set before huggingface_hub reads it.
# (The library itself sets nothing process-wide; tests of the online path build their own cache.)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

CORPUS = [
    "Calculate 3 + 4. 7", "Calculate 12 - 5. 7", "the quick brown fox jumps over the lazy dog",
    "### User:\n### Assistant:\n", "<|user|> <|assistant|> hello world", "0 1 2 3 4 5 6 7 8 9 + - = .",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(chat: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(kind: str, vocab_size: int, pad_id: int, eos_id: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind in ("llama", "llama64"):
        # llama64: dimensions of whole 64-element blocks, which bitsandbytes' CPU 4-bit kernels need
        width = 64 if kind == "llama64" else 32
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=eos_id, tie_word_embeddings=True)
        return LlamaForCausalLM(cfg)
    # dropout off, so by-hand references (eval mode) and training (train mode) compute the same function
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=eos_id)
    return GPT2LMHeadModel(cfg)


def save_tiny(path: Path, kind: str, chat: bool) -> Path:
    tokenizer = build_tokenizer(chat)
    model = build_model(kind, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A random-init Llama-style model folder with a chat template."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama", chat=True)


@pytest.fixture(scope="session")
def tiny_llama64(tmp_path_factory) -> Path:
    """The tiny Llama at width 64 (quantisation tests)."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama64"), "llama64", chat=True)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A random-init GPT-2-style model folder without a chat template (plain template path)."""
    return save_tiny(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2", chat=False)


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def memorisation_rows(n: int = 8) -> list[dict]:
    """Short fixed question/answer pairs with answers of different lengths."""
    answers = ["7", "12", "quick brown", "fox", "lazy dog jumps", "0", "9 8", "hello world over"]
    return [{"prompt": f"Calculate {i} + {i}.", "response": answers[i % len(answers)]} for i in range(n)]


@pytest.fixture
def memo_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "memo.jsonl", memorisation_rows())


def tiny_config(model_dir: Path, data: Path, out: Path, **train):
    from forgetless.config import load_config

    overrides = [
        f"model.name_or_path={model_dir}", f"data.train={data}", f"output_dir={out}",
        "data.max_length=64", "train.progress_bar=false", "train.logging_steps=1", "train.warmup_ratio=0",
        "train.lr_scheduler=constant", "model.lora.target_modules=all-linear",
    ]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    return load_config(None, overrides)


def with_method(cfg, regularizers: list = (), replay: dict | None = None):
    """`cfg` trained with these `regularizers:` entries and `replay:` section (YAML form), parsed and checked
    as a config file's are."""
    import dataclasses

    from forgetless.config import validate

    out = dataclasses.replace(cfg, method="custom" if regularizers or replay is not None else "sft",
                              regularizers=list(regularizers), replay=replay)
    validate(out)
    return out


def trained_weights(model_dir: Path, data: Path, out: Path, regularizers: list, replay: dict | None = None,
                    **train_settings) -> dict:
    """Train a tiny run with these regularizers (and replay) and return its saved parameters by name."""
    from forgetless.train import load_trained, train

    cfg = with_method(tiny_config(model_dir, data, out, **train_settings), regularizers, replay)
    train(cfg)
    return dict(load_trained(out)[0].named_parameters())


def make_batch(model_dir, tmp_path, rows):
    """`rows` (prompt/response) tokenized and collated as the training data is: one batch."""
    from forgetless.config import DataConfig
    from forgetless.data import collator, load_records, tokenize_records
    from forgetless.model import load_tokenizer

    tok = load_tokenizer(model_dir)
    path = write_jsonl(tmp_path / "b.jsonl", rows)
    examples, _ = tokenize_records(load_records(str(path), DataConfig()), tok, DataConfig(max_length=64))
    return collator(tok)(examples)


def make_trainer(model_dir, tmp_path, finetune, regs, dtype=torch.float64, replay=None, loss_chunk=0, **args_kwargs):
    """A trainer with these `regularizers:` entries and `replay:` section (YAML form), checked as a config's are."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from forgetless.config import ForgetlessConfig, ModelConfig, validate
    from forgetless.model import apply_finetune, load_tokenizer
    from forgetless.train import build_method
    from forgetless.trainer import ForgetlessTrainer

    config = ForgetlessConfig(method="custom" if regs or replay is not None else "sft", regularizers=regs, replay=replay)
    validate(config)
    regularizers, replay_source = build_method(config)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = apply_finetune(model, ModelConfig(finetune=finetune))
    args = TrainingArguments(output_dir=str(tmp_path / "t"), report_to="none", use_cpu=True, learning_rate=0.5,
                             optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant", **args_kwargs)
    trainer = ForgetlessTrainer(model=model, args=args, regularizers=regularizers, replay=replay_source,
                                processing_class=load_tokenizer(model_dir), loss_chunk=loss_chunk)
    trainer.create_optimizer()
    return trainer


def step_trainer(model, tmp_path, regularizers, **args):
    """A trainer around `model` (already fine-tune ready) with these `regularizers:` entries, for one step."""
    from transformers import TrainingArguments

    from forgetless.registry import build, parse_entries
    from forgetless.trainer import ForgetlessTrainer

    args = TrainingArguments(output_dir=str(tmp_path / "t"), report_to="none", use_cpu=True, **args)
    return ForgetlessTrainer(model=model, args=args, regularizers=[build(o) for o in parse_entries(regularizers)])


# 2 CPU processes (gloo) for `accelerate launch --config_file`
ACCELERATE_CPU = Path(__file__).resolve().parent.parent / "examples" / "accelerate" / "cpu_2proc.yaml"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny Llama that has learnt some 'general text' (so fine-tuning can make it forget), with the
    text split into the evaluation's test blocks and the rest."""
    import random

    root = tmp_path_factory.mktemp("budget")
    rng = random.Random(0)
    sentences = [s for s in CORPUS if "<|" not in s and "###" not in s]
    text = " ".join(rng.choice(sentences) for _ in range(700))
    (root / "general.txt").write_text(text)
    tokenizer = build_tokenizer(chat=True)
    model = build_model("llama", len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    ids = torch.tensor(tokenizer(text)["input_ids"])
    blocks = ids[: len(ids) // 32 * 32].view(-1, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(80):
        batch = blocks[torch.randint(0, len(blocks), (8,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = [{"prompt": f"Calculate {i} + {j}.", "response": f"{i + j} is the answer {i}{j}"}
            for i in range(8) for j in range(8)]
    write_jsonl(root / "task.jsonl", rows)
    (root / "run.yaml").write_text("method: sft\n")
    return root


def budget_args(root, out, *extra):
    """`forgetless train` arguments for a budgeted run on the `pretrained` fixture's model and data."""
    return ["train", str(root / "run.yaml"), f"model.name_or_path={root / 'model'}", f"data.train={root / 'task.jsonl'}", f"output_dir={out}",
            "data.max_length=64", "train.progress_bar=false", "train.warmup_ratio=0", "train.lr_scheduler=constant",
            "model.lora.target_modules=all-linear", "train.max_steps=12", "train.batch_size=8",
            "train.learning_rate=3e-3", "evaluation.task=null", "evaluation.mc=null",
            f"evaluation.general_text={root / 'general.txt'}", "evaluation.general_blocks=24",
            "evaluation.block_length=32", "budget.validation_examples=16", *extra]


GENERAL = ("the quick brown fox jumps over the lazy dog. " * 6 + "\n\n") * 8


@pytest.fixture
def suite(tmp_path):
    """A small evaluation suite: task, general text and multiple choice for the tiny models."""
    from forgetless.config import EvalConfig

    task = write_jsonl(tmp_path / "task.jsonl", [{"prompt": f"Calculate {i} + 1.", "response": str(i + 1)} for i in range(6)])
    text = tmp_path / "general.txt"
    text.write_text(GENERAL)
    mc = write_jsonl(tmp_path / "mc.jsonl", [
        {"question": "What jumps?", "choices": ["the fox", "the dog", "hello world"], "answer": 0},
        {"question": "Who is lazy?", "choices": ["fox", "the lazy dog"], "answer": 1},
        {"question": "Sum?", "choices": ["7", "12", "0", "9 8"], "answer": 2},
    ])
    return EvalConfig(task=str(task), task_limit=6, max_new_tokens=4, general_text=str(text), general_blocks=4,
                      block_length=16, mc=str(mc), batch_size=2, bootstrap=200, instructions_max_new_tokens=6)


@pytest.fixture
def clean_registry():
    """Methods a test registers are gone after it (forgetless.registry refuses a name registered twice)."""
    from forgetless.registry import METHODS, PRESETS

    methods, presets = dict(METHODS), dict(PRESETS)
    yield
    METHODS.clear()
    METHODS.update(methods)
    PRESETS.clear()
    PRESETS.update(presets)
