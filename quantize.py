"""
Weight-only int8 for decoding, as gpt-fast does it: every Linear of a model.Llama becomes an
Int8Linear, each output row of its weight stored as int8 with one scale (its max |w| / 127), the
activations left in the model's dtype, so a decode step streams half the bytes of bf16. Inference
only: there is no gradient through an int8 weight. Speed and perplexity against bf16: docs/bench.md.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Llama


class Int8Linear(nn.Module):
    def __init__(self, weight):
        super().__init__()
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(w / scales[:, None]).to(torch.int8))
        self.register_buffer("scales", scales.to(weight.dtype))

    def forward(self, x):
        scales = self.scales.to(x.dtype)
        if x.device.type == "cpu":  # torch's int8 x float kernel: reads the int8 weight as it is
            y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), self.weight, scales)
            return y.view(*x.shape[:-1], -1)
        return F.linear(x, self.weight.to(x.dtype)) * scales  # inductor fuses the cast into the matmul's load


def quantize_int8(model: Llama) -> Llama:
    """Replace every Linear of `model`, in place, by an Int8Linear of its weight (a tied LM head gets
    its own int8 copy; the embedding table stays as it is: decoding looks up one row of it)."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):  # speed.StreamingLinear too
                setattr(module, name, Int8Linear(child.weight))
    return model
