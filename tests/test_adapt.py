"""Layer-wise adaptation: stage switching, blending, freezing, distillation, calibration."""

import copy
import math
import os
import subprocess
import sys

import pytest
import torch

from adapt import (Adaptation, distillation_loss, freeze, kv_similarity, logit_kl_similarity, make_consumer, propose_kv_source, save_heatmap,
                   start_blend)
from adapt import main as adapt_main
from configurator import run_script
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
    start_blend(blended, 4, 2)
    assert torch.equal(blended(x)[0], dense(x)[0])
    blended.kv_blend[4][1].fill_(1.0)
    consumer = copy.deepcopy(dense)
    make_consumer(consumer, 4, 2)
    torch.testing.assert_close(blended(x)[0], consumer(x)[0], rtol=0, atol=1e-6)
    assert not torch.allclose(consumer(x)[0], dense(x)[0], atol=1e-4)  # the switch does matter
    blended.kv_blend[4][1].fill_(0.5)
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
    # positions the cross-entropy ignores (target -1) do not count in the KL either
    ignored = targets.clone()
    ignored[0, :3] = -1
    teacher = logits.clone()
    teacher[0, :3] += torch.randn(3, 50)
    assert distillation_loss(logits, teacher, ignored, alpha=1.0, temperature=2.0).abs() < 1e-6
    # alpha = 0 is plain cross-entropy, and the mix is linear in alpha
    ce = torch.nn.functional.cross_entropy(logits.view(-1, 50), targets.view(-1))
    torch.testing.assert_close(distillation_loss(logits, logits, targets, 0.0, 2.0), ce)
    torch.testing.assert_close(distillation_loss(logits, logits, targets, 0.5, 2.0), 0.5 * ce)


def reference_distillation_loss(logits, teacher_logits, targets, alpha, temperature, argmax=0.0, data=None, reverse=0.0):
    """The loss as the composition of torch's own log_softmax, kl_div and cross_entropy (what the fused one replaced);
    the reverse KL(student || teacher) is kl_div with its two arguments swapped."""
    F = torch.nn.functional
    data = 1 - alpha - argmax if data is None else data
    logits = logits.float().view(-1, logits.size(-1))
    keep = targets.view(-1) != -1
    teacher = teacher_logits.float().view(-1, logits.size(-1))[keep]
    log_q, log_p = F.log_softmax(logits[keep] / temperature, -1), F.log_softmax(teacher / temperature, -1)
    kl = (1 - reverse) * F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") + \
        reverse * F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
    hard = F.cross_entropy(logits[keep], teacher.argmax(-1))
    return data * F.cross_entropy(logits, targets.view(-1), ignore_index=-1) + alpha * temperature ** 2 * kl + argmax * hard


@pytest.mark.parametrize("alpha,temperature,argmax,data,reverse", [
    (1.0, 1.0, 0.0, None, 0.0), (0.5, 2.0, 0.0, None, 0.0), (0.25, 2.0, 0.5, None, 0.0), (0.0, 1.0, 0.0, None, 0.0),
    (0.25, 1.0, 0.5, 0.1, 0.0), (1.0, 0.5, 0.0, None, 0.0),
    (1.0, 1.0, 0.0, None, 1.0), (1.0, 1.0, 0.0, None, 0.5), (0.5, 2.0, 0.25, None, 0.3), (1.0, 0.5, 0.0, None, 1.0)])
def test_fused_distillation_loss_equals_torchs_composition_in_value_and_gradient(monkeypatch, alpha, temperature,
                                                                                  argmax, data, reverse):
    """Chunks of 4 rows over 2 x 9 positions (the last chunk short), ignored targets in the middle of a chunk."""
    import adapt
    monkeypatch.setattr(adapt, "KL_CHUNK_ROWS", 4)
    torch.manual_seed(0)
    teacher = torch.randn(2, 9, 40) * 3
    targets = torch.randint(0, 40, (2, 9))
    targets[0, 5:7] = -1
    z = torch.randn(2, 9, 40, requires_grad=True)
    got = distillation_loss(z * 3, teacher, targets, alpha, temperature, argmax, data, reverse=reverse)
    got_grad, = torch.autograd.grad(got, z)
    want = reference_distillation_loss(z * 3, teacher, targets, alpha, temperature, argmax, data, reverse)
    want_grad, = torch.autograd.grad(want, z)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-6, rtol=1e-4)
    assert want_grad.abs().max() > 1e-3
    if reverse:  # the reverse share changed the loss (the two KLs differ on these logits)
        forward = reference_distillation_loss(z * 3, teacher, targets, alpha, temperature, argmax, data)
        assert (want - forward).abs() > 1e-2
    with torch.no_grad():  # no gradient wanted: the same value
        torch.testing.assert_close(distillation_loss(z * 3, teacher, targets, alpha, temperature, argmax, data,
                                                     reverse=reverse), want)


def test_the_reverse_kl_is_the_sum_written_out_on_two_rows():
    """KL(q || p) = sum_j q_j log(q_j / p_j) of the student's q and the teacher's p, by hand on a 3-token vocabulary,
    and zero where they agree; the teacher's top k cannot give it (its tail is one bucket) and is refused."""
    q, p = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]]), torch.tensor([[0.5, 0.3, 0.2], [0.25, 0.25, 0.5]])
    targets = torch.tensor([[0, -1]])  # the second row has no target: the mean is over the first alone
    want = 0.7 * math.log(0.7 / 0.5) + 0.2 * math.log(0.2 / 0.3) + 0.1 * math.log(0.1 / 0.2)
    got = distillation_loss(q.log()[None], p.log()[None], targets, 1.0, 1.0, reverse=1.0)
    torch.testing.assert_close(got, torch.tensor(want))
    same = distillation_loss(q.log()[None], q.log()[None], torch.tensor([[0, 1]]), 1.0, 1.0, reverse=1.0)
    assert same.abs() < 1e-6
    with pytest.raises(ValueError, match="set distill_reverse=0"):
        distillation_loss(q.log()[None], top_k_of(p.log()[None], 2), targets, 1.0, 1.0, reverse=0.5)


@pytest.mark.parametrize("top_k", [0, 5])
def test_end_of_turn_weight_counts_the_positions_where_the_teachers_argmax_ends_a_turn_that_many_times(monkeypatch,
                                                                                                     top_k):
    """end = (token, w): the loss is (1/n) sum over positions of w or 1 times that position's own loss (the reference
    on one row), n the positions with a target; a position with no target stays out even where its argmax is the
    token. With the teacher's top k, its first index is its argmax."""
    import adapt
    monkeypatch.setattr(adapt, "KL_CHUNK_ROWS", 4)
    torch.manual_seed(4)
    teacher, targets = torch.randn(2, 9, 40) * 3, torch.randint(0, 40, (2, 9))
    teacher[..., 7] = -30.0
    teacher[0, [1, 6], 7] = teacher[1, [2, 8], 7] = 30.0  # the teacher's argmax is token 7 at these four positions
    targets[0, 6] = -1  # one of them has no target
    z = torch.randn(2, 9, 40, requires_grad=True)
    given = top_k_of(teacher, top_k) if top_k else teacher
    got = distillation_loss(z * 3, given, targets, 0.75, 1.0, data=0.25, end=(7, 3.0))
    got_grad, = torch.autograd.grad(got, z)
    rows = [(b, t) for b in range(2) for t in range(9) if targets[b, t] != -1]
    per_row = [distillation_loss(z[b, t][None, None] * 3, tuple(x[b, t][None, None] for x in given) if top_k else
                                 teacher[b, t][None, None], targets[b, t][None, None], 0.75, 1.0, data=0.25)
               for b, t in rows]
    weights = [3.0 if teacher[b, t].argmax() == 7 else 1.0 for b, t in rows]
    assert weights.count(3.0) == 3
    want = sum(w * loss for w, loss in zip(weights, per_row)) / len(rows)
    want_grad, = torch.autograd.grad(want, z)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-6, rtol=1e-4)
    plain = distillation_loss(z * 3, given, targets, 0.75, 1.0, data=0.25)
    assert got > plain + 1e-3  # the weight changed something
    torch.testing.assert_close(distillation_loss(z * 3, given, targets, 0.75, 1.0, data=0.25, end=(7, 1.0)), plain)


def test_end_of_turn_weight_takes_the_teachers_eos_or_is_refused_naming_why(dense_ckpt, tmp_path):
    from types import SimpleNamespace

    from adapt import TRAINING_SETTINGS, setup_distillation
    from checkpoint import load_model
    from configurator import ConfigError, Runtime
    named = tmp_path / "with_eos.pt"
    torch.save({**torch.load(dense_ckpt, weights_only=True), "hf_config": {"eos_token_id": [5, 9]}}, named)
    student, _ = load_model(dense_ckpt)

    def distillation(teacher, **settings):
        s = SimpleNamespace(**{**TRAINING_SETTINGS, "distill_alpha": 1.0, "distill_teacher": str(teacher),
                               "init_from": dense_ckpt, **settings})
        return setup_distillation(s, student, Runtime("cpu", "cpu", "float32"), None)[1]

    assert distillation(named, distill_end_weight=4.0).end == (5, 4.0)
    assert distillation(named).end is None and distillation(dense_ckpt).end is None
    for teacher, settings, words in [(dense_ckpt, {"distill_end_weight": 4.0}, "needs the teacher's eos token id"),
                                     (named, {"distill_end_weight": -1.0}, "must be 0 or more")]:
        with pytest.raises(ConfigError, match=words):
            distillation(teacher, **settings)


def test_a_training_step_weights_the_end_of_a_turn_as_its_distillation_says():
    from adapt import Distillation, loss_with_teacher
    teacher, student = dense_model(n_layer=2, seed=1).eval(), dense_model(n_layer=2, seed=2).eval()
    x, y = batch()
    with torch.no_grad():
        s_logits, t_logits = student(x)[0], teacher(x)[0]
    end = (int(t_logits.argmax(-1).flatten().mode().values), 5.0)  # the teacher's commonest argmax as its "eos"
    got = loss_with_teacher(student, teacher, x, y, Distillation(kl=1.0, end=end))
    torch.testing.assert_close(got, distillation_loss(s_logits, t_logits, y, 1.0, 1.0, data=0.0, end=end))
    assert got > loss_with_teacher(student, teacher, x, y, Distillation(kl=1.0)) + 1e-3


def test_the_start_of_a_run_names_the_weighted_end_token_only_when_weighted():
    from types import SimpleNamespace

    from adapt import Distillation
    from monitor import adaptation_lines
    s = SimpleNamespace(distill_teacher="teacher.pt", init_from="teacher.pt", distill_cache="")
    weighted, = adaptation_lines(s, None, Distillation(kl=1.0, end=(2, 10.0)), [], 4)
    plain, = adaptation_lines(s, None, Distillation(kl=1.0), [], 4)
    assert "the positions where the teacher's argmax is token 2 (its eos) count 10 times" in weighted
    assert "eos" not in plain and "1 T^2 KL(teacher || student)" in plain and "student || teacher" not in plain
    mixed, = adaptation_lines(s, None, Distillation(kl=1.0, reverse=0.25), [], 4)
    assert "loss = 0.75 T^2 KL(teacher || student) at T=1 + 0.25 T^2 KL(student || teacher) at T=1," in mixed


def test_a_training_step_takes_the_reverse_share_its_distillation_names():
    from adapt import Distillation, loss_with_teacher
    teacher, student = dense_model(n_layer=2, seed=1).eval(), dense_model(n_layer=2, seed=2).eval()
    x, y = batch()
    with torch.no_grad():
        student.lm_head.weight.mul_(20)  # sharp against a flat teacher: the two KLs far apart
        s_logits, t_logits = student(x)[0], teacher(x)[0]
    got = loss_with_teacher(student, teacher, x, y, Distillation(kl=1.0, reverse=0.5))
    torch.testing.assert_close(got, reference_distillation_loss(s_logits, t_logits, y, 1.0, 1.0, reverse=0.5))
    assert (got - loss_with_teacher(student, teacher, x, y, Distillation(kl=1.0))).abs() > 1e-3


def test_fused_distillation_loss_on_bf16_logits_gives_a_bf16_gradient():
    """Under autocast the logits are bf16: the loss is computed in fp32, the gradient returned in the logits' dtype."""
    torch.manual_seed(1)
    z = (torch.randn(3, 5, 30) * 2).bfloat16().requires_grad_()
    teacher, targets = (torch.randn(3, 5, 30) * 2).bfloat16(), torch.randint(0, 30, (3, 5))
    got = distillation_loss(z, teacher, targets, 1.0, 1.0)
    got.backward()
    want_z = z.detach().clone().requires_grad_()
    want = reference_distillation_loss(want_z, teacher, targets, 1.0, 1.0)
    want.backward()
    assert z.grad.dtype == torch.bfloat16 and got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(z.grad, want_z.grad)


def test_calibration_finds_a_planted_pair(tmp_path):
    i, j = 0, 1
    model = dense_model(n_layer=6, seed=3)
    with torch.no_grad():
        # layer i adds nothing to the residual stream, so layer j sees layer i's input ...
        model.layers[i].self_attn.o_proj.weight.zero_()
        model.layers[i].mlp.down_proj.weight.zero_()
        # ... and computes K/V with layer i's weights: exactly layer i's K/V, so sharing them changes nothing
        for name in ("input_layernorm", "self_attn.k_proj", "self_attn.v_proj"):
            model.layers[j].get_submodule(name).weight.copy_(model.layers[i].get_submodule(name).weight)
    sim = kv_similarity(model, [batch(seed=s)[0] for s in range(3)])
    assert sim.shape == (6, 6)
    assert sim[j, i] == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(sim.diagonal(), torch.ones(6))
    others = [float(sim[a, b]) for a in range(6) for b in range(a) if (a, b) != (j, i)]
    assert max(others) < 0.99  # every other swap changes the layer's output
    assert propose_kv_source(sim, 1) == tuple(i if k == j else k for k in range(6))
    proposal = propose_kv_source(sim, 3)
    assert proposal[j] == i and sum(k != s for k, s in enumerate(proposal)) == 3
    LlamaConfig(n_layer=6, kv_source=proposal)  # a valid map
    save_heatmap(sim, tmp_path / "heat.png")
    assert (tmp_path / "heat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibration_agrees_with_the_converted_model():
    """1 - S[i, j] is the relative change of layer i's output when it attends over j's K/V: check it
    against a model actually converted to that map (the first layer whose input is unchanged)."""
    model = dense_model(n_layer=4, seed=5)
    x = batch(seed=7)[0]
    sim = kv_similarity(model, [x])
    changed = copy.deepcopy(model)
    make_consumer(changed, 3, 1)  # layer 3 is the last: only its own output changes
    seen = {}
    for m, key in ((model, "dense"), (changed, "shared")):
        m.layers[3].self_attn.register_forward_hook(lambda mod, a, out, key=key: seen.__setitem__(key, out))
        m.layers[3].input_layernorm.register_forward_pre_hook(lambda mod, a, key=key: seen.__setitem__(key + "x", a[0]))
        m(x)
    want = (seen["shared"] - seen["dense"]).norm() / (seen["densex"] + seen["dense"]).norm()
    assert float(1 - sim[3, 1]) == pytest.approx(float(want), rel=1e-4)


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
    blocking = torch.eye(3)  # layer 2 reading layer 1 first leaves no second switch: said, not fewer returned
    blocking[2, 1], blocking[1, 0], blocking[2, 0] = 0.9, 0.8, 0.7
    with pytest.raises(ValueError, match=r"n_share=2: the best single switches made only 1 consumers"):
        propose_kv_source(blocking, 2)


def test_explicit_and_similarity_orders():
    dense = tuple(range(6))
    assert Adaptation(dense, "upper:half", order="4,3,5").stages == [[4], [3], [5]]
    assert Adaptation(dense, "upper:half", order="bottom-up", layers_per_stage=2).stages == [[3, 4], [5]]
    sim = torch.eye(6)
    sim[3, 2], sim[4, 2], sim[5, 2] = 0.2, 0.9, 0.5
    assert Adaptation(dense, "upper:half", order="similarity", similarity=sim).stages == [[4], [5], [3]]


# ---- through train.py: resume, DDP, the calibration command, bad settings

from test_train import ROOT, TINY, records, run, train_losses  # noqa: E402

ADAPT = ["--n_layer=4", "--max_iters=6", "--lr_decay_iters=6", "--eval_interval=3", "--adapt_target=upper:half",
         "--adapt_stage_iters=2", "--adapt_train_layers=upward", "--distill_alpha=0.5", "--distill_temperature=2.0"]


@pytest.fixture(scope="module")
def dense_ckpt(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dense")
    run(data_dir, out, "--n_layer=4", "--kv_source=dense", "--max_iters=4", "--eval_interval=4")
    return str(out / "ckpt.pt")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_teacher_under_autocast_gives_the_logits_of_the_checkpoint(dense_ckpt, dtype):
    """setup_distillation's teacher has its linears cast once (bf16) or left alone (fp32): under autocast its logits
    equal those of the checkpoint loaded as it is."""
    from types import SimpleNamespace

    from adapt import TRAINING_SETTINGS, setup_distillation
    from checkpoint import load_model
    from configurator import Runtime, autocast
    student, _ = load_model(dense_ckpt)
    s = SimpleNamespace(**{**TRAINING_SETTINGS, "distill_alpha": 1.0, "distill_teacher": dense_ckpt, "init_from": dense_ckpt})
    teacher, _, _ = setup_distillation(s, student, Runtime("cpu", "cpu", dtype), None)
    plain, _ = load_model(dense_ckpt, block_size=student.config.block_size)
    idx = torch.randint(0, plain.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), autocast("cpu", dtype):
        got, want = teacher(idx)[0], plain(idx)[0]
    assert {m.weight.dtype for m in teacher.modules() if isinstance(m, torch.nn.Linear)} == {getattr(torch, dtype)}
    assert torch.equal(got, want)


def test_adaptation_through_train_resumes_exactly(data_dir, dense_ckpt, tmp_path):
    run(data_dir, tmp_path / "a", *ADAPT, f"--init_from={dense_ckpt}")
    run(data_dir, tmp_path / "b", *ADAPT, f"--init_from={dense_ckpt}", "--max_iters=3")
    # mid-way: layer 3 has switched (stage 0 = iters 0-1), layer 2 is blending
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["model_config"]["kv_source"] == [0, 1, 2, 1]
    run(data_dir, tmp_path / "b", *ADAPT, "--init_from=resume", f"--distill_teacher={dense_ckpt}")
    straight, resumed = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert sorted(straight) == sorted(resumed) == list(range(6))
    assert straight == resumed  # bit for bit, across a stage switch and the distillation teacher
    assert [r["kv_source"] for r in records(tmp_path / "a", "adapt")] == [[0, 1, 2, 1], [0, 1, 1, 1]]
    final = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    assert final["model_config"]["kv_source"] == [0, 1, 1, 1]
    assert not any(k.startswith(("layers.2.self_attn.k_proj", "layers.3.self_attn.v_proj")) for k in final["model"])
    dense = torch.load(dense_ckpt, weights_only=True)["model"]
    # upward freezing: everything below layer 2 is exactly the dense model's
    for k, v in final["model"].items():
        if k.startswith(("embed_tokens.", "layers.0.", "layers.1.")):
            assert torch.equal(v, dense[k]), k


def test_torchrun_adaptation_switches_layers_on_every_rank(data_dir, dense_ckpt, tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", os.path.join(ROOT, "train.py")] + TINY + ADAPT + [
        f"--dataset={data_dir}", f"--out_dir={tmp_path}", f"--init_from={dense_ckpt}",
        "--gradient_accumulation_steps=2", "--device=cpu"]
    r = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "weights on all 2 ranks are identical" in r.stdout
    assert records(tmp_path, "adapt")[-1]["kv_source"] == [0, 1, 1, 1]
    assert records(tmp_path, "done")[-1]["ddp_weights_identical"]


def test_logit_calibration_is_the_kl_of_each_single_switch_end_to_end():
    """S[i, j] = exp(-mean KL(dense || model converted with layer i alone reading j)), each pair against a
    model the project's own conversion built (convert_model) and the explicit KL formula; 1 on the diagonal."""
    from adapt import convert_model
    model = dense_model(n_layer=4, seed=5).eval()
    with torch.no_grad():  # spread the logits: a random tiny model's are near uniform, every KL near 0
        model.lm_head.weight.mul_(20)
    xs = [batch(seed=7)[0], batch(B=1, T=9, seed=8)[0]]
    sim = logit_kl_similarity(model, xs)
    assert torch.all(sim.diagonal() == 1)
    for i, j in ((1, 0), (2, 0), (3, 1), (3, 2)):
        switched = convert_model(model, [j if k == i else k for k in range(4)]).eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for x in xs:
                p, q = (torch.softmax(m(x)[0].double(), -1) for m in (model, switched))
                total, count = total + (p * (p / q).log()).sum().item(), count + x.numel()
        assert total / count > 1e-3
        assert float(sim[i, j]) == pytest.approx(math.exp(-total / count), rel=1e-4)


def explicit_map_kl(model, kv_source, xs):
    """Mean KL per token of the dense model against the project's own conversion to kv_source, by the formula."""
    from adapt import convert_model
    switched = convert_model(model, list(kv_source)).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x in xs:
            p, q = (torch.softmax(m(x)[0].double(), -1) for m in (model, switched))
            total, count = total + (p * (p / q).log()).sum().item(), count + x.numel()
    return total / count


def test_map_search_adds_the_switch_that_costs_least_with_those_chosen():
    """search_kv_source: with every allowed switch a candidate, its first switch is the matrix's best single
    one, and each next one the allowed switch whose map (with those before) has the least KL, checked against
    every other such map converted by convert_model; the KL it logs is that map's. It returns the cheaper of
    that map and the best single switches' map (propose_kv_source's)."""
    from adapt import search_kv_source
    for seed, search_wins in ((0, True), (6, False)):  # tiny models where each of the two is the cheaper
        model = dense_model(n_layer=6, seed=seed).eval()
        with torch.no_grad():
            model.lm_head.weight.mul_(20)
        xs = [batch(seed=7)[0], batch(B=1, T=9, seed=8)[0]]
        sim = logit_kl_similarity(model, xs)
        lines = []
        found = search_kv_source(model, xs, sim, 3, candidates=100, log=lines.append)
        assert len(lines) == 4 and sum(j != i for i, j in enumerate(found)) == 3
        chosen, options = list(range(6)), []
        for line in lines[:3]:
            i, j = (int(w) for w in line.split(": layer ")[1].split(" K/V")[0].replace("reads layer", "").replace("'s", "").split())
            maps = [chosen[:a] + [b] + chosen[a + 1:] for a in range(6) for b in range(a)
                    if chosen[a] == a and a not in chosen[:a] + chosen[a + 1:] and chosen[b] == b]
            costs = {tuple(m): explicit_map_kl(model, m, xs) for m in maps}
            options.append(len(set(round(c, 6) for c in costs.values())))
            if chosen == list(range(6)):
                assert max((float(sim[a, b]), a, b) for a in range(6) for b in range(a))[1:] == (i, j)
            chosen[i] = j
            assert costs[tuple(chosen)] == pytest.approx(min(costs.values()), rel=1e-5)
            assert float(line.split("KL ")[1].split()[0]) == pytest.approx(costs[tuple(chosen)], abs=1e-4)
        assert options[0] > 1 and options[1] > 1, options  # choices, not ties
        single = propose_kv_source(sim, 3)
        assert single != tuple(chosen) and f"map {','.join(map(str, single))}: KL" in lines[3]
        cheaper = tuple(chosen) if search_wins else single
        assert explicit_map_kl(model, cheaper, xs) < explicit_map_kl(model, single if search_wins else chosen, xs)
        assert found == cheaper and lines[3].endswith("the search kept" if search_wins else "that map kept")


def test_map_search_looks_only_at_the_best_single_switches():
    """candidates=1 is the matrix's greedy proposal itself."""
    from adapt import search_kv_source
    model = dense_model(n_layer=5, seed=3).eval()
    xs = [batch(seed=2)[0]]
    sim = logit_kl_similarity(model, xs)
    assert search_kv_source(model, xs, sim, 3, candidates=1, log=lambda _: None) == propose_kv_source(sim, 3)


def test_map_search_command_from_a_saved_matrix(data_dir, dense_ckpt, tmp_path, capsys):
    """adapt.py --search=K runs the search (its forwards need the batches even from a saved matrix) and
    proposes its map; bad settings are one line before the model loads."""
    from adapt import search_kv_source, token_batches
    from checkpoint import load_model
    common = [f"--init_from={dense_ckpt}", f"--dataset={data_dir}", "--batches=1", "--batch_size=2",
              "--criterion=logits", "--split=train"]
    adapt_main([*common, "--n_share=1", f"--out={tmp_path / 'a'}"])
    saved = tmp_path / "a" / "logit_kl_similarity.pt"
    capsys.readouterr()
    found = adapt_main([*common, "--n_share=2", "--search=3", f"--similarity={saved}", f"--out={tmp_path / 'b'}"])
    out = capsys.readouterr().out
    assert "switch 2 of 2: layer" in out and f"sharing 2 layers: {','.join(map(str, found))}" in out
    model, ckpt = load_model(dense_ckpt)
    batches = token_batches(model, ckpt, str(data_dir), "train", 1, 2, 0, 1337)
    assert found == search_kv_source(model.requires_grad_(False), batches, torch.load(saved), 2, 3, log=lambda _: None)
    for bad, said in (("--search=-1", "search=-1 must be >= 0"),
                      ("--criterion=attention", "search applies to K/V maps")):
        assert run_script(adapt_main, [*common, "--n_share=2", "--search=2", bad]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0], err
    blocking = torch.eye(4)  # layer 3 reading 2 and 2 reading 1 first: no third switch is left
    blocking[3, 2], blocking[2, 1] = 0.9, 0.8
    torch.save(blocking, tmp_path / "blocking.pt")
    assert run_script(adapt_main, [*common, "--n_share=3", f"--similarity={tmp_path / 'blocking.pt'}",
                                   f"--out={tmp_path / 'c'}"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "n_share=3: the best single switches made only 2" in err[0], err
    assert f"--similarity={tmp_path / 'c'}/logit_kl_similarity.pt" in err[0] and (tmp_path / "c" / "logit_kl_similarity.pt").exists()


def test_lowest_consumer_keeps_every_consumer_at_or_above_it(data_dir, dense_ckpt, tmp_path, capsys):
    """--lowest_consumer=L: the proposal (the best single switches, or the search) makes consumers of layers L and
    up only: the best allowed switches among them, by the matrix, where the unrestricted map takes lower ones."""
    from adapt import search_kv_source
    sim = torch.eye(6)
    sim[1, 0], sim[2, 0], sim[4, 1], sim[5, 3], sim[3, 2] = 0.99, 0.98, 0.7, 0.6, 0.5
    assert propose_kv_source(sim, 2) == (0, 0, 0, 3, 4, 5)
    assert propose_kv_source(sim, 2, lowest=3) == (0, 1, 2, 3, 1, 3)  # 4 reads 1, then 5 reads 3 (3 reading 2: gone)
    with pytest.raises(ValueError, match="from layer 5 up .*or a lower lowest_consumer"):
        propose_kv_source(sim, 2, lowest=5)
    model = dense_model(n_layer=6, seed=0).eval()
    xs = [batch(seed=7)[0]]
    full = logit_kl_similarity(model, xs)
    unrestricted = search_kv_source(model, xs, full, 2, candidates=100, log=lambda _: None)
    assert min(i for i, j in enumerate(unrestricted) if j != i) < 5
    found = search_kv_source(model, xs, full, 1, candidates=100, log=lambda _: None, lowest=5)
    assert found == (0, 1, 2, 3, 4, int(full[5, :5].argmax()))  # the cheapest switch of layer 5, by the same batches
    common = [f"--init_from={dense_ckpt}", f"--dataset={data_dir}", "--batches=1", "--batch_size=2",
              "--criterion=logits", "--split=train"]
    adapt_main([*common, "--n_share=1", f"--out={tmp_path / 'a'}"])
    saved = torch.load(tmp_path / "a" / "logit_kl_similarity.pt")
    n = saved.shape[0]
    found = adapt_main([*common, "--n_share=1", "--lowest_consumer=2", f"--similarity={tmp_path / 'a' / 'logit_kl_similarity.pt'}",
                        f"--out={tmp_path / 'b'}"])
    best = max((float(saved[i, j]), i, j) for i in range(2, n) for j in range(i))
    assert found == tuple(best[2] if k == best[1] else k for k in range(n))
    capsys.readouterr()
    for bad, said in (("--lowest_consumer=-1", "lowest_consumer=-1: give a layer >= 0"),
                      ("--criterion=attention", "not --criterion=attention")):
        assert run_script(adapt_main, [*common, "--n_share=1", "--lowest_consumer=2", bad]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0], err


def test_map_search_on_more_batches_than_the_matrix(data_dir, dense_ckpt, tmp_path, capsys, monkeypatch):
    """--search_batches=N: the matrix comes from the first --batches batches (the same matrix as without the
    search), the search from all N (batch k is the same whatever the count); bad counts are one line."""
    import adapt
    from checkpoint import load_model
    common = [f"--init_from={dense_ckpt}", f"--dataset={data_dir}", "--batch_size=2", "--criterion=logits",
              "--split=train", "--n_share=2"]
    adapt_main([*common, "--batches=1", f"--out={tmp_path / 'a'}"])
    searched, search = [], adapt.search_kv_source
    monkeypatch.setattr(adapt, "search_kv_source", lambda model, batches, *rest, **named: searched.append(batches) or
                        search(model, batches, *rest, **named))
    found = adapt_main([*common, "--batches=1", "--search=3", "--search_batches=3", f"--out={tmp_path / 'b'}"])
    matrix = torch.load(tmp_path / "b" / "logit_kl_similarity.pt")
    assert torch.equal(matrix, torch.load(tmp_path / "a" / "logit_kl_similarity.pt"))
    model, ckpt = load_model(dense_ckpt)
    three = adapt.token_batches(model, ckpt, str(data_dir), "train", 3, 2, 0, 1337)
    assert torch.equal(three[0], adapt.token_batches(model, ckpt, str(data_dir), "train", 1, 2, 0, 1337)[0])
    assert len(searched) == 1 and len(searched[0]) == 3 and all(map(torch.equal, searched[0], three))
    assert not torch.equal(three[0], three[1])
    assert found == search(model.requires_grad_(False), three, matrix, 2, 3, log=lambda _: None)
    capsys.readouterr()
    for bad, said in ((["--search_batches=3"], "search_batches=3 applies only with --search"),
                      (["--search=2", "--batches=4", "--search_batches=2"], "search_batches=2 is below batches=4")):
        assert run_script(adapt_main, [*common, *bad]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0], err


def test_logit_calibration_command_on_the_train_split(data_dir, dense_ckpt, tmp_path, capsys):
    proposal = adapt_main([f"--init_from={dense_ckpt}", f"--dataset={data_dir}", "--n_share=1", "--batches=1",
                           "--batch_size=2", "--criterion=logits", "--split=train", f"--out={tmp_path}"])
    assert f"proposed kv_source sharing 1 layers: {','.join(map(str, proposal))}" in capsys.readouterr().out
    sim = torch.load(tmp_path / "logit_kl_similarity.pt")
    i = next(i for i, j in enumerate(proposal) if j != i)
    below = [(float(sim[a, b]), a, b) for a in range(sim.shape[0]) for b in range(a)]
    assert max(below)[1:] == (i, proposal[i])  # the cheapest single switch is the one proposed


def test_logit_calibration_in_bf16_is_autocasts_computation_and_near_fp32s(data_dir, dense_ckpt, tmp_path):
    """--dtype=bfloat16: the matrix the command saves is logit_kl_similarity's under bf16 autocast (the linears
    cast once changes nothing), not fp32's, yet within bf16's rounding of it."""
    common = [f"--init_from={dense_ckpt}", f"--dataset={data_dir}", "--n_share=1", "--batches=1", "--batch_size=2",
              "--criterion=logits", "--split=train"]
    adapt_main([*common, f"--out={tmp_path / 'fp32'}"])
    adapt_main([*common, "--dtype=bfloat16", f"--out={tmp_path / 'bf16'}"])
    fp32, bf16 = (torch.load(tmp_path / d / "logit_kl_similarity.pt") for d in ("fp32", "bf16"))
    from adapt import token_batches
    from checkpoint import load_model
    model, ckpt = load_model(dense_ckpt)
    batches = token_batches(model, ckpt, str(data_dir), "train", 1, 2, 0, 1337)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = logit_kl_similarity(model, batches)
    assert torch.equal(bf16, want.float()) and not torch.equal(bf16, fp32)
    assert (bf16 - fp32).abs().max() < 0.02


def test_calibration_from_a_saved_matrix_proposes_as_computing_it_does(data_dir, dense_ckpt, tmp_path, capsys):
    """--similarity=FILE: another n_share from an earlier calibration's matrix, without its forwards; the same
    map as computing the matrix again. A file that is not such a matrix is one line naming the setting."""
    common = [f"--init_from={dense_ckpt}", f"--dataset={data_dir}", "--batches=1", "--batch_size=2",
              "--criterion=logits", "--split=train"]
    adapt_main([*common, "--n_share=1", f"--out={tmp_path / 'a'}"])
    computed = adapt_main([*common, "--n_share=2", f"--out={tmp_path / 'b'}"])
    saved = adapt_main([*common, "--n_share=2", f"--similarity={tmp_path / 'a' / 'logit_kl_similarity.pt'}",
                        f"--out={tmp_path / 'c'}"])
    assert saved == computed and sum(j != i for i, j in enumerate(saved)) == 2
    assert torch.equal(torch.load(tmp_path / "c" / "logit_kl_similarity.pt"),
                       torch.load(tmp_path / "b" / "logit_kl_similarity.pt"))
    capsys.readouterr()
    torch.save(torch.zeros(3, 3), tmp_path / "small.pt")
    for bad, said in ((tmp_path / "small.pt", "not the similarity matrix of a 4-layer model"),
                      (tmp_path / "none.pt", "no such file")):
        assert run_script(adapt_main, [*common, "--n_share=2", f"--similarity={bad}"]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"similarity='{bad}'" in err[0] and said in err[0]


def test_calibration_command(data_dir, dense_ckpt, tmp_path, capsys):
    proposal = adapt_main([f"--init_from={dense_ckpt}", f"--dataset={data_dir}", "--n_share=2", "--batches=2",
                           f"--out={tmp_path}"])
    out = capsys.readouterr().out
    assert f"proposed kv_source sharing 2 layers: {','.join(map(str, proposal))}" in out
    assert sum(j != i for i, j in enumerate(proposal)) == 2
    sim = torch.load(tmp_path / "kv_similarity.pt")
    assert sim.shape == (4, 4) and (tmp_path / "kv_similarity.png").exists()
    # and training can take the similarity order from that file
    run(data_dir, tmp_path / "run", "--n_layer=4", f"--init_from={dense_ckpt}", "--max_iters=2",
        f"--adapt_target={','.join(map(str, proposal))}", "--adapt_order=similarity",
        f"--adapt_similarity={tmp_path / 'kv_similarity.pt'}", "--adapt_stage_iters=1")
    assert records(tmp_path / "run", "adapt")[-1]["kv_source"] == list(proposal)


def test_calibration_without_matplotlib_prints_the_map_and_skips_only_the_heatmap(data_dir, dense_ckpt, tmp_path,
                                                                                 capsys, monkeypatch):
    # what ./setup.sh without --dev leaves: an import of matplotlib fails
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    proposal = adapt_main([f"--init_from={dense_ckpt}", f"--dataset={data_dir}", "--n_share=2", "--batches=2",
                           f"--out={tmp_path}"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("matplotlib is not installed: the heatmap (.png) is skipped") and "--dev" in lines[0]
    assert f"proposed kv_source sharing 2 layers: {','.join(map(str, proposal))}" in lines
    assert sum(j != i for i, j in enumerate(proposal)) == 2
    assert (tmp_path / "kv_similarity.pt").exists() and not (tmp_path / "kv_similarity.png").exists()


@pytest.mark.parametrize("args, match", [
    (["--adapt_target=0,0,1"], r"adapt_target: kv_source has 3 entries but the model has n_layer=4"),
    (["--adapt_target=dense", "--adapt_train_layers=converted"], r"would freeze every layer"),
    (["--adapt_target=upper:half", "--adapt_order=3"], r"must list each switching layer once"),
    (["--adapt_target=upper:half", "--adapt_mode=slow"], r"adapt_mode must be 'gradual' or 'abrupt'"),
    (["--distill_alpha=0.7", "--distill_argmax=0.5"], r"with a sum <= 1"),
    (["--adapt_target=upper:half", "--distill_alpha=1.5"], r"with a sum <= 1"),
    (["--distill_hidden=0.2"], r"distill_hidden > 0 needs distill_hidden_layers"),
    (["--distill_hidden=0.2", "--distill_hidden_layers=1,9"], r"layer indices must lie in 0..3"),
    (["--adapt_target=upper:half", "--adapt_order=similarity", "--adapt_similarity=nope.pt"], r"no such file"),
    (["--adapt_attn_target=0,0,1"], r"adapt_attn_target: attn_source has 3 entries but the model has n_layer=4"),
    (["--adapt_attn_target=0,1,5,3"], r"adapt_attn_target: .*5"),
    (["--adapt_attn_target=0,0,2,3", "--adapt_mode=abrupt"], r"adapt_mode applies only to an adaptation run"),
])
def test_bad_adaptation_settings_stop_before_training(data_dir, dense_ckpt, tmp_path, args, match):
    with pytest.raises(ValueError, match=match):
        run(data_dir, tmp_path, "--n_layer=4", f"--init_from={dense_ckpt}", *args)
    assert not (tmp_path / "ckpt.pt").exists()


def test_adapted_model_is_saved_even_when_only_improvements_are(data_dir, dense_ckpt, tmp_path):
    # val loss rises as layers switch; "best" must not keep pointing at the dense model of iteration 0
    run(data_dir, tmp_path, *ADAPT, f"--init_from={dense_ckpt}", "--always_save_checkpoint=False",
        "--learning_rate=1e-6", "--min_lr=1e-7")  # too small to win back what switching costs
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["model_config"]["kv_source"] == [0, 1, 1, 1]


def test_checkpoint_written_mid_stage_loads_the_model_being_trained(data_dir, dense_ckpt, tmp_path):
    """Stopped halfway through a stage, the checkpoint holds the blend weight: the model loaded from it
    (resume, sample.py) gives the live model's logits, and its cached generation equals the uncached one."""
    from checkpoint import load_model
    run(data_dir, tmp_path, *ADAPT, f"--init_from={dense_ckpt}", "--max_iters=6", "--eval_interval=6",
        "--adapt_stage_iters=4")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 6 and ckpt["kv_blend"]  # layer 2 is halfway (iteration 6 of stage 4..8)
    (layer, (source, weight)), = ckpt["kv_blend"].items()
    assert (layer, source, weight) == (2, 1, 0.5)
    model, _ = load_model(str(tmp_path))
    live = Llama(LlamaConfig(**ckpt["model_config"]))
    live.load_state_dict(ckpt["model"])
    x, _ = batch()
    x = x[:, :16] % model.config.vocab_size
    without_blend = live(x)[0]
    start_blend(live, 2, 1)
    live.kv_blend[2][1].fill_(0.5)
    torch.testing.assert_close(model(x)[0], live(x)[0], rtol=0, atol=0)
    assert not torch.allclose(model(x)[0], without_blend, atol=1e-5)
    greedy = model.generate(x[:1, :4], 8, temperature=0)
    for n in range(4, 12):
        assert greedy[0, n] == model(greedy[:, :n])[0][0, -1].argmax()


# ---- abrupt conversion and layer-local distillation


def test_conversion_keeps_or_averages_the_owners_kv():
    from adapt import convert_model
    dense = dense_model(n_layer=4)
    x = batch()[0]
    assert torch.equal(convert_model(dense, "dense")(x)[0], dense(x)[0])
    own, mean = convert_model(dense, "upper:half", "own"), convert_model(dense, "upper:half", "mean")
    assert own.config.kv_source == (0, 1, 1, 1) and not hasattr(own.layers[2].self_attn, "k_proj")
    assert torch.equal(own.layers[1].self_attn.k_proj.weight, dense.layers[1].self_attn.k_proj.weight)
    want = sum(dense.layers[i].self_attn.v_proj.weight for i in (1, 2, 3)) / 3
    torch.testing.assert_close(mean.layers[1].self_attn.v_proj.weight, want)
    with pytest.raises(ValueError, match="starts from a dense model"):
        convert_model(own, "cla:2")


def test_local_distillation_brings_converted_layers_toward_the_dense_ones():
    from adapt import convert_model, local_distillation
    teacher = dense_model(n_layer=4, seed=2).requires_grad_(False)
    student = convert_model(teacher, "upper:half", "mean")
    batches = [batch(seed=s)[0] for s in range(4)]
    lower = copy.deepcopy(student.layers[:2].state_dict())
    before = local_distillation(student, teacher, batches, 1, 0.0, log=lambda *_: None)  # lr 0: just measure
    after = local_distillation(student, teacher, batches, 60, 3e-3, log=lambda *_: None)
    assert before.keys() == after.keys() == {2, 3}
    assert all(after[i] < 0.5 * before[i] for i in before), (before, after)
    # only the consumers moved
    assert all(torch.equal(t, student.layers[:2].state_dict()[k]) for k, t in lower.items())


def test_consumers_qo_trains_only_the_consumers_query_and_output_projections():
    from adapt import convert_model, local_distillation
    teacher = dense_model(n_layer=4, seed=2).requires_grad_(False)
    target = [0, 1, 1, 1]  # layers 2 and 3 read layer 1's K/V
    student = convert_model(teacher, "0,1,1,1", "own")
    assert freeze(student, target, "consumers_qo") == [2, 3]
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.self_attn.{m}.weight" for i in (2, 3) for m in ("q_proj", "o_proj")}
    # the local distillation on the same set moves exactly those weights, and lowers the consumers' error
    before_state = copy.deepcopy(student.state_dict())
    batches = [batch(seed=s)[0] for s in range(4)]
    before = local_distillation(student, teacher, batches, 1, 0.0, log=lambda *_: None, qo_only=True)
    after = local_distillation(student, teacher, batches, 40, 3e-3, log=lambda *_: None, qo_only=True)
    assert all(after[i] < before[i] for i in before), (before, after)
    moved = {k for k, t in student.state_dict().items() if not torch.equal(t, before_state[k])}
    assert moved == trainable


def test_convert_command_writes_a_checkpoint_that_loads(data_dir, dense_ckpt, tmp_path, capsys):
    from checkpoint import load_model
    out = tmp_path / "shared.pt"
    adapt_main([f"--init_from={dense_ckpt}", f"--dataset={data_dir}", "--convert_to=upper:half", "--kv_init=mean",
                "--local_iters=3", "--batches=2", "--batch_size=2", f"--out={out}"])
    assert "local distillation 3/3" in capsys.readouterr().out
    model, ckpt = load_model(str(out))
    assert model.config.kv_source == (0, 1, 1, 1) and ckpt["config"]["dataset"] == str(data_dir)


# ---- EchoAtt's two-stage distillation


def test_distillation_loss_terms_add_up_as_documented():
    from adapt import Distillation, HiddenTap, loss_with_teacher
    teacher = dense_model(n_layer=4, seed=1).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.layers[0].mlp.down_proj.weight.mul_(1.5)  # the residual entering layers 1.. differs
    d = Distillation(kl=0.25, argmax=0.5, hidden=0.25, temperature=2.0, layers=(1, 3))
    taps = HiddenTap(student, d.layers), HiddenTap(teacher, d.layers)
    x, y = batch()
    got = loss_with_teacher(student, teacher, x, y, d, taps)
    s_logits, t_logits = student(x)[0].view(-1, 50), teacher(x)[0].view(-1, 50)
    kl = torch.nn.functional.kl_div((s_logits / 2).log_softmax(-1), (t_logits / 2).log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    hard = torch.nn.functional.cross_entropy(s_logits, t_logits.argmax(-1))
    s_in, t_in = {}, {}
    for m, store in ((student, s_in), (teacher, t_in)):
        for i in (1, 3):
            m.layers[i].input_layernorm.register_forward_pre_hook(lambda mod, a, i=i, store=store: store.__setitem__(i, a[0]))
        m(x)
    mse = sum(((s_in[i] - t_in[i]) ** 2).mean() / (t_in[i] ** 2).mean() for i in (1, 3)) / 2
    torch.testing.assert_close(got, 0.25 * 4 * kl + 0.5 * hard + 0.25 * mse)  # data weight 1 - 1 = 0
    assert mse > 1e-4


def test_two_stage_distillation_uses_the_teacher_only_in_stage_one(data_dir, dense_ckpt, tmp_path, monkeypatch):
    import train
    calls = []
    real = train.loss_with_teacher
    monkeypatch.setattr(train, "loss_with_teacher", lambda *a, **k: calls.append(1) or real(*a, **k))
    run(data_dir, tmp_path, "--n_layer=4", f"--init_from={dense_ckpt}", "--max_iters=5", "--eval_interval=5",
        "--distill_iters=3", "--distill_alpha=0.25", "--distill_argmax=0.5", "--distill_hidden=0.25",
        "--distill_hidden_layers=1,3")
    assert len(calls) == 3  # iterations 0, 1, 2 learn from the teacher; 3 and 4 from the data only
    # and resuming inside stage 1 continues it
    calls.clear()
    run(data_dir, tmp_path / "b", "--n_layer=4", f"--init_from={dense_ckpt}", "--max_iters=2", "--eval_interval=2",
        "--distill_iters=3", "--distill_argmax=0.5")
    run(data_dir, tmp_path / "b", "--n_layer=4", "--init_from=resume", "--max_iters=5", "--eval_interval=5", "--distill_iters=3",
        "--distill_argmax=0.5", f"--distill_teacher={dense_ckpt}")
    assert len(calls) == 3


# ---- EchoAtt: calibration by attention maps, conversion


def test_attention_calibration_finds_a_planted_pair(tmp_path):
    from adapt import attention_similarity, propose_attn_source
    i, j = 2, 3
    model = dense_model(n_layer=6, seed=4)
    with torch.no_grad():
        for layer in model.layers:  # sharp attention: random small weights attend almost uniformly, alike
            layer.self_attn.q_proj.weight.mul_(30)
        # layer i adds nothing to the residual stream, so layer j sees its input and, with its Q/K, attends alike
        model.layers[i].self_attn.o_proj.weight.zero_()
        model.layers[i].mlp.down_proj.weight.zero_()
        for name in ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj"):
            model.layers[j].get_submodule(name).weight.copy_(model.layers[i].get_submodule(name).weight)
    sim = attention_similarity(model, [batch(seed=s)[0] for s in range(2)])
    assert sim[j, i] == pytest.approx(1.0, abs=1e-5) and torch.allclose(sim.diagonal(), torch.ones(6))
    assert max(float(sim[a, b]) for a in range(6) for b in range(a) if (a, b) != (j, i)) < 0.999
    assert propose_attn_source(sim, 1, keep_first=2) == (0, 1, 2, 2, 4, 5)
    proposal = propose_attn_source(sim, 2, keep_first=2)
    assert proposal[j] == i and sum(a != b for a, b in enumerate(proposal)) == 2
    assert proposal[:2] == (0, 1) and proposal[5] == 5  # the first two and the last layer keep their own
    LlamaConfig(n_layer=6, attn_source=proposal)


def test_attention_conversion_drops_q_and_k_and_loads_strictly():
    from adapt import convert_model
    dense = dense_model(n_layer=6)
    shared = convert_model(dense, attn_source="0,1,2,2,2,5")
    assert {n for n, _ in shared.layers[3].self_attn.named_parameters()} == {"v_proj.weight", "o_proj.weight"}
    fresh = Llama(LlamaConfig(**shared.config.to_dict()))
    fresh.load_state_dict(shared.state_dict())  # strict
    x = batch()[0]
    assert torch.equal(fresh(x)[0], shared(x)[0])
    for i in (0, 1, 2, 5):  # unshared layers keep their weights
        assert torch.equal(shared.layers[i].self_attn.q_proj.weight, dense.layers[i].self_attn.q_proj.weight)
    both = convert_model(dense, kv_source="0,0,2,3,4,5", attn_source="0,1,2,2,4,4")
    assert both.config.kv_source[1] == 0 and both.config.attn_source[5] == 4


def test_upward_freezing_of_a_tied_model_needs_no_backward_below_the_lowest_trainable_layer():
    model = dense_model(n_layer=4, tie_embeddings=True)
    freeze(model, (0, 1, 1, 1), "upward")  # layers 2 and 3 train
    assert not model.embed_tokens.weight.requires_grad  # the tied head stays frozen with it
    seen = []
    model.layers[1].input_layernorm.register_forward_pre_hook(lambda m, a: seen.append(a[0].requires_grad))
    model.layers[3].input_layernorm.register_forward_pre_hook(lambda m, a: seen.append(a[0].requires_grad))
    model(batch()[0], batch()[1])
    assert seen == [False, True]  # autograd records nothing below layer 2


# ---- the teacher's top k, kept in a file (distill_cache)


def coarsened_kl(z, teacher_logprobs, k):
    """KL between the teacher and the student coarsened to the teacher's k likeliest tokens plus one bucket for
    the rest, written out from softmax (autograd gives its gradient)."""
    idx = teacher_logprobs.topk(k, dim=-1).indices
    p, q = teacher_logprobs.exp(), z.softmax(-1)
    p_top, q_top = p.gather(-1, idx), q.gather(-1, idx)
    p_c = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    q_c = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    return torch.where(p_c > 0, p_c * (p_c.log() - q_c.log()), 0.0).sum(-1).mean()


def top_k_of(teacher_logits, k):
    top = teacher_logits.float().log_softmax(-1).topk(k, dim=-1)
    return top.indices, top.values


@pytest.mark.parametrize("k", [1, 5, 39])
def test_top_k_kl_is_the_kl_of_the_coarsened_distributions_in_value_and_gradient(monkeypatch, k):
    import adapt
    monkeypatch.setattr(adapt, "KL_CHUNK_ROWS", 4)  # 18 rows: chunks of 4 and a short last one
    torch.manual_seed(2)
    teacher, targets = torch.randn(2, 9, 40) * 3, torch.randint(0, 40, (2, 9))
    z = torch.randn(2, 9, 40, requires_grad=True)
    got = distillation_loss(z * 3, top_k_of(teacher, k), targets, 1.0, 1.0)
    got_grad, = torch.autograd.grad(got, z)
    want = coarsened_kl(z * 3, teacher.log_softmax(-1), k)
    want_grad, = torch.autograd.grad(want, z)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-6, rtol=1e-4)
    assert want_grad.abs().max() > 1e-3
    if k == 39:  # the bucket is one token: the full KL, as the teacher's whole logits give it
        full = distillation_loss(z * 3, teacher, targets, 1.0, 1.0)
        torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_grad, torch.autograd.grad(full, z)[0], atol=1e-6, rtol=1e-4)


def test_top_k_kl_where_the_teacher_puts_all_its_mass_on_k_tokens():
    """r = 0: no bucket term; the gradient off the k tokens is the student's own probability."""
    torch.manual_seed(3)
    z = torch.randn(1, 3, 10, requires_grad=True)
    index = torch.tensor([[[4, 7]] * 3])
    logprob = torch.log(torch.tensor([[[0.75, 0.25]] * 3]))
    got = distillation_loss(z, (index, logprob), torch.zeros(1, 3, dtype=torch.long), 1.0, 1.0)
    got_grad, = torch.autograd.grad(got, z)
    teacher = torch.full((1, 3, 10), -1e4)
    teacher[..., 4], teacher[..., 7] = math.log(0.75), math.log(0.25)
    want = coarsened_kl(z, teacher.log_softmax(-1), 2)
    assert torch.isfinite(got) and torch.isfinite(got_grad).all()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, torch.autograd.grad(want, z)[0])
    with pytest.raises(ValueError, match="temperature 1"):
        distillation_loss(z, (index, logprob), torch.zeros(1, 3, dtype=torch.long), 1.0, 2.0)


CACHED = ["--n_layer=4", "--max_iters=4", "--eval_interval=4", "--distill_alpha=1.0", "--adapt_target=0,1,1,3",
          "--adapt_mode=abrupt", "--gradient_accumulation_steps=2"]


def forward_calls(monkeypatch):
    import model
    calls, real = [], model.Llama.forward
    monkeypatch.setattr(model.Llama, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_a_run_on_the_teachers_top_k_file_learns_as_from_the_teacher_and_a_second_run_reuses_it(
        data_dir, dense_ckpt, tmp_path, monkeypatch, capsys):
    vocab = torch.load(dense_ckpt, weights_only=True)["model_config"]["vocab_size"]
    cache = tmp_path / "teacher_top.pt"
    run(data_dir, tmp_path / "teacher", *CACHED, f"--init_from={dense_ckpt}")
    run(data_dir, tmp_path / "made", *CACHED, f"--init_from={dense_ckpt}", f"--distill_cache={cache}",
        f"--distill_cache_topk={vocab - 1}")
    out = capsys.readouterr().out
    assert "distill_cache: the teacher's top" in out and f"(its top {vocab - 1} tokens from {cache};" in out
    # k = vocab - 1 is the full KL: the same losses and weights as learning from the teacher at every step
    teacher_losses, made_losses = train_losses(tmp_path / "teacher"), train_losses(tmp_path / "made")
    assert sorted(made_losses) == list(range(4))
    for i in range(4):
        assert made_losses[i] == pytest.approx(teacher_losses[i], rel=1e-5)
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["model"] for d in ("teacher", "made"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-4)
    # a second run with the same batches: no new file, no teacher forward, the very same run
    stamp = os.stat(cache).st_mtime_ns
    calls = forward_calls(monkeypatch)
    run(data_dir, tmp_path / "reused", *CACHED, f"--init_from={dense_ckpt}", f"--distill_cache={cache}",
        f"--distill_cache_topk={vocab - 1}")
    assert "distill_cache:" not in capsys.readouterr().out and os.stat(cache).st_mtime_ns == stamp
    assert train_losses(tmp_path / "reused") == made_losses
    with_cache = len(calls)
    calls.clear()
    run(data_dir, tmp_path / "plain", *[a for a in CACHED if "distill" not in a], f"--init_from={dense_ckpt}")
    assert with_cache == len(calls) > 0  # the student's forwards (steps, evaluation) and nothing more
    # a smaller k: a coarser target, whose KL at step 0 (the same model and batch) is below the full one
    # (coarsening two distributions never raises their KL), yet not zero
    run(data_dir, tmp_path / "k2", *CACHED, f"--init_from={dense_ckpt}", f"--distill_cache={tmp_path / 'k2.pt'}",
        "--distill_cache_topk=2")
    assert 0 < train_losses(tmp_path / "k2")[0] < teacher_losses[0]


@pytest.mark.parametrize("change, words", [
    (["--seed=7"], "seed=1337 there, 7 in this run"),
    (["--batch_size=2"], "batch_size=4 there, 2 in this run"),
    (["--max_iters=6", "--eval_interval=6"], "steps=4 there, 6 in this run"),
    (["--distill_cache_topk=3"], "k=2 there, 3 in this run"),
])
def test_a_top_k_file_made_for_other_batches_is_refused_naming_the_difference(data_dir, dense_ckpt, tmp_path,
                                                                              change, words):
    from configurator import ConfigError
    cache = tmp_path / "top.pt"
    run(data_dir, tmp_path / "a", *CACHED, f"--init_from={dense_ckpt}", f"--distill_cache={cache}",
        "--distill_cache_topk=2")
    with pytest.raises(ConfigError, match=words):
        run(data_dir, tmp_path / "b", *CACHED, f"--init_from={dense_ckpt}", f"--distill_cache={cache}",
            "--distill_cache_topk=2", *change)
    assert not os.path.exists(tmp_path / "b" / "ckpt.pt")


@pytest.mark.parametrize("change, words", [
    (["--distill_cache_topk=0"], "distill_cache_topk=0: must lie in 1.."),
    (["--distill_cache_topk=100000"], "distill_cache_topk=100000: must lie in 1.."),
    (["--distill_cache_topk=2", "--distill_temperature=2.0"], "set distill_temperature=1"),
    (["--distill_cache_topk=2", "--distill_reverse=0.5"], "distill_reverse=0"),
    (["--distill_cache_topk=2", "--distill_alpha=0.5", "--distill_hidden=0.2", "--distill_hidden_layers=1"], "distill_hidden=0"),
])
def test_bad_top_k_settings_are_refused_before_work(data_dir, dense_ckpt, tmp_path, change, words):
    from configurator import ConfigError
    with pytest.raises(ConfigError, match=words):
        run(data_dir, tmp_path, *CACHED, f"--init_from={dense_ckpt}", f"--distill_cache={tmp_path / 'top.pt'}", *change)
    assert not os.path.exists(tmp_path / "top.pt")


def test_a_file_that_is_no_top_k_file_is_refused_in_one_line(data_dir, dense_ckpt, tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    rc = run_script(__import__("train").main, TINY + CACHED + [
        f"--dataset={data_dir}", f"--out_dir={tmp_path / 'out'}", f"--init_from={dense_ckpt}",
        f"--distill_cache={tmp_path / 'junk.pt'}", "--distill_cache_topk=2"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "is not a file of the teacher's top-k" in err, err
