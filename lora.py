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
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import umask_file_mode
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
        delta = F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype))
        return self.base_forward(x) + delta * (self.alpha / self.active_rank)

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


def lora_metadata(model, base_sha256="", kv_source=None) -> dict:
    """The file's metadata (safetensors keeps str -> str): the settings apply_lora needs to rebuild the
    adapters, and what the base must be for them to mean anything (its sha256, its kv_source map)."""
    kv = list(model.config.kv_source) if kv_source is None else list(kv_source)
    return {"format": LORA_FORMAT, "settings": json.dumps(model.lora_settings), "base_sha256": base_sha256 or "",
            "kv_source": json.dumps(kv)}


def save_lora(model, path, base_sha256="", kv_source=None):
    """Write the adapters alone as a safetensors file (the 'delta' of an adapted model)."""
    from safetensors.torch import save_file
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    save_file(tensors, str(path), metadata=lora_metadata(model, base_sha256, kv_source))
    os.chmod(path, umask_file_mode())  # safetensors writes through a 0600 temp file; follow the umask as open() does


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
