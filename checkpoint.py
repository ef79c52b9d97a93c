"""
Checkpoints: written atomically, read with validation, and turned into a ready model by one function
(`load_model`) that train.py, sample.py, convert_hf.py, adapt.py, bench.py and the tests all use; and
the training state train.py writes into one and resumes from (the section at the end).

A checkpoint is a dict saved with torch.save:
  model          the plain module's state dict (no torch.compile / DDP prefixes)
  model_config   LlamaConfig as a dict (kv_source as a list)
  kv_blend       optional {layer: [source, weight]}: layers halfway through an adaptation stage
  ...            whatever the writer adds: optimizer, iter_num, rng, sampler and config from
                 train.py; tokenizer_json, chat_template, hf_config (bos/eos ids) from convert_hf.py,
                 which train.py and adapt.py pass on (SAMPLING_KEYS)

Below the reading and writing: the state-dict transforms that turn a dense model's weights into a shared
model's (share_kv_state, share_attn_state) and the steps every importer (convert_hf.py, gguf_import.py)
shares, kept here so that neither importer imports adapt.py or the other.
"""

import dataclasses
import hashlib
import json
import os
import random
import tempfile
import zipfile

import numpy as np
import torch

from configurator import DTYPES, ConfigError
from integrity import DIGEST_KEY, digest_mismatch, schema_problem, tensor_digests
from model import Llama, LlamaConfig, rope_tables

CKPT_NAME = "ckpt.pt"
# what a checkpoint carries so that sample.py needs nothing else; training and conversion pass it on
SAMPLING_KEYS = ("tokenizer_json", "chat_template", "hf_config", "meta")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not describe a model; the message says which."""


class _KeepWriteError:
    """A file wrapper for torch.save, which turns an exception of the file's write (an OSError of a full
    disk, a KeyboardInterrupt) into a RuntimeError about stream positions: this keeps the original so
    that save_checkpoint raises it instead."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except BaseException as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def temp_name(path):
    """The prefix and suffix of save_checkpoint's temp files for path (see remove_stale_temps)."""
    return f".{os.path.basename(path)}.", ".tmp"


def current_umask() -> int:
    umask = os.umask(0)  # the only way to read it is to set it: put it straight back
    os.umask(umask)
    return umask


def umask_file_mode() -> int:
    """The mode a plain open(path, "w") gives a new file under the current umask. Writers that go through
    a private temp file (mkstemp, safetensors' save_file) make it 0600; they chmod to this instead."""
    return 0o666 & ~current_umask()


def replace_file(path, write):
    """Write path through a temp file in its directory: write(f) fills it, then fsync and a rename over the
    old one, so a crash or error at any point leaves the previous file intact. A failed write (a full disk)
    is an OSError."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    prefix, suffix = temp_name(path)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), umask_file_mode())  # mkstemp makes the file 0600; give it the usual permissions
            write(f)
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


def save_checkpoint(obj, path):
    """Write a checkpoint through replace_file: a crash or error at any point leaves the previous checkpoint
    intact. A CRC-32 of every tensor goes in with it (integrity.tensor_digests), for load_checkpoint to check
    what torch read."""
    if isinstance(obj, dict):
        obj = {**obj, DIGEST_KEY: tensor_digests(obj)}
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory: give the checkpoint a file name, like "
                              f"{os.path.join(path, CKPT_NAME)}")

    def write(f):
        out = _KeepWriteError(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is not None:
                raise out.error from None
            raise
    replace_file(path, write)


def save_safetensors(tensors, metadata, path):
    """A safetensors file of tensors and metadata (str -> str) through replace_file, the same bytes for the
    same input: the library writes its metadata map in hash order, which changes from one call to the next,
    so the header is written again with the metadata's keys sorted (the tensors' entries and data as the
    library laid them out; the header padded with spaces to 8 bytes, as the format asks)."""
    from safetensors.torch import save
    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    replace_file(path, lambda f: f.write(len(text).to_bytes(8, "little") + text + raw[8 + n:]))


def remove_stale_temps(path) -> list:
    """Delete the temp files a killed save_checkpoint(..., path) (replace_file) left behind; the names
    removed. Call it only while no other process can be writing path (train.py holds out_dir's lock)."""
    d = os.path.dirname(os.path.abspath(path))
    prefix, suffix = temp_name(path)
    removed = []
    for name in os.listdir(d):
        if name.startswith(prefix) and name.endswith(suffix):
            try:
                os.unlink(os.path.join(d, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def checkpoint_path(path):
    """A checkpoint file, or a training out_dir holding ckpt.pt; what it is otherwise, in one line."""
    if os.path.isdir(path):
        inner = os.path.join(path, CKPT_NAME)
        if os.path.isfile(inner):
            return inner
        if os.path.isfile(os.path.join(path, "config.json")):
            raise CheckpointError(f"{path} is a Hugging Face directory, not a checkpoint: convert it first "
                                  f"(convert_hf.py import {path} out.pt)")
        raise CheckpointError(f"{path} is a directory without {CKPT_NAME}: give a checkpoint file or a training out_dir")
    if os.path.exists(path) and not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} is not a regular file (a device, FIFO or socket): give a checkpoint file")
    if os.path.islink(path) and not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} is a symbolic link to nothing (broken, or a loop): {os.readlink(path)}")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"checkpoint {path} cannot be read: permission denied (it is not corrupt)")
    return path


def corrupt(path, why):
    return CheckpointError(f"checkpoint {path} is corrupt ({why}): a damaged or flipped byte, refused rather than "
                           "loaded wrong. It was left as it is; restore a copy or start anew.")


def is_tensor_entry(name):
    return "/data/" in name


def verify_crcs(path, tensors=True):
    """Raise CheckpointError if an entry of the zip file torch.save wrote fails its CRC-32 or claims to be
    a directory: torch.load checks neither, so a flipped byte in a tensor would load silently, and a
    flipped "directory" bit in an entry's external attributes makes torch read the tensor as
    uninitialised memory. tensors=False skips the tensors' data (a checkpoint whose tensors carry digests
    is checked on what torch read instead). Reading everything costs one pass over the file: on the
    2-core EPYC, 100 MB from the page cache took 22 ms idle, 46 ms loaded. Entries stored with CRC 0
    (torch's set_crc32_options(False)) carry no checksum and are skipped. A file that is no zip is left
    to torch.load."""
    try:
        if not zipfile.is_zipfile(path):  # it raises BadZipFile itself on some damaged end records
            return
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.is_dir() or info.external_attr & 0x10 or (info.external_attr >> 16) & 0o040000:
                    raise zipfile.BadZipFile(f"entry {info.filename!r} is marked as a directory")
                if (info.CRC == 0 and info.file_size) or (not tensors and is_tensor_entry(info.filename)):
                    continue
                with z.open(info) as f:  # ZipExtFile checks the CRC when it reaches the end
                    while f.read(1 << 22):
                        pass
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as e:
        raise corrupt(path, str(e)[:200]) from None


def load_checkpoint(path, mmap=False):
    """The checkpoint dict at path (a file or an out_dir), read with weights_only=True and checked: the zip
    CRCs of its non-tensor entries before, its structure and types (integrity.schema_problem) and every
    tensor against the digest written with it (integrity.digest_mismatch) after torch has read it.
    A checkpoint older than the digests is loaded after the CRCs of its tensor entries are checked too
    (refusing it would strand every existing run; the CRCs and the directory-bit check cover the damage
    seen so far, and its next save adds digests).

    mmap=True leaves the weights in the file's pages: right for one-shot jobs like export, wrong for a
    long-lived one while a training run may rewrite the file."""
    path = checkpoint_path(path)
    verify_crcs(path, tensors=False)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except PermissionError:
        raise CheckpointError(f"checkpoint {path} cannot be read: permission denied (it is not corrupt)") from None
    except Exception as e:
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        raise CheckpointError(f"checkpoint {path} cannot be read: it is corrupt, truncated or not a torch file "
                              f"({type(e).__name__}: {msg}). It was left as it is.") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        keys = sorted(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a checkpoint of this project: it needs 'model' and "
                              f"'model_config', found {keys} (for a Hugging Face directory use convert_hf.py)")
    problem = schema_problem(ckpt)
    if problem:
        raise CheckpointError(f"checkpoint {path} is malformed: {problem}. It was not written by this project's "
                              "save_checkpoint, or was damaged; restore a good copy")
    if DIGEST_KEY in ckpt:
        problem = digest_mismatch(ckpt, path)
        if problem:
            raise CheckpointError(problem)
        del ckpt[DIGEST_KEY]  # they describe this file; a checkpoint made from the dict gets its own
    else:
        verify_crcs(path)
    return ckpt


def strip_prefixes(state):
    out = {}
    for k, v in state.items():
        while k.startswith(("_orig_mod.", "module.")):  # torch.compile / DDP wrappers, in any order
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def build_on_meta(config: LlamaConfig, state_dict: dict) -> Llama:
    """A Llama that takes the tensors of state_dict as its parameters: built on the meta device and
    loaded strictly with assign, so there is no random init and no second copy."""
    with torch.device("meta"):
        model = Llama(config)
    return assign_state(model, state_dict, "the weights do not fit the model config")


def assign_state(model: Llama, state_dict: dict, misfit: str) -> Llama:
    """Give a model built on the meta device (and perhaps changed there: quantized, with adapters) the
    tensors of state_dict, strictly (a tied head may be absent); misfit starts the error if they do not fit."""
    config, state_dict = model.config, dict(state_dict)
    if config.tie_embeddings:
        state_dict.pop("lm_head.weight", None)
    try:
        result = model.load_state_dict(state_dict, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{misfit}: {str(e)[:500]}") from None
    missing = set(result.missing_keys) - ({"lm_head.weight"} if config.tie_embeddings else set())
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{misfit}: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(result.unexpected_keys)[:5]}")
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope_cos, model.rope_sin = rope_tables(config)
    return model


def model_from_checkpoint(ckpt: dict, **config_changes) -> Llama:
    """The Llama a checkpoint dict describes, with its weights and any adaptation blend in progress.
    config_changes override model_config fields (e.g. block_size, which only sizes the RoPE tables)."""
    if "lora" in ckpt:  # adapters over a frozen (maybe 4-bit) base: not a plain model until merged
        raise CheckpointError("this is a LoRA run's checkpoint (adapters over a frozen base): resume it with train.py "
                              "--init_from=resume, or merge it first: python lora.py --init_from=FILE --rank=R --out=OUT")
    try:
        config = LlamaConfig(**{**ckpt["model_config"], **config_changes})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"bad model_config in the checkpoint: {e}") from None
    model = build_on_meta(config, strip_prefixes(ckpt["model"]))
    for layer, (source, weight) in (ckpt.get("kv_blend") or {}).items():
        model.kv_blend[int(layer)] = (int(source), torch.tensor(float(weight)))
    return model


def special_ids(ckpt, hf_dir=None):
    """(bos, eos) token ids of the model (None where it names none), from the checkpoint or hf_dir's config.json."""
    hf = ckpt.get("hf_config") or {}
    if hf_dir is not None:
        with open(os.path.join(hf_dir, "config.json")) as f:
            hf = json.load(f)
    eos = hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    return hf.get("bos_token_id"), eos if isinstance(eos, int) else None


def load_model(path, mmap=False, **config_changes):
    """(model in eval mode on the CPU, checkpoint dict) from a checkpoint file or out_dir."""
    ckpt = load_checkpoint(path, mmap=mmap)
    return model_from_checkpoint(ckpt, **config_changes).eval(), ckpt


def model_weights(ckpt: dict) -> dict:
    """A checkpoint's weights by model.py's names: torch.compile / DDP prefixes stripped, and a tied head
    left out (it is the embedding, which model.state_dict() lists twice and an importer once)."""
    state = strip_prefixes(ckpt["model"])
    if ckpt["model_config"].get("tie_embeddings"):
        state.pop("lm_head.weight", None)
    return state


def weights_sha256(ckpt: dict) -> str:
    """The sha256 that names a base model for the adapters and deltas made on it (lora.py, delta.py): of
    its weights, not of its file. For each tensor in name order: its name, dtype and shape, then its
    bytes. The file's own bytes would change with anything else the checkpoint carries (its chat
    template, a key a later version of convert_hf.py adds, the pickle of another torch version) while the
    weights, which are all a delta depends on, stay the same."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model_weights(ckpt).items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{str(t.dtype).replace('torch.', '')}\0{list(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def blend_state(model: Llama) -> dict:
    """model.kv_blend as plain values for a checkpoint."""
    return {layer: [source, float(weight)] for layer, (source, weight) in model.kv_blend.items()}


# -----------------------------------------------------------------------------
# state dicts from elsewhere: turning a dense model's weights into a shared model's (adapt.py's abrupt
# conversion, convert_hf.py and gguf_import.py at import), and what the importers have in common


class ConversionError(ValueError):
    """Bad input to an importer: a directory, file or checkpoint that is not a (supported) Llama. The
    message says why."""


def share_kv_state(state_dict, kv_source, kv_init="own"):
    """A dense state dict (model.py names) turned into one for kv_source: consumers' K/V projections are
    dropped; each owner keeps its own (kv_init='own') or takes the mean of the K/V projections of every
    layer that will use it, itself included ('mean', as LCKV initialises a shared projection)."""
    if kv_init not in ("own", "mean"):
        raise ValueError(f"kv_init must be 'own' or 'mean', got {kv_init!r}")
    out, users = {}, {}
    for key, tensor in state_dict.items():
        parts = key.split(".")
        if len(parts) == 5 and parts[0] == "layers" and parts[3] in ("k_proj", "v_proj"):
            layer = int(parts[1])
            users.setdefault((kv_source[layer], parts[3]), []).append(tensor)
            if kv_source[layer] != layer:
                continue
        out[key] = tensor
    if kv_init == "mean":
        for (owner, name), tensors in users.items():
            key = f"layers.{owner}.self_attn.{name}.weight"
            out[key] = (sum(t.float() for t in tensors) / len(tensors)).to(out[key].dtype)
    return out


def share_attn_state(state_dict, attn_source):
    """A state dict with the Q and K projections of the attention sharers dropped (EchoAtt): a layer that
    takes another layer's attention pattern computes no scores of its own."""
    def is_sharers_q_or_k(key):
        parts = key.split(".")
        return parts[0] == "layers" and parts[3] in ("q_proj", "k_proj") and attn_source[int(parts[1])] != int(parts[1])
    return {k: t for k, t in state_dict.items() if not is_sharers_q_or_k(k)}


def collect_state_dict(tensors, config: LlamaConfig, name_of, kv_init="own", dtype=torch.float32, source="",
                       described_by="config.json", already_shared=False) -> dict:
    """model.py's state dict for `config` from a stream of (where, name, tensor) in a file's own naming;
    name_of(key) gives the file's name for one of our keys. Shared by the importers (HF, GGUF).

    Every tensor is checked as it arrives (a weight of this model, seen once, the right shape, floating
    point) and cast to dtype; then share_kv_state drops the consumers' K/V projections
    (kv_init='own') or averages them into their owner's (kv_init='mean').
    `where` (a file name) and `source` (the input) only go into error messages. already_shared: the
    file holds config's shared model itself (our export of one), sharers' projections absent.
    """
    if kv_init not in ("own", "mean"):
        raise ConversionError(f"kv_init must be 'own' or 'mean', got {kv_init!r}")
    with torch.device("meta"):
        expected = config if already_shared else dataclasses.replace(config, kv_source=None)
        shapes = {k: tuple(v.shape) for k, v in Llama(expected).state_dict().items()}
    if config.tie_embeddings:
        del shapes["lm_head.weight"]  # tied: lm_head is embed_tokens
    keys = {name_of(k): k for k in shapes}

    state_dict, seen = {}, set()
    for where, name, tensor in tensors:
        key = keys.get(name)
        if key is None:
            raise ConversionError(f"unexpected key {name!r} in {where}: not a weight of a Llama with this "
                                  f"{described_by} (not a Llama, or a variant this model does not implement)")
        if name in seen:
            raise ConversionError(f"key {name!r} appears twice (again in {where})")
        if tuple(tensor.shape) != shapes[key]:
            raise ConversionError(f"shape mismatch for {name!r} in {where}: {tuple(tensor.shape)} in the file, "
                                  f"{shapes[key]} expected from {described_by}")
        if not tensor.is_floating_point():
            raise ConversionError(f"{name!r} in {where} has dtype {tensor.dtype}, expected floating point weights")
        seen.add(name)
        state_dict[key] = tensor
        del tensor

    missing = [name for name in keys if name not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"missing key {missing[0]!r}{more} in {str(source)!r}: the weights do not match "
                              f"{described_by} or are incomplete")
    # shared before the cast, so that a mean is taken over the weights as they are in the file
    shared = state_dict if already_shared else share_kv_state(state_dict, config.kv_source, kv_init)
    return {k: t.to(dtype) for k, t in shared.items()}  # no copy of a memory-mapped tensor already in dtype


def hf_config_from_llama(config: LlamaConfig, dtype=torch.float32, extra=None) -> dict:
    """A config.json that transformers 5.x (rope_parameters, dtype) and 4.x (rope_theta, rope_scaling,
    torch_dtype) both read: what convert_hf.py export writes, and the hf_config an imported checkpoint
    carries (its bos/eos ids are how sample.py knows where generation stops)."""
    rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope_parameters = {**config.rope_scaling, "rope_type": "llama3", "rope_theta": config.rope_theta}
    dtype_name = {v: k for k, v in DTYPES.items()}[dtype]
    hf = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": config.n_embd, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head, "head_dim": config.head_dim,
        "vocab_size": config.vocab_size, "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "rope_theta": config.rope_theta, "rope_scaling": None if config.rope_scaling is None else
        {**config.rope_scaling, "rope_type": "llama3"},
        "rope_parameters": rope_parameters, "dtype": dtype_name, "torch_dtype": dtype_name,
        "use_cache": True,
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if extra and key in extra:
            hf[key] = extra[key]
    return hf


# -----------------------------------------------------------------------------
# random number generators, for exact resume


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(rng: dict):
    torch.set_rng_state(rng["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in rng["python"]))
    n = rng["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


# -----------------------------------------------------------------------------
# the training state: what train.py writes at each evaluation and resumes from

# train.py's settings that are model_config fields: a checkpoint's architecture wins over their defaults
MODEL_KEYS = ("n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size", "vocab_size", "block_size",
              "rope_theta", "norm_eps", "tie_embeddings", "kv_source")


def checkpoint_to_start_from(init_from, out_dir):
    """(path, checkpoint dict) for init_from='resume' (out_dir's) or a file; (None, None) from scratch."""
    if init_from == "scratch":
        return None, None
    path = os.path.join(out_dir, CKPT_NAME) if init_from == "resume" else init_from
    if not os.path.lexists(path):
        raise ConfigError(f"init_from=resume but {path} does not exist: train from scratch first, or set init_from "
                          "to a checkpoint file" if init_from == "resume" else
                          f"init_from={path!r}: no such file (use 'scratch', 'resume' or a checkpoint path)")
    path = checkpoint_path(path)  # a directory, a FIFO, a device, an unreadable file: said as what it is
    return path, load_checkpoint(path)


def settings_from_checkpoint(s, explicit, ckpt):
    """On resume the model settings not given are the run's (its saved config, else the model's), not
    train.py's defaults: block_size, which sizes the batches, and what the log and the next checkpoint
    record; and so are max_iters and lr_decay_iters: a resumed run continues its own schedule unless told
    otherwise; and compile: a run started with --compile=True compiles again when resumed."""
    saved = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    for key in MODEL_KEYS + ("max_iters", "lr_decay_iters", "compile"):
        if key not in explicit and (key in saved or key in ckpt["model_config"]):
            value = saved.get(key, ckpt["model_config"].get(key))
            setattr(s, key, ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value)


def make_checkpoint(raw_model, states, scaler, iter_num, best_val_loss, sampler, settings, carried):
    """states: (model state_dict, optimizer state_dict), unsharded (sharding.ParallelModel.full_state).
    carried: what sample.py needs (SAMPLING_KEYS): the tokenizer and chat template of the checkpoint the
    run started from, and the dataset's meta."""
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
