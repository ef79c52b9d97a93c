"""
QLoRA's 4-bit NormalFloat (NF4) for a frozen base: each weight, flattened, is cut into blocks of 64;
each block is divided by its absolute maximum and every value replaced by the nearest of 16 levels
that are quantiles of a normal distribution, two 4-bit codes to a byte. With double quantization the
fp32 block maxima are themselves stored as int8 around their mean, one fp32 factor per 256 of them.
That is 0.5 + 1/64 + 4/(64*256) bytes a weight (4.13 bits): 25.8% of bf16.

Layout and rounding follow torchao's NF4Tensor (what torchtune's QLoRA uses), so tests/test_lora.py
checks codes, block maxima and dequantized values against it; the 16 levels are computed here from
QLoRA's formula instead of typed in (they match bitsandbytes' table; torchao's is rounded to 1e-4).

NF4Linear dequantizes in the forward and again in the backward (for the gradient of its input, which
the adapters of the layers below need): only the packed weight stays in memory, never a float copy.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

NF4_BLOCK = 64  # weights per absmax scale (QLoRA)
SCALE_BLOCK = 256  # block maxima per fp32 factor in double quantization (QLoRA)
_NORMAL_OFFSET = 0.9677083  # QLoRA's: the outermost quantile used, so that the ends are not infinite


def nf4_codebook(dtype=torch.float32) -> torch.Tensor:
    """The 16 NF4 levels, ascending, in [-1, 1] with an exact 0: 8 positive quantiles of N(0, 1) and
    7 negative ones (asymmetric so that 0 is a level), scaled so the largest is 1 (QLoRA, sec. 3)."""
    positive = torch.special.ndtri(torch.linspace(_NORMAL_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(_NORMAL_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (levels / levels.max()).to(dtype)


def nf4_size_error(name: str, shape, block=NF4_BLOCK):
    """The one-line refusal for a weight whose size is not a whole number of blocks, or None."""
    numel = 1
    for n in shape:
        numel *= n
    if numel % block:
        return (f"NF4 needs each quantized weight to be a whole number of {block}-value blocks: {name} is "
                f"{'x'.join(map(str, shape))} = {numel} values")
    return None


def nf4_nbytes(numel: int, block=NF4_BLOCK, double_quant=True, scale_block=SCALE_BLOCK) -> int:
    """Bytes of a weight of `numel` values in NF4: packed codes, and the block maxima (fp32, or int8
    with one fp32 factor per scale block and one fp32 mean)."""
    n_blocks = numel // block
    if not double_quant:
        return numel // 2 + 4 * n_blocks
    return numel // 2 + n_blocks + 4 * -(-n_blocks // scale_block) + 4


def quantize_nf4_tensor(weight: torch.Tensor, block=NF4_BLOCK, double_quant=True, scale_block=SCALE_BLOCK,
                        codebook=None) -> dict:
    """The NF4 form of `weight` as a dict of tensors: packed codes (uint8, two per byte, the first in the
    high nibble as torchao does), and the block maxima, plain (fp32) or double-quantized (int8 codes,
    one fp32 factor per scale_block of them, and their mean). A last partial scale block is allowed
    (torchao refuses it; SmolLM2's 576x576 q_proj has 20.25 scale blocks)."""
    error = nf4_size_error("the weight", tuple(weight.shape), block)
    if error:
        raise ValueError(error)
    codebook = nf4_codebook() if codebook is None else codebook.float()
    blocks = weight.detach().float().reshape(-1, block)
    absmax = blocks.abs().amax(dim=1)
    # nearest level: a value goes below the midpoint between two levels or above it (ties go down, as
    # the argmin of torchao does); an all-zero block divides by the smallest float and codes to 0.0
    normalized = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    codes = torch.bucketize(normalized.reshape(-1), (codebook[1:] + codebook[:-1]) / 2).to(torch.uint8)
    out = {"packed": (codes[0::2] << 4) | codes[1::2], "codebook": codebook}
    if double_quant:
        out.update(_double_quantize(absmax, scale_block))
    else:
        out["absmax"] = absmax
    return out


def _double_quantize(absmax: torch.Tensor, scale_block: int) -> dict:
    """int8 codes of the block maxima around their mean, symmetric per scale block (torchao's rule: the
    factor is 256 / (2 * the block's absmax), codes rounded and clamped to [-128, 127])."""
    mean = absmax.mean()
    centered = absmax - mean
    n = centered.numel()
    padded = F.pad(centered, (0, -n % scale_block)).view(-1, scale_block)
    factor = 256 / (2 * padded.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny))
    codes = (padded * factor[:, None]).round().clamp(-128, 127).to(torch.int8).reshape(-1)[:n]
    return {"absmax_codes": codes, "absmax_factor": factor, "absmax_mean": mean}


def dequantize_absmax(q: dict, scale_block=SCALE_BLOCK) -> torch.Tensor:
    """The fp32 block maxima back from either form of quantize_nf4_tensor's output."""
    if "absmax" in q:
        return q["absmax"]
    codes = q["absmax_codes"]
    n = codes.numel()
    padded = F.pad(codes.float(), (0, -n % scale_block)).view(-1, scale_block)
    return (padded / q["absmax_factor"][:, None]).reshape(-1)[:n] + q["absmax_mean"]


def dequantize_nf4_tensor(q: dict, shape, dtype=torch.float32, scale_block=SCALE_BLOCK) -> torch.Tensor:
    """The weight back, in `dtype`: level of each code times its block's maximum."""
    packed = q["packed"]
    codes = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1).long()
    absmax = dequantize_absmax(q, scale_block)
    values = q["codebook"][codes].view(absmax.numel(), -1) * absmax[:, None]
    return values.view(shape).to(dtype)


class _FrozenWeightLinear(torch.autograd.Function):
    """y = product(x) for a frozen weight kept in a compact form: the backward rebuilds the weight with
    `dequantize(dtype)` for the input's gradient, so autograd never holds a full float copy of it."""

    @staticmethod
    def forward(ctx, x, product, dequantize):
        ctx.dequantize = dequantize
        return product(x)

    @staticmethod
    def backward(ctx, grad_y):
        return grad_y @ ctx.dequantize(grad_y.dtype), None, None


def frozen_weight_linear(x, product, dequantize):
    """x times a frozen weight through `product`, differentiable in x only (see _FrozenWeightLinear)."""
    return _FrozenWeightLinear.apply(x, product, dequantize)


class NF4Linear(nn.Module):
    """A frozen Linear (no bias) stored as NF4; its state is buffers, so no optimizer ever sees it."""

    def __init__(self, weight: torch.Tensor, block=NF4_BLOCK, double_quant=True, scale_block=SCALE_BLOCK):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.block, self.scale_block, self.double_quant = block, scale_block, double_quant
        for name, t in quantize_nf4_tensor(weight, block, double_quant, scale_block).items():
            self.register_buffer(name, t)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        q = {name: buf for name, buf in self.named_buffers()}
        return dequantize_nf4_tensor(q, (self.out_features, self.in_features), dtype, self.scale_block)

    def forward(self, x):
        return frozen_weight_linear(x, lambda t: F.linear(t, self.dequantize(t.dtype)), self.dequantize)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if name != "codebook")

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}, "
                f"double_quant={self.double_quant}")


def layer_linears(model):
    """(qualified name, parent module, attribute, Linear) for every Linear inside the model's layers:
    the embedding and the LM head stay as they are (QLoRA keeps the head in 16 bits; a tied head is the
    embedding table itself)."""
    found = []
    for i, block in enumerate(model.layers):
        for path, module in block.named_modules():
            for attr, child in module.named_children():
                if isinstance(child, nn.Linear):
                    name = f"layers.{i}." + (f"{path}." if path else "") + attr
                    found.append((name, module, attr, child))
    return found


def quantize_nf4(model, block=NF4_BLOCK, double_quant=True, scale_block=SCALE_BLOCK):
    """Replace, in place, every Linear of the model's layers by an NF4Linear of its weight. Every size
    is checked first, so a refusal (one line naming the layer and its size) leaves the model as it was."""
    linears = layer_linears(model)
    for name, _, _, linear in linears:
        error = nf4_size_error(name, tuple(linear.weight.shape), block)
        if error:
            raise ValueError(error)
    for _, parent, attr, linear in linears:
        setattr(parent, attr, NF4Linear(linear.weight, block, double_quant, scale_block))
    return model
