"""LfU's perturbation on weights sharded by FSDP2 (issue #30, its CPU part): forgetless's LfU code driven on
DTensor LoRA weights of torch's `fully_shard` on 2 gloo processes (each with its own batch) gives the unsharded
step over both batches: the same perturbation norm, consistency term and gradient, and the weights restored
exactly; in bfloat16, the same check of the offset the rounded weights really took (and the gradient to bf16
tolerance)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).resolve().parent / "fsdp2_lfu_worker.py"


@pytest.mark.slow
def test_lfu_on_fsdp2_sharded_lora_weights_matches_the_unsharded_step(tmp_path):
    out = tmp_path / "lfu.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(WORKER), str(out)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(out.read_text())
    for alpha_scale, pair in results.items():
        plain, sharded = pair["plain"], pair["sharded"]
        half = alpha_scale == "bfloat16"
        rel = 1e-2 if half else 1e-5  # bf16: the shards' partial sums add in another order
        assert all(sharded["sharded"]) and not any(plain["sharded"]), alpha_scale  # DTensors really
        assert plain["restored"] and sharded["restored"], alpha_scale
        # rank 0's batch is the reference's first; its term is weighted 1 there (FSDP averages), 1/2 here
        mine, ref = sharded["metrics"][0], plain["metrics"][0]
        keys = ["lfu_perturb_norm", "l_cons", "lfu_rel_shift"] + (["lfu_applied_norm", "lfu_applied_cosine"] if half else [])
        for key in keys:
            assert mine[key] == pytest.approx(ref[key], rel=rel), (alpha_scale, key)
        assert ref["l_cons"] > 0 and plain["metrics"][1]["l_cons"] != pytest.approx(ref["l_cons"])  # two batches
        assert sharded["terms"][0] == pytest.approx(2 * plain["terms"][0], rel=rel)
        tolerance = dict(rtol=2e-2, atol=1e-3) if half else dict(rtol=1e-5, atol=1e-7)
        for name in ("sft_grads", "grads"):
            for a, b in zip(sharded[name], plain[name]):
                torch.testing.assert_close(torch.tensor(a), torch.tensor(b), **tolerance)
        # the consistency term moved the gradient: the comparison is not of two clean gradients
        moved = max((torch.tensor(g) - torch.tensor(s)).abs().max().item()
                    for g, s in zip(plain["grads"], plain["sft_grads"]))
        assert moved > 1e-6, alpha_scale
    weights = results["weights"]["plain"]["metrics"][0]["lfu_perturb_norm"]
    assert weights != pytest.approx(0.1), "alpha_scale weights: phi's norm is a fraction of the weights' norm"
