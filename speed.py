"""
The faster paths, kept out of model.py: each computes what the plain model computes, only faster on
some machine (measurements: docs/bench.md).

  use_decode_paths(model)   installs the CPU decoding paths into a built model, as gpt-fast's
                            quantize.py swaps modules: every nn.Linear becomes a StreamingLinear and
                            attention of one new position over the cache becomes decode_attention.
                            Call it before compiling model.decode_step (sample.py, bench.py,
                            experiments/decode_timing.py).
  fuse_projections(model)   joins each layer's products of one input (q, k and v; gate and up) into one
                            module: fewer calls, each one parallel region (decoding only).
  block_weights(model)      lays bf16, int8 and 4-bit weights out in blocks of 16 rows where the CPU
                            multiplies bf16 or small integers by AVX-512 (BlockedLinear; decoding only).
  pack_weights(model)       lays every weight end to end in one allocation on huge pages (decoding only).
  compile_decode_step       torch.compile of one model's decode step, as the decoding scripts run it; once
                            compiled its steps call the graph without dynamo (DirectStep).
  matvec                    the product of one row with a weight (float, int8 or 4-bit), or of a few
                            rows with a float weight, through speed_kernels.cpp, built with the C++
                            compiler at first use.
  decode_attention          one new position per row over the cache, through speed_kernels.cpp too.
  chunked_cross_entropy     the training loss without the (B*T, vocab) fp32 logits; model.py uses it.
"""

import contextlib
import copy
import ctypes
import functools
import hashlib
import math
import os
import subprocess
import sys
import tempfile
import types
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# decoding one token at a time on a CPU


class StreamingLinear(nn.Linear):
    """nn.Linear (no bias) whose decoding products, on a CPU, run at the machine's limit.

    One row times a weight matrix reads every weight once for two FLOPs, so its speed is the rate at
    which the weights stream in. On the CPU measured BLAS read them for one row at 7-19 GB/s of ~50-80
    (docs/bench.md). One row of bf16/fp16 weights goes through matvec (speed_kernels.cpp): on the AVX2 CPU
    measured a compiled SmolLM2 decode step ran 2.09x faster with it than with inductor's loop (paired,
    experiments/batch_decode.py). fp32 weights, and half-precision ones where the kernel cannot be built (no
    C++ compiler) or with use_kernel False: compiled code writes the product as multiply-and-sum, which
    inductor compiles into one vectorised loop (for fp32 it beat the kernel, 32.9 against 27.4 tokens/s in a
    scratch pairing), eager code F.linear.

    A few rows (batched decoding, up to stream_rows) of bf16/fp16 weights go through matvec too: its loop for
    several rows reads each weight once for all of them. On an AVX2 CPU torch's half-precision matmul has no
    fast kernel (a 1024^3 bf16 product at 0.3 GFLOP/s against fp32's 20). On a CPU that multiplies bf16 torch's
    product is fast too, and the kernel still wins: with AVX-512 BF16 its rows across the vector lanes took 64.2
    ms for a SmolLM2 step's products at 32 rows against F.linear's 82.9 and tied at 64 (119 ms each) on the Zen
    4; with AMX it multiplies tiles (16 rows: 41-48 ms against F.linear's 77-99). fp32 weights take it for 2 to
    FP32_CPU_ROWS rows: on a CPU without AVX-512, where BLAS has no wider vectors than the kernel. Prefill and
    training (more rows) and the GPU keep F.linear."""

    stream_rows = 64  # most rows for the kernel; 1 (set per module) with use_kernel False: the old path, for comparison
    use_kernel = True  # half-precision rows (fp32: FP32_CPU_ROWS) through matvec; False (per module or class): the old path

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        most = min(self.stream_rows, CPU_ROWS.get(self.weight.dtype, self.stream_rows))
        fp32_rows = self.weight.dtype == torch.float32 and rows > 1  # one fp32 row: inductor's loop beat the kernel
        if self.use_kernel and (self.weight.dtype in HALF or fp32_rows) and kernel_applies(x, self.weight, most):
            return matvec(x, self.weight)
        if x.device.type == "cpu" and rows == 1 and torch.compiler.is_compiling():
            return (x.unsqueeze(-2) * self.weight).sum(-1)
        return F.linear(x, self.weight)


HALF = (torch.bfloat16, torch.float16)


def cpu_flags() -> str:
    """The CPU's feature flags (Linux), part of the kernel build's name: -march=native code is for this CPU only."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bf16 product instructions (AVX-512 BF16 or AMX). Without them torch emulates bf16
    products: on a Zen 3 (AVX2) a 1024 x 576 x 1536 product ran at 15 GFLOP/s against 73 in float32, and a KL
    distillation step of SmolLM2 took ~19x as long as in float32 (docs/keep_skills.md, "Machines without bf16")."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags().split()))


# fp32 weights: the kernel's loop for a few rows is AVX2 (8 floats a vector). Without AVX-512 BLAS has nothing wider,
# and on an AVX2-only Zen 3 the kernel took 77-120 ms for a SmolLM2 step's 211 products at 16 rows, F.linear 196-265
# (docs/bench.md, "fp32 rows on a CPU without AVX-512"). With AVX-512 (not measured there), or without the kernel's
# vector loops (AVX2, FMA, F16C: elsewhere it runs the plain definition), F.linear stays
FP32_CPU_ROWS = 1 << 30 if {"avx2", "fma", "f16c"} <= set(cpu_flags().split()) and "avx512f" not in cpu_flags() else 1
CPU_ROWS = {torch.float32: FP32_CPU_ROWS}  # bf16 and fp16: the kernel up to stream_rows on every CPU


# -----------------------------------------------------------------------------
# the decoding kernel: speed_kernels.cpp, built once per machine into the cache

KERNEL_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "speed_kernels.cpp")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KERNEL_DTYPES = (*FLOAT_DTYPES, torch.int8, torch.uint8)  # weights it reads


def cache_dir(environ=None):
    """Where builds are kept between runs: $XDG_CACHE_HOME/echo-llama, else ~/.cache/echo-llama."""
    environ = os.environ if environ is None else environ
    return os.path.join(environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "echo-llama")


def kernel_build_command(source, out, compiler):
    from torch.utils.cpp_extension import include_paths
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    return [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++20", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *[f"-I{p}" for p in include_paths()],
            source, "-o", out, f"-L{torch_lib}", "-lc10", "-ltorch_cpu", "-lm"]


def kernel_build_path(source_text, name, compiler):
    """Where the build of `source_text` goes in the cache, `name`-<key>.so: the key is the source, the compiler, torch's
    version and the CPU's flags, so any of them changing builds anew (-march=native, torch's ABI)."""
    key = hashlib.sha256(source_text + f"{compiler} {torch.__version__} {cpu_flags()}".encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), "kernels", f"{name}-{key}.so")


def build_kernels(source, path, compiler):
    """Compile `source` into the shared library `path`, whole or not at all: two processes may build at once, each
    into a temporary file of its own, renamed into place. Raises OSError or subprocess.CalledProcessError (its
    stderr the compiler's)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.NamedTemporaryFile(dir=os.path.dirname(path), suffix=".so", delete=False).name
    try:
        subprocess.run(kernel_build_command(source, tmp, compiler), check=True, capture_output=True, text=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@functools.cache
def kernel_library():
    """Build speed_kernels.cpp (c++ -O3 -march=native -fopenmp, ~15 s) once per machine into the cache and
    load it: torch.ops.speed.matvec. Returns its path, or None with one warning line where it cannot be built
    (no C++ compiler: decoding then falls back to inductor's loop and F.linear). The build is named by the
    source, the compiler, the CPU's flags and torch's version, so any of them changing builds anew."""
    compiler = os.environ.get("CXX", "c++")
    with open(KERNEL_SOURCE, "rb") as f:
        path = kernel_build_path(f.read(), "speed_kernels", compiler)
    if not os.path.exists(path):
        print(f"speed.py: building speed_kernels.cpp into {path} (once per machine and source, ~15 s) ...",
              file=sys.stderr, flush=True)
        try:
            build_kernels(KERNEL_SOURCE, path, compiler)
        except (OSError, subprocess.CalledProcessError) as e:
            lines = (getattr(e, "stderr", None) or str(e)).strip().splitlines()
            warnings.warn(f"speed_kernels.cpp did not build with {compiler} ({lines[-1] if lines else e}); decoding "
                          "falls back to the slower inductor loop. Install a C++ compiler with OpenMP, set CXX, or "
                          "make $XDG_CACHE_HOME writable")
            return None
    torch.ops.load_library(path)
    if "amx_bf16" in cpu_flags().split() and not torch.ops.speed.multiplies_tiles():
        warnings.warn(f"speed_kernels.cpp was built without AMX tiles ({compiler} too old for -mamx-tile, or Linux "
                      "refused them); batched bf16 decoding takes its slower vector loop. Use GCC 11+ or set CXX")
    return path


def kernel_applies(x, weight, most_rows=1) -> bool:
    """matvec serves 1 to most_rows rows (more than one: float weights only) on a CPU, weights of a kind it reads,
    no gradient wanted, when the kernel built."""
    return (x.device.type == "cpu" and x.shape[-1] <= x.numel() <= x.shape[-1] * most_rows
            and weight.dtype in KERNEL_DTYPES
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and kernel_built())


@torch.compiler.assume_constant_result  # a compiled graph asks once, while it is traced, not every call
def kernel_built() -> bool:
    return kernel_library() is not None


def kernel_multiplies_tiles() -> bool:
    """Whether batched bf16 rows go through AMX tiles here: the CPU has them, the build uses them, Linux lent them."""
    return kernel_built() and torch.ops.speed.multiplies_tiles()


def matvec(x, weight, scales=None, minimums=None, group_size=0):
    """F.linear(x, W) for one row x (..., K) on a CPU, or a few rows of float weights (batched decoding: each
    weight read once for all rows; bf16 rows against bf16 weights by the CPU's bf16 products where it has them),
    W (N, K) as weight holds it: float (fp32/bf16/fp16), int8
    codes (W = codes * scales[:, None], quantize.Int8Linear), or 4-bit codes two a byte, low nibble first (uint8,
    (N, K / 2)), with W = q * scale + minimum per group of group_size along a row (quantize.Int4Linear).
    Float weights are multiplied in fp32 as they are; for int8 and 4-bit, x is rounded to int16 in blocks of 32
    (|error| <= max|x| / 65534 a block) so that the products are integer ones (speed_kernels.cpp). The result
    comes in x's dtype, summed in fp32. An op of torch's (built by kernel_library), so a compiled decode step
    calls it whole, for ~7 us a call from Python."""
    if not kernel_built():
        raise RuntimeError("speed.matvec: speed_kernels.cpp did not build on this machine (the warning above says why)")
    return torch.ops.speed.matvec(x, weight, scales, minimums, group_size)


def greedy_pick(logits):
    """The index of each row's largest logit (rows, vocabulary) -> (rows,): the first of equal ones, a NaN counting as
    largest, as torch.max's indices (model.sample_token at temperature 0). On a CPU speed_kernels.cpp's loop (torch's
    max took 660 us for 16 rows of SmolLM2's 49,152 bf16 logits, 3% of a batch-16 step: docs/bench.md, "The greedy
    pick and bf16 attention scores"); elsewhere torch.max."""
    if logits.device.type == "cpu" and logits.dim() == 2 and logits.dtype in FLOAT_DTYPES and kernel_built():
        return torch.ops.speed.greedy_pick(logits)
    return logits.max(dim=-1).indices


def decode_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d)) v of one new position per sequence over the cache: q (B, H, 1, hd),
    k and v (B, H_kv, S, hd), mask (1 or B, S). On a CPU, where the kernel built, speed_kernels.cpp's loop
    (torch.ops.speed.decode_attention; scores, softmax and sums in fp32): each cached key row is read once
    for its group's query heads, and positions the mask leaves out are not read at all (generate's cache
    is rounded up to 128 positions). A compiled SmolLM2-shaped step with 16 rows and a 240-position cache ran
    1.15x as fast as with decode_attention_by_ops (docs/bench.md, "Attention over the cache")."""
    if attention_kernel_applies(q, k, v):
        return torch.ops.speed.decode_attention(q, k, v, mask)
    return decode_attention_by_ops(q, k, v, mask)


def decode_attention_by_ops(q, k, v, mask):
    """decode_attention with torch's ops (where the kernel does not serve: a GPU, no C++ compiler, gradients).
    Written out rather than SDPA's, because for one query it is two small products per head, which the CPU
    flash kernel took 70 us a call to do in bf16 (30% of a decode step, bench.py --profile). Compiled on a
    CPU, as multiply-and-sum, inductor fuses it into passes over the whole cache; eager, batched products
    avoid a temporary the size of the cache. Scores in q's dtype, softmax in fp32, weights in v's dtype."""
    B, H, _, hd = q.shape
    q = q.reshape(B, k.shape[1], -1, hd)  # (B, H_kv, g, hd): a group's query heads share one K/V head
    fused = torch.compiler.is_compiling() and q.device.type == "cpu"
    scores = (q.unsqueeze(-2) * k.unsqueeze(2)).sum(-1) if fused else q @ k.transpose(-1, -2)
    masked = (scores.float() / math.sqrt(hd)).masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = masked.softmax(dim=-1).to(v.dtype)
    y = (probs.unsqueeze(-1) * v.unsqueeze(2)).sum(-2) if fused else probs @ v
    return y.reshape(B, H, 1, hd)


def attention_kernel_applies(q, k, v) -> bool:
    """The attention kernel serves CPU tensors of one float dtype, no gradient wanted, when it built."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and q.dtype == k.dtype == v.dtype
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and kernel_built())


def use_decode_paths(model):
    """Install the decoding paths into `model` in place (idempotent); returns it. The Linear modules
    change class only: the same Parameter objects stay, so tied weights stay tied and the state dict
    keeps its keys. Modules that are not plain nn.Linear (int8 ones, quantize.py) are left alone."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = StreamingLinear
        if hasattr(module, "cache_attention"):  # model.Attention's hook for one query over the cache
            module.cache_attention = decode_attention
    return model


JOINED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}  # model.py reads these


def fuse_projections(model):
    """Join, in place, each layer's projections of one input into one module whose weights are theirs end to end
    (rows; int8 and 4-bit scales alike): an owner's q, k and v (qkv_proj), every MLP's gate and up (gate_up_proj),
    which model.py splits back. Why: every product is a call and, at 2 threads, a parallel region, where the
    threads wake and meet; a SmolLM2 step had 241 of them, 151 joined (docs/bench.md, "Joined projections").
    Decoding only: the joined layers' state-dict keys change. Layers whose parts differ in kind, dtype or group
    size, or are of a kind whose weights are not row by row (adapters, NF4), stay as they are. Returns model."""
    for module in list(model.modules()):
        for name, names in JOINED.items():
            parts = [getattr(module, n, None) for n in names]
            joined = join_rows(parts) if all(p is not None for p in parts) else None
            if joined is not None:
                setattr(module, name, joined)
                for n in names:
                    delattr(module, n)
    return model


def join_rows(parts):
    """One module of the parts' kind whose output is theirs concatenated, or None where they cannot join."""
    kind = type(parts[0])
    by_rows = kind in (nn.Linear, StreamingLinear) or getattr(kind, "joins_by_rows", False)  # quantize.py's
    if not by_rows or any(type(p) is not kind for p in parts):
        return None
    tensors = [p.state_dict(keep_vars=True) for p in parts]  # weight (, bias); int8: + scales; 4-bit: codes, ...
    for name, first in tensors[0].items():  # one width each (4-bit: codes and scales alike, so one group size)
        if any(t[name].dtype != first.dtype or t[name].shape[1:] != first.shape[1:] for t in tensors):
            return None
    joined = copy.deepcopy(parts[0])
    for name, first in tensors[0].items():
        rows = torch.cat([t[name].detach() for t in tensors])
        setattr(joined, name, nn.Parameter(rows, first.requires_grad) if isinstance(first, nn.Parameter) else rows)
    if hasattr(joined, "out_features"):
        joined.out_features = sum(p.out_features for p in parts)
    if hasattr(joined, "pack_for_cpu"):  # Int4Linear's CPU forms of its codes
        joined.pack_for_cpu()
    return joined


class BlockedLinear(nn.Module):
    """A bf16 nn.Linear (no bias), a quantize.Int8Linear or a quantize.Int4Linear, whose weight lies in blocks of 16
    rows, for a CPU that multiplies bf16 (AVX-512 BF16) or small integers (AVX-512 VNNI): blocks[b, p, r] = (W[16b + r,
    2p], W[16b + r, 2p + 1]). One vector instruction then adds 16 rows' products with a pair of x at once, with no sums
    across the vector lanes, and each block streams from memory in one run (speed_kernels.cpp: matvec_blocked, and
    matvec_blocked_int8 for codes with one scale a row, `scales`, x rounded as the row-major loop rounds it). On the
    Zen 4 a compiled SmolLM2 step in bf16 ran 1.03-1.05x the row-major one at one row, where that loop already read at
    82-88% of the bandwidth, and 1.06x (1 thread) and 1.09x (2) at 16 rows; int8 0.95-1.09x at one row and 2.28x and
    2.40x at 16 (docs/bench.md, "Weights in blocks of 16 rows", "int8 weights in blocks of 16 rows"). 4-bit codes
    (`minimums` given; weight the codes q (N, K) in 0..15): blocks[b, g] holds group g of rows 16b..16b+15, lanes of 4
    bytes a row, byte i of lane c = q[16b + r, g group + 8c + i] | q[16b + r, g group + 8c + 4 + i] << 4, then the 16
    rows' scales and minimums (matvec_blocked_q4): one run of memory, 1.22x faster than scales and minimums apart
    ("4-bit scales inline"); 1.25x the row-major loop at one row, 1.85x at 16 ("4-bit weights in blocks of 16 rows").
    Decoding only, as block_weights makes it: the weight's key becomes `blocks`; weight_rows() gives W (the codes)
    back, scales_and_minimums() the 4-bit ones."""

    def __init__(self, weight, scales=None, minimums=None, group_size=0):
        super().__init__()
        self.out_features, self.in_features = N, K = weight.shape
        self.group_size = group_size if minimums is not None else 0  # 4-bit codes where not 0
        self.scale_dtype = scales.dtype if minimums is not None else None  # 4-bit: the dtype of those in the blocks
        if minimums is None:
            blocks = weight.detach().reshape(N // 16, 16, K // 2, 2).transpose(1, 2)
        else:
            if group_size <= 0 or group_size % 32 or K % group_size:
                raise ValueError(f"BlockedLinear: 4-bit codes need groups of a multiple of 32 columns dividing {K}, "
                                 f"not {group_size}")
            q = weight.detach().reshape(N // 16, 16, K // 8, 2, 4)
            lanes = (q[..., 0, :] | q[..., 1, :] << 4).transpose(1, 2).reshape(N // 16, K // group_size, group_size * 8)
            inline = [t.detach().reshape(N // 16, 16, -1).transpose(1, 2).contiguous().view(torch.uint8)
                      for t in (scales, minimums)]
            blocks, scales = torch.cat([lanes, *inline], dim=2), None
        self.register_buffer("blocks", blocks.contiguous())
        self.register_buffer("scales", None if scales is None else scales.contiguous().clone())

    def weight_rows(self):
        if not self.group_size:
            return self.blocks.transpose(1, 2).reshape(self.out_features, self.in_features)
        lanes = self.blocks[:, :, :self.group_size * 8].reshape(self.out_features // 16, -1, 16, 4).transpose(1, 2)
        return torch.stack([lanes & 0xF, lanes >> 4], dim=-2).reshape(self.out_features, self.in_features)

    def scales_and_minimums(self):
        """4-bit codes' scales and minimums, each (N, groups) in their dtype"""
        inline = self.blocks[:, :, self.group_size * 8:].contiguous().view(self.scale_dtype)  # (N / 16, groups, 32)
        return [t.transpose(1, 2).reshape(self.out_features, -1) for t in (inline[..., :16], inline[..., 16:])]

    def read_bytes(self) -> int:
        """What a product must read: the blocks (a buffer, which a count of the parameters leaves out; 4-bit ones hold
        their scales and minimums), an int8 layer's scales."""
        return self.blocks.nbytes + (0 if self.scales is None else self.scales.nbytes)

    def forward(self, x):
        if x.device.type == "cpu" and x.numel() and not torch.is_grad_enabled():
            x_for_codes = x.dtype in (torch.float32, torch.bfloat16)  # what the int8 and 4-bit ops take
            if self.group_size:  # 4-bit, their scales in the blocks
                if x_for_codes and blocked_loops_built(torch.uint8):
                    kind = SCALE_KINDS[self.scale_dtype]
                    return torch.ops.speed.matvec_blocked_q4(x, self.blocks, self.group_size, kind)
            elif self.scales is None:  # bf16
                if x.dtype == torch.bfloat16 and blocked_loops_built(torch.bfloat16):
                    return torch.ops.speed.matvec_blocked(x, self.blocks)
            elif x_for_codes and blocked_loops_built(torch.int8):
                return torch.ops.speed.matvec_blocked_int8(x, self.blocks, self.scales)
        if self.group_size:  # elsewhere (another dtype, gradients): w = q * scale + minimum in each group
            q = self.weight_rows().float().view(self.out_features, -1, self.group_size)
            scales, minimums = (t.float()[..., None] for t in self.scales_and_minimums())
            return F.linear(x, (q * scales + minimums).view(self.out_features, -1).to(x.dtype))
        w = self.weight_rows().to(x.dtype)  # elsewhere: as it was
        return F.linear(x, w) if self.scales is None else F.linear(x, w) * self.scales.to(x.dtype)


SCALE_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # matvec_blocked_q4's scale_kind (F32, BF16, F16)


@torch.compiler.assume_constant_result  # asked once while a graph is traced, as kernel_built
def blocked_loops_built(dtype) -> bool:
    """Whether the kernel built the loops for weights of `dtype` (bf16; int8 or uint8 codes) in blocks: a BlockedLinear
    made on another machine falls back to F.linear here instead of calling an op that would refuse."""
    if dtype not in BLOCKED_LOOPS:  # asked once: eager decoding asks at every product
        BLOCKED_LOOPS[dtype] = kernel_built() and (torch.ops.speed.multiplies_int8_blocks() if dtype in INTEGER_CODES
                                                   else torch.ops.speed.multiplies_bf16())
    return BLOCKED_LOOPS[dtype]


BLOCKED_LOOPS = {}  # dtype -> whether the kernel has its blocked loops (blocked_loops_built)
INTEGER_CODES = (torch.int8, torch.uint8)  # int8 and 4-bit codes (two a byte): both multiplied by AVX-512 VNNI


def blocks_apply(dtype=torch.bfloat16) -> bool:
    """Whether block_weights lays weights of `dtype` out here: the kernel's loops for them built (bf16: the CPU
    multiplies bf16; with AMX, batched rows multiply the blocks by tiles, tile_blocks_bf16; int8 and 4-bit (uint8):
    the kernel's VNNI loops)."""
    return blocked_loops_built(dtype if dtype in INTEGER_CODES else torch.bfloat16)


def block_weights(model, tied_too=False):
    """Lay out, in place, where blocks_apply(its dtype), every bf16 Linear without a bias (nn.Linear or
    StreamingLinear, joined or not) whose rows are a multiple of 16 and columns even, and every int8 layer that
    allows it (int8_rows_in_blocks: quantize.Int8Linear) of an fp32 or bf16 model (the op's x dtypes) whose rows
    are a multiple of 16 and columns of 32, and every 4-bit one (int4_rows_in_blocks: quantize.Int4Linear) of such
    a model whose rows are a multiple of 16 and groups a multiple of 32, as a BlockedLinear. A weight that another
    module also holds (a head tied to the embedding) stays as it is, unless tied_too: then that module gets a copy in
    blocks (the weight's bytes again: 56 MB for SmolLM2's head in bf16), which batched rows multiply faster than the
    row-major one (a SmolLM2 step of 16 rows at 2 threads 1.08x, docs/bench.md "A tied head's copy in blocks"). Other kinds
    stay (adapters). Decoding only: call it after quantizing and fuse_projections. Returns model."""
    holders = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        holders[id(p)] = holders.get(id(p), 0) + 1
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            w, scales = getattr(child, "weight", None), getattr(child, "scales", None)
            if (type(child) in (nn.Linear, StreamingLinear) and child.bias is None and w.dtype == torch.bfloat16
                    and w.shape[0] % 16 == 0 and w.shape[1] % 2 == 0 and (holders.get(id(w), 0) == 1 or tied_too)
                    and blocks_apply(torch.bfloat16)):
                setattr(module, name, BlockedLinear(w))
            elif (getattr(child, "int8_rows_in_blocks", False) and scales.dtype in (torch.float32, torch.bfloat16)
                    and w.shape[0] % 16 == 0 and w.shape[1] % 32 == 0 and blocks_apply(torch.int8)):
                setattr(module, name, BlockedLinear(w, scales))
            elif (getattr(child, "int4_rows_in_blocks", False) and scales.dtype in (torch.float32, torch.bfloat16)
                    and child.out_features % 16 == 0 and child.group_size % 32 == 0 and blocks_apply(torch.uint8)):
                setattr(module, name, BlockedLinear(child.unpacked_codes(), scales, child.minimums, child.group_size))
    return model


def pack_weights(model):
    """Lay, in place, every CPU parameter and buffer of `model` end to end in one allocation, in the order of its
    modules (about the order a step reads them: the RoPE tables first, a tied head with the embedding), which Linux
    is asked to back with 2 MiB pages (huge_page_bytes). Why: a decoding step streams ~120 weights of 0.3-2 MiB
    each (SmolLM2 int8), each in its own allocation, so each starts a new stream for the prefetcher, and on 4 KiB
    pages each 4 KiB a new TLB entry. Laid end to end, 121 int8 products took 6.91 ms instead of 8.05, on huge
    pages 6.59 (docs/bench.md, "Weights end to end on huge pages"). Tensors keep their objects (tied weights stay
    tied) and values; their storage changes (`.data`), contiguous. The old storage is freed only where nothing
    else holds it (sample.py drops its checkpoint's references first). Decoding only: the tensors are views of one
    storage, which saving any of them would write whole. Call it last, after quantizing, fuse_projections and
    block_weights, before compiling; on a model already packed it does nothing. Returns model."""
    tensors, seen = [], set()
    for module in model.modules():
        for t in list(module._parameters.values()) + list(module._buffers.values()):
            if t is not None and t.device.type == "cpu" and t.numel() and id(t) not in seen:
                seen.add(id(t))
                tensors.append(t)
    if not tensors or (len(tensors) > 1 and len({t.untyped_storage().data_ptr() for t in tensors}) == 1):
        return model  # a model on another device, or packed already (a second copy would hold it twice meanwhile)
    sizes = [-(-t.nbytes // 64) * 64 for t in tensors]  # each starts on a cache line
    arena, at, copied = huge_page_bytes(sum(sizes)), 0, 0
    with torch.no_grad():
        for t, size in zip(tensors, sizes):
            home = arena[at:at + t.nbytes].view(t.dtype).view(t.shape)
            home.copy_(t)
            t.data = home  # the old storage is freed here, unless something else holds it
            at, copied = at + size, copied + size
            if copied >= 32 << 20:  # the peak stays within ~32 MiB of the model's size
                release_freed_memory()
                copied = 0
    release_freed_memory()
    return model


def release_freed_memory():
    """Give the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing). Why: tensors freed
    from the heap stay in the process's resident memory; packing SmolLM2 in bf16 left it at 1014 MiB from 809
    without this, at 559 with it (scratch, the Zen 4)."""
    trim = getattr(LIBC, "malloc_trim", None)  # None off Linux (LIBC None) and on a libc without it (musl)
    if trim is not None:
        trim(0)


def huge_page_bytes(n):
    """n bytes (uint8) starting on a 2 MiB boundary, advised to Linux as huge pages (madvise MADV_HUGEPAGE, which
    a THP setting of `madvise`, this VM's, waits for; with `always` it changes nothing) before this code touches
    them (below glibc's mmap threshold the heap may give pages touched before: those stay small); elsewhere the
    same bytes, on whatever pages the system gives."""
    page = 2 << 20
    raw = torch.empty(n + page, dtype=torch.uint8)
    start = -raw.data_ptr() % page
    if LIBC is not None and n:
        LIBC.madvise(ctypes.c_void_p(raw.data_ptr() + start), ctypes.c_size_t(n), MADV_HUGEPAGE)  # failure: small pages
    return raw[start:start + n]


LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None  # madvise, malloc_trim (glibc)
MADV_HUGEPAGE = 14  # linux/mman.h


def compile_decode_step(model, one_call=True):
    """torch.compile of `model.decode_step`, as every decoding script compiles it: the whole step one graph
    (fullgraph), static shapes (one graph per batch size and cache length). Compile after the model is
    final (use_decode_paths, quantization). On a CPU three savings on what surrounds the products (~4-5 ms of
    an 18 ms SmolLM2 token in docs/bench.md's profile; experiments/llamacpp.py: llama.cpp's bf16 lead at 1 thread
    went from 1.12x to 0.98x and 0.93x): inductor's C++ wrapper calls the kernels (instead of Python code), and
    dynamo does not check the model's ~270 parameters and module attributes before every step. That second saving is safe only
    because the step compiled is this model's own copy of decode_step: dynamo keeps graphs per code object,
    and a graph whose module guards are skipped would otherwise run for any model calling that code. Third, no
    size asserts: by default the C++ wrapper checks the sizes and strides of each kernel's inputs and outputs at
    every call (999 checks a SmolLM2 step, each building a std::stringstream for a message it never prints: 3.3%
    of an int4 token by perf; paired in one process 1.10x, 1.00x, 1.04x at 1 thread, 1.09x at 2, a noisy hour:
    docs/bench.md).
    Our ops' shapes come from their Meta kernels, which tests/test_speed_paths.py checks by torch.library.opcheck.
    Last, once a (batch, cache length) has been compiled, its steps call the compiled graph without dynamo
    (DirectStep). And where every projection lies in blocks (block_weights) and one_call, one row's steps run
    the layers in one call of speed::decode_layers instead (LayersInOneCall; the graph serves more rows)."""
    device = next(model.parameters()).device
    if device.type != "cpu":  # the other devices' path as it was: the C++ wrapper has not run on them here
        return torch.compile(model.decode_step, fullgraph=True, dynamic=False)
    shared = type(model).decode_step
    own = types.FunctionType(shared.__code__.replace(), shared.__globals__, shared.__name__, shared.__defaults__,
                             shared.__closure__)
    step = DirectStep(types.MethodType(own, model))
    return LayersInOneCall(model, step) if one_call and layer_weights(model) is not None else step


class DirectStep:
    """A decode step compiled by inductor (C++ wrapper, no size asserts) that skips dynamo once it has compiled. A call
    through dynamo spends 0.4-0.5 ms of a 6-7 ms int8 SmolLM2 token outside the graph (its bytecode gathering the
    graph's ~370 inputs, its cache lookup, entering the compiled region: docs/bench.md, "Steps without dynamo"). The
    first call of each signature (what dynamo would check of the call: shapes, strides, dtypes and devices of token,
    position and cache; grad mode, autocast, threads, default dtype) goes through dynamo, which hands its graph and
    example inputs to `compile`; from them `plan` notes where the call's token, position and cache tensors sit among
    the inputs, the rest being the model's own tensors, taken as they were then. Later calls of that signature fill
    those slots and call the compiled graph directly. So the model must be final when compile_decode_step is called,
    as skipping the module guards already asks: a tensor changed in place is seen, one replaced (a new Parameter)
    is not. A signature whose graph dynamo had compiled before (step.dynamo called directly) stays with dynamo."""

    def __init__(self, step):
        guards = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        self.dynamo = torch.compile(step, fullgraph=True, dynamic=False, backend=self.compile, options=guards)
        self.plans, self.compiled = {}, None
        self.direct_calls = 0  # steps that skipped dynamo (tests count them)

    def compile(self, graph, example_inputs):
        from torch._inductor.compile_fx import compile_fx
        fn = compile_fx(graph, example_inputs, config_patches={"cpp_wrapper": True, "size_asserts": False})
        outputs = next(n for n in graph.graph.nodes if n.op == "output").args[0]
        self.compiled = (fn, list(example_inputs), len(outputs))
        return fn

    @staticmethod
    def signature(token, input_pos, cache):
        """What dynamo would check of a call (graphs are compiled for static shapes and these global settings); of
        the cache, its layers and one key and one value tensor (model.KVCache makes them all alike)"""
        tensors = [token, input_pos, *(next(iter(held.values())) for held in (cache.k, cache.v) if held)]
        return (tuple(cache.k), tuple(cache.v), *((t.shape, t.stride(), t.dtype, t.device) for t in tensors),
                torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), torch.get_num_threads(),
                torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled())

    @staticmethod
    def plan(compiled, token, input_pos, cache):
        """(fn, the inputs with the call's slots None, [(slot, kind, layer)]), or None where the graph does not take
        the token and the position as one input each or does not return the logits alone"""
        fn, inputs, n_outputs = compiled
        cache_tensors = {id(t): (kind, layer) for kind, held in (("k", cache.k), ("v", cache.v))
                         for layer, t in held.items()}
        calls = {id(token): ("token", None), id(input_pos): ("position", None), **cache_tensors}
        slots = [(i, *calls[id(t)]) for i, t in enumerate(inputs) if id(t) in calls]
        template = [None if id(t) in calls else t for t in inputs]
        kinds = [kind for _, kind, _ in slots]
        return (fn, template, slots) if n_outputs == 1 and kinds.count("token") == kinds.count("position") == 1 else None

    def __call__(self, token, input_pos, cache):
        key = self.signature(token, input_pos, cache)
        plan = self.plans.get(key)
        if plan is None:
            self.compiled = None
            logits = self.dynamo(token, input_pos, cache)
            if self.compiled is not None:  # dynamo compiled for this signature (not: it had a graph already)
                self.plans[key] = self.plan(self.compiled, token, input_pos, cache)
                self.compiled = None  # it holds this call's token, position and cache
            return logits
        fn, template, slots = plan
        args = list(template)
        for i, kind, layer in slots:
            args[i] = token if kind == "token" else input_pos if kind == "position" else getattr(cache, kind)[layer]
        self.direct_calls += 1
        return fn(*args)[0]


# -----------------------------------------------------------------------------
# a step's layers in one call


def layer_weights(model):
    """speed::decode_layers' weights of `model` (10 a layer: the input norm, the first product's blocks and scales, o's,
    the post-attention norm, gate_up's, down's), its head's (the final norm, the head's blocks and scales; none where
    the head is not in blocks: a tied one at one row) and the 4-bit group size; or None where the op cannot serve the
    model: the kernel without its loops, a projection that is not a BlockedLinear (joined: fuse_projections, then
    block_weights), kinds or group sizes that differ, a K/V blend, a dtype other than fp32 or bf16, a head dimension
    or MLP width not a multiple of 16. A layer's first product: an owner's q, k and v joined, a K/V consumer's q, an
    attention sharer's v."""
    c, dtype = model.config, model.embed_tokens.weight.dtype
    if (not (kernel_built() and torch.ops.speed.multiplies_layers()) or model.kv_blend or c.head_dim % 16
            or c.intermediate_size % 16 or dtype not in (torch.float32, torch.bfloat16)):
        return None
    weights, kinds = [], set()
    for i, block in enumerate(model.layers):
        attn, mlp = block.self_attn, block.mlp
        first = "v_proj" if c.attn_source[i] != i else "qkv_proj" if c.kv_source[i] == i else "q_proj"
        products = [getattr(attn, first, None), attn.o_proj, getattr(mlp, "gate_up_proj", None), mlp.down_proj]
        if any(type(p) is not BlockedLinear for p in products):
            return None
        kinds |= {(p.blocks.dtype, p.group_size, p.scale_dtype) for p in products}
        weights += [block.input_layernorm.weight, *op_weights(products[0]), *op_weights(products[1]),
                    block.post_attention_layernorm.weight, *op_weights(products[2]), *op_weights(products[3])]
    head, group = model.lm_head, kinds.pop()[1] if len(kinds) == 1 else None
    in_blocks = type(head) is BlockedLinear and head.group_size in (0, group)
    return None if group is None else (weights, [model.norm.weight, *op_weights(head)] if in_blocks else [], group)


def op_weights(product):
    """A BlockedLinear's blocks and scales as speed::decode_layers takes them: a 4-bit layer's scales (inline in its
    blocks) a 0-element tensor of their dtype, a bf16 layer's a 0-element fp32 one"""
    none = torch.empty(0, dtype=product.scale_dtype or torch.float32)
    return [product.blocks, none if product.scales is None else product.scales]


class LayersInOneCall:
    """A decode step whose layers (and the head, where it lies in blocks) run, for one row, in one call of
    speed::decode_layers (speed_kernels.cpp: why); the token's embedding, and a head not in blocks with the final
    norm, as the model's own modules. More rows, gradients wanted, or a model the op cannot serve (layer_weights
    None) go to `other` (the compiled step). The model must be final, as for DirectStep: the op reads the tensors
    layer_weights took here."""

    def __init__(self, model, other):
        self.model, self.other = model, other
        self.weights = layer_weights(model)
        self.rope = (model.rope_cos.float(), model.rope_sin.float())  # a bf16 model's tables are bf16
        self.none = torch.empty(0)  # the op's cache for a layer that computes no keys (or values): not read
        self.maps = (list(model.config.kv_source), list(model.config.attn_source))
        self.one_call_steps = 0  # steps that took the op (tests count them)

    def __call__(self, token, input_pos, cache):
        if self.weights is None or token.shape[0] != 1 or torch.is_grad_enabled():
            return self.other(token, input_pos, cache)
        m, c = self.model, self.model.config
        caches = [t for i in range(c.n_layer) for t in (cache.k.get(i, self.none), cache.v.get(i, self.none))]
        pos, (weights, head, group) = int(input_pos), self.weights
        out = torch.ops.speed.decode_layers(m.embed_tokens(token), weights, caches, *self.maps, self.rope[0][pos],
                                            self.rope[1][pos], pos, c.n_head, c.n_kv_head, c.norm_eps, group, head)
        self.one_call_steps += 1
        return (out if head else m.lm_head(m.norm(out)))[:, -1, :]


# -----------------------------------------------------------------------------
# frozen models under autocast


def frozen_linears(model):
    """The nn.Linear modules (StreamingLinear included) whose weight does not train and is not the tied
    embedding's, the head sharing the embedding's weight: its lookups are not autocast, so it stays as it is."""
    tied = model.embed_tokens.weight if hasattr(model, "embed_tokens") else None
    return [m for m in model.modules()
            if isinstance(m, nn.Linear) and not m.weight.requires_grad and m.weight is not tied]


def cast_frozen_linears(model, dtype) -> list:
    """The frozen linears' weights stored in dtype (bf16) from now on; returns [(module, its former weight)].
    Autocast at that dtype casts every fp32 weight at every forward (~80 ms of a 512-token SmolLM2 forward on
    the 2-core Xeon: 106 M weights read in fp32, written in bf16); cast once here, the products are the very
    same (autocast's cast is this .to). float32: nothing changes. Only weights that do not train
    (requires_grad False: the caller freezes the model) are touched, so an optimizer never meets a bf16
    master weight. For a frozen model kept under autocast: a teacher."""
    saved = [(m, m.weight.data) for m in frozen_linears(model)] if dtype != torch.float32 else []
    for m, w in saved:
        m.weight.data = w.to(dtype)
    return saved


@contextlib.contextmanager
def linears_in(model, dtype):
    """cast_frozen_linears for the block, the former weights back at its end (both kept meanwhile): for a model
    used under autocast and then in float32 (evaluate.py's held-out sets, then its chat) or saved."""
    saved = cast_frozen_linears(model, dtype)
    try:
        yield model
    finally:
        for m, w in saved:
            m.weight.data = w


# -----------------------------------------------------------------------------
# the training loss

LOSS_CHUNK_ELEMENTS = 2 ** 24  # fp32 logits the loss holds at once: 64 MiB; fewer go through F.cross_entropy


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits h @ weight^T against targets (-1: no target), computed a chunk
    of rows at a time. The gradients (softmax - one-hot, times h or weight) are computed in the same
    pass, chunk by chunk, so neither the full logits nor their softmax are ever kept, and nothing is
    recomputed: the matmul FLOPs are those of the plain loss."""

    @staticmethod
    def forward(ctx, h, weight, targets, need_grad: bool):
        n = (targets != -1).sum().clamp(min=1)
        rows = max(1, LOSS_CHUNK_ELEMENTS // weight.shape[0])
        if torch.is_autocast_enabled(h.device.type):  # cast the weight once, not once per chunk and product
            weight = weight.to(torch.get_autocast_dtype(h.device.type))
        loss, grad_h, grad_w = 0.0, torch.empty_like(h) if need_grad else None, None
        for s in range(0, h.shape[0], rows):
            hc, t = h[s:s + rows].to(weight.dtype), targets[s:s + rows]
            logits = (hc @ weight.t()).float()
            valid = t != -1
            t = t.clamp(min=0)
            loss = loss + ((logits.logsumexp(dim=-1) - logits.gather(1, t[:, None]).squeeze(1)) * valid).sum()
            if need_grad:
                g = logits.softmax(dim=-1)
                g[torch.arange(len(t), device=t.device), t] -= 1
                g = g.mul_(valid[:, None] / n).to(weight.dtype)
                grad_h[s:s + rows] = g @ weight
                part = (g.t() @ hc).float()
                grad_w = part if grad_w is None else grad_w.add_(part)
        ctx.save_for_backward(grad_h, grad_w)
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None


def chunked_cross_entropy(h, weight, targets):
    """F.cross_entropy(h @ weight^T, targets, ignore_index=-1) in value and gradient; above
    LOSS_CHUNK_ELEMENTS logits, without ever holding them all (ChunkedCrossEntropy)."""
    if not weight.is_floating_point():
        raise ValueError(f"the LM head's weight is {weight.dtype}: a quantized model (quantize.py) is for decoding; "
                         "compute a loss from its logits, model(idx)[0]")
    if h.shape[0] * weight.shape[0] <= LOSS_CHUNK_ELEMENTS:  # small enough: unchunked is faster (docs/bench.md)
        return F.cross_entropy((h @ weight.t()).float(), targets, ignore_index=-1)
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return ChunkedCrossEntropy.apply(h, weight, targets, need_grad)
