"""Sweep one regularizer's strength on the embedded default and record what each value costs and keeps.

    .venv/bin/python bench/sweep.py kl coef 0.01 0.1 1.0
    .venv/bin/python bench/sweep.py replay ratio 0.25 0.5 1.0
    .venv/bin/python bench/sweep.py train learning_rate 5e-4 1e-3 2e-3   # plain SFT, a train.* setting
    .venv/bin/python bench/sweep.py train max_steps 80 160 train.learning_rate=2e-3   # key=value: every run

Each value trains `forgetless train default` with that one regularizer (on the training split
minus the 64 examples the forgetting budget holds out) and is measured on the budget's
validation split (forgetless.budget.Validator: general-text perplexity change and drift on the
16 held-out general-text blocks (each domain's blocks after those the evaluation reports on, in
turn), target NLL of the 64 held-out examples). `train OPTION`: plain SFT with each value of
train.OPTION instead (the packaged default's own value is one of them or not: no extra reference).
Writes bench/sweep_<regularizer>_<option>.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from forgetless.budget import Validator
from forgetless.cli import resolve_config_path
from forgetless.config import load_config
from forgetless.data import split_holdout, training_records
from forgetless.model import default_device, load_model, load_tokenizer, resolve_model_path
from forgetless.train import load_trained, train

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench import machine  # noqa: E402


def main() -> None:
    reg, option, *rest = sys.argv[1:]
    fixed = [a for a in rest if "=" in a]  # key=value: applied to every run of the sweep
    values = [a for a in rest if "=" not in a]
    tag = "".join(f"_{a.split('=')[0].split('.')[-1]}{a.split('=')[1]}" for a in fixed)
    root = Path("runs/sweep") / f"{reg}_{option}{tag}"
    config = load_config(resolve_config_path("default"), [f"output_dir={root}", *fixed])
    holdout = config.budget.validation_examples  # each run trains on the rest (in memory), as budget's trials do
    val_records = [record for record, _ in split_holdout(training_records(config.data, config.train.seed), holdout)[1]]
    path = resolve_model_path(config.model.name_or_path, config.model.revision)
    tokenizer = load_tokenizer(path)
    base = load_model(config.model, path, device=default_device()).eval()
    validator = Validator(config, val_records, tokenizer, base)
    rows = []
    values = [float(v) for v in values] if reg == "train" else [0.0] + [float(v) for v in values]  # 0: plain SFT
    for value in values:
        if reg == "train":
            setting = [f"train.{option}={value:g}"]
        elif value == 0:  # plain SFT
            setting = []
        elif reg == "replay":  # a section of its own
            setting = [f"replay={{{option}: {value!r}}}"]
        else:
            setting = [f"regularizers=[{{{reg}: {{{option}: {value!r}}}}}]"]
        cfg = load_config(resolve_config_path("default"),
                          [f"output_dir={root / f'{value:g}'}", *fixed, *setting,
                           # measured by the validator alone: no forgetting curve, no Trainer eval on the test split
                           "evaluation.every_steps=0", "data.eval=null"])
        started = time.perf_counter()
        summary = train(cfg, overwrite=True, holdout=holdout).summary
        model, _ = load_trained(cfg.output_dir, dtype=base.dtype, device=base.device)
        row = {option: value, "train_seconds": round(time.perf_counter() - started, 1),
               "train_loss": summary["train_loss"], **validator.measure(model)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = {"machine": machine(), "regularizer": reg, "option": option, "fixed": fixed,
           "base": {"general_ppl": validator.base_ppl, "target_nll": validator.base_nll}, "rows": rows}
    (HERE / f"sweep_{reg}_{option}{tag}.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
