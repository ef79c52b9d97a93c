"""
Weight-only quantization for decoding, as gpt-fast does it: every Linear of a model.Llama is swapped
from outside, the activations stay in the model's dtype. Inference only: no gradient through them.
  int8  Int8Linear: each output row of the weight as int8 with one scale (its max |w| / 127);
        a decode step streams half the bytes of bf16.
  int4  Int4Linear: each run of 32 weights along a row (a group) as 4-bit codes with its own scale
        and minimum, as llama.cpp's Q4_1: a quarter of bf16's bytes plus 4 bytes a group; the LM
        head int8, as Q4_1 files keep it at 8 bits.
Speed and perplexity against bf16: docs/bench.md.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Llama
from speed import kernel_applies, matvec

KERNEL_ROWS = 16  # most rows a CPU quantized kernel takes where it is slow (see Int4Linear); decoding stays below


class Int8Linear(nn.Module):
    joins_by_rows = True  # a row's output needs that row's codes and scales only (speed.fuse_projections)
    int8_rows_in_blocks = True  # speed.block_weights may lay the codes out in blocks of 16 rows (decoding only)

    def __init__(self, weight):
        super().__init__()
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(w / scales[:, None]).to(torch.int8))
        self.register_buffer("scales", scales.to(weight.dtype))

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.scales.float()[:, None]).to(dtype)

    def read_bytes(self) -> int:
        """What a product must read: the int8 weight and its scales."""
        return self.weight.nbytes + self.scales.nbytes

    def forward(self, x):
        if kernel_applies(x, self.weight):  # one row on a CPU: speed_kernels.cpp, integer products
            return matvec(x, self.weight, self.scales)
        scales = self.scales.to(x.dtype)
        few_rows = x.numel() <= KERNEL_ROWS * x.shape[-1]
        if x.device.type == "cpu" and (x.dtype == torch.bfloat16 or few_rows):
            # torch's int8 x float kernel: reads the int8 weight as it is; its fp32 code is slow (2-3 GB/s,
            # docs/bench.md), so many fp32 rows (a held-out loss) multiply by the dequantised weight instead
            y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), self.weight, scales)
            return y.view(*x.shape[:-1], -1)
        return F.linear(x, self.weight.to(x.dtype)) * scales  # inductor fuses the cast into the matmul's load


class Int4Linear(nn.Module):
    """4-bit weights, group-wise asymmetric: in each group of `group_size` weights along a row,
    w = q * scale + minimum with q = round((w - minimum) / scale) in 0..15 and scale = (max - min) / 15,
    so the group's extremes are exact (up to the scale's rounding to the model's dtype).

    `codes` holds q two a byte (low nibble first: the definition, for any device). On a CPU, for bf16
    activations and at most KERNEL_ROWS rows (decoding), the product is torch's int4 x bf16 kernel
    (_weight_int4pack_mm_for_cpu), which reads its own packing of the same codes and the (scale, zero) pairs
    of w = (q - 8) * scale + zero, zero = min + 8 scale. Everything else multiplies by the dequantised
    weight: measured on an AVX2 CPU, 1536 x 576, one thread, the kernel took 0.16 ms for one bf16 row, but
    2.0 ms for one fp32 row and 31 ms for 16 (its fp32 code is not vectorised there), against 2.5 ms for
    16 fp32 rows through the dequantised weight."""

    joins_by_rows = True
    int4_rows_in_blocks = True  # speed.block_weights may lay the codes out in blocks of 16 rows (decoding only)

    def __init__(self, weight, group_size=32):
        super().__init__()
        N, K = weight.shape
        if K % group_size:
            raise ValueError(f"int4: a row of {K} weights does not split into groups of {group_size}")
        w = weight.detach().float().view(N, K // group_size, group_size)
        low = w.amin(-1)
        scale = ((w.amax(-1) - low) / 15).clamp(min=1e-12)  # a constant group keeps a usable scale
        q = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).view(N, K)
        self.group_size = group_size
        self.register_buffer("codes", q[:, 0::2] | (q[:, 1::2] << 4))
        self.register_buffer("scales", scale.to(weight.dtype))  # (N, K / group_size)
        self.register_buffer("minimums", low.to(weight.dtype))
        self.pack_for_cpu()

    def pack_for_cpu(self):
        """The CPU kernel's forms of codes, scales and minimums (not saved; again after they change): it takes rows
        in multiples of 16, so a few zero rows pad the rest, and forward drops their outputs."""
        N = self.codes.shape[0]
        self.out_features, pad = N, -N % 16
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            F.pad(self.unpacked_codes(), (0, 0, 0, pad)).to(torch.int32), 1)
        self.register_buffer("packed", packed, persistent=False)
        scale_zero = torch.stack([self.scales.float(), self.minimums.float() + 8 * self.scales.float()], -1)
        scale_zero = F.pad(scale_zero, (0, 0, 0, 0, 0, pad)).transpose(0, 1).contiguous()  # (K / group, N + pad, 2)
        self.register_buffer("scale_zero", scale_zero.to(self.scales.dtype), persistent=False)

    def unpacked_codes(self) -> torch.Tensor:
        """q (N, K), uint8 in 0..15."""
        return torch.stack([self.codes & 0xF, self.codes >> 4], dim=-1).flatten(1)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        N, K = self.codes.shape[0], 2 * self.codes.shape[1]
        q = self.unpacked_codes().float().view(N, K // self.group_size, self.group_size)
        return (q * self.scales.float()[..., None] + self.minimums.float()[..., None]).view(N, K).to(dtype)

    def read_bytes(self) -> int:
        """What a product must read: the 4-bit codes and a (scale, zero) pair a group."""
        return self.packed.nbytes + self.scale_zero.nbytes

    def forward(self, x):
        if kernel_applies(x, self.codes) and self.group_size % 32 == 0:  # one row on a CPU: speed_kernels.cpp
            return matvec(x, self.codes, self.scales, self.minimums, self.group_size)
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.numel() <= KERNEL_ROWS * x.shape[-1]:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).contiguous(), self.packed,
                                                            self.group_size, self.scale_zero.to(x.dtype))
            return y[:, :self.out_features].reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.dequantize(x.dtype))

    @property
    def weight(self):  # what model.py's loss looks at: an integer tensor, so it refuses (speed.chunked_cross_entropy)
        return self.codes


def quantize_int8(model: Llama) -> Llama:
    """Replace every Linear of `model`, in place, by an Int8Linear of its weight (a tied LM head gets
    its own int8 copy; the embedding table stays as it is: decoding looks up one row of it)."""
    return quantize_linears(model, Int8Linear)


def quantize_int4(model: Llama, group_size=32, head_int8=True) -> Llama:
    """As quantize_int8, with Int4Linear (groups of group_size weights along each row) in the layers and,
    with head_int8, an int8 LM head, as llama.cpp's Q4_1 files keep their output/embedding table at 8 bits:
    on SmolLM2-135M a 4-bit head alone costs ~7% perplexity (docs/bench.md). Every size is checked first:
    a refusal names the layer and leaves the model as it was."""
    for name, child in model.named_modules():
        if isinstance(child, nn.Linear) and child.in_features % group_size:
            raise ValueError(f"--quantize=int4: {name} has rows of {child.in_features} weights, not a multiple "
                             f"of the group size {group_size}; use --quantize=int8")
    if head_int8:
        model.lm_head = Int8Linear(model.lm_head.weight)
    return quantize_linears(model, lambda w: Int4Linear(w, group_size))


def quantize_linears(model, make):
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):  # speed.StreamingLinear too
                setattr(module, name, make(child.weight))
    return model


QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4}  # the --quantize choices of sample.py and bench.py
