"""
llama.cpp GGUF files in: one file holds a model's metadata, tokenizer and (often quantized) weights.
Read with the `gguf` package, imported only here when a GGUF is read; every tensor is dequantized to
float as it is read and its q/k rows are put back in the Hugging Face order model.py uses.

    load_gguf_llama(path) -> (Llama, extras)   the model, its tokenizer (a tokenizer.json built from the
                                               metadata), chat template and special token ids
convert_hf.py import takes a .gguf file and writes a checkpoint from it (convert_hf.convert_gguf).
"""

import dataclasses
import os
import re

import numpy as np
import torch

from checkpoint import (CheckpointError, ConversionError, build_on_meta, collect_state_dict,
                        hf_config_from_llama)
from integrity import typed_field
from model import LlamaConfig

GGUF_LAYER_NAMES = {  # llama.cpp's name after "blk.N." -> ours after "layers.N."
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GGUF_TOP_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
_OURS_TO_GGUF = {v: k for k, v in {**GGUF_LAYER_NAMES, **GGUF_TOP_NAMES}.items()}
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)\.weight$")
_MISSING = object()


def gguf_name(key: str) -> str:
    """llama.cpp's tensor name for one of model.py's state-dict keys."""
    m = _LAYER_KEY.match(key)
    if m:
        return f"blk.{m.group(1)}.{_OURS_TO_GGUF[m.group(2)]}.weight"
    return _OURS_TO_GGUF[key[:-len(".weight")]] + ".weight"


def is_gguf(path) -> bool:
    """A file named *.gguf or starting with the GGUF magic (what `import` takes as GGUF, not a HF directory)."""
    if not os.path.isfile(path):
        return False
    if str(path).lower().endswith(".gguf"):
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def read_gguf(path):
    """(gguf.GGUFReader, metadata dict) for a GGUF file; anything unreadable is a ConversionError."""
    try:
        import gguf
    except ImportError:
        raise ConversionError("reading .gguf files needs the gguf package (pip install gguf)") from None
    if not os.path.isfile(path):
        raise ConversionError(f"{str(path)!r} does not exist or is not a file")
    try:
        reader = gguf.GGUFReader(path)
        meta = {name: field.contents() for name, field in reader.fields.items()}
    except (ValueError, KeyError, IndexError, TypeError, OSError, UnicodeDecodeError) as e:
        # the reader reports a bad magic, an unknown version or type, and data cut short by a failed reshape
        raise ConversionError(f"{str(path)!r} is not a readable GGUF file (wrong format, truncated or corrupt: "
                              f"{type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    return reader, meta


def _float32(x) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def llama_config_from_gguf(meta: dict, vocab_size: int, tie: bool, kv_source=None, block_size=None) -> LlamaConfig:
    """LlamaConfig from GGUF metadata (llama.* keys). Anything this model does not implement (another
    architecture, experts, RoPE scaling, decoupled head sizes) is an error."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConversionError(f"GGUF general.architecture is {arch!r}, not 'llama': only Llama models convert")

    def get(key, default=_MISSING, kind="count"):
        """A value checked by kind (integrity.typed_field): a head count of 4.7 or a freq_base of NaN is refused."""
        value = meta.get(f"llama.{key}", default)
        if value is _MISSING:
            raise ConversionError(f"GGUF metadata: missing 'llama.{key}'")
        try:
            return typed_field(value, kind, f"llama.{key}", "the GGUF metadata")
        except ValueError as e:
            raise ConversionError(str(e)) from None

    n_embd, n_head = get("embedding_length"), get("attention.head_count")
    if get("expert_count", 0, "index"):
        raise ConversionError(f"GGUF metadata: llama.expert_count={get('expert_count')}: mixture-of-experts "
                              "models are not supported")
    if meta.get("llama.rope.scaling.type", "none") != "none":
        raise ConversionError(f"GGUF metadata: rope scaling {meta['llama.rope.scaling.type']!r} is not supported")
    head_dim = n_embd // n_head if n_head else 0
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if get(key, head_dim) != head_dim:
            raise ConversionError(f"GGUF metadata: llama.{key}={get(key)} but embedding_length/head_count="
                                  f"{head_dim}: partial rotary or decoupled head sizes are not supported")
    if block_size is not None and not (isinstance(block_size, int) and block_size >= 1):
        raise ConversionError(f"--block_size={block_size!r} must be a positive integer (0: context_length)")
    try:
        config = LlamaConfig(
            n_layer=get("block_count"), n_head=n_head, n_kv_head=get("attention.head_count_kv", n_head),
            n_embd=n_embd, intermediate_size=get("feed_forward_length"), vocab_size=vocab_size,
            block_size=int(block_size or get("context_length", 2048)),
            rope_theta=_float32(get("rope.freq_base", 10000.0, "positive")),
            norm_eps=_float32(get("attention.layer_norm_rms_epsilon", 1e-5, "positive")),
            tie_embeddings=tie)
    except ConversionError:  # a field refused by get(): it names itself
        raise
    except ValueError as e:
        raise ConversionError(f"GGUF metadata: {e}") from None
    try:  # the command line's kv_source: its errors named as that, not as the file's
        return config if kv_source is None else dataclasses.replace(config, kv_source=kv_source)
    except ValueError as e:
        raise ConversionError(f"--kv_source={kv_source}: {e}") from None


def unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's `permute` of q/k rows. Its converter reorders each head's rows from HF's
    rotate-half layout (first half, second half) to interleaved pairs for its RoPE kernel:
    reshape(n_head, 2, head_dim // 2, d).swapaxes(1, 2). This is the inverse, back to rotate-half.
    n_head is the number of heads the rows hold (n_kv_head for k)."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def iter_gguf_tensors(reader, config: LlamaConfig, where):
    """(where, name, float32 tensor) for every tensor of a GGUF, dequantized one at a time, q/k rows in
    HF order."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    heads = {"attn_q": config.n_head, "attn_k": config.n_kv_head}
    for t in reader.tensors:
        try:
            data = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ConversionError(f"tensor {t.name!r} in {where} has type {GGMLQuantizationType(t.tensor_type).name}, "
                                  "which gguf.quants cannot dequantize: unsupported tensor type") from None
        tensor = torch.from_numpy(np.array(data, dtype=np.float32))  # a copy: the reader's arrays view the file
        n_head = heads.get(t.name.split(".")[-2]) if t.name.startswith("blk.") else None
        if n_head and tensor.ndim == 2 and tensor.shape[0] == n_head * config.head_dim:
            tensor = unpermute_rope_rows(tensor, n_head)  # (a wrong shape is reported by collect_state_dict)
        yield where, t.name, tensor


def _byte_level_alphabet():
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the other 68 bytes
    take the characters from U+0100 on, so every byte string is spelled with printable characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(others)}}


# llama.cpp's pre-tokenizer (tokenizer.ggml.pre) decides how text is cut before BPE: GPT-2's regex (which
# ByteLevel applies itself), the same after cutting out every digit on its own (llama.cpp's "\p{N}"
# split for these), or Llama 3's regex.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_GGUF_PRE_SPLIT = {None: "gpt2", "default": "gpt2", "gpt2": "gpt2", "gpt-2": "gpt2", "mpt": "gpt2", "olmo": "gpt2",
                   "smollm": "digits", "starcoder": "digits", "refact": "digits", "codeshell": "digits",
                   "llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3"}


def _gguf_pre_tokenizer(split):
    from tokenizers import Regex, pre_tokenizers
    if split == "llama3":
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split == "digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def gguf_tokenizer(meta: dict):
    """A Hugging Face `tokenizers` Tokenizer from a GGUF's tokenizer.ggml.* metadata: byte-level BPE
    (tokenizer.ggml.model 'gpt2') from the token list and merges, with the control tokens (token_type 3)
    added as special tokens and user-defined ones (4) as added tokens, as llama.cpp matches them whole."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
    if kind != "gpt2":
        raise ConversionError(f"GGUF tokenizer.ggml.model is {kind!r}: only 'gpt2' (byte-level BPE) tokenizers "
                              "are supported")
    if pre not in _GGUF_PRE_SPLIT:
        raise ConversionError(f"GGUF tokenizer.ggml.pre is {pre!r}: not a supported pre-tokenizer "
                              f"({', '.join(sorted(k for k in _GGUF_PRE_SPLIT if k))})")
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise ConversionError("GGUF metadata: a 'gpt2' tokenizer needs tokenizer.ggml.tokens and tokenizer.ggml.merges")
    for key, value in (("tokens", tokens), ("merges", merges)):
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            raise ConversionError(f"GGUF metadata: tokenizer.ggml.{key} must be a list of strings, got "
                                  f"{type(value).__name__}")
    spell = _byte_level_alphabet()
    alphabet = set(spell.values())

    def spelled(token):  # a token written as plain text (not in the byte alphabet) is respelled byte by byte
        return token if set(token) <= alphabet else "".join(spell[b] for b in token.encode("utf-8"))

    for key in ("bos", "eos", "padding"):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and (not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(tokens)):
            raise ConversionError(f"GGUF metadata: tokenizer.ggml.{key}_token_id={i} is not a token id "
                                  f"(0..{len(tokens) - 1})")
    pairs = [tuple(m.split(" ")) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise ConversionError("GGUF metadata: a tokenizer.ggml.merges entry is not two tokens separated by one space")
    vocab = {spelled(t) for t in tokens}
    for number, (a, b) in enumerate(pairs):  # the tokenizers library panics on a merge outside the vocabulary
        if spelled(a) not in vocab or spelled(b) not in vocab or spelled(a + b) not in vocab:
            raise ConversionError(f"GGUF metadata: tokenizer.ggml.merges entry {number} ({a!r} {b!r}) names a token "
                                  "outside tokenizer.ggml.tokens: the tokenizer is damaged")
    types = meta.get("tokenizer.ggml.token_type") or []
    if not isinstance(types, list) or not all(isinstance(y, int) for y in types):
        raise ConversionError("GGUF metadata: tokenizer.ggml.token_type must be a list of integers")
    tok = Tokenizer(models.BPE({spelled(t): i for i, t in enumerate(tokens)}, pairs, fuse_unk=False))
    tok.pre_tokenizer, tok.decoder = _gguf_pre_tokenizer(_GGUF_PRE_SPLIT[pre]), decoders.ByteLevel()
    # a control token outside the byte alphabet would be a second entry for one id: llama.cpp mislabels a few
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, y in zip(tokens, types) if y == 3 and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, y in zip(tokens, types) if y == 4])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:  # llama.cpp then starts every text with BOS
        tok.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A",
                                                           special_tokens=[(tokens[bos], bos)])
    return tok


def load_gguf_llama(path, kv_source=None, kv_init="own", dtype=None, block_size=None):
    """(Llama in eval mode on the CPU, extras) from a llama.cpp GGUF file of a Llama.

    Weights are dequantized (any type gguf.quants knows: F32, F16, BF16, Q8_0, Q4_0, Q4_1, K-quants, ...)
    and q/k rows put back in HF order. kv_source, kv_init and block_size as in convert_hf.load_hf_llama; dtype
    defaults to float32 (the dequantized values are exact there). extras: tokenizer_json (a `tokenizers`
    JSON built from the metadata), chat_template, bos/eos/pad_token_id, name, and hf_config (a
    config.json for this model with those ids) -- everything sample.py needs besides the weights.
    """
    reader, meta = read_gguf(path)
    where = os.path.basename(str(path))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab_size = len(tokens) if tokens else meta.get("llama.vocab_size")
    if not isinstance(vocab_size, int):
        raise ConversionError(f"{where}: no tokenizer.ggml.tokens and no llama.vocab_size: the vocabulary size "
                              "is unknown")
    tie = "output.weight" not in {t.name for t in reader.tensors}  # llama.cpp leaves it out when tied
    config = llama_config_from_gguf(meta, vocab_size, tie, kv_source, block_size)
    tok = gguf_tokenizer(meta)  # before the weights: a bad tokenizer fails fast
    dtype = dtype or torch.float32
    state_dict = collect_state_dict(iter_gguf_tensors(reader, config, where), config, gguf_name, kv_init, dtype,
                                    path, "GGUF metadata")
    try:
        model = build_on_meta(config, state_dict)
    except CheckpointError as e:
        raise ConversionError(f"{where}: {e}") from None
    ids = {f"{ours}_token_id": meta.get(f"tokenizer.ggml.{theirs}_token_id")
           for ours, theirs in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}
    extras = {"tokenizer_json": tok.to_str(), "chat_template": meta.get("tokenizer.chat_template"), **ids,
              "name": meta.get("general.name"), "hf_config": hf_config_from_llama(config, dtype, ids)}
    return model.eval(), extras
