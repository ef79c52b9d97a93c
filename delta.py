"""
An adapted model shipped as a delta: the few tensors it changed, applied to the base it was adapted from.

    .venv/bin/python delta.py --init_from=out-adapted --base=out-shakespeare-char-dense/ckpt.pt \
        --out=out-adapted/delta.safetensors
    .venv/bin/python sample.py --init_from=out-shakespeare-char-dense/ckpt.pt \
        --delta=out-adapted/delta.safetensors --start="ROMEO:"

Two kinds of delta file, both safetensors, both taken wherever a delta is (sample.py, train.py and
convert_hf.py export take --delta, each with the base as its checkpoint):
  tensors  this file's: the base is first put on the adapted model's maps (checkpoint.share_kv_state and
           share_attn_state drop the consumers' K/V and the sharers' Q/K projections), then every tensor
           of the adapted model that differs from it is stored, and any the base lacks; in float32 (base
           + delta is the adapted model exactly) or bfloat16 (half the bytes, to ship; the stored tensors
           come back rounded to bfloat16).
  lora     the adapters alone that `lora.py --adapters=FILE` writes from a LoRA run: the base, on the
           maps, in the form the run froze it in (int8, NF4), plus its adapters, merged (or not).
Both record what they mean something on: base_sha256 (checkpoint.weights_sha256, the base's weights,
so that importing the base again keeps it), kv_source and attn_source, and the adapted model's
model_config (and the K/V blend of a model written halfway through an adaptation stage). A delta
applied to another base is refused naming both digests; a CRC-32 of each tensor is checked when it is read.
"""

import json
import os
import sys

import torch

from checkpoint import (SAMPLING_KEYS, CheckpointError, blend_state, build_on_meta, checkpoint_path, load_checkpoint,
                        model_weights, save_safetensors, share_attn_state, share_kv_state, weights_sha256)
from configurator import ConfigError, apply_threads, configure, run_script, settings_from
from guards import claim_destination
from integrity import tensor_crc
from lora import LORA_FORMAT, add_saved_adapters, load_lora, merge_lora, quantize_base
from model import LlamaConfig

DELTA_FORMAT = "echo-llama-delta/1"
DELTA_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ARCHITECTURE = ("n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size", "vocab_size", "tie_embeddings")


class DeltaError(ValueError):
    """A delta that is missing, unreadable, not a delta, or not for this base; the message says which."""


# -----------------------------------------------------------------------------
# making a delta


def on_maps(weights: dict, kv_source, attn_source) -> dict:
    """A base's weights as the adapted model's maps have them: the consumers' K/V projections and the
    attention sharers' Q/K projections dropped (the owners keep their own)."""
    return share_attn_state(share_kv_state(weights, kv_source), attn_source)


def plain_model_checkpoint(ckpt, path, role, blend_ok=False):
    """Refuse what is not one plain model's weights: a LoRA run (its adapters are the delta already); and,
    as a base, a model halfway through an adaptation stage (an adapted model may be: the delta records
    its blend, model.kv_blend)."""
    if "lora" in ckpt:
        raise DeltaError(f"{role} {path} is a LoRA run's checkpoint: its adapters are its delta, write them with "
                         f"lora.py --init_from={path} --adapters=FILE.safetensors (delta.py takes that file too)")
    if ckpt.get("kv_blend") and not blend_ok:
        raise DeltaError(f"{role} {path} is halfway through an adaptation stage (layers {sorted(ckpt['kv_blend'])} "
                         "are blending K/V): no map describes it; use a checkpoint written after the stage ended")
    return ckpt


def changed_tensors(adapted_ckpt, base_ckpt) -> dict:
    """The adapted model's tensors that differ from the base on the adapted model's maps (or that the
    base lacks). A base that does not fit (a tensor it has there that the adapted model lacks, another
    shape) is refused: the adapted model was not made from it."""
    config = LlamaConfig(**adapted_ckpt["model_config"])
    adapted = model_weights(adapted_ckpt)
    base = on_maps(model_weights(base_ckpt), config.kv_source, config.attn_source)
    lacking = sorted(set(base) - set(adapted))
    misfit = [k for k in adapted if k in base and base[k].shape != adapted[k].shape]
    if lacking or misfit:
        what = f"lacks {lacking[0]}, which the base has" if lacking else \
            f"has {misfit[0]} of shape {tuple(adapted[misfit[0]].shape)}, the base {tuple(base[misfit[0]].shape)}"
        raise DeltaError(f"the adapted model {what} (on kv_source {list(config.kv_source)}, attn_source "
                         f"{list(config.attn_source)}): it was not adapted from this base; give the checkpoint "
                         "it started from as --base")
    return {k: t for k, t in adapted.items()
            if k not in base or t.dtype != base[k].dtype or not torch.equal(t, base[k])}


def delta_metadata(base_sha256, model_config: dict, tensors: dict, kv_blend=None) -> dict:
    """A tensor delta's metadata (safetensors keeps str -> str); kv_blend: {layer: [source, weight]} of a
    model halfway through an adaptation stage."""
    return {"format": DELTA_FORMAT, "kind": "tensors", "base_sha256": base_sha256,
            "kv_source": json.dumps(list(model_config["kv_source"])),
            "attn_source": json.dumps(list(model_config["attn_source"])), "model_config": json.dumps(model_config),
            "kv_blend": json.dumps({str(k): [int(s), float(w)] for k, (s, w) in (kv_blend or {}).items()}),
            "tensor_crc32": json.dumps({k: tensor_crc(t) for k, t in tensors.items()})}


def make_delta(adapted_ckpt, base_ckpt, dtype=torch.bfloat16) -> tuple:
    """(tensors, metadata) of the tensor delta that turns base_ckpt into adapted_ckpt's model."""
    changed = changed_tensors(adapted_ckpt, base_ckpt)
    tensors = {k: t.detach().to("cpu", dtype).contiguous() for k, t in sorted(changed.items())}
    config = LlamaConfig(**adapted_ckpt["model_config"]).to_dict()
    return tensors, delta_metadata(weights_sha256(base_ckpt), config, tensors, adapted_ckpt.get("kv_blend"))


# -----------------------------------------------------------------------------
# reading and applying one


def read_delta(path) -> tuple:
    """(kind, tensors, metadata) of a delta file, its CRCs checked; one line if it is missing, not a
    delta, or damaged."""
    path = str(path)
    if not os.path.lexists(path):
        raise DeltaError(f"delta {path} does not exist: give the .safetensors file that delta.py or lora.py --adapters "
                         "wrote")
    if not os.path.isfile(path):
        raise DeltaError(f"delta {path} is not a regular file (a directory, FIFO or broken link): give a .safetensors "
                         "file")
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors' own error types: a bad header, a short file
        msg = str(e).splitlines()[0][:160] if str(e) else ""
        raise DeltaError(f"delta {path} cannot be read: it is corrupt, truncated or not a safetensors file "
                         f"({type(e).__name__}: {msg})") from None
    kind = {DELTA_FORMAT: "tensors", LORA_FORMAT: "lora"}.get(meta.get("format"))
    if kind is None or not meta.get("base_sha256") or not meta.get("kv_source"):
        raise DeltaError(f"{path} is not a delta of this project (format {meta.get('format')!r}; a delta is written by "
                         "delta.py or lora.py --adapters, and records its base's sha256 and kv_source)")
    try:
        crcs = json.loads(meta.get("tensor_crc32") or "{}")
        bad = next((k for k in tensors if k in crcs and crcs[k] != tensor_crc(tensors[k])), None)
        bad = bad or next((k for k in crcs if k not in tensors), None)
    except (ValueError, TypeError, AttributeError):
        bad = "(its tensor_crc32 entry)"
    if bad:
        raise DeltaError(f"delta {path} is corrupt: tensor {bad} does not match its CRC-32 (a damaged or flipped "
                         "byte); get a good copy")
    return kind, tensors, meta


def delta_config(meta, base_ckpt, path, base_name) -> LlamaConfig:
    """The adapted model's config: the delta's record (a LoRA file older than that record: the base's
    with the delta's maps), checked against what the base can take."""
    base_config = base_ckpt["model_config"]
    try:
        recorded = json.loads(meta["model_config"]) if meta.get("model_config") else dict(base_config)
        recorded["kv_source"] = json.loads(meta["kv_source"])
        if meta.get("attn_source"):
            recorded["attn_source"] = json.loads(meta["attn_source"])
        other = next((k for k in ARCHITECTURE if recorded.get(k) != base_config.get(k)), None)
        if other:
            raise ValueError(f"its model has {other}={recorded.get(other)!r}, the base {base_config.get(other)!r}")
        # a training run crops the context to its block_size (train.py); the adapted model reads as far as its base
        recorded["block_size"] = max(recorded.get("block_size", 0), base_config.get("block_size", 0))
        return LlamaConfig(**recorded)
    except (ValueError, TypeError, KeyError) as e:
        raise DeltaError(f"delta {path} records a model that {base_name} cannot take (kv_source {meta.get('kv_source')}, "
                         f"attn_source {meta.get('attn_source', '[dense]')}): {str(e)[:200]}") from None


def with_lora(model, tensors, meta, merge=True):
    """The base model (on the maps) with a LoRA file's adapters, over the base in the form the run froze
    it in: merged into plain linears, or left as adapters (merge=False)."""
    settings = json.loads(meta["settings"])
    quantize_base(model, meta.get("base_quant", "none"))
    with torch.random.fork_rng(devices=[]):  # A's random init, overwritten next, leaves the global RNG as it was
        add_saved_adapters(model, tensors, settings)
    load_lora(model, tensors)  # the digest and the maps were checked already
    model.lora_settings = dict(settings)
    return merge_lora(model) if merge else model


def adapted_model(base_ckpt, delta_path, base_name="the base", merge=True) -> tuple:
    """(model, config): base_ckpt's model turned into the adapted one the delta file describes. The base's
    digest is checked first, then it is put on the recorded maps and the delta's tensors replace or add to
    its own (a tensor delta) or its adapters go on it (a LoRA file; merge=False leaves them as adapters).
    Ready for sample.py, export and training (in train mode: call .eval() to sample)."""
    kind, tensors, meta = read_delta(delta_path)
    plain_model_checkpoint(base_ckpt, base_name, "the base")
    have = weights_sha256(base_ckpt)
    if have != meta["base_sha256"]:
        raise DeltaError(f"delta {delta_path} was made for base sha256 {meta['base_sha256']}; {base_name} has {have}: "
                         "apply it to the checkpoint it was made from (the --base of delta.py, the init_from of the "
                         "LoRA run)")
    config = delta_config(meta, base_ckpt, delta_path, base_name)
    state = on_maps(model_weights(base_ckpt), config.kv_source, config.attn_source)
    if kind == "tensors":
        like = state.get("embed_tokens.weight", next(iter(state.values())))
        state.update({k: t.to(state[k].dtype if k in state else like.dtype) for k, t in tensors.items()})
    try:
        model = build_on_meta(config, state)
        for layer, (source, weight) in json.loads(meta.get("kv_blend") or "{}").items():  # as model_from_checkpoint
            model.kv_blend[int(layer)] = (int(source), torch.tensor(float(weight)))
        if kind == "lora":
            model = with_lora(model, tensors, meta, merge)
    except (CheckpointError, ValueError, TypeError) as e:
        raise DeltaError(f"delta {delta_path} does not fit {base_name}: {str(e)[:300]}") from None
    return model, config


def adapted_checkpoint(base_ckpt, base_path, delta_path) -> tuple:
    """(model, checkpoint dict) of the adapted model (merged); the dict carries what the base carried for
    sampling and its dataset, and is what train.py starts from with --delta."""
    model, config = adapted_model(base_ckpt, delta_path, base_path)
    carried = {k: base_ckpt[k] for k in SAMPLING_KEYS + ("config",) if k in base_ckpt}
    return model, carried | {"model": model.state_dict(), "model_config": config.to_dict(),
                             "kv_blend": blend_state(model),
                             "delta": {"path": os.path.abspath(delta_path), "base": os.path.abspath(base_path)}}


def load_with_delta(path, delta_path, mmap=False) -> tuple:
    """checkpoint.load_model for base + delta: (the adapted model in eval mode, its checkpoint dict)."""
    model, ckpt = adapted_checkpoint(load_checkpoint(path, mmap=mmap), path, delta_path)
    return model.eval(), ckpt


def check_delta_run(s):
    """train.py's --delta, from the settings alone: it starts a new run from base + delta."""
    if not s.delta:
        return
    if s.init_from in ("scratch", "resume"):
        raise ConfigError(f"--delta with init_from={s.init_from}: a delta applies to the base it was made from; give "
                          "--init_from=<that checkpoint> to start a new run from base + delta (a resumed run continues "
                          "its own checkpoint)")
    if not os.path.isfile(s.delta):
        read_delta(s.delta)  # says what it is instead: missing, a directory, a FIFO


# -----------------------------------------------------------------------------
# python delta.py: write the delta of an adapted checkpoint against its base

init_from = ""               # the adapted model: a checkpoint file or training out_dir (train.py, adapt.py --convert_to)
base = ""                    # the checkpoint it was adapted from, e.g. data/smollm2/smollm2-135m-instruct.pt
out = ""                     # the delta to write (.safetensors)
dtype = "bfloat16"           # the stored tensors: bfloat16 (half the bytes, to ship) or float32 (base + delta exact)
overwrite = False            # replace an existing --out file
threads = 0                  # torch CPU threads: 0 = 1 on a CPU (shared machines: configurator.apply_threads)
DEFAULTS = settings_from({k: v for k, v in globals().items() if k in ("init_from", "base", "out", "dtype", "overwrite",
                                                                      "threads")})
CHOICES = {"dtype": tuple(DELTA_DTYPES)}


def main(argv):
    s, _ = configure(DEFAULTS, argv, __doc__, CHOICES)
    for key in ("init_from", "base"):
        if not getattr(s, key):
            raise ConfigError(f"--{key} is empty: give the {'adapted' if key == 'init_from' else 'base'} checkpoint")
    apply_threads(s.threads)
    lock = claim_destination(s.out, s.overwrite, "--out")  # before the work; a training's out_dir: its lock
    try:
        adapted_path, base_path = checkpoint_path(s.init_from), checkpoint_path(s.base)
        adapted = plain_model_checkpoint(load_checkpoint(adapted_path, mmap=True), s.init_from, "--init_from", True)
        base_ckpt = plain_model_checkpoint(load_checkpoint(base_path, mmap=True), s.base, "--base")
        tensors, meta = make_delta(adapted, base_ckpt, DELTA_DTYPES[s.dtype])
        save_safetensors(tensors, meta, s.out)
    finally:
        if lock is not None:
            lock.close()
    values = sum(t.numel() for t in tensors.values())
    print(f"wrote {s.out}: {len(tensors)} tensors, {values:,} values in {s.dtype}, {os.path.getsize(s.out) / 1e6:.2f} "
          f"MB, for base sha256 {meta['base_sha256'][:16]}... with kv_source {meta['kv_source']}, attn_source "
          f"{meta['attn_source']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
