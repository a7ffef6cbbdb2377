"""Run by tests/test_fsdp2.py under `torchrun --nproc-per-node 2` (gloo, CPU): one LfU step of forgetless's own
LfU code on LoRA weights sharded with torch's FSDP2 `fully_shard` (DTensor parameters and gradients, rank 3 so
some shards are uneven), next to the same step on an unsharded copy of the model in the same process. Each rank
has its own batch; FSDP2 averages the two ranks' gradients, so the unsharded reference takes phi from the mean
of both batches' clean gradients and adds both batches' consistency terms at half weight. Rank 0 writes what the
test compares to argv[1] (JSON)."""

import copy
import json
import sys

import peft
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM

from forgetless.regularizers.base import StepContext
from forgetless.regularizers.lfu import LfU, LfUConfig, find_decoder_layers, select_layers


def whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def sft_loss(model, batch, weight: float) -> torch.Tensor:
    """The response-token mean NLL of `batch`, times `weight`."""
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="sum")
    return nll * weight / int((labels[:, 1:] != -100).sum())


def lfu_step(model, batches, weight: float, cfg: LfUConfig, early_stop: bool, half: bool = False) -> dict:
    """The trainer's perturbing step: the clean backward of `batches` (each at `weight`), its gradient handed to
    LfU, then LfU's capture + perturbed pass on each batch in turn (the weights restored after each)."""
    lfu = LfU(cfg)
    lfu.layers = find_decoder_layers(model)
    lfu.selected = select_layers(cfg.layers, len(lfu.layers))
    lfu.params = [p for p in model.parameters() if p.requires_grad]
    lfu.half_precision, lfu.early_stop = half, early_stop  # half: the applied-offset check runs
    before = [whole(p.detach()).clone() for p in lfu.params]
    sum(sft_loss(model, batch, weight) for batch in batches).backward()
    sft_grads = [p.grad.detach().clone() for p in lfu.params]
    terms, metrics = [], []
    for batch in batches:
        token_scale = weight / int((batch["labels"][:, 1:] != -100).sum())
        with torch.no_grad(), lfu.clean_forward(model, batch, 0):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        ctx = StepContext(model=model, rows={}, batch=batch, outputs=None, sft_loss=None, token_scale=token_scale,
                          global_step=0, micro_batches_in_step=1, micro_step=0,
                          backward=lambda term, **kw: term.backward(**kw),
                          all_finite=lambda t: bool(torch.isfinite(t).all()), sft_grads=sft_grads)
        term, found = lfu.perturbed_backward(ctx)
        terms.append(float(term))
        metrics.append(found)
    restored = all(torch.equal(whole(p.detach()), b) for p, b in zip(lfu.params, before))
    return {"terms": terms, "metrics": metrics, "restored": restored,
            "sft_grads": [whole(g).float().tolist() for g in sft_grads],
            "grads": [whole(p.grad).float().tolist() for p in lfu.params],
            "sharded": [isinstance(p, DTensor) for p in lfu.params]}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    # init_lora_weights=False: B is not zero, so every adapter matrix has a gradient
    base = peft.get_peft_model(LlamaForCausalLM(config),
                               peft.LoraConfig(r=3, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    batches = []
    for seed, prompt in ((1, 5), (2, 3)):  # the two ranks' batches: other tokens, other response lengths
        ids = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(seed))
        labels = ids.clone()
        labels[:, :prompt] = -100
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    rank = dist.get_rank()
    results = {}
    for alpha_scale in ("absolute", "weights", "bfloat16"):
        cfg = LfUConfig(lam=2.0, alpha=0.1, alpha_scale="absolute" if alpha_scale == "bfloat16" else alpha_scale)
        half = alpha_scale == "bfloat16"
        model = copy.deepcopy(base).to(torch.bfloat16) if half else base
        plain = lfu_step(copy.deepcopy(model), batches, 0.5, cfg, early_stop=True, half=half)
        sharded_model = copy.deepcopy(model)
        for layer in find_decoder_layers(sharded_model):
            fully_shard(layer)
        fully_shard(sharded_model)
        # the whole forward under several processes, as LfU.setup decides for them
        sharded = lfu_step(sharded_model, [batches[rank]], 1.0, cfg, early_stop=False, half=half)
        results[alpha_scale] = {"plain": plain, "sharded": sharded}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
