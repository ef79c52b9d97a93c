"""
Checks that what was loaded is what was written, and that what is read from elsewhere has the types and
ranges the code after it assumes. Each check returns the one line that says what is wrong (or None), for
the caller to raise as its own error: checkpoint.py (CheckpointError), the importers (ConversionError).

- Tensor digests: save_checkpoint stores a CRC-32 of every tensor's bytes, keyed by its place in the
  checkpoint ("model.layers.3.mlp.up_proj.weight"); load_checkpoint recomputes them on the tensors torch
  has read. The zip's own CRCs check the container; this checks the data: a flipped bit in an entry's
  external attributes passes the zip CRC and makes torch read a tensor as uninitialised memory.
- The checkpoint schema: model a dict of tensors, model_config a dict whose fields have LlamaConfig's
  types, iter_num an int, optimizer/rng/sampler of the shapes train.py wrote, before anything uses them.
- Typed fields of imported configs (HF config.json, GGUF metadata): a bool is a bool (never the string
  "false"), a count is a positive int (not 4.7), a scale is a positive finite number (not 0 or NaN).
"""

import math
import numbers
import zlib

import torch

DIGEST_KEY = "tensor_digests"  # {"algorithm": "crc32", "tensors": {place: crc}}


def tensor_places(obj, prefix=""):
    """(place, tensor) for every tensor in a checkpoint-like tree of dicts, lists and tuples, in a fixed
    order (the dicts' own, which pickling keeps). The digests themselves are left out."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
        return
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    for key, value in items:
        if isinstance(value, (torch.Tensor, dict, list, tuple)) and not (prefix == "" and key == DIGEST_KEY):
            yield from tensor_places(value, f"{prefix}.{key}" if prefix else str(key))


def tensor_crc(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes as it reads (its elements in order, whatever its strides or device).
    CRC-32 rather than a cryptographic hash: it guards against damage, not an adversary, and it runs at
    memory speed (zlib; ~3 GB/s on this project's 2-core machine, with other jobs running)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def tensor_digests(obj) -> dict:
    """What save_checkpoint stores under DIGEST_KEY. A place seen twice (a tree whose keys hold dots) gets
    a suffix, the same at save and load as the order is fixed."""
    digests = {}
    for place, t in tensor_places(obj):
        if t.device.type == "meta":
            continue
        while place in digests:
            place += "#"
        digests[place] = tensor_crc(t)
    return {"algorithm": "crc32", "tensors": digests}


def digest_mismatch(ckpt, path):
    """The line that refuses a checkpoint whose tensors, as torch has read them, differ from what was
    written; None if they match. A checkpoint without digests (older than them) returns None: the
    caller checked its zip CRCs instead."""
    stored = ckpt.get(DIGEST_KEY)
    if stored is None:
        return None
    if not (isinstance(stored, dict) and stored.get("algorithm") == "crc32" and isinstance(stored.get("tensors"), dict)):
        return f"checkpoint {path} has a malformed {DIGEST_KEY!r} entry: corrupt or not written by this project"
    want, got = stored["tensors"], tensor_digests(ckpt)["tensors"]
    for place, crc in got.items():
        if place not in want:
            return f"checkpoint {path} is corrupt: it holds tensor {place}, which has no digest; restore a good copy"
        if want[place] != crc:
            return f"checkpoint {path} is corrupt: tensor {place} does not match its digest; restore a good copy"
    missing = [place for place in want if place not in got]
    if missing:
        return f"checkpoint {path} is corrupt: tensor {missing[0]} is missing (it has a digest); restore a good copy"
    return None


# -----------------------------------------------------------------------------
# the checkpoint schema

INT_FIELDS = ("n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size", "vocab_size", "block_size")
REQUIRED_FIELDS = INT_FIELDS + ("kv_source",)


def is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_number(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def layer_map_problem(value):
    """kv_source / attn_source as stored: None, a preset string or a list of ints."""
    if value is None or isinstance(value, str):
        return None
    if isinstance(value, (list, tuple)) and all(is_int(j) for j in value):
        return None
    return f"must be a list of layer numbers, got {type(value).__name__} {str(value)[:60]}"


def model_config_problem(mc):
    if not isinstance(mc, dict):
        return f"model_config is a {type(mc).__name__}, not a dict of the model's settings"
    missing = [k for k in REQUIRED_FIELDS if k not in mc]
    if missing:
        return f"model_config lacks {', '.join(missing)}"
    for k in INT_FIELDS:
        if not is_int(mc[k]) or mc[k] < 1:
            return f"model_config {k}={mc[k]!r} must be a positive integer"
    for k in ("rope_theta", "norm_eps"):
        if k in mc and not (is_number(mc[k]) and math.isfinite(mc[k]) and mc[k] > 0):
            return f"model_config {k}={mc[k]!r} must be a positive finite number"
    if "tie_embeddings" in mc and not isinstance(mc["tie_embeddings"], bool):
        return f"model_config tie_embeddings={mc['tie_embeddings']!r} must be true or false"
    if mc.get("rope_scaling") is not None and not isinstance(mc["rope_scaling"], dict):
        return f"model_config rope_scaling must be a dict or None, got {type(mc['rope_scaling']).__name__}"
    for k in ("kv_source", "attn_source"):
        problem = layer_map_problem(mc.get(k))
        if problem:
            return f"model_config {k} {problem}"
    return None


def training_state_problem(ckpt):
    """The parts train.py resumes from, when present."""
    if "iter_num" in ckpt and not (is_int(ckpt["iter_num"]) and ckpt["iter_num"] >= 0):
        return f"iter_num={ckpt['iter_num']!r} must be an integer >= 0"
    if "best_val_loss" in ckpt and not is_number(ckpt["best_val_loss"]):
        return f"best_val_loss={str(ckpt['best_val_loss'])[:40]} must be a number"
    opt = ckpt.get("optimizer")
    if opt is not None and not (isinstance(opt, dict) and isinstance(opt.get("state"), dict)
                                and isinstance(opt.get("param_groups"), list)
                                and all(isinstance(g, dict) for g in opt["param_groups"])):
        return "optimizer must be an optimizer state dict ({'state': {...}, 'param_groups': [...]})"
    rng = ckpt.get("rng")
    if rng is not None and not (isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor)
                                and rng["torch"].dtype == torch.uint8
                                and isinstance(rng.get("python"), (list, tuple)) and len(rng["python"]) == 3
                                and isinstance(rng.get("numpy"), (list, tuple)) and len(rng["numpy"]) == 5
                                and isinstance(rng.get("cuda", []), (list, tuple))):
        return "rng must be the random-generator state train.py writes (torch, python, numpy, cuda)"
    sampler = ckpt.get("sampler")
    if sampler is not None and not (isinstance(sampler, dict) and is_int(sampler.get("seed", 0))):
        return "sampler must be a dict with an integer seed"
    for key in ("config", "scaler"):
        if ckpt.get(key) is not None and not isinstance(ckpt[key], dict):
            return f"{key} must be a dict, got {type(ckpt[key]).__name__}"
    return None


def schema_problem(ckpt):
    """The first way a loaded checkpoint's structure or types differ from what this project writes; None
    if they do not. Checked before any of it is used."""
    model = ckpt["model"]
    if not isinstance(model, dict):
        return f"'model' is a {type(model).__name__}, not a dict of tensors (a state dict)"
    for k, v in model.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            return f"'model' entry {str(k)[:80]!r} is a {type(v).__name__}, not a tensor"
    problem = model_config_problem(ckpt["model_config"])
    if problem:
        return problem
    blend = ckpt.get("kv_blend")
    if blend is not None and not (isinstance(blend, dict) and all(
            isinstance(v, (list, tuple)) and len(v) == 2 and is_int(v[0]) and is_number(v[1])
            for v in blend.values())):
        return "kv_blend must map layers to [source, weight]"
    return training_state_problem(ckpt)


# -----------------------------------------------------------------------------
# typed fields of imported configs

NESTING_LIMIT = 32  # a config.json or GGUF value nested deeper than this is not a model config


def nesting_depth(obj, limit=NESTING_LIMIT):
    """How deep obj nests dicts and lists, counting no further than limit + 1 (and without recursion, so a
    structure 200,000 deep neither overflows the stack nor takes long)."""
    depth, level = 0, [obj]
    while level and depth <= limit:
        nxt = []
        for o in level:
            nxt.extend(o.values() if isinstance(o, dict) else o if isinstance(o, list) else ())
        level, depth = nxt, depth + 1 if nxt else depth
    return depth


def typed_field(value, kind, name, source):
    """value read as kind ('bool', 'count' a positive int, 'index' an int >= 0, 'positive' a positive finite
    number), or ValueError naming the field and its source. A bool written as a string ("false") is
    read as the bool it spells; any other string, a list, a null or a float count is refused."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ValueError(f"{name}={value!r} in {source} must be true or false")
    if kind in ("count", "index"):
        if is_int(value) or (isinstance(value, float) and value.is_integer()):
            if int(value) >= (1 if kind == "count" else 0):
                return int(value)
        want = "a positive integer" if kind == "count" else "an integer >= 0"
        raise ValueError(f"{name}={value!r} in {source} must be {want}")
    if kind == "positive":
        if is_number(value) and math.isfinite(value) and value > 0:
            return float(value)
        raise ValueError(f"{name}={value!r} in {source} must be a positive finite number")
    raise AssertionError(kind)
