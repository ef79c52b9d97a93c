"""
Layer-wise adaptation: turn a pretrained dense Llama into a KV-shared one (the ECHO recipe).

The paper describes "shared KV caching coupled with layer-wise adaptation, gradually converting
pretrained LLaMA" layers but not the schedule, so the choices here are ours and are measured in
experiments/echo.py:
- a target kv_source, chosen by hand or from data (`calibrate`, below);
- the consumers switch in stages (top-down, bottom-up, or most similar first). During its stage a
  switching layer attends over (1 - w) * its own K/V + w * its owner's, w rising from 0 to 1, and at
  the end of the stage it drops its K/V weights and their optimizer state. `abrupt` switches all at once;
- optionally only some layers train (`converted`: the consumers and their owners; `upward`: every
  layer from the lowest consumer up). Autograd records nothing below the lowest trainable layer,
  since nothing there requires a gradient: those layers cost a forward pass only;
- optionally the dense model teaches: loss = (1 - a) * CE + a * T^2 * KL(teacher || student).

Everything about adaptation lives here: train.py's adapt_* and distill_* settings (TRAINING_SETTINGS),
the schedule (`Adaptation`), blending and switching a layer (`start_blend`, `make_consumer`), freezing,
the teacher and its loss (`setup_adaptation`, `setup_distillation`, `loss_with_teacher`), and
calibration. train.py calls `setup_adaptation` and `setup_distillation` once, `Adaptation.apply` every
iteration (through sharding.ParallelModel.adapt) and `loss_with_teacher` every micro-step while the
teacher teaches. Run this file to calibrate a dense model, or to convert it:

    .venv/bin/python adapt.py --init_from=out-shakespeare-char-dense --n_share=2
    .venv/bin/python adapt.py --init_from=out-shakespeare-char-dense --convert_to=upper:half --kv_init=mean \\
        --local_iters=100 --out=out-shakespeare-char-dense/upper_half.pt
"""

import hashlib
import os
import sys
import time
from dataclasses import dataclass

import numpy
import torch
import torch.nn.functional as F

from checkpoint import (SAMPLING_KEYS, build_on_meta, load_model, save_checkpoint, share_attn_state, share_kv_state,
                        special_ids, weights_sha256)
from configurator import (DTYPES, ConfigError, apply_threads, autocast, configure, run_script, settings_from,
                          warn_slow_bf16)
from dataset import BatchSampler, dataset_dir, load_meta, open_tokens
from guards import claim_destination
from model import LlamaConfig, parse_kv_source, validate_kv_source
from progress import Heartbeat
from speed import cast_frozen_linears, linears_in

# -----------------------------------------------------------------------------
# settings of `python adapt.py`; those of adaptation during training are TRAINING_SETTINGS, below
init_from = "out-shakespeare-char-dense"  # a dense checkpoint file or training out_dir
dataset = ""                 # '' = the dataset the checkpoint was trained on
n_share = -1                 # calibrate: layers to turn into consumers in the proposed map; -1 = half
batches = 8                  # batches the calibration (--split) or local distillation (train split) use
batch_size = 8               # sequences per batch
block_size = 0               # sequence length of those batches; 0 = the model's block_size
out = ""                     # calibrate: a directory ('' = beside the checkpoint); convert: the checkpoint file
seed = 1337                  # which batches are drawn
split = "val"                # calibrate: the split its batches come from ('train' keeps a held-out set unseen)
similarity = ""              # calibrate: propose from this saved matrix (the .pt an earlier calibration wrote with
                             # the same criterion) instead of computing it: another n_share in seconds
threads = 0                  # torch CPU threads: 0 = 1 on a CPU (shared machines: configurator.apply_threads)
criterion = "kv"             # calibrate: 'kv' (kv_similarity, proposes kv_source), 'logits' (logit_kl_similarity:
                             # the end-to-end KL of each single switch, proposes kv_source; slow) or 'attention'
                             # (EchoAtt's attention-map similarity, proposes attn_source)
search = 0                   # calibrate, K/V criteria: 0 = the map is the n_share best single switches (greedily,
                             # from the matrix); k > 0 = switch by switch, each the one of the k best single switches
                             # whose addition to those chosen costs the least KL of the logits (k x n_share forwards)
lowest_consumer = 0          # calibrate, K/V criteria: consumers only from this layer up; the distillation's backward
                             # then stops there (a LoRA set on those layers from the teacher's top 64, SmolLM2:
                             # 2.3x a dense fine-tune's tokens/s at 17 of 30, ~2x at 12, over 40 steps; at a cost in
                             # fidelity: docs/keep_skills.md, "Where the backward stops")
search_batches = 0           # calibrate, search > 0: the search's batches (the matrix keeps the first --batches of
                             # them); 0 = --batches. SmolLM2: 1 x 2 x 256 tokens were too few (the search fitted them),
                             # 8 x 2 x 256 were not; 32 x 2 x 256, or --search=32, chose the map 8 x 2 x 256 with
                             # --search=16 chose (docs/keep_skills.md, "Maps searched switch by switch", "More tokens")
dtype = "float32"            # calibrate: float32, or bfloat16 (autocast, the frozen linears cast once: speed.linears_in;
                             # 'logits' on SmolLM2, the AMX Xeon: 104 s against 173 paired, the same map; keep_skills.md)
convert_to = ""              # convert: the kv_source to convert the dense model to (abruptly)
attn_to = ""                 # convert: the attn_source to convert it to (EchoAtt: sharers drop Q and K)
kv_init = "own"              # convert: owners keep their own K/V (own) or the mean of their users' (mean)
local_iters = 0              # convert: steps of layer-local distillation of the consumers afterwards
local_lr = 1e-3              # convert: AdamW learning rate of the layer-local distillation
local_train = "layers"       # convert: what the local distillation trains: the consumers' whole 'layers', or
                             # 'consumers_qo' (their q_proj and o_proj, as adapt_train_layers='consumers_qo')
overwrite = False            # convert: replace an existing --out file
# -----------------------------------------------------------------------------
DEFAULTS = settings_from(globals())

# train.py's settings for adapting a pretrained model into a KV-shared one while training it: train.py
# takes them like its own (command line, config files, --help); they live here, with what reads them
TRAINING_SETTINGS = dict(
    # layer-wise adaptation (Adaptation); off while adapt_target is ''
    adapt_target="",            # the kv_source to reach, e.g. 'upper:half'; start from init_from=<dense checkpoint>
    adapt_mode="gradual",       # 'gradual' (stage by stage, blending K/V) or 'abrupt' (all layers at iteration 0)
    adapt_order="top-down",     # 'top-down', 'bottom-up', 'similarity' (needs adapt_similarity) or a list like 5,4,3
    adapt_stage_iters=100,      # iterations per stage (gradual)
    adapt_layers_per_stage=1,   # layers that switch together in each stage (gradual)
    adapt_train_layers="all",   # 'all', 'converted' (consumers and their owners), 'upward' (lowest consumer and up),
                                # 'consumers_qo' (only the consumers' q_proj and o_proj)
    adapt_similarity="",        # kv_similarity.pt from `python adapt.py`, for adapt_order='similarity'
    adapt_attn_target="",       # EchoAtt instead: the attn_source to switch to before step 0, e.g. the one
                                # `adapt.py --criterion=attention` proposes (sharers' q_proj/k_proj dropped)
    # learning from a frozen dense teacher (Distillation): loss = (1 - a - g - h) * CE(data)
    #   + a * T^2 * KL(teacher || student) + g * CE(teacher's argmax) + h * MSE(hidden states); all 0: no teacher
    distill_alpha=0.0,          # a: soft logits at distill_temperature
    distill_temperature=1.0,    # T of the soft-logit term (the KL is scaled by T^2)
    distill_reverse=0.0,        # r: the soft term's share that is the reverse KL(student || teacher), which seeks the
                                # teacher's likeliest tokens (MiniLLM, GKD) where the forward KL covers its whole
                                # distribution: a T^2 [(1 - r) KL(teacher || student) + r KL(student || teacher)]
                                # (SmolLM2: docs/keep_skills.md, "The reverse KL, and a temperature")
    distill_argmax=0.0,         # g: the teacher's argmax tokens as labels (EchoAtt: 0.5)
    distill_hidden=0.0,         # h: residual stream entering distill_hidden_layers (EchoAtt: 0.25, with a = 0.25)
    distill_hidden_layers="",   # e.g. '10,20' (EchoAtt: the boundaries of the shared blocks)
    distill_iters=0,            # stage 1 length; then plain CE without the teacher (stage 2). 0: the whole run
    distill_teacher="",         # the teacher's checkpoint; '' = the init_from file (name it when resuming)
    distill_cache="",           # a file of the teacher's top distill_cache_topk log-probabilities for every batch
                                # this run draws (TeacherTopK): made before step 0 when missing, reused by runs
                                # that draw the same batches; the steps then run no teacher forward. '' = none
    distill_cache_topk=64,      # k: the KL runs over the teacher's k likeliest tokens and one bucket for the rest
    distill_end_weight=1.0,     # the positions where the teacher's likeliest next token is its eos (a turn's end)
                                # count this many times in every term; 1 = as any other. SmolLM2 at KV 0.73, 10:
                                # 34 of 69 chat answers end against 30, 1-3% more KL (docs/keep_skills.md,
                                # "End-of-turn weighting")
)

ORDERS = ("top-down", "bottom-up", "similarity")
TRAIN_LAYERS = ("all", "converted", "upward", "consumers_qo")


class Adaptation:
    """Which layers switch when. Stateless given the iteration, so resuming needs no extra state:
    `apply(model, optimizer, iter_num)` brings the model to where the schedule says it is."""

    def __init__(self, kv_source, target, mode="gradual", order="top-down", stage_iters=100,
                 layers_per_stage=1, similarity=None):
        n_layer = len(kv_source)
        try:
            target = parse_kv_source(target, n_layer)
        except ValueError as e:
            raise ValueError(f"adapt_target: {e}") from None
        for i, (now, goal) in enumerate(zip(kv_source, target)):
            if now != i and now != goal:
                raise ValueError(f"adapt_target: layer {i} already reuses layer {now}'s K/V but the target "
                                 f"says {goal}: a consumer can't become an owner again (its K/V weights are gone)")
        # every consumer of the target has its place in the plan, also one that has switched already:
        # a resumed run, whose model has lost some K/V, makes the same plan as the run it continues
        switching = [i for i in range(n_layer) if target[i] != i]
        if mode not in ("gradual", "abrupt"):
            raise ValueError(f"adapt_mode must be 'gradual' or 'abrupt', got {mode!r}")
        explicit = None
        if order not in ORDERS:
            try:
                explicit = [int(s) for s in str(order).split(",") if s.strip()]
            except ValueError:
                raise ValueError(f"adapt_order must be one of {ORDERS} or a list of layers like "
                                 f"'5,4,3', got {order!r}") from None
            if sorted(explicit) != sorted(switching):
                raise ValueError(f"adapt_order={order!r} must list each switching layer once: the target "
                                 f"converts layers {sorted(switching)}")
        if mode == "gradual" and (stage_iters < 1 or layers_per_stage < 1):
            raise ValueError("adapt_stage_iters and adapt_layers_per_stage must be >= 1")
        if explicit is not None:
            switching = explicit
        elif order == "top-down":
            switching.sort(reverse=True)
        elif order == "similarity":
            if similarity is None:
                raise ValueError("adapt_order='similarity' needs a calibration (run adapt.py first)")
            switching.sort(key=lambda i: -float(similarity[i, target[i]]))
        self.target, self.mode, self.stage_iters = target, mode, stage_iters
        step = len(switching) if mode == "abrupt" else layers_per_stage
        self.stages = [switching[s:s + step] for s in range(0, len(switching), step)]

    @property
    def total_iters(self):
        """Iterations until the last layer has switched."""
        return 0 if self.mode == "abrupt" else len(self.stages) * self.stage_iters

    def drops(self, kv_source, iter_num) -> list:
        """The layers apply() would turn into consumers at iter_num (drop their K/V weights)."""
        done = len(self.stages) if self.mode == "abrupt" else min(iter_num // self.stage_iters, len(self.stages))
        return [layer for stage in self.stages[:done] for layer in stage if kv_source[layer] == layer]

    def apply(self, model, optimizer, iter_num) -> bool:
        """Switch, blend and drop layers as the schedule says for iter_num. True if parameters
        were removed (the caller re-wraps DDP / torch.compile around the changed model)."""
        if self.mode == "abrupt":
            done, current, weight = len(self.stages), None, 0.0
        else:
            done = min(iter_num // self.stage_iters, len(self.stages))
            current = self.stages[done] if done < len(self.stages) else None
            weight = (iter_num % self.stage_iters) / self.stage_iters
        changed = False
        for stage in self.stages[:done]:
            for layer in stage:
                if model.config.kv_source[layer] == layer:
                    drop_params(optimizer, make_consumer(model, layer, self.target[layer]))
                    changed = True
        for layer in current or []:
            if model.config.kv_source[layer] != layer:
                continue
            if layer not in model.kv_blend:
                start_blend(model, layer, self.target[layer])
            model.kv_blend[layer][1].fill_(weight)  # in place: a compiled forward keeps its graph
        return changed


def start_blend(model, layer, owner):
    """Let `layer` attend over (1 - w) * its own K/V + w * `owner`'s (model.kv_blend, the forward's
    hook), w starting at 0."""
    _check_switch(model, layer, owner)
    model.kv_blend[layer] = (owner, torch.zeros((), device=model.rope_cos.device))


def make_consumer(model, layer, owner) -> list:
    """Drop `layer`'s K/V projections and point it at `owner`; returns the removed parameters (their
    optimizer state has to go too)."""
    _check_switch(model, layer, owner)
    attn = model.layers[layer].self_attn
    removed = [*attn.k_proj.parameters(), *attn.v_proj.parameters()]  # a LoRA adapter has two more
    del attn.k_proj, attn.v_proj
    model.config.kv_source = tuple(owner if i == layer else j for i, j in enumerate(model.config.kv_source))
    model.layers[layer].kv_source = owner  # a Block reads its sources once, when it is built
    model.kv_blend.pop(layer, None)
    return removed


def _check_switch(model, layer, owner):
    kv_source = list(model.config.kv_source)
    if kv_source[layer] != layer:
        raise ValueError(f"layer {layer} is already a consumer of layer {kv_source[layer]}")
    kv_source[layer] = owner
    validate_kv_source(tuple(kv_source), model.config.n_layer)


def drop_params(optimizer, params):
    """Remove params and their state (Adam moments) from an optimizer."""
    if optimizer is None:
        return
    gone = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in gone]
    for p in params:
        optimizer.state.pop(p, None)


def freeze(model, target, train_layers="all") -> list:
    """Freeze all but the layers adaptation trains; return the indices of the trainable layers."""
    if train_layers not in TRAIN_LAYERS:
        raise ValueError(f"adapt_train_layers must be one of {TRAIN_LAYERS}, got {train_layers!r}")
    n_layer = model.config.n_layer
    consumers = [i for i in range(n_layer) if target[i] != i]
    if train_layers == "all":
        return list(range(n_layer))
    if not consumers:
        raise ValueError(f"adapt_train_layers={train_layers!r} with a target that shares no layer would freeze "
                         "every layer: pick a target with consumers or adapt_train_layers='all'")
    for p in model.parameters():
        p.requires_grad_(False)
    if train_layers == "consumers_qo":
        for p in consumer_qo_params(model, consumers):
            p.requires_grad_(True)
        return consumers
    if train_layers == "converted":
        trainable = sorted(set(consumers) | {target[i] for i in consumers})
    else:
        trainable = list(range(min(consumers), n_layer))
    for i in trainable:
        model.layers[i].requires_grad_(True)
    if train_layers == "upward":  # the final norm and head sit above every layer
        model.norm.requires_grad_(True)
        # a head tied to the embedding stays frozen: training it would make the embedding lookup at the
        # bottom need a gradient, and so a backward pass through every layer
        model.lm_head.requires_grad_(not model.config.tie_embeddings)
    return trainable


def consumer_qo_params(model, consumers):
    """The consumers' query and output projections: what changes when a layer reads another layer's K/V
    (its queries must find the owner's keys, its output must map the owner's values; SwiftKV likewise
    trains only what its change touches). A layer sharing its attention pattern has no q_proj."""
    attns = [model.layers[i].self_attn for i in consumers]
    return [m.weight for a in attns for m in (getattr(a, "q_proj", None), a.o_proj) if m is not None]


KL_CHUNK_ROWS = 8  # rows of logits the distillation loss holds in fp32 at once (1.5 MiB at a 49k vocab): small
                   # enough to stay in cache; 1,024 rows took 370-405 ms in chunks of 64, 236-277 in chunks of 8
                   # (2-core Xeon, docs/keep_skills.md)


def distillation_loss(logits, teacher_logits, targets, alpha, temperature, argmax=0.0, data=None, end=None,
                      reverse=0.0):
    """data * CE(targets) + alpha * T^2 * KL(teacher || student) at temperature T + argmax * CE(the
    teacher's argmax tokens), data being 1 - alpha - argmax unless given; each a mean over the positions
    with a target (not -1). The T^2 keeps the gradient scale of the soft term independent of T (Hinton
    et al.); the argmax term is EchoAtt's hard labels. end = (token, weight): a position whose teacher's
    argmax is that token counts weight times in the sum (the mean still divides by the positions).
    reverse = r: the soft term is (1 - r) KL(teacher || student) + r KL(student || teacher), the reverse
    KL needing the teacher's whole distribution. Computed by FusedDistillationLoss."""
    data = 1 - alpha - argmax if data is None else data
    vocab = logits.size(-1)
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    if isinstance(teacher_logits, tuple):  # the teacher's top k (TeacherTopK): (token ids, log-probabilities)
        if temperature != 1:
            raise ValueError("the teacher's top-k log-probabilities are at temperature 1: set distill_temperature=1")
        if reverse:
            raise ValueError("the reverse KL needs the teacher's whole distribution, not its top k: "
                             "set distill_reverse=0")
        teacher = tuple(t.reshape(-1, t.size(-1)) for t in teacher_logits)
    else:
        teacher = teacher_logits.detach().reshape(-1, vocab)
    return FusedDistillationLoss.apply(logits.reshape(-1, vocab), teacher, targets.reshape(-1),
                                       (data, alpha, argmax), temperature, need_grad, end, reverse)


def top_k_kl(log_q, top_index, top_logprob):
    """Per row, KL(teacher || student) over the teacher's k likeliest tokens and one bucket for the rest of the
    vocabulary, and p~, the teacher's side of its gradient: d KL / dz = softmax(z) - p~, where p~ is the
    teacher's probability on its k tokens and spreads the rest of its mass r over the other tokens as the
    student does (r q_j / q_rest; p~ sums to 1). Exact for the two coarsened distributions: with k = vocab - 1
    the bucket is one token and this is the full KL. log_q: the student's log-softmax rows."""
    p_top = top_logprob.exp()
    log_rest = torch.log(-torch.expm1(top_logprob.logsumexp(-1).clamp(max=0)))  # log r, -inf when k hold it all
    log_q_rest = log_q.scatter(1, top_index, float("-inf")).logsumexp(-1)
    has_rest = log_rest > float("-inf")
    shift = torch.where(has_rest, log_rest - log_q_rest, float("-inf"))  # log(r / q_rest)
    kl = (p_top * (top_logprob - log_q.gather(1, top_index))).sum(-1) + torch.where(has_rest, log_rest.exp() * shift, 0.0)
    return kl, (log_q + shift[:, None]).exp().scatter_(1, top_index, p_top)


def reverse_kl(log_q, log_p):
    """Per row, KL(q || p) = sum q (log q - log p) of the student's q and the teacher's p (log-softmax rows), and its
    gradient in the student's logits at temperature 1: q (log q - log p - KL). Where the forward KL pays for every
    token the teacher finds likely and the student does not, this one pays for the student's mass where the teacher
    has little: it pulls the student onto the teacher's modes."""
    q, gap = log_q.exp(), log_q - log_p
    kl = (q * gap).sum(-1)
    return kl, gap.sub_(kl[:, None]).mul_(q)


class FusedDistillationLoss(torch.autograd.Function):
    """distillation_loss in one pass over KL_CHUNK_ROWS rows at a time, its gradient made in the same pass:
    d/dz = [(data + argmax) softmax(z) + alpha T ((1 - r) (softmax(z / T) - p_teacher) + r reverse_kl's gradient)
    - data onehot(target) - argmax onehot(teacher's argmax)] row_weight / n. The plain composition of log_softmax,
    kl_div and cross_entropy (kept in tests/test_adapt.py as the reference) made several passes over fp32 copies of the
    whole (positions x vocab) logits and computed the CE at weight 0: at SmolLM2's 49k vocab and 1,024
    positions that was half of a 10.8 s distillation step (torch profiler, docs/keep_skills.md)."""

    @staticmethod
    def forward(ctx, z_all, t_all, targets, weights, temperature, need_grad, end=None, reverse=0.0):
        data, alpha, argmax = weights
        forward_weight = alpha * (1 - reverse)  # the weight of KL(teacher || student)
        unit_t = temperature == 1  # then the KL's student softmax is the cross-entropies' one
        soft = data + argmax + (forward_weight if unit_t else 0.0)  # the weight of softmax(z) in the gradient
        n = (targets != -1).sum().clamp(min=1)
        loss = torch.zeros((), dtype=torch.float32, device=z_all.device)
        grad = torch.empty_like(z_all) if need_grad else None
        for s in range(0, z_all.shape[0], KL_CHUNK_ROWS):
            z, y = z_all[s:s + KL_CHUNK_ROWS].float(), targets[s:s + KL_CHUNK_ROWS]
            rows, row_weight = torch.arange(len(y), device=y.device), (y != -1).float()
            log_p = z.log_softmax(-1)
            g = (log_p.exp().mul_(soft) if soft else torch.zeros_like(z)) if need_grad else None
            per_row = torch.zeros(len(y), device=z.device)
            if isinstance(t_all, tuple):  # the teacher's top k, its argmax first (TeacherTopK)
                t, top = None, (t_all[0][s:s + KL_CHUNK_ROWS], t_all[1][s:s + KL_CHUNK_ROWS].float())
            else:
                t, top = t_all[s:s + KL_CHUNK_ROWS].float() if alpha or argmax or end else None, None
            # max's indices are argmax's (the first of tied maxima) at a third of its time (8 fp32 rows, the Xeon)
            teacher_argmax = (top[0][:, 0] if top is not None else t.max(-1).indices) if argmax or end else None
            if end:  # (token, weight): the rows where the teacher's argmax is the token count weight times
                row_weight = torch.where(teacher_argmax == end[0], row_weight * end[1], row_weight)
            cross_entropies = ([(data, y.clamp(min=0))] if data else []) + ([(argmax, teacher_argmax)] if argmax else [])
            for weight, token in cross_entropies:  # against the data's tokens, and against the teacher's argmax
                per_row -= weight * log_p[rows, token]
                if need_grad:
                    g[rows, token] -= weight
            if alpha and top is not None:  # temperature 1 (distillation_loss checks)
                kl, p_teacher = top_k_kl(log_p, *top)
                per_row += alpha * kl
                if need_grad:
                    g.sub_(p_teacher, alpha=alpha)
            elif alpha:
                log_q = log_p if unit_t else (z / temperature).log_softmax(-1)
                log_pt = (t if unit_t else t / temperature).log_softmax(-1)
                if forward_weight:  # none at reverse = 1: no pass for a term of weight 0
                    p_t = log_pt.exp()
                    per_row += forward_weight * temperature ** 2 * (p_t * (log_pt - log_q)).sum(-1)
                    if need_grad:
                        if unit_t:
                            g.sub_(p_t, alpha=forward_weight)
                        else:
                            g.add_((log_q.exp() - p_t).mul_(forward_weight * temperature))
                if reverse:
                    kl, dkl = reverse_kl(log_q, log_pt)
                    per_row += alpha * reverse * temperature ** 2 * kl
                    if need_grad:
                        g.add_(dkl, alpha=alpha * reverse * temperature)
            loss += (per_row * row_weight).sum()
            if need_grad:
                grad[s:s + KL_CHUNK_ROWS] = g.mul_(row_weight[:, None] / n)
        ctx.save_for_backward(grad)
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None, None


@dataclass
class Distillation:
    """How the student learns from the frozen dense teacher. Stage 1 (the first `iters` iterations, or
    the whole run when iters is 0) uses the teacher; stage 2 is plain cross-entropy on the data.
    Weights: kl (soft logits at temperature), argmax (CE on the teacher's argmax), hidden (MSE of the
    residual stream entering each of `layers`, relative to the teacher's mean square); the data's CE
    gets 1 - kl - argmax - hidden. EchoAtt's stage 1 is kl=0.25, argmax=0.5, hidden=0.25."""
    kl: float = 0.0
    argmax: float = 0.0
    hidden: float = 0.0
    temperature: float = 1.0
    layers: tuple = ()
    iters: int = 0
    end: tuple = None  # (the teacher's eos id, the weight of the positions where it is the teacher's argmax)
    reverse: float = 0.0  # the share of the kl term that is KL(student || teacher)

    def active(self, iter_num):
        return self.iters == 0 or iter_num < self.iters


class HiddenTap:
    """Keeps the residual stream entering chosen layers of a model at its latest forward pass."""

    def __init__(self, model, layers):
        self.states, self.layers, self.model = {}, tuple(layers), None
        self.follow(model)

    def follow(self, model):
        """Tap `model`, unless it is the one tapped already: under FSDP a stage switch rebuilds the student
        (sharding.ParallelModel.adapt), whose new module must be tapped again."""
        if model is self.model:
            return
        self.model = model
        for i in self.layers:
            model.layers[i].input_layernorm.register_forward_pre_hook(
                lambda m, args, i=i: self.states.__setitem__(i, args[0]))


def loss_with_teacher(model, teacher, X, Y, d: Distillation, taps=None):
    """One micro-step's distillation loss: the student's logits (and hidden states, through the
    (student, teacher) HiddenTaps) against the frozen teacher's."""
    logits, _ = model(X)  # no cross-entropy here: distillation_loss computes it
    with torch.no_grad():
        teacher_logits, _ = teacher(X)
    loss = distillation_loss(logits, teacher_logits, Y, d.kl, d.temperature, d.argmax,
                             data=1 - d.kl - d.argmax - d.hidden, end=d.end, reverse=d.reverse)
    if d.hidden:
        student, ref = taps
        mse = [(student.states[i].float() - ref.states[i].float()).pow(2).mean() / ref.states[i].float().pow(2).mean()
               for i in d.layers]
        loss = loss + d.hidden * sum(mse) / len(mse)
    return loss


def setup_adaptation(model, target, mode, order, stage_iters, layers_per_stage, train_layers, similarity_path):
    """The schedule for train.py's adapt_* settings, or None when target is ''; freezes the layers that
    will not train. Every bad combination is a ValueError here, before any training."""
    if not target:
        return None
    similarity = saved_similarity(similarity_path, model.config.n_layer, "adapt_similarity") if similarity_path else None
    adaptation = Adaptation(model.config.kv_source, target, mode, order, stage_iters, layers_per_stage, similarity)
    freeze(model, adaptation.target, train_layers)
    return adaptation


def saved_similarity(path, n_layer, setting="similarity"):
    """The n_layer x n_layer matrix an earlier calibration saved; a ValueError naming the setting otherwise."""
    if not os.path.isfile(path):
        raise ValueError(f"{setting}={path!r}: no such file (run `python adapt.py` first)")
    try:
        similarity = torch.load(path, weights_only=True)
    except Exception as e:  # torch's message runs over many lines: its first is enough
        raise ValueError(f"{setting}={path!r} is not a similarity file from adapt.py "
                         f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:150]})") from None
    if not (isinstance(similarity, torch.Tensor) and tuple(similarity.shape) == (n_layer, n_layer)):
        found = tuple(similarity.shape) if isinstance(similarity, torch.Tensor) else type(similarity).__name__
        raise ValueError(f"{setting}={path!r} is not the similarity matrix of a {n_layer}-layer "
                         f"model from adapt.py (found {found})")
    return similarity


def setup_distillation(s, student, rt, sampler):
    """(teacher, Distillation, (student, teacher) HiddenTaps or None) for train.py's distill_* settings s;
    (None, None, None) when no weight is above 0. With distill_cache the teacher is a TeacherTopK."""
    if s.distill_alpha + s.distill_argmax + s.distill_hidden <= 0:
        return None, None, None
    teacher_path = s.distill_teacher or (s.init_from if s.init_from not in ("scratch", "resume") else "")
    if not teacher_path:
        raise ConfigError("distillation needs its teacher: set distill_teacher=<the dense checkpoint adaptation "
                          "started from> (init_from is not a file here)")
    layers = tuple(parse_layer_list(s.distill_hidden_layers, student.config.n_layer, "distill_hidden_layers"))
    if s.distill_cache:
        check_distill_cache(s, student.config.vocab_size, rt.world_size)
    teacher, teacher_ckpt = load_teacher(teacher_path, student.config, rt.device)
    end = end_of_turn(s.distill_end_weight, teacher_ckpt, teacher_path)
    cast_frozen_linears(teacher, DTYPES[rt.dtype])  # it runs under autocast only: its weights cast once
    if s.distill_cache:
        steps = min(s.max_iters, s.distill_iters) if s.distill_iters else s.max_iters
        record = {"teacher_sha256": weights_sha256(teacher_ckpt), "data_sha256": tokens_sha256(sampler.data),
                  "seed": sampler.seed, "batch_size": s.batch_size, "block_size": s.block_size,
                  "micro_steps": s.gradient_accumulation_steps, "k": s.distill_cache_topk, "dtype": rt.dtype,
                  "steps": steps}
        teacher = (TeacherTopK.open(s.distill_cache, record) if os.path.exists(s.distill_cache) else
                   TeacherTopK.build(s.distill_cache, record, teacher, sampler, rt.autocast))
    distill = Distillation(s.distill_alpha, s.distill_argmax, s.distill_hidden, s.distill_temperature, layers,
                           s.distill_iters, end, s.distill_reverse)
    taps = (HiddenTap(student, layers), HiddenTap(teacher, layers)) if s.distill_hidden else None
    return teacher, distill, taps


def end_of_turn(weight, teacher_ckpt, teacher_path):
    """Distillation.end for distill_end_weight: None at 1, else (the teacher's eos token id, weight)."""
    if weight == 1:
        return None
    eos = special_ids(teacher_ckpt)[1]
    if weight < 0 or eos is None:
        why = "must be 0 or more" if weight < 0 else f"needs the teacher's eos token id, which {teacher_path} does not name"
        raise ConfigError(f"distill_end_weight={weight}: {why}; set distill_end_weight=1 to weight every position alike")
    return eos, float(weight)


def check_distill_cache(s, vocab_size, world_size):
    if not 1 <= s.distill_cache_topk < vocab_size:
        raise ConfigError(f"distill_cache_topk={s.distill_cache_topk}: must lie in 1..{vocab_size - 1} (the "
                          f"vocabulary has {vocab_size} tokens; the rest of it is one bucket)")
    if s.distill_temperature != 1 or s.distill_hidden or s.distill_reverse:
        raise ConfigError("distill_cache keeps only the teacher's top-k log-probabilities, at temperature 1, and no "
                          "hidden states (the reverse KL needs its whole distribution): set distill_temperature=1, "
                          "distill_hidden=0 and distill_reverse=0, or unset distill_cache")
    if world_size > 1:
        raise ConfigError("distill_cache serves a run of one process; under torchrun unset it (the teacher then "
                          "runs at every step)")


def tokens_sha256(data):
    return hashlib.sha256(memoryview(numpy.ascontiguousarray(data))).hexdigest()


def row_key(x):
    """A window of tokens as a dictionary key (16 bytes of blake2b over its token ids)."""
    return hashlib.blake2b(x.to("cpu", torch.int64).numpy().tobytes(), digest_size=16).digest()


class TeacherTopK:
    """The teacher's k likeliest tokens and their log-probabilities (temperature 1) at every position of every
    batch a run draws, made once before step 0 and kept in a file with a record of what drew the batches, so
    that the steps run no teacher forward and later runs on the same batches (another map, another trainable
    set) reuse it. Called like the teacher, it answers a batch with ((token ids, log-probabilities), None);
    distillation_loss then takes the KL over those tokens and one bucket for the rest (top_k_kl). The windows
    are found by their tokens, so a resumed run finds its batches too."""

    def __init__(self, keys, index, logprob):
        self.rows = {bytes(k.tolist()): i for i, k in enumerate(keys)}
        self.index, self.logprob = index, logprob

    def __call__(self, X):
        found = [self.rows.get(row_key(x)) for x in X]
        if None in found:
            raise RuntimeError("distill_cache holds no teacher output for this batch: it was made for other batches")
        at = torch.tensor(found)
        return (self.index[at].to(X.device, torch.int64), self.logprob[at].to(X.device)), None

    @staticmethod
    def build(path, record, teacher, sampler, autocast):
        began, keys, index, logprob = time.time(), {}, [], []
        for step in range(record["steps"]):
            for micro in range(record["micro_steps"]):
                X, _ = sampler.get("train", step, micro)
                with torch.no_grad(), autocast():
                    logits, _ = teacher(X)
                top = logits.float().log_softmax(-1).topk(record["k"], dim=-1)  # sorted: the argmax first
                for x, i, v in zip(X, top.indices, top.values):
                    if keys.setdefault(row_key(x), len(keys)) == len(index):  # a window drawn twice is kept once
                        index.append(i.to("cpu", torch.int32))
                        logprob.append(v.cpu())
            if (step + 1) % max(1, record["steps"] // 10) == 0 or step + 1 == record["steps"]:
                print(f"distill_cache: the teacher's top {record['k']} for step {step + 1}/{record['steps']}, "
                      f"{time.time() - began:.0f} s", flush=True)
        key_rows = torch.tensor([list(k) for k in keys], dtype=torch.uint8)
        saved = {"record": record, "keys": key_rows, "index": torch.stack(index), "logprob": torch.stack(logprob)}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save(saved, path + ".partial")
        os.replace(path + ".partial", path)  # a run stopped while saving leaves no half file under the name
        return TeacherTopK(key_rows, saved["index"], saved["logprob"])

    @staticmethod
    def open(path, record):
        try:
            saved = torch.load(path, weights_only=True, mmap=True)
            made = saved["record"]
        except Exception as e:
            raise ConfigError(f"distill_cache={path} is not a file of the teacher's top-k from train.py "
                              f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}); name another file, "
                              f"where it will be made") from None
        for name, wanted in record.items():
            if made.get(name) != wanted and not (name == "steps" and made.get(name, 0) >= wanted):
                raise ConfigError(f"distill_cache={path} was made for other batches: {name}={made.get(name)!r} there, "
                                  f"{wanted!r} in this run; name another file (made at the start) or remove that one")
        return TeacherTopK(saved["keys"], saved["index"], saved["logprob"])


def parse_layer_list(text, n_layer, name):
    try:
        layers = [int(t) for t in text.split(",")] if text.strip() else []
    except ValueError:
        raise ConfigError(f"{name}={text!r}: expected comma-separated layer indices like 10,20") from None
    if any(not 0 <= i < n_layer for i in layers):
        raise ConfigError(f"{name}={text!r}: layer indices must lie in 0..{n_layer - 1}")
    return layers


def load_teacher(path, student_config, device):
    """(the frozen dense teacher at the student's context length (it sees the student's batches), its checkpoint)."""
    teacher, ckpt = load_model(path, block_size=student_config.block_size)
    if teacher.config.vocab_size != student_config.vocab_size:
        raise ValueError(f"distill_teacher {path}: vocab_size {teacher.config.vocab_size} differs from the "
                         f"student's {student_config.vocab_size}")
    return teacher.requires_grad_(False).to(device), ckpt


# -----------------------------------------------------------------------------
# abrupt conversion of a dense model's weights


def attention_switched(model, target, kv_target=""):
    """train.py's adapt_attn_target: the model switched to that attn_source before training (convert_model:
    the sharers' Q and K projections dropped, every other weight kept), or the model itself when it has
    that map already (a resumed run). One sharing at a time: not with adapt_target."""
    if not target:
        return model
    if kv_target:
        raise ConfigError("adapt_attn_target and adapt_target: adapt one sharing at a time (attention or K/V)")
    try:
        attn_source = parse_kv_source(target, model.config.n_layer, "attn_source")
        return model if tuple(model.config.attn_source) == attn_source else convert_model(model, None, "own", attn_source)
    except ValueError as e:
        raise ConfigError(f"adapt_attn_target: {e}") from None


def convert_model(model, kv_source=None, kv_init="own", attn_source=None):
    """A new Llama with a dense model's weights converted to kv_source (share_kv_state) and
    attn_source (share_attn_state): every other weight is kept as it is."""
    if any(j != i for i, j in enumerate(model.config.kv_source)) or any(j != i for i, j in enumerate(model.config.attn_source)):
        raise ValueError("conversion starts from a dense model: every layer must own its K/V and attention")
    config = LlamaConfig(**{**model.config.to_dict(), "kv_source": kv_source, "attn_source": attn_source})
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = share_attn_state(share_kv_state(state, config.kv_source, kv_init), config.attn_source)
    return build_on_meta(config, state).to(model.rope_cos.device)


# -----------------------------------------------------------------------------
# layer-local distillation: each converted layer learns to give the dense layer's output


def teacher_activations(teacher, idx):
    """The residual stream entering each layer of the dense teacher, and the one leaving the last."""
    xs = {}
    hooks = [layer.input_layernorm.register_forward_pre_hook(lambda m, args, i=i: xs.__setitem__(i, args[0].detach()))
             for i, layer in enumerate(teacher.layers)]
    hooks.append(teacher.norm.register_forward_pre_hook(
        lambda m, args: xs.__setitem__(len(teacher.layers), args[0].detach())))
    try:
        with torch.no_grad():
            teacher(idx)
    finally:
        for h in hooks:
            h.remove()
    return xs


def layer_output(model, i, xs, cos, sin):
    """Layer i of model applied to the teacher's input of layer i, attending over the K/V that its owner
    computes from the teacher's input of the owner's layer."""
    layer, owner = model.layers[i], model.config.kv_source[i]
    with torch.no_grad():
        _, k, v = model.layers[owner].self_attn.project(model.layers[owner].input_layernorm(xs[owner]), cos, sin)
    h = layer.input_layernorm(xs[i])
    x = xs[i] + layer.self_attn(h, k, v, cos, sin, None)
    return x + layer.mlp(layer.post_attention_layernorm(x))


def local_distillation(student, teacher, batches, iters, learning_rate, log=print, qo_only=False):
    """Train each consumer layer of the student, alone, to reproduce the dense teacher's output of that
    layer from the teacher's input (mean squared error relative to the output's mean square). Cheap: one
    teacher forward and one layer's backward per consumer and step. Only the consumers' weights move
    (owners keep theirs, so the layers below are untouched). Returns the final relative errors."""
    consumers = [i for i, j in enumerate(student.config.kv_source) if j != i]
    if qo_only:  # the same trainable set as adapt_train_layers='consumers_qo'
        student.requires_grad_(False)
        params = consumer_qo_params(student, consumers)
        for p in params:
            p.requires_grad_(True)
    else:
        params = [p for i in consumers for p in student.layers[i].parameters()]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    errors = {}
    for it in range(iters):
        idx = batches[it % len(batches)]
        xs = teacher_activations(teacher, idx)
        pos = torch.arange(idx.shape[1], device=idx.device)
        cos, sin = student.rope_cos[pos], student.rope_sin[pos]
        total = 0.0
        for i in consumers:
            target = xs[i + 1]
            loss = (layer_output(student, i, xs, cos, sin) - target).pow(2).mean() / target.pow(2).mean()
            loss.backward()
            errors[i], total = loss.item(), total + loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if it % max(1, iters // 10) == 0 or it == iters - 1:
            log(f"local distillation {it + 1}/{iters}: mean relative error {total / max(1, len(consumers)):.4f}")
    return errors


# -----------------------------------------------------------------------------
# calibration: which earlier layer's K/V can each layer use at the least cost


@torch.no_grad()
def kv_similarity(model, batches):
    """How little each layer's output changes when it attends over an earlier layer's K/V instead of its
    own: S[i, j] = 1 - |attn_i(K_j, V_j) - attn_i(K_i, V_i)| / |x_i + attn_i(K_i, V_i)|, norms summed over
    the calibration batches, x_i the residual stream entering layer i. An (n_layer, n_layer) tensor, 1 on
    the diagonal; higher means cheaper sharing.

    This measures what sharing does. Comparing the K/V vectors of two layers directly (their cosine)
    says nothing on a real model: each layer projects into its own basis, and on SmolLM2 that cosine
    is below 0.17 for every pair of layers."""
    c = model.config
    if any(j != i for i, j in enumerate(c.kv_source)):
        raise ValueError("calibration needs a dense model: every layer must compute its own K/V")
    seen, hooks = {}, []
    for i, layer in enumerate(model.layers):  # what each attention call received, and the residual stream
        hooks.append(layer.self_attn.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, (args, out))))
        hooks.append(layer.input_layernorm.register_forward_pre_hook(
            lambda m, args, i=i: seen.__setitem__(("x", i), args[0])))
    n = c.n_layer
    change, scale = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    model.eval()
    try:
        for idx in batches:
            model(idx)
            for i, layer in enumerate(model.layers):
                (h, _, _, cos, sin, mask), own = seen[i]
                scale[i] += (seen[("x", i)] + own).double().pow(2).sum()
                for j in range(i):
                    _, k_j, v_j, _, _, _ = seen[j][0]
                    swapped = layer.self_attn.forward(h, k_j, v_j, cos, sin, mask)  # .forward: no hook
                    change[i, j] += (swapped - own).double().pow(2).sum()
    finally:
        for hook in hooks:
            hook.remove()
    return (1 - (change / scale[:, None]).sqrt()).float()


def layers_as_mapped(model, x, kv, kv_source, start, cos, sin, inputs=None):
    """The dense model's layers start.. run as if its map were kv_source: a consumer attends over its owner's
    K/V from kv {owner: (k, v)} (owners below start must be there; those from start on add theirs). inputs, a
    list, collects the residual stream entering each layer. The output of the last layer."""
    for i in range(start, len(model.layers)):
        layer, attn = model.layers[i], model.layers[i].self_attn
        if inputs is not None:
            inputs.append(x)
        h = layer.input_layernorm(x)
        q, k, v = attn.project(h, cos, sin)
        if kv_source[i] == i:
            kv[i] = (k, v)
        x = x + attn(h, *kv[kv_source[i]], cos, sin, None, q=q)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return x


@torch.no_grad()
def logit_kl_similarity(model, batches):
    """What each single switch costs the model's predictions, end to end: S[i, j] = exp(-KL), KL the mean
    per token of KL(dense || the dense model with only layer i attending over layer j's K/V), over the
    batches. 1 on the diagonal; higher means cheaper sharing, as kv_similarity's S.

    kv_similarity measures the change of layer i's output relative to the residual stream, whose square
    a few massive activations dominate on a real model: on SmolLM2 its map (8 layers reading layer 0)
    looked cheap there and cost 2.7x the teacher's perplexity. This measures the logits instead. It
    costs about n_layer^2 / 6 forward passes per batch (layer i's switch reruns only layers i and up)."""
    c = model.config
    if any(j != i for i, j in enumerate(c.kv_source)):
        raise ValueError("calibration needs a dense model: every layer must compute its own K/V")
    n, model = c.n_layer, model.eval()
    kl, count = torch.zeros(n, n, dtype=torch.float64), 0
    for idx in batches:
        cos, sin, xs, kv, dense_map = model.rope_cos[: idx.shape[1]], model.rope_sin[: idx.shape[1]], [], {}, list(range(n))
        x = layers_as_mapped(model, model.embed_tokens(idx), kv, dense_map, 0, cos, sin, xs)
        dense = F.log_softmax(model.lm_head(model.norm(x)).float(), dim=-1)
        p_dense = dense.exp()  # once per batch, not once per pair
        for i in range(1, n):
            for j in range(i):  # layer i reads j's K/V; the layers above compute their own
                y = layers_as_mapped(model, xs[i], {j: kv[j]}, dense_map[:i] + [j] + dense_map[i + 1:], i, cos, sin)
                switched = F.log_softmax(model.lm_head(model.norm(y)).float(), dim=-1)
                kl[i, j] += (p_dense * (dense - switched)).sum(-1).double().sum()
        count += idx.numel()
    return torch.exp(-kl / count).float()


def may_switch(kv_source, i, j) -> bool:
    """Whether layer i may read owner j's K/V in a map that keeps kv_source: i and j own theirs, none reads i."""
    return kv_source[i] == i and kv_source[j] == j and i not in kv_source[:i] + kv_source[i + 1:]


def switch_pairs(similarity, lowest=0) -> list:
    """Every (similarity, consumer i, source j < i) with i >= lowest, the most similar first."""
    n = similarity.shape[0]
    return sorted(((float(similarity[i, j]), i, j) for i in range(max(lowest, 1), n) for j in range(i)), reverse=True)


def too_few_switches(n_share, by, made, lowest) -> ValueError:
    return ValueError(f"n_share={n_share}: {by} made only {made} consumers{f' from layer {lowest} up' if lowest else ''} "
                      "before no allowed pair was left (a layer others read stays an owner): ask for fewer"
                      + (", or a lower lowest_consumer" if lowest else ""))


def propose_kv_source(similarity, n_share, lowest=0) -> tuple:
    """Greedily make the n_share most similar (layer, earlier layer) pairs consumer and owner, consumers from
    layer `lowest` up, keeping the map valid: owners stay owners, consumers are never sources."""
    n = similarity.shape[0]
    if not 0 <= n_share < n:
        raise ValueError(f"n_share={n_share}: can share between 0 and n_layer-1={n - 1} layers")
    pairs = switch_pairs(similarity, lowest)
    kv_source = list(range(n))
    shared = 0
    for _, i, j in pairs:
        if shared == n_share:
            break
        if may_switch(kv_source, i, j):
            kv_source[i] = j
            shared += 1
    if shared < n_share:
        raise too_few_switches(n_share, "the best single switches", shared, lowest)
    return tuple(kv_source)


@torch.no_grad()
def search_kv_source(model, batches, similarity, n_share, candidates, log=print, lowest=0) -> tuple:
    """propose_kv_source's greedy pick with the switches' interplay seen: the map grows one switch at a time,
    each the one of the `candidates` best single switches still allowed (by `similarity`) whose addition to
    those already chosen costs the least KL(dense || dense with the map), measured on the batches. A single
    switch's cost says little about eight together (KV 0.50's greedy map, untrained, 3.2x the teacher's
    perplexity). Costs candidates x n_share partial forwards per batch (a switch at layer i reruns i and up).
    Greedy steps can end worse than the single switches' own map (propose_kv_source): the cheaper is returned.
    On SmolLM2, 512 tokens were too few (the search fitted them); 4,096 were not, and 16,384 tokens or 32
    candidates chose the map that 4,096 tokens and 16 candidates chose (docs/keep_skills.md)."""
    n = model.config.n_layer
    if not 0 <= n_share < n:
        raise ValueError(f"n_share={n_share}: can share between 0 and n_layer-1={n - 1} layers")
    kv_source, model = list(range(n)), model.eval()
    ranked = switch_pairs(similarity, lowest)
    runs = []  # per batch: rope tables, the dense log-probabilities and probabilities, the mapped pass's states
    for idx in batches:
        cos, sin = model.rope_cos[: idx.shape[1]], model.rope_sin[: idx.shape[1]]
        dense = F.log_softmax(model.lm_head(model.norm(layers_as_mapped(model, model.embed_tokens(idx), {},
                                                                         kv_source, 0, cos, sin))).float(), dim=-1)
        runs.append({"cos": cos, "sin": sin, "dense": dense, "p": dense.exp(), "idx": idx})
    count = sum(r["idx"].numel() for r in runs)

    def cost(kv_map, start):  # mean KL per token of the dense model run with kv_map, layers below start as kept
        kl = 0.0
        for r in runs:
            kv = {j: r["kv"][j] for j in range(start) if kv_map[j] == j}
            y = layers_as_mapped(model, r["inputs"][start], kv, kv_map, start, r["cos"], r["sin"])
            switched = F.log_softmax(model.lm_head(model.norm(y)).float(), dim=-1)
            kl += float((r["p"] * (r["dense"] - switched)).sum(-1).double().sum())
        return kl / count

    for step in range(n_share):
        for r in runs:  # the states of the map so far, from which every candidate reruns its layer and up
            r["inputs"], r["kv"] = [], {}
            layers_as_mapped(model, model.embed_tokens(r["idx"]), r["kv"], kv_source, 0, r["cos"], r["sin"], r["inputs"])
        allowed = [(i, j) for _, i, j in ranked if may_switch(kv_source, i, j)]
        if not allowed:
            raise too_few_switches(n_share, "the search", step, lowest)
        scored = [(cost(kv_source[:i] + [j] + kv_source[i + 1:], i), i, j) for i, j in allowed[:candidates]]
        kl, i, j = min(scored)
        kv_source[i] = j
        log(f"switch {step + 1} of {n_share}: layer {i} reads layer {j}'s K/V, KL {kl:.4f} with those before "
            f"(the best single switch allowed: layer {allowed[0][0]} reads {allowed[0][1]})")
    try:  # greedy steps need not beat the best single switches' map: keep the cheaper
        single = list(propose_kv_source(similarity, n_share, lowest))
    except ValueError:  # that greedy pick blocked itself
        single = kv_source
    if single != kv_source:
        single_kl = cost(single, 0)
        log(f"the best single switches' map {','.join(map(str, single))}: KL {single_kl:.4f}, the search's {kl:.4f}: "
            f"{'that map' if single_kl < kl else 'the search'} kept")
        kv_source = single if single_kl < kl else kv_source
    return tuple(kv_source)


@torch.no_grad()
def attention_similarity(model, batches):
    """Cosine similarity of the attention probability maps of every pair of layers, per head over the
    causal positions (the lower triangle, diagonal included), averaged over heads: (n_layer, n_layer).
    EchoAtt's criterion: layers that attend alike can share one layer's pattern."""
    c = model.config
    seen, hooks = {}, []
    for i, layer in enumerate(model.layers):
        hooks.append(layer.self_attn.register_forward_hook(
            lambda m, args, kwargs, out, i=i: seen.__setitem__(i, (kwargs["q"], args[1])), with_kwargs=True))
    n = c.n_layer
    dots = torch.zeros(c.n_head, n, n, dtype=torch.float64)
    model.eval()
    try:
        for idx in batches:
            model(idx)
            T = idx.shape[1]
            causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=idx.device))
            maps = []
            for i in range(n):
                q, k = seen[i]
                k = k.repeat_interleave(c.n_head // c.n_kv_head, dim=1)
                scores = (q.float() @ k.float().transpose(-1, -2)) / c.head_dim ** 0.5
                probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
                maps.append(probs[..., causal].transpose(0, 1).reshape(c.n_head, -1).double())  # (heads, B * pairs)
            x = torch.stack(maps, dim=1)  # (heads, layers, values)
            dots += x @ x.transpose(-1, -2)
    finally:
        for h in hooks:
            h.remove()
    norms = dots.diagonal(dim1=-2, dim2=-1).sqrt()
    return (dots / (norms[:, :, None] * norms[:, None, :]).clamp_min(1e-30)).mean(0).float()


def propose_attn_source(similarity, n_share, keep_first=None, keep_last=1) -> tuple:
    """Contiguous blocks of inner layers that share their first layer's attention pattern, grown by
    merging the two adjacent blocks whose layers are most like the first block's source (mean
    similarity), until n_share layers share. The first keep_first (default: 2, 1 below 12 layers) and
    last keep_last layers stay unshared, as EchoAtt keeps them."""
    n = similarity.shape[0]
    keep_first = (2 if n >= 12 else 1) if keep_first is None else keep_first
    inner = list(range(keep_first, n - keep_last))
    if not 0 <= n_share <= max(0, len(inner) - 1):
        raise ValueError(f"n_share={n_share}: with the first {keep_first} and last {keep_last} layers unshared, "
                         f"between 0 and {max(0, len(inner) - 1)} layers can share")
    blocks = [[i] for i in inner]
    for _ in range(n_share):  # each merge makes one more layer (the second block's first) a sharer
        _, k = max((float(similarity[blocks[k + 1], blocks[k][0]].mean()), k) for k in range(len(blocks) - 1))
        blocks[k:k + 2] = [blocks[k] + blocks[k + 1]]
    attn_source = list(range(n))
    for block in blocks:
        for i in block:
            attn_source[i] = block[0]
    return tuple(attn_source)


def heatmap_available() -> bool:
    """matplotlib is a dev extra; calibration asks before its minutes of work, so a missing one costs the
    picture only, never the proposed map."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def save_heatmap(similarity, path, title="K/V sharing: 1 - relative change of the layer's output", shared="K/V"):
    """The lower triangle (the pairs a map can use), coloured over the range of its own values, so the
    differences the calibration acts on are visible."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = similarity.shape[0]
    lower = torch.tril(torch.ones(n, n, dtype=torch.bool), diagonal=-1)
    values = similarity.masked_fill(~lower, float("nan")).numpy()
    fig, ax = plt.subplots(figsize=(1.5 + 0.3 * n, 1 + 0.3 * n))
    vals = similarity[lower]
    im = ax.imshow(values, cmap="viridis", vmin=float(vals.min()) if n > 1 else 0, vmax=float(vals.max()) if n > 1 else 1)
    ax.set_xlabel(f"earlier layer j (whose {shared} would be reused)")
    ax.set_ylabel(f"layer i (would reuse j's {shared})")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def token_batches(model, ckpt, dataset, split, n_batches, batch_size, block_size, seed):
    """n_batches batches of the checkpoint's dataset (or `dataset`), split 'train' or 'val'."""
    dataset = dataset or (ckpt.get("config") or {}).get("dataset")
    if not dataset:
        raise ConfigError("the checkpoint does not name its dataset: pass --dataset=NAME (a folder in data/)")
    data_dir = dataset_dir(dataset)
    sampler = BatchSampler(open_tokens(data_dir, split, load_meta(data_dir)), block_size or model.config.block_size,
                           batch_size, seed, "cpu")
    return [sampler.get("eval_val" if split == "val" else "train", 0, k)[0] for k in range(n_batches)]


def converted_checkpoint(model, ckpt, dataset):
    """A checkpoint for the converted model that keeps what the source carried for sampling."""
    out = {"model": model.state_dict(), "model_config": model.config.to_dict(),
           "config": {"dataset": dataset or (ckpt.get("config") or {}).get("dataset")}}
    return out | {key: ckpt[key] for key in SAMPLING_KEYS if key in ckpt}


def convert_command(s, model, ckpt):
    if not s.out:
        raise ConfigError("--convert_to and --attn_to need --out=<checkpoint file to write>")
    lock = claim_destination(s.out, s.overwrite, "--out")  # before the work; a training's out_dir: its lock
    try:
        return convert_and_save(s, model, ckpt)
    finally:
        if lock is not None:
            lock.close()


def convert_and_save(s, model, ckpt):
    n_layer = model.config.n_layer
    for flag, spec in (("--convert_to", s.convert_to), ("--attn_to", s.attn_to)):  # each error named as given
        if spec:
            parse_kv_source(spec, n_layer, flag)
    try:
        student = convert_model(model, s.convert_to or None, s.kv_init, s.attn_to or None)
    except ValueError as e:
        raise ConfigError(f"--convert_to={s.convert_to or 'dense'} with --attn_to={s.attn_to or 'dense'}: {e}") from None
    print(f"converted to kv_source {list(student.config.kv_source)} ({s.kv_init} K/V init), "
          f"attn_source {list(student.config.attn_source)}")
    if s.local_iters > 0:
        batches = token_batches(model, ckpt, s.dataset, "train", s.batches, s.batch_size, s.block_size, s.seed)
        local_distillation(student, model.requires_grad_(False), batches, s.local_iters, s.local_lr,
                           qo_only=s.local_train == "consumers_qo")
        broken = [name for name, t in student.state_dict().items() if not torch.isfinite(t).all()]
        if broken:
            raise ConfigError(f"local distillation diverged at local_lr={s.local_lr}: {broken[0]} is not finite "
                              f"({len(broken)} weights); nothing was saved. Lower --local_lr")
    save_checkpoint(converted_checkpoint(student, ckpt, s.dataset), s.out)
    print(f"saved {s.out}: train it on with train.py --init_from={s.out}, or sample it with sample.py")
    return student


def print_similarity(sim, criterion="kv"):
    n = sim.shape[0]
    print({"kv": "1 - relative change of layer i's output when it uses layer j's K/V (row: i, column: earlier j)",
           "logits": "exp(-KL(dense || dense with layer i alone using layer j's K/V)) (row: i, column: earlier j)",
           "attention": "cosine similarity of the attention maps of layer i and earlier layer j"}[criterion])
    print("     " + "".join(f"{j:6d}" for j in range(n)))
    for i in range(n):
        print(f"{i:4d} " + "".join(f"{sim[i, j]:6.2f}" for j in range(i + 1)))


def check_settings(s, explicit):
    """A ConfigError naming the setting, before the model is loaded."""
    for key, low in (("batches", 1), ("batch_size", 1), ("block_size", 0), ("local_iters", 0), ("n_share", -1),
                     ("search_batches", 0)):
        if getattr(s, key) < low:
            raise ConfigError(f"{key}={getattr(s, key)} must be >= {low}")
    if not (s.local_lr > 0 and s.local_lr != float("inf")):
        raise ConfigError(f"local_lr={s.local_lr} must be a finite number > 0")
    converting = bool(s.convert_to or s.attn_to)
    for_convert = {"local_iters", "local_lr", "local_train", "overwrite"} & explicit
    for_calibration = {"n_share", "criterion", "split", "similarity", "dtype", "search", "search_batches",
                       "lowest_consumer"} & explicit
    if s.search < 0:
        raise ConfigError(f"search={s.search} must be >= 0 (0: the best single switches; k: choose among k at a time)")
    if s.search_batches and not s.search:
        raise ConfigError(f"search_batches={s.search_batches} applies only with --search=K (the map searched switch by switch)")
    if 0 < s.search_batches < s.batches:
        raise ConfigError(f"search_batches={s.search_batches} is below batches={s.batches}: the search's batches "
                          "include the matrix's; give search_batches >= batches, or 0 for the same")
    if s.search and s.criterion == "attention":
        raise ConfigError("search applies to K/V maps (--criterion=kv or logits), not to --criterion=attention")
    if s.lowest_consumer < 0 or (s.lowest_consumer and s.criterion == "attention"):
        raise ConfigError(f"lowest_consumer={s.lowest_consumer}: give a layer >= 0, for K/V maps (--criterion=kv or "
                          "logits), not --criterion=attention")
    if for_convert and not converting:
        raise ConfigError(f"{', '.join(sorted(for_convert))} appl{'ies' if len(for_convert) == 1 else 'y'} only with "
                          "--convert_to or --attn_to (conversion)")
    if "kv_init" in explicit and not s.convert_to:
        raise ConfigError("kv_init applies only with --convert_to (it sets the K/V of the layers that will share)")
    if for_calibration and converting:
        raise ConfigError(f"{', '.join(sorted(for_calibration))} appl{'ies' if len(for_calibration) == 1 else 'y'} "
                          "only to calibration, not with --convert_to or --attn_to")


def main(argv):
    s, explicit = configure(DEFAULTS, argv, __doc__, {"kv_init": ("own", "mean"), "criterion": ("kv", "logits", "attention"),
                                                    "local_train": ("layers", "consumers_qo"), "split": ("train", "val"),
                                                    "dtype": ("float32", "bfloat16")})
    check_settings(s, explicit)
    warn_slow_bf16(s.dtype, "cpu")
    apply_threads(s.threads)  # the model stays on the CPU here
    with_heatmap = bool(s.convert_to or s.attn_to) or heatmap_available()  # calibration: asked before any work
    if not with_heatmap:
        print("matplotlib is not installed: the heatmap (.png) is skipped, the map is still computed; "
              "for the picture run ./setup.sh --dev (or pip install matplotlib)")
    model, ckpt = load_model(s.init_from)
    if s.block_size > model.config.block_size:
        raise ConfigError(f"block_size={s.block_size} exceeds the model's block_size={model.config.block_size}")
    if s.convert_to or s.attn_to:
        convert_command(s, model, ckpt)
        return 0
    n_share_ = s.n_share if s.n_share >= 0 else model.config.n_layer // 2
    similarity, name, propose = CRITERIA[s.criterion]
    search_batches = [] if s.similarity and not s.search else token_batches(  # batch k is the same for any count
        model, ckpt, s.dataset, s.split, max(s.batches, s.search_batches), s.batch_size, s.block_size, s.seed)
    batches = search_batches[:s.batches]  # the matrix's
    with linears_in(model.requires_grad_(False), DTYPES[s.dtype]), autocast("cpu", s.dtype):
        if s.similarity:
            sim = saved_similarity(s.similarity, model.config.n_layer)
        else:
            with Heartbeat(f"calibration: {len(batches)} batches through {model.config.n_layer} layers", len(batches)) as beat:
                sim = similarity(model, beat.iter(batches)).float()  # a line after 5 s and every 30 s: minutes on a real model
        print_similarity(sim, s.criterion)
        out_dir = s.out or (s.init_from if os.path.isdir(s.init_from) else os.path.dirname(os.path.abspath(s.init_from)))
        os.makedirs(out_dir, exist_ok=True)
        torch.save(sim, os.path.join(out_dir, f"{name}.pt"))  # before the proposal: kept if that fails
        if with_heatmap:
            save_heatmap(sim, os.path.join(out_dir, f"{name}.png"), HEATMAP_TITLES[s.criterion],
                         "attention pattern" if s.criterion == "attention" else "K/V")
        print(f"saved {out_dir}/{name}.pt" + (f" and {out_dir}/{name}.png" if with_heatmap else ""))
        try:
            lowest = {"lowest": s.lowest_consumer} if s.criterion != "attention" else {}
            proposal = (search_kv_source(model, search_batches, sim, n_share_, s.search, **lowest) if s.search
                        else propose(sim, n_share_, **lowest))
        except ValueError as e:
            raise ConfigError(f"{e} (the matrix is saved: --similarity={out_dir}/{name}.pt proposes again in seconds)") from None
    print(f"proposed {'attn_source' if s.criterion == 'attention' else 'kv_source'} sharing {n_share_} layers: "
          f"{','.join(map(str, proposal))}")
    return proposal


HEATMAP_TITLES = {"kv": "K/V sharing: 1 - relative change of the layer's output",
                  "logits": "K/V sharing: exp(-KL of the logits) when only layer i switches",
                  "attention": "cosine similarity of attention maps"}
CRITERIA = {"kv": (kv_similarity, "kv_similarity", propose_kv_source),
            "logits": (logit_kl_similarity, "logit_kl_similarity", propose_kv_source),
            "attention": (attention_similarity, "attn_similarity", propose_attn_source)}


if __name__ == "__main__":
    sys.exit(run_script(main))
