"""The bench's model-FLOPs count against torch's own FLOP counter on a real training step."""

import peft
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from forgetless.flops import model_shape, peak_tflops, step_flops
from forgetless.losses import forward_rows, logits_mask_supported, token_nll

B, T, VOCAB, WIDTH, LAYERS = 2, 10, 96, 32, 3


def counted_step(finetune: str):
    """One forward + backward of the response-only loss under FlopCounterMode (eager attention: the CPU's
    SDPA kernel is not in torch's FLOP table)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      attn_implementation="eager")
    model = LlamaForCausalLM(cfg)
    if finetune == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, VOCAB, (B, T))
    keep = torch.zeros(B, T, dtype=torch.bool)
    keep[:, T // 2:-1] = True  # the response positions whose next token is a target
    with FlopCounterMode(display=False) as counter:
        _, logits = forward_rows(model, ids, torch.ones_like(ids), keep)
        token_nll(logits, ids[:, 1:][keep[:, :-1]]).sum().backward()
    # a transformers without the boolean logits_to_keep computes the head at every position
    return model, int(keep.sum()) if logits_mask_supported() else B * T, counter.get_total_flops()


def test_full_fine_tuning_count_is_torchs_exactly():
    model, kept, measured = counted_step("full")
    shape = model_shape(model)
    assert shape.frozen_linear == 0 and shape.head_trainable
    # by hand: per layer q (32x32), k and v (32x16: 2 KV heads of 8), o (32x32), MLP 3 x 32x64
    per_layer = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64
    assert shape.trainable_linear == LAYERS * per_layer
    assert step_flops(shape, B, T, kept) == measured


def test_lora_count_is_torchs_plus_the_first_layers_input_gradient():
    """Under LoRA the first layer's k projection and every projection's input gradient there are not computed
    (the frozen embeddings need none); the count keeps them, as the convention does. The difference is exactly
    those products, worked out by hand."""
    model, kept, measured = counted_step("lora")
    shape = model_shape(model)
    lora = (4 * WIDTH + WIDTH * 4) + (4 * WIDTH + 16 * 4)  # A and B of q (32->4->32) and v (32->4->16), per layer
    assert shape.trainable_linear == LAYERS * lora and not shape.head_trainable
    layer0_inputs = 32 * 32 + 32 * 16 + 32 * 16 + 4 * 32 + 4 * 32  # q, k, v and both LoRA A read the embeddings
    k_gradient = 2 * B * T * T * WIDTH  # layer 0's K takes no gradient: one Q K^T backward product less
    assert step_flops(shape, B, T, kept) - measured == 2 * B * T * layer0_inputs + k_gradient


def test_peak_table_matches_device_names_most_specific_first():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200 NVL") == 835.0
    assert peak_tflops("NVIDIA L40S") == 362.0 and peak_tflops("NVIDIA L4") == 121.0
    assert peak_tflops("NVIDIA L40") == 181.0 and peak_tflops("NVIDIA GB200") == 2500.0
    assert peak_tflops("NVIDIA GH200 480GB") == 989.0
    assert peak_tflops("NVIDIA RTX A1000") is None and peak_tflops("NVIDIA H100 80GB HBM3 MIG 1g.10gb") is None
    assert peak_tflops("x86_64 CPU") is None


@pytest.mark.parametrize("tokens", [128, 512])
def test_full_step_is_six_n_per_token_plus_attention(tokens):
    shape = model_shape(counted_step("full")[0])
    n = shape.trainable_linear + shape.hidden * shape.vocab  # the head counted at every token here
    attention = 3 * 4 * tokens * tokens * shape.attention_width * shape.layers
    assert step_flops(shape, 1, tokens, tokens) == 6 * n * tokens + attention
