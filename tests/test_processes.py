"""Several processes at once: they stay in step (the same weights, the same decisions) and one of them
writes each shared file. 2-process runs use `accelerate launch` over gloo, as tests/test_distributed.py."""

import json
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ACCELERATE_CPU, memorisation_rows, write_jsonl


def launch() -> list[str]:
    """`accelerate launch` on a free port: other 2-process runs on the machine hold the default one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CPU),
            "--main_process_port", str(port)]


def why(res) -> str:
    """A failed launch's own errors first (a process's is often far from the end of the output)."""
    errors = [line for line in res.stderr.splitlines() if "forgetless: error" in line or "Error:" in line]
    return "\n".join(errors[:20]) + "\n...\n" + res.stderr[-2000:]


NAN_ON_ONE_PROCESS = '''
import sys
from dataclasses import dataclass

import torch

from forgetless.cli import main
from forgetless.registry import register
from forgetless.regularizers import Regularizer


@dataclass
class NanAtConfig:
    call: int = 2  # grad_accum 2: the 2nd micro-batch is step 0's last, the syncing one
    rank: int = 0
    save_to: str = ""


class NanAt(Regularizer):
    """NaN on one process at one micro-batch; with save_to, saves each process's trained weights at the end."""
    name = "nan_at"

    def __init__(self, cfg):
        self.cfg, self.calls = cfg, 0

    def setup(self, run):
        self.rank = run.accelerator.process_index

    def loss(self, ctx):
        self.calls += 1
        bad = self.rank == self.cfg.rank and self.calls == self.cfg.call
        return ctx.sft_loss * (float("nan") if bad else 0.0), {}

    def finalize(self, model):
        if not self.cfg.save_to:
            return {}
        weights = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(weights, f"{self.cfg.save_to}/rank{self.rank}.pt")
        return {}


register("nan_at", NanAtConfig, NanAt)
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.slow
def test_a_nonfinite_micro_batch_on_one_process_is_skipped_by_all(tiny_llama, tmp_path):
    """DDP, 2 processes: one process's NaN micro-batch is skipped by both (else their all-reduces go out
    of step: a hang, or gradients of different micro-batches averaged)."""
    import json
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(NAN_ON_ONE_PROCESS)
    data = write_jsonl(tmp_path / "d.jsonl", memorisation_rows(8))
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CPU),
                          str(script), "train", "default", f"model.name_or_path={tiny_llama}", f"data.train={data}",
                          f"output_dir={tmp_path / 'o'}", "data.max_length=64", "train.max_steps=4",
                          "train.batch_size=2", "train.grad_accum=1", "train.logging_steps=1", "train.progress_bar=false",
                          "regularizers=[{nan_at: {rank: 1, call: 2}}]"], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    assert sum(r.get("nonfinite_skipped", 0) > 0 for r in rows) == 1
    assert (tmp_path / "o" / "train_summary.json").exists()




@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "lfu"])
def test_a_skipped_syncing_micro_batch_leaves_every_process_with_the_same_weights(tiny_llama, tmp_path, method):
    """grad_accum 2, NaN at step 0's last micro-batch on one process: both skip it, and the gradient the
    first micro-batch accumulated without sync must not be stepped with as it stands (it differs per process)."""
    script = tmp_path / "run.py"
    script.write_text(NAN_ON_ONE_PROCESS)
    data = write_jsonl(tmp_path / "d.jsonl", memorisation_rows(8))
    regularizers = ("{lfu: {}}, " if method == "lfu" else "") + f"{{nan_at: {{save_to: {tmp_path}}}}}"
    res = subprocess.run([*launch(), str(script), "train", "default", f"model.name_or_path={tiny_llama}",
                          f"data.train={data}", f"output_dir={tmp_path / 'o'}", "data.max_length=64",
                          "train.max_steps=3", "train.batch_size=2", "train.grad_accum=2", "train.optim=sgd",
                          "train.learning_rate=0.05", "train.max_grad_norm=0", "train.lr_scheduler=constant",
                          "train.warmup_ratio=0", "train.logging_steps=1", "train.progress_bar=false",
                          "model.lora.target_modules=all-linear",
                          f"regularizers=[{regularizers}]"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, why(res)
    rows = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    assert sum(r.get("nonfinite_skipped", 0) > 0 for r in rows) == 1
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    diff = max((a[n] - b[n]).abs().max().item() for n in a)
    assert diff == 0, f"the processes' weights drifted apart (max abs diff {diff:.3g})"
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in a.items())  # the other steps did train


HALF_PRECISION_CHECK = '''
import torch
from accelerate import Accelerator

from forgetless.errors import TrainingError
from forgetless.regularizers.lfu import LfU, LfUConfig

accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
lfu = LfU(LfUConfig())
lfu.accelerator = accelerator
weights = torch.ones(64, dtype=torch.bfloat16)
lfu.params = [weights]
# rank 0: an offset bfloat16 rounds away at 1.0 (the check fails); rank 1: one it holds exactly (passes)
phi = torch.full((64,), 1e-4 if rank == 0 else 0.5, dtype=torch.bfloat16)
originals = [weights.clone()]
weights.add_(phi)
try:
    lfu._check_applied(originals, [phi], torch.linalg.vector_norm(phi.float()))
    print(f"rank {rank}: went on", flush=True)
except TrainingError:
    print(f"rank {rank}: TrainingError", flush=True)
accelerator.end_training()  # destroys the process group (else a gloo abort at exit)
'''


@pytest.mark.slow
def test_lfu_half_precision_check_fails_on_every_process_together(tmp_path):
    """One process's perturbation rounds away, the other's does not: both must raise (the one that went
    on would wait for the other in the next all-reduce)."""
    script = tmp_path / "check.py"
    script.write_text(HALF_PRECISION_CHECK)
    res = subprocess.run([*launch(), str(script)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, why(res)
    assert "rank 0: TrainingError" in res.stdout and "rank 1: TrainingError" in res.stdout, res.stdout


LOGGED_WRITES = '''
import os
import pathlib
import shutil
import sys

import forgetless.config as config
from forgetless import run_folder
from forgetless.cli import main

rank, out = os.environ.get("RANK", "0"), pathlib.Path(os.environ["BUDGET_OUT"]).resolve()


def log(what):
    with open(os.environ["WRITES_LOG"], "a") as f:
        f.write(f"{rank} {what}\\n")


write_text, copy2 = pathlib.Path.write_text, shutil.copy2
dump_config, write_summary = config.dump_config, run_folder.write_summary


def write_text_logged(self, *args, **kwargs):
    if self.name == "budget.json" or self.name.startswith(".budget.json."):  # whole, or a tmp renamed into place
        log("budget.json")
    return write_text(self, *args, **kwargs)


def copy2_logged(src, dst, *args, **kwargs):
    if pathlib.Path(dst).resolve().parent in (out, out / ".saving"):  # written aside, then renamed into place
        log(f"copy {pathlib.Path(dst).name}")
    return copy2(src, dst, *args, **kwargs)


# the chosen run's folder has one writer, run_folder.write_run (train's too): its writes there are logged,
# not those into the trials' folders under budget/
def dump_config_logged(cfg, path):
    if pathlib.Path(path).resolve().parent == out:
        log("config.yaml")
    return dump_config(cfg, path)


def write_summary_logged(folder, summary):
    if pathlib.Path(folder).resolve() == out:
        log("summary")
    return write_summary(folder, summary)


config.dump_config = run_folder.dump_config = dump_config_logged  # run_folder binds its own name
run_folder.write_summary = write_summary_logged
pathlib.Path.write_text, shutil.copy2 = write_text_logged, copy2_logged
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.slow
@pytest.mark.parametrize("knob, grid, copied", [("l2sp", [1000.0], "adapter_model.safetensors"),
                                                ("wise_ft", [1.0, 0.5], "metrics.jsonl")])
def test_budget_under_two_processes_writes_each_file_once(pretrained, tmp_path, knob, grid, copied):
    """`forgetless train` with a budget under `accelerate launch`: the trials train on both processes,
    the main process alone writes the chosen run's files, budget.json, config.yaml and the summary (the
    others used to delete and rewrite the same files at the same time); the split stays in memory."""
    import os

    from forgetless.train import load_trained

    from conftest import budget_args

    script = tmp_path / "run.py"
    script.write_text(LOGGED_WRITES)
    out, log = tmp_path / "b", tmp_path / "writes.log"
    env = {**os.environ, "WRITES_LOG": str(log), "BUDGET_OUT": str(out)}
    args = budget_args(pretrained, out, "budget.max_general_drop=0.05", f"budget.knob={knob}", f"budget.grid={grid}",
                       "budget.refine=0", "train.max_steps=4", "train.batch_size=4")
    res = subprocess.run([*launch(), str(script), *args], capture_output=True, text=True, timeout=400, env=env)
    assert res.returncode == 0, why(res)
    writes = log.read_text().splitlines()
    assert all(line.startswith("0 ") for line in writes), writes
    for what in ("budget.json", "config.yaml", "summary", f"copy {copied}"):
        assert writes.count(f"0 {what}") == 1, (what, writes)
    report = json.loads((out / "budget.json").read_text())
    assert len(report["trials"]) >= 1 and report["chosen"]["passes"]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["budget"]["chosen"] == report["chosen"]
    trial = next(p for p in (out / "budget").iterdir() if (p / "train_summary.json").is_file())
    assert json.loads((trial / "train_summary.json").read_text())["train_examples"] == 64 - 16
    assert not list((out / "budget").glob("*.jsonl"))  # no split written out
    load_trained(out)  # the output folder is a whole run


CONVERT_ONCE = '''
import os
import sys
import tempfile
import time
from pathlib import Path

import forgetless.model as model
from forgetless.config import DEFAULT_MODEL

me, other = sys.argv[1], sys.argv[2]


def slow_convert(target):
    """The real conversion's shape (a temporary folder renamed into place), slowly, and counted."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / "conversions.log", "a") as f:
        f.write(me + "\\n")
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    (tmp / "config.json").write_text("{}")
    time.sleep(1.5)
    os.replace(tmp, target)


model._convert_smollm2 = slow_convert
root = Path(os.environ["FORGETLESS_CACHE"])
(root / f"ready-{me}").touch()
while not (root / f"ready-{other}").exists():  # both ask at the same moment
    time.sleep(0.01)
print(model.resolve_model_path(DEFAULT_MODEL))
'''


@pytest.mark.slow
def test_two_processes_convert_the_default_model_once(tmp_path):
    """Two processes resolving the embedded default at once (its one-time conversion is faked, slowly):
    both get the folder, and it was converted once (the second used to fail renaming onto the first's)."""
    import os

    env = {**os.environ, "FORGETLESS_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", CONVERT_ONCE, me, other], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for me, other in [("a", "b"), ("b", "a")]]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
        assert out.strip().endswith("smollm2-135m-instruct"), out
    assert len((tmp_path / "models" / "conversions.log").read_text().split()) == 1
    assert (tmp_path / "models" / "smollm2-135m-instruct" / "config.json").is_file()
