"""
LoRA adapters on the model's linear layers, with DyLoRA's dynamic rank, over a frozen base that is a
plain Linear, an int8 Int8Linear (quantize.py) or an NF4Linear (nf4.py): QDyLoRA.

    y = base(x) + (alpha / b) * (x A[:b]^T) B[:, :b]^T        A: (R, in), B: (out, R), b <= R

A starts as peft's (kaiming-uniform), B at zero, so the adapted model is the base model exactly until
the first step. A fixed-rank LoRA is b = R always; a dynamic one draws b for each optimizer step
(RankSampler) and, after one run, works at every b (set_rank, merge_lora(rank=b)).

Dynamic rank, the update rule (DyLoRA, Valipour et al., EACL 2023; QDyLoRA, Rajabzadeh et al., 2024):
  - "nested" (the default): every row of A[:b] and column of B[:, :b] is trained at step b, the
    truncated LoRA of rank b is optimised as it is used; rows above b are not in the forward.
  - "frozen": DyLoRA's frozen mode, only the b-th row and column are trained; the ones below b are in
    the forward but detached, so they get a zero gradient. This is what the DyLoRA layer of the public
    ports that credit DyLoRA's code (kohya-ss sd-scripts networks/dylora.py, LyCORIS modules/dylora.py)
    does, each with one parameter per row.
  Why nested by default: the issue's goal is that ranks 4, 16 and 64 of the one run each come within
  1% of a LoRA trained at that rank; nested training gives every rank <= b the gradient of the rank-b
  loss, while frozen mode trains row 64 in 1/64 of the steps only. And A and B are one tensor each here
  (peft's layout: one merge, one file), so under AdamW a row with a zero gradient still moves by its
  momentum and the weight decay: frozen mode is exact for the gradients, not for the updates (the
  ports keep it exact with one parameter per row). The same holds for the rows above b in either rule.
  Both rules are here (rule=...), for the measurement the issue asks for.

Adapters save alone (save_lora) as a small safetensors file with their settings and a slot for the
base checkpoint's sha256 and kv_source, the "delta" of the adaptation issue.
"""

import json
import math
import os
import sys
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import (SAMPLING_KEYS, assign_state, load_checkpoint, save_checkpoint, strip_prefixes,
                        save_safetensors, weights_sha256)
from configurator import ConfigError, configure, run_script, settings_from
from integrity import tensor_crc
from model import Llama, LlamaConfig
from nf4 import NF4_BLOCK, NF4Linear, frozen_weight_linear, nf4_size_error, quantize_nf4
from quantize import Int8Linear

TARGETS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
RULES = ("nested", "frozen")
BASE_QUANTS = ("none", "int8", "nf4")
LORA_FORMAT = "echo-llama-lora/1"


# -----------------------------------------------------------------------------
# the layer


def int8_weight(base: Int8Linear, dtype) -> torch.Tensor:
    """Int8Linear's weight back in float: each row's int8 codes times its scale."""
    return base.weight.to(dtype) * base.scales.to(dtype)[:, None]


class FrozenInt8Linear(Int8Linear):
    """quantize.py's Int8Linear that a gradient can pass through (to the input: the weight stays frozen).
    torch's int8 kernel has no derivative, so the backward rebuilds the float weight for it."""
    int8_rows_in_blocks = False  # its LoRA layer reads .weight (base_weight), which blocks would not have

    def forward(self, x):
        return frozen_weight_linear(x, lambda t: Int8Linear.forward(self, t), lambda dtype: int8_weight(self, dtype))


def base_weight(base: nn.Module, dtype=torch.float32) -> torch.Tensor:
    """The frozen base's weight as a float (out, in) matrix, whatever form it is stored in."""
    if isinstance(base, NF4Linear):
        return base.dequantize(dtype)
    if isinstance(base, Int8Linear):
        return int8_weight(base, dtype)
    return base.weight.detach().to(dtype)


def base_shape(base: nn.Module) -> tuple:
    """(out, in) of a frozen base of any kind."""
    if isinstance(base, NF4Linear):
        return base.out_features, base.in_features
    return tuple(base.weight.shape)


class LoRALinear(nn.Module):
    """A frozen base linear plus a LoRA of maximal rank R, used at the active rank b (set_rank)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, rule="nested", generator=None):
        super().__init__()
        out_features, in_features = base_shape(base)
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.rule, self.active_rank = rank, float(alpha), rule, rank
        # adapters stay fp32 (autocast computes in bf16) whatever the base holds, on the base's device
        device = next(iter(base.state_dict().values())).device
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=torch.float32, device=device))
        # peft's init (kaiming-uniform with a = sqrt(5), nn.Linear's default): A random, B zero; drawn
        # on the CPU so that a seed gives the same A on every device
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        self.lora_A.data = self.lora_A.data.to(device)

    def base_forward(self, x):
        if type(self.base) is Int8Linear:  # one from quantize_int8: made differentiable in x as FrozenInt8Linear is
            return frozen_weight_linear(x, self.base, lambda dtype: int8_weight(self.base, dtype))
        return self.base(x)

    def adapter_factors(self):
        """A[:b], B[:, :b] as the forward uses them; in frozen mode, while training, everything but the
        b-th row and column is detached (DyLoRA: only the new rank's parameters learn at step b)."""
        b = self.active_rank
        A, B = self.lora_A[:b], self.lora_B[:, :b]
        if self.rule == "frozen" and self.training and b > 1:
            A = torch.cat([A[:b - 1].detach(), A[b - 1:]], dim=0)
            B = torch.cat([B[:, :b - 1].detach(), B[:, b - 1:]], dim=1)
        return A, B

    def forward(self, x):
        A, B = self.adapter_factors()
        # the scale on B (out x b), not on the (tokens x out) product: one pass over the activations less, forward
        # and backward (~0.7 ms a SmolLM2 linear at 1,024 tokens in bf16 on the Xeon, ~2% of a distillation step);
        # the very same numbers where the scale is a power of two (alpha 32 / rank 16)
        delta = F.linear(F.linear(x, A.to(x.dtype)), (B * (self.alpha / self.active_rank)).to(x.dtype))
        return self.base_forward(x) + delta

    def merged_weight(self, rank=None, dtype=torch.float32) -> torch.Tensor:
        """W + (alpha / b) B[:, :b] A[:b], W dequantized for an int8 or NF4 base."""
        b = self.rank if rank is None else rank
        delta = (self.lora_B[:, :b].detach().double() @ self.lora_A[:b].detach().double()) * (self.alpha / b)
        return (base_weight(self.base, torch.float64) + delta).to(dtype)

    def extra_repr(self):
        return f"rank={self.rank}, alpha={self.alpha}, rule={self.rule}, active_rank={self.active_rank}"


# -----------------------------------------------------------------------------
# the rank sampler


class RankSampler:
    """Draws the rank of each optimizer step uniformly from low..high with its own generator, so the
    sequence neither depends on nor disturbs the global RNG, and state_dict/load_state_dict resume it
    exactly."""

    def __init__(self, low: int, high: int, seed: int = 0):
        if not 1 <= low <= high:
            raise ValueError(f"rank range {low}..{high} is empty or below 1")
        self.low, self.high = low, high
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self) -> int:
        return int(torch.randint(self.low, self.high + 1, (1,), generator=self.generator).item())

    def state_dict(self) -> dict:
        return {"low": self.low, "high": self.high, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict):
        self.low, self.high = state["low"], state["high"]
        self.generator.set_state(state["generator"])


# -----------------------------------------------------------------------------
# settings (train.py checks them before it builds anything)


def parse_targets(targets) -> list:
    """'q,o' or ['q', 'o'] -> ['q', 'o'] in TARGETS order; one line for an unknown or empty one."""
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else [str(t) for t in targets]
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise ValueError(f"lora_targets: unknown target {unknown[0] if unknown else '(none)'!r}; "
                         f"choose from {','.join(TARGETS)}")
    return [t for t in TARGETS if t in names]


def parse_ranks(spec, name="lora_eval_ranks") -> list:
    """'1,2,4' or [1, 2, 4] -> [1, 2, 4]."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        return [int(r) for r in items if str(r).strip()]
    except ValueError:
        raise ValueError(f"{name}={spec!r}: give whole numbers separated by commas, like 1,2,4") from None


def target_shapes(config) -> dict:
    """(out, in) of each target's weight for a LlamaConfig, so settings are checked before building."""
    d, q, kv, ff = config.n_embd, config.n_head * config.head_dim, config.n_kv_head * config.head_dim, \
        config.intermediate_size
    return {"q": (q, d), "k": (kv, d), "v": (kv, d), "o": (d, q), "gate": (ff, d), "up": (ff, d), "down": (d, ff)}


def check_lora_settings(config, targets="q,o", layers=None, rank=8, rank_range=None, eval_ranks=None,
                        base_quant="none", rule="nested", block=NF4_BLOCK):
    """Every --lora_* and --base_quant setting against the model's config: a one-line ValueError for
    the first bad one. Returns (targets list, layers list, rank range)."""
    names = parse_targets(targets)
    layer_ids = resolve_layers(layers, config.n_layer)
    shapes = target_shapes(config)
    if rank <= 0:
        raise ValueError(f"lora_rank must be at least 1, got {rank}")
    for t in names:
        out_f, in_f = shapes[t]
        if rank > min(out_f, in_f):
            raise ValueError(f"lora_rank={rank} is above min(in, out) = {min(out_f, in_f)} of the {t} projection "
                             f"({out_f}x{in_f}): a LoRA cannot have more rank than its layer")
    low, high = rank_range if rank_range is not None else (1, rank)
    if not 1 <= low <= high <= rank:
        raise ValueError(f"lora_rank_range {low}..{high} must lie within 1..lora_rank={rank}")
    for r in parse_ranks(eval_ranks) if eval_ranks is not None else []:
        if not 1 <= r <= rank:
            raise ValueError(f"lora_eval_ranks: {r} is outside 1..lora_rank={rank}")
    if rule not in RULES:
        raise ValueError(f"lora_rule={rule!r}: choose from {', '.join(RULES)}")
    if base_quant not in BASE_QUANTS:
        raise ValueError(f"base_quant={base_quant!r}: choose from {', '.join(BASE_QUANTS)}")
    if base_quant == "nf4":
        for t, shape in shapes.items():
            error = nf4_size_error(f"the {t} projection", shape, block)
            if error:
                raise ValueError(error)
    return names, layer_ids, (low, high)


def resolve_layers(layers, n_layer: int) -> list:
    """None -> every layer; '0,2' or [0, 2] -> [0, 2]; one line for a layer the model does not have."""
    if layers is None or layers == "" or layers == "all":
        return list(range(n_layer))
    ids = parse_ranks(layers, "lora_layers")
    bad = [i for i in ids if not 0 <= i < n_layer]
    if bad or not ids:
        raise ValueError(f"lora_layers: layer {bad[0] if bad else '(none)'} is not in 0..{n_layer - 1}")
    return sorted(set(ids))


# -----------------------------------------------------------------------------
# the model


def quantize_base(model, kind="none", block=NF4_BLOCK, double_quant=True):
    """Freeze the layers' linears in `kind` form (none | int8 | nf4) before apply_lora. The embedding
    and the LM head stay as they are, for both: the loss needs a float head, a tied one is the table."""
    if kind not in BASE_QUANTS:
        raise ValueError(f"base_quant={kind!r}: choose from {', '.join(BASE_QUANTS)}")
    if kind == "nf4":
        quantize_nf4(model, block, double_quant)
    elif kind == "int8":
        for i, layer in enumerate(model.layers):
            for module in list(layer.modules()):
                for attr, child in list(module.named_children()):
                    if isinstance(child, nn.Linear):
                        setattr(module, attr, FrozenInt8Linear(child.weight))
    return model


def _adapter_slots(model, names, layer_ids, explicit_layers: bool) -> list:
    """(qualified name, parent, attribute) of each linear to adapt. A K/V consumer has no k/v_proj and
    an attention sharer no q/k_proj: with every layer asked for, those are skipped; with layers named,
    asking for one that is not there is refused."""
    slots = []
    for i in layer_ids:
        for t in names:
            parent_path, attr = TARGETS[t].split(".")
            parent = getattr(model.layers[i], parent_path)
            if not hasattr(parent, attr):
                if explicit_layers:
                    raise ValueError(f"lora_targets: layer {i} has no {attr} (it reuses another layer's, see "
                                     f"kv_source/attn_source); leave {t} out or that layer out of lora_layers")
                continue
            slots.append((f"layers.{i}.{TARGETS[t]}", parent, attr))
    return slots


def apply_lora(model, targets="q,o", layers=None, rank=8, alpha=16.0, dynamic=False, rank_range=None,
               rule="nested", seed=None) -> "OrderedDict[str, LoRALinear]":
    """Wrap the chosen linears of the chosen layers (None: all) in LoRALinear, in place, and freeze
    everything else. Returns {qualified name: adapter}; the settings go to model.lora_settings for
    save_lora. seed: a generator of its own for A's init (None: the global RNG, as peft)."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters: merge_lora or load them, not apply twice")
    names, layer_ids, (low, high) = check_lora_settings(model.config, targets, layers, rank, rank_range, rule=rule)
    slots = _adapter_slots(model, names, layer_ids, explicit_layers=layers not in (None, "", "all"))
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    model.requires_grad_(False)
    adapters = OrderedDict()
    for name, parent, attr in slots:
        adapter = LoRALinear(getattr(parent, attr), rank, alpha, rule, generator)
        setattr(parent, attr, adapter)
        adapters[name] = adapter
    model.lora_settings = dict(targets=",".join(names), layers=layer_ids, rank=rank, alpha=float(alpha),
                               dynamic=bool(dynamic), rank_range=[low, high], rule=rule)
    return adapters


def lora_adapters(model) -> "OrderedDict[str, LoRALinear]":
    return OrderedDict((name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear))


def rank_sampler(model, seed=0) -> RankSampler:
    """The sampler of a dynamic LoRA's ranks over its rank_range."""
    low, high = model.lora_settings["rank_range"]
    return RankSampler(low, high, seed)


def set_rank(model, rank: int):
    """Use every adapter at rank b from now on (a step's sampled rank, or an evaluation rank)."""
    for name, adapter in lora_adapters(model).items():
        if not 1 <= rank <= adapter.rank:
            raise ValueError(f"rank {rank} is outside 1..{adapter.rank} (the adapters' rank)")
        adapter.active_rank = rank


def _plain_linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


def merge_lora(model, rank=None, dtype=None):
    """Turn the model, in place, into an ordinary one: each adapter's linear becomes a Linear of
    W + (alpha / b) B[:, :b] A[:b] (b: `rank`, default the full one), and an int8 or NF4 base that no
    adapter covers is dequantized too, so sample.py, export and bench see a plain model. dtype: that of
    a float base (float32 for a quantized one) unless given."""
    for name, adapter in lora_adapters(model).items():
        if rank is not None and not 1 <= rank <= adapter.rank:
            raise ValueError(f"merge rank {rank} is outside 1..{adapter.rank} (the adapters' rank)")
    for module in list(model.modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                base = child.base
                want = dtype or (base.weight.dtype if isinstance(base, nn.Linear) else torch.float32)
                setattr(module, attr, _plain_linear(child.merged_weight(rank, want)))
            elif isinstance(child, (NF4Linear, Int8Linear)):
                setattr(module, attr, _plain_linear(base_weight(child, dtype or torch.float32)))
    model.requires_grad_(True)
    if hasattr(model, "lora_settings"):
        del model.lora_settings
    return model


# -----------------------------------------------------------------------------
# saving the adapters alone


def lora_state_dict(model) -> dict:
    """{'layers.0.self_attn.q_proj.lora_A': A, ...}: the adapters and nothing of the base."""
    state = {}
    for name, adapter in lora_adapters(model).items():
        state[f"{name}.lora_A"] = adapter.lora_A.detach()
        state[f"{name}.lora_B"] = adapter.lora_B.detach()
    return state


def base_quant_of(model) -> str:
    """The form the frozen base's linears are in: 'nf4', 'int8' or 'none'."""
    kinds = {type(m) for m in model.modules()}
    return "nf4" if NF4Linear in kinds else "int8" if any(issubclass(k, Int8Linear) for k in kinds) else "none"


def lora_metadata(model, base_sha256="", kv_source=None, tensors=None) -> dict:
    """The file's metadata (safetensors keeps str -> str): the settings apply_lora needs to rebuild the
    adapters, and what the base must be for them to mean anything (its sha256, checkpoint.weights_sha256;
    its kv_source and attn_source maps; the form the run froze it in), so that delta.py can apply the
    file to the base as it applies a tensor delta; a CRC-32 of each tensor, checked when it is read."""
    kv = list(model.config.kv_source) if kv_source is None else list(kv_source)
    crcs = {k: tensor_crc(v) for k, v in (lora_state_dict(model) if tensors is None else tensors).items()}
    return {"format": LORA_FORMAT, "kind": "lora", "settings": json.dumps(model.lora_settings),
            "base_sha256": base_sha256 or "", "kv_source": json.dumps(kv),
            "attn_source": json.dumps(list(model.config.attn_source)), "base_quant": base_quant_of(model),
            "model_config": json.dumps(model.config.to_dict() | {"kv_source": kv}), "tensor_crc32": json.dumps(crcs)}


def save_lora(model, path, base_sha256="", kv_source=None, dtype=torch.float32):
    """Write the adapters alone as a safetensors file (the 'delta' of an adapted model), in dtype: bfloat16
    halves the file (load_lora widens the values back into the fp32 adapters, rounded as saved)."""
    tensors = {k: v.detach().to(dtype).contiguous().cpu() for k, v in lora_state_dict(model).items()}
    save_safetensors(tensors, lora_metadata(model, base_sha256, kv_source, tensors), str(path))


def read_lora(path):
    """(tensors, metadata) of a save_lora file; one line if it is not one."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != LORA_FORMAT:
            raise ValueError(f"{path} is not a LoRA adapter file of this project (format "
                             f"{meta.get('format')!r}, expected {LORA_FORMAT!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


def load_lora(model, tensors: dict, metadata: dict = None):
    """Put saved adapters on the model: built from the metadata's settings if the model has none yet,
    then every A and B copied in. A base with another kv_source or sha256 is refused in one line."""
    meta = metadata or {}
    if meta.get("kv_source") and json.loads(meta["kv_source"]) != list(model.config.kv_source):
        raise ValueError(f"these adapters were trained on a base with kv_source {meta['kv_source']}, "
                         f"this model has {list(model.config.kv_source)}")
    wanted_sha = meta.get("base_sha256", "")
    if wanted_sha and getattr(model, "base_sha256", wanted_sha) != wanted_sha:
        raise ValueError(f"these adapters were trained on the base with sha256 {wanted_sha[:12]}..., this model's "
                         f"is {model.base_sha256[:12]}...")
    if not lora_adapters(model):
        settings = json.loads(meta["settings"])
        apply_lora(model, settings["targets"], settings["layers"], settings["rank"], settings["alpha"],
                   settings["dynamic"], tuple(settings["rank_range"]), settings["rule"])
    own = lora_state_dict(model)
    if set(own) != set(tensors):
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        raise ValueError(f"the adapters do not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for key, value in tensors.items():
            if own[key].shape != value.shape:
                raise ValueError(f"{key}: saved shape {tuple(value.shape)}, the model's {tuple(own[key].shape)}")
            own[key].copy_(value)
    return model


# -----------------------------------------------------------------------------
# what the report counts


def lora_sizes(model) -> dict:
    """Trainable parameters, their AdamW state bytes (two fp32 moments each), and the bytes the frozen
    linear weights of the layers take in their stored form (packed NF4, int8 + scales, or float)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = 0
    for module in model.layers.modules():
        if isinstance(module, NF4Linear):
            base += module.nbytes()
        elif isinstance(module, Int8Linear):
            base += module.weight.numel() + module.scales.numel() * module.scales.element_size()
        elif isinstance(module, nn.Linear):
            base += module.weight.numel() * module.weight.element_size()
    return {"trainable_params": trainable, "optimizer_state_bytes": 8 * trainable, "base_linear_bytes": base}


# -----------------------------------------------------------------------------
# training with adapters: train.py's lora_* settings and what its setup and loop call

# train.py takes these like its own (command line, config files, --help); they live here, with what reads them
LORA_SETTINGS = dict(
    lora_targets="",            # linears to adapt, e.g. 'q,o' or 'q,k,v,o,gate,up,down'; '' = no LoRA (full training)
    lora_layers="all",          # 'all' or a list of layers like 10,11,12 (e.g. an adaptation's consumers)
    lora_rank=8,                # R: the adapters' rank (with lora_dynamic, the largest)
    lora_alpha=16.0,            # the update is scaled by alpha / b, b the rank in use
    lora_dynamic=False,         # DyLoRA: each optimizer step draws b from lora_rank_range; one run serves every rank
    lora_rank_range="",         # 'low,high' the ranks drawn from; '' = 1,lora_rank
    lora_rule="nested",         # dynamic rank: 'nested' (train A[:b], B[:, :b]) or 'frozen' (only the b-th row and column)
    lora_eval_ranks="",         # also evaluate at these ranks, e.g. 1,2,4,8 (each logged: "val loss at rank 4: ...")
    base_quant="none",          # the frozen base's linears: 'none', 'int8' (quantize.py) or 'nf4' (nf4.py, QLoRA)
)


def _rank_range(spec, rank):
    if not spec:
        return None
    low_high = parse_ranks(spec, "lora_rank_range")
    if len(low_high) != 2:
        raise ConfigError(f"lora_rank_range={spec!r}: give two ranks, low,high, like 1,{rank}")
    return tuple(low_high)


def check_lora_run(s, explicit):
    """The lora_* settings and what LoRA cannot be combined with, from the settings alone: a ConfigError
    (one line) before any work. On CUDA compile='auto' turns off for a dynamic rank (see below)."""
    if not s.lora_targets:
        unused = sorted(k for k in explicit if k in LORA_SETTINGS and k != "lora_targets")
        if unused:
            raise ConfigError(f"{', '.join(unused)} appl{'ies' if len(unused) == 1 else 'y'} only with lora_targets "
                              "(e.g. --lora_targets=q,o): set it, or drop them")
        return
    try:
        parse_targets(s.lora_targets)
        if s.lora_rank <= 0:
            raise ValueError(f"lora_rank must be at least 1, got {s.lora_rank}")
        low, high = _rank_range(s.lora_rank_range, s.lora_rank) or (1, s.lora_rank)
        if not 1 <= low <= high <= s.lora_rank:
            raise ValueError(f"lora_rank_range {low}..{high} must lie within 1..lora_rank={s.lora_rank}")
        for r in parse_ranks(s.lora_eval_ranks):
            if not 1 <= r <= s.lora_rank:
                raise ValueError(f"lora_eval_ranks: {r} is outside 1..lora_rank={s.lora_rank}")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if s.lora_rule not in RULES or s.base_quant not in BASE_QUANTS:
        bad, allowed = ("lora_rule", RULES) if s.lora_rule not in RULES else ("base_quant", BASE_QUANTS)
        raise ConfigError(f"{bad}={getattr(s, bad)!r}: choose from {', '.join(allowed)}")
    if "lora_rank_range" in explicit and not s.lora_dynamic or "lora_rule" in explicit and not s.lora_dynamic:
        raise ConfigError("lora_rank_range and lora_rule apply only with lora_dynamic=True")
    # a compiled forward specialises on the rank (a Python int): a new graph for each rank drawn, then
    # dynamo's recompile limit and a silent fall back to eager. A fixed rank compiles as usual.
    if s.lora_dynamic and s.compile is True:
        raise ConfigError("compile=True with lora_dynamic=True: the rank changes every step and each rank would "
                          "compile a new graph; set compile=False (or auto), or train a fixed rank")
    if s.lora_dynamic and s.compile == "auto":
        s.compile = False
    if s.fsdp:
        raise ConfigError("lora_targets with fsdp=True is not supported (the frozen NF4/int8 buffers are not "
                          "sharded): train the adapters with DDP or on one device")
    if s.adapt_target and s.adapt_train_layers != "all":
        raise ConfigError(f"adapt_train_layers={s.adapt_train_layers!r} with lora_targets: with adapters only they "
                          "train; choose their layers with lora_layers (e.g. the consumers) instead")


def _restore_lora_settings(s, explicit, ckpt):
    """On resume the lora_* settings are the run's; those that shape the adapters cannot change."""
    saved = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    for key in LORA_SETTINGS:
        if key not in saved:
            continue
        if key not in explicit:
            setattr(s, key, saved[key])
        elif key not in ("lora_eval_ranks",) and getattr(s, key) != saved[key]:
            raise ConfigError(f"{key}={getattr(s, key)!r} differs from the resumed run's {saved[key]!r}: a resumed "
                              "LoRA run keeps its adapters and base; drop the setting")


def model_to_train(ckpt, resume, **config_changes):
    """The model of train.py's checkpoint to start from: a LoRA run's (adapters over a frozen, maybe
    quantized base) rebuilt as it was when resuming it, else checkpoint.model_from_checkpoint's."""
    from checkpoint import model_from_checkpoint
    if "lora" not in ckpt or not resume:
        return model_from_checkpoint(ckpt, **config_changes)
    return model_from_lora_checkpoint(ckpt, **config_changes)


def model_from_lora_checkpoint(ckpt, **config_changes):
    """A LoRA run's model from its checkpoint: built on the meta device (no init, no second copy),
    quantized and wrapped as the run was, then its state (packed base, adapters) assigned."""
    info = ckpt["lora"]
    config = LlamaConfig(**{**ckpt["model_config"], **config_changes})
    state = strip_prefixes(ckpt["model"])
    with torch.device("meta"):
        model = Llama(config)
        quantize_base(model, info["base_quant"])
    settings = info["settings"]
    with torch.device("meta"):
        add_saved_adapters(model, state, settings)
    model.requires_grad_(False)
    for adapter in lora_adapters(model).values():
        adapter.lora_A.requires_grad_(True)
        adapter.lora_B.requires_grad_(True)
    assign_state(model, state, "the LoRA checkpoint does not fit its own settings")
    for layer, (source, weight) in (ckpt.get("kv_blend") or {}).items():
        model.kv_blend[int(layer)] = (int(source), torch.tensor(float(weight)))
    model.lora_settings = dict(settings)
    model.base_sha256 = info.get("base_sha256", "")
    return model


def add_saved_adapters(model, state, settings):
    """Wrap exactly the linears that `state` holds adapters for (its '....lora_A' keys) in LoRALinear of
    the saved settings: adaptation may have dropped some with their K/V, so the settings' layers and
    targets do not say which."""
    adapted = {key.rsplit(".", 1)[0] for key in state if key.endswith(".lora_A")}
    for name in sorted(adapted):
        parent, attr = name.rsplit(".", 1)
        module = model.get_submodule(parent)
        setattr(module, attr, LoRALinear(getattr(module, attr), settings["rank"], settings["alpha"], settings["rule"]))
    return model


class LoRARun:
    """What train.py's loop does with the adapters: draw each optimizer step's rank (dynamic rank) and
    evaluate at ranks. `info` is the checkpoint's 'lora' entry (settings, base, the sampler's state)."""

    def __init__(self, model, info, sampler, eval_ranks):
        self.model, self.info, self.sampler, self.eval_ranks = model, info, sampler, eval_ranks
        self.rank = info["settings"]["rank"]

    def draw(self):
        """The rank of the coming optimizer step (all its micro-steps); the sampler's state after the
        draw goes into the next checkpoint, so a resumed run draws what the straight one would."""
        if self.sampler is not None:
            set_rank(self.model, self.sampler.sample())
            self.info["rank_sampler"] = self.sampler.state_dict()

    def evaluate(self, estimate, log, iter_num):
        """estimate() at the full rank R (the run's val loss, best and checkpoint follow it), then at each
        of eval_ranks (logged); the training rank is restored after."""
        active = next(iter(lora_adapters(self.model).values())).active_rank
        try:
            set_rank(self.model, self.rank)
            losses = estimate()
            for r in self.eval_ranks:
                set_rank(self.model, r)
                at = estimate()
                log(f"iter {iter_num}: val loss at rank {r}: {at['val']:.4f} (train {at['train']:.4f})",
                    kind="eval_rank", iter=iter_num, rank=r, train_loss=at["train"], val_loss=at["val"])
        finally:
            set_rank(self.model, active)
        return losses

    def describe(self):
        st, sizes = self.info["settings"], lora_sizes(self.model)
        dynamic = f"dynamic {st['rank_range'][0]}..{st['rank_range'][1]} ({st['rule']})" if st["dynamic"] else "fixed"
        return (f"lora: {st['targets']} on {len(lora_adapters(self.model))} linears, rank {st['rank']} {dynamic}, "
                f"alpha {st['alpha']}, base {self.info['base_quant']}: {sizes['trainable_params']:,} trainable "
                f"parameters, base linears {sizes['base_linear_bytes'] / 2**20:.1f} MiB")


def sha256_of(path) -> str:
    """The base checkpoint's weights' sha256 (checkpoint.weights_sha256): the adapters mean something on
    that base only."""
    return weights_sha256(load_checkpoint(path))


def run_base_sha256(info) -> str:
    """A LoRA run's base digest (checkpoint.weights_sha256). A run started before the digest was of the
    weights recorded its base file's sha256: while that file is where the run found it and still has that
    sha256, its weights' digest stands in, so the adapters saved from the run apply as deltas."""
    recorded, path = info.get("base_sha256", ""), info.get("base_path", "")
    if recorded and path and os.path.isfile(path):
        from dataset import sha256_file
        if sha256_file(path) == recorded:
            return weights_sha256(load_checkpoint(path))
    return recorded


def setup_lora(s, explicit, model, ckpt, path, resume):
    """train.py's setup of a LoRA run, before the optimizer: quantize the base, wrap the targets (or, on
    resume, keep the rebuilt model's adapters), and the rank sampler seeded from the run's seed (its state
    from the checkpoint on resume). None without lora_targets."""
    if resume and "lora" in ckpt:
        _restore_lora_settings(s, explicit, ckpt)
        check_lora_run(s, explicit)
        info = dict(ckpt["lora"])
    elif not s.lora_targets:
        return None
    else:
        base_sha256 = weights_sha256(ckpt) if path else ""  # of the weights as loaded, before quantizing them
        try:
            rank_range = _rank_range(s.lora_rank_range, s.lora_rank)
            check_lora_settings(model.config, s.lora_targets, None if s.lora_layers == "all" else s.lora_layers,
                                s.lora_rank, rank_range, s.lora_eval_ranks, s.base_quant, s.lora_rule)
            quantize_base(model, s.base_quant)
            apply_lora(model, s.lora_targets, None if s.lora_layers == "all" else s.lora_layers, s.lora_rank,
                       s.lora_alpha, s.lora_dynamic, rank_range, s.lora_rule, seed=s.seed)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        info = {"settings": dict(model.lora_settings), "base_quant": s.base_quant,
                "base_path": os.path.abspath(path) if path else "", "base_sha256": base_sha256}
        model.base_sha256 = info["base_sha256"]
    sampler = rank_sampler(model, s.seed) if info["settings"]["dynamic"] else None
    if sampler is not None and "rank_sampler" in info:
        sampler.load_state_dict(info["rank_sampler"])
    return LoRARun(model, info, sampler, parse_ranks(s.lora_eval_ranks))


# -----------------------------------------------------------------------------
# python lora.py: merge a LoRA run at a rank into a plain checkpoint, and/or save its adapters alone

init_from = ""               # a LoRA run's checkpoint file or out_dir (train.py --lora_targets=...)
rank = 0                     # the rank to merge and save at; 0 = the adapters' full rank R
out = ""                     # the merged, ordinary checkpoint to write (sample.py, convert_hf.py export, bench.py)
adapters = ""                # the adapters alone as a .safetensors file (truncated to `rank`), with their metadata
merge_dtype = "float32"      # the merged weights' dtype: float32 or bfloat16
adapters_dtype = "float32"   # the adapters file's dtype: float32 or bfloat16 (half the size: r32 on SmolLM2 19 MB)
DEFAULTS = settings_from({k: v for k, v in globals().items() if k in ("init_from", "rank", "out", "adapters",
                                                                      "merge_dtype", "adapters_dtype")})


def truncate_lora(model, rank):
    """Keep the first `rank` rows of A and columns of B (the rank-b LoRA of a dynamic run), with its
    scale: a rank-b adapter has alpha / b, so alpha is kept and the settings say rank b."""
    set_rank(model, rank)
    for adapter in lora_adapters(model).values():
        adapter.lora_A = nn.Parameter(adapter.lora_A.data[:rank].clone())
        adapter.lora_B = nn.Parameter(adapter.lora_B.data[:, :rank].clone())
        adapter.rank = adapter.active_rank = rank
    model.lora_settings = {**model.lora_settings, "rank": rank, "dynamic": False, "rank_range": [1, rank]}
    return model


def merge_command(s):
    """Read the LoRA run, check what was asked, write the adapters file and/or the merged checkpoint."""
    from checkpoint import checkpoint_path
    if not s.out and not s.adapters:
        raise ConfigError("nothing to write: give --out=<merged checkpoint .pt> and/or --adapters=<file.safetensors>")
    for key in ("merge_dtype", "adapters_dtype"):
        if getattr(s, key) not in ("float32", "bfloat16"):
            raise ConfigError(f"{key}={getattr(s, key)!r}: choose float32 or bfloat16")
    if not s.init_from:
        raise ConfigError("give --init_from=<a LoRA run's out_dir or ckpt.pt>")
    ckpt = load_checkpoint(checkpoint_path(s.init_from))
    if "lora" not in ckpt:
        raise ConfigError(f"{s.init_from} is not a LoRA run's checkpoint (no adapters in it): it is a plain model "
                          "already")
    model = model_from_lora_checkpoint(ckpt).eval()
    full = ckpt["lora"]["settings"]["rank"]
    b = s.rank or full
    if not 1 <= b <= full:
        raise ConfigError(f"rank={b} is outside 1..{full} (the adapters' rank)")
    if b != full and not ckpt["lora"]["settings"]["dynamic"]:
        print(f"note: rank {b} of a fixed-rank-{full} LoRA is not a trained adapter (only a dynamic run's are)")
    truncate_lora(model, b)
    base_sha256 = run_base_sha256(ckpt["lora"])
    if s.adapters:
        save_lora(model, s.adapters, base_sha256, dtype=getattr(torch, s.adapters_dtype))
        print(f"saved {s.adapters}: the rank-{b} adapters alone in {s.adapters_dtype} "
              f"({sum(t.numel() for t in lora_state_dict(model).values()):,} values)")
    if s.out:
        merge_lora(model, dtype=getattr(torch, s.merge_dtype))
        merged = {"model": model.state_dict(), "model_config": model.config.to_dict(),
                  "config": {"dataset": (ckpt.get("config") or {}).get("dataset")},
                  "lora_merged": {"rank": b, "base_quant": ckpt["lora"]["base_quant"],
                                  "base_sha256": base_sha256}}
        save_checkpoint(merged | {k: ckpt[k] for k in SAMPLING_KEYS if k in ckpt}, s.out)
        print(f"saved {s.out}: the model merged at rank {b}, an ordinary checkpoint (sample.py, bench.py, export)")
    return model


def main(argv):
    s, _ = configure(DEFAULTS, argv, MERGE_DOC)
    return merge_command(s)


MERGE_DOC = """Merge a LoRA run (train.py --lora_targets=...) at a rank into an ordinary checkpoint, and/or save
its adapters alone (a small .safetensors file with their settings, the base's sha256 and kv_source):

    .venv/bin/python lora.py --init_from=out-lora --rank=8 --out=out-lora/merged-r8.pt
    .venv/bin/python lora.py --init_from=out-lora --rank=8 --adapters=out-lora/adapters-r8.safetensors

The merge adds (alpha / b) B[:, :b] A[:b] to the base as the run used it: an NF4 or int8 base is
dequantized first, so the merged model computes what the LoRA model did (not the original float base
plus the adapters)."""


if __name__ == "__main__":
    sys.exit(run_script(main))
