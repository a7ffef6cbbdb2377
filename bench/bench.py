"""Step time and peak memory of each method as ratios to plain SFT, measured in one run.

    .venv/bin/python bench/bench.py                       # SmolLM2-135M default, CPU or GPU
    .venv/bin/python bench/bench.py --steps 20 --batch 8 --seq-len 128 --methods sft lfu_lora lfu_reps
    python bench/bench.py --model-config bench/models/llama-1b.json --bf16 --seq-len 512   # GPU: random-init 1.2B

Timing: every method gets its own ForgetlessTrainer on one shared model and the same fixed batch
(shape [batch, seq_len], the first half of each row is prompt, masked); after warm-up the methods
run interleaved (A B C A B C ...), and a step is training_step + optimizer.step + zero_grad.
The median over --steps is reported; for LfU with `every: k` (a pass on every k-th step only) the
mean over the steps, which cover whole periods when --steps is a multiple of k.
Memory: on a GPU, torch.cuda.max_memory_allocated over each method's steps (reset in between).
On a CPU nothing per-tensor is available, so each method also runs alone in a fresh subprocess,
with MALLOC_MMAP_THRESHOLD_=65536 (so freed tensors leave the RSS at once instead of staying in
glibc's heap), where a thread samples the resident set size every millisecond during its steps: `peak_rss` is the
highest RSS seen during the steps (model, libraries and all), `peak_mem_delta` that peak minus
the RSS just before the first step (activations, gradients, optimizer state: what the method adds).
On a CPU the timing runs use the allocator settings `forgetless train` applies
(`forgetless.memory.keep_freed_cpu_memory`); `--system-malloc` times with glibc's defaults.
Two rows are floors, not methods, timed the same way: `decoder_pass` (one forward + backward through
the decoder layers alone: 1 + its ratio is the least an exact LfU step can cost) and `sft_plus_rows`
(plain SFT with the replay blocks' worth of fully-trained rows added: the replay tokens' own cost).
`--model-config` times a randomly initialised model of that shape (no weights needed; a synthetic
word-level tokenizer covers its vocabulary): step-time ratios do not depend on the weights' values.
Writes bench/results.json (bench/results_gpu.json on a GPU, with the device and library versions),
replacing it: all ratios come from one run, and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import platform
import gc
import os
import statistics
import subprocess
import sys
import dataclasses
import time
from pathlib import Path

import torch

from forgetless.config import ForgetlessConfig, ModelConfig
from forgetless.flops import model_shape, peak_tflops, step_flops
from forgetless.memory import keep_freed_cpu_memory, peak_memory
from forgetless.model import DTYPES, apply_finetune, load_model, load_tokenizer, resolve_model_path
from forgetless.regularizers.lfu import find_decoder_layers
from forgetless.registry import PRESETS
from forgetless.train import build_method
from forgetless.trainer import ForgetlessTrainer

HERE = Path(__file__).resolve().parent

METHODS = {
    "sft": {},
    "lfu_lora": {"regularizers": [{"lfu": {"variant": "lora"}}]},
    "lfu_reps": {"regularizers": [{"lfu": {"variant": "reps"}}]},
    # consistency on the first third of the layers only: the perturbed pass stops there
    "lfu_lora_early": {"regularizers": [{"lfu": {"variant": "lora", "layers": "early"}}]},
    # the cheap approximations (issue #18): the perturbed pass on a fraction of the rows, or every k-th step
    "lfu_rows50": {"regularizers": [{"lfu": {"variant": "lora", "rows": 0.5}}]},
    "lfu_rows25": {"regularizers": [{"lfu": {"variant": "lora", "rows": 0.25}}]},
    "lfu_every2": {"regularizers": [{"lfu": {"variant": "lora", "every": 2}}]},
    "lfu_every4": {"regularizers": [{"lfu": {"variant": "lora", "every": 4}}]},
    "lfu_r50_e2": {"regularizers": [{"lfu": {"variant": "lora", "rows": 0.5, "every": 2}}]},
    "lfu_r25_e2": {"regularizers": [{"lfu": {"variant": "lora", "rows": 0.25, "every": 2}}]},
    "lfu_r50_e4": {"regularizers": [{"lfu": {"variant": "lora", "rows": 0.5, "every": 4}}]},
    "kl": {"regularizers": [{"kl": {}}]},
    "lfu_kl": {"regularizers": [{"kl": {}}, {"lfu": {"variant": "lora"}}]},  # LfU with a clean-pass term: its graph freed first
    "kl_cached": {"regularizers": [{"kl": {"cache": "topk", "topk": 64}}]},
    "replay": {"replay": {"ratio": 0.25}},  # blocks join the SFT forward (forward: auto)
    "replay_own": {"replay": {"ratio": 0.25, "forward": "own"}},  # their own pass: lowest peak memory
    "kl_replay": {"regularizers": [{"kl": {}}], "replay": {"ratio": 0.25}},
    # issue #28's presets, as registered: distillation replay (KL on the replay rows, no NLL) alone and with the
    # KL anchor on the SFT rows; DFT (probability-weighted NLL) and ASFT (DFT + KL on the SFT rows)
    "replay_kl": copy.deepcopy(PRESETS["replay-kl"]),
    "kl_replay_kl": copy.deepcopy(PRESETS["kl+replay-kl"]),
    "dft": copy.deepcopy(PRESETS["dft"]),
    "asft": copy.deepcopy(PRESETS["asft"]),
    # the baselines (issue #8). WiSE-FT changes nothing during training (no step cost); NEFTune's
    # hook is attached by Trainer.train(), which this bench bypasses (its cost: one uniform_ per step)
    "l2sp": {"regularizers": [{"l2sp": {}}]},
    "ewc": {"regularizers": [{"ewc": {}}]},
    # plain SFT with train.loss_chunk: the NLL from the LM head LOSS_CHUNK rows at a time, never the whole logits
    "sft_chunked": {},
    "trl_sft": None,  # plain SFT in TRL's SFTTrainer: the peer anchor (needs `pip install trl`)
    "decoder_pass": None,  # not a method: the floor of LfU's extra pass (see DecoderPass)
    "sft_plus_rows": None,  # not a method: the floor of replay at 0.25 (see SFTPlusTrainedRows)
}
REPLAY_RATIO = {"replay": 0.25, "replay_own": 0.25, "kl_replay": 0.25, "replay_kl": 0.25, "kl_replay_kl": 0.25}
LOSS_CHUNK = {"sft_chunked": 256}
# timed on request (--methods ...), e.g. the LfU cost/retention frontier of bench/lfu_frontier.md
CHEAP_LFU = ["lfu_lora_early", "lfu_rows50", "lfu_rows25", "lfu_every2", "lfu_every4", "lfu_r50_e2", "lfu_r25_e2",
             "lfu_r50_e4"]


def period(method: str) -> int:
    """k for LfU `every: k` (its steps alternate between costs: timed by the mean), else 1."""
    entries = (METHODS.get(method) or {}).get("regularizers", [])
    return max([opts.get("every", 1) for entry in entries for name, opts in entry.items() if name == "lfu"] or [1])


def step_time(method: str, times: list[float]) -> float:
    if period(method) > 1:
        k = period(method)
        return statistics.fmean(times[: len(times) // k * k] or times)
    return statistics.median(times)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def versions() -> dict[str, str]:
    import importlib.metadata

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for name in ("transformers", "peft", "accelerate", "trl", "bitsandbytes"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def synthetic_tokenizer(vocab_size: int, bos_id: int = 0, eos_id: int = 1):
    """A word-level tokenizer whose vocabulary is exactly the model's (token i is "t<i>"), for timing a
    randomly initialised model: every id a batch draws is valid, and no tokenizer files are needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=f"t{bos_id}", eos_token=f"t{eos_id}",
                                   pad_token=f"t{eos_id}", unk_token="t2")


def fixed_batch(vocab: int, batch: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, vocab, (batch, seq_len), generator=g)
    labels = ids.clone()
    labels[:, : seq_len // 2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "example_id": torch.arange(batch)}


def bench_dataset(batch: dict[str, torch.Tensor]):
    """The fixed batch's rows as a dataset (example ids 0..B-1), for per-example caches."""
    import datasets

    return datasets.Dataset.from_dict({"input_ids": batch["input_ids"].tolist(), "labels": batch["labels"].tolist(),
                                       "example_id": list(range(batch["input_ids"].shape[0]))})


class DecoderPass:
    """Not a method: one forward + backward through the decoder stack alone (no LM head, a mean-square
    loss on the last hidden state), timed like a step. Any exact LfU perturbed pass redoes every
    selected layer under the perturbation and backpropagates through them, so 1 + this ratio is
    the least an LfU step can cost relative to plain SFT (with `layers: all`)."""

    def __init__(self, trainer: ForgetlessTrainer) -> None:
        self.model, self.optimizer = trainer.model, trainer.optimizer

    def training_step(self, model, batch) -> torch.Tensor:
        decoder = getattr(model, "get_base_model", lambda: model)().get_decoder()
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)[0]
        loss = hidden.float().pow(2).mean()
        loss.backward()
        return loss.detach()


class SFTPlusTrainedRows:
    """Not a method: plain SFT on the batch plus ratio x batch more rows trained on every token, which
    is what replay blocks are: the replay tokens' own cost with nothing else, the floor of a replay step."""

    def __init__(self, trainer: ForgetlessTrainer, batch: dict[str, torch.Tensor], ratio: float = 0.25) -> None:
        self.trainer, self.model, self.optimizer = trainer, trainer.model, trainer.optimizer
        batch_size, seq_len = batch["input_ids"].shape
        extra = fixed_batch(len(trainer.processing_class), round(ratio * batch_size), seq_len, seed=1)
        extra["labels"] = extra["input_ids"].clone()
        self.batch = {k: torch.cat([batch[k], extra[k].to(batch[k].device)]) for k in ("input_ids", "attention_mask", "labels")}

    def training_step(self, model, batch) -> torch.Tensor:
        return self.trainer.training_step(model, dict(self.batch))


def build(args, model, method: str, tokenizer, batch, shared: bool = True):
    import tempfile

    from transformers import TrainingArguments

    common = dict(output_dir=tempfile.mkdtemp(prefix="forgetless-bench-"), report_to="none", learning_rate=1e-5,
                  use_cpu=not torch.cuda.is_available(), bf16=args.bf16, disable_tqdm=True)
    if method == "sft_plus_rows":
        return SFTPlusTrainedRows(build(args, model, "sft", tokenizer, batch, shared), batch)
    if method == "decoder_pass":
        return DecoderPass(build(args, model, "sft", tokenizer, batch, shared))
    if method == "trl_sft":
        from trl import SFTConfig, SFTTrainer

        # TRL patches the model it is given (fused LM head): a copy when the model is shared with our methods
        trainer = SFTTrainer(model=copy.deepcopy(model) if shared else model, args=SFTConfig(**common, max_length=None),
                             train_dataset=bench_dataset(batch).remove_columns(["example_id", "labels"]),
                             processing_class=tokenizer)
    else:
        config = ForgetlessConfig(method="sft" if method in LOSS_CHUNK else method, **METHODS[method])  # YAML form
        if config.replay is not None:  # replay blocks as long as the benchmark's rows: a replay row costs an SFT row's
            config.replay = dataclasses.replace(config.replay, max_length=args.seq_len)
        regularizers, replay = build_method(config)
        trainer = ForgetlessTrainer(model=model, args=TrainingArguments(**common, per_device_train_batch_size=args.batch),
                                    regularizers=regularizers, replay=replay, loss_chunk=LOSS_CHUNK.get(method, 0),
                                    train_dataset=bench_dataset(batch),
                                    processing_class=tokenizer)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # normally set by Trainer's loop, which we bypass
    return trainer


def one_step(trainer: ForgetlessTrainer, batch) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    step_batch = dict(batch)
    if not isinstance(trainer, ForgetlessTrainer):
        step_batch.pop("example_id")
    trainer.training_step(trainer.model, step_batch)
    trainer.optimizer.step()
    trainer.model.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def load(args):
    model, tokenizer = _load(args)
    if args.compile:  # each decoder layer compiled in place: the modules (and the hooks methods attach) stay
        for layer in find_decoder_layers(model):
            layer.compile()
    return model, tokenizer


def _load(args):
    cfg = ModelConfig(name_or_path=args.model, finetune=args.finetune, dtype="bfloat16" if args.bf16 else "float32",
                      attn_implementation=args.attn or "auto")
    cfg.lora.r, cfg.lora.alpha = 16, 32
    if args.model_config:
        from transformers import AutoConfig, AutoModelForCausalLM

        spec = {k: v for k, v in json.loads(Path(args.model_config).read_text()).items()
                if not k.startswith("_") and k != "architectures"}
        config = AutoConfig.for_model(**spec)
        torch.manual_seed(0)
        with torch.device(device()):
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[cfg.dtype],
                                                     **({"attn_implementation": args.attn} if args.attn else {}))
        tokenizer = synthetic_tokenizer(config.vocab_size, config.bos_token_id, config.eos_token_id)
        return apply_finetune(model, cfg), tokenizer
    path = resolve_model_path(args.model)
    model = apply_finetune(load_model(cfg, path), cfg).to(device())
    return model, load_tokenizer(path)


def memory_probe(args, method: str) -> dict:
    """Run one method alone (this process was started for it) and report its memory peaks."""
    model, tokenizer = load(args)
    batch = {k: v.to(device()) for k, v in fixed_batch(len(tokenizer), args.batch, args.seq_len).items()}
    trainer = build(args, model, method, tokenizer, batch, shared=False)
    with torch.no_grad():  # page in the (memory-mapped) weights so they count as "before"
        for param in model.parameters():
            param.sum()
    gc.collect()
    mem: dict = {}
    with peak_memory(mem):
        for _ in range(args.memory_steps):
            one_step(trainer, batch)
    return {"peak_rss": mem["peak_bytes"], "peak_mem_delta": mem["delta_bytes"]}


def scaling(args) -> None:
    """Training throughput of plain SFT as sequence length and batch grow (median of --steps)."""
    model, tokenizer = load(args)
    rows = []
    for seq_len in (128, 512, 1024):
        for batch_size in (1, 4, 8):
            batch = {k: v.to(device()) for k, v in fixed_batch(len(tokenizer), batch_size, seq_len).items()}
            args.batch = batch_size
            trainer = build(args, model, "sft", tokenizer, batch)
            for _ in range(args.warmup):
                one_step(trainer, batch)
            median = statistics.median(one_step(trainer, batch) for _ in range(args.steps))
            rows.append({"seq_len": seq_len, "batch": batch_size, "step_time_s": round(median, 3),
                         "tokens_per_s": round(batch_size * seq_len / median, 1)})
            print(rows[-1], flush=True)
    out = HERE / "scaling.json"
    out.write_text(json.dumps({"machine": machine(), "model": args.model, "finetune": args.finetune,
                               "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--model-config", help="a config.json: time a randomly initialised model of that shape instead")
    p.add_argument("--finetune", default="lora", choices=["lora", "full"])
    p.add_argument("--methods", nargs="+", default=[m for m in METHODS if m not in CHEAP_LFU],
                   choices=list(METHODS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--attn", choices=["sdpa", "eager", "flash_attention_2"],
                   help="the attention implementation (default: transformers' choice for the model)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each decoder layer (for sft-only timings: hooks that change per step recompile)")
    p.add_argument("--system-malloc", action="store_true",
                   help="time with glibc's default allocator settings instead of forgetless's CPU ones")
    p.add_argument("--out", help="default: bench/results.json, bench/results_gpu.json on a GPU")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)
    p.add_argument("--scaling", action="store_true",
                   help="instead: plain-SFT tokens/s at seq 128/512/1024 x batch 1/4/8 -> bench/scaling.json")
    args = p.parse_args()

    if args.memory_probe:
        print(json.dumps(memory_probe(args, args.memory_probe)))
        return
    if not torch.cuda.is_available() and not args.system_malloc:
        keep_freed_cpu_memory()  # what `forgetless train` does on a CPU (the memory probes opt out)
    if args.scaling:
        scaling(args)
        return
    if "sft" not in args.methods:
        args.methods.insert(0, "sft")
    if "trl_sft" in args.methods and importlib.util.find_spec("trl") is None:
        print("trl is not installed: no trl_sft row (pip install trl)", flush=True)
        args.methods.remove("trl_sft")
    args.out = args.out or str(HERE / ("results_gpu.json" if torch.cuda.is_available() else "results.json"))

    model, tokenizer = load(args)
    batch = {k: v.to(device()) for k, v in fixed_batch(len(tokenizer), args.batch, args.seq_len).items()}
    trainers = {m: build(args, model, m, tokenizer, batch) for m in args.methods}
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    gpu_peak: dict[str, int] = {m: 0 for m in args.methods}
    for m in args.methods:
        for _ in range(args.warmup):
            one_step(trainers[m], batch)
    for i in range(args.steps):
        for m in args.methods:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            times[m].append(one_step(trainers[m], batch))
            if torch.cuda.is_available():
                gpu_peak[m] = max(gpu_peak[m], torch.cuda.max_memory_allocated())
        print(f"round {i + 1}/{args.steps}: " + "  ".join(f"{m} {times[m][-1]:.2f}s" for m in args.methods), flush=True)

    memory = {}
    if not torch.cuda.is_available():
        for m in args.methods:
            cmd = [sys.executable, __file__, "--memory-probe", m, "--model", args.model, "--finetune", args.finetune,
                   "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--memory-steps", str(args.memory_steps)]
            cmd += (["--model-config", args.model_config] if args.model_config else []) + (["--bf16"] if args.bf16 else [])
            cmd += (["--attn", args.attn] if args.attn else []) + (["--compile"] if args.compile else [])
            # glibc keeps freed heap pages, so RSS would add up phases that never coexist; serving
            # every allocation >= 64 KiB by mmap returns freed tensors at once, so RSS tracks live memory.
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]
            memory[m] = json.loads(out)
            print(f"memory {m}: peak RSS {memory[m]['peak_rss'] / 2**20:.0f} MiB, "
                  f"above pre-step RSS {memory[m]['peak_mem_delta'] / 2**20:.0f} MiB", flush=True)

    base_time = step_time("sft", times["sft"])
    results = {}  # every ratio in the file comes from this one run
    label = f"random init of {Path(args.model_config).name}" if args.model_config else args.model
    # Model FLOPs (flops.py) of plain SFT's work: our step's logits at the response positions (the first half of
    # each row is prompt); TRL's SFTTrainer, given no completion mask here, trains on (and computes the head at)
    # every position. A method's extra passes are not counted: its MFU is SFT's work per second of its step.
    shape = model_shape(model)
    response = int((batch["labels"][:, 1:] != -100).sum())
    flops_of = {m: step_flops(shape, args.batch, args.seq_len, args.batch * args.seq_len if m == "trl_sft" else response)
                for m in args.methods}
    # the table's peaks are bf16 ones: no MFU for a float32 run
    peak = peak_tflops(torch.cuda.get_device_name(0)) if torch.cuda.is_available() and args.bf16 else None
    setting = {"model": label, "finetune": args.finetune, "batch": args.batch, "seq_len": args.seq_len,
               "steps": args.steps, "dtype": "bfloat16" if args.bf16 else "float32", "machine": machine(),
               "attn": getattr(model.config, "_attn_implementation", None), "compiled": args.compile,
               "peak_tflops": peak,
               "versions": versions(), "date": time.strftime("%Y-%m-%d")}
    print(f"\n{'method':10s} {'step s':>8s} {'time x':>7s} {'mem x':>7s} {'TFLOP/s':>8s} {'MFU':>6s}  "
          f"({setting['machine']}, attention {setting['attn']}{', compiled' if args.compile else ''})")
    for m in args.methods:
        median = step_time(m, times[m])
        achieved = flops_of[m] / median / 1e12
        row = {"step_time_s": round(median, 4), "step_time_ratio": round(median / base_time, 3), **setting,
               "model_flops_per_step": flops_of[m], "achieved_tflops": round(achieved, 3), "mfu": round(achieved / peak, 4) if peak else None}
        if m in REPLAY_RATIO:
            row["ratio"] = REPLAY_RATIO[m]
        if torch.cuda.is_available():
            row["peak_mem_bytes"] = gpu_peak[m]
            row["peak_mem_ratio"] = round(gpu_peak[m] / gpu_peak["sft"], 3)
        else:
            row["peak_rss_bytes"] = memory[m]["peak_rss"]
            row["peak_mem_ratio"] = round(memory[m]["peak_rss"] / memory["sft"]["peak_rss"], 3)
            row["peak_mem_delta_bytes"] = memory[m]["peak_mem_delta"]
            row["peak_mem_delta_ratio"] = round(memory[m]["peak_mem_delta"] / max(memory["sft"]["peak_mem_delta"], 1), 3)
        results[m] = row
        mfu = f"{row['mfu']:6.1%}" if peak else "     -"
        print(f"{m:10s} {median:8.3f} {row['step_time_ratio']:7.2f} {row['peak_mem_ratio']:7.2f} {achieved:8.3g} {mfu}")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
