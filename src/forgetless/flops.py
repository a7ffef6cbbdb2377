"""Model FLOPs of one training step of a decoder-only LM, and MFU against a device's peak.

Counted as model FLOPs (what the model's definition needs, not what the kernels happen to do),
2 FLOPs per multiply-add, matrix products only (norms, activations and the loss are a few %):

  forward, per step of B rows x T tokens with K kept logit rows (the response-only LM head):
    linear    2 * B * T * (sum of the decoder layers' linear weights, LoRA's A and B included)
    attention 4 * B * T^2 * d_attn * L      (Q K^T and A V at full T: no causal discount, as PaLM counts)
    head      2 * K * d * V
  backward:
    a trainable weight costs 2x its forward (the activation gradient and the weight gradient),
    a frozen one 1x (the activation gradient only: "frozen base = forward + activation gradients"),
    attention 2x (both operands' gradients).
So full fine-tuning costs 3x the forward (the familiar 6N per token, plus attention), a LoRA step
about 2x the forward. The first layer's input needs no gradient when the embeddings are frozen;
that term is still counted (the convention; under 1/(4 L) of a LoRA step).

MFU = model FLOPs per step / step time / the device's peak dense bf16 throughput (PEAK_TFLOPS).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from forgetless.regularizers.lfu import find_decoder_layers

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's datasheets (their "with sparsity"
# figure halved). Matched as whole words of torch.cuda.get_device_name(), in order: the first key found wins.
PEAK_TFLOPS: dict[str, float] = {
    "GB200": 2500.0,  # per Blackwell GPU of a GB200 superchip
    "B200": 2250.0,  # HGX B200, per GPU
    "H200 NVL": 835.0,
    "GH200": 989.0,  # the Hopper GPU of a GH200 superchip
    "H200": 989.0,  # H200 SXM
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # H100 SXM ("NVIDIA H100 80GB HBM3")
    "A100": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
}


def peak_tflops(device_name: str) -> float | None:
    """The device's dense bf16 peak (TFLOP/s), or None for a device not in the table (a CPU) or a MIG slice
    (a fraction of the GPU)."""
    if "MIG" in device_name:
        return None
    for key, tflops in PEAK_TFLOPS.items():
        if re.search(rf"(?<![\w-]){re.escape(key)}(?![\w-])", device_name):
            return tflops
    return None


@dataclass
class ModelShape:
    """What the count needs of a model: its decoder linears split by trainability, and its sizes."""
    frozen_linear: int  # weights in the decoder layers' linears that take no gradient
    trainable_linear: int  # and those that do (LoRA's A and B matrices in a LoRA run)
    layers: int
    attention_width: int  # d_attn = heads x head dimension (the width of Q K^T and A V)
    hidden: int
    vocab: int
    head_trainable: bool


def model_shape(model: nn.Module) -> ModelShape:
    """Read the shape off a (PEFT-wrapped or plain) HF causal LM."""
    layers = find_decoder_layers(model)
    frozen = trainable = 0
    for layer in layers:
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                if module.weight.requires_grad:
                    trainable += module.weight.numel()
                else:
                    frozen += module.weight.numel()
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    head = model.get_output_embeddings()
    return ModelShape(frozen_linear=frozen, trainable_linear=trainable, layers=len(layers),
                      attention_width=heads * head_dim, hidden=head.weight.shape[1], vocab=head.weight.shape[0],
                      head_trainable=head.weight.requires_grad)


def step_flops(shape: ModelShape, rows: int, tokens: int, kept: int) -> int:
    """Model FLOPs of one training step (forward + backward) on `rows` x `tokens`, `kept` logit rows."""
    linear_fwd = 2 * rows * tokens
    attention = 4 * rows * tokens * tokens * shape.attention_width * shape.layers
    head = 2 * kept * shape.hidden * shape.vocab
    return (3 * linear_fwd * shape.trainable_linear + 2 * linear_fwd * shape.frozen_linear
            + 3 * attention + (3 if shape.head_trainable else 2) * head)
