"""
ECHO-LLaMA: a Llama whose layers may reuse the keys and values, or the attention pattern, of an
earlier layer.

Everything about the model lives in this file: the config, the Llama blocks (RMSNorm, rotary
embeddings, grouped-query attention, SwiGLU), the two sharing maps, the owners-only KV cache used by
`generate`, and the FLOP accounting behind MFU.

Who takes what from where (one entry per layer i, j <= i, both maps may be used in one model):

    kv_source[i] = j    (ECHO-LLaMA) layer i attends with its own queries over the keys and values
                        that layer j computed: softmax(q_i k_j^T / sqrt(d)) v_j. Layer j is an *owner*,
                        layer i a *consumer*, with no K/V projections at all.
    attn_source[i] = j  (EchoAtt) layer i attends with layer j's attention pattern over its own values:
                        softmax(q_j k_j^T / sqrt(d)) v_i, k_j being the keys layer j attends with (its
                        own, or its K/V owner's). Layer i has no Q or K projections.

The cache stores K and V of the owners and only V of the attention sharers, so a model with half its
layers sharing K/V caches half the K/V of the dense model.
"""

import inspect
import math
from dataclasses import dataclass, asdict
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# the sharing maps: parsing and validation


def parse_kv_source(spec, n_layer: int, name="kv_source") -> tuple:
    """Turn a sharing map (kv_source or attn_source) preset or list into a validated tuple of ints.

    Presets (strings, so train.py can take them on the command line):
      dense          every layer owns its K/V
      cla:N          groups of N adjacent layers share the first one's K/V (Cross-Layer Attention)
      upper:K        the top K layers reuse the K/V of the last owner below them
      upper:half     the same with K = n_layer // 2
      0,0,2,2,4,...  an explicit list
    """
    if spec is None:
        return tuple(range(n_layer))
    if isinstance(spec, str):
        spec = spec.strip().lower()
        if spec == "dense":
            return tuple(range(n_layer))
        if spec.startswith("cla:"):
            group = _preset_int(name, spec, spec[4:], low=1)
            return tuple(i - i % group for i in range(n_layer))
        if spec.startswith("upper:"):
            arg = spec[6:]
            k = n_layer // 2 if arg == "half" else _preset_int(name, spec, arg, low=0)
            if k >= n_layer:
                raise ValueError(f"{name} preset {spec!r}: at most n_layer-1={n_layer - 1} layers "
                                 "can share, the lowest layer must compute its own")
            owner = n_layer - k - 1
            return tuple(i if i <= owner else owner for i in range(n_layer))
        parts = spec.replace("[", "").replace("]", "").split(",")
        if len(parts) > 1 and any(not s.strip() for s in parts):  # "0,,2" or "0,0,": a typo, not a shorter map
            raise ValueError(f"kv_source {spec!r} has an empty entry: give one source layer per layer, like 0,0,2,2")
        try:
            spec = [int(s) for s in parts]
        except ValueError:
            raise ValueError(f"unknown {name} {spec!r}: use 'dense', 'cla:N', 'upper:K', "
                             "'upper:half' or a comma-separated list of layer indices like 0,0,2,2") from None
    return validate_kv_source(tuple(int(j) for j in spec), n_layer, name)


def _preset_int(name, spec, text, low):
    if not text.isdigit() or int(text) < low:
        raise ValueError(f"{name} preset {spec!r}: expected an integer >= {low} after the colon")
    return int(text)


def validate_kv_source(kv_source: tuple, n_layer: int, name="kv_source") -> tuple:
    """A map must have one entry per layer, point at itself or an earlier layer, and not chain."""
    if len(kv_source) != n_layer:
        raise ValueError(f"{name} has {len(kv_source)} entries but the model has n_layer={n_layer}: "
                         "give one source layer per layer")
    for i, j in enumerate(kv_source):
        if not 0 <= j < n_layer:
            raise ValueError(f"{name}[{i}] = {j} is out of range: must be a layer index in 0..{i}")
        if j > i:
            raise ValueError(f"{name}[{i}] = {j} points forward: a layer can only reuse what itself or an "
                             f"earlier layer (0..{i}) computed")
        if kv_source[j] != j:
            raise ValueError(f"{name}[{i}] = {j} but layer {j} itself reuses layer {kv_source[j]}'s: chains are "
                             f"not allowed, point layer {i} at layer {kv_source[j]} directly")
    return kv_source


def check_maps(kv_source: tuple, attn_source: tuple):
    """What a layer cannot be under both maps at once: each error names the layer."""
    for i, (owner, source) in enumerate(zip(kv_source, attn_source)):
        if source != i and owner != i:
            raise ValueError(f"layer {i}: kv_source[{i}] = {owner} and attn_source[{i}] = {source}: a layer "
                             "reuses either an earlier layer's K/V or its attention pattern, not both")
        users = [u for u, o in enumerate(kv_source) if o == i and u != i]
        if source != i and users:
            raise ValueError(f"layer {i} reuses layer {source}'s attention pattern, so it computes no keys, but "
                             f"layers {users} take their K/V from it: point them at another owner")


# -----------------------------------------------------------------------------
# config


@dataclass
class LlamaConfig:
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int = 2
    n_embd: int = 384
    intermediate_size: int = 1024
    vocab_size: int = 256
    block_size: int = 256
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # Llama 3 style: {"rope_type": "llama3", "factor": ..., ...}
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    kv_source: Union[None, str, tuple, list] = None  # a preset or list; a tuple of ints after init
    attn_source: Union[None, str, tuple, list] = None  # the same syntax; EchoAtt's attention sharing

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size", "vocab_size", "block_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                             "pick n_head so that n_embd / n_head (the head size) is an integer")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}: "
                             "each K/V head must serve a whole group of query heads")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head size n_embd/n_head={self.n_embd // self.n_head} must be even for rotary embeddings")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) != "llama3":
            raise ValueError(f"rope_scaling {self.rope_scaling!r} is not supported: only rope_type 'llama3' (or none)")
        self.kv_source = parse_kv_source(self.kv_source, self.n_layer)
        self.attn_source = parse_kv_source(self.attn_source, self.n_layer, "attn_source")
        check_maps(self.kv_source, self.attn_source)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def owners(self) -> list:
        """Layers that compute values (and, unless they share attention, keys)."""
        return [i for i, j in enumerate(self.kv_source) if i == j]

    @property
    def key_layers(self) -> list:
        """Layers that compute keys: owners that do not share an attention pattern."""
        return [i for i in self.owners if self.attn_source[i] == i]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kv_source"], d["attn_source"] = list(self.kv_source), list(self.attn_source)
        return d


# -----------------------------------------------------------------------------
# building blocks


class Linear(nn.Linear):
    """nn.Linear (no bias) with a batch-1 path for compiled decoding on CPU.

    One row times a weight matrix is a matrix-vector product: it reads every weight once for two
    FLOPs, so its speed is the rate at which the weights stream in from memory. On the CPU measured
    here BLAS reads them for one row at 7-19 GB/s of ~50-80 (docs/bench.md); the same product written
    as multiply-and-sum is compiled by inductor into one vectorised loop that streams them at the
    bandwidth. Eager code keeps F.linear (the product form would materialise a
    weight-sized temporary), as does every shape with more than one row, and the GPU."""

    def forward(self, x):
        if torch.compiler.is_compiling() and x.device.type == "cpu" and x.numel() == x.shape[-1]:
            return (x.unsqueeze(-2) * self.weight).sum(-1)
        return F.linear(x, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 as Hugging Face does, so bf16 runs match and do not underflow
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    d = config.head_dim
    # fp32 throughout, exactly as Hugging Face computes it, so converted models match to the last bit
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = config.rope_scaling
    if s is not None:  # Llama 3.1: slow down the low frequencies, keep the high ones, blend between
        factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen - low) / (high - low)).clamp(0, 1)
        scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor,
                               torch.where(wavelen < old_len / high, inv_freq, scaled))
    return inv_freq


def rope_tables(config: LlamaConfig):
    """cos and sin of every position's angles, (block_size, head_dim)."""
    positions = torch.arange(config.block_size, dtype=torch.float32)
    freqs = torch.outer(positions, rope_inv_freq(config))
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """Rotate-half convention (as in Hugging Face): pairs are (x[i], x[i + d/2])."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Grouped-query attention. A K/V consumer has no k_proj/v_proj; an attention sharer has no
    q_proj/k_proj (it keeps v_proj): the layers they reuse hand them what those would compute."""

    def __init__(self, config: LlamaConfig, owns_kv: bool, owns_qk: bool = True):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        kv_dim = config.n_kv_head * self.head_dim
        if owns_qk:
            self.q_proj = Linear(config.n_embd, config.n_head * self.head_dim, bias=False)
        if owns_kv and owns_qk:
            self.k_proj = Linear(config.n_embd, kv_dim, bias=False)
        if owns_kv:
            self.v_proj = Linear(config.n_embd, kv_dim, bias=False)
        self.o_proj = Linear(config.n_head * self.head_dim, config.n_embd, bias=False)

    @property
    def owns_kv(self):
        return hasattr(self, "v_proj")

    def _heads(self, t, n):
        B, T, _ = t.shape
        return t.view(B, T, n, self.head_dim).transpose(1, 2)

    def compute_kv(self, x, cos, sin):
        """(keys after RoPE, or None for an attention sharer, values), each (B, n_kv_head, T, head_dim)."""
        v = self._heads(self.v_proj(x), self.n_kv_head)
        if not hasattr(self, "k_proj"):
            return None, v
        return apply_rope(self._heads(self.k_proj(x), self.n_kv_head), cos, sin), v

    def query(self, x, cos, sin):
        return apply_rope(self._heads(self.q_proj(x), self.n_head), cos, sin)

    def forward(self, x, k, v, cos, sin, mask, q=None):
        """Attend over k, v (post-RoPE, (B, n_kv_head, S, head_dim)), whoever computed them, with
        queries q (an attention source's) or this layer's own.

        mask is None for causal attention over the T new positions (training, prefill) and a
        boolean (T, S) mask when decoding against a longer cache.
        """
        B, T, C = x.shape
        q = self.query(x, cos, sin) if q is None else q
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_head != self.n_kv_head)
        else:
            y = decode_attention(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


def decode_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d)) v of one new position per sequence over the cache: q (B, H, 1, hd),
    k and v (B, H_kv, S, hd), mask (1, S). Written out rather than SDPA's because for one query it is
    two small products per head, which the CPU flash kernel took 70 us a call to do in bf16 (30% of a
    decode step, bench.py --profile). Compiled on CPU, as multiply-and-sum, inductor fuses it into
    passes over the cache; eager, batched products avoid a temporary the size of the cache."""
    B, H, _, hd = q.shape
    q = q.reshape(B, k.shape[1], -1, hd)  # (B, H_kv, g, hd): a group's query heads share one K/V head
    fused = torch.compiler.is_compiling() and q.device.type == "cpu"
    scores = (q.unsqueeze(-2) * k.unsqueeze(2)).sum(-1) if fused else q @ k.transpose(-1, -2)
    probs = (scores.float() / math.sqrt(hd)).masked_fill(~mask, float("-inf")).softmax(dim=-1).to(v.dtype)
    y = (probs.unsqueeze(-1) * v.unsqueeze(2)).sum(-2) if fused else probs @ v
    return y.reshape(B, H, 1, hd)


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig, owns_kv: bool, owns_qk: bool = True):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = Attention(config, owns_kv, owns_qk)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, i: int, p: "Pass"):
        """Layer i on the residual stream x; what it shares (K/V, queries and keys) goes through p.
        Only x goes in and out as a tensor argument, so a wrapper's hooks (FSDP2's per-block gather and
        reduce-scatter) see the block's real input and output and nothing of the hand-over."""
        h = self.input_layernorm(x)
        attn, c = self.self_attn, p.config
        if c.kv_source[i] == i:
            p.kv[i] = p.own_kv(i, attn, h)
        if c.attn_source[i] == i:  # own pattern: own queries over its (or its owner's) keys
            q, (k, v) = attn.query(h, p.cos, p.sin), p.kv[c.kv_source[i]]
            p.qk[i] = (q, k)
        else:  # EchoAtt: layer j's queries and keys, this layer's values
            (q, k), v = p.qk[c.attn_source[i]], p.kv[i][1]
        x = x + attn(h, k, v, p.cos, p.sin, p.mask, q=q)
        return x + self.mlp(self.post_attention_layernorm(x))


class Pass:
    """What the layers of one forward pass hand each other: owner -> (k, v) it hands on, layer -> its
    (q, k), owner -> its new K/V only (for a blend), and the cache they go through. A plain object,
    not a container of tensors, so that wrappers pass it through untouched."""

    def __init__(self, config, cos, sin, mask, cache, input_pos, kv_blend):
        self.config, self.cos, self.sin, self.mask = config, cos, sin, mask
        self.cache, self.input_pos, self.kv_blend = cache, input_pos, kv_blend
        self.kv, self.qk, self.fresh = {}, {}, {}

    def own_kv(self, i, attn, h):
        """The K/V layer i computes (blended while adapt.py switches it over), through the cache."""
        k, v = attn.compute_kv(h, self.cos, self.sin)
        if i in self.kv_blend:
            source, w = self.kv_blend[i]
            k, v = k + w * (self.fresh[source][0] - k), v + w * (self.fresh[source][1] - v)
        self.fresh[i] = (k, v)
        if self.cache is not None:
            k_all, v_all = self.cache.update(i, self.input_pos, k, v)
            if self.mask is not None:  # decoding: attend over the whole cache
                k, v = k_all, v_all
        return k, v


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


# -----------------------------------------------------------------------------
# KV cache


class KVCache:
    """Static, preallocated cache, written in place while decoding: keys of the layers that compute
    keys, values of the layers that compute values (K/V owners, attention sharers), nothing else.

    One tensor per layer, keyed by layer index: writing into a slice of one big tensor made
    torch.compile copy the whole cache at every write (3x slower compiled decoding, bench.py)."""

    def __init__(self, key_layers, value_layers, batch_size, n_kv_head, max_len, head_dim, dtype, device):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in key_layers}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in value_layers}
        self.max_len = max_len

    def update(self, layer, input_pos, k, v):
        """Write new positions of `layer` (k None for a layer without keys); return its whole cache."""
        if k is not None:
            self.k[layer].index_copy_(2, input_pos, k)
        self.v[layer].index_copy_(2, input_pos, v)
        return self.k.get(layer), self.v[layer]

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in [*self.k.values(), *self.v.values()])


# -----------------------------------------------------------------------------
# the model


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config, owns_kv=config.kv_source[i] == i, owns_qk=config.attn_source[i] == i)
                                    for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # cos/sin for every position are buffers: not learned, not saved, moved with .to(device)
        cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # the one hook layer-wise adaptation (adapt.py) needs: {layer: (source, weight)} makes an owner
        # attend over (1 - weight) * its own K/V + weight * source's while it is being switched over
        self.kv_blend = {}
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, exclude_embedding=False):
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if exclude_embedding:
            n -= self.embed_tokens.weight.numel()
        return n

    def forward(self, idx, targets=None, cache: Optional[KVCache] = None, input_pos=None):
        """(logits for every position, None), or with `targets` (None, the mean cross-entropy against
        them; -1 marks a position without a target).

        Without a cache, idx holds positions 0..T-1. With a cache, a call with T > 1 tokens is a
        prefill from position 0 and a call with one token decodes at position input_pos; owners
        write their new K/V into the cache and everyone attends over it.
        """
        B, T = idx.shape
        if input_pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than block_size={self.config.block_size}")
            input_pos = torch.arange(T, device=idx.device)
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        mask = None  # causal over the T new positions
        if cache is not None and T == 1:
            mask = torch.arange(cache.max_len, device=idx.device) <= input_pos.view(-1, 1)

        x = self.embed_tokens(idx)
        p = Pass(self.config, cos, sin, mask, cache, input_pos, self.kv_blend)
        for i, layer in enumerate(self.layers):
            x = layer(x, i, p)
        h = self.norm(x)
        if targets is None:
            return self.lm_head(h), None
        # training and evaluation need the loss, not the (B, T, vocab) fp32 logits: 200 MB at a 49k vocab
        return None, chunked_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.reshape(-1))

    # -------------------------------------------------------------------------
    # generation: prefill, one decode step, and the loop (compiling and timing belong to the caller)

    def new_cache(self, batch_size, max_len=None, dtype=None) -> KVCache:
        c = self.config
        return KVCache(c.key_layers, c.owners, batch_size, c.n_kv_head, max_len or c.block_size, c.head_dim,
                       dtype or self.embed_tokens.weight.dtype, self.embed_tokens.weight.device)

    def prefill(self, idx, cache):
        """Run the prompt idx (B, T) from position 0, filling the cache; logits of the last position."""
        logits, _ = self(idx, cache=cache, input_pos=torch.arange(idx.shape[1], device=idx.device))
        return logits[:, -1, :]

    def decode_step(self, token, input_pos, cache):
        """One token per sequence (B, 1) at position input_pos (a 1-element tensor): its logits. Static
        shapes throughout, so torch.compile can turn it into one graph."""
        logits, _ = self(token, cache=cache, input_pos=input_pos)
        return logits[:, -1, :]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, eos_id=None, decode_step=None):
        """Continue each row of idx (B, T) by up to max_new_tokens tokens; temperature=0 is greedy.

        A row that produces eos_id stops (later positions hold eos_id), and generation ends when every
        row has stopped. When the context is full, the most recent `keep_when_full` tokens are prefilled
        again from position 0 and decoding goes on over that window, as nanoGPT crops its context.
        decode_step: a replacement for self.decode_step, e.g. torch.compile(model.decode_step); the
        cache always has block_size positions, so a compiled step never sees a new shape."""
        B, T = idx.shape
        window = self.config.block_size
        keep = keep_when_full(window)
        cache = self.new_cache(B, window)
        step = decode_step or self.decode_step
        out = torch.cat([idx, idx.new_zeros(B, max_new_tokens)], dim=1)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        pos = min(T, window)
        logits = self.prefill(idx[:, -pos:], cache)
        for n in range(T, T + max_new_tokens):
            token = sample_token(logits, temperature, top_k)
            if eos_id is not None:
                token = token.masked_fill(done, eos_id)
                done |= token == eos_id
            out[:, n] = token
            if n == T + max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
                return out[:, :n + 1]
            if pos == window:  # full: start over from the most recent tokens
                pos = keep
                logits = self.prefill(out[:, n + 1 - keep:n + 1], cache)
                continue
            logits = step(token.view(B, 1), torch.tensor([pos], device=idx.device), cache)
            pos += 1
        return out

    # -------------------------------------------------------------------------
    # FLOP accounting and optimizer

    def flops_per_token(self, seq_len=None, causal=True) -> dict:
        """Matmul FLOPs per token of one forward pass, by component, plus 'total' and 'train' (x3).

        Counts what this model does: K/V consumers have no K/V projections, attention sharers no Q/K
        projections (but SDPA still computes q k^T for them), and with causal=True the attention over
        a sequence of seq_len covers (seq_len+1)/2 keys on average (flash kernels skip the masked
        half). Elementwise work (norms, RoPE, softmax) is left out, as is usual.
        """
        c = self.config
        T = seq_len or c.block_size
        d, hd = c.n_embd, c.head_dim
        keys = (T + 1) / 2 if causal else T
        n_queries = sum(j == i for i, j in enumerate(c.attn_source))
        parts = {
            "q": n_queries * 2 * d * c.n_head * hd,
            "kv": (len(c.key_layers) + len(c.owners)) * 2 * d * c.n_kv_head * hd,
            "o": c.n_layer * 2 * c.n_head * hd * d,
            "mlp": c.n_layer * 3 * 2 * d * c.intermediate_size,
            "attention": c.n_layer * 2 * 2 * c.n_head * hd * keys,  # q @ k^T and probs @ v
            "head": 2 * d * c.vocab_size,
        }
        parts["total"] = sum(parts.values())
        parts["train"] = 3 * parts["total"]  # backward costs twice the forward
        return parts

    def estimate_mfu(self, tokens_per_s, seq_len=None, peak_flops=None, device_name=None):
        """Model FLOPs utilisation of training: achieved train FLOP/s over the device's peak."""
        if peak_flops is None:
            peak_flops = peak_flops_for(device_name)
        return self.flops_per_token(seq_len)["train"] * tokens_per_s / peak_flops

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]  # matrices decay; norms don't
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        # fused: one kernel for the whole update; on CPU it took 7.8 ms against 19.7 ms (foreach) for 24M parameters
        fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))


def keep_when_full(block_size):
    """How many recent tokens generation keeps when the context is full: three quarters of it, so a
    re-prefill happens every block_size / 4 new tokens."""
    return max(1, block_size - block_size // 4)


def sample_token(logits, temperature=1.0, top_k=None):
    """Pick one token per row of logits (B, vocab)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1).view(-1)


# dense bf16 tensor-core peak FLOP/s per GPU, from the vendors' datasheets (no sparsity)
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM and NVL
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "RTX 4090": 165e12,
}


def peak_flops_for(device_name=None) -> float:
    if device_name is None:
        if not torch.cuda.is_available():
            raise ValueError("no GPU: pass peak_flops explicitly (bench.py measures a CPU's matmul rate)")
        device_name = torch.cuda.get_device_name()
    for key, flops in PEAK_BF16_FLOPS.items():  # most specific names first
        if key.lower() in device_name.lower():
            return flops
    raise ValueError(f"no peak FLOP/s known for device {device_name!r}: pass peak_flops explicitly "
                     f"(known: {', '.join(PEAK_BF16_FLOPS)})")
