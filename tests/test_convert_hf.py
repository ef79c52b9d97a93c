"""convert_hf.py against transformers: exact parity on import, round trip on export, KV sharing at
conversion, and a clear error (with nothing written) for every kind of bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import safetensors.torch as safetensors_torch
import transformers

import convert_hf
from checkpoint import load_model
from convert_hf import ConversionError, convert, export_hf, load_hf_llama
from model import Llama, LlamaConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 96
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


def make_hf(path, layers=3, heads=4, kv_heads=2, tie=False, rope_theta=10000.0, eps=1e-6, rope_scaling=None,
            fmt="safetensors", seed=0):
    """A random transformers LlamaForCausalLM saved to path; norms perturbed too so they matter."""
    torch.manual_seed(seed)
    kw = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv_heads, vocab_size=VOCAB, max_position_embeddings=64, rope_theta=rope_theta,
              rms_norm_eps=eps, tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if rope_scaling:
        kw["rope_scaling"] = dict(rope_scaling)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw, attn_implementation="eager")).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if fmt == "sharded":
        hf.save_pretrained(path, max_shard_size="40KB")
    elif fmt == "bin":  # the old pytorch_model.bin layout
        hf.save_pretrained(path)
        os.remove(os.path.join(path, "model.safetensors"))
        sd = {k: v for k, v in hf.state_dict().items() if not (tie and k == "lm_head.weight")}
        torch.save(sd, os.path.join(path, "pytorch_model.bin"))
    else:
        hf.save_pretrained(path)
    return hf


def to_4x_config(path):
    """Rewrite a transformers-5 config.json with 4.x keys: rope_theta/rope_scaling at top level, torch_dtype."""
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = None if rope.get("rope_type") == "default" else rope
    cfg["torch_dtype"] = cfg.pop("dtype")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


def edit_config(path, **changes):
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


CONFIGS = {
    # id: (make_hf kwargs, use 4.x config keys)
    "gqa-untied-theta5e5-eps1e-5": (dict(rope_theta=5e5, eps=1e-5), False),
    "mha-tied-sharded": (dict(heads=4, kv_heads=4, tie=True, fmt="sharded"), False),
    "gqa-llama3rope-4xkeys-bin": (dict(kv_heads=1, rope_theta=5e5, rope_scaling=LLAMA3, fmt="bin"), True),
    "mha-untied-llama3rope-sharded": (dict(heads=2, kv_heads=2, rope_scaling=LLAMA3, eps=1e-5, fmt="sharded"), False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_transformers(tmp_path, name):
    kwargs, old_keys = CONFIGS[name]
    hf = make_hf(tmp_path, **kwargs)
    if kwargs.get("fmt") == "sharded":
        assert os.path.exists(tmp_path / "model.safetensors.index.json")
    if old_keys:
        to_4x_config(tmp_path)
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ours = load_hf_llama(tmp_path)
    assert ours.config.tie_embeddings == kwargs.get("tie", False)
    assert (ours.config.rope_scaling is not None) == ("rope_scaling" in kwargs)
    torch.manual_seed(1)
    x = torch.randint(0, VOCAB, (2, 48))
    with torch.no_grad():
        want = hf(x).logits
        got, _ = ours(x)
    diff = (want - got).abs().max().item()
    print(f"{name}: max abs logit difference {diff:.2e}")
    assert diff < 1e-5
    # greedy generation, token for token, through our owners-only cache
    prompt = x[:1, :6]
    want = hf.generate(prompt, max_new_tokens=24, do_sample=False, min_new_tokens=24)
    assert torch.equal(ours.generate(prompt, 24, temperature=0), want)


def test_model_built_on_meta_gets_the_rope_tables_of_a_cpu_built_model(tmp_path):
    config = LlamaConfig(n_layer=1, n_head=4, n_kv_head=2, n_embd=64, block_size=32, rope_theta=5e5,
                         rope_scaling=LLAMA3)
    model = Llama(config)
    on_meta = convert_hf.build_on_meta(config, model.state_dict())
    assert torch.equal(on_meta.rope_cos, model.rope_cos) and torch.equal(on_meta.rope_sin, model.rope_sin)


def test_convert_cli_writes_a_checkpoint_train_and_sample_can_load(tmp_path):
    hf = make_hf(tmp_path / "hf", tie=True)
    out = tmp_path / "out" / "llama.pt"
    assert convert_hf.main(["import", str(tmp_path / "hf"), str(out)]) == 0
    ckpt = torch.load(out, weights_only=False)
    assert {"model", "model_config"} <= set(ckpt)
    model = Llama(LlamaConfig(**ckpt["model_config"]))  # what train.py's init_from does
    model.load_state_dict(ckpt["model"])
    loaded, _ = load_model(str(out))
    x = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        want = hf(x).logits
        assert (model(x)[0] - want).abs().max() < 1e-5
        assert (loaded(x)[0] - want).abs().max() < 1e-5
    assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_bf16_checkpoint_keeps_its_dtype_and_float32_on_request(tmp_path):
    hf = make_hf(tmp_path)
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    assert load_hf_llama(tmp_path).embed_tokens.weight.dtype == torch.bfloat16
    model = load_hf_llama(tmp_path, dtype=torch.float32)
    assert model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(model.embed_tokens.weight, hf.model.embed_tokens.weight.float())


# -----------------------------------------------------------------------------
# KV sharing at conversion


def test_kv_source_at_conversion_drops_consumer_kv(tmp_path):
    hf = make_hf(tmp_path, layers=4, kv_heads=2)
    dense = load_hf_llama(tmp_path)
    shared = load_hf_llama(tmp_path, kv_source="cla:2")
    assert shared.config.kv_source == (0, 0, 2, 2)
    kv_per_layer = 2 * 64 * 2 * 16  # k and v, n_embd x (n_kv_head * head_dim)
    assert shared.num_params() == dense.num_params() - 2 * kv_per_layer
    assert not shared.layers[1].self_attn.owns_kv and shared.layers[2].self_attn.owns_kv
    # "own": owners keep their weights exactly, everything else is untouched
    for name, p in shared.state_dict().items():
        assert torch.equal(p, dense.state_dict()[name]), name
    # a working model: cached generation agrees with the full forward pass
    x = torch.randint(0, VOCAB, (1, 8))
    out = shared.generate(x, 12, temperature=0)
    with torch.no_grad():
        logits, _ = shared(out[:, :-1])
    assert torch.equal(logits[0, 7:].argmax(-1), out[0, 8:])
    del hf


def test_kv_init_mean_is_the_mean_of_the_dense_projections(tmp_path):
    hf = make_hf(tmp_path, layers=4)
    model = load_hf_llama(tmp_path, kv_source="upper:2", kv_init="mean")
    assert model.config.kv_source == (0, 1, 1, 1)
    attn = [layer.self_attn for layer in hf.model.layers]
    for kind in ("k_proj", "v_proj"):
        assert torch.equal(getattr(model.layers[0].self_attn, kind).weight, getattr(attn[0], kind).weight)
        want = torch.stack([getattr(attn[i], kind).weight for i in (1, 2, 3)]).mean(0)
        torch.testing.assert_close(getattr(model.layers[1].self_attn, kind).weight, want, rtol=0, atol=1e-7)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, VOCAB, (1, 8)))[0]).all()
    with pytest.raises(ConversionError, match="kv_init must be"):
        load_hf_llama(tmp_path, kv_source="upper:2", kv_init="median")
    with pytest.raises(ConversionError, match="kv_source"):
        load_hf_llama(tmp_path, kv_source="0,2,2,2")
    assert load_hf_llama(tmp_path, block_size=16).rope_cos.shape[0] == 16


# -----------------------------------------------------------------------------
# export back to transformers


@pytest.mark.parametrize("tie,rope_scaling", [(False, None), (True, LLAMA3)])
def test_export_round_trip(tmp_path, tie, rope_scaling):
    torch.manual_seed(0)
    config = LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=96, vocab_size=VOCAB,
                         block_size=64, rope_theta=2e4, norm_eps=1e-5, tie_embeddings=tie, rope_scaling=rope_scaling)
    ours = Llama(config).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    export_hf(ours, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    x = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        diff = (hf(x).logits - ours(x)[0]).abs().max().item()
    print(f"export tie={tie} llama3={rope_scaling is not None}: max abs logit difference {diff:.2e}")
    assert diff < 1e-5, diff
    back = load_hf_llama(tmp_path)
    assert back.config.to_dict() == config.to_dict()
    for name, p in ours.state_dict().items():
        assert torch.equal(p, back.state_dict()[name]), name


def test_export_cli_from_a_converted_checkpoint(tmp_path, capsys):
    hf = make_hf(tmp_path / "hf", tie=True)
    (tmp_path / "hf" / "tokenizer.json").write_text('{"stand-in": "tokenizer"}')
    convert(tmp_path / "hf", tmp_path / "c.pt")
    assert convert_hf.main(["export", str(tmp_path / "c.pt"), str(tmp_path / "back"), "--verify"]) == 0
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    x = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        assert (again(x).logits - hf(x).logits).abs().max() < 1e-6
    assert "verified: transformers' fp32 logits match ours" in capsys.readouterr().out
    assert (tmp_path / "back" / "tokenizer.json").read_text() == '{"stand-in": "tokenizer"}'


def test_export_refuses_a_model_halfway_through_a_stage(tmp_path):
    """A blend of two layers' K/V (adaptation in progress) is no map modeling_echo_llama.py can express."""
    model = Llama(LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, vocab_size=VOCAB))
    model.kv_blend[1] = (0, torch.tensor(0.5))
    with pytest.raises(ConversionError, match=r"halfway through an adaptation stage \(layers \[1\]"):
        export_hf(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# -----------------------------------------------------------------------------
# bad input: a clear error naming the problem, nothing written


def _rewrite_weights(path, fn):
    sd = safetensors_torch.load_file(os.path.join(path, "model.safetensors"))
    fn(sd)
    safetensors_torch.save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


BAD = {
    "not-llama": (lambda p: edit_config(p, model_type="mistral"), "model_type is 'mistral'"),
    "missing-key": (lambda p: _rewrite_weights(p, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight")),
                    "missing key 'model.layers.1.mlp.up_proj.weight'"),
    "unexpected-key": (lambda p: _rewrite_weights(p, lambda sd: sd.update(
        {"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)})), "unexpected key 'model.layers.0.self_attn.q_proj.bias'"),
    "shape-mismatch": (lambda p: edit_config(p, intermediate_size=128), "shape mismatch for 'model.layers.0.mlp.down_proj.weight'"),
    "unsupported-rope": (lambda p: edit_config(p, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
                         "rope type 'yarn' is not supported"),
    "no-weights": (lambda p: os.remove(os.path.join(p, "model.safetensors")), "no weights in"),
    "no-config": (lambda p: os.remove(os.path.join(p, "config.json")), "no config.json"),
}


@pytest.fixture(scope="module")
def small_hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("small_hf")
    make_hf(path, layers=2)
    return path


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_clear_error_nothing_written(tmp_path, name, small_hf_dir):
    hf_dir, out = tmp_path / "hf", tmp_path / "out" / "ckpt.pt"
    shutil.copytree(small_hf_dir, hf_dir)
    breaker, message = BAD[name]
    breaker(str(hf_dir))
    with pytest.raises(ConversionError) as e:
        convert(hf_dir, out)
    assert message in str(e.value)
    assert not out.exists() and not (out.parent.exists() and os.listdir(out.parent))


def test_bad_input_on_the_command_line_no_traceback(tmp_path, small_hf_dir):
    shutil.copytree(small_hf_dir, tmp_path / "hf")
    edit_config(tmp_path / "hf", model_type="gpt2")
    out = tmp_path / "ckpt.pt"
    r = subprocess.run([sys.executable, "convert_hf.py", "import", str(tmp_path / "hf"), str(out)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0
    assert "model_type is 'gpt2'" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("kv_source", [None, "upper:half"])
def test_verify_difference_is_how_transformers_eager_attention_rounds(tmp_path, kv_source):
    """What --verify prints (docs/convert_and_sample.md, "What --verify measures"): transformers' eager
    attention against ours in fp32. Its size is rounding, not the export: transformers' own SDPA path gives
    our logits, and its eager path differs from its SDPA path by just as much."""
    torch.manual_seed(0)
    ours = Llama(LlamaConfig(n_layer=4, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=160, vocab_size=VOCAB,
                             block_size=64, kv_source=kv_source)).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.mul_(3)  # logits of a few units, as a trained model's, not the ~0.1 of a fresh one
    diff = export_hf(ours, tmp_path / "hf", verify=True)
    x = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(0))  # verify_export's tokens
    with torch.no_grad():
        logits = {impl: transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "hf", dtype=torch.float32, attn_implementation=impl, trust_remote_code=True).eval()(x).logits
            for impl in ("eager", "sdpa")}
        mine = ours(x)[0]
    assert 0 < diff < 1e-4 and diff == (logits["eager"] - mine).abs().max().item()
    assert (logits["sdpa"] - mine).abs().max().item() < 1e-6
    assert abs((logits["eager"] - logits["sdpa"]).abs().max().item() - diff) < 1e-6


def test_transformers_import_keeps_stderr_quiet():
    """export --verify and bench.py --reference hf keep stderr for errors: importing transformers' Llama with
    torchao installed (./setup.sh --dev) logs that torchao's CUDA kernels do not load on a CPU build, and torch a
    deprecation; import_transformers quiets both (this fails with the two loggers left as they are)."""
    code = "import convert_hf; print(convert_hf.import_transformers().LlamaForCausalLM.__name__)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "LlamaForCausalLM", r.stderr
    assert r.stderr == "", r.stderr
