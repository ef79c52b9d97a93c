"""
Train a dense or KV-shared Llama (model.py) in the nanoGPT manner.

    python train.py                                   # the default: a small KV-shared char model, CPU ok
    python train.py config/train_shakespeare_char_dense.py          # its dense twin
    python train.py config/train_shakespeare_char.py --kv_source=cla:2 --max_iters=500
    python train.py --init_from=resume                # continue out_dir/ckpt.pt exactly
    torchrun --standalone --nproc_per_node=8 train.py config/train_tinyllama_shared.py   # DDP

Every setting below is a plain global. Arguments are applied in order: a path is a config file
(Python assigning some of these names), --key=value overrides one setting. Unknown names and values
of the wrong type are rejected with the list of what is allowed.

The pieces another stage of training (layer-wise adaptation, distillation) will reuse are separate
functions: build_model (scratch or checkpoint), compute_loss (one micro-step), save_checkpoint /
load_checkpoint (atomic, complete), BatchSampler (stateless, so resume is exact).
"""

import builtins
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
import types
from contextlib import nullcontext

import numpy as np
import torch

from adapt import Adaptation, distillation_loss, freeze
from model import Llama, LlamaConfig, parse_kv_source

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
lr_decay_iters = 300         # usually = max_iters
min_lr = 2e-4
# system
device = "auto"              # 'auto' (cuda if present, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"               # 'auto', 'float32', 'bfloat16', 'float16' (see resolve_dtype for auto)
compile = "auto"             # True, False or 'auto' (on for CUDA, off on CPU: see resolve_compile)
backend = "auto"             # DDP backend: 'auto' (nccl on CUDA, gloo on CPU), 'nccl', 'gloo'
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
distill_alpha = 0.0          # loss = (1 - a) * CE + a * T^2 * KL(teacher || student); 0: no teacher
distill_temperature = 1.0
distill_teacher = ""         # the teacher's checkpoint; '' = the init_from file (name it when resuming)
# -----------------------------------------------------------------------------

DEFAULTS = {k: v for k, v in globals().items()
            if not k.startswith("_") and isinstance(v, (bool, int, float, str))}
CHOICES = {"dtype": ("auto", "float32", "bfloat16", "float16"), "backend": ("auto", "nccl", "gloo")}
MODEL_KEYS = ("n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size", "vocab_size", "block_size",
              "rope_theta", "norm_eps", "tie_embeddings", "kv_source")
DATA_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
OFFLINE_DATASETS = ("shakespeare_char", "shakespeare")  # prepared automatically when missing
CKPT_NAME = "ckpt.pt"


# -----------------------------------------------------------------------------
# configurator


def _allowed():
    return "allowed settings: " + ", ".join(sorted(DEFAULTS))


def _check_value(key, value, where):
    if key not in DEFAULTS:
        raise SystemExit(f"unknown setting {key!r} ({where}); {_allowed()}")
    default = DEFAULTS[key]
    if key == "kv_source" and isinstance(value, (list, tuple)) and all(isinstance(j, int) for j in value):
        return list(value)
    if key == "compile":
        if isinstance(value, bool) or value == "auto":
            return value
        raise SystemExit(f"setting compile ({where}) must be True/False or 'auto', got {value!r}")
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise SystemExit(f"setting {key} ({where}) must be {type(default).__name__}, got {value!r} "
                         f"({type(value).__name__})")
    if key in CHOICES and value not in CHOICES[key]:
        raise SystemExit(f"setting {key} ({where}) must be one of {', '.join(CHOICES[key])}, got {value!r}")
    return value


def _parse_text(key, text):
    """A --key=value string as the type of the key's default."""
    default = DEFAULTS.get(key)
    low = text.strip().lower()
    if isinstance(default, bool) or key == "compile":
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        if key == "compile" and low == "auto":
            return "auto"
        return text
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            return text
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            return text
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def parse_args(argv):
    """Settings dict and the set of names given explicitly (config files and --key=value)."""
    cfg, explicit = dict(DEFAULTS), set()
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__ + "\nsettings and their defaults:\n" +
              "\n".join(f"  --{k}={v!r}" for k, v in DEFAULTS.items()))
        raise SystemExit(0)
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise SystemExit(f"argument {arg!r}: expected --key=value; {_allowed()}")
            if key not in DEFAULTS:
                raise SystemExit(f"unknown setting {key!r} (command line); {_allowed()}")
            cfg[key] = _check_value(key, _parse_text(key, text), "command line")
            explicit.add(key)
        else:
            if not os.path.isfile(arg):
                raise SystemExit(f"config file {arg!r} not found (arguments are config files or --key=value)")
            ns = {"__file__": os.path.abspath(arg)}
            with open(arg) as f:
                source = f.read()
            try:
                exec(builtins.compile(source, arg, "exec"), ns)
            except Exception as e:
                raise SystemExit(f"config file {arg} failed: {type(e).__name__}: {e}") from None
            for key, value in ns.items():
                if key.startswith("_") or isinstance(value, types.ModuleType) or callable(value):
                    continue
                cfg[key] = _check_value(key, value, f"in {arg}")
                explicit.add(key)
    return cfg, explicit


# -----------------------------------------------------------------------------
# device, precision, compile


def resolve_device(cfg, local_rank):
    dev = cfg["device"]
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(f"device={dev} but torch sees no CUDA GPU: use --device=cpu")
        if dev == "cuda" and local_rank is not None:
            dev = f"cuda:{local_rank}"
    elif dev == "mps":
        if not torch.backends.mps.is_available():
            raise SystemExit("device=mps but MPS is not available")
    elif dev != "cpu":
        raise SystemExit(f"device={dev!r}: use auto, cpu, cuda, cuda:N or mps")
    return dev


def resolve_dtype(cfg, device_type):
    """'auto': bf16 autocast on GPUs that have it, else fp16 with a GradScaler; fp32 on CPU.

    CPU, measured for the default model on this project's 2-core AMD EPYC (AVX512-BF16, no AMX),
    10 alternating rounds of 8 steps: on the idle machine fp32 ran ~16,700 tokens/s (median) and
    bf16 autocast ~17,200 (+3%, inside the round-to-round spread; faster in 7 of 10 rounds). At d=128
    the matmuls are too small for bf16 units to matter, and fp32 keeps runs bit-exact (resume,
    comparisons across runs), so fp32 is the CPU default. Bigger models on CPUs with bf16 matrix
    units can gain from --dtype=bfloat16 (weights, optimizer and loss stay fp32 under autocast).
    """
    dt = cfg["dtype"]
    if dt == "auto":
        if device_type == "cuda":
            dt = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dt = "float32"
    if dt == "float16" and device_type != "cuda":
        raise SystemExit("dtype=float16 needs a CUDA GPU (it trains with a GradScaler); on CPU use float32 or bfloat16")
    return dt


def resolve_compile(cfg, device_type):
    """'auto': compile on CUDA, not on CPU. Measured for the default model on the idle 2-core CPU
    (fp32): a cold torch.compile took ~22 s (~59 s while other jobs ran), then trained ~19% faster
    (~20,000 vs ~16,800 tokens/s). That pays back after ~2.3 M tokens (~2.5 minutes of training);
    the default run is 0.6 M tokens, so compiling would make it slower. Use --compile=True for
    longer CPU runs."""
    c = cfg["compile"]
    return device_type == "cuda" if c == "auto" else bool(c)


def autocast_ctx(device_type, dt):
    if dt == "float32":
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype={"bfloat16": torch.bfloat16, "float16": torch.float16}[dt])


# -----------------------------------------------------------------------------
# data


def data_dir_for(name):
    if os.path.isdir(name) or os.sep in name or (os.altsep and os.altsep in name):
        return name
    return os.path.join(DATA_ROOT, name)


def ensure_data(cfg, master, barrier=lambda: None):
    """Make sure train.bin, val.bin and meta.json exist; prepare the offline datasets if allowed."""
    name = cfg["dataset"]
    d = data_dir_for(name)
    need = [os.path.join(d, f) for f in ("train.bin", "val.bin", "meta.json")]
    missing = [p for p in need if not os.path.exists(p)]
    if missing and cfg["auto_prepare"] and d == os.path.join(DATA_ROOT, name) and name in OFFLINE_DATASETS:
        if master:
            print(f"{missing[0]} is missing: preparing {name} (offline, once)")
            _run_prepare(name)
        barrier()
        missing = [p for p in need if not os.path.exists(p)]
    if missing:
        script = os.path.join("data", name, "prepare.py")
        if os.path.exists(os.path.join(DATA_ROOT, name, "prepare.py")):
            hint = f"run `python {script}` first"
        else:
            known = sorted(n for n in os.listdir(DATA_ROOT) if os.path.exists(os.path.join(DATA_ROOT, n, "prepare.py")))
            hint = f"datasets with a prepare script: {', '.join(known)}"
        raise SystemExit(f"dataset {name!r}: {', '.join(missing)} missing; {hint}")
    return d


def _run_prepare(name):
    import importlib.util
    path = os.path.join(DATA_ROOT, name, "prepare.py")
    spec = importlib.util.spec_from_file_location(f"_prepare_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.prepare()


def open_tokens(data_dir, split, meta):
    path = os.path.join(data_dir, f"{split}.bin")
    dt = np.dtype(meta["dtype"])
    size = os.path.getsize(path)
    if size % dt.itemsize:
        raise SystemExit(f"{path} is {size} bytes, not a whole number of {meta['dtype']} tokens: it is "
                         "truncated or was written with another dtype; re-run the prepare script")
    return np.memmap(path, dtype=dt, mode="r") if size else np.zeros(0, dtype=dt)


class BatchSampler:
    """Random windows of a token file, drawn statelessly: the batch of (iteration, micro-step)
    depends only on (seed, stream, iteration, micro-step), never on what was drawn before. So a
    resumed run draws exactly what the uninterrupted run would have, and the global micro-step
    index g (rank r takes g = r * local_steps + k) gives each DDP rank different batches while the
    data of a step does not depend on how many ranks share it. The state is just its seed."""

    STREAMS = {"train": 0, "eval_train": 1, "eval_val": 2}

    def __init__(self, data, block_size, batch_size, seed, device):
        self.data, self.block_size, self.batch_size, self.seed = data, block_size, batch_size, seed
        self.device = torch.device(device)

    def get(self, stream, step, micro):
        rng = np.random.Generator(np.random.PCG64([self.seed, self.STREAMS[stream], step, micro]))
        ix = rng.integers(0, len(self.data) - self.block_size, size=self.batch_size)
        x = torch.from_numpy(np.stack([self.data[i:i + self.block_size] for i in ix]).astype(np.int64))
        y = torch.from_numpy(np.stack([self.data[i + 1:i + 1 + self.block_size] for i in ix]).astype(np.int64))
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def state_dict(self):
        return {"kind": "stateless", "seed": self.seed}


# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(obj, path):
    """Atomically: write a temp file in the same directory, fsync, rename over the old one. A crash
    or error at any point leaves the previous checkpoint intact."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)  # mkstemp makes the file 0600; give it the usual permissions
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def load_checkpoint(path):
    """A checkpoint dict with at least 'model' and 'model_config', or SystemExit saying what is wrong."""
    if not os.path.isfile(path):
        raise SystemExit(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        raise SystemExit(f"checkpoint {path} cannot be read: it is corrupt or truncated "
                         f"({type(e).__name__}: {msg}). It was left as it is.") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SystemExit(f"checkpoint {path} is not a checkpoint of this project: it needs 'model' and "
                         f"'model_config', found {keys}")
    return ckpt


def make_checkpoint(raw_model, optimizer, scaler, iter_num, best_val_loss, sampler, cfg):
    np_state = np.random.get_state()
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    ckpt = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
            "model_config": raw_model.config.to_dict(), "iter_num": iter_num,
            "best_val_loss": best_val_loss, "rng": rng, "sampler": sampler.state_dict(), "config": dict(cfg)}
    if scaler is not None and scaler.is_enabled():
        ckpt["scaler"] = scaler.state_dict()
    return ckpt


def restore_rng(rng):
    torch.set_rng_state(rng["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in rng["python"]))
    n = rng["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


def model_from_checkpoint(ckpt, **config_changes):
    """The plain Llama a checkpoint dict describes, holding its weights."""
    model = Llama(LlamaConfig(**{**ckpt["model_config"], **config_changes}))
    model.load_state_dict(strip_prefixes(ckpt["model"]))
    return model


def strip_prefixes(state):
    out = {}
    for k, v in state.items():
        while k.startswith(("_orig_mod.", "module.")):  # torch.compile / DDP wrappers, in any order
            k = k.split(".", 1)[1]
        out[k] = v
    return out


# -----------------------------------------------------------------------------
# model


def build_model(cfg, explicit, meta):
    """(model on CPU, checkpoint dict or None). Scratch: from the settings. Otherwise the
    architecture comes from the checkpoint, and a model setting given explicitly that disagrees with
    it is an error (block_size may differ when starting from a file: it only sizes RoPE tables)."""
    data_vocab = meta["vocab_size"]
    ckpt = None
    if cfg["init_from"] == "scratch":
        mc = {k: cfg[k] for k in MODEL_KEYS}
        if mc["vocab_size"] == 0:
            mc["vocab_size"] = data_vocab
    else:
        path = os.path.join(cfg["out_dir"], CKPT_NAME) if cfg["init_from"] == "resume" else cfg["init_from"]
        if cfg["init_from"] == "resume" and not os.path.isfile(path):
            raise SystemExit(f"init_from=resume but {path} does not exist: train from scratch first, or set "
                             "init_from to a checkpoint file")
        if cfg["init_from"] != "resume" and not os.path.isfile(path):
            raise SystemExit(f"init_from={path!r}: no such file (use 'scratch', 'resume' or a checkpoint path)")
        ckpt = load_checkpoint(path)
        mc = dict(ckpt["model_config"])
        unknown = sorted(set(mc) - set(LlamaConfig.__dataclass_fields__))
        if unknown:
            raise SystemExit(f"checkpoint {path}: model_config has unknown fields {unknown}")
        conflicts = []
        for k in MODEL_KEYS:
            if k not in explicit or k not in mc:
                continue
            mine, theirs = cfg[k], mc[k]
            if k == "kv_source":
                try:
                    same = parse_kv_source(mine, mc["n_layer"]) == parse_kv_source(theirs, mc["n_layer"])
                except ValueError:
                    same = False
            elif k == "block_size" and cfg["init_from"] != "resume":
                mc[k] = mine  # finetuning at another context length is fine
                continue
            else:
                same = mine == theirs or (k == "vocab_size" and mine == 0)
            if not same:
                conflicts.append(f"{k}={mine!r} (checkpoint: {theirs!r})")
        if conflicts:
            raise SystemExit(f"the settings conflict with checkpoint {path}: {'; '.join(conflicts)}. "
                             "Drop them to use the checkpoint's values, or start from scratch in another out_dir.")
    if mc["vocab_size"] < data_vocab:
        raise SystemExit(f"vocab_size={mc['vocab_size']} is smaller than the dataset's vocabulary ({data_vocab})")
    try:
        config = LlamaConfig(**mc)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"bad model settings: {e}") from None
    model = Llama(config)
    if ckpt is not None:
        try:
            model.load_state_dict(strip_prefixes(ckpt["model"]))
        except RuntimeError as e:
            raise SystemExit(f"checkpoint weights do not fit its model_config: {str(e)[:500]}") from None
    return model, ckpt


def compute_loss(model, X, Y, ctx, teacher=None, cfg=None):
    """Loss of one micro-step: cross-entropy, or with a teacher the distillation loss."""
    with ctx:
        if teacher is None:
            return model(X, Y)[1]
        logits, _ = model(X)  # no cross-entropy here: distillation_loss computes it
        with torch.no_grad():
            teacher_logits, _ = teacher(X)
        return distillation_loss(logits, teacher_logits, Y, cfg["distill_alpha"], cfg["distill_temperature"])


def setup_adaptation(cfg, model, dev):
    """(Adaptation or None, teacher or None) for the adapt_* and distill_* settings; freezes the
    layers that will not train. Every bad combination stops here, before any training."""
    if not cfg["adapt_target"]:
        if cfg["distill_alpha"] > 0:
            raise SystemExit("distill_alpha > 0 needs adapt_target: the teacher is the dense model being adapted")
        return None, None
    similarity = None
    if cfg["adapt_similarity"]:
        if not os.path.isfile(cfg["adapt_similarity"]):
            raise SystemExit(f"adapt_similarity={cfg['adapt_similarity']!r}: no such file (run `python adapt.py` first)")
        similarity = torch.load(cfg["adapt_similarity"], weights_only=True)
    try:
        adaptation = Adaptation(model.config.kv_source, cfg["adapt_target"], cfg["adapt_mode"], cfg["adapt_order"],
                                cfg["adapt_stage_iters"], cfg["adapt_layers_per_stage"], similarity)
        freeze(model, adaptation.target, cfg["adapt_train_layers"])
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if not 0 <= cfg["distill_alpha"] <= 1 or cfg["distill_temperature"] <= 0:
        raise SystemExit("distill_alpha must lie in [0, 1] and distill_temperature be > 0")
    teacher = None
    if cfg["distill_alpha"] > 0:
        path = cfg["distill_teacher"] or (cfg["init_from"] if cfg["init_from"] not in ("scratch", "resume") else "")
        if not path:
            raise SystemExit("distillation needs its teacher: set distill_teacher=<the dense checkpoint adaptation "
                             "started from> (init_from is not a file here)")
        # the teacher sees the student's batches: give it the student's context length
        teacher = model_from_checkpoint(load_checkpoint(path), block_size=model.config.block_size)
        if teacher.config.vocab_size != model.config.vocab_size:
            raise SystemExit(f"distill_teacher {path}: vocab_size {teacher.config.vocab_size} differs from the "
                             f"student's {model.config.vocab_size}")
        teacher.requires_grad_(False)
        teacher.eval().to(dev)
    return adaptation, teacher


def get_lr(it, cfg):
    if not cfg["decay_lr"]:
        return cfg["learning_rate"]
    lr, warm, decay, low = cfg["learning_rate"], cfg["warmup_iters"], cfg["lr_decay_iters"], cfg["min_lr"]
    if it < warm:
        return lr * (it + 1) / (warm + 1)
    if it >= decay:
        return low
    ratio = (it - warm) / max(1, decay - warm)
    return low + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - low)


def weights_digest(model):
    h = hashlib.sha256()
    for k, t in model.state_dict().items():
        h.update(k.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# -----------------------------------------------------------------------------
# training


class _Log:
    def __init__(self, path):
        self.path = path

    def __call__(self, text=None, **record):
        if text:
            print(text, flush=True)
        if self.path and record:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def train(cfg, explicit):
    import torch.distributed as dist

    # ---- processes
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world, rank, local_rank = 1, 0, None
    if ddp:
        world, rank, local_rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    G = cfg["gradient_accumulation_steps"]
    for key in ("batch_size", "block_size", "gradient_accumulation_steps", "eval_interval", "log_interval"):
        if cfg[key] < 1:
            raise SystemExit(f"{key}={cfg[key]} must be >= 1")
    if G % world:
        raise SystemExit(f"gradient_accumulation_steps={G} does not divide over {world} ranks: it counts "
                         f"micro-steps in total over all ranks, make it a multiple of {world}")
    local_steps = G // world
    dev = resolve_device(cfg, local_rank if ddp else None)
    device_type = "cuda" if dev.startswith("cuda") else dev
    if ddp:
        be = cfg["backend"] if cfg["backend"] != "auto" else ("nccl" if device_type == "cuda" else "gloo")
        if device_type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=be)
    master = rank == 0
    try:
        return _train(cfg, explicit, ddp, world, rank, master, local_steps, dev, device_type)
    finally:
        if ddp and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg, explicit, ddp, world, rank, master, local_steps, dev, device_type):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    barrier = dist.barrier if ddp else (lambda: None)
    torch.manual_seed(cfg["seed"] + rank)
    np.random.seed(cfg["seed"] + rank)
    random.seed(cfg["seed"] + rank)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dt = resolve_dtype(cfg, device_type)
    ctx = autocast_ctx(device_type, dt)
    use_compile = resolve_compile(cfg, device_type)

    # ---- data
    data_dir = ensure_data(cfg, master, barrier)
    from data.common import load_meta
    try:
        meta = load_meta(data_dir)
    except (ValueError, OSError) as e:
        raise SystemExit(f"{data_dir}/meta.json: {e}") from None
    train_data, val_data = open_tokens(data_dir, "train", meta), open_tokens(data_dir, "val", meta)
    for split, arr in (("train", train_data), ("val", val_data)):
        if len(arr) <= cfg["block_size"] + 1:
            raise SystemExit(f"block_size={cfg['block_size']} is longer than the data: {data_dir}/{split}.bin has "
                             f"{len(arr)} tokens; use a smaller block_size or more data")

    # ---- model and optimizer
    model, ckpt = build_model(cfg, explicit, meta)
    if cfg["block_size"] > model.config.block_size:
        raise SystemExit(f"block_size={cfg['block_size']} exceeds the model's block_size={model.config.block_size}")
    resume = cfg["init_from"] == "resume"
    model.to(dev)
    adaptation, teacher = setup_adaptation(cfg, model, dev)
    if adaptation is not None and master and cfg["max_iters"] < adaptation.total_iters:
        print(f"warning: max_iters={cfg['max_iters']} ends before the last adaptation stage does "
              f"(iteration {adaptation.total_iters}): the model will not reach adapt_target")
    optimizer = model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"],
                                           (cfg["beta1"], cfg["beta2"]), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=(dt == "float16"))
    iter_num, best_val_loss, seed = 0, float("inf"), cfg["seed"]
    if resume:
        for key in ("optimizer", "iter_num"):
            if key not in ckpt:
                raise SystemExit(f"init_from=resume: the checkpoint lacks {key!r} (it holds weights only); "
                                 "use init_from=<that file> to start a new run from its weights")
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise SystemExit(f"checkpoint optimizer state does not fit the model: {e}") from None
        if "scaler" in ckpt and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        iter_num, best_val_loss = ckpt["iter_num"], ckpt.get("best_val_loss", float("inf"))
        seed = ckpt.get("sampler", {}).get("seed", seed)
        if master and seed != cfg["seed"]:
            print(f"note: resuming the data stream of seed {seed} from the checkpoint (not seed={cfg['seed']})")
        if "rng" in ckpt and master:
            restore_rng(ckpt["rng"])
    ckpt = None  # free it
    raw_model = model

    def wrap(raw_model):
        """(model to train, model to evaluate): compiled, and for training DDP-wrapped."""
        if use_compile:  # forget graphs of the model's earlier shapes: each stage would count
            torch._dynamo.reset()  # against dynamo's recompile limit and end in silent eager mode
        model = torch.compile(raw_model) if use_compile else raw_model
        eval_model = model  # compiled but not DDP-wrapped: evaluation needs no gradient sync
        if ddp:
            model = DDP(model, device_ids=[torch.device(dev).index] if device_type == "cuda" else None)
        return model, eval_model
    model, eval_model = wrap(raw_model)
    train_sampler = BatchSampler(train_data, cfg["block_size"], cfg["batch_size"], seed, dev)
    val_sampler = BatchSampler(val_data, cfg["block_size"], cfg["batch_size"], seed, dev)

    out_dir = cfg["out_dir"]
    ckpt_path = os.path.join(out_dir, CKPT_NAME)
    if master:
        os.makedirs(out_dir, exist_ok=True)
    log = _Log(os.path.join(out_dir, "log.jsonl") if master else None)
    tokens_per_iter = cfg["batch_size"] * cfg["block_size"] * local_steps * world
    n_params = raw_model.num_params()
    c = raw_model.config
    if master:
        log(f"model: {n_params / 1e6:.2f}M parameters, {c.n_layer} layers, kv_source {list(c.kv_source)} "
            f"({len(c.owners)} K/V owners); device {dev}, dtype {dt}, compile {use_compile}, ranks {world}; "
            f"{tokens_per_iter:,} tokens per iteration; starting at iter {iter_num}",
            kind="start", iter=iter_num, params=n_params, kv_source=list(c.kv_source), device=dev, dtype=dt,
            compile=use_compile, world_size=world, tokens_per_iter=tokens_per_iter, config=cfg)

    def peak():
        if cfg["peak_flops"] > 0:
            return cfg["peak_flops"]
        if device_type == "cuda":
            from model import peak_flops_for
            try:
                return peak_flops_for(torch.cuda.get_device_name(dev))
            except ValueError:
                return None
        return None
    peak_fl = peak()

    @torch.no_grad()
    def estimate_loss():
        out = {}
        model.eval()
        for split, sampler, stream in (("train", train_sampler, "eval_train"), ("val", val_sampler, "eval_val")):
            total = torch.zeros(2, dtype=torch.float64, device=dev)
            for k in range(rank, cfg["eval_iters"], world):
                X, Y = sampler.get(stream, 0, k)
                total[0] += compute_loss(eval_model, X, Y, ctx).double()
                total[1] += 1
            if ddp:
                dist.all_reduce(total)
            out[split] = (total[0] / total[1]).item() if total[1] > 0 else float("nan")
        model.train()
        return out

    start_iter, last_saved = iter_num, (iter_num if resume else None)
    train_time, train_tokens, first_timed = 0.0, 0, None
    t_log, it_log = 0.0, 0
    val_loss = None
    model.train()
    while True:
        if adaptation is not None and adaptation.apply(raw_model, optimizer, iter_num):
            model, eval_model = wrap(raw_model)  # parameters were removed: DDP and compile must see it
            best_val_loss = float("inf")  # "best" compares models of the same kv_source only
            if master:
                log(f"iter {iter_num}: kv_source is now {list(raw_model.config.kv_source)}",
                    kind="adapt", iter=iter_num, kv_source=list(raw_model.config.kv_source))
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        at_end = iter_num >= cfg["max_iters"]
        if cfg["eval_only"] or ((iter_num % cfg["eval_interval"] == 0 or at_end) and not (resume and iter_num == start_iter)):
            losses = estimate_loss()
            val_loss = losses["val"]
            if master:
                log(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}",
                    kind="eval", iter=iter_num, train_loss=losses["train"], val_loss=losses["val"], lr=lr,
                    time=train_time)
            if not math.isfinite(val_loss):
                raise SystemExit(f"val loss is {val_loss} at iter {iter_num}: training stopped; the last good "
                                 f"checkpoint {ckpt_path} (iter {last_saved}) was kept" if last_saved is not None else
                                 f"val loss is {val_loss} at iter {iter_num}: training stopped, no checkpoint written")
            improved = val_loss < best_val_loss
            best_val_loss = min(best_val_loss, val_loss)
            if (improved or cfg["always_save_checkpoint"]) and iter_num > start_iter and not cfg["eval_only"]:
                if master:
                    save_checkpoint(make_checkpoint(raw_model, optimizer, scaler, iter_num, best_val_loss,
                                                    train_sampler, cfg), ckpt_path)
                    log(f"saved {ckpt_path} (iter {iter_num})")
                last_saved = iter_num
        if at_end or cfg["eval_only"]:
            break

        # ---- one optimizer step
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float32, device=dev)
        for k in range(local_steps):
            X, Y = train_sampler.get("train", iter_num, rank * local_steps + k)
            if ddp:
                model.require_backward_grad_sync = k == local_steps - 1
            loss = compute_loss(model, X, Y, ctx, teacher, cfg)
            loss_sum += loss.detach().float()
            scaler.scale(loss / local_steps).backward()
        if ddp:
            dist.all_reduce(loss_sum)
        loss_val = loss_sum.item() / (local_steps * world)
        if not math.isfinite(loss_val):
            where = (f"the last good checkpoint {ckpt_path} (iter {last_saved}) was kept" if last_saved is not None
                     else "no checkpoint was written")
            if master:
                log(kind="diverged", iter=iter_num, loss=str(loss_val))
            raise SystemExit(f"training loss is {loss_val} at iter {iter_num}: training stopped and nothing "
                             f"after it saved; {where}. Lower learning_rate or raise warmup_iters.")
        if cfg["grad_clip"] > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if device_type == "cuda":
            torch.cuda.synchronize(dev)
        dt_step = time.perf_counter() - t0
        if first_timed is None:
            first_timed = iter_num  # the first step (compile, allocator warm-up) is not counted
        else:
            train_time += dt_step
            train_tokens += tokens_per_iter
        t_log += dt_step
        it_log += 1
        iter_num += 1
        if iter_num % cfg["log_interval"] == 0 or iter_num == cfg["max_iters"]:
            tps = tokens_per_iter * it_log / t_log
            mfu = raw_model.estimate_mfu(tps / world, cfg["block_size"], peak_flops=peak_fl) if peak_fl else None
            if master:
                log(f"iter {iter_num - 1}: loss {loss_val:.4f}, lr {lr:.2e}, {1000 * t_log / it_log:.1f} ms/iter, "
                    f"{tps:,.0f} tokens/s" + (f", MFU {100 * mfu:.1f}%" if mfu is not None else ""),
                    kind="train", iter=iter_num - 1, loss=loss_val, lr=lr, ms_per_iter=1000 * t_log / it_log,
                    tokens_per_s=tps, mfu=mfu)
            t_log, it_log = 0.0, 0

    summary = {"iters": iter_num, "val_loss": val_loss, "best_val_loss": best_val_loss,
               "tokens_per_s": train_tokens / train_time if train_time > 0 else None}
    if ddp:
        digests = [None] * world
        dist.all_gather_object(digests, weights_digest(raw_model))
        summary["ddp_weights_identical"] = len(set(digests)) == 1
        if master:
            log(f"ddp: weights on all {world} ranks are {'identical' if len(set(digests)) == 1 else 'DIFFERENT'} "
                f"(sha256 {digests[0][:16]})")
    if master and not cfg["eval_only"]:
        tps = summary["tokens_per_s"]
        vl = f"{val_loss:.4f}" if val_loss is not None else "not evaluated"
        log(f"done: {iter_num} iters, val loss {vl}, best {best_val_loss:.4f}" +
            (f", {tps:,.0f} tokens/s on average (first step and evaluations excluded)" if tps else ""),
            kind="done", **summary)
    return summary


def main(argv=None):
    cfg, explicit = parse_args(sys.argv[1:] if argv is None else argv)
    return train(cfg, explicit)


if __name__ == "__main__":
    main()
