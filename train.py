"""
Train a dense or KV-shared Llama (model.py) in the nanoGPT manner.

    .venv/bin/python train.py                                   # the default: a small KV-shared char model, CPU ok
    .venv/bin/python train.py config/train_shakespeare_char_dense.py          # its dense twin
    .venv/bin/python train.py config/train_shakespeare_char.py --kv_source=cla:2 --out_dir=out-cla2 --max_iters=500
    .venv/bin/python train.py --init_from=resume                # continue out_dir/ckpt.pt exactly
    .venv/bin/torchrun --standalone --nproc_per_node=8 train.py config/train_tinyllama_shared.py   # DDP

Every setting below is a plain global. Arguments apply in order (configurator.py): a path is a config
file (Python assigning some of these names), --key=value overrides one setting. Unknown names and
values of the wrong type are rejected with the list of what is allowed. Nothing imports this file:
tests call main(argv).
"""

import errno
import hashlib
import json
import math
import os
import signal
import socket
import sys
import threading
import time

import torch

import sharding
from adapt import Distillation, HiddenTap, load_teacher, loss_with_teacher, setup_adaptation
from checkpoint import (CKPT_NAME, SAMPLING_KEYS, blend_state, load_checkpoint, model_from_checkpoint,
                        remove_stale_temps, restore_rng, rng_state, save_checkpoint)
from configurator import (ConfigError, canonical_dtype, close_runtime, configure, init_runtime, peak_flops_for,
                          run_script, settings_from)
from dataset import BatchSampler, dataset_dir, ensure_dataset, load_meta, open_tokens
from model import Llama, LlamaConfig, parse_kv_source
from tokenizer import tokenizer_identity, tokenizer_json_identity

# -----------------------------------------------------------------------------
# settings (the embedded default run = config/train_shakespeare_char.py)
# I/O
out_dir = "out-shakespeare-char"
eval_interval = 100          # evaluate (and checkpoint) every this many iterations, and at the end
log_interval = 10            # print/log the training loss every this many iterations
eval_iters = 20              # batches per split for each evaluation
eval_only = False            # evaluate once and exit
always_save_checkpoint = True  # checkpoint at every evaluation, not only when val loss improves
init_from = "scratch"        # 'scratch', 'resume' (out_dir/ckpt.pt) or the path of a checkpoint file
overwrite = False            # let a new run replace out_dir's checkpoint of another model (see check_out_dir)
allow_tokenizer_mismatch = False  # train a checkpoint on data of another tokenizer (see check_tokenizer)
# data
dataset = "shakespeare_char"  # a directory under data/ or a path to one (train.bin, val.bin, meta.json)
auto_prepare = True          # run the offline prepare.py of shakespeare_char / shakespeare if data is missing
batch_size = 16              # sequences per micro-step per process
block_size = 128             # sequence length
gradient_accumulation_steps = 1  # micro-steps per optimizer step, in total over all DDP ranks
# model
n_layer = 4
n_head = 4
n_kv_head = 2
n_embd = 128
intermediate_size = 384
vocab_size = 0               # 0: the dataset's vocabulary (meta.json)
rope_theta = 10000.0
norm_eps = 1e-5
tie_embeddings = False
kv_source = "upper:half"     # 'dense', 'cla:N', 'upper:K', 'upper:half' or a list like 0,0,2,2
# optimizer: AdamW, linear warmup then cosine decay to min_lr
learning_rate = 2e-3
max_iters = 300
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0              # 0: no clipping
decay_lr = True
warmup_iters = 30
lr_decay_iters = 0           # where the cosine decay reaches min_lr; 0: at max_iters (the schedule follows it)
min_lr = 2e-4
# system
device = "auto"              # 'auto' (cuda if present, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"               # 'auto', 'float32', 'bfloat16', 'float16' (see resolve_dtype for auto)
compile = "auto"             # True, False or 'auto' (on for CUDA, off on CPU: see resolve_compile)
backend = "auto"             # DDP backend: 'auto' (nccl on CUDA, gloo on CPU), 'nccl', 'gloo'
fsdp = False                 # under torchrun: shard weights, gradients and AdamW state with FSDP2 (sharding.py)
seed = 1337
peak_flops = 0.0             # per-device peak FLOP/s for MFU; 0: the GPU's datasheet value (no MFU on CPU)
# layer-wise adaptation of a pretrained model into a KV-shared one (adapt.py); off while adapt_target is ''
adapt_target = ""            # the kv_source to reach, e.g. 'upper:half'; start from init_from=<dense checkpoint>
adapt_mode = "gradual"       # 'gradual' (stage by stage, blending K/V) or 'abrupt' (all layers at iteration 0)
adapt_order = "top-down"     # 'top-down', 'bottom-up', 'similarity' (needs adapt_similarity) or a list like 5,4,3
adapt_stage_iters = 100      # iterations per stage (gradual)
adapt_layers_per_stage = 1
adapt_train_layers = "all"   # 'all', 'converted' (consumers and their owners), 'upward' (lowest consumer and up)
adapt_similarity = ""        # kv_similarity.pt from `python adapt.py`, for adapt_order='similarity'
# learning from a frozen dense teacher (adapt.Distillation): loss = (1 - a - g - h) * CE(data)
#   + a * T^2 * KL(teacher || student) + g * CE(teacher's argmax) + h * MSE(hidden states); all 0: no teacher
distill_alpha = 0.0          # a: soft logits at distill_temperature
distill_temperature = 1.0
distill_argmax = 0.0         # g: the teacher's argmax tokens as labels (EchoAtt: 0.5)
distill_hidden = 0.0         # h: residual stream entering distill_hidden_layers (EchoAtt: 0.25, with a = 0.25)
distill_hidden_layers = ""   # e.g. '10,20' (EchoAtt: the boundaries of the shared blocks)
distill_iters = 0            # stage 1 length; then plain CE without the teacher (stage 2). 0: the whole run
distill_teacher = ""         # the teacher's checkpoint; '' = the init_from file (name it when resuming)
DEFAULTS = settings_from(globals())
CHOICES = {"dtype": ("auto", "float32", "bfloat16", "float16"), "backend": ("auto", "nccl", "gloo"),
           "compile": ("auto", True, False)}
MODEL_KEYS = ("n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size", "vocab_size", "block_size",
              "rope_theta", "norm_eps", "tie_embeddings", "kv_source")


# Ranges checked at the start, naming the setting: a wrong value is otherwise found late and under another
# name (a NaN loss, an optimizer's "Invalid learning rate") or not at all (a negative warm-up).
INT_LOWS = {"batch_size": 1, "block_size": 1, "gradient_accumulation_steps": 1, "eval_interval": 1,
            "log_interval": 1, "eval_iters": 1, "max_iters": 0, "warmup_iters": 0, "lr_decay_iters": 0,
            "adapt_stage_iters": 1, "adapt_layers_per_stage": 1, "distill_iters": 0}
FLOAT_RULES = {"learning_rate": (lambda v: v > 0, "> 0"), "min_lr": (lambda v: v >= 0, ">= 0"),
               "weight_decay": (lambda v: v >= 0, ">= 0"), "beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
               "beta2": (lambda v: 0 <= v < 1, "in [0, 1)"), "grad_clip": (lambda v: v >= 0, ">= 0 (0: no clipping)"),
               "rope_theta": (lambda v: v > 0, "> 0"), "norm_eps": (lambda v: v > 0, "> 0"),
               "peak_flops": (lambda v: v >= 0, ">= 0 (0: the GPU's datasheet value)")}


def check_settings(s, explicit, world_size, torchrun=False):
    """Settings that are wrong whatever the model and data: a ConfigError naming the setting."""
    if s.fsdp:
        check_fsdp(s, torchrun)
    for key, low in INT_LOWS.items():
        if getattr(s, key) < low:
            raise ConfigError(f"{key}={getattr(s, key)} must be >= {low}")
    for key, (ok, want) in FLOAT_RULES.items():
        if not (math.isfinite(getattr(s, key)) and ok(getattr(s, key))):
            raise ConfigError(f"{key}={getattr(s, key)} must be a finite number {want}")
    if s.decay_lr and s.min_lr > s.learning_rate:
        raise ConfigError(f"min_lr={s.min_lr} is above learning_rate={s.learning_rate}: the schedule would rise "
                          "while it decays; lower min_lr (often learning_rate / 10) or set decay_lr=False")
    if not 0 <= s.seed <= 2 ** 32 - world_size:  # numpy seeds each rank with seed + rank, below 2**32
        raise ConfigError(f"seed={s.seed} must lie in [0, 2**32 - number of ranks]")
    if s.gradient_accumulation_steps % world_size:
        raise ConfigError(f"gradient_accumulation_steps={s.gradient_accumulation_steps} does not divide over "
                          f"{world_size} ranks: it counts micro-steps in total over all ranks, make it a "
                          f"multiple of {world_size}")
    weights = (s.distill_alpha, s.distill_argmax, s.distill_hidden)
    if not all(map(math.isfinite, weights)) or min(weights) < 0 or sum(weights) > 1 or \
            not (math.isfinite(s.distill_temperature) and s.distill_temperature > 0):
        raise ConfigError("distill_alpha, distill_argmax and distill_hidden must be >= 0 with a sum <= 1 (the data's "
                          "cross-entropy gets the rest), and distill_temperature > 0")
    if s.distill_hidden > 0 and not s.distill_hidden_layers:
        raise ConfigError("distill_hidden > 0 needs distill_hidden_layers, e.g. --distill_hidden_layers=10,20")
    check_applicable(s, explicit)


def check_fsdp(s, torchrun):
    """What --fsdp=True cannot take, refused before any work."""
    if not torchrun:
        raise ConfigError("fsdp=True shards over the processes of torchrun: start it with "
                          "`.venv/bin/torchrun --standalone --nproc_per_node=N train.py ... --fsdp=True`")
    if s.compile is True:
        raise ConfigError("fsdp=True with compile=True is not supported here (untested): drop --compile or set "
                          "--compile=False")
    gpu = s.device.startswith("cuda") or (s.device == "auto" and torch.cuda.is_available())
    if canonical_dtype(s.dtype) == "float16" or (s.dtype == "auto" and gpu and not torch.cuda.is_bf16_supported()):
        raise ConfigError("fsdp=True with dtype=float16 is not supported (its GradScaler does not shard): use "
                          "--dtype=bfloat16")
    if s.device == "mps":
        raise ConfigError("fsdp=True needs CPUs (gloo) or CUDA GPUs (nccl), not device=mps")


def check_applicable(s, explicit):
    """Settings given for something this run does not do are an error, not silently ignored."""
    distilling = s.distill_alpha + s.distill_argmax + s.distill_hidden > 0
    groups = ((not s.adapt_target, lambda k: k.startswith("adapt_") and k != "adapt_target",
               "an adaptation run: set adapt_target too"),
              (not distilling, lambda k: k.startswith("distill_") and k not in ("distill_alpha", "distill_argmax",
                                                                                "distill_hidden"),
               "distillation: set distill_alpha, distill_argmax or distill_hidden > 0 too"))
    for off, belongs, what in groups:
        unused = sorted(k for k in explicit if belongs(k)) if off else []
        if unused:
            raise ConfigError(f"{', '.join(unused)} appl{'ies' if len(unused) == 1 else 'y'} only to {what}, "
                              "or drop it")
    if s.adapt_similarity and s.adapt_order != "similarity":
        raise ConfigError(f"adapt_similarity is read only with adapt_order=similarity (adapt_order={s.adapt_order!r})")


def accumulation_for_world(s, explicit, world_size):
    """`torchrun --nproc_per_node=N train.py` must run as written: gradient_accumulation_steps counts
    micro-steps over all ranks, so unless it was given it becomes the smallest multiple of the number of
    ranks at or above it. The note to log, or None when nothing changed."""
    steps = s.gradient_accumulation_steps
    if "gradient_accumulation_steps" in explicit or steps % world_size == 0:
        return None
    s.gradient_accumulation_steps = -(-steps // world_size) * world_size
    return (f"note: gradient_accumulation_steps={s.gradient_accumulation_steps} (not {steps}): the smallest "
            f"multiple of the {world_size} ranks; set it explicitly to choose another")


def check_out_dir_writable(out_dir):
    """out_dir must be, or be creatable as, a writable directory: found now rather than at the first save,
    after the work. Nothing is created here, so a bad setting found later leaves nothing behind."""
    if not out_dir:
        raise ConfigError("out_dir='': name the directory for ckpt.pt and log.jsonl")
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"out_dir={out_dir!r} cannot be a directory: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"out_dir={out_dir!r} is not writable: no write permission on {existing}")


def use_compile(setting, device_type, fsdp=False):
    """'auto': compile on CUDA, not on CPU. Measured for the default model on the idle 2-core CPU
    (fp32): a cold torch.compile took ~22 s, then trained ~19% faster (~20,000 vs ~16,800 tokens/s).
    That pays back after ~2.3 M tokens; the default run is 0.6 M tokens, so compiling would make it
    slower. Use --compile=True for longer CPU runs. Under FSDP 'auto' is off (compile is not tried there)."""
    return device_type == "cuda" and not fsdp if setting == "auto" else bool(setting)


# -----------------------------------------------------------------------------
# the model: from scratch, or from a checkpoint whose architecture wins


def checkpoint_to_start_from(s):
    """(path, checkpoint dict) for init_from='resume' or a file; (None, None) from scratch."""
    if s.init_from == "scratch":
        return None, None
    path = os.path.join(s.out_dir, CKPT_NAME) if s.init_from == "resume" else s.init_from
    if not os.path.isfile(path):
        raise ConfigError(f"init_from=resume but {path} does not exist: train from scratch first, or set init_from "
                          "to a checkpoint file" if s.init_from == "resume" else
                          f"init_from={path!r}: no such file (use 'scratch', 'resume' or a checkpoint path)")
    return path, load_checkpoint(path)


def model_settings_conflicts(s, explicit, ckpt_config, resume):
    """Model settings given explicitly that disagree with the checkpoint's architecture."""
    conflicts = []
    for k in MODEL_KEYS:
        if k not in explicit or k not in ckpt_config:
            continue
        mine, theirs = getattr(s, k), ckpt_config[k]
        if k == "kv_source":
            try:
                same = parse_kv_source(mine, ckpt_config["n_layer"]) == parse_kv_source(theirs, ckpt_config["n_layer"])
            except ValueError:
                same = False
        elif k == "block_size" and not resume:
            same = True  # finetuning at another context length is fine: it only sizes RoPE tables
        else:
            same = mine == theirs or (k == "vocab_size" and mine == 0)
        if not same:
            conflicts.append(f"{k}={mine!r} (checkpoint: {theirs!r})")
    return conflicts


def settings_from_checkpoint(s, explicit, ckpt):
    """On resume the model settings not given are the run's (its saved config, else the model's), not this
    file's defaults: block_size, which sizes the batches, and what the log and the next checkpoint record;
    and so are max_iters and lr_decay_iters: a resumed run continues its own schedule unless told otherwise."""
    saved = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    for key in MODEL_KEYS + ("max_iters", "lr_decay_iters"):
        if key not in explicit and (key in saved or key in ckpt["model_config"]):
            value = saved.get(key, ckpt["model_config"].get(key))
            setattr(s, key, ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value)


def build_model(s, explicit, ckpt, path, data_vocab):
    """The model to train, on the CPU: from the settings, or with the checkpoint's architecture and
    weights (a model setting given explicitly that disagrees with it is an error)."""
    if ckpt is None:
        mc = {k: getattr(s, k) for k in MODEL_KEYS}
        mc["vocab_size"] = mc["vocab_size"] or data_vocab
        if mc["vocab_size"] < data_vocab:
            raise ConfigError(f"vocab_size={mc['vocab_size']} is smaller than the dataset's vocabulary ({data_vocab})")
        try:
            return Llama(LlamaConfig(**mc))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"bad model settings: {e}") from None
    conflicts = model_settings_conflicts(s, explicit, ckpt["model_config"], s.init_from == "resume")
    if conflicts:
        raise ConfigError(f"the settings conflict with checkpoint {path}: {'; '.join(conflicts)}. Drop them to use "
                          "the checkpoint's values, or start from scratch in another out_dir.")
    if ckpt["model_config"]["vocab_size"] < data_vocab:
        raise ConfigError(f"checkpoint {path} has vocab_size={ckpt['model_config']['vocab_size']}, smaller than the "
                          f"dataset's vocabulary ({data_vocab}): it was trained with another tokenizer")
    changes = {"block_size": s.block_size} if "block_size" in explicit and s.init_from != "resume" else {}
    model = model_from_checkpoint(ckpt, **changes)
    return model


def trained_tokenizer(ckpt):
    """(description, identity) of the tokenizer a checkpoint's model was trained with; None if unknown."""
    if ckpt.get("tokenizer_json"):
        return "the Hugging Face tokenizer.json it carries", tokenizer_json_identity(ckpt["tokenizer_json"])
    if isinstance(ckpt.get("meta"), dict):
        return f"the {ckpt['meta'].get('tokenizer')} tokenizer of its dataset", tokenizer_identity(ckpt["meta"])
    if ckpt.get("hf_config"):  # converted from a Hugging Face directory that had no tokenizer.json
        return "its Hugging Face model's tokenizer", ("hf",)
    dataset = (ckpt.get("config") or {}).get("dataset")
    if dataset and os.path.isfile(os.path.join(dataset_dir(dataset), "meta.json")):
        meta = load_meta(dataset_dir(dataset))
        return f"the {meta['tokenizer']} tokenizer of dataset {dataset}", tokenizer_identity(meta)
    return None


def check_tokenizer(ckpt, path, meta, data_dir):
    """Token ids only mean something under the tokenizer the model learned them with: training a
    converted BPE model on character ids (or the char model of another text) runs, but learns nonsense."""
    theirs = trained_tokenizer(ckpt)
    if theirs is not None and theirs[1] != tokenizer_identity(meta):
        raise ConfigError(f"tokenizer mismatch: {path} was trained with {theirs[0]}, but dataset {data_dir} is "
                          f"tokenized with {meta['tokenizer']} (vocabulary {meta['vocab_size']}): its token ids "
                          "mean other text to this model. Train on data tokenized with the model's tokenizer, or "
                          "pass --allow_tokenizer_mismatch=True to do it anyway")


def final_kv_source(model_config: dict, adapt_target: str) -> list:
    """The kv_source a run ends with: its adaptation target if it adapts, else the model's own."""
    if not adapt_target:
        return list(model_config["kv_source"])
    return list(parse_kv_source(adapt_target, model_config["n_layer"]))


def check_replaces_same_model(s, config, adaptation, master):
    """A new run must not silently replace out_dir's checkpoint of another model: refuse, and name the
    ways out. Refusing (rather than deriving out_dir from the settings) keeps every run's out_dir the
    one its settings say, which sample.py, resume and experiments/echo.py rely on, and it guards an
    out_dir given explicitly too. A checkpoint of the same model is replaced, as re-running a command should."""
    path = os.path.join(s.out_dir, CKPT_NAME)
    if s.init_from == "resume" or s.eval_only or not os.path.isfile(path):
        return
    mine = config.to_dict() | {"kv_source": list(adaptation.target) if adaptation else list(config.kv_source)}
    try:
        old = load_checkpoint(path, mmap=True)
        theirs = dict(old["model_config"])
        theirs["kv_source"] = final_kv_source(theirs, (old.get("config") or {}).get("adapt_target", ""))
        differs = [k for k in mine if theirs.get(k) != mine[k]]
        what = "; ".join(f"{k} {theirs.get(k)!r} there, {mine[k]!r} here" for k in differs)
    except (ValueError, KeyError, TypeError) as e:
        old, differs, what = {}, ["unreadable"], f"it cannot be read to compare: {e}"
    if differs and not s.overwrite:
        parts = [(s.adapt_target or s.kv_source).replace(":", "").replace(",", "") if k == "kv_source"
                 else f"{k}{mine.get(k, '')}" for k in differs]
        raise ConfigError(f"{path} holds a checkpoint of another model ({what}), which this run would replace. "
                          f"Train into another out_dir (e.g. --out_dir={s.out_dir.rstrip('/')}-{'-'.join(parts)}), "
                          "continue that checkpoint with --init_from=resume, or replace it with --overwrite=True")
    if master:
        print(f"note: this new run replaces {path} (iter {old.get('iter_num', '?')}); --init_from=resume would "
              "continue it instead", flush=True)


def make_checkpoint(raw_model, states, scaler, iter_num, best_val_loss, sampler, settings, carried):
    """states: (model state_dict, optimizer state_dict), unsharded (Trainer.full_state). carried: what
    sample.py needs (checkpoint.SAMPLING_KEYS): the tokenizer and chat template of the checkpoint the run
    started from, and the dataset's meta."""
    ckpt = carried | {"model": states[0], "optimizer": states[1],
            "model_config": raw_model.config.to_dict(), "kv_blend": blend_state(raw_model), "iter_num": iter_num,
            "best_val_loss": best_val_loss, "rng": rng_state(), "sampler": sampler.state_dict(),
            "config": dict(settings)}
    if scaler is not None and scaler.is_enabled():
        ckpt["scaler"] = scaler.state_dict()
    return ckpt


def restore_training_state(ckpt, optimizer, scaler, seed, master):
    """(iter_num, best_val_loss, data seed) of a run to resume; loads optimizer, scaler and RNG state."""
    for key in ("optimizer", "iter_num"):
        if key not in ckpt:
            raise ConfigError(f"init_from=resume: the checkpoint lacks {key!r} (it holds weights only); "
                              "use init_from=<that file> to start a new run from its weights")
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as e:
        raise ConfigError(f"checkpoint optimizer state does not fit the model: {e}") from None
    if "scaler" in ckpt and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    data_seed = ckpt.get("sampler", {}).get("seed", seed)
    if master and data_seed != seed:
        print(f"note: resuming the data stream of seed {data_seed} from the checkpoint (not seed={seed})")
    if "rng" in ckpt and master:
        restore_rng(ckpt["rng"])
    return ckpt["iter_num"], ckpt.get("best_val_loss", float("inf")), data_seed


def get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr, decay_lr=True):
    """Linear warm-up, then cosine decay to min_lr at lr_decay_iters."""
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def weights_digest(state_dict):
    h = hashlib.sha256()
    for k, t in state_dict.items():
        h.update(k.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Log:
    """Prints a line and appends a JSON record to out_dir/log.jsonl; silent on the other DDP ranks."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled = path, enabled

    def __call__(self, text=None, **record):
        if not self.enabled:
            return
        if text:
            print(text, flush=True)
        if self.path and record:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# -----------------------------------------------------------------------------
# training


class Trainer:
    """The model being trained, its compiled / DDP views (or, under FSDP, the sharded model), optimizer and
    data, and one optimizer step."""

    def __init__(self, raw_model, optimizer, scaler, rt, compile_model, samplers, local_steps, grad_clip,
                 fsdp=False):
        self.raw_model, self.optimizer, self.scaler, self.rt = raw_model, optimizer, scaler, rt
        self.compile_model, self.local_steps, self.grad_clip = compile_model, local_steps, grad_clip
        self.train_sampler, self.val_sampler = samplers
        self.teacher, self.distill, self.taps = None, None, None
        self.carried = {}  # the tokenizer and chat template of the checkpoint the run started from
        self.fsdp = fsdp
        if fsdp:
            self.shard(broadcast=True)
        self.wrap()

    def shard(self, broadcast=False):
        """Shard the plain raw_model and move the optimizer's state onto the shards (sharding.py)."""
        compute = torch.bfloat16 if self.rt.dtype == "bfloat16" else None
        self.optimizer = sharding.shard(self.raw_model, self.optimizer, self.rt.device_type, compute, broadcast)

    def release(self):
        """Let go of the model, its views and the optimizer, before the process group goes."""
        import gc
        self.raw_model = self.model = self.eval_model = self.optimizer = self.teacher = self.taps = None
        gc.collect()

    def full_state(self):
        """(model state_dict, optimizer state_dict) as an unsharded run has them; under FSDP gathered onto
        the CPU of every rank (a collective)."""
        if self.fsdp:
            return sharding.gather_state(self.raw_model, self.optimizer)
        return self.raw_model.state_dict(), self.optimizer.state_dict()

    def adapt(self, adaptation, iter_num):
        """Bring the model to where the adaptation schedule says; True if it dropped parameters. Under FSDP
        a switch gathers the model, lets adaptation drop K/V weights and shards what remains."""
        if not (self.fsdp and adaptation.drops(self.raw_model.config.kv_source, iter_num)):
            changed = adaptation.apply(self.raw_model, self.optimizer, iter_num)
        else:
            self.raw_model, self.optimizer = sharding.unshard(self.raw_model, self.optimizer, self.rt.device,
                                                              self.rt.device_type)
            changed = adaptation.apply(self.raw_model, self.optimizer, iter_num)
            self.shard()
            if self.taps is not None:  # the student is a new module: hook it again
                self.taps = (HiddenTap(self.raw_model, self.distill.layers), self.taps[1])
        if changed:
            self.wrap()  # parameters were removed: DDP and compile must see it
        return changed

    def wrap(self):
        """(Re)build the compiled and DDP views: needed again after a stage switch removed parameters.
        Under FSDP the sharded model is its own view."""
        from torch.nn.parallel import DistributedDataParallel as DDP
        if self.fsdp:
            self.model = self.eval_model = self.raw_model
            return
        if self.compile_model:  # forget graphs of the model's earlier shapes: each stage would count
            torch._dynamo.reset()  # against dynamo's recompile limit and end in silent eager mode
        model = torch.compile(self.raw_model) if self.compile_model else self.raw_model
        self.eval_model = model  # compiled but not DDP-wrapped: evaluation needs no gradient sync
        if self.rt.ddp:
            cuda = self.rt.device_type == "cuda"
            model = DDP(model, device_ids=[torch.device(self.rt.device).index] if cuda else None)
        self.model = model

    def loss(self, model, X, Y, teacher=None):
        with self.rt.autocast():
            if teacher is None:
                return model(X, Y)[1]
            return loss_with_teacher(model, teacher, X, Y, self.distill, self.taps)

    @torch.no_grad()
    def estimate_loss(self, eval_iters):
        """Mean cross-entropy on eval_iters fixed batches of each split, shared out over the ranks."""
        import torch.distributed as dist
        out = {}
        self.model.eval()
        for split, sampler in (("train", self.train_sampler), ("val", self.val_sampler)):
            total = torch.zeros(2, dtype=torch.float64, device=self.rt.device)
            # under FSDP every rank runs as many forward passes (each gathers weights with the others):
            # a rank without a batch of its own repeats batch 0 and does not count it
            rounds = -(-eval_iters // self.rt.world_size) if self.fsdp else None
            for k in self.eval_batches(eval_iters, rounds):
                X, Y = sampler.get(f"eval_{split}", 0, k if k < eval_iters else 0)
                loss = self.loss(self.eval_model, X, Y).double()
                if k < eval_iters:
                    total[0] += loss
                    total[1] += 1
            if self.rt.ddp:
                dist.all_reduce(total)
            out[split] = (total[0] / total[1]).item() if total[1] > 0 else float("nan")
        self.model.train()
        return out

    def eval_batches(self, eval_iters, rounds=None):
        """This rank's share of the eval batch indices (indices >= eval_iters are padding, see above)."""
        if rounds is None:
            return range(self.rt.rank, eval_iters, self.rt.world_size)
        return [self.rt.rank + j * self.rt.world_size for j in range(rounds)]

    def step(self, iter_num, lr):
        """One optimizer step over local_steps micro-batches per rank; the mean loss over all of them."""
        import torch.distributed as dist
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.rt.device)
        for k in range(self.local_steps):
            X, Y = self.train_sampler.get("train", iter_num, self.rt.rank * self.local_steps + k)
            if self.rt.ddp and not self.fsdp:  # FSDP reduce-scatters every micro-step: gradients stay sharded
                self.model.require_backward_grad_sync = k == self.local_steps - 1
            teacher = self.teacher if self.teacher is not None and self.distill.active(iter_num) else None
            loss = self.loss(self.model, X, Y, teacher)
            loss_sum += loss.detach().float()
            self.scaler.scale(loss / self.local_steps).backward()
        if self.rt.ddp:
            dist.all_reduce(loss_sum)
        loss_val = loss_sum.item() / (self.local_steps * self.rt.world_size)
        if not math.isfinite(loss_val):
            return loss_val  # the caller stops; this step is not applied
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.rt.device_type == "cuda":
            torch.cuda.synchronize(self.rt.device)
        return loss_val


def open_splits(data_dir, meta, block_size):
    splits = [open_tokens(data_dir, split, meta) for split in ("train", "val")]
    for split, arr in zip(("train", "val"), splits):
        if len(arr) <= block_size + 1:
            raise ConfigError(f"block_size={block_size} is longer than the data: {data_dir}/{split}.bin has "
                              f"{len(arr)} tokens; use a smaller block_size or more data")
    return splits


def setup(s, explicit, rt):
    """(Trainer, adaptation schedule or None, iter_num, best_val_loss) ready for the loop."""
    import torch.distributed as dist
    data_dir = ensure_dataset(s.dataset, s.auto_prepare, rt.master, dist.barrier if rt.ddp else (lambda: None))
    meta = load_meta(data_dir)
    path, ckpt = checkpoint_to_start_from(s)
    resume = s.init_from == "resume"
    if resume:
        settings_from_checkpoint(s, explicit, ckpt)
    train_data, val_data = open_splits(data_dir, meta, s.block_size)
    raw_model = build_model(s, explicit, ckpt, path, meta["vocab_size"])
    if ckpt is not None and not s.allow_tokenizer_mismatch:
        check_tokenizer(ckpt, path, meta, data_dir)
    if s.block_size > raw_model.config.block_size:
        raise ConfigError(f"block_size={s.block_size} exceeds the model's block_size={raw_model.config.block_size}")
    raw_model.to(rt.device)
    adaptation = setup_adaptation(raw_model, s.adapt_target, s.adapt_mode, s.adapt_order, s.adapt_stage_iters,
                                  s.adapt_layers_per_stage, s.adapt_train_layers, s.adapt_similarity)
    check_replaces_same_model(s, raw_model.config, adaptation, rt.master)
    optimizer = raw_model.configure_optimizers(s.weight_decay, s.learning_rate, (s.beta1, s.beta2), rt.device_type)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=(rt.dtype == "float16"))
    iter_num, best_val_loss, data_seed = 0, float("inf"), s.seed
    if resume:
        iter_num, best_val_loss, data_seed = restore_training_state(ckpt, optimizer, scaler, s.seed, rt.master)
    samplers = [BatchSampler(d, s.block_size, s.batch_size, data_seed, rt.device) for d in (train_data, val_data)]
    trainer = Trainer(raw_model, optimizer, scaler, rt, use_compile(s.compile, rt.device_type, s.fsdp), samplers,
                      s.gradient_accumulation_steps // rt.world_size, s.grad_clip, s.fsdp)
    # checkpoints carry the starting checkpoint's tokenizer and chat template, and the dataset's meta
    trainer.carried = {key: ckpt[key] for key in SAMPLING_KEYS if ckpt is not None and key in ckpt} | {"meta": meta}
    if s.distill_alpha + s.distill_argmax + s.distill_hidden > 0:
        attach_teacher(s, trainer)
    return trainer, adaptation, iter_num, best_val_loss


def attach_teacher(s, trainer):
    """The frozen dense teacher and the distillation settings (adapt.Distillation) of a run."""
    teacher_path = s.distill_teacher or (s.init_from if s.init_from not in ("scratch", "resume") else "")
    if not teacher_path:
        raise ConfigError("distillation needs its teacher: set distill_teacher=<the dense checkpoint adaptation "
                          "started from> (init_from is not a file here)")
    layers = tuple(parse_layer_list(s.distill_hidden_layers, trainer.raw_model.config.n_layer, "distill_hidden_layers"))
    trainer.teacher = load_teacher(teacher_path, trainer.raw_model.config, trainer.rt.device)
    trainer.distill = Distillation(s.distill_alpha, s.distill_argmax, s.distill_hidden, s.distill_temperature, layers,
                                   s.distill_iters)
    if s.distill_hidden:
        trainer.taps = (HiddenTap(trainer.raw_model, layers), HiddenTap(trainer.teacher, layers))


def parse_layer_list(text, n_layer, name):
    try:
        layers = [int(t) for t in text.split(",")] if text.strip() else []
    except ValueError:
        raise ConfigError(f"{name}={text!r}: expected comma-separated layer indices like 10,20") from None
    if any(not 0 <= i < n_layer for i in layers):
        raise ConfigError(f"{name}={text!r}: layer indices must lie in 0..{n_layer - 1}")
    return layers


def log_start(log, s, trainer, iter_num, tokens_per_iter):
    c, rt = trainer.raw_model.config, trainer.rt
    n_params = trainer.raw_model.num_params()
    log(f"model: {n_params / 1e6:.2f}M parameters, {c.n_layer} layers, kv_source {list(c.kv_source)} "
        f"({len(c.owners)} K/V owners); device {rt.device}, dtype {rt.dtype}, compile {trainer.compile_model}, "
        f"ranks {rt.world_size}{' (FSDP)' if trainer.fsdp else ''}; {tokens_per_iter:,} tokens per iteration; starting at iter {iter_num}",
        kind="start", iter=iter_num, params=n_params, kv_source=list(c.kv_source), device=rt.device,
        dtype=rt.dtype, compile=trainer.compile_model, world_size=rt.world_size, fsdp=trainer.fsdp, tokens_per_iter=tokens_per_iter,
        config=vars(s))


def device_peak_flops(setting, rt):
    """Per-device peak FLOP/s for MFU: the setting, else the GPU's datasheet value; None on CPU."""
    if setting > 0:
        return setting
    if rt.device_type == "cuda":
        try:
            return peak_flops_for(torch.cuda.get_device_name(rt.device))
        except ValueError:
            return None
    return None


def evaluate(s, trainer, iter_num, lr, log, train_time):
    """Evaluate; stop on a non-finite val loss. Returns the val loss."""
    losses = trainer.estimate_loss(s.eval_iters)
    log(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}",
        kind="eval", iter=iter_num, train_loss=losses["train"], val_loss=losses["val"], lr=lr, time=train_time)
    return losses["val"]


class TrainingDiverged(ValueError):
    """A non-finite loss. A ValueError like other bad input: the fix is a setting (learning rate, warm-up)."""


class CheckpointWriteError(ValueError):
    """A checkpoint that could not be written (a full disk); the message says which one was kept."""


def stop_message(what, value, iter_num, kept):
    return f"{what} is {value} at iter {iter_num}: training stopped and nothing after it saved; {kept}"


def rank_max(rt, value):
    """The largest of an int over all ranks (itself without DDP): how the ranks agree to stop. Under DDP
    every rank must call it at the same point."""
    if not rt.ddp:
        return int(value)
    import torch.distributed as dist
    t = torch.tensor([int(value)], device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


class Saver:
    """Writes out_dir/ckpt.pt (on rank 0) and remembers the last iteration saved, for the messages that
    say what was kept. A failed write (a full disk) stops every rank with one line."""

    def __init__(self, s, trainer, log, last_saved):
        self.s, self.trainer, self.log, self.last = s, trainer, log, last_saved
        self.path = os.path.join(s.out_dir, CKPT_NAME)

    def kept(self):
        return (f"the last good checkpoint {self.path} (iter {self.last}) was kept" if self.last is not None
                else "no checkpoint was written")

    def save(self, iter_num, best_val_loss):
        t, error = self.trainer, None
        states = t.full_state()  # under FSDP a collective: every rank gathers, rank 0 writes
        if t.rt.master:
            try:
                save_checkpoint(make_checkpoint(t.raw_model, states, t.scaler, iter_num, best_val_loss,
                                                t.train_sampler, vars(self.s), t.carried), self.path)
            except OSError as e:  # save_checkpoint removed its temp file; the previous checkpoint is intact
                error = e
        if rank_max(t.rt, error is not None):
            if error is None:
                raise CheckpointWriteError(f"rank 0 could not write the checkpoint of iter {iter_num}")
            if error.errno == errno.ENOSPC:
                raise CheckpointWriteError(f"no space left on the device of {self.s.out_dir} for the checkpoint of "
                                           f"iter {iter_num}: {self.kept()}; free space and resume")
            raise CheckpointWriteError(f"cannot write the checkpoint of iter {iter_num} to {self.path} "
                                       f"({error.strerror or error}): {self.kept()}")
        self.log(f"saved {self.path} (iter {iter_num})")
        self.last = iter_num


class StopSignal:
    """SIGTERM (a scheduler preempting the job) or Ctrl-C asks the loop to finish its step, write a
    checkpoint and return, instead of losing the iterations since the last evaluation. A second Ctrl-C
    quits at once (the atomic write keeps the previous checkpoint). One that comes within a second of
    the first is the same request: torchrun passes the terminal's SIGINT on to processes that already
    got it. Installed only in the main thread, where Python runs signal handlers."""

    def __init__(self):
        self.signum, self.since, self.previous = 0, 0.0, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT and time.monotonic() - self.since > 1.0:
            raise KeyboardInterrupt
        if not self.signum:
            self.signum, self.since = signum, time.monotonic()

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def lock_out_dir(out_dir):
    """Create out_dir and hold an exclusive lock on out_dir/.lock while the returned file stays open, so
    that a second run into the same out_dir refuses instead of mixing its checkpoint and log with ours.
    The OS drops the lock when the process ends in any way (kill -9 included): a crash leaves none."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        f = open(os.path.join(out_dir, ".lock"), "a+")
    except OSError as e:
        raise ConfigError(f"out_dir={out_dir!r} cannot be written: {e.strerror or e}") from None
    try:
        import fcntl
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(f"out_dir={out_dir!r} is in use by another training run ({holder}): wait for it "
                          "to end, or choose another out_dir") from None
    except (ImportError, OSError) as e:  # no fcntl (Windows) or a file system without locks
        print(f"warning: cannot lock {out_dir}/.lock ({e}): a second run into out_dir would not be refused")
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def claim_out_dir(out_dir, rt):
    """(lock file or None, temp files removed): rank 0 locks out_dir and, being its only writer now,
    removes the temp files of a checkpoint write that was killed. All ranks stop if it cannot."""
    lock, removed, error = None, [], None
    if rt.master:
        try:
            lock = lock_out_dir(out_dir)
            removed = remove_stale_temps(os.path.join(out_dir, CKPT_NAME))
        except ValueError as e:
            error = e
    if rank_max(rt, error is not None):
        raise error or ConfigError(f"rank 0 could not claim out_dir={out_dir!r}")
    return lock, removed


def loop(s, trainer, adaptation, iter_num, best_val_loss, log, stop=None):
    """Train from iter_num to max_iters, evaluating and checkpointing; the run's summary. A StopSignal
    that fires ends it after the current step, with a checkpoint."""
    rt = trainer.rt
    resume, start_iter = s.init_from == "resume", iter_num
    saver = Saver(s, trainer, log, iter_num if resume else None)
    tokens_per_iter = s.batch_size * s.block_size * s.gradient_accumulation_steps
    peak = device_peak_flops(s.peak_flops, rt)
    train_time, train_tokens, timed, t_log, it_log, val_loss = 0.0, 0, False, 0.0, 0, None
    trainer.model.train()
    while True:
        if adaptation is not None and trainer.adapt(adaptation, iter_num):
            best_val_loss = float("inf")  # "best" compares models of the same kv_source only
            kv = list(trainer.raw_model.config.kv_source)
            log(f"iter {iter_num}: kv_source is now {kv}", kind="adapt", iter=iter_num, kv_source=kv)
        lr = get_lr(iter_num, s.learning_rate, s.warmup_iters, s.lr_decay_iters or s.max_iters, s.min_lr, s.decay_lr)
        at_end = iter_num >= s.max_iters
        if s.eval_only or ((iter_num % s.eval_interval == 0 or at_end) and not (resume and iter_num == start_iter)):
            val_loss = evaluate(s, trainer, iter_num, lr, log, train_time)
            if not math.isfinite(val_loss):
                raise TrainingDiverged(stop_message("val loss", val_loss, iter_num, saver.kept()))
            improved, best_val_loss = val_loss < best_val_loss, min(best_val_loss, val_loss)
            if (improved or s.always_save_checkpoint) and iter_num > start_iter and not s.eval_only:
                saver.save(iter_num, best_val_loss)
        stopped = 0 if at_end or s.eval_only else rank_max(rt, stop.signum if stop else 0)
        if stopped:
            stop_run(saver, iter_num, start_iter, best_val_loss, stopped)
        if at_end or s.eval_only or stopped:
            break
        t0 = time.perf_counter()
        loss_val = trainer.step(iter_num, lr)
        if not math.isfinite(loss_val):
            log(kind="diverged", iter=iter_num, loss=str(loss_val))
            raise TrainingDiverged(stop_message("training loss", loss_val, iter_num, saver.kept()) +
                                   ". Lower learning_rate or raise warmup_iters.")
        dt_step = time.perf_counter() - t0
        if timed:  # the first step (compile, allocator warm-up) is not counted
            train_time, train_tokens = train_time + dt_step, train_tokens + tokens_per_iter
        timed, t_log, it_log, iter_num = True, t_log + dt_step, it_log + 1, iter_num + 1
        if iter_num % s.log_interval == 0 or iter_num == s.max_iters:
            log_progress(log, trainer.raw_model, iter_num - 1, loss_val, lr, t_log / it_log, tokens_per_iter, rt,
                         s.block_size, peak)
            t_log, it_log = 0.0, 0
    return {"iters": iter_num, "val_loss": val_loss, "best_val_loss": best_val_loss,
            "tokens_per_s": train_tokens / train_time if train_time > 0 else None, "stopped": stopped}


def stop_run(saver, iter_num, start_iter, best_val_loss, signum):
    """A stop signal: checkpoint what was trained since the last save, and say how to go on."""
    if iter_num > start_iter and saver.last != iter_num:
        saver.save(iter_num, best_val_loss)
    name = signal.Signals(signum).name
    where = (f"{saver.path} holds iter {saver.last}: continue with --init_from=resume" if saver.last is not None
             else "nothing was trained, nothing saved")
    saver.log(f"stopped by {name} at iter {iter_num}; {where}", kind="stopped", iter=iter_num, signal=name)


def log_progress(log, raw_model, iter_num, loss, lr, s_per_iter, tokens_per_iter, rt, block_size, peak):
    tps = tokens_per_iter / s_per_iter
    mfu = raw_model.estimate_mfu(tps / rt.world_size, block_size, peak_flops=peak) if peak else None
    log(f"iter {iter_num}: loss {loss:.4f}, lr {lr:.2e}, {1000 * s_per_iter:.1f} ms/iter, {tps:,.0f} tokens/s" +
        (f", MFU {100 * mfu:.1f}%" if mfu is not None else ""),
        kind="train", iter=iter_num, loss=loss, lr=lr, ms_per_iter=1000 * s_per_iter, tokens_per_s=tps, mfu=mfu)


def summarise(summary, trainer, log, eval_only):
    rt = trainer.rt
    if rt.ddp:
        import torch.distributed as dist
        digests = [None] * rt.world_size
        dist.all_gather_object(digests, weights_digest(trainer.full_state()[0]))
        summary["ddp_weights_identical"] = len(set(digests)) == 1
        mode = "fsdp: gathered weights" if trainer.fsdp else "ddp: weights"
        log(f"{mode} on all {rt.world_size} ranks are {'identical' if len(set(digests)) == 1 else 'DIFFERENT'} "
            f"(sha256 {digests[0][:16]})")
    if not eval_only:
        tps, val_loss = summary["tokens_per_s"], summary["val_loss"]
        vl = f"{val_loss:.4f}" if val_loss is not None else "not evaluated"
        log(f"done: {summary['iters']} iters, val loss {vl}, best {summary['best_val_loss']:.4f}" +
            (f", {tps:,.0f} tokens/s on average (first step and evaluations excluded)" if tps else ""),
            kind="done", **summary)
    return summary


def finished_message(s, iter_num):
    decay = ("The cosine decay follows max_iters, so the learning rate rises from min_lr again; add "
             f"--lr_decay_iters={iter_num} to stay at min_lr instead." if not s.lr_decay_iters else
             f"The learning rate stays at min_lr past lr_decay_iters={s.lr_decay_iters}; add --lr_decay_iters=0 to "
             "stretch the decay to the new max_iters.")
    return (f"nothing to do: {os.path.join(s.out_dir, CKPT_NAME)} is at iteration {iter_num}, so this run already "
            f"reached max_iters={s.max_iters}. To train on, resume with a larger max_iters, e.g. "
            f"--init_from=resume --max_iters={2 * iter_num}. {decay}")


def main(argv):
    """The run's summary; after a stop signal 128 + its number, the exit status of a process it ended."""
    s, explicit = configure(DEFAULTS, argv, __doc__, CHOICES)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    note = accumulation_for_world(s, explicit, world_size)
    check_settings(s, explicit, world_size, torchrun="RANK" in os.environ and "WORLD_SIZE" in os.environ)
    check_out_dir_writable(s.out_dir)
    rt = init_runtime(s.device, s.dtype, s.seed, s.backend)
    lock = None
    try:
        trainer, adaptation, iter_num, best_val_loss = setup(s, explicit, rt)
        if s.init_from == "resume" and iter_num >= s.max_iters and not s.eval_only:
            if rt.master:  # a finished run: say so, rather than print a "done" that did nothing
                print(finished_message(s, iter_num), flush=True)
            return {"iters": iter_num, "val_loss": None, "best_val_loss": best_val_loss, "tokens_per_s": None}
        lock, removed = claim_out_dir(s.out_dir, rt)  # from here on out_dir is this run's
        log_path = os.path.join(s.out_dir, "log.jsonl")
        if rt.master and s.init_from != "resume" and not s.eval_only and os.path.exists(log_path):
            os.remove(log_path)  # a new run: its log describes this run only, as its checkpoint will
        log = Log(log_path, enabled=rt.master)
        if note:
            log(note)
        if removed:
            log(f"removed {', '.join(removed)} from {s.out_dir}: left by a checkpoint write that was killed")
        if adaptation is not None and s.max_iters < adaptation.total_iters:
            log(f"warning: max_iters={s.max_iters} ends before the last adaptation stage does "
                f"(iteration {adaptation.total_iters}): the model will not reach adapt_target")
        log_start(log, s, trainer, iter_num, s.batch_size * s.block_size * s.gradient_accumulation_steps)
        with StopSignal() as stop:
            summary = loop(s, trainer, adaptation, iter_num, best_val_loss, log, stop)
        summary = summarise(summary, trainer, log, s.eval_only)
        if rt.ddp:  # gloo is not torn down while a DDP/FSDP wrapper holds its work (FSDP: 1 abort in 6 runs)
            trainer.release()
        if rt.ddp:  # no rank tears gloo down while another still talks: torch 2.13 then aborts a rank at exit
            torch.distributed.barrier()  # ("terminate called without an active exception", 4 in 20 runs without)
        return 128 + summary["stopped"] if summary["stopped"] else summary
    finally:
        if lock is not None:
            lock.close()
        close_runtime(rt)


if __name__ == "__main__":
    sys.exit(run_script(main))
