"""
What a training run refuses, found before it does any work: settings that are wrong whatever the model
and data (`check_settings`), an out_dir that cannot be written, a checkpoint whose architecture or
tokenizer the settings and data contradict, a new run that would replace out_dir's checkpoint of
another model; and the out_dir itself, which a run claims with a lock (`claim_out_dir`) so that a
second run into it refuses. Each refusal is a ConfigError whose message names the setting or file and
the way out. train.py calls each of these in one line.
"""

import math
import os
import socket
import subprocess
import time

import torch

from checkpoint import CKPT_NAME, MODEL_KEYS, load_checkpoint, remove_stale_temps
from configurator import ConfigError, canonical_dtype
from dataset import dataset_dir, load_meta
from model import parse_kv_source
from sharding import rank_max
from tokenizer import tokenizer_identity, tokenizer_json_identity

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
    if not 0 <= s.distill_reverse <= 1:
        raise ConfigError(f"distill_reverse={s.distill_reverse} must lie in [0, 1]: the share of the soft term that is "
                          "the reverse KL")
    if s.distill_reverse > 0 and not s.distill_alpha > 0:
        raise ConfigError("distill_reverse is a share of the soft term: set distill_alpha > 0 too")
    if s.distill_hidden > 0 and not s.distill_hidden_layers:
        raise ConfigError("distill_hidden > 0 needs distill_hidden_layers, e.g. --distill_hidden_layers=10,20")
    check_applicable(s, explicit)


def check_fsdp(s, torchrun):
    """What --fsdp=True cannot take, refused before any work."""
    if not torchrun:
        raise ConfigError("fsdp=True shards over the processes of torchrun: start it with "
                          "`.venv/bin/torchrun --standalone --nproc_per_node=N train.py ... --fsdp=True`")
    gpu = s.device.startswith("cuda") or (s.device == "auto" and torch.cuda.is_available())
    if canonical_dtype(s.dtype) == "float16" or (s.dtype == "auto" and gpu and not torch.cuda.is_bf16_supported()):
        raise ConfigError("fsdp=True with dtype=float16 is not supported (its GradScaler does not shard): use "
                          "--dtype=bfloat16")
    if s.device == "mps":
        raise ConfigError("fsdp=True needs CPUs (gloo) or CUDA GPUs (nccl), not device=mps")


def check_applicable(s, explicit):
    """Settings given for something this run does not do are an error, not silently ignored."""
    distilling = s.distill_alpha + s.distill_argmax + s.distill_hidden > 0
    groups = ((not s.adapt_target, lambda k: k.startswith("adapt_") and k not in ("adapt_target", "adapt_attn_target"),
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


def world_size_from_env(environ=os.environ) -> int:
    """The number of processes torchrun started (1 without it). torchrun sets RANK and WORLD_SIZE together:
    one without the other, or a value that is no number, is refused rather than run as a single
    process with its accumulation sized for several."""
    has_rank, has_world = "RANK" in environ, "WORLD_SIZE" in environ
    if has_rank != has_world:
        given, missing = ("WORLD_SIZE", "RANK") if has_world else ("RANK", "WORLD_SIZE")
        raise ConfigError(f"{given} is set in the environment but {missing} is not: start several processes with "
                          f"torchrun (which sets both), or unset {given}")
    if not has_world:
        return 1
    try:
        world, rank = int(environ["WORLD_SIZE"]), int(environ["RANK"])
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={environ['WORLD_SIZE']!r} and RANK={environ['RANK']!r} must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"WORLD_SIZE={world} and RANK={rank}: need WORLD_SIZE >= 1 and 0 <= RANK < WORLD_SIZE")
    return world


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


# -----------------------------------------------------------------------------
# the checkpoint a run starts from, and the one it would replace


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


def adaptation_note(adaptation, max_iters):
    """A warning when the run ends before the adaptation schedule does, else None."""
    if adaptation is not None and max_iters < adaptation.total_iters:
        return (f"warning: max_iters={max_iters} ends before the last adaptation stage does "
                f"(iteration {adaptation.total_iters}): the model will not reach adapt_target")
    return None


def finished_message(s, iter_num):
    """What a resume of a run that already reached max_iters says, rather than a "done" that did nothing."""
    decay = ("The cosine decay follows max_iters, so the learning rate rises from min_lr again; add "
             f"--lr_decay_iters={iter_num} to stay at min_lr instead." if not s.lr_decay_iters else
             f"The learning rate stays at min_lr past lr_decay_iters={s.lr_decay_iters}; add --lr_decay_iters=0 to "
             "stretch the decay to the new max_iters.")
    return (f"nothing to do: {os.path.join(s.out_dir, CKPT_NAME)} is at iteration {iter_num}, so this run already "
            f"reached max_iters={s.max_iters}. To train on, resume with a larger max_iters, e.g. "
            f"--init_from=resume --max_iters={2 * iter_num}. {decay}")


# -----------------------------------------------------------------------------
# out_dir belongs to one run at a time


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


def claim_destination(path, overwrite, what="the output"):
    """The one rule for a script that writes a file into a place another may own (convert_hf.py import,
    adapt.py --convert_to): an empty name, a directory, or an existing file without --overwrite is
    refused; a file written into a training out_dir (ckpt.pt, or a directory holding .lock) takes that
    out_dir's lock, so a running training's checkpoint is never replaced under it. Returns the lock to
    hold until the file is written (None when the destination is no out_dir)."""
    if not path:
        raise ConfigError(f"{what} is empty: name the file to write")
    if os.path.isdir(path):
        raise ConfigError(f"{what} {path} is a directory: name a file, like {os.path.join(path, CKPT_NAME)}")
    if os.path.lexists(path) and not overwrite:
        raise ConfigError(f"{what} {path} exists: choose a new file, or pass --overwrite to replace it")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise ConfigError(f"{what} {path} is not a regular file: --overwrite replaces files only")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.basename(path) == CKPT_NAME or os.path.exists(os.path.join(parent, ".lock")):
        return lock_out_dir(parent)
    return None


def claim_out_dir(out_dir, rt, cleanup):
    """Rank 0 locks out_dir until `cleanup` (an ExitStack) closes and, being its only writer now, removes
    the temp files of a checkpoint write that was killed: the note saying so, or None. All ranks stop if
    it cannot."""
    removed, error = [], None
    if rt.master:
        try:
            cleanup.enter_context(lock_out_dir(out_dir))
            removed = remove_stale_temps(os.path.join(out_dir, CKPT_NAME))
        except ValueError as e:
            error = e
    if rank_max(rt, error is not None):
        raise error or ConfigError(f"rank 0 could not claim out_dir={out_dir!r}")
    return f"removed {', '.join(removed)} from {out_dir}: left by a checkpoint write that was killed" if removed else None


REPOSITORY = os.path.dirname(os.path.abspath(__file__))


def tracked_files(path) -> list:
    """The files at or under path that this repository's git tracks (committed results, docs, code); []
    for a path outside the repository, or where git or the repository's .git is missing."""
    here, target = os.path.realpath(REPOSITORY), os.path.realpath(path)
    if not (target + os.sep).startswith(here + os.sep) or not os.path.exists(os.path.join(here, ".git")):
        return []
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--", os.path.relpath(target, here)], cwd=here,
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return [f for f in listed.stdout.split("\0") if f] if listed.returncode == 0 else []


def check_not_tracked(path, setting="out", replace_tracked=False):
    """Outputs never overwrite what the repository holds unless asked: a ConfigError in one line, before
    any work, when path is (or holds) a tracked file and replace_tracked is not set."""
    tracked = [] if replace_tracked or not path else tracked_files(path)
    if tracked:
        more = f" and {len(tracked) - 1} more" if len(tracked) > 1 else ""
        raise ConfigError(f"--{setting}={path} would overwrite {tracked[0]}{more}, which the repository tracks: "
                          f"write elsewhere (the out-* folders are git-ignored), or pass --replace_tracked=True "
                          "to replace the committed files deliberately")


# -----------------------------------------------------------------------------
# sizes: an estimate of memory and time before anything is allocated

GIB = 1 << 30
PEAK_FLOPS_BOUND = {"cuda": 2e15, "cpu": 2e13, "mps": 5e13}  # above any device of the kind: a lower bound on time
LAYER_FORWARD_FLOOR_S = 10e-6  # no layer's forward pass, of any size, takes less (its kernel launches alone)


def parameter_count(mc) -> int:
    """The parameters of a model config (a dict with LlamaConfig's fields) by arithmetic, without building it:
    a model too big to build must be refused before it is."""
    n, d, ff, vocab = mc["n_layer"], mc["n_embd"], mc["intermediate_size"], mc["vocab_size"]
    kv_dim = d // mc["n_head"] * mc["n_kv_head"]
    try:
        owners = sum(1 for i, j in enumerate(parse_kv_source(mc.get("kv_source"), n)) if i == j)
    except (ValueError, TypeError):
        owners = 1
    per_layer = 2 * d * d + 3 * d * ff + 2 * d
    return n * per_layer + owners * 2 * d * kv_dim + vocab * d * (1 if mc.get("tie_embeddings") else 2) + d


def available_memory(device: str):
    """Bytes free on the device now (GPU), or available RAM plus free swap (CPU); None if unknown."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        info = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        return (int(info["MemAvailable"].split()[0]) + int(info.get("SwapFree", "0 kB").split()[0])) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_fits(s, mc, device, world_size=1):
    """Refuse, in one line and before any allocation, a run that cannot fit: weights, gradients and AdamW
    state (16 bytes a parameter, sharded under FSDP) plus the activations a training step keeps for its
    backward pass (a lower bound: per layer and token, 4 hidden-size and 2 MLP-size values) beyond the
    memory the device has; an optimizer step whose lower-bound time is over an hour; or an evaluation
    whose lower-bound time is over an hour and over ten times the training between two evaluations
    (eval_iters far beyond what a loss estimate needs)."""
    try:
        params = parameter_count(mc)
    except (KeyError, TypeError, ZeroDivisionError):
        return  # not a model config: LlamaConfig says what is wrong with it
    state = 16 * params / (world_size if s.fsdp else 1)
    act_bytes = 4 if canonical_dtype(s.dtype) in ("float32", "auto") and not device.startswith("cuda") else 2
    tokens = s.batch_size * s.block_size
    activations = tokens * mc["n_layer"] * (4 * mc["n_embd"] + 2 * mc["intermediate_size"]) * act_bytes
    free = available_memory(device)
    if free is not None and state + activations > free:
        raise ConfigError(f"this run cannot fit: it needs at least {(state + activations) / GIB:,.1f} GiB "
                          f"({params / 1e6:,.1f}M parameters with gradients and AdamW state {state / GIB:,.1f} GiB, "
                          f"activations of batch_size={s.batch_size} x block_size={s.block_size} "
                          f"{activations / GIB:,.1f} GiB) and {device} has {free / GIB:,.1f} GiB available: lower "
                          "batch_size, block_size or the model's size")
    kind = "cuda" if device.startswith("cuda") else device
    forward_s = max(2 * params * tokens / PEAK_FLOPS_BOUND.get(kind, 2e15), mc["n_layer"] * LAYER_FORWARD_FLOOR_S)
    step_s = 3 * forward_s * s.gradient_accumulation_steps / world_size  # forward + backward ~ 3 forwards
    if step_s > 3600:  # a lower bound: a real step takes longer still
        raise ConfigError(f"gradient_accumulation_steps={s.gradient_accumulation_steps}: one optimizer step would take "
                          f"at least {step_s / 3600:,.1f} hours ({s.gradient_accumulation_steps:,} micro-steps of "
                          f"{tokens:,} tokens); lower it")
    evaluation_s = 2 * s.eval_iters * forward_s
    between_s = 3 * forward_s * s.eval_interval * s.gradient_accumulation_steps  # forward + backward ~ 3 forwards
    if evaluation_s > 3600 and (s.eval_only or evaluation_s > 10 * between_s):
        raise ConfigError(f"eval_iters={s.eval_iters}: each evaluation would take at least {evaluation_s / 3600:,.1f} "
                          f"hours ({2 * s.eval_iters:,} forward passes of {tokens:,} tokens): a loss estimate needs "
                          "far fewer batches (the default is 20); lower eval_iters")
