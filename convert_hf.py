"""
Hugging Face Llama checkpoints in and out of ECHO-LLaMA.

    # HF directory -> checkpoint that train.py (init_from=...) and sample.py start from
    .venv/bin/python convert_hf.py import path/to/hf_llama out/llama.pt
    # ... turned into a KV-shared model on the way: consumers drop their K/V projections and owners
    # keep their own (--kv_init=own) or take the mean over the layers that will use them (mean)
    .venv/bin/python convert_hf.py import path/to/hf_llama out/llama_upper.pt --kv_source=upper:half --kv_init=mean
    # a llama.cpp GGUF file (quantized or not) -> the same, with its tokenizer and chat template
    .venv/bin/python convert_hf.py import model.Q4_1.gguf out/model.pt [--kv_source=... --kv_init=...]
    # a dense checkpoint -> HF directory that transformers loads (config.json + model.safetensors)
    .venv/bin/python convert_hf.py export out/ckpt.pt path/to/hf_out

The HF Llama layout is model.py's own (same module names, rotate-half RoPE), so weights load by
stripping the "model." prefix. Loading goes shard by shard through memory-mapped files and hands
each tensor to a model built on the meta device, so no second full copy is ever held. GGUF files are
read by gguf_import.py. Needs safetensors (for .safetensors weights and for export) and gguf (for .gguf
files); transformers only for `--verify` (import_transformers, which bench.py's reference uses too).
"""

import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
from contextlib import nullcontext

import torch

from checkpoint import (CheckpointError, ConversionError, build_on_meta, collect_state_dict, hf_config_from_llama,
                        current_umask, load_model, save_checkpoint, umask_file_mode)
from configurator import (DTYPES, ConfigError, HelpRequested, apply_threads, configure, help_text, run_script,
                          setting_comments, settings_from)
from delta import load_with_delta
from gguf_import import is_gguf, load_gguf_llama
from guards import claim_destination
from integrity import NESTING_LIMIT, nesting_depth, typed_field
from model import Llama, LlamaConfig

# -----------------------------------------------------------------------------
# config.json <-> LlamaConfig


def read_hf_config(hf_dir) -> dict:
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"{hf_dir!r} is not a directory: expected a Hugging Face model directory "
                              "with config.json and model.safetensors (or shards, or pytorch_model*.bin)")
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"no config.json in {hf_dir!r}: not a Hugging Face model directory")
    try:
        with open(path) as f:
            hf = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ConversionError(f"{path}: nested too deeply to be a model config") from None
    if not isinstance(hf, dict):
        raise ConversionError(f"{path}: not a model config (a JSON object), found {type(hf).__name__}")
    if nesting_depth(hf) > NESTING_LIMIT:
        raise ConversionError(f"{path}: nested more than {NESTING_LIMIT} levels deep: not a model config")
    return hf


# config.json fields by kind (integrity.typed_field); a null is refused for the first group, taken as unset for
# the optional ones
HF_REQUIRED = {"hidden_size": "count", "num_hidden_layers": "count", "num_attention_heads": "count",
               "intermediate_size": "count", "vocab_size": "count"}
HF_OPTIONAL = {"num_key_value_heads": "count", "head_dim": "count", "max_position_embeddings": "count",
               "rope_theta": "positive", "rms_norm_eps": "positive", "tie_word_embeddings": "bool",
               "attention_bias": "bool", "mlp_bias": "bool", "partial_rotary_factor": "positive"}
HF_ROPE = {"rope_theta": "positive", "factor": "positive", "low_freq_factor": "positive",
           "high_freq_factor": "positive", "original_max_position_embeddings": "count"}


def checked_hf_fields(hf: dict, source="config.json") -> dict:
    """hf with the fields this converter reads checked by type and range and read as their kind: a bool
    is a bool ("false" is false, never a truthy string), a count a positive int (4.7 refused), a scale a
    positive finite number (0, negative, NaN refused). A ConversionError names the field."""
    hf = dict(hf)
    try:
        for key, kind in HF_REQUIRED.items():
            if key not in hf or hf[key] is None:
                raise ValueError(f"{key} is missing in {source}: a Llama config.json has it")
            hf[key] = typed_field(hf[key], kind, key, source)
        for key, kind in HF_OPTIONAL.items():
            if hf.get(key) is not None:
                hf[key] = typed_field(hf[key], kind, key, source)
        if "tie_word_embeddings" in hf and hf["tie_word_embeddings"] is None:
            raise ValueError(f"tie_word_embeddings=null in {source} must be true or false")
        for outer in ("rope_scaling", "rope_parameters"):
            rope = hf.get(outer)
            if isinstance(rope, dict):
                hf[outer] = dict(rope)
                for key, kind in HF_ROPE.items():
                    if rope.get(key) is not None:
                        hf[outer][key] = typed_field(rope[key], kind, f"{outer}.{key}", source)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    return hf


def hf_rope(hf: dict):
    """(rope_theta, rope_scaling or None) from a 4.x (rope_theta, rope_scaling) or 5.x (rope_parameters)
    config, with transformers' precedence: rope_scaling, then rope_parameters, then top-level keys."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ConversionError(f"config.json: rope_scaling / rope_parameters is {rope!r}, not an object")
    try:
        return _hf_rope(hf, rope)
    except ConversionError:
        raise
    except (TypeError, ValueError) as e:  # a number given as text, a null
        raise ConversionError(f"config.json: a rope setting is not a number ({e})") from None


def _hf_rope(hf, rope):
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ConversionError(f"config.json: rope type {rope_type!r} is not supported (only the default RoPE "
                              "and Llama 3 'llama3' scaling are)")
    if "factor" not in rope:
        raise ConversionError("config.json: llama3 rope scaling without a 'factor'")
    scaling = {"rope_type": "llama3", "factor": float(rope["factor"]),
               "low_freq_factor": float(rope.get("low_freq_factor", 1.0)),
               "high_freq_factor": float(rope.get("high_freq_factor", 4.0)),
               "original_max_position_embeddings": int(rope.get("original_max_position_embeddings",
                                                                hf.get("max_position_embeddings")))}
    return theta, scaling


def llama_config_from_hf(hf: dict, kv_source=None, block_size=None) -> LlamaConfig:
    """LlamaConfig for a Hugging Face Llama config.json (4.x or 5.x keys). Anything this model does not
    implement (biases, other activations, a head_dim that is not hidden/heads, ...) is an error."""
    model_type = hf.get("model_type")
    if model_type not in ("llama", "echo_llama"):
        raise ConversionError(f"config.json: model_type is {model_type!r}, not 'llama': only Llama models "
                              "convert (architectures: {})".format(hf.get("architectures")))
    hf = checked_hf_fields(hf)
    # our export of a shared model carries its own maps (and refuses --kv_source); a plain Llama has none
    file_kv, attn_source = shared_maps(hf, kv_source) if model_type == "echo_llama" else (None, None)
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConversionError(f"config.json: {key}=true is not supported (this Llama has no biases)")
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and n_head and head_dim * n_head != n_embd:
        raise ConversionError(f"config.json: head_dim={head_dim} with {n_head} heads does not give "
                              f"hidden_size={n_embd}: decoupled head sizes are not supported")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError(f"config.json: partial_rotary_factor={hf['partial_rotary_factor']} is not supported")
    theta, scaling = hf_rope(hf)
    if block_size is not None and not (isinstance(block_size, int) and block_size >= 1):
        raise ConversionError(f"--block_size={block_size!r} must be a positive integer (0: max_position_embeddings)")
    if block_size is None:
        block_size = hf.get("max_position_embeddings") or 2048
    try:
        config = LlamaConfig(
            n_layer=hf["num_hidden_layers"], n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=n_embd,
            intermediate_size=hf["intermediate_size"], vocab_size=hf["vocab_size"], block_size=int(block_size),
            rope_theta=theta, rope_scaling=scaling, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), kv_source=file_kv,
            attn_source=attn_source)
    except ValueError as e:
        raise ConversionError(f"config.json: {e}") from None
    return with_kv_source(config, kv_source)


def with_kv_source(config: LlamaConfig, kv_source):
    """config with the kv_source given on the command line: its errors are named as that, not as the
    config file's (the file's own fields were checked without it)."""
    if kv_source is None:
        return config
    try:
        return dataclasses.replace(config, kv_source=kv_source)
    except ValueError as e:
        raise ConversionError(f"--kv_source={kv_source}: {e}") from None


def shared_maps(hf: dict, kv_source):
    """(kv_source, attn_source) of our export of a shared model (model_type echo_llama, see shared_hf_config):
    it carries its own maps and weights without the sharers' projections, so it takes no --kv_source."""
    if kv_source is not None:
        raise ConversionError(f"config.json: this model shares already (kv_source={hf.get('kv_source')}, attn_source="
                              f"{hf.get('attn_source')}); --kv_source applies to a dense Llama only: leave it out")
    return hf.get("kv_source"), hf.get("attn_source")


def hf_dtype(hf: dict):
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return DTYPES.get(str(name).replace("torch.", ""), torch.float32)


# -----------------------------------------------------------------------------
# weights in


def hf_weight_files(hf_dir) -> list:
    """The weight files of a HF directory, in the order transformers would pick them."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = os.path.join(hf_dir, index_name)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
                files = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ConversionError(f"{index}: not a weight index (JSON with a weight_map): "
                                      f"{type(e).__name__}: {e}") from None
            for name in files:
                if not os.path.isfile(os.path.join(hf_dir, name)):
                    raise ConversionError(f"{index_name} names shard {name!r} which is not in {hf_dir!r}")
            return [os.path.join(hf_dir, name) for name in files]
        if os.path.isfile(os.path.join(hf_dir, single)):
            return [os.path.join(hf_dir, single)]
    raise ConversionError(f"no weights in {hf_dir!r}: expected model.safetensors, model.safetensors.index.json "
                          "with shards, pytorch_model.bin or pytorch_model.bin.index.json")


def iter_hf_tensors(files):
    """(file, name, tensor) for every tensor, one file at a time, memory-mapped where possible. A file
    that cannot be read (truncated, garbage) is a ConversionError naming it."""
    for path in files:
        try:
            yield from _tensors_in(path)
        except ConversionError:
            raise
        except Exception as e:  # SafetensorError, torch's unpickling errors: their own words, first line
            msg = (str(e).splitlines() or [""])[0][:200]
            raise ConversionError(f"{path} cannot be read: it is truncated, corrupt or not a weight file "
                                  f"({type(e).__name__}: {msg})") from None


def _tensors_in(path):
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield path, name, f.get_tensor(name)
        return
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) torch.save format cannot be memory-mapped
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ConversionError(f"{path} holds a {type(sd).__name__}, not a state dict of named tensors")
    for name in list(sd):
        yield path, name, sd.pop(name)
    del sd


# The Hugging Face name map, declared once and used both ways (collect_state_dict inverts it): model.py
# names its modules as LlamaForCausalLM does, under a "model." prefix that only the LM head lacks.
def hf_name(key):
    return key if key.startswith("lm_head.") else "model." + key


def hf_state_dict(model: Llama, dtype=None) -> dict:
    """model's weights under Hugging Face names (a tied head is left out, as transformers saves it)."""
    dtype = dtype or model.embed_tokens.weight.dtype
    return {hf_name(k): t.detach().to("cpu", dtype).contiguous() for k, t in model.state_dict().items()
            if not (model.config.tie_embeddings and k == "lm_head.weight")}




def load_hf_llama(hf_dir, kv_source=None, kv_init="own", dtype=None, block_size=None) -> Llama:
    """A Llama with the weights of the Hugging Face Llama in hf_dir, in eval mode on the CPU.

    kv_source: None (dense, an exact copy) or a preset/list as in model.parse_kv_source; consumer layers
      then have no K/V projections.
    kv_init: 'own' keeps each owner's K/V projections; 'mean' sets them to the mean of the dense
      projections of every layer that uses that owner (the owner included).
    dtype: torch dtype of the weights; None takes config.json's dtype.
    block_size: the context length to build for (rope tables); None takes max_position_embeddings.
    """
    if kv_init not in ("own", "mean"):
        raise ConversionError(f"kv_init must be 'own' or 'mean', got {kv_init!r}")
    hf = read_hf_config(hf_dir)
    config = llama_config_from_hf(hf, kv_source, block_size)
    dtype = dtype or hf_dtype(hf)
    files = hf_weight_files(hf_dir)

    def tensors():
        for path, name, tensor in iter_hf_tensors(files):
            if name.endswith("rotary_emb.inv_freq"):  # saved by old transformers; recomputed from the config
                continue
            if config.tie_embeddings and name == "lm_head.weight":  # tied: a copy in the file is ignored
                continue
            yield os.path.basename(path), name, tensor

    state_dict = collect_state_dict(tensors(), config, hf_name, kv_init, dtype, hf_dir, "config.json",
                                    already_shared=hf.get("model_type") == "echo_llama")
    try:
        model = build_on_meta(config, state_dict)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    return model.eval()


def read_tokenizer_json(hf_dir):
    path = os.path.join(hf_dir, "tokenizer.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    return None


def read_chat_template(hf_dir):
    """A Hugging Face directory's chat template: chat_template.jinja (where newer transformers save it, and
    which wins there too), else tokenizer_config.json's chat_template; None without one."""
    path = os.path.join(hf_dir, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    path = os.path.join(hf_dir, "tokenizer_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
    except (OSError, ValueError, AttributeError):  # no file, not JSON, not an object: no template
        return None
    return template if isinstance(template, str) else None  # a list of named templates: not used here


def checkpoint_dict(model: Llama, hf=None, tokenizer_json=None, source=None, kv_init=None, chat_template=None) -> dict:
    """What convert writes: the two keys train.py's init_from needs, plus what sample.py can use."""
    ckpt = {"model": model.state_dict(), "model_config": model.config.to_dict()}
    if hf is not None:
        ckpt["hf_config"] = hf
    if tokenizer_json is not None:
        ckpt["tokenizer_json"] = tokenizer_json
    if chat_template is not None:
        ckpt["chat_template"] = chat_template
    if source is not None:
        kind = "gguf" if is_gguf(source) else "hf_dir"
        ckpt["converted_from"] = {kind: os.path.abspath(source), "kv_init": kv_init}
    return ckpt


def check_finite(model: Llama, source, positions=64):
    """Logits finite at every one of the first `positions` positions (capped by block_size), for a sequence
    of varied tokens: a broken weight can stay hidden at position 0 (RoPE is the identity there) and with
    one token (attention then sees itself only)."""
    n = min(positions, model.config.block_size)
    tokens = (torch.arange(n, dtype=torch.long) * 7919) % model.config.vocab_size
    with torch.no_grad():
        logits, _ = model(tokens[None])
    bad = (~torch.isfinite(logits)).any(dim=-1)[0].nonzero()
    if len(bad):
        raise ConversionError(f"the converted model gives non-finite logits (first at position {int(bad[0])} of "
                              f"{n}): the weights in {str(source)!r} are broken")


def convert(hf_dir, out_path, kv_source=None, kv_init="own", dtype=None, block_size=None) -> Llama:
    """HF directory (or a .gguf file, see convert_gguf) -> checkpoint file. Validates everything (keys,
    shapes, a finite forward pass) before anything is written."""
    if is_gguf(hf_dir):
        return convert_gguf(hf_dir, out_path, kv_source, kv_init, dtype, block_size)
    model = load_hf_llama(hf_dir, kv_source=kv_source, kv_init=kv_init, dtype=dtype, block_size=block_size)
    check_finite(model, hf_dir)
    save_checkpoint(checkpoint_dict(model, read_hf_config(hf_dir), read_tokenizer_json(hf_dir), hf_dir, kv_init,
                                    read_chat_template(hf_dir)),
                    out_path)  # train.py's atomic write: out_path is either complete or untouched
    return model


def convert_gguf(gguf_path, out_path, kv_source=None, kv_init="own", dtype=None, block_size=None) -> Llama:
    """GGUF file (gguf_import.load_gguf_llama) -> checkpoint file with the tokenizer, chat template and token
    ids sample.py needs. Validates everything before anything is written."""
    model, extras = load_gguf_llama(gguf_path, kv_source=kv_source, kv_init=kv_init, dtype=dtype,
                                    block_size=block_size)
    check_finite(model, gguf_path)
    ckpt = checkpoint_dict(model, extras["hf_config"], extras["tokenizer_json"], gguf_path, kv_init,
                           chat_template=extras["chat_template"])
    save_checkpoint(ckpt, out_path)  # atomic: out_path is either complete or untouched
    return model


# -----------------------------------------------------------------------------
# checkpoints and weights out


def export_hf(model: Llama, out_dir, dtype=None, tokenizer_json=None, hf_extra=None, overwrite=False, verify=False,
              chat_template=None, meta=None):
    """Write a dense model as a Hugging Face Llama directory (config.json + model.safetensors) that
    transformers' LlamaForCausalLM.from_pretrained loads with identical logits, with what sampling and
    chat need (tokenizer_files: the tokenizer, its chat template and special tokens, the generation
    config; or a char/GPT-2 dataset's meta.json).

    The files go into a temp directory beside out_dir, are verified there when asked (verify_export), and
    only then take out_dir's place: an error or a failed verification leaves nothing behind. A non-empty
    out_dir is refused unless overwrite, which replaces it whole, so no file of an earlier model stays.
    Returns the verification's max abs logit difference, or None."""
    if model.kv_blend:
        raise ConversionError(f"cannot export a model halfway through an adaptation stage (layers "
                              f"{sorted(model.kv_blend)} blend their K/V with another layer's): "
                              f"{MODELING_FILE} cannot express a blend; export a checkpoint written after the stage ended")
    out_dir = os.path.abspath(out_dir)
    if os.path.islink(out_dir):  # export where the link points: replacing the link itself would leave a dangling one
        if not os.path.isdir(out_dir):
            raise ConversionError(f"{out_dir} is a symbolic link to {os.readlink(out_dir)}, which is not a directory")
        out_dir = os.path.realpath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConversionError(f"{out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ConversionError(f"{out_dir} is not empty: export writes a whole Hugging Face directory; choose a new "
                              "one, or pass --overwrite to replace it (all its files go)")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, "config.json")):
        raise ConversionError(f"{out_dir} holds no config.json: --overwrite replaces only a Hugging Face model "
                              "directory, and this one is something else; export elsewhere")
    dtype = dtype or model.embed_tokens.weight.dtype
    new_dirs = _missing_parents(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".tmp", dir=os.path.dirname(out_dir))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700; give the directory the usual permissions
        _write_hf_files(model, tmp, dtype, tokenizer_json, hf_extra)
        for name, obj in tokenizer_files(model.config, tokenizer_json, chat_template, hf_extra, meta).items():
            _write_json(obj, os.path.join(tmp, name))
        diff = verify_export(model, tmp, dtype, shown_as=out_dir) if verify else None
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in new_dirs:  # deepest first: only the directories this call created
            shutil.rmtree(d, ignore_errors=True)
        raise
    return diff


def _missing_parents(path):
    """The parent directories of path that do not exist yet, deepest first."""
    missing, d = [], os.path.dirname(path)
    while d and not os.path.exists(d):
        missing.append(d)
        d = os.path.dirname(d)
    return missing


MODELING_FILE = "modeling_echo_llama.py"  # transformers' Llama, changed only where sharing needs it


def is_shared(config: LlamaConfig) -> bool:
    return any(j != i for m in (config.kv_source, config.attn_source) for i, j in enumerate(m))


def shared_hf_config(config: LlamaConfig, hf: dict) -> dict:
    """config.json of a shared model: its maps as plain lists and the auto_map to MODELING_FILE."""
    module = MODELING_FILE[:-3]
    return {**hf, "architectures": ["EchoLlamaForCausalLM"], "model_type": "echo_llama",
            "auto_map": {"AutoConfig": f"{module}.EchoLlamaConfig",
                         "AutoModelForCausalLM": f"{module}.EchoLlamaForCausalLM"},
            "kv_source": list(config.kv_source), "attn_source": list(config.attn_source)}


def _write_hf_files(model, out_dir, dtype, tokenizer_json, hf_extra):
    from safetensors.torch import save_file
    weights = os.path.join(out_dir, "model.safetensors")
    save_file(hf_state_dict(model, dtype), weights, metadata={"format": "pt"})
    os.chmod(weights, umask_file_mode())  # safetensors writes through a 0600 temp file; match the other files
    hf = hf_config_from_llama(model.config, dtype, hf_extra)
    if is_shared(model.config):  # dense models stay plain LlamaForCausalLM, without custom code
        hf = shared_hf_config(model.config, hf)
        shutil.copyfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), MODELING_FILE),
                        os.path.join(out_dir, MODELING_FILE))
    _write_json(hf, os.path.join(out_dir, "config.json"))
    if tokenizer_json is not None:
        with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(tokenizer_json)


def tokenizer_files(config: LlamaConfig, tokenizer_json=None, chat_template=None, hf_extra=None, meta=None) -> dict:
    """{file name: JSON object} beside tokenizer.json, so that the export samples and chats as the checkpoint
    did: transformers' AutoTokenizer finds the chat template and special tokens (tokenizer_config.json,
    special_tokens_map.json) and generate() stops at the eos (generation_config.json); sample.py reads the
    same files. A model without a tokenizer.json gets its dataset's meta.json (a char table, or GPT-2),
    which sample.py looks for in the directory."""
    if tokenizer_json is None:
        return {"meta.json": meta} if meta and meta.get("tokenizer") in ("char", "gpt2") else {}
    ids = {key: (hf_extra or {}).get(f"{key}_id") for key in ("bos_token", "eos_token", "pad_token")}
    ids = {key: i for key, i in ids.items() if isinstance(i, int) or (isinstance(i, list) and i)}
    names = token_names(tokenizer_json)
    texts = {key: names[i[0] if isinstance(i, list) else i] for key, i in ids.items()
             if (i[0] if isinstance(i, list) else i) in names}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", **texts, "model_max_length": config.block_size,
                        # what the tokenizer.json decodes to, as sample.py prints it: no "cleaned" spaces
                        "clean_up_tokenization_spaces": False}
    if chat_template:
        tokenizer_config["chat_template"] = chat_template
    files = {"tokenizer_config.json": tokenizer_config, "special_tokens_map.json": texts}
    if ids:
        files["generation_config.json"] = {"_from_model_config": False, **{f"{key}_id": i for key, i in ids.items()}}
    return files


def token_names(tokenizer_json) -> dict:
    """{id: token text} of a tokenizer.json (its vocabulary and added tokens); {} for text that is not one."""
    try:
        tokenizer = json.loads(tokenizer_json)
        vocab = tokenizer.get("model", {}).get("vocab") or {}
        names = dict(enumerate(t[0] for t in vocab)) if isinstance(vocab, list) else {i: t for t, i in vocab.items()}
        return names | {t["id"]: t["content"] for t in tokenizer.get("added_tokens") or []}
    except (ValueError, TypeError, KeyError, AttributeError, IndexError):
        return {}


def checkpoint_tokenizer(ckpt):
    """(tokenizer.json text or None, dataset meta or None) of a checkpoint: the tokenizer.json it carries
    (converted models), else the one its dataset's meta (carried by train.py) names, else that meta alone
    (a char table, GPT-2)."""
    if ckpt.get("tokenizer_json"):
        return ckpt["tokenizer_json"], None
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else None
    if meta and meta.get("tokenizer") == "hf" and os.path.isfile(meta.get("tokenizer_file") or ""):
        with open(meta["tokenizer_file"], encoding="utf-8") as f:
            return f.read(), meta
    return None, meta


def _replace_dir(new, out_dir):
    """Rename the finished directory new to out_dir; an existing out_dir is moved aside first and
    deleted only once new is in place (put back if that fails)."""
    if not os.path.exists(out_dir):
        os.rename(new, out_dir)
        return
    old = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.old-{os.getpid()}")
    os.rename(out_dir, old)
    try:
        os.rename(new, out_dir)
    except OSError:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old)


def import_transformers():
    """transformers, imported without noise on stderr: with torchao installed (./setup.sh --dev), importing its
    Llama logs that torchao's CUDA kernels do not load on a CPU build, and torch that torchao registers its
    Enums the deprecated way. Neither is a fault of the run; an ImportError still reaches the caller."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers
    return transformers


def verify_export(model: Llama, out_dir, dtype=torch.float32, n_tokens=32, tol=1e-4, shown_as=None) -> float:
    """Load out_dir with transformers (only here, and only when asked) and compare its fp32 logits on
    random tokens with those of model's weights as written, i.e. rounded to dtype; returns the max abs
    difference, raises ConversionError above tol."""
    try:
        transformers = import_transformers()
    except ImportError:
        raise ConversionError("--verify needs the transformers package: ./setup.sh --dev (or pip install transformers), "
                              "or export without --verify") from None
    bar = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # stderr is for errors: one line each
    cls, extra = transformers.LlamaForCausalLM, {}
    if is_shared(model.config):
        cls, extra = transformers.AutoModelForCausalLM, {"trust_remote_code": True}
    try:
        hf = cls.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager", **extra)
    except TypeError:  # transformers 4.x before the dtype argument
        hf = cls.from_pretrained(out_dir, torch_dtype=torch.float32, attn_implementation="eager", **extra)
    finally:
        if bar:
            transformers.utils.logging.enable_progress_bar()
    ours = Llama(model.config)
    ours.load_state_dict({k: v.to(dtype).float() for k, v in model.state_dict().items()})
    x = torch.randint(0, model.config.vocab_size, (1, min(n_tokens, model.config.block_size)),
                      generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf.eval()(x).logits - ours.eval()(x)[0]).abs().max().item()
    if not diff <= tol:
        raise ConversionError(f"verification failed: transformers' logits for {shown_as or out_dir} differ from "
                              f"ours by {diff:.3g} (> {tol}); nothing was written")
    return diff


def _write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


# -----------------------------------------------------------------------------
# command line


USAGE = """usage:
  convert_hf.py import HF_DIR|FILE.gguf OUT.pt [--kv_source=SPEC] [--kv_init=own|mean] [--dtype=DTYPE] [--block_size=N] [--overwrite]
  convert_hf.py export CHECKPOINT HF_OUT_DIR [--dtype=DTYPE] [--verify] [--overwrite] [--delta=FILE]"""
# options (configurator.py); the command and its two paths come first
kv_source = ""               # import: dense ('') or a sharing map: cla:N, upper:K, upper:half or 0,0,2,2,...
kv_init = "own"              # import: consumers' owners keep their own K/V (own) or the mean of their users' (mean)
dtype = ""                   # '' = config.json's dtype (import; float32 for .gguf) or the checkpoint's (export)
block_size = 0               # import: context length (0 = max_position_embeddings)
verify = False               # export: load the result with transformers and compare logits
overwrite = False            # export: replace a non-empty HF_OUT_DIR (all of it); import: replace an existing OUT.pt
threads = 0                  # torch CPU threads: 0 = 1 on a CPU (shared machines: configurator.apply_threads)
delta = ""                   # export: a delta file (delta.py, lora.py --adapters) of CHECKPOINT: export base + delta
DEFAULTS = settings_from(globals())
CHOICES = {"kv_init": ("own", "mean"), "dtype": ("", *DTYPES)}


def main(argv):
    if argv and argv[0] in ("-h", "--help"):
        raise HelpRequested(help_text(DEFAULTS, __doc__.strip() + "\n\n" + USAGE, CHOICES, setting_comments(__file__)))
    if len(argv) < 3 or argv[0] not in ("import", "export") or argv[1].startswith("--") or argv[2].startswith("--"):
        raise ConfigError("expected `import HF_DIR OUT.pt` or `export CHECKPOINT HF_OUT_DIR`, then options "
                          "(convert_hf.py --help)")
    command, src, dst = argv[:3]
    s, explicit = configure(DEFAULTS, argv[3:], __doc__, CHOICES)
    allowed = {"import": {"kv_source", "kv_init", "dtype", "block_size", "overwrite"},
               "export": {"dtype", "verify", "overwrite", "delta"}}[command] | {"threads"}
    if explicit - allowed:
        raise ConfigError(f"{command} takes no {', '.join('--' + k for k in sorted(explicit - allowed))}; it takes "
                          f"{', '.join('--' + k for k in sorted(allowed))}")
    apply_threads(s.threads)  # conversion and --verify run on the CPU
    dtype_ = DTYPES[s.dtype] if s.dtype else None
    if not src or not dst:
        raise ConfigError(f"{'the source' if not src else 'the destination'} of {command} is empty: name it")
    if command == "import":
        with claim_destination(dst, s.overwrite, "OUT.pt") or nullcontext():  # a training's out_dir: its lock
            model = convert(src, dst, s.kv_source or None, s.kv_init, dtype_, s.block_size or None)
        c = model.config
        print(f"wrote {dst}: {model.num_params() / 1e6:.2f}M parameters, {c.n_layer} layers, "
              f"{len(c.owners)} own their K/V (kv_source={list(c.kv_source)}), "
              f"{str(model.embed_tokens.weight.dtype).replace('torch.', '')}")
        return 0
    if s.overwrite and os.path.realpath(src).startswith(os.path.join(os.path.realpath(dst), "")):
        raise ConfigError(f"the checkpoint {src} lies inside {dst}: --overwrite would delete it; export elsewhere")
    model, ckpt = load_with_delta(src, s.delta, mmap=True) if s.delta else load_model(src, mmap=True)
    tokenizer_json, meta = checkpoint_tokenizer(ckpt)
    diff = export_hf(model, dst, dtype_, tokenizer_json, ckpt.get("hf_config"), s.overwrite, s.verify,
                     ckpt.get("chat_template"), meta)
    print(f"wrote {dst}: {', '.join(sorted(os.listdir(dst)))}" + (" (load with trust_remote_code=True)"
                                                                   if is_shared(model.config) else ""))
    if diff is not None:
        print(f"verified: transformers' fp32 logits match ours (with the weights as written) to {diff:.2e} "
              "(max abs difference: fp32 rounding in transformers' eager attention; above 1e-4 fails)")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
