"""Layer-wise adaptation: stage switching, blending, freezing, distillation, calibration."""

import copy

import pytest
import torch

from adapt import Adaptation, distillation_loss, freeze, kv_similarity, propose_kv_source, save_heatmap
from model import Llama, LlamaConfig


def dense_model(n_layer=6, seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(n_layer=n_layer, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64,
                vocab_size=50, block_size=32)
    args.update(kw)
    return Llama(LlamaConfig(**args))


def batch(B=2, T=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (B, T), generator=g), torch.randint(0, 50, (B, T), generator=g)


def train_steps(model, opt, adaptation, iters, start=0):
    for it in range(start, start + iters):
        adaptation.apply(model, opt, it)
        x, y = batch(seed=it)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def test_stage_switch_removes_exactly_that_layers_kv_and_its_optimizer_state():
    model = dense_model()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    adaptation = Adaptation(model.config.kv_source, "upper:half", order="top-down", stage_iters=2)
    assert adaptation.stages == [[5], [4], [3]]
    train_steps(model, opt, adaptation, 2)  # stage 0: layer 5 blending, its K/V still trained
    k5, v5 = model.layers[5].self_attn.k_proj.weight, model.layers[5].self_attn.v_proj.weight
    assert k5 in opt.state and v5 in opt.state
    before = {n for n, _ in model.named_parameters()}
    n_state = len(opt.state)
    assert adaptation.apply(model, opt, 2) is True  # stage 1 starts: layer 5 drops its K/V
    after = {n for n, _ in model.named_parameters()}
    assert before - after == {"layers.5.self_attn.k_proj.weight", "layers.5.self_attn.v_proj.weight"}
    assert k5 not in opt.state and v5 not in opt.state and len(opt.state) == n_state - 2
    assert all(p is not k5 and p is not v5 for g in opt.param_groups for p in g["params"])
    assert model.config.kv_source == (0, 1, 2, 3, 4, 2)
    assert adaptation.apply(model, opt, 3) is False  # nothing more to drop within the stage
    train_steps(model, opt, adaptation, 4, start=3)
    adaptation.apply(model, opt, 6)
    assert model.config.kv_source == (0, 1, 2, 2, 2, 2) and not model.kv_blend
    # the result is exactly a freshly built model of the target map holding the same weights
    fresh = Llama(LlamaConfig(**{**model.config.to_dict(), "kv_source": "upper:half"}))
    fresh.load_state_dict(model.state_dict())  # strict: same keys, same shapes
    x, _ = batch(seed=99)
    assert torch.equal(fresh(x)[0], model(x)[0])
    # and the optimizer state a resumed run would load matches a fresh optimizer's layout
    fresh_opt = fresh.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    fresh_opt.load_state_dict(opt.state_dict())


def test_blend_weight_zero_is_the_dense_layer_and_one_the_consumer():
    dense = dense_model().eval()
    x, _ = batch()
    blended = copy.deepcopy(dense)
    blended.start_blend(4, 2)
    blended.set_blend(4, 0.0)
    assert torch.equal(blended(x)[0], dense(x)[0])
    blended.set_blend(4, 1.0)
    consumer = copy.deepcopy(dense)
    consumer.make_consumer(4, 2)
    torch.testing.assert_close(blended(x)[0], consumer(x)[0], rtol=0, atol=1e-6)
    assert not torch.allclose(consumer(x)[0], dense(x)[0], atol=1e-4)  # the switch does matter
    blended.set_blend(4, 0.5)
    mid = blended(x)[0]
    assert not torch.allclose(mid, dense(x)[0], atol=1e-5) and not torch.allclose(mid, consumer(x)[0], atol=1e-5)


def test_abrupt_switches_everything_at_once():
    model = dense_model()
    adaptation = Adaptation(model.config.kv_source, "cla:2", mode="abrupt")
    assert adaptation.apply(model, None, 0) is True
    assert model.config.kv_source == (0, 0, 2, 2, 4, 4) and adaptation.total_iters == 0


@pytest.mark.parametrize("train_layers, trainable", [("converted", [2, 3, 4, 5]), ("upward", [3, 4, 5])])
def test_frozen_parameters_do_not_change_and_get_no_gradient(train_layers, trainable):
    model = dense_model()
    target = (0, 1, 2, 2, 4, 4)  # layers 3 and 5 switch to owners 2 and 4
    if train_layers == "upward":
        target = (0, 1, 2, 2, 2, 2)
    assert freeze(model, target, train_layers) == trainable
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    adaptation = Adaptation(model.config.kv_source, target, stage_iters=2)
    outputs_below = []
    model.layers[trainable[0] - 1].mlp.register_forward_hook(lambda m, i, o: outputs_below.append(o))
    train_steps(model, opt, adaptation, 5)
    # no autograd below the lowest trainable layer: its activations carry no graph
    assert outputs_below and all(not o.requires_grad for o in outputs_below)
    for n, p in model.named_parameters():
        layer = int(n.split(".")[1]) if n.startswith("layers.") else None
        is_trainable = layer in trainable or (train_layers == "upward" and n.startswith(("norm.", "lm_head.")))
        assert p.requires_grad == is_trainable, n
        if is_trainable:
            assert not torch.equal(p, initial[n]), n
        else:
            assert torch.equal(p, initial[n]) and p.grad is None, n


def test_distillation_is_zero_when_student_equals_teacher():
    logits = torch.randn(2, 8, 50)
    targets = torch.randint(0, 50, (2, 8))
    assert distillation_loss(logits, logits.clone(), targets, alpha=1.0, temperature=2.0).abs() < 1e-6
    other = distillation_loss(logits, torch.randn(2, 8, 50), targets, alpha=1.0, temperature=2.0)
    assert other > 0.01
    # alpha = 0 is plain cross-entropy, and the mix is linear in alpha
    ce = torch.nn.functional.cross_entropy(logits.view(-1, 50), targets.view(-1))
    torch.testing.assert_close(distillation_loss(logits, logits, targets, 0.0, 2.0), ce)
    torch.testing.assert_close(distillation_loss(logits, logits, targets, 0.5, 2.0), 0.5 * ce)


def test_calibration_finds_a_planted_pair(tmp_path):
    i, j = 1, 4
    model = dense_model(n_layer=6, seed=3)
    with torch.no_grad():
        # layers i..j-1 add nothing to the residual stream, so layer j sees layer i's input ...
        for layer in model.layers[i:j]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        # ... and computes K/V with layer i's weights: exactly layer i's K/V
        for name in ("input_layernorm", "self_attn.k_proj", "self_attn.v_proj"):
            model.layers[j].get_submodule(name).weight.copy_(model.layers[i].get_submodule(name).weight)
    sim = kv_similarity(model, [batch(seed=s)[0] for s in range(3)])
    assert sim.shape == (6, 6)
    assert sim[j, i] == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(sim.diagonal(), torch.ones(6))
    assert propose_kv_source(sim, 1) == tuple(i if k == j else k for k in range(6))
    proposal = propose_kv_source(sim, 3)
    assert proposal[j] == i and sum(k != s for k, s in enumerate(proposal)) == 3
    LlamaConfig(n_layer=6, kv_source=proposal)  # a valid map
    save_heatmap(sim, tmp_path / "heat.png")
    assert (tmp_path / "heat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_adaptation_input_is_rejected_before_training():
    dense = dense_model().config.kv_source
    with pytest.raises(ValueError, match=r"adapt_target: kv_source has 4 entries but the model has n_layer=6"):
        Adaptation(dense, "0,0,2,2")
    with pytest.raises(ValueError, match=r"adapt_target: unknown kv_source"):
        Adaptation(dense, "half")
    with pytest.raises(ValueError, match=r"must list each switching layer once: the target converts layers \[3, 4, 5\]"):
        Adaptation(dense, "upper:half", order="5,4")
    with pytest.raises(ValueError, match=r"adapt_order must be one of"):
        Adaptation(dense, "upper:half", order="sideways")
    with pytest.raises(ValueError, match=r"needs a calibration"):
        Adaptation(dense, "upper:half", order="similarity")
    with pytest.raises(ValueError, match=r"can't become an owner again"):
        Adaptation((0, 0, 2, 3, 4, 5), "dense")
    with pytest.raises(ValueError, match=r"would freeze every layer"):
        freeze(dense_model(), dense, "converted")
    with pytest.raises(ValueError, match=r"adapt_train_layers must be one of"):
        freeze(dense_model(), (0, 0, 2, 3, 4, 5), "some")
    with pytest.raises(ValueError, match=r"n_share=6"):
        propose_kv_source(torch.eye(6), 6)


def test_explicit_and_similarity_orders():
    dense = tuple(range(6))
    assert Adaptation(dense, "upper:half", order="4,3,5").stages == [[4], [3], [5]]
    assert Adaptation(dense, "upper:half", order="bottom-up", layers_per_stage=2).stages == [[3, 4], [5]]
    sim = torch.eye(6)
    sim[3, 2], sim[4, 2], sim[5, 2] = 0.2, 0.9, 0.5
    assert Adaptation(dense, "upper:half", order="similarity", similarity=sim).stages == [[4], [5], [3]]
