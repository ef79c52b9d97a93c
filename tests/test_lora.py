"""lora.py and nf4.py: our LoRA against peft's on a transformers Llama, merging, truncation to a rank,
the dynamic-rank update rules, the rank sampler's resume, NF4 against torchao's NF4Tensor, the frozen
bases' gradients, the adapters file, and one line for each bad setting."""

import pytest
import torch
import torch.nn.functional as F

import delta
import lora
import nf4
from convert_hf import load_hf_llama
from model import Llama, LlamaConfig
from torch.nn import Linear
from quantize import Int8Linear

VOCAB = 96


def tiny(**kw):
    cfg = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=128, vocab_size=VOCAB, block_size=32)
    torch.manual_seed(0)
    return Llama(LlamaConfig(**{**cfg, **kw}))


def tokens(n=2, t=24, seed=1):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model, seed=2):
    """B is zero after init: give A and B random values so that the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in lora.lora_adapters(model).values():
            adapter.lora_A.copy_(torch.randn(adapter.lora_A.shape, generator=g) * 0.3)
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * 0.3)


# -----------------------------------------------------------------------------
# LoRA


def test_lora_equals_peft_on_a_transformers_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, attn_implementation="eager", bos_token_id=None,
        eos_token_id=None, pad_token_id=None)).eval()
    hf.save_pretrained(tmp_path)
    ours = load_hf_llama(tmp_path)
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0,
                                                          target_modules=["q_proj", "v_proj", "down_proj"])).eval()
    lora.apply_lora(ours, "q,v,down", rank=4, alpha=12)
    randomize_adapters(ours)
    with torch.no_grad():
        for name, adapter in lora.lora_adapters(ours).items():
            peft_layer = peft_model.base_model.model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(adapter.lora_A)
            peft_layer.lora_B["default"].weight.copy_(adapter.lora_B)
        x = tokens()
        want, got = peft_model(x).logits, ours(x)[0]
        with peft_model.disable_adapter():
            base = peft_model(x).logits
    diff = (want - got).abs().max().item()
    print(f"ours vs peft: max abs logit difference {diff:.2e}; the adapters move logits by "
          f"{(want - base).abs().max():.2f}")
    assert diff < 1e-5  # float32 on CPU: the two differ in summation order only
    assert (want - base).abs().max() > 0.1  # the adapters matter, so equality says something


def test_adapted_model_is_the_base_at_init():
    model = tiny()
    x = tokens()
    with torch.no_grad():
        want = model(x)[0]
        lora.apply_lora(model, "q,k,v,o,gate,up,down", rank=8, alpha=16, dynamic=True)
        assert torch.equal(model(x)[0], want)  # B = 0: the adapters add exact zeros
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}


def test_merged_weight_and_logits():
    model = tiny()
    adapters = lora.apply_lora(model, "q,o,up", rank=6, alpha=9)
    randomize_adapters(model)
    adapter = adapters["layers.1.mlp.up_proj"]
    W, A, B = adapter.base.weight.detach(), adapter.lora_A.detach(), adapter.lora_B.detach()
    assert torch.allclose(adapter.merged_weight(), W + (9 / 6) * B @ A, atol=1e-6)
    assert torch.allclose(adapter.merged_weight(rank=2), W + (9 / 2) * B[:, :2] @ A[:2], atol=1e-6)
    x = tokens()
    with torch.no_grad():
        want = model(x)[0]
        merged = lora.merge_lora(model)
        got = merged(x)[0]
    assert not lora.lora_adapters(merged) and type(merged.layers[1].mlp.up_proj) is Linear
    assert not hasattr(merged, "lora_settings")
    assert (want - got).abs().max() < 1e-5
    assert set(merged.state_dict()) == set(tiny().state_dict())  # an ordinary checkpoint


def test_truncation_equals_a_rank_b_lora_built_by_hand():
    torch.manual_seed(0)
    base = Linear(40, 24, bias=False)
    full = lora.LoRALinear(base, rank=8, alpha=4.0)
    with torch.no_grad():
        full.lora_A.normal_()
        full.lora_B.normal_()
    x = torch.randn(3, 5, 40)
    for b in (1, 3, 8):
        by_hand = lora.LoRALinear(base, rank=b, alpha=4.0)
        with torch.no_grad():
            by_hand.lora_A.copy_(full.lora_A[:b])
            by_hand.lora_B.copy_(full.lora_B[:, :b])
        full.active_rank = b
        expected = x @ base.weight.T + (4.0 / b) * (x @ full.lora_A[:b].T) @ full.lora_B[:, :b].T
        assert torch.allclose(full(x), by_hand(x), atol=1e-6)
        assert torch.allclose(full(x), expected, atol=1e-5)


@pytest.mark.parametrize("rule", ["nested", "frozen"])
def test_dynamic_rank_gradients_follow_the_rule(rule):
    model = tiny()
    adapters = lora.apply_lora(model, "q,down", rank=8, alpha=16, dynamic=True, rule=rule)
    randomize_adapters(model)
    b = 5
    lora.set_rank(model, b)
    model.train()
    _, loss = model(tokens(), tokens(seed=3))
    loss.backward()
    for adapter in adapters.values():
        a_rows = adapter.lora_A.grad.abs().sum(1) > 0
        b_cols = adapter.lora_B.grad.abs().sum(0) > 0
        trained = list(range(b)) if rule == "nested" else [b - 1]
        assert a_rows.nonzero().flatten().tolist() == trained
        assert b_cols.nonzero().flatten().tolist() == trained
        assert adapter.base.weight.grad is None
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_rank_sampler_resumes_exactly_and_keeps_the_global_rng():
    sampler = lora.RankSampler(1, 64, seed=7)
    first = [sampler.sample() for _ in range(5)]
    state = sampler.state_dict()
    global_before = torch.random.get_rng_state()
    rest = [sampler.sample() for _ in range(20)]
    assert torch.equal(torch.random.get_rng_state(), global_before)
    resumed = lora.RankSampler(1, 64, seed=999)
    resumed.load_state_dict(state)
    assert [resumed.sample() for _ in range(20)] == rest
    assert all(1 <= r <= 64 for r in first + rest) and len(set(rest)) > 5
    narrow = lora.RankSampler(3, 4, seed=1)
    assert {narrow.sample() for _ in range(30)} == {3, 4}


def train_steps(model, opt, sampler, steps):
    for step in steps:
        lora.set_rank(model, sampler.sample())
        _, loss = model(tokens(seed=10 + step), tokens(seed=50 + step))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_dynamic_rank_resume_is_bit_for_bit(tmp_path):
    def fresh():
        model = tiny()
        lora.apply_lora(model, "q,v,up", rank=8, alpha=16, dynamic=True, seed=3)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return model, opt, lora.rank_sampler(model, seed=5)

    straight, opt, sampler = fresh()
    train_steps(straight, opt, sampler, range(6))
    first, opt, sampler = fresh()
    train_steps(first, opt, sampler, range(3))
    lora.save_lora(first, tmp_path / "a.safetensors")
    torch.save({"opt": opt.state_dict(), "sampler": sampler.state_dict()}, tmp_path / "state.pt")
    resumed, opt, sampler = fresh()
    lora.load_lora(resumed, *lora.read_lora(tmp_path / "a.safetensors"))
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    opt.load_state_dict(state["opt"])
    sampler.load_state_dict(state["sampler"])
    train_steps(resumed, opt, sampler, range(3, 6))
    for key, value in lora.lora_state_dict(straight).items():
        assert torch.equal(value, lora.lora_state_dict(resumed)[key]), key


def test_adapters_file_round_trip_and_refusals(tmp_path):
    model = tiny(kv_source="cla:2")
    lora.apply_lora(model, "q,o,gate", layers=[1], rank=4, alpha=8, dynamic=True, rule="frozen")
    randomize_adapters(model)
    path = tmp_path / "delta.safetensors"
    lora.save_lora(model, path, base_sha256="ab" * 32)
    tensors, meta = lora.read_lora(path)
    assert set(tensors) == {f"layers.1.{t}.lora_{m}" for t in ("self_attn.q_proj", "self_attn.o_proj",
                                                                  "mlp.gate_proj") for m in "AB"}
    assert path.stat().st_size < 20_000 and meta["base_sha256"] == "ab" * 32 and meta["kv_source"] == "[0, 0]"
    fresh = tiny(kv_source="cla:2")
    lora.load_lora(fresh, tensors, meta)
    assert fresh.lora_settings == model.lora_settings
    x = tokens()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x)[0], model.eval()(x)[0])
    with pytest.raises(ValueError, match="kv_source") as e:
        lora.load_lora(tiny(), tensors, meta)
    assert "\n" not in str(e.value)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a LoRA adapter file"):
        lora.read_lora(tmp_path / "other.safetensors")


def test_adapters_saved_in_bf16(tmp_path):
    """--adapters_dtype=bfloat16: half the bytes, the values rounded once to bf16 and widened back into the fp32
    adapters when loaded; the file passes delta.py's CRC check and refuses a flipped byte as the fp32 file does."""
    model = tiny(kv_source="cla:2")
    lora.apply_lora(model, "q,o,gate", layers=[1], rank=4, alpha=8)
    randomize_adapters(model)
    lora.save_lora(model, tmp_path / "fp32.safetensors", base_sha256="ab" * 32)
    lora.save_lora(model, tmp_path / "bf16.safetensors", base_sha256="ab" * 32, dtype=torch.bfloat16)
    tensors, meta = lora.read_lora(tmp_path / "bf16.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    values = sum(t.numel() for t in tensors.values())
    sizes = [(tmp_path / f"{d}.safetensors").stat().st_size for d in ("fp32", "bf16")]
    assert sizes[0] - sizes[1] == 2 * values
    fresh = lora.load_lora(tiny(kv_source="cla:2"), tensors, meta)
    for key, value in lora.lora_state_dict(fresh).items():
        assert value.dtype == torch.float32
        assert torch.equal(value, lora.lora_state_dict(model)[key].to(torch.bfloat16).float()), key
    kind, read, _ = delta.read_delta(str(tmp_path / "bf16.safetensors"))
    assert kind == "lora" and read.keys() == tensors.keys()
    raw = bytearray((tmp_path / "bf16.safetensors").read_bytes())
    raw[-3] ^= 0x10  # a bit of the last tensor's values
    (tmp_path / "bad.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="CRC-32"):
        delta.read_delta(str(tmp_path / "bad.safetensors"))


def test_kv_consumers_are_skipped_or_refused():
    model = tiny(n_layer=4, kv_source="cla:2")  # layers 1 and 3 reuse 0 and 2's K/V: no k/v_proj
    adapters = lora.apply_lora(model, "k,v,o", rank=2, alpha=2)
    assert sorted(adapters) == sorted(f"layers.{i}.self_attn.{p}" for i in range(4) for p in ("k_proj", "v_proj",
                                                                                              "o_proj")
                                      if p == "o_proj" or i in (0, 2))
    with pytest.raises(ValueError, match=r"^lora_targets: layer 1 has no k_proj[^\n]*$"):
        lora.apply_lora(tiny(n_layer=4, kv_source="cla:2"), "k", layers=[0, 1], rank=2, alpha=2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), r"lora_rank must be at least 1, got 0"),
    (dict(rank=-3), r"lora_rank must be at least 1"),
    (dict(rank=40, targets="k"), r"lora_rank=40 is above min\(in, out\) = 32 of the k projection \(32x64\)"),
    (dict(targets="q,qkv"), r"lora_targets: unknown target 'qkv'; choose from q,k,v,o,gate,up,down"),
    (dict(rank=8, eval_ranks="1,4,16"), r"lora_eval_ranks: 16 is outside 1..lora_rank=8"),
    (dict(rank=8, rank_range=(2, 9)), r"lora_rank_range 2..9 must lie within 1..lora_rank=8"),
    (dict(layers="0,5"), r"lora_layers: layer 5 is not in 0..1"),
    (dict(base_quant="nf8"), r"base_quant='nf8': choose from none, int8, nf4"),
    (dict(rule="all"), r"lora_rule='all': choose from nested, frozen"),
])
def test_bad_settings_are_one_line_each(kwargs, message):
    with pytest.raises(ValueError, match=message) as e:
        lora.check_lora_settings(tiny().config, **kwargs)
    assert "\n" not in str(e.value)


def test_nf4_size_not_a_multiple_of_the_block_is_refused_in_one_line():
    config = LlamaConfig(n_layer=1, n_head=4, n_kv_head=2, n_embd=40, intermediate_size=64, vocab_size=VOCAB,
                         block_size=16)  # k_proj: 20x40 = 800 values, not a whole number of 64-blocks
    with pytest.raises(ValueError, match=r"^NF4 needs .* the k projection is 20x40 = 800 values$"):
        lora.check_lora_settings(config, base_quant="nf4")
    model = Llama(config)
    with pytest.raises(ValueError, match=r"^NF4 needs .*: layers\.0\.self_attn\.k_proj is 20x40 = 800 values$"):
        lora.quantize_base(model, "nf4")
    assert not any(isinstance(m, nf4.NF4Linear) for m in model.modules())  # refused before anything changed


# -----------------------------------------------------------------------------
# NF4 against torchao


def torchao_nf4():
    pytest.importorskip("torchao")
    from torchao.quantization import NF4Tensor
    return NF4Tensor


def test_nf4_codebook_matches_torchao_and_qlora():
    NF4Tensor = torchao_nf4()
    ref = NF4Tensor.from_tensor(torch.randn(128, 128), 64, 256).nf4
    ours = nf4.nf4_codebook()
    # torchao types the levels to 4 decimals (and -0.091049992 as -0.0911): within 6e-5
    assert (ours - ref).abs().max() <= 6e-5
    # bitsandbytes' (QLoRA's) table, to float32 precision
    assert abs(ours[1].item() - -0.6961928009986877) < 1e-6 and abs(ours[14].item() - 0.7229568362236023) < 1e-6
    assert ours[7] == 0 and ours[0] == -1 and ours[15] == 1 and torch.all(ours[1:] > ours[:-1])


@pytest.mark.parametrize("shape", [(128, 128), (256, 192)])
def test_nf4_round_trip_equals_torchao(shape):
    NF4Tensor = torchao_nf4()
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
    ref = NF4Tensor.from_tensor(w, 64, 256)
    q = nf4.quantize_nf4_tensor(w, codebook=ref.nf4)  # torchao's rounded levels: codes must then agree
    assert torch.equal(q["packed"], ref.quantized_data)
    assert torch.equal(q["absmax_codes"], ref.quantized_scalers)
    assert torch.equal(q["absmax_factor"], ref.quantization_factor) and torch.equal(q["absmax_mean"], ref.scaler_mean)
    assert torch.equal(nf4.dequantize_nf4_tensor(q, shape), ref.get_original_weight())


def test_nf4_error_bounds():
    w = torch.randn(256, 192, generator=torch.Generator().manual_seed(0)) * 0.02
    levels = nf4.nf4_codebook()
    half_gap = ((levels[1:] - levels[:-1]) / 2).max().item()  # 0.152 (between -1 and -0.696)
    plain = nf4.quantize_nf4_tensor(w, double_quant=False)
    absmax = w.reshape(-1, 64).abs().amax(1)
    assert torch.equal(plain["absmax"], absmax)
    err = (nf4.dequantize_nf4_tensor(plain, w.shape) - w).reshape(-1, 64).abs()
    assert torch.all(err <= half_gap * absmax[:, None] + 1e-7)
    double = nf4.quantize_nf4_tensor(w)
    scale_err = (nf4.dequantize_absmax(double) - absmax).abs()
    centered = (absmax - absmax.mean()).abs()
    # an int8 step is c/128 (c: the scale block's max |centered|); rounding costs half a step, except at
    # the positive extreme, which torchao's rule codes 128 and clamps to 127: one whole step
    step = F.pad(centered, (0, -centered.numel() % 256)).view(-1, 256).amax(1) / 128
    assert torch.all(scale_err.view(-1, 256) <= step[:, None] + 1e-7)  # + float32 rounding around the mean
    assert ((scale_err.view(-1, 256) > step[:, None] / 2 + 1e-7).sum(1) <= 1).all()
    err_dq = (nf4.dequantize_nf4_tensor(double, w.shape) - w).reshape(-1, 64).abs()
    assert torch.all(err_dq <= half_gap * absmax[:, None] + scale_err[:, None] + 1e-7)
    rel = ((nf4.dequantize_nf4_tensor(double, w.shape) - w).norm() / w.norm()).item()
    print(f"NF4 max |error| / block absmax {(err / absmax[:, None]).max():.4f} (bound {half_gap:.4f}), "
          f"relative Frobenius error {rel:.4f}")
    assert rel < 0.12


def test_nf4_partial_scale_block_and_bytes():
    w = torch.randn(576, 576, generator=torch.Generator().manual_seed(0))  # SmolLM2's q_proj: 20.25 scale blocks
    layer = nf4.NF4Linear(w)
    assert layer.absmax_factor.numel() == 21
    assert (layer.dequantize() - w).abs().max() <= 0.16 * w.abs().max()
    assert layer.nbytes() == 576 * 576 // 2 + 576 * 576 // 64 + 21 * 4 + 4 == nf4.nf4_nbytes(576 * 576)
    assert layer.nbytes() / (576 * 576 * 2) < 0.26


def test_frozen_bases_pass_gradients_to_the_input_only():
    torch.manual_seed(0)
    w = torch.randn(48, 64) * 0.05
    x = torch.randn(2, 3, 64)
    for base in (nf4.NF4Linear(w), Int8Linear(w), lora.FrozenInt8Linear(w)):
        adapter = lora.LoRALinear(base, rank=4, alpha=8)
        weight = lora.base_weight(base)
        xg = x.clone().requires_grad_(True)
        y = adapter(xg)
        assert torch.allclose(y, xg @ weight.T, atol=1e-5)  # B = 0
        y.pow(2).sum().backward()
        assert torch.allclose(xg.grad, 2 * (x @ weight.T) @ weight, atol=1e-4)
        assert all(not b.requires_grad and b.grad is None for b in base.buffers())
        assert adapter.lora_B.grad is not None and adapter.lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_base_with_lora_trains_and_merges(kind):
    model = tiny()
    x, y = tokens(), tokens(seed=3)
    with torch.no_grad():
        dense_logits = model(x)[0]
        bf16_bytes = 2 * sum(m.weight.numel() for m in model.layers.modules() if isinstance(m, Linear))
        lora.quantize_base(model, kind)
        base_logits = model(x)[0]
    # a tiny random model, so only a loose check that the quantized base is still the same model
    assert (base_logits - dense_logits).abs().max() < 0.1 * dense_logits.abs().max()
    lora.apply_lora(model, "q,v,gate", rank=4, alpha=8, dynamic=True)
    ratio = lora.lora_sizes(model)["base_linear_bytes"] / bf16_bytes
    assert ratio < (0.26 if kind == "nf4" else 0.53)  # int8: + one fp32 scale per row of 64 to 128 values
    _, loss = model(x, y)
    loss.backward()  # through the frozen layers below: no derivative of an int8 or NF4 weight is needed
    assert all((p.grad is not None) == ("lora_" in n) for n, p in model.named_parameters())
    randomize_adapters(model)
    with torch.no_grad():
        lora.set_rank(model, 3)
        adapted_logits = model(x)[0]
        merged = lora.merge_lora(model, rank=3)
        assert not any(isinstance(m, (nf4.NF4Linear, Int8Linear)) for m in merged.modules())
        assert (merged(x)[0] - adapted_logits).abs().max() < 1e-4


# -----------------------------------------------------------------------------
# train.py with adapters, resume, merge, the experiment (tiny models on the character data)

TRAIN_TINY = ["--n_layer=2", "--n_head=2", "--n_kv_head=1", "--n_embd=32", "--intermediate_size=64",
              "--block_size=16", "--batch_size=4", "--eval_iters=2", "--log_interval=1", "--compile=False",
              "--learning_rate=1e-2", "--warmup_iters=2", "--min_lr=1e-3", "--dtype=float32", "--kv_source=dense"]


def train_run(data_dir, out_dir, *args):
    import train
    return train.main(TRAIN_TINY + [f"--dataset={data_dir}", f"--out_dir={out_dir}"] + list(args))


def log_records(out_dir, kind):
    import json
    with open(out_dir / "log.jsonl") as f:
        return [r for r in map(json.loads, f) if r.get("kind") == kind]


@pytest.fixture(scope="module")
def trained_base(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    train_run(data_dir, out, "--max_iters=10", "--eval_interval=10")
    return out / "ckpt.pt"


DYNAMIC = ["--lora_targets=q,k,v,o,gate,up,down", "--lora_rank=8", "--lora_dynamic=True", "--base_quant=nf4"]


def test_dynamic_lora_resume_is_exact(data_dir, trained_base, tmp_path):
    common = [f"--init_from={trained_base}", *DYNAMIC, "--max_iters=8", "--lr_decay_iters=8", "--eval_interval=4",
              "--gradient_accumulation_steps=2"]
    train_run(data_dir, tmp_path / "a", *common)
    train_run(data_dir, tmp_path / "b", *common, "--max_iters=4")
    train_run(data_dir, tmp_path / "b", *common[1:], "--init_from=resume")
    straight = {r["iter"]: r["loss"] for r in log_records(tmp_path / "a", "train")}
    resumed = {r["iter"]: r["loss"] for r in log_records(tmp_path / "b", "train")}
    assert sorted(straight) == list(range(8)) and straight == resumed  # bit for bit
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    adapters = [k for k in a["model"] if "lora_" in k]
    assert adapters and all(torch.equal(a["model"][k], b["model"][k]) for k in adapters)
    base = torch.load(trained_base, weights_only=True)["model"]
    # only the adapters trained: the packed base is the NF4 of the starting weights, the embedding as it was
    assert torch.equal(a["model"]["embed_tokens.weight"], base["embed_tokens.weight"])
    assert any(not torch.equal(a["model"][k], torch.zeros_like(a["model"][k])) for k in adapters if k.endswith("B"))
    assert a["lora"]["rank_sampler"]["generator"].equal(b["lora"]["rank_sampler"]["generator"])


def test_eval_ranks_are_logged_and_the_training_rank_restored(data_dir, trained_base, tmp_path):
    train_run(data_dir, tmp_path / "o", f"--init_from={trained_base}", *DYNAMIC, "--lora_eval_ranks=1,4",
              "--max_iters=4", "--eval_interval=2")
    at = log_records(tmp_path / "o", "eval_rank")
    assert [(r["iter"], r["rank"]) for r in at] == [(0, 1), (0, 4), (2, 1), (2, 4), (4, 1), (4, 4)]
    # at iter 0 B is zero: every rank is the (NF4) base, so the losses agree; later they differ
    assert at[0]["val_loss"] == at[1]["val_loss"] and at[-1]["val_loss"] != at[-2]["val_loss"]


def test_merge_command_gives_an_ordinary_model_with_the_lora_logits(data_dir, trained_base, tmp_path):
    import subprocess
    import sys
    from checkpoint import CheckpointError, load_checkpoint, load_model
    out = tmp_path / "run"
    train_run(data_dir, out, f"--init_from={trained_base}", *DYNAMIC, "--max_iters=6", "--eval_interval=6")
    lora.main([f"--init_from={out}", "--rank=3", f"--out={tmp_path / 'merged.pt'}",
               f"--adapters={tmp_path / 'delta.safetensors'}"])
    model = lora.model_from_lora_checkpoint(load_checkpoint(out / "ckpt.pt")).eval()
    lora.set_rank(model, 3)
    merged, _ = load_model(tmp_path / "merged.pt")
    assert not lora.lora_adapters(merged)
    X = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(merged(X)[0], model(X)[0], rtol=1e-5, atol=1e-5)
    tensors, meta = lora.read_lora(tmp_path / "delta.safetensors")
    assert tensors["layers.0.self_attn.q_proj.lora_A"].shape == (3, 32)
    assert meta["base_sha256"] == lora.sha256_of(trained_base)
    lora.main([f"--init_from={out}", "--rank=3", f"--adapters={tmp_path / 'bf16.safetensors'}",
               "--adapters_dtype=bfloat16"])
    half, _ = lora.read_lora(tmp_path / "bf16.safetensors")
    assert half.keys() == tensors.keys()
    assert all(half[k].dtype == torch.bfloat16 and torch.equal(half[k], t.to(torch.bfloat16)) for k, t in tensors.items())
    with pytest.raises(ValueError, match="adapters_dtype='float16': choose float32 or bfloat16"):
        lora.main([f"--init_from={out}", f"--adapters={tmp_path / 'x.safetensors'}", "--adapters_dtype=float16"])
    with pytest.raises(CheckpointError, match="LoRA run's checkpoint"):
        load_model(out)  # sample.py, bench.py and export read the merged file, never the LoRA run's
    root = lora.os.path.dirname(lora.os.path.abspath(lora.__file__))
    done = subprocess.run([sys.executable, "sample.py", f"--init_from={tmp_path / 'merged.pt'}", "--start=the ",
                           "--max_new_tokens=8", "--num_samples=1", "--device=cpu"], cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "the " in done.stdout, done.stderr[-500:]


def test_adaptation_with_adapters_on_the_consumers_over_an_nf4_base(data_dir, trained_base, tmp_path):
    train_run(data_dir, tmp_path / "ad", f"--init_from={trained_base}", "--adapt_target=0,0",
              "--adapt_stage_iters=2", "--lora_targets=q,o,gate,up,down", "--lora_layers=1", "--lora_rank=4",
              "--base_quant=nf4", "--max_iters=6", "--eval_interval=3", "--distill_alpha=0.5")
    ckpt = torch.load(tmp_path / "ad" / "ckpt.pt", weights_only=True)
    assert ckpt["model_config"]["kv_source"] == [0, 0]
    assert sorted(k for k in ckpt["model"] if k.endswith("lora_A")) == sorted(
        f"layers.1.{lora.TARGETS[t]}.lora_A" for t in ("q", "o", "gate", "up", "down"))
    assert "layers.1.self_attn.k_proj.base.packed" not in ckpt["model"]  # the consumer's K/V are gone


@pytest.mark.parametrize("args, match", [
    (["--lora_targets=q,x"], "unknown target 'x'"),
    (["--lora_targets=q", "--lora_rank=0"], "lora_rank must be at least 1"),
    (["--lora_targets=q", "--lora_rank=40"], "above min.in, out. = 32 of the q projection"),
    (["--lora_targets=q", "--lora_rank=4", "--lora_eval_ranks=2,8"], "lora_eval_ranks: 8 is outside 1..lora_rank=4"),
    (["--lora_targets=q", "--base_quant=nf4", "--n_embd=24", "--n_head=2"], "whole number of 64-value blocks"),
    (["--lora_rank=4"], "apply only with lora_targets|applies only with lora_targets"),
    (["--lora_targets=q", "--lora_dynamic=True", "--compile=True"], "compile=True with lora_dynamic=True"),
    (["--lora_targets=q", "--adapt_target=0,0", "--adapt_train_layers=converted"], "choose their layers with lora_layers"),
])
def test_bad_lora_settings_are_one_line(data_dir, tmp_path, args, match):
    import subprocess
    import sys
    root = lora.os.path.dirname(lora.os.path.abspath(lora.__file__))
    done = subprocess.run([sys.executable, "train.py", *TRAIN_TINY, f"--dataset={data_dir}",
                           f"--out_dir={tmp_path / 'x'}", "--max_iters=1", *args], cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr[-800:]
    import re
    assert re.search(match, done.stderr), done.stderr
    assert not (tmp_path / "x" / "ckpt.pt").exists()


def test_dynamic_rank_turns_auto_compile_off():
    import types
    s = types.SimpleNamespace(lora_targets="q", lora_rank=4, lora_rank_range="", lora_eval_ranks="", lora_rule="nested",
                              base_quant="none", lora_dynamic=True, compile="auto", fsdp=False, adapt_target="")
    lora.check_lora_run(s, set())
    assert s.compile is False
    s.lora_dynamic, s.compile = False, "auto"
    lora.check_lora_run(s, set())
    assert s.compile == "auto"  # a fixed rank compiles as any model does


def test_experiment_script_quick(data_dir, trained_base, tmp_path):
    import importlib
    import json
    exp = importlib.import_module("experiments.qdylora")
    exp.main([f"--model={trained_base}", f"--dataset={data_dir}", "--quick=True", "--lora_rank=8",
              "--fixed_ranks=4,8", "--eval_ranks=1,4,8", f"--out={tmp_path / 'res'}", f"--runs={tmp_path / 'runs'}",
              "--block_size=16", "--batch_size=4", "--float_base_ranks=4"])
    results = json.load(open(tmp_path / "res" / "results.json"))
    assert set(results["runs"]) == {"dynamic", "dynamic frozen", "fixed r=4", "fixed r=8", "LoRA r=4 float base", "full"}
    assert list(results["runs"]["dynamic"]["val_loss_at_rank"]) == ["1", "4", "8"]
    runs = results["runs"]
    assert runs["fixed r=4"]["trainable_params"] * 2 == runs["fixed r=8"]["trainable_params"]
    assert runs["full"]["trainable_params"] > runs["dynamic"]["trainable_params"]
    assert results["base"]["NF4 base"]["base_linear_bytes"] < 0.3 * results["base"]["float base"]["base_linear_bytes"] / 2
    assert "Rank curves" in open(tmp_path / "res" / "results.md").read()
    # reuse=True trains only what is new: the finished runs keep their checkpoints, a new rank runs
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/ckpt.pt")}
    exp.main([f"--model={trained_base}", f"--dataset={data_dir}", "--quick=True", "--lora_rank=8",
              "--fixed_ranks=2,4,8", "--eval_ranks=1,4,8", f"--out={tmp_path / 'res'}", f"--runs={tmp_path / 'runs'}",
              "--block_size=16", "--batch_size=4", "--float_base_ranks=4", "--reuse=True"])
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (tmp_path / "runs" / "fixedr2" / "ckpt.pt").exists()
    assert "fixed r=2" in json.load(open(tmp_path / "res" / "results.json"))["runs"]


def test_experiment_nf4_study(data_dir, trained_base, tmp_path):
    import importlib
    import json
    exp = importlib.import_module("experiments.qdylora")
    exp.main([f"--model={trained_base}", f"--dataset={data_dir}", "--nf4_study=True", f"--out={tmp_path / 'res'}",
              f"--runs={tmp_path / 'runs'}", "--block_size=16", "--batch_size=2", "--eval_batches=2"])
    study = json.load(open(tmp_path / "res" / "nf4.json"))
    # 16 levels over a block's absmax: a Gaussian's relative error is ~0.09 (QLoRA's NF4), every layer near it
    assert 0.05 < study["gaussian_relative_error"] < 0.15
    assert all(0.0 < mean <= worst < 0.2 for mean, worst in study["relative_error"].values())
    losses = study["val_loss"]
    assert set(losses) >= {"float base", "NF4 block 64, double-quantized scales", "NF4 block 16"}
    assert losses["NF4 block 64, double-quantized scales"] != losses["float base"]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # the study trains nothing
