"""The faster paths compute what the plain ones do: the chunked cross-entropy (value and gradient of
F.cross_entropy), the compiled decode step (same greedy tokens as eager, with the matrix-vector
products really turned into inductor loops), and weight-only int8 and int4 decoding (the quantisation error is
bounded, the logits stay within a stated tolerance, and greedy tokens agree wherever the float model's
choice is clear)."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

import model as M
import speed
from quantize import Int4Linear, Int8Linear, quantize_int4, quantize_int8

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=128, vocab_size=97, block_size=64)


def tiny(kv_source="dense", attn_source="dense", seed=0, **changes):
    torch.manual_seed(seed)
    return M.Llama(M.LlamaConfig(**{**TINY, **changes}, kv_source=kv_source, attn_source=attn_source)).eval()


# -----------------------------------------------------------------------------
# chunked cross-entropy

def test_linears_in_bf16_give_autocasts_logits_and_give_the_weights_back():
    """Frozen linears stored in bf16 for the block: under bf16 autocast the logits equal autocast's own casts of
    the fp32 weights to the bit; the tied head and weights that train are left alone; afterwards every weight
    is the fp32 tensor it was."""
    model = tiny(kv_source="0,1,1,3", tie_embeddings=True, seed=3)
    model.requires_grad_(False).layers[2].mlp.up_proj.weight.requires_grad_(True)  # one weight that trains
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, _ = model(idx)
        with speed.linears_in(model, torch.bfloat16):
            stored = {m.weight.dtype for m in speed.frozen_linears(model)}
            trains, head = model.layers[2].mlp.up_proj.weight.dtype, model.lm_head.weight.dtype
            got, _ = model(idx)
    assert stored == {torch.bfloat16} and trains == head == torch.float32
    assert torch.equal(got, want)
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())



@pytest.mark.parametrize("chunk_rows", [1, 7, 49, 50])  # one row at a time, remainders; 50: F.cross_entropy itself
def test_chunked_cross_entropy_equals_f_cross_entropy(monkeypatch, chunk_rows):
    V = 300
    monkeypatch.setattr(speed, "LOSS_CHUNK_ELEMENTS", chunk_rows * V)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 32, generator=g, requires_grad=True)
    w = torch.randn(V, 32, generator=g, requires_grad=True)
    t = torch.randint(V, (50,), generator=g)
    t[[0, 13, 14, 49]] = -1  # positions without a target
    loss = speed.chunked_cross_entropy(h, w, t)
    grad_h, grad_w = torch.autograd.grad(2.5 * loss, (h, w))  # a scaled loss (gradient accumulation)
    want = F.cross_entropy(h @ w.t(), t, ignore_index=-1)
    want_h, want_w = torch.autograd.grad(2.5 * want, (h, w))
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(grad_h, want_h)
    torch.testing.assert_close(grad_w, want_w)


def test_chunked_cross_entropy_without_gradients_and_with_a_frozen_head(monkeypatch):
    monkeypatch.setattr(speed, "LOSS_CHUNK_ELEMENTS", 3 * 40)
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(20, 16, generator=g, requires_grad=True), torch.randn(40, 16, generator=g)
    t = torch.randint(40, (20,), generator=g)
    want = F.cross_entropy(h @ w.t(), t)
    with torch.no_grad():
        torch.testing.assert_close(speed.chunked_cross_entropy(h, w, t), want)
    (grad_h,) = torch.autograd.grad(speed.chunked_cross_entropy(h, w, t), (h,))  # w needs no gradient
    torch.testing.assert_close(grad_h, torch.autograd.grad(want, (h,))[0])


def test_chunked_cross_entropy_under_bf16_autocast(monkeypatch):
    monkeypatch.setattr(speed, "LOSS_CHUNK_ELEMENTS", 8 * 64)
    g = torch.Generator().manual_seed(6)
    h, w = torch.randn(30, 16, generator=g, requires_grad=True), torch.randn(64, 16, generator=g, requires_grad=True)
    t = torch.randint(64, (30,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = speed.chunked_cross_entropy(h, w, t)
        want = F.cross_entropy((h @ w.t()).float(), t)  # the bf16 logits autocast gives, in fp32
    grads, want_grads = torch.autograd.grad(loss, (h, w)), torch.autograd.grad(want, (h, w))
    assert grads[0].dtype == h.dtype and grads[1].dtype == w.dtype
    torch.testing.assert_close(loss, want, rtol=1e-3, atol=1e-3)
    for a, b in zip(grads, want_grads):  # the gradient products run in bf16 too
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_model_loss_and_gradients_equal_the_full_logits_loss(monkeypatch):
    monkeypatch.setattr(speed, "LOSS_CHUNK_ELEMENTS", 5 * TINY["vocab_size"])  # many chunks
    model = tiny("upper:half", tie_embeddings=True).train()
    idx, targets = torch.randint(0, 97, (3, 20)), torch.randint(0, 97, (3, 20))
    _, loss = model(idx, targets)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    logits, _ = model(idx)
    want = F.cross_entropy(logits.view(-1, 97), targets.view(-1))
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    torch.testing.assert_close(loss, want)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# -----------------------------------------------------------------------------
# compiled decoding and int8 weights


def greedy(model, prompt, n, step=None):
    return model.generate(prompt, n, temperature=0, decode_step=step)


# What a compiled step's generated code calls, in inductor's Python wrapper or its C++ one (the CPU decode step
# is compiled with the C++ wrapper: speed.compile_decode_step)
BLAS_CALLS = ("extern_kernels.mm", "extern_kernels.bmm", "addmm", "aoti_torch_cpu_mm", "aoti_torch_cpu_bmm")


def blas_calls(code):
    return [call for call in BLAS_CALLS if call in code]


def op_calls(code, op):
    """How many times the generated code calls the custom op `op` ('speed::matvec')."""
    return code.count(f"= torch.ops.{op.replace('::', '.')}.default(") + code.count(f'aoti_torch_call_dispatcher("{op}"')


def test_decode_paths_keep_the_weights_and_compute_what_the_model_does():
    """use_decode_paths swaps module classes only: the same Parameter objects (a tied head stays tied)
    under the same state-dict keys, and eager decoding gives the logits of the model's own SDPA path."""
    model = tiny("0,0,2,3", "0,1,2,2", tie_embeddings=True)
    params, keys = [id(p) for p in model.parameters()], list(model.state_dict())
    fast = speed.use_decode_paths(copy.deepcopy(model))
    assert speed.use_decode_paths(model) is model and [id(p) for p in model.parameters()] == params
    assert list(model.state_dict()) == keys and model.lm_head.weight is model.embed_tokens.weight
    assert all(type(m) is speed.StreamingLinear for m in model.modules() if isinstance(m, torch.nn.Linear))
    plain = tiny("0,0,2,3", "0,1,2,2", tie_embeddings=True)
    prompt = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(7))
    for want, got in paired_decode_steps(plain, fast, prompt, 11):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def paired_decode_steps(first, second, prompt, steps):
    """(first's logits, second's) at each of `steps` decode steps after each prefilled prompt (B, T), both fed
    the prompt's tokens again."""
    B, T = prompt.shape
    with torch.no_grad():
        caches = [m.new_cache(B, 64) for m in (first, second)]
        for m, cache in zip((first, second), caches):
            m.prefill(prompt, cache)
        for pos in range(T, T + steps):
            token = prompt[:, (pos - T) % T:(pos - T) % T + 1]
            yield tuple(m.decode_step(token, torch.tensor([pos]), c) for m, c in zip((first, second), caches))


def test_compiled_decode_step_gives_eager_tokens_with_matvec_loops():
    """One compile (CPU, ~15 s), fp32: K/V sharing and attention sharing both on the path; the batch-1
    products are inductor's own loops, not BLAS calls (fp32 weights do not use speed.matvec)."""
    from torch._inductor.utils import run_and_get_code
    model = speed.use_decode_paths(tiny("0,0,2,3", "0,1,2,2"))
    prompt = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(2))
    step = speed.compile_decode_step(model)
    with torch.no_grad():
        compiled, code = run_and_get_code(greedy, model, prompt, 30, step)
        cache = model.new_cache(1, 64)
        model.prefill(prompt, cache)
        pos = torch.tensor([9])
        token = prompt[:, -1:]
        torch.testing.assert_close(step(token, pos, cache), model.decode_step(token, pos, cache), rtol=1e-4, atol=1e-5)
    assert torch.equal(compiled, greedy(model, prompt, 30))
    code = "\n".join(code)
    assert "cpp_wrapper" in code or "aoti_torch" in code  # the C++ wrapper, as the scripts compile it
    assert blas_calls(code) == [] and op_calls(code, "speed::matvec") == 0


def test_compiled_steps_of_two_models_in_one_process_stay_each_its_own():
    """compile_decode_step skips dynamo's checks of the model's modules before a step, so each model gets its own
    copy of decode_step's code: a float model and its int8 copy (same cache shapes and dtype) compiled in one
    process each give their own eager logits, also for a cache of another length (a new graph: the cache's
    shapes are still checked)."""
    plain = speed.use_decode_paths(tiny("0,0,2,3", seed=6))
    quantized = quantize_int8(copy.deepcopy(plain))
    steps = {m: speed.compile_decode_step(m) for m in (plain, quantized)}
    codes = {id(type(plain).decode_step.__code__)} | {id(steps[m].dynamo._torchdynamo_orig_callable.__func__.__code__)
                                                       for m in steps}
    assert len(codes) == 3  # three code objects (equal ones: == compares their contents)
    prompt = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(1))
    token, pos = prompt[:, -1:], torch.tensor([7])
    with torch.no_grad():
        for length in (16, 16, 32):  # the second call of each runs the graph the first made
            for m in (plain, quantized, plain):
                cache, ref = m.new_cache(1, length), m.new_cache(1, length)
                m.prefill(prompt, cache), m.prefill(prompt, ref)
                torch.testing.assert_close(steps[m](token, pos, cache), m.decode_step(token, pos, ref), rtol=1e-4, atol=1e-5)
        gap = (plain.decode_step(token, pos, cache) - quantized.decode_step(token, pos, ref)).abs().max()
    assert gap > 1e-3  # the two models' logits differ by more than the check's tolerance


def test_compiled_step_skips_dynamo_once_compiled_and_gives_dynamos_logits(set_threads):
    """compile_decode_step's DirectStep: the first call of a signature goes through dynamo (and compiles), the later
    ones call the compiled graph directly, on that cache and on a new one of its shape (another prompt: its own
    positions written), and give the logits of the same graph called through dynamo bit for bit; a batch of two (a
    new graph) goes through dynamo once, then directly too, also bit for bit. The step keeps none of the first call's
    tensors. A token or position of another dtype or strides, a cache of another length or dtype, gradients,
    autocast or another thread count make another signature, which goes through dynamo."""
    model = speed.fuse_projections(speed.use_decode_paths(tiny("0,0,2,3", "0,1,2,2").to(torch.bfloat16)))
    step = speed.compile_decode_step(model)

    def steps(call, batch, seed):
        g = torch.Generator().manual_seed(seed)
        prompt, tokens = torch.randint(0, 97, (batch, 9), generator=g), torch.randint(0, 97, (batch, 6), generator=g)
        cache = model.new_cache(batch, 32)
        model.prefill(prompt, cache)
        return [call(tokens[:, n:n + 1], torch.tensor([9 + n]), cache) for n in range(6)]

    with torch.no_grad():
        for batch, seed, direct_after in [(1, 1, 5), (1, 2, 11), (2, 3, 16)]:
            got = steps(step, batch, seed)
            assert step.direct_calls == direct_after and step.compiled is None
            want = steps(step.dynamo, batch, seed)  # every step through dynamo, the same graph
            assert all(torch.equal(g, w) for g, w in zip(got, want))
            assert not torch.equal(got[0], got[1])  # the slots took each step's token, position and cache
        cache, tokens, pos = model.new_cache(1, 32), torch.zeros(1, 6, dtype=torch.long), torch.tensor([9])
        key = step.signature(tokens[:, :1], pos, cache)
        assert key in step.plans
        others = [(tokens[:, :1].int(), pos, cache), (tokens[:, :1], pos.int(), cache),
                  (torch.zeros(1, 1, dtype=torch.long), pos, cache), (tokens[:, :1], pos, model.new_cache(1, 48)),
                  (tokens[:, :1], pos, M.KVCache(model.config, 1, 32, torch.float32, "cpu"))]
        assert all(step.signature(*other) != key for other in others)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert step.signature(tokens[:, :1], pos, cache) != key
        set_threads(torch.get_num_threads() + 1)
        assert step.signature(tokens[:, :1], pos, cache) != key
    assert step.signature(tokens[:, :1], pos, cache) != key  # gradients enabled


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_decoding_calls_matvec_compiled_and_eager(dtype):
    """bf16/fp16 weights: every batch-1 product is speed.matvec, in the compiled step (no BLAS call) and eager.
    Fed the same tokens, the compiled step's logits, the eager decode paths' and the plain model's agree
    within half-precision rounding of the other ops (inductor keeps fp32 between them, eager rounds). The
    projections joined, as the decoding scripts run them: 17 products a step where there were 25."""
    from torch._inductor.utils import run_and_get_code
    plain = tiny("0,0,2,3", "0,1,2,2").to(dtype)
    model = speed.fuse_projections(speed.use_decode_paths(copy.deepcopy(plain)))
    products = sum(isinstance(m, torch.nn.Linear) for m in model.modules())  # a layer reading K/V has no k/v_proj
    prompt = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(2))
    step = speed.compile_decode_step(model)
    tokens = torch.randint(0, 97, (12,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        caches = [m.new_cache(1, 64) for m in (plain, model, model)]
        for m, cache in zip((plain, model, model), caches):
            m.prefill(prompt, cache)
        for i, t in enumerate(tokens):
            pos, token = torch.tensor([9 + i]), t.view(1, 1)
            want = plain.decode_step(token, pos, caches[0]).float()
            eager = model.decode_step(token, pos, caches[1]).float()
            got, code = run_and_get_code(step, token, pos, caches[2]) if i == 0 else (step(token, pos, caches[2]), code)
            spread = float(want.max() - want.min())
            torch.testing.assert_close(eager, want, rtol=0, atol=0.02 * spread)
            torch.testing.assert_close(got.float(), want, rtol=0, atol=0.02 * spread)
    code = "\n".join(code)
    assert op_calls(code, "speed::matvec") == products == 17 and blas_calls(code) == []


def children(module):
    return sorted(name for name, _ in module.named_children())


@pytest.mark.parametrize("quantize", [None, quantize_int8, quantize_int4])
def test_joined_projections_give_the_separate_products_outputs(quantize):
    """fuse_projections: an owner's q, k and v, and every MLP's gate and up, become one module each, their rows
    end to end (int8 and 4-bit scales alike); a layer with only q (it reads K/V) or only v (it reads a pattern)
    keeps it. Decoding gives the separate products' logits to the bit: each output row is summed alike."""
    separate = speed.use_decode_paths(tiny("0,0,2,3", "0,1,2,2").to(torch.bfloat16))
    if quantize:
        quantize(separate)
    joined = speed.fuse_projections(copy.deepcopy(separate))
    assert [children(layer.self_attn) for layer in joined.layers] == [
        ["o_proj", "qkv_proj"], ["o_proj", "q_proj"], ["o_proj", "qkv_proj"], ["o_proj", "v_proj"]]
    assert all(children(layer.mlp) == ["down_proj", "gate_up_proj"] for layer in joined.layers)
    attn, mlp = separate.layers[2].self_attn, separate.layers[2].mlp
    for name, parts in (("qkv_proj", (attn.q_proj, attn.k_proj, attn.v_proj)), ("gate_up_proj", (mlp.gate_proj, mlp.up_proj))):
        module = getattr(joined.layers[2].self_attn if name == "qkv_proj" else joined.layers[2].mlp, name)
        for key, rows in module.state_dict().items():  # weight; int8 + scales; 4-bit codes, scales, minimums
            assert torch.equal(rows, torch.cat([p.state_dict()[key] for p in parts])), (name, key)
    assert speed.fuse_projections(joined) is joined and children(joined.layers[0].self_attn) == ["o_proj", "qkv_proj"]
    prompt = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    for rows in (prompt, prompt[:1], prompt[1:]):  # two rows (the few-rows loops), then one (the one-row loops)
        for want, got in paired_decode_steps(separate, joined, rows, 5):
            assert torch.equal(got, want)


def test_projections_of_other_kinds_are_not_joined():
    """Parts that differ in kind (an int8 k_proj beside float q and v) or in group size (4-bit), or of a kind whose
    weights are not row by row (a LoRA adapter), stay as they are; the rest of the model is joined."""
    from lora import LoRALinear
    model = speed.use_decode_paths(tiny())
    model.layers[0].self_attn.k_proj = Int8Linear(model.layers[0].self_attn.k_proj.weight)
    model.layers[1].mlp.up_proj = LoRALinear(model.layers[1].mlp.up_proj, rank=2, alpha=4.0)
    attn = model.layers[2].self_attn  # 4-bit, groups of 32 beside groups of 64
    attn.q_proj, attn.k_proj, attn.v_proj = (Int4Linear(p.weight, g) for p, g in
                                             ((attn.q_proj, 32), (attn.k_proj, 64), (attn.v_proj, 32)))
    speed.fuse_projections(model)
    assert children(model.layers[0].self_attn) == ["k_proj", "o_proj", "q_proj", "v_proj"] == children(attn)
    assert children(model.layers[1].mlp) == ["down_proj", "gate_proj", "up_proj"]
    assert children(model.layers[1].self_attn) == ["o_proj", "qkv_proj"] and children(model.layers[0].mlp) == [
        "down_proj", "gate_up_proj"]


def test_int8_weights_round_within_half_a_step():
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(3))
    w[5] = 0  # an all-zero row keeps a usable scale
    q = Int8Linear(w)
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() <= 127
    dequant = q.weight.float() * q.scales[:, None]
    assert ((dequant - w).abs() <= q.scales[:, None] / 2 + 1e-7).all()
    x = torch.randn(3, 5, 40)
    torch.testing.assert_close(q(x), x @ dequant.t(), rtol=1e-5, atol=1e-5)


def test_quantize_int8_replaces_every_linear_and_keeps_the_embedding():
    model = quantize_int8(tiny("upper:half", tie_embeddings=True))
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, Int8Linear) and model.embed_tokens.weight.dtype == torch.float32
    idx = torch.randint(0, 97, (1, 8))
    with pytest.raises(ValueError, match="quantized model .* is for decoding"):  # no loss through an int8 head
        model(idx, idx)


def test_int4_weights_are_the_group_definition():
    """Per group of 32 along a row: codes in 0..15, w = q * scale + minimum with scale = (max - min) / 15,
    each weight within half a step, the group's extremes exact; the CPU kernel's product equals x times
    that dequantised weight (fp32, to summation order) and within bf16 rounding for bf16 inputs."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 96, generator=g)
    w[5] = 0.25  # a constant row keeps a usable scale and comes back exactly
    q = Int4Linear(w)
    codes = q.unpacked_codes()
    assert q.codes.shape == (24, 48) and q.codes.dtype == torch.uint8 and int(codes.max()) <= 15
    groups = w.view(24, 3, 32)
    torch.testing.assert_close(q.scales, (groups.amax(-1) - groups.amin(-1)).clamp(min=1e-12) / 15)
    torch.testing.assert_close(q.minimums, groups.amin(-1))
    want_codes = torch.round((groups - q.minimums[..., None]) / q.scales[..., None]).view(24, 96)
    assert torch.equal(codes.float(), want_codes)
    dequant = q.dequantize()
    assert ((dequant - w).view(24, 3, 32).abs() <= q.scales[..., None] / 2 + 1e-6).all()
    for reduce in (torch.amin, torch.amax):
        torch.testing.assert_close(reduce(dequant.view(24, 3, 32), -1), reduce(groups, -1))
    assert torch.equal(dequant[5], w[5])
    x = torch.randn(3, 5, 96, generator=g)
    torch.testing.assert_close(q(x), x @ dequant.t(), rtol=1e-5, atol=1e-5)
    qb, xb = Int4Linear(w.bfloat16()), x.bfloat16()
    want = xb.float() @ qb.dequantize().t()
    assert ((qb(xb).float() - want).abs() <= want.abs() * 2 ** -7 + 0.02).all()


def test_quantize_int4_replaces_every_linear_or_refuses_before_changing_anything():
    model = quantize_int4(tiny("upper:half", tie_embeddings=True))
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, Int8Linear) and model.embed_tokens.weight.dtype == torch.float32  # as Q4_1 files
    assert all(isinstance(m, Int4Linear) for n, m in model.layers.named_modules() if n.endswith("_proj"))
    assert isinstance(quantize_int4(tiny(), head_int8=False).lm_head, Int4Linear)
    idx = torch.randint(0, 97, (1, 8))
    with pytest.raises(ValueError, match="quantized model .* is for decoding"):
        model(idx, idx)
    odd = tiny(intermediate_size=80)  # down_proj's rows: 80 weights, not groups of 32
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.down_proj has rows of 80 weights.*--quantize=int8"):
        quantize_int4(odd)
    assert sum(isinstance(m, torch.nn.Linear) for m in odd.modules()) == 4 * 7 + 1  # all still float


# (quantizer, logits error bound as a fraction of their spread, least share of steps where the float model's
# choice is clear): 8 bits with a scale a row; 4 bits with a scale and minimum a group of 32, whose error
# leaves fewer clear choices on a random model (the dequantised-float test below covers every step)
QUANTIZED = {"int8": (quantize_int8, 0.05, 0.5), "int4": (quantize_int4, 0.12, 0.1)}


def dequantized_float(model, quantized):
    """model with each Linear's weight replaced by what its quantized counterpart represents."""
    twin = copy.deepcopy(model)
    qmods = dict(quantized.named_modules())
    with torch.no_grad():
        for name, m in twin.named_modules():
            if isinstance(m, torch.nn.Linear):
                m.weight = torch.nn.Parameter(qmods[name].dequantize(m.weight.dtype))  # unties a tied head
    return twin


@pytest.mark.parametrize("kind", list(QUANTIZED))
def test_quantized_kernels_compute_the_dequantized_model(kind):
    """Quantized models against plain fp32 products with the dequantised weights (int8: its CPU kernel;
    int4 in fp32: the dequantised product, see Int4Linear; its bf16 kernel is checked against the definition
    above): logits to fp32 summation order, and the same greedy tokens at every one of 24 steps."""
    model = tiny("upper:half", seed=4)
    quantized = QUANTIZED[kind][0](copy.deepcopy(model))
    twin = dequantized_float(model, quantized)
    prompt = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = greedy(twin, prompt, 24)
        torch.testing.assert_close(quantized(out)[0], twin(out)[0], rtol=1e-4, atol=1e-4)
        assert torch.equal(greedy(quantized, prompt, 24), out)


@pytest.mark.parametrize("kind", list(QUANTIZED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_decoding_stays_close_to_the_float_model(dtype, kind):
    """Logits of the whole sequence within a stated fraction of their spread; greedy tokens equal at every
    step where the float model's top choice leads by more than twice that error. Then the compiled step
    (the eager int8 / int4 kernel inside the graph) gives the eager quantized tokens."""
    quantize, bound, least_clear = QUANTIZED[kind]
    model = tiny("upper:half", seed=4).to(dtype)
    quantized = quantize(copy.deepcopy(model))
    prompt = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = greedy(model, prompt, 24)
        ref, got = model(out)[0].float(), quantized(out)[0].float()
    err = (got - ref).abs().max()
    assert err <= bound * (ref.max() - ref.min())
    top2 = ref[:, prompt.shape[1] - 1:-1].topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * err
    assert clear.float().mean() > least_clear  # the steps the check below covers
    with torch.no_grad():
        out_q = greedy(quantized, prompt, 24)
    first_unclear = [int((~row).nonzero()[0]) if (~row).any() else row.numel() for row in clear]
    for b, n in enumerate(first_unclear):  # up to the first close call the two runs see the same tokens
        assert torch.equal(out_q[b, :8 + n], out[b, :8 + n])
    if dtype == (torch.float32 if kind == "int8" else torch.bfloat16):  # int4: its kernel takes bf16 only
        from torch._inductor.utils import run_and_get_code
        step = speed.compile_decode_step(quantized)
        compiled, code = run_and_get_code(greedy, quantized, prompt, 24, step)
        assert torch.equal(compiled, out_q)
        code = "\n".join(code)  # every product is the quantized kernel, none a float matmul
        assert f"_weight_{kind}pack_mm" in code and blas_calls(code) == []


# -----------------------------------------------------------------------------
# the decoding kernel: speed.matvec (speed_kernels.cpp)


@pytest.fixture
def set_threads():
    """torch.set_num_threads for one test, restored after it: the kernels split their work by at::get_num_threads(),
    which a patched torch.get_num_threads would not change."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def quantization_bound(x, w):
    """What rounding x to int16 in blocks of 32 can change in x @ w.T: per block max|x| / 65534 times the
    block's sum of |w|, summed over the blocks (plus fp32 summation, 1e-6 of the sum of |x w|)."""
    K = x.shape[-1]
    step = x.view(-1, K // 32, 32).abs().amax(-1) / 65534  # (1, K / 32)
    return (step.double() @ w.abs().view(-1, K // 32, 32).sum(-1).double().t()) + 1e-6 * (x.abs() @ w.abs().t()).double()


def test_an_older_kernel_build_loads_beside_the_new_under_its_own_name(tmp_path):
    """experiments/batch_decode.py --old=kernels: a speed_kernels.cpp (here the working tree's own) built with its ops
    renamed loads beside the build speed.py loaded, in one process, and its ops compute what the source's do; a
    source that defines no library of speed's ops is refused in one line."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_batch_decode", os.path.join(ROOT, "experiments", "batch_decode.py"))
    batch_decode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(batch_decode)
    assert speed.kernel_library()
    old = batch_decode.old_kernels(os.path.join(ROOT, "speed_kernels.cpp"))
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(1, 96, generator=g), torch.randn(40, 96, generator=g).bfloat16()
    want = torch.ops.speed.matvec(x, w, None, None, 0)
    assert torch.equal(old.matvec(x, w, None, None, 0), want) and old is not torch.ops.speed
    assert torch.ops.speed.matvec.default.name() == "speed::matvec" and old.matvec.default.name() == "speed_old::matvec"
    empty = tmp_path / "empty.cpp"
    empty.write_text("int nothing;\n")
    with pytest.raises(ValueError, match="defines no"):
        batch_decode.old_kernels(str(empty))


@pytest.mark.parametrize("N, K", [(37, 96), (8, 64), (6, 160), (5, 40), (3, 17), (5, 576)])  # rows past blocks of 4; K past 16, 32
# and 128 (VNNI chunks); 576: SmolLM2's rows, 4.5 chunks and 18 groups (minimums 16 at a time)
@pytest.mark.parametrize("threads", [1, 2])
def test_matvec_is_the_product_by_the_definition(N, K, threads, set_threads):
    """Every weight kind against float64 products with the weight as defined: float weights to fp32 summation
    (results in x's dtype: within its rounding), int8 and 4-bit within the bound of rounding x to int16
    (quantization_bound), 4-bit with groups of one to three blocks and scales of each dtype; two threads give
    the very numbers of one (rows are split, never a sum)."""
    set_threads(threads)  # what the kernels read (at::get_num_threads)
    g = torch.Generator().manual_seed(N * K)
    w, x = torch.randn(N, K, generator=g) / 8, torch.randn(1, K, generator=g)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        want = x.double() @ w.to(dtype).double().t()
        torch.testing.assert_close(speed.matvec(x, w.to(dtype)).double(), want, rtol=1e-6, atol=1e-6)
        got = speed.matvec(x.to(dtype), w.to(dtype))  # x in half precision: the fp32 sums rounded to it
        assert got.dtype == dtype and got.shape == (1, N)
        want = (x.to(dtype).double() @ w.to(dtype).double().t()).float()
        torch.testing.assert_close(got.float(), want, rtol=2 ** -8 if dtype == torch.bfloat16 else 2 ** -11, atol=1e-6)
    q8 = Int8Linear(w.bfloat16())
    got = speed.matvec(x, q8.weight, q8.scales).double()
    assert ((got - x.double() @ q8.dequantize().double().t()).abs() <= quantization_bound(x, q8.dequantize())).all() \
        if K % 32 == 0 else torch.allclose(got, x.double() @ q8.dequantize().double().t(), rtol=1e-6, atol=1e-6)
    for group, dtype in [(32, torch.bfloat16), (32, torch.float16), (32, torch.float32), (64, torch.bfloat16),
                         (96, torch.float16)]:
        if K % group == 0:
            q4 = Int4Linear(w.to(dtype), group)  # scales and minimums in the weight's dtype
            got, want = speed.matvec(x, q4.codes, q4.scales, q4.minimums, group).double(), x.double() @ q4.dequantize().double().t()
            assert ((got - want).abs() <= quantization_bound(x, q4.dequantize())).all(), (group, dtype)
    set_threads(1)
    one = speed.matvec(x, w.bfloat16())
    set_threads(threads)
    assert torch.equal(speed.matvec(x, w.bfloat16()), one)


def test_matvec_refuses_a_weight_it_cannot_read():
    x = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="rows of 64 against a weight of"):
        speed.matvec(torch.randn(2, 64), torch.randn(8, 32))
    with pytest.raises(RuntimeError, match="2 rows against int8 or 4-bit codes; it takes one"):
        speed.matvec(torch.randn(2, 64), torch.zeros(8, 64, dtype=torch.int8), torch.ones(8))
    with pytest.raises(RuntimeError, match="need their scales"):
        speed.matvec(x, torch.zeros(8, 64, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="group size dividing 64"):
        speed.matvec(x, torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 2), torch.zeros(8, 2), 48)
    with pytest.raises(RuntimeError, match="must be 16 floats of one dtype"):  # 8 rows x 2 groups of 32
        speed.matvec(x, torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 2), torch.zeros(8, 1), 32)
    with pytest.raises(RuntimeError, match="must be 8 floats of one dtype"):
        speed.matvec(x, torch.zeros(8, 64, dtype=torch.int8), torch.ones(8, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="x is Double"):
        speed.matvec(x.double(), torch.zeros(8, 64))


def test_kernels_meta_shapes_are_what_they_compute():
    """The compiled step trusts each op's Meta kernel for its result's size and strides (compile_decode_step turns
    inductor's size asserts off): torch.library.opcheck runs each op on real and on fake tensors and compares."""
    assert speed.kernel_built()
    x, xs = torch.randn(1, 1, 64, dtype=torch.bfloat16), torch.randn(3, 1, 64, dtype=torch.bfloat16)
    codes, scales = torch.randint(0, 256, (8, 32), dtype=torch.uint8), torch.rand(8, 2, dtype=torch.bfloat16)
    q, k = torch.randn(2, 6, 1, 16), torch.randn(2, 2, 9, 16)
    for op, args in [(torch.ops.speed.matvec.default, (x, codes, scales, scales, 32)),  # 4-bit
                     (torch.ops.speed.matvec.default, (x, torch.randint(-9, 9, (8, 64), dtype=torch.int8), scales[:, 0], None, 0)),
                     (torch.ops.speed.matvec.default, (xs, torch.randn(8, 64, dtype=torch.bfloat16), None, None, 0)),
                     (torch.ops.speed.decode_attention.default, (q, k, k, torch.ones(2, 9, dtype=torch.bool))),
                     (torch.ops.speed.greedy_pick.default, (torch.randn(3, 40),))] + (
                    [(torch.ops.speed.matvec_blocked.default, (xs, torch.randn(2, 32, 16, 2, dtype=torch.bfloat16)))]
                    if torch.ops.speed.multiplies_bf16() else []) + (  # bf16 weights in blocks: where the CPU multiplies bf16
                    [(torch.ops.speed.matvec_blocked_int8.default, (xs, torch.zeros(1, 32, 16, 2, dtype=torch.int8), torch.rand(16))),
                     (torch.ops.speed.matvec_blocked_q4.default, (xs, torch.zeros(1, 2, 32 * 8 + 128, dtype=torch.uint8),
                                                                  32, 0))]
                    if torch.ops.speed.multiplies_int8_blocks() else []) + (
                    [(torch.ops.speed.decode_layers.default, decode_layers_args(head)) for head in (True, False)]
                    if multiplies_layers() else []):  # its schema says it writes the caches: test_schema checks
        results = torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
        assert set(results.values()) == {"SUCCESS"}, results


def decode_layers_args(head=True):
    """speed::decode_layers' arguments for one_call_tiny's 4-bit model at position 3 (its head in the op, or not)"""
    model = one_call_tiny("int4", torch.float32)
    c, cache = model.config, model.new_cache(1, 64)
    weights, head_weights, group = speed.layer_weights(model)
    none = torch.empty(0)  # a layer's cache where it computes no keys (or values)
    caches = [t for i in range(4) for t in (cache.k.get(i, none), cache.v.get(i, none))]
    return (torch.randn(1, 1, 64), weights, caches, list(c.kv_source), list(c.attn_source), model.rope_cos[3],
            model.rope_sin[3], 3, 4, 2, 1e-5, group, head_weights if head else [])


# -----------------------------------------------------------------------------
# the greedy pick (speed_kernels.cpp's greedy_pick)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threads", [1, 2])
def test_greedy_pick_is_torch_max(dtype, threads, set_threads):
    """speed.greedy_pick (model.sample_token at temperature 0) gives torch.max's indices: the first of equal
    largest values (across and within the 16-wide lanes, -0.0 equal to 0.0), a row all -inf at 0, the first NaN where
    there is one, vocabularies of 1 to past a multiple of 16, one row and many; the op refuses other shapes in one
    line."""
    set_threads(threads)
    g = torch.Generator().manual_seed(7)
    for V in (1, 15, 16, 17, 100, 49152 + 5):
        rows = torch.randn(9, V, generator=g).to(dtype)
        rows[1] = rows[1].abs().neg()  # all <= 0: with a 0 at the end and a -0.0 before it, equal
        rows[1, -1], rows[1, V // 2] = 0.0, -0.0
        rows[2] = float("-inf")
        rows[3, V // 3], rows[3, V - 1] = 100.0, 100.0  # two equal largest: the first
        rows[4, V - 1] = float("nan")
        rows[5, V // 2], rows[5, V // 4] = float("nan"), float("nan")  # the first NaN
        rows[6] = 3.0  # all equal: 0
        rows[7, min(5, V - 1)], rows[7, min(16, V - 1)] = 50.0, 50.0  # lane 5, then lane 0 of the next 16: the first
        for picked in (rows, rows[:1], rows[1:2]):
            assert torch.equal(speed.greedy_pick(picked), picked.max(dim=-1).indices), (V, picked)
    if speed.kernel_built():
        for logits in (torch.randn(4), torch.randn(2, 0), torch.zeros(2, 3, dtype=torch.int64)):
            with pytest.raises(RuntimeError, match="speed::greedy_pick: logits .* it takes .rows, vocabulary. of fp32"):
                torch.ops.speed.greedy_pick(logits)


# -----------------------------------------------------------------------------
# attention of one new position over the cache (speed_kernels.cpp)


def attention_by_the_definition(q, k, v, mask):
    """float64 softmax(q k^T / sqrt(d)) v over the positions mask allows, a row and a head at a time."""
    B, H, _, D = q.shape
    out = torch.zeros(B, H, 1, D, dtype=torch.float64)
    for b in range(B):
        allowed = mask[0 if mask.shape[0] == 1 else b]
        for h in range(H):
            j = h // (H // k.shape[1])
            scores = k[b, j, allowed].double() @ q[b, h, 0].double() / D ** 0.5
            out[b, h, 0] = torch.softmax(scores, 0) @ v[b, j, allowed].double()
    return out


@pytest.mark.parametrize("H, Hkv, D", [(9, 3, 64), (5, 1, 128), (4, 4, 24), (6, 2, 17)])  # groups of 3, 5 (past
# the kernel's 4 queries a key load), 1; head sizes of one and two 64-column blocks, of 8s, and neither
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_attention_kernel_is_the_softmax_by_the_definition(H, Hkv, D, threads, set_threads):
    """speed.decode_attention on a CPU runs the kernel: against float64 explicit softmax, for each float dtype (bf16
    scores by vdpbf16ps where the CPU has AVX-512 BF16), a mask shared by all rows and one per row; what the cache
    holds at positions the mask leaves out (a large value, NaN) changes nothing; two threads give the very numbers of
    one; torch's-ops path agrees."""
    set_threads(threads)
    g = torch.Generator().manual_seed(H * D)
    B, S = 3, 21
    assert speed.attention_kernel_applies(torch.zeros(1), torch.zeros(1), torch.zeros(1))  # the kernel built here
    q, k, v = torch.randn(B, H, 1, D, generator=g), torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    shared = (torch.arange(S) <= 13).view(1, S)
    per_row = torch.rand(B, S, generator=g) < 0.6
    per_row[:, 0] = True
    for mask in (shared, per_row):
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2 ** -7), (torch.float16, 2 ** -10)):
            qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
            want = attention_by_the_definition(qd, kd, vd, mask)
            with torch.no_grad():
                got = speed.decode_attention(qd, kd, vd, mask)
            assert got.dtype == dtype and got.shape == (B, H, 1, D)
            torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
            for fill in (1e4, float("nan")):  # a large score must not count as the largest; NaN must not spread
                garbage = torch.where(mask[..., None].expand(B, S, D)[:, None], kd, torch.full_like(kd, fill))
                vgarbage = torch.where(mask[..., None].expand(B, S, D)[:, None], vd, torch.full_like(vd, -fill))
                with torch.no_grad():
                    assert torch.equal(speed.decode_attention(qd, garbage, vgarbage, mask), got)
        torch.testing.assert_close(speed.decode_attention_by_ops(q, k, v, mask).double(),
                                   attention_by_the_definition(q, k, v, mask), rtol=1e-5, atol=1e-5)
    set_threads(1)
    one = speed.decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), per_row)
    set_threads(threads)
    assert torch.equal(speed.decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), per_row), one)


def test_decode_attention_kernel_refuses_what_it_cannot_read():
    assert speed.kernel_library() is not None
    q, k = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 8, 16)
    mask = torch.ones(1, 8, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="q .* against k and v"):
        torch.ops.speed.decode_attention(torch.randn(2, 3, 1, 16), k, k, mask)  # 3 query heads over 2 K/V heads
    with pytest.raises(RuntimeError, match="must share one dtype of fp32, bf16 or fp16"):
        torch.ops.speed.decode_attention(q, k.bfloat16(), k, mask)
    with pytest.raises(RuntimeError, match="must be bool"):
        torch.ops.speed.decode_attention(q, k, k, torch.ones(3, 8, dtype=torch.bool))


def test_without_a_compiler_decoding_warns_once_and_falls_back(tmp_path):
    """A machine with no C++ compiler: one warning line naming the compiler and what to do, then the same
    products through inductor's loop / F.linear (its own process: this one has the kernel loaded)."""
    import subprocess
    import sys
    code = ("import warnings, torch, speed\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    lin = speed.StreamingLinear(64, 16, bias=False).to(torch.bfloat16)\n"
            "    x = torch.randn(1, 64).to(torch.bfloat16)\n"
            "    with torch.no_grad(): y = lin(x); lin(x)\n"
            "print(speed.kernel_library() is None, torch.equal(y, torch.nn.functional.linear(x, lin.weight)), len(caught))\n"
            "print(caught[0].message)\n")
    env = {**os.environ, "CXX": "no-such-compiler", "XDG_CACHE_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    first, message = out.stdout.splitlines()[:2]
    assert first == "True True 1"
    assert "did not build with no-such-compiler" in message and "set CXX" in message and "\n" not in message


@pytest.mark.parametrize("kind", list(QUANTIZED))
def test_compiled_quantized_batch_1_step_calls_matvec_and_gives_eager_tokens(kind):
    """A quantized model decoding one sequence: its compiled step calls speed.matvec for every product, with no
    float matmul or torch int kernel, and gives the eager quantized tokens (fp32 activations: in bf16 inductor's
    other ops round differently from eager ones, and a random model has close calls)."""
    from torch._inductor.utils import run_and_get_code
    quantized = QUANTIZED[kind][0](tiny("upper:half", seed=4))
    prompt = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        eager = greedy(quantized, prompt, 16)
        step = speed.compile_decode_step(quantized)
        compiled, code = run_and_get_code(greedy, quantized, prompt, 16, step)
    assert torch.equal(compiled, eager)
    code = "\n".join(code)
    products = sum(isinstance(m, (Int8Linear, Int4Linear)) for m in quantized.modules())
    assert op_calls(code, "speed::matvec") == products
    assert "pack_mm" not in code and blas_calls(code) == []


# -----------------------------------------------------------------------------
# batched decoding: a few rows of half-precision weights through speed.matvec


@pytest.mark.parametrize("M", [2, 5, 7, 12, 13, 16, 29])  # blocks of 6 (AVX2) and 12 (bf16 products), remainders
@pytest.mark.parametrize("N, K", [(37, 96), (5, 40), (3, 17)])  # K past 8, 16 and 32
@pytest.mark.parametrize("threads", [1, 2])
def test_matvec_of_several_rows_is_the_product_by_the_definition(M, N, K, threads, set_threads):
    """Several rows of x against float weights, every row against float64 products: fp32 x (the fp32 loop, for
    any weight kind) to fp32 summation; bf16 or fp16 x within the final rounding to its dtype (bf16 x against
    bf16 weights is the CPU's bf16 product where it has one: exact products, fp32 sums). Two threads give the
    very numbers of one."""
    set_threads(threads)
    g = torch.Generator().manual_seed(M * N * K)
    w, x = torch.randn(N, K, generator=g) / 8, torch.randn(M, K, generator=g)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        want = x.double() @ w.to(dtype).double().t()
        torch.testing.assert_close(speed.matvec(x, w.to(dtype)).double(), want, rtol=1e-6, atol=1e-6)
        got = speed.matvec(x.to(dtype).view(M, 1, K), w.to(dtype))
        assert got.dtype == dtype and got.shape == (M, 1, N)
        want = x.to(dtype).double() @ w.to(dtype).double().t()
        rel = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11  # half an ulp of the result, and fp32 sums
        assert ((got.view(M, N).double() - want).abs() <= want.abs() * rel + 1e-6).all(), dtype
    set_threads(1)
    one = speed.matvec(x.bfloat16(), w.bfloat16())
    set_threads(threads)
    assert torch.equal(speed.matvec(x.bfloat16(), w.bfloat16()), one)


@pytest.mark.parametrize("M", [2, 16, 17, 64, 65, 70])  # x tiles of 16 rows: one, part of a second, four (one
@pytest.mark.parametrize("N, K", [(48, 32), (37, 576)])  # pass over the weight), five and more (a second pass)
@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_rows_by_amx_tiles_are_the_product_by_the_definition(M, N, K, threads, set_threads):
    """bf16 rows against bf16 weights with K a multiple of 32, as a CPU with AMX multiplies them in tiles (16 weight
    rows by 32 columns against 16 rows of x; outputs past the last full tile by the vector loop): every row against
    float64 products within the rounding to bf16 and fp32 sums; two threads give the very numbers of one. Where the
    CPU lists amx_bf16 the build must multiply tiles; elsewhere the same shapes check the vector loop."""
    if "amx_bf16" in speed.cpu_flags().split():
        assert speed.kernel_multiplies_tiles()
    g = torch.Generator().manual_seed(M * N + K)
    w, x = torch.randn(N, K, generator=g).bfloat16(), torch.randn(M, K, generator=g).bfloat16()
    set_threads(threads)
    got = speed.matvec(x, w).double()
    want = x.double() @ w.double().t()
    fp32_sums = K * 2 ** -24 * (x.double().abs() @ w.double().abs().t())
    assert ((got - want).abs() <= want.abs() * 2 ** -8 + fp32_sums).all()
    set_threads(1)
    assert torch.equal(speed.matvec(x, w).double(), got)


def test_streaming_linear_takes_an_empty_batch():
    """No rows: the kernel (which takes at least one) is not called; F.linear's empty result comes back."""
    lin = speed.StreamingLinear(64, 16, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        assert lin(torch.randn(0, 1, 64).to(torch.bfloat16)).shape == (0, 1, 16)


def batched_greedy(model, prompt, n, step):
    """(greedy tokens (B, n), their logits (B, n, vocab)) of every row of prompt (B, T) through `step`."""
    cache = model.new_cache(prompt.shape[0], model.config.block_size)
    logits, tokens, seen = model.prefill(prompt, cache).float(), [], []
    for pos in range(prompt.shape[1], prompt.shape[1] + n):
        tokens.append(logits.argmax(-1))
        seen.append(logits)
        logits = step(tokens[-1].view(-1, 1), torch.tensor([pos]), cache).float()
    return torch.stack(tokens, 1), torch.stack(seen, 1)


def spread_tiny(dtype, **changes):
    """The tiny shared model in dtype (config changes: tiny's), its weights x8: GPT-2's 0.02 init gives
    near-uniform logits, and greedy picks among them are not clear."""
    plain = tiny("0,0,2,3", "0,1,2,2", seed=9, **changes).to(dtype)
    with torch.no_grad():
        for p in plain.parameters():
            p.mul_(8 if p.dim() == 2 else 1)
    return plain


def greedy_rows(model, prompt, step, compiled):
    """batched_greedy through step; compiled, the graph must call the kernel and no BLAS product."""
    from torch._inductor.utils import run_and_get_code
    if not compiled:
        return batched_greedy(model, prompt, 12, step)
    result, code = run_and_get_code(batched_greedy, model, prompt, 12, step)
    code = "\n".join(code)
    assert op_calls(code, "speed::matvec") > 0 and blas_calls(code) == []
    return result


def same_until_a_close_call(tokens, ref_tokens, ref_logits, err):
    """Each row's tokens equal the reference's up to its first choice that a logit error of err could flip;
    returns how many steps were compared."""
    top2 = ref_logits.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * err
    compared = 0
    for b in range(tokens.shape[0]):
        n = int((~clear[b]).nonzero()[0]) if (~clear[b]).any() else tokens.shape[1]
        assert torch.equal(tokens[b, :n], ref_tokens[b, :n])
        compared += n
    return compared


@pytest.mark.parametrize("compiled", [False, True])
def test_batched_bf16_decode_gives_batch_one_tokens_through_the_kernel(compiled, monkeypatch):
    """16 rows decoded together (bf16, speed.matvec's rows for every projection and the head) give each row's
    batch-1 greedy tokens wherever batch 1's choice is clear, eager and compiled; the compiled graph calls
    the kernel and no BLAS product on the weights; logits within a stated bound of the plain model's. The kernel's
    16-row path (on a CPU with AVX-512 BF16, its rows across the vector lanes; with AMX, tiles)."""
    plain = spread_tiny(torch.bfloat16)
    model = speed.use_decode_paths(copy.deepcopy(plain))
    prompt = torch.randint(0, 97, (16, 6), generator=torch.Generator().manual_seed(3))
    step = speed.compile_decode_step(model) if compiled else model.decode_step
    with torch.no_grad():
        ones = [batched_greedy(model, prompt[b:b + 1], 12, step) for b in range(16)]
        batched, logits = greedy_rows(model, prompt, step, compiled)
        plain_tokens, plain_logits = batched_greedy(plain, prompt, 12, plain.decode_step)
    ones_tokens, ones_logits = torch.cat([t for t, _ in ones]), torch.cat([lg for _, lg in ones])
    assert torch.equal(batched[:, :1], plain_tokens[:, :1]) and torch.equal(batched[:, :1], ones_tokens[:, :1])
    # the first decode step, same inputs on every path: bf16 rounds after every product, in another order
    # on each path; stated bound 2% of the logits' spread
    bound = 0.02 * (plain_logits.max() - plain_logits.min())
    err = (logits[:, 1] - ones_logits[:, 1]).abs().max()
    assert err <= bound and (logits[:, 1] - plain_logits[:, 1]).abs().max() <= bound
    # the check covered a good share of the steps (bf16 logits are coarse)
    assert same_until_a_close_call(batched, ones_tokens, ones_logits, err) >= 0.25 * 16 * 12


# -----------------------------------------------------------------------------
# bf16 weights in blocks of 16 rows (speed.BlockedLinear, speed_kernels.cpp's matvec_blocked)


def multiplies_bf16():
    return speed.kernel_built() and torch.ops.speed.multiplies_bf16()


def test_blocked_linear_lays_out_the_weight_by_the_definition():
    """blocks[b, p, r] holds (W[16b + r, 2p], W[16b + r, 2p + 1]); weight_rows() gives W back, and with gradients
    wanted (no kernel) the module computes F.linear of W to the bit."""
    w = torch.randn(48, 18, generator=torch.Generator().manual_seed(1)).bfloat16()
    lin = speed.BlockedLinear(w)
    assert lin.blocks.shape == (3, 9, 16, 2)
    for b, p, r in [(0, 0, 0), (1, 4, 7), (2, 8, 15), (0, 8, 3)]:
        assert torch.equal(lin.blocks[b, p, r], w[16 * b + r, 2 * p:2 * p + 2])
    assert torch.equal(lin.weight_rows(), w)
    x = torch.randn(3, 18).bfloat16()
    assert torch.equal(lin(x), F.linear(x, w))
    with torch.no_grad():  # no rows: the kernel (which takes at least one) is not called
        assert lin(torch.randn(0, 1, 18).bfloat16()).shape == (0, 1, 48)


@pytest.mark.parametrize("M", [1, 2, 16, 17, 40, 70])  # one row (four sums), a few, one chunk (or tile) of 16, past
@pytest.mark.parametrize("N, K", [(48, 18), (32, 576), (16, 34)])  # it, three, five (AMX: a second pass); pairs past
@pytest.mark.parametrize("threads", [1, 2])  # 4s (one row's loop); SmolLM2's width (a multiple of 32: AMX's tiles)
def test_matvec_blocked_is_the_product_by_the_definition(M, N, K, threads, set_threads):
    """bf16 rows against a blocked bf16 weight: every row against float64 products within the rounding to bf16 and
    fp32 sums; two threads give the very numbers of one. With AMX, rows of K a multiple of 32 are multiplied by
    tiles (tile_blocks_bf16). Where the kernel has no bf16 loops (no AVX-512 BF16), the op refuses in one line and
    block_weights leaves every weight row-major."""
    g = torch.Generator().manual_seed(M * N + K)
    w, x = torch.randn(N, K, generator=g).bfloat16(), torch.randn(M, 1, K, generator=g).bfloat16()
    blocks = speed.BlockedLinear(w).blocks
    if not multiplies_bf16():
        with pytest.raises(RuntimeError, match="no AVX-512 BF16 loops"):
            torch.ops.speed.matvec_blocked(x, blocks)
        assert not speed.blocks_apply()
        return
    set_threads(threads)
    got = torch.ops.speed.matvec_blocked(x, blocks)
    assert got.dtype == torch.bfloat16 and got.shape == (M, 1, N)
    want = x.view(M, K).double() @ w.double().t()
    fp32_sums = K * 2 ** -24 * (x.view(M, K).double().abs() @ w.double().abs().t())
    assert ((got.view(M, N).double() - want).abs() <= want.abs() * 2 ** -8 + fp32_sums).all()
    set_threads(1)
    assert torch.equal(torch.ops.speed.matvec_blocked(x, blocks), got)


def decodes_as_rows(rows, blocked, compiled, op, calls):
    """16 rows and one row decoded by `blocked` give the row-major model's greedy tokens wherever its choice is clear,
    eager or compiled (the graph then calls `op` `calls` times and no BLAS product); the prefill's and the first
    step's logits within 2% of their spread, in the rows (at least 3 in 4) whose first pick agrees."""
    prompt = torch.randint(0, 97, (16, 6), generator=torch.Generator().manual_seed(3))
    from torch._inductor.utils import run_and_get_code
    for batch in (prompt, prompt[:1]):
        with torch.no_grad():
            want, want_logits = batched_greedy(rows, batch, 12, rows.decode_step)
            if compiled:
                step = speed.compile_decode_step(blocked, one_call=False)  # the graph, whose code is checked
                (got, logits), code = run_and_get_code(batched_greedy, blocked, batch, 12, step)
                code = "\n".join(code)
                assert blas_calls(code) == [] and op_calls(code, op) == calls
            else:
                got, logits = batched_greedy(blocked, batch, 12, blocked.decode_step)
        started_alike = got[:, 0] == want[:, 0]  # a first pick that flipped on a close call feeds the step another token
        assert started_alike.float().mean() >= 0.75
        err = (logits[started_alike, :2] - want_logits[started_alike, :2]).abs().max()
        assert err <= 0.02 * (want_logits.max() - want_logits.min())
        assert same_until_a_close_call(got, want, want_logits, err) >= 0.25 * batch.shape[0] * 12


@pytest.mark.parametrize("compiled", [False, True])
def test_blocked_weights_give_the_row_major_tokens_and_leave_a_tied_head(compiled):
    """block_weights on a bf16 model with its head tied to the embedding: every projection becomes a BlockedLinear
    (where blocks_apply; elsewhere none does), the head stays the embedding's own Parameter. 16 rows and one row
    decoded give the row-major model's greedy tokens wherever its choice is clear, eager and compiled (the graph
    calls matvec_blocked and no BLAS product); the first step's logits within 2% of their spread."""
    rows = speed.fuse_projections(speed.use_decode_paths(spread_tiny(torch.bfloat16, tie_embeddings=True)))
    blocked = speed.block_weights(copy.deepcopy(rows))
    kinds = {type(m).__name__ for layer in blocked.layers for m in layer.modules() if hasattr(m, "in_features")}
    assert kinds == ({"BlockedLinear"} if speed.blocks_apply() else {"StreamingLinear"})
    assert type(blocked.lm_head) is speed.StreamingLinear and blocked.lm_head.weight is blocked.embed_tokens.weight
    decodes_as_rows(rows, blocked, compiled, "speed::matvec_blocked", 16 if speed.blocks_apply() else 0)  # all but the head


@pytest.mark.parametrize("compiled", [False, True])
def test_block_weights_tied_too_lays_out_a_copy_of_the_tied_head(compiled):
    """block_weights(tied_too=True) on a bf16 model whose head is tied to the embedding (112 rows: 7 blocks): the head
    becomes a BlockedLinear of a copy of the embedding's weight (where blocks_apply; elsewhere it stays), the
    embedding keeps its own Parameter; decoded, the row-major model's greedy tokens, the graph calling matvec_blocked
    for the head too."""
    rows = speed.fuse_projections(speed.use_decode_paths(spread_tiny(torch.bfloat16, tie_embeddings=True,
                                                                     vocab_size=112)))
    blocked = speed.block_weights(copy.deepcopy(rows), tied_too=True)
    embedding = blocked.embed_tokens.weight
    if speed.blocks_apply():
        assert type(blocked.lm_head) is speed.BlockedLinear and torch.equal(blocked.lm_head.weight_rows(), embedding)
        assert blocked.lm_head.blocks.data_ptr() != embedding.data_ptr()
    else:
        assert blocked.lm_head.weight is embedding
    decodes_as_rows(rows, blocked, compiled, "speed::matvec_blocked", 17 if speed.blocks_apply() else 0)


# int8 codes in blocks of 16 rows (speed.BlockedLinear of a quantize.Int8Linear, speed_kernels.cpp's matvec_blocked_int8)


def multiplies_int8_blocks():
    return speed.kernel_built() and torch.ops.speed.multiplies_int8_blocks()


def rows_agree(got, x, dtype, w, row_major, atol):
    """Each row of a blocked integer op's result got (M, 1, N) for x (M, 1, K) in dtype: within the bound of rounding
    x to int16 in blocks of 32 (bf16 results also within their own rounding) of the float64 product with the
    dequantised weight w, and equal to the row-major kernel's, row_major(x's row), to fp32 summation order."""
    assert got.dtype == dtype and got.shape == (x.shape[0], 1, w.shape[0])
    for m in range(x.shape[0]):
        xm = x[m].to(dtype).float()
        want = xm.double() @ w.double().t()
        rounding = want.abs() * 2 ** -8 if dtype == torch.bfloat16 else 0
        assert ((got[m].double() - want).abs() <= quantization_bound(xm, w) + rounding).all()
        rtol = 2 ** -7 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(got[m].float(), row_major(x[m].to(dtype)).float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("M", [1, 3, 8, 9, 20])  # one row (four sums), a few, one group of 8, past it, three groups
@pytest.mark.parametrize("N, K", [(48, 64), (32, 576), (16, 96)])  # two, eighteen and three blocks of 32 columns
@pytest.mark.parametrize("threads", [1, 2])
def test_matvec_blocked_int8_is_the_row_major_product(M, N, K, threads, set_threads):
    """int8 codes in blocks, one scale a row: the layout by the definition; with gradients wanted the dequantised
    product; by the kernel every row of x, fp32 or bf16, against float64 products with the dequantised weight
    within the bound of rounding x to int16 in blocks of 32 (quantization_bound; bf16 results also within their
    own rounding), and equal to the row-major kernel's
    (speed.matvec, the same rounding of x) to fp32 summation order; two threads give the very numbers of one.
    Where the kernel has no VNNI loops the op refuses in one line and block_weights leaves int8 weights row-major."""
    g = torch.Generator().manual_seed(M * N + K)
    q8 = Int8Linear((torch.randn(N, K, generator=g) / 8).bfloat16())
    lin = speed.BlockedLinear(q8.weight, q8.scales)
    assert lin.blocks.dtype == torch.int8 and lin.blocks.shape == (N // 16, K // 2, 16, 2)
    assert torch.equal(lin.blocks[N // 16 - 1, K // 2 - 1, 15], q8.weight[N - 1, K - 2:])
    assert torch.equal(lin.weight_rows(), q8.weight) and lin.read_bytes() == q8.read_bytes()
    x = torch.randn(M, 1, K, generator=g)
    wanting_gradients = x.clone().requires_grad_()  # no kernel: the dequantised product, on any machine
    torch.testing.assert_close(lin(wanting_gradients), F.linear(wanting_gradients, q8.dequantize()), rtol=1e-5, atol=1e-5)
    if not multiplies_int8_blocks():
        with pytest.raises(RuntimeError, match="no AVX-512 VNNI loops"):
            torch.ops.speed.matvec_blocked_int8(x, lin.blocks, lin.scales)
        assert not speed.blocks_apply(torch.int8)
        return
    set_threads(threads)
    for dtype in (torch.float32, torch.bfloat16):
        got = torch.ops.speed.matvec_blocked_int8(x.to(dtype), lin.blocks, lin.scales)
        rows_agree(got, x, dtype, q8.dequantize(), lambda xm: speed.matvec(xm, q8.weight, q8.scales), atol=1e-6)
        set_threads(1)
        assert torch.equal(torch.ops.speed.matvec_blocked_int8(x.to(dtype), lin.blocks, lin.scales), got)
        set_threads(threads)


def test_blocked_loops_prefetch_their_stream_on_intel_only():
    """The loops over weights in blocks (int8, 4-bit, bf16) prefetch the weight's stream ahead on Intel's cores, where
    it made a SmolLM2 int8 or 4-bit step 1.4x as fast, and not on AMD's, where prefetching made the products slower
    (speed_kernels.cpp, prefetch_stream); without the loops there is nothing to prefetch."""
    with open("/proc/cpuinfo") as f:
        vendor = next((line.split(":")[1].strip() for line in f if line.startswith("vendor_id")), "")
    prefetches = speed.kernel_built() and torch.ops.speed.prefetches_blocks()
    assert prefetches == (multiplies_int8_blocks() and vendor == "GenuineIntel")


def test_matvec_blocked_int8_refuses_what_it_cannot_read():
    """One line each, naming what is wrong (without VNNI loops every call is refused, saying so)."""
    built = multiplies_int8_blocks()
    blocks, x = torch.zeros(2, 32, 16, 2, dtype=torch.int8), torch.randn(1, 64)
    for args, message in [((x, blocks, torch.ones(31)), "need 32 float scales"),
                          ((x.double(), blocks, torch.ones(32)), "x is Double"),
                          ((torch.randn(1, 48), blocks, torch.ones(32)), "rows of 48 against blocks of"),
                          ((x, blocks.bfloat16(), torch.ones(32)), "blocks are BFloat16; it takes int8 codes"),
                          ((torch.randn(1, 48), torch.zeros(2, 24, 16, 2, dtype=torch.int8), torch.ones(32)),
                           "rows of a multiple of 32")]:
        with pytest.raises(RuntimeError, match=message if built else "no AVX-512 VNNI loops"):
            torch.ops.speed.matvec_blocked_int8(*args)


def test_blocks_made_elsewhere_fall_back_where_the_loops_are_missing(monkeypatch):
    """A BlockedLinear (bf16, int8 or 4-bit) on a machine whose kernel lacks its loops computes the plain product instead
    of calling an op that would refuse."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpsCalled(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(speed, "blocked_loops_built", lambda dtype: False)
    w, x = torch.randn(32, 64).bfloat16(), torch.randn(2, 64).bfloat16()
    q8, xf = Int8Linear(w), x.float()  # fp32 x: the two orders of scaling round alike
    with torch.no_grad(), OpsCalled() as ops:
        assert torch.equal(speed.BlockedLinear(w)(x), F.linear(x, w))
        torch.testing.assert_close(speed.BlockedLinear(q8.weight, q8.scales)(xf), F.linear(xf, q8.dequantize()),
                                   rtol=1e-5, atol=1e-5)
        q4 = Int4Linear(w)
        torch.testing.assert_close(speed.BlockedLinear(q4.unpacked_codes(), q4.scales, q4.minimums, 32)(xf),
                                   F.linear(xf, q4.dequantize()), rtol=1e-5, atol=1e-5)
    assert ops.names and not [name for name in ops.names if name.startswith("speed.")]
    monkeypatch.setattr(speed, "blocked_loops_built", lambda dtype: dtype == torch.bfloat16)  # bf16 loops alone
    with torch.no_grad():  # a 4-bit layer (uint8 blocks, no scales of its own) is not taken for a bf16 one
        torch.testing.assert_close(speed.BlockedLinear(q4.unpacked_codes(), q4.scales, q4.minimums, 32)(x),
                                   F.linear(x, q4.dequantize().to(x.dtype)), rtol=2 ** -7, atol=2 ** -7)


def test_block_weights_leaves_the_int8_layers_it_cannot_serve(monkeypatch):
    """Only quantize.Int8Linear of an fp32 or bf16 model is laid out: an fp16 one stays (the op takes fp32 or bf16 x),
    as does lora.py's FrozenInt8Linear (a LoRA layer reads its base's .weight), whatever the CPU."""
    from lora import FrozenInt8Linear
    monkeypatch.setattr(speed, "blocks_apply", lambda dtype=None: True)
    w = torch.randn(32, 64).bfloat16()
    holder = torch.nn.Sequential(Int8Linear(w), Int8Linear(w.half()), FrozenInt8Linear(w), Int8Linear(w[:, :48]))
    speed.block_weights(holder)
    assert [type(m).__name__ for m in holder] == ["BlockedLinear", "Int8Linear", "FrozenInt8Linear", "Int8Linear"]


@pytest.mark.parametrize("compiled", [False, True])
def test_blocked_int8_weights_give_the_row_major_int8_tokens(compiled):
    """An int8 model (quantize_int8, then the decode paths and joined projections, as sample.py makes it), then
    block_weights: every int8 product whose rows split into 16s becomes a BlockedLinear where blocks_apply(int8)
    (elsewhere none does), the head of 97 rows stays row-major. One row and 16 rows decoded give the row-major int8
    model's greedy tokens wherever its choice is clear, eager and compiled (the graph calls matvec_blocked_int8
    for each blocked product and no BLAS product); the first step's logits within 2% of their spread."""
    rows = speed.fuse_projections(speed.use_decode_paths(quantize_int8(spread_tiny(torch.bfloat16))))
    splits = sum(isinstance(m, Int8Linear) and m.weight.shape[0] % 16 == 0 for m in rows.modules())
    blocked = speed.block_weights(copy.deepcopy(rows))
    n_blocked = sum(isinstance(m, speed.BlockedLinear) for m in blocked.modules())
    assert splits > 0 and n_blocked == (splits if speed.blocks_apply(torch.int8) else 0)
    assert type(blocked.lm_head) is Int8Linear
    decodes_as_rows(rows, blocked, compiled, "speed::matvec_blocked_int8", n_blocked)


# 4-bit codes in blocks of 16 rows with their scales inline (speed.BlockedLinear of a quantize.Int4Linear,
# speed_kernels.cpp's matvec_blocked_q4)


def blocked_int4(N, K, group, seed, scale_dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    q4 = Int4Linear((torch.randn(N, K, generator=g) / 8).to(scale_dtype), group)
    return q4, speed.BlockedLinear(q4.unpacked_codes(), q4.scales, q4.minimums, group)


def q4_product(x, lin):
    return torch.ops.speed.matvec_blocked_q4(x, lin.blocks, lin.group_size, speed.SCALE_KINDS[lin.scale_dtype])


@pytest.mark.parametrize("M", [1, 3, 4, 6])  # one row, a few, one group of 4, past it
@pytest.mark.parametrize("N, K, group, scale_dtype", [(48, 64, 32, torch.bfloat16), (32, 576, 32, torch.bfloat16),
                                                      (16, 192, 64, torch.float32), (16, 96, 96, torch.float16)])
@pytest.mark.parametrize("threads", [1, 2])
def test_matvec_blocked_q4_is_the_row_major_product(M, N, K, group, scale_dtype, threads, set_threads):
    """4-bit codes in blocks with a scale and a minimum a group inline: the layout by the definition (byte i of a
    row's 4 in lane c of group g holds columns g group + 8c + i and g group + 8c + 4 + i; the group's 16 scales, then
    its 16 minimums, follow its lanes, in their dtype); with gradients wanted the dequantised product; by the kernel
    every row of x, fp32 or bf16, against float64 products with the dequantised weight within the bound of rounding
    x to int16 in blocks of 32 (bf16 results also within their own rounding), and equal to the row-major kernel's
    (speed.matvec, the same rounding of x) to fp32 summation order; two threads give the very numbers of one. Where
    the kernel has no VNNI loops the op refuses in one line and block_weights leaves 4-bit weights row-major."""
    q4, lin = blocked_int4(N, K, group, seed=M * N + K, scale_dtype=scale_dtype)
    q, size = q4.unpacked_codes(), scale_dtype.itemsize
    assert q4.scales.dtype == scale_dtype and lin.scale_dtype == scale_dtype
    assert lin.blocks.dtype == torch.uint8 and lin.blocks.shape == (N // 16, K // group, group * 8 + 32 * size)
    b, g, c, r, i = N // 16 - 1, K // group - 1, group // 8 - 1, 15, 2
    k = g * group + 8 * c
    assert lin.blocks[b, g, 64 * c + 4 * r + i] == q[16 * b + r, k + i] | q[16 * b + r, k + 4 + i] << 4
    inline = lin.blocks[b, g, group * 8:].view(scale_dtype)
    assert inline[r] == q4.scales[16 * b + r, g] and inline[16 + r] == q4.minimums[16 * b + r, g]
    scales, minimums = lin.scales_and_minimums()
    assert torch.equal(scales, q4.scales) and torch.equal(minimums, q4.minimums)
    assert torch.equal(lin.weight_rows(), q) and lin.read_bytes() == q4.read_bytes()
    x = torch.randn(M, 1, K, generator=torch.Generator().manual_seed(M))
    wanting_gradients = x.clone().requires_grad_()  # no kernel: the dequantised product, on any machine
    torch.testing.assert_close(lin(wanting_gradients), F.linear(wanting_gradients, q4.dequantize()), rtol=1e-5, atol=1e-5)
    if not multiplies_int8_blocks():
        with pytest.raises(RuntimeError, match="no AVX-512 VNNI loops"):
            q4_product(x, lin)
        assert not speed.blocks_apply(torch.uint8)
        return
    set_threads(threads)
    for dtype in (torch.float32, torch.bfloat16):
        got = q4_product(x.to(dtype), lin)
        rows_agree(got, x, dtype, q4.dequantize(),
                   lambda xm: speed.matvec(xm, q4.codes, q4.scales, q4.minimums, group), atol=1e-5)
        set_threads(1)
        assert torch.equal(q4_product(x.to(dtype), lin), got)
        set_threads(threads)


def test_matvec_blocked_q4_refuses_what_it_cannot_read():
    """One line each, naming what is wrong (without VNNI loops every call is refused, saying so); BlockedLinear
    refuses 4-bit groups the op cannot take, on any machine."""
    built = multiplies_int8_blocks()
    blocks, x = torch.zeros(2, 2, 32 * 8 + 64, dtype=torch.uint8), torch.randn(1, 64)  # bf16 scales, groups of 32
    for args, message in [((x, blocks, 48, 1), "groups of 48 columns; it takes a multiple of 32"),
                          ((x, blocks, 0, 1), "groups of 0 columns"),
                          ((x, blocks, 32, 3), "scale kind 3; it takes 0 .fp32., 1 .bf16. or 2 .fp16."),
                          ((x, blocks, 32, 0), r"rows of 64 in groups of 32 against blocks of \[2, 2, 320\]"),
                          ((x.double(), blocks, 32, 1), "x is Double"),
                          ((torch.randn(1, 96), blocks, 32, 1), "rows of 96 in groups of 32 against blocks of"),
                          ((x, blocks.to(torch.int8), 32, 1), "blocks are Char; it takes 4-bit codes")]:
        with pytest.raises(RuntimeError, match=message if built else "no AVX-512 VNNI loops"):
            torch.ops.speed.matvec_blocked_q4(*args)
    q4 = Int4Linear(torch.randn(16, 64))
    for group in (0, 48, 128):  # the layer refuses before laying anything out
        with pytest.raises(ValueError, match=f"groups of a multiple of 32 columns dividing 64, not {group}"):
            speed.BlockedLinear(q4.unpacked_codes(), q4.scales, q4.minimums, group)


@pytest.mark.parametrize("compiled", [False, True])
def test_blocked_int4_weights_give_the_row_major_int4_tokens(compiled, monkeypatch):
    """A 4-bit model (quantize_int4: its head int8; then the decode paths and joined projections, as sample.py makes
    it), then block_weights: every 4-bit product whose rows split into 16s becomes a BlockedLinear where
    blocks_apply(uint8) (elsewhere none does); groups of 16 columns stay row-major on any CPU. One row and 16 rows
    decoded give the row-major 4-bit model's greedy tokens wherever its choice is clear, eager and compiled (the
    graph calls matvec_blocked_q4 for each blocked 4-bit product and no BLAS product). In fp32: in bf16 the row-major
    model's 16 rows take torch's int4 kernel, whose bf16 sums put its logits 0.17 (1.7% of their spread) from these,
    too far to call most picks clear."""
    rows = speed.fuse_projections(speed.use_decode_paths(quantize_int4(spread_tiny(torch.float32))))
    splits = sum(isinstance(m, Int4Linear) and m.out_features % 16 == 0 for m in rows.modules())
    blocked = speed.block_weights(copy.deepcopy(rows))
    n_blocked = sum(isinstance(m, speed.BlockedLinear) and m.group_size > 0 for m in blocked.modules())
    assert splits > 0 and n_blocked == (splits if speed.blocks_apply(torch.uint8) else 0)
    decodes_as_rows(rows, blocked, compiled, "speed::matvec_blocked_q4", n_blocked)
    monkeypatch.setattr(speed, "blocks_apply", lambda dtype=None: True)
    small_groups = speed.block_weights(quantize_int4(spread_tiny(torch.bfloat16), group_size=16))
    assert not [m for m in small_groups.modules() if isinstance(m, speed.BlockedLinear) and m.group_size > 0]


@pytest.mark.parametrize("avx512", [False, True])
def test_fp32_rows_take_the_kernel_only_where_blas_has_no_wider_vectors(avx512, monkeypatch):
    """fp32 weights: 2 to stream_rows rows go through speed.matvec on a CPU without AVX-512 (FP32_CPU_ROWS),
    F.linear with it; one row never (inductor's loop, or F.linear eager). Either way the product is F.linear's
    to fp32 summation."""
    calls = []
    monkeypatch.setattr(speed, "matvec", lambda x, w: calls.append(x.shape) or torch.ops.speed.matvec(x, w))
    monkeypatch.setitem(speed.CPU_ROWS, torch.float32, 1 if avx512 else 1 << 30)
    lin = speed.StreamingLinear(96, 40, bias=False)
    with torch.no_grad():
        for rows in (1, 2, 16, 64, 65):
            x = torch.randn(rows, 1, 96)
            torch.testing.assert_close(lin(x), F.linear(x, lin.weight), rtol=1e-5, atol=1e-5)
    assert [s[0] for s in calls] == ([] if avx512 else [2, 16, 64])


def test_bf16_rows_take_the_kernel_up_to_stream_rows(monkeypatch):
    """bf16 weights: speed.matvec serves 1 to stream_rows (64) rows on every CPU, F.linear above; the same product."""
    calls = []
    monkeypatch.setattr(speed, "matvec", lambda x, w: calls.append(x.shape) or torch.ops.speed.matvec(x, w))
    lin = speed.StreamingLinear(96, 40, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        for rows in (1, 4, 9, 16, 17, 64, 65):
            x = torch.randn(rows, 1, 96, dtype=torch.bfloat16)
            torch.testing.assert_close(lin(x).float(), F.linear(x, lin.weight).float(), rtol=2e-2, atol=2e-2)
    assert [s[0] for s in calls] == [1, 4, 9, 16, 17, 64]


@pytest.mark.parametrize("compiled", [False, True])
def test_batched_fp32_decode_without_avx512_gives_the_plain_models_tokens(compiled, monkeypatch):
    """16 fp32 rows through the kernel (as on a CPU without AVX-512) give the plain model's greedy tokens and its
    logits to fp32 rounding, eager and compiled; the compiled graph calls the kernel and no BLAS product."""
    monkeypatch.setitem(speed.CPU_ROWS, torch.float32, 1 << 30)
    plain = spread_tiny(torch.float32)
    model = speed.use_decode_paths(copy.deepcopy(plain))
    prompt = torch.randint(0, 97, (16, 6), generator=torch.Generator().manual_seed(3))
    step = speed.compile_decode_step(model) if compiled else model.decode_step
    with torch.no_grad():
        tokens, logits = greedy_rows(model, prompt, step, compiled)
        plain_tokens, plain_logits = batched_greedy(plain, prompt, 12, plain.decode_step)
    assert torch.equal(tokens[:, :1], plain_tokens[:, :1])
    err = (logits[:, :1] - plain_logits[:, :1]).abs().max()  # the same inputs on both paths: fp32 sums in another order
    assert err <= 1e-4 * (plain_logits.max() - plain_logits.min())
    assert same_until_a_close_call(tokens, plain_tokens, plain_logits, err) >= 0.9 * 16 * 12  # fp32: nearly all


# -----------------------------------------------------------------------------
# weights end to end on huge pages

def tensors_in_module_order(model):
    seen, out = set(), []
    for m in model.modules():
        for t in list(m._parameters.values()) + list(m._buffers.values()):
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


@pytest.mark.parametrize("int8", [False, True])
def test_pack_weights_lays_every_tensor_end_to_end_and_keeps_values_objects_and_logits(int8):
    """pack_weights on a bf16 model with its head tied to the embedding, and on an int8 one (int8 and float
    buffers), both in blocks where the CPU has the loops: every tensor then lies in one storage, in module order,
    each on its own 64-byte line, the first on a 2 MiB boundary; the same tensor objects (a tied head still the
    embedding's Parameter) with the same values; decoding gives the unpacked model's logits exactly."""
    plain = spread_tiny(torch.bfloat16, tie_embeddings=True)
    plain = speed.block_weights(speed.fuse_projections(speed.use_decode_paths(quantize_int8(plain) if int8 else plain)))
    packed = copy.deepcopy(plain)
    before = [(t, t.detach().clone()) for t in tensors_in_module_order(packed)]
    assert speed.pack_weights(packed) is packed
    after = tensors_in_module_order(packed)
    assert [id(t) for t in after] == [id(t) for t, _ in before]
    assert (packed.lm_head.weight is packed.embed_tokens.weight) != int8  # quantize_int8 gives the head its own codes
    assert all(torch.equal(t, value) and t.dtype == value.dtype for t, value in before)
    assert len({t.untyped_storage().data_ptr() for t in after}) == 1
    starts = [t.data_ptr() for t in after]
    assert starts[0] % (2 << 20) == 0 and all(s % 64 == 0 for s in starts)
    assert all(s + t.nbytes <= nxt for s, t, nxt in zip(starts, after, starts[1:]))  # in order, none overlapping
    prompt = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(7))
    for want, got in paired_decode_steps(plain, packed, prompt, 6):
        assert torch.equal(got, want)
    odd = speed.pack_weights(torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 3)))  # 60 and 20 bytes
    assert all(p.data_ptr() % 64 == 0 for p in odd.parameters())


def test_pack_weights_twice_keeps_the_first_arena_and_gives_freed_memory_back(monkeypatch):
    """A second call leaves the packed model as it is (no second copy of every weight); each packing ends by giving
    the freed heap pages back (release_freed_memory), and a model on no CPU tensor is left alone."""
    calls = []
    monkeypatch.setattr(speed, "release_freed_memory", lambda: calls.append(1))
    model = speed.pack_weights(tiny())
    assert len(calls) == 1
    starts = [t.data_ptr() for t in tensors_in_module_order(model)]
    assert speed.pack_weights(model) is model and [t.data_ptr() for t in tensors_in_module_order(model)] == starts
    assert len(calls) == 1
    empty = torch.nn.Sequential(torch.nn.ReLU())
    assert speed.pack_weights(empty) is empty and len(calls) == 1


def test_compiled_step_of_packed_weights_gives_the_unpacked_logits():
    """The compiled step reads packed weights (views at offsets in one storage) as it reads separate ones: the same
    logits, bit for bit, at every step (bf16 model, its weights in blocks where the CPU has the loops)."""
    plain = speed.block_weights(speed.fuse_projections(speed.use_decode_paths(spread_tiny(torch.bfloat16))))
    packed = speed.pack_weights(copy.deepcopy(plain))
    assert len({t.untyped_storage().data_ptr() for t in tensors_in_module_order(packed)}) == 1
    prompt = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = batched_greedy(plain, prompt, 8, speed.compile_decode_step(plain))
        got = batched_greedy(packed, prompt, 8, speed.compile_decode_step(packed))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.skipif(not (os.path.exists("/proc/self/smaps") and os.path.exists("/sys/kernel/mm/transparent_hugepage")),
                    reason="madvise, /proc/self/smaps and huge pages (THP) are Linux's, and a kernel may lack THP")
def test_huge_page_bytes_start_on_a_huge_page_advised_as_huge():
    """The bytes start on a 2 MiB boundary and the kernel's map of this process marks their range advised for huge
    pages (VmFlags `hg`, what MADV_HUGEPAGE sets, whatever the machine's THP setting)."""
    arena = speed.huge_page_bytes(3 << 20)
    start = arena.data_ptr()
    assert arena.numel() == 3 << 20 and arena.dtype == torch.uint8 and start % (2 << 20) == 0
    flags, inside = None, False
    for line in open("/proc/self/smaps"):
        first = line.split()[0]
        if "-" in first and all(c in "0123456789abcdef-" for c in first):
            lo, hi = (int(a, 16) for a in first.split("-"))
            inside = lo <= start < hi
        elif inside and first == "VmFlags:":
            flags = line.split()[1:]
    assert flags is not None and "hg" in flags


# -----------------------------------------------------------------------------
# a step's layers in one call (speed.LayersInOneCall, speed_kernels.cpp's decode_layers)


def multiplies_layers():
    return speed.kernel_built() and torch.ops.speed.multiplies_layers()


def one_call_tiny(kind, dtype, attn_source="dense"):
    """The tiny model with K/V sharing (layers 1 and 3 read layers 0's and 2's K/V; with attn_source "0,1,2,2" layer 1
    reads layer 0's K/V and layer 3 takes layer 2's attention pattern, its own values), a vocabulary of 112 (the
    head's rows split into 16s), weights x8 (clear greedy picks), quantized as `kind`, then made as sample.py makes it:
    the decode paths, joined projections, blocks, packed."""
    kv_source = "0,0,2,2" if attn_source == "dense" else "0,0,2,3"
    plain = tiny(kv_source, attn_source, seed=9, vocab_size=112).to(dtype)
    with torch.no_grad():
        for p in plain.parameters():
            p.mul_(8 if p.dim() == 2 else 1)
    model = {"bf16": lambda m: m, "int8": quantize_int8, "int4": quantize_int4}[kind](plain)
    return speed.pack_weights(speed.block_weights(speed.fuse_projections(speed.use_decode_paths(model))))


def forced(model, prompt, tokens, step):
    """(the logits (1, n, vocab), the cache) of `step` fed prompt (1, T) then tokens (1, n), one a step: the prefill's
    logits, then each step's"""
    cache = model.new_cache(1, model.config.block_size)
    seen = [model.prefill(prompt, cache).float()]
    for i, token in enumerate(tokens[0, :-1]):
        seen.append(step(token.view(1, 1), torch.tensor([prompt.shape[1] + i]), cache).float())
    return torch.stack(seen, 1), cache


@pytest.mark.parametrize("kind, dtype", [("bf16", torch.bfloat16), ("int8", torch.bfloat16), ("int8", torch.float32),
                                         ("int4", torch.bfloat16), ("int4", torch.float32)])
@pytest.mark.parametrize("attn_source", ["dense", "0,1,2,2"])
def test_layers_in_one_call_compute_the_op_by_op_step(kind, dtype, attn_source, set_threads):
    """The compiled step of a model whose projections and head lie in blocks runs one row's layers and head in one
    call of decode_layers (every step takes it). Fed the op-by-op step's greedy tokens, it gives that step's logits
    at every step, and its cache (against the largest cached value, bf16 within 4%: 3.0% measured):
    in fp32 within 1e-3 of the logits' spread (the integer loops round x to int16 on
    both paths, from norms summed in another order), in bf16 within 3% (the op-by-op step rounds the residual stream
    to bf16 at every op, the op keeps it fp32: 1.1-1.4% measured); the no-cache forward's last logits within the same
    bound. Its own greedy tokens equal the op-by-op ones wherever that choice is clear (16 prompts; at least 1 step in 8
    compared: in bf16 a pick within twice the error of another comes early, 30 and 43 of 192 steps compared). Two threads give
    one thread's very numbers (each computes its own blocks of a product and all of what lies between products).
    K/V sharing alone, and with a layer that takes another's attention pattern (EchoAtt). Where the kernel lacks the
    loops (no AVX-512 VNNI) the step is the compiled one."""
    model = one_call_tiny(kind, dtype, attn_source)
    step = speed.compile_decode_step(model)
    if not multiplies_layers():
        assert type(step) is speed.DirectStep and speed.layer_weights(model) is None
        return
    assert type(step) is speed.LayersInOneCall and len(step.weights[1]) == 3  # the head in blocks, in the op
    prompts = torch.randint(0, 112, (16, 6), generator=torch.Generator().manual_seed(3))
    compared = 0
    with torch.no_grad():
        for b in range(16):
            prompt = prompts[b:b + 1]
            want, want_logits = batched_greedy(model, prompt, 12, model.decode_step)
            _, want_cache = forced(model, prompt, want, model.decode_step)
            runs = []
            for threads in (1, 2):
                set_threads(threads)
                runs.append(forced(model, prompt, want, step))
            assert torch.equal(runs[0][0], runs[1][0])
            logits, cache = runs[1]
            spread = want_logits.max() - want_logits.min()
            bound = (1e-3 if dtype == torch.float32 else 0.03) * spread
            err = (logits - want_logits).abs().max()
            no_cache = model(torch.cat([prompt, want[:, :-1]], 1))[0][:, -1].float()
            assert err <= bound and (logits[0, -1] - no_cache[0]).abs().max() <= bound
            assert sorted(cache.k) == [0, 2] and sorted(cache.v) == ([0, 2] if attn_source == "dense" else [0, 2, 3])
            for held, want_held in ((cache.k, want_cache.k), (cache.v, want_cache.v)):
                for layer, t in held.items():
                    scale = want_held[layer].abs().max()
                    assert (t.float() - want_held[layer].float()).abs().max() <= (bound / spread + (dtype != torch.float32) * 0.01) * scale
            got, _ = batched_greedy(model, prompt, 12, step)
            compared += same_until_a_close_call(got, want, want_logits, err)
    assert step.one_call_steps == 16 * (2 * 11 + 12) and compared >= 16 * 12 / 8


def test_layers_in_one_call_at_smollm2s_head_size_on_any_thread_count(set_threads):
    """SmolLM2's head size (64: the attention's AVX-512 loop) and grouping (3 query heads a K/V head, one K/V head), 4-bit
    groups of 64, a 4-bit head in the op; 1, 2 and 3 threads (more than the K/V heads): the op-by-op step's logits
    within 1e-3 of their spread at every step (fp32), the very same numbers at every thread count."""
    torch.manual_seed(2)
    plain = M.Llama(M.LlamaConfig(n_layer=3, n_head=3, n_kv_head=1, n_embd=192, intermediate_size=256, vocab_size=128,
                                  block_size=64, kv_source="0,0,2")).eval()
    with torch.no_grad():
        for p in plain.parameters():
            p.mul_(8 if p.dim() == 2 else 1)
    head = Int4Linear(plain.lm_head.weight, 64)  # before quantize_int4 makes the head int8 in place
    model = speed.block_weights(speed.fuse_projections(speed.use_decode_paths(quantize_int4(plain, group_size=64))))
    if not multiplies_layers():
        assert type(speed.compile_decode_step(model)) is speed.DirectStep
        return
    model.lm_head = speed.BlockedLinear(head.unpacked_codes(), head.scales, head.minimums, 64)
    step = speed.compile_decode_step(model)
    assert type(step) is speed.LayersInOneCall and step.weights[1][1].dtype == torch.uint8 and step.weights[2] == 64
    prompt = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want, want_logits = batched_greedy(model, prompt, 10, model.decode_step)
        runs = []
        for threads in (1, 2, 3):
            set_threads(threads)
            runs.append(forced(model, prompt, want, step)[0])
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    assert (runs[0] - want_logits).abs().max() <= 1e-3 * (want_logits.max() - want_logits.min())


def test_layers_in_one_call_serve_only_what_the_op_takes(set_threads):
    """The op serves one row without gradients of a model whose every projection lies in blocks of one kind, with no
    K/V blend; everything else goes to the compiled step (the same logits as that step's): two rows, gradients wanted,
    a layer of another kind, a blend, row-major weights, one_call=False. A tied
    head (left row-major at one row) runs after the op as the model's own module, within the bound of the op-by-op
    step."""
    model = one_call_tiny("bf16", torch.bfloat16)
    step = speed.compile_decode_step(model)
    if not multiplies_layers():
        assert type(step) is speed.DirectStep
        return
    prompt = torch.randint(0, 112, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache, other_cache = model.new_cache(2, 64), model.new_cache(2, 64)
        token = model.prefill(prompt, cache).argmax(-1, keepdim=True)
        model.prefill(prompt, other_cache)
        got = step(token, torch.tensor([6]), cache)
        assert torch.equal(got, step.other(token, torch.tensor([6]), other_cache)) and step.one_call_steps == 0
    with torch.enable_grad():
        step(token[:1], torch.tensor([7]), model.new_cache(1, 64))
    assert step.one_call_steps == 0 and type(speed.compile_decode_step(model, one_call=False)) is speed.DirectStep
    mixed = one_call_tiny("int4", torch.float32)
    mixed.layers[2].mlp.down_proj = speed.BlockedLinear(*Int8Linear(torch.randn(64, 128)).state_dict().values())
    blended = one_call_tiny("int8", torch.float32)
    blended.kv_blend = {1: (0, 0.5)}
    row_major = speed.fuse_projections(speed.use_decode_paths(quantize_int8(tiny("0,0,2,2", vocab_size=112))))
    for other in (mixed, blended, row_major):
        assert speed.layer_weights(other) is None and type(speed.compile_decode_step(other)) is speed.DirectStep
    tied = one_call_tiny("bf16", torch.bfloat16)
    tied.lm_head = speed.use_decode_paths(torch.nn.Linear(64, 112, bias=False)).to(torch.bfloat16)
    tied.lm_head.weight = tied.embed_tokens.weight
    tied_step = speed.compile_decode_step(tied)
    assert tied_step.weights[1] == []  # the head is not in the op
    with torch.no_grad():
        want, want_logits = batched_greedy(tied, prompt[:1], 6, tied.decode_step)
        logits, _ = forced(tied, prompt[:1], want, tied_step)
    assert tied_step.one_call_steps == 5
    assert (logits - want_logits).abs().max() <= 0.03 * (want_logits.max() - want_logits.min())


def test_decode_layers_refuses_what_it_cannot_read():
    """One line each, naming what is wrong (without the loops every call is refused, saying so)."""
    if not multiplies_layers():
        with pytest.raises(RuntimeError, match="no AVX-512 VNNI loops"):
            torch.ops.speed.decode_layers(torch.zeros(1, 1, 64), [], [], [0, 0, 2, 2], [0, 1, 2, 3], torch.zeros(16),
                                          torch.zeros(16), 0, 4, 2, 1e-5, 32, [])
        return
    x, weights, caches, kv_source, attn_source, cos, sin, _, _, _, _, group, head = decode_layers_args()
    swapped = list(weights)
    swapped[3:5], swapped[8:10] = weights[8:10], weights[3:5]  # layer 0's o and down
    half_cache = [t.half() for t in caches]
    for args, message in [((x, weights[:-1], caches, kv_source, attn_source, cos, sin, 3, 4, 2, 1e-5, group, head),
                           "4 layers need 10 weights and 2 caches each, not 39 and 8"),
                          ((x, swapped, caches, kv_source, attn_source, cos, sin, 3, 4, 2, 1e-5, group, head),
                           "layer 0's products do not fit one kind and the model's widths"),
                          ((x, weights, half_cache, kv_source, attn_source, cos, sin, 3, 4, 2, 1e-5, group, head),
                           r"cache \[1, 2, 64, 16\] Half at position 3"),
                          ((x, weights, caches, kv_source, attn_source, cos, sin, 64, 4, 2, 1e-5, group, head),
                           "at position 64"),
                          ((x, weights, caches, kv_source, attn_source, cos[:8], sin, 3, 4, 2, 1e-5, group, head),
                           "cos and sin must be 16 fp32 each"),
                          ((x.double(), weights, caches, kv_source, attn_source, cos, sin, 3, 4, 2, 1e-5, group, head),
                           "x .1, 1, 64. Double with 4 heads over 2 K/V heads"),
                          ((x, weights, caches, kv_source, attn_source, cos, sin, 3, 4, 2, 1e-5, group, head[:2]),
                           "head takes the final norm, blocks and scales"),
                          ((x, weights, caches, [0, 2, 2, 2], attn_source, cos, sin, 3, 4, 2, 1e-5, group, head),
                           "layer 1 reads the K/V of layer 2, which is not an owner at or below it"),
                          ((x, weights, caches, [0, 0, 1, 2], attn_source, cos, sin, 3, 4, 2, 1e-5, group, head),
                           "layer 2 reads the K/V of layer 1, which is not an owner at or below it"),
                          ((x, weights, caches, kv_source, [0, 0, 2, 3], cos, sin, 3, 4, 2, 1e-5, group, head),
                           "layer 1 takes the attention of layer 0 .it must have its own and lie at or below it, and a "
                           "sharer computes its own values."),
                          ((x, weights, caches, kv_source, [0, 1, 2, 2], cos, sin, 3, 4, 2, 1e-5, group, head),
                           "layer 3 takes the attention of layer 2"),  # a sharer reading another's K/V
                          ((x, weights, caches, [0, 0, 2, 3], [0, 1, 2, 2], cos, sin, 3, 4, 2, 1e-5, group, head),
                           "layer 3's products do not fit")]:  # a sharer whose first product is not its values'
        with pytest.raises(RuntimeError, match=message) as raised:
            torch.ops.speed.decode_layers(*args)
        assert len(str(raised.value).strip().splitlines()) == 1
    args = (x, weights, caches, kv_source, attn_source, cos, sin, 3, 4, 2, 1e-5, group, head)
    norms_in_bf16, expanded_norm, short_cache = list(weights), list(weights), list(caches)
    norms_in_bf16[10], norms_in_bf16[15] = weights[10].bfloat16(), weights[15].bfloat16()  # layer 1's
    expanded_norm[0] = weights[0][:1].expand(64)
    short_cache[5] = caches[5][:, :, :32]  # layer 2's values, which layer 3 reads too, 32 positions long
    int8 = speed.layer_weights(one_call_tiny("int8", torch.float32))[0]
    for changes, message in [({11: 48}, "4-bit groups of 48 columns; it takes a multiple of 32"),
                             ({0: torch.zeros(2, 32)}, r"x \[2, 32\] Float"),
                             ({1: norms_in_bf16}, "layer 1's norms must be 64 contiguous floats of layer 0's dtype"),
                             ({1: expanded_norm}, "layer 0's norms must be 64 contiguous floats"),
                             ({2: short_cache}, "the cache layer 2 attends over differs from layer 0's"),
                             ({1: int8[:2] + [int8[2][:1].expand(128)] + int8[3:]}, "int8 blocks need 128 contiguous")]:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.speed.decode_layers(*[changes.get(i, a) for i, a in enumerate(args)])
