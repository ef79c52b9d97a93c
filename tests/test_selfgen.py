"""Self-generated data (selfgen.py, data/smollm2_selfgen/prepare.py) and the evaluation against a teacher
(fidelity.py, evaluate.py), on tiny models with a character tokenizer.json that has ChatML's special tokens."""

import copy
import importlib.util
import json
import math
import os
import string

import numpy as np
import pytest
import torch

from checkpoint import save_checkpoint
from configurator import run_script
from convert_hf import checkpoint_dict
import fidelity
from fidelity import (answer_matches, compare_layers, compare_logits, compare_on_replies, compare_on_windows,
                      fixed_windows, load_questions)
from model import Llama, LlamaConfig
from selfgen import generate_rows, render_chat, split_prompts
from tokenizer import HFTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
CHARS = SPECIALS + [c for c in string.printable if c not in "\t\r\x0b\x0c"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
PROMPTS = ["Say hi.", "Name a color.", "Count to three.", "Why is the sky blue?", "Tell a joke.", "Describe rain.",
           "What is a cat?", "Sing a song.", "Write a word.", "Explain wind."]


def char_tokenizer_json():
    from tokenizers import AddedToken, Tokenizer, decoders, models
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(CHARS)}, merges=[]))
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    tok.decoder = decoders.Fuse()
    return tok.to_str()


def tiny_model(seed=0, kv_source=None, block_size=128, n_layer=3):
    torch.manual_seed(seed)
    config = LlamaConfig(n_layer=n_layer, n_head=4, n_kv_head=2, n_embd=32, vocab_size=len(CHARS), block_size=block_size,
                         **({"kv_source": kv_source} if kv_source else {}))
    model = Llama(config).eval()
    with torch.no_grad():  # GPT-2's 0.02 init gives near-uniform logits: spread them so greedy picks are clear
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    return model


def save_tiny(path, seed=0, kv_source=None, n_layer=3, block_size=128):
    model = tiny_model(seed, kv_source, block_size, n_layer)
    save_checkpoint(checkpoint_dict(model, {"bos_token_id": 1, "eos_token_id": 2}, char_tokenizer_json(),
                                    chat_template=CHATML), str(path))
    return model


def load_prepare():
    path = os.path.join(ROOT, "data", "smollm2_selfgen", "prepare.py")
    spec = importlib.util.spec_from_file_location("selfgen_prepare", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -----------------------------------------------------------------------------
# batched generation


@pytest.mark.parametrize("kv_source", [None, "0,0,2"])
def test_batched_greedy_equals_batch_one_generate_token_for_token(kv_source):
    model = tiny_model(kv_source=kv_source)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, len(CHARS), (n,), generator=gen).tolist() for n in (1, 7, 3, 12, 7, 2)]
    free = [model.generate(torch.tensor([p]), 30, temperature=0)[0, len(p):].tolist() for p in prompts]
    stop = free[3][5]  # a token some row produces: rows stop there, at different steps
    want = [model.generate(torch.tensor([p]), 30, temperature=0, eos_id=stop)[0, len(p):].tolist() for p in prompts]
    want = [w[:w.index(stop) + 1] if stop in w else w for w in want]
    got = generate_rows(model, prompts, 30, temperature=0, stop_ids=stop)
    assert got == want
    assert any(len(w) < 30 for w in want) and any(len(w) == 30 for w in want)  # both endings were exercised


def test_compiled_batched_generation_equals_batch_one_generate():
    """generate_rows through the compiled step (speed.py's paths) gives each row's eager batch-1 greedy
    tokens (fp32: token for token; bf16 rounds too coarsely for that, tests/test_speed_paths.py compares it
    where the choice is clear); a second call with other prompt lengths reuses the graph."""
    from selfgen import compiled_decode_step
    model = tiny_model(seed=2)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, len(CHARS), (n,), generator=gen).tolist() for n in (1, 7, 3, 12, 7, 2)]
    want = [model.generate(torch.tensor([p]), 20, temperature=0)[0, len(p):].tolist() for p in prompts]
    step = compiled_decode_step(model)
    assert generate_rows(model, prompts, 20, temperature=0, decode_step=step) == want
    torch._dynamo.utils.counters.clear()
    shorter = [p[:max(1, len(p) - 1)] for p in prompts]
    generate_rows(model, shorter, 20, temperature=0, decode_step=step)
    assert not torch._dynamo.utils.counters["stats"]["unique_graphs"]  # same batch size, same cache length: no new graph


def test_generate_rows_refuses_what_does_not_fit_the_context():
    with pytest.raises(ValueError, match="exceeds the model's context of 128"):
        generate_rows(tiny_model(), [[3] * 100], 40)


# -----------------------------------------------------------------------------
# the dataset


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_tiny(path)
    return path


def make_selfgen(teacher_path, out, seed=5, tokens=600, val_tokens=300, capsys=None):
    prompts = out.parent / f"{out.name}-prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    argv = [f"--init_from={teacher_path}", f"--out_dir={out}", f"--tokens={tokens}", f"--val_tokens={val_tokens}",
            f"--seed={seed}", "--batch_size=4", "--max_new_tokens=24", f"--prompts={prompts}", "--device=cpu",
            "--compile=False"]  # eager: the compiled step is test_compiled_batched_generation_... below
    assert run_script(load_prepare().main, argv) == 0
    return out


def test_selfgen_dataset_is_in_the_model_tokenizer_with_a_held_out_split_and_reproducible(teacher_path, tmp_path):
    from dataset import load_meta, open_tokens
    a = make_selfgen(teacher_path, tmp_path / "a")
    meta = load_meta(str(a))
    tok = HFTokenizer.load(meta["tokenizer_file"], name="t", dataset=True)
    texts = {}
    for split, budget in (("train", 600), ("val", 300)):
        ids = open_tokens(str(a), split, meta)
        assert budget <= len(ids) < budget + 24 * 4 + 60 and ids.max() < len(CHARS)
        assert tok.encode(tok.decode(ids.tolist())) == ids.tolist()  # the ids are text in this tokenizer
        texts[split] = tok.decode(ids.tolist())
        assert texts[split].endswith("<|endoftext|>") and "<|im_start|>assistant\n" in texts[split]
    val_prompts = meta["selfgen"]["val_prompts"]
    assert meta["selfgen"]["settings"]["dtype"] == "float32"  # the precision sampled in (other precision, other text)
    assert len(val_prompts) == 1 and val_prompts[0] in PROMPTS
    # chat turns in each split answer only that split's prompts; free text starts from BOS and has no template
    asked = {split: {p for p in PROMPTS if f"<|im_start|>user\n{p}<|im_end|>" in t} for split, t in texts.items()}
    assert asked["val"] == set(val_prompts) and asked["train"] and not asked["train"] & set(val_prompts)
    docs = texts["train"].split("<|endoftext|>")[:-1]
    assert any(d.startswith("<|im_start|>user\n") for d in docs)
    assert any(d.startswith("<|im_start|>") and not d.startswith("<|im_start|>user\n") for d in docs)  # free
    b = make_selfgen(teacher_path, tmp_path / "b")
    c = make_selfgen(teacher_path, tmp_path / "c", seed=6)
    for split in ("train", "val"):
        assert (a / f"{split}.bin").read_bytes() == (b / f"{split}.bin").read_bytes()
        assert (a / f"{split}.bin").read_bytes() != (c / f"{split}.bin").read_bytes()


def test_prompt_split_holds_prompts_out_by_seed():
    train, val = split_prompts(PROMPTS, 0.2, seed=3)
    assert len(val) == 2 and sorted(train + val) == sorted(PROMPTS) and not set(train) & set(val)
    assert split_prompts(PROMPTS, 0.2, seed=3) == (train, val)


def test_chat_template_renders_one_user_turn():
    text = render_chat(CHATML, [{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="no chat template"):
        render_chat(None, [{"role": "user", "content": "Hi"}])


@pytest.mark.parametrize("argv, words", [(["--tokens=0"], "--tokens"), (["--chat_fraction=2"], "chat_fraction"),
                                         (["--prompts=/nonexistent.txt"], "--prompts"),
                                         (["--init_from=/nonexistent.pt"], "does not exist")])
def test_selfgen_bad_input_is_one_line(argv, words, capsys, tmp_path):
    assert run_script(load_prepare().main, argv + [f"--out_dir={tmp_path / 'x'}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and not (tmp_path / "x").exists()


# -----------------------------------------------------------------------------
# the figures, by hand


def test_compare_logits_equals_the_explicit_formulas():
    s = [[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]]
    t = [[1.0, 1.5, 0.0], [0.3, 0.1, 2.0]]
    targets = [1, 2]
    want_kl, want_s, want_t, agree = 0.0, 0.0, 0.0, 0
    for srow, trow, y in zip(s, t, targets):
        zs, zt = sum(math.exp(v) for v in srow), sum(math.exp(v) for v in trow)
        ps, pt = [math.exp(v) / zs for v in srow], [math.exp(v) / zt for v in trow]
        want_kl += sum(b * math.log(b / a) for a, b in zip(ps, pt))
        want_s, want_t = want_s - math.log(ps[y]), want_t - math.log(pt[y])
        agree += srow.index(max(srow)) == trow.index(max(trow))
    got = compare_logits(torch.tensor(s), torch.tensor(t), torch.tensor(targets))
    assert got["tokens"] == 2 and got["agree"] == agree == 1
    assert got["kl"] == pytest.approx(want_kl, rel=1e-5) and want_kl > 0.1
    assert got["student_nll"] == pytest.approx(want_s, rel=1e-5) and got["teacher_nll"] == pytest.approx(want_t, rel=1e-5)


def test_compare_logits_in_row_chunks_equals_the_whole_in_float64(monkeypatch):
    """7 rows in chunks of 3 (a short last chunk), bf16 logits as the models give them: the sums equal the
    float64 formulas over all rows at once."""
    g = torch.Generator().manual_seed(0)
    s, t = (torch.randn(7, 50, generator=g) * 2).bfloat16(), (torch.randn(7, 50, generator=g) * 2).bfloat16()
    s[3] = t[3]  # one row where the argmaxes agree for sure
    y = torch.randint(0, 50, (7,), generator=g)
    monkeypatch.setattr(fidelity, "COMPARE_ROWS", 3)
    got = compare_logits(s, t, y)
    ls, lt = s.double().log_softmax(-1), t.double().log_softmax(-1)
    assert got["tokens"] == 7
    assert got["kl"] == pytest.approx(float((lt.exp() * (lt - ls)).sum()), rel=1e-5)
    assert got["student_nll"] == pytest.approx(float(-ls[range(7), y].sum()), rel=1e-5)
    assert got["teacher_nll"] == pytest.approx(float(-lt[range(7), y].sum()), rel=1e-5)
    assert got["agree"] == int((s.argmax(-1) == t.argmax(-1)).sum()) >= 1


def test_agreement_takes_the_first_of_tied_maxima():
    """A student row whose top two logits tie agrees with a teacher whose argmax is the first of them, not with
    one whose argmax is the second (the ids argmax gives: the first maximum)."""
    tied = torch.tensor([[0.0, 3.0, 1.0, 0.5, 3.0]]).bfloat16()
    first, second = torch.tensor([[0.0, 5.0, 1.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 1.0, 0.0, 5.0]])
    assert compare_logits(tied, first.bfloat16(), torch.tensor([0]))["agree"] == 1
    assert compare_logits(tied, second.bfloat16(), torch.tensor([0]))["agree"] == 0


def test_tiny_model_figures_equal_a_per_token_computation():
    student, teacher = tiny_model(seed=1), tiny_model(seed=2)
    tokens = np.random.default_rng(0).integers(0, len(CHARS), 400)
    windows = fixed_windows(tokens, 60, 16)  # 4 windows of 16, spread over the file
    assert windows.shape == (4, 17) and windows[0, 0] == tokens[0] and windows[-1, -1] == tokens[-1]
    got = compare_on_windows(student, teacher, windows, batch_size=3)
    assert got["tokens"] == 64 and got["left_out"] == 0
    assert_hand_figures(got, student, teacher, windows)
    assert 0 < got["agreement"] < 1 and got["kl"] > 0.01  # two different models: the figures can tell


def assert_hand_figures(got, student, teacher, windows, document_end=None):
    """got (compare_on_windows') against the same figures computed position by position in float64, leaving out
    the positions whose input token is document_end."""
    kl = nll_s = nll_t = agree = n = 0.0
    with torch.no_grad():
        for w in windows:
            ls, _ = student(torch.tensor(w[None, :-1]))
            lt, _ = teacher(torch.tensor(w[None, :-1]))
            for pos in range(len(w) - 1):
                if w[pos] == document_end:
                    continue
                ps, pt = torch.softmax(ls[0, pos].double(), -1), torch.softmax(lt[0, pos].double(), -1)
                kl += float((pt * (pt / ps).log()).sum())
                nll_s -= math.log(ps[w[pos + 1]])
                nll_t -= math.log(pt[w[pos + 1]])
                agree += int(ps.argmax() == pt.argmax())
                n += 1
    assert got["tokens"] == n
    assert got["kl"] == pytest.approx(kl / n, rel=1e-4) and got["agreement"] == agree / n
    assert got["student_ppl"] == pytest.approx(math.exp(nll_s / n), rel=1e-4)
    assert got["ppl_ratio"] == pytest.approx(math.exp((nll_s - nll_t) / n), rel=1e-4)


def test_positions_after_a_document_end_are_left_out():
    """Where a file joins documents (selfgen's samples), the position that reads a document's end predicts the next
    document's first token: the file's order, not the text. Those positions count in no figure."""
    student, teacher = tiny_model(seed=1), tiny_model(seed=2)
    tokens = np.random.default_rng(0).integers(1, len(CHARS), 400)
    tokens[[3, 10, 150, 399]] = 0  # document ends, one the file's last token (a target only, never read)
    windows = fixed_windows(tokens, 60, 16)
    ends = int((windows[:, :-1] == 0).sum())
    assert ends >= 2
    got = compare_on_windows(student, teacher, windows, batch_size=3, document_end=0)
    assert got["left_out"] == ends and got["tokens"] == 64 - ends
    assert_hand_figures(got, student, teacher, windows, document_end=0)
    every = compare_on_windows(student, teacher, windows, batch_size=3)
    assert every["tokens"] == 64 and every["kl"] != pytest.approx(got["kl"], rel=1e-6)


def on_map_of(teacher, kv_source, seed=5):
    """A model on kv_source holding the teacher's weights (its consumers without K/V projections)."""
    model = tiny_model(seed=seed, kv_source=kv_source, n_layer=len(kv_source))
    mine = model.state_dict()
    model.load_state_dict({k: v for k, v in teacher.state_dict().items() if k in mine})
    return model


def nudge(module, seed):
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std())


def test_layer_figures_put_the_distance_at_the_one_layer_that_differs():
    teacher = tiny_model(seed=0, n_layer=4)
    student = on_map_of(teacher, [0, 1, 2, 3])
    nudge(student.layers[2].mlp, 1)
    windows = fixed_windows(np.random.default_rng(0).integers(0, len(CHARS), 400), 48, 16)
    r = compare_layers(student, teacher, windows)
    whole = compare_on_windows(student, teacher, windows)["kl"]
    assert whole > 0.01 and r["alone"][2] == pytest.approx(whole, rel=1e-5)
    assert [r["alone"][l] for l in (0, 1, 3)] == [0.0, 0.0, 0.0] and r["up_to"][:2] == [0.0, 0.0]
    assert r["up_to"][2] == pytest.approx(whole, rel=1e-5) and r["up_to"][3] == pytest.approx(whole, rel=1e-5)
    assert compare_layers(teacher, teacher, windows) == {"alone": [0.0] * 4, "up_to": [0.0] * 4, "positions": 48}


def test_layer_figures_of_a_shared_student_equal_models_built_by_hand():
    """Layer 2 of the student reads layer 0's K/V, and the student's layer 0 differs from the teacher's: alone,
    its layer 2 attends over the teacher's layer-0 K/V, which is the student's map with the teacher's layer 0."""
    teacher = tiny_model(seed=0, n_layer=4)
    student = on_map_of(teacher, [0, 1, 0, 3])
    nudge(student.layers[0].self_attn, 2)
    windows = fixed_windows(np.random.default_rng(1).integers(0, len(CHARS), 400), 48, 16)
    r = compare_layers(student, teacher, windows)
    switch_alone = on_map_of(teacher, [0, 1, 0, 3])  # the switch, every weight the teacher's
    first_alone = copy.deepcopy(teacher)
    first_alone.layers[0].load_state_dict(student.layers[0].state_dict())  # the teacher with the student's layer 0
    assert r["alone"][2] == pytest.approx(compare_on_windows(switch_alone, teacher, windows)["kl"], rel=1e-5)
    assert r["alone"][0] == pytest.approx(compare_on_windows(first_alone, teacher, windows)["kl"], rel=1e-5)
    assert r["up_to"][3] == pytest.approx(compare_on_windows(student, teacher, windows)["kl"], rel=1e-5)
    assert r["alone"][1] == r["alone"][3] == 0.0 and min(r["alone"][0], r["alone"][2], r["up_to"][3]) > 1e-3
    assert r["up_to"][2] != pytest.approx(r["alone"][2], rel=1e-3)  # layer 2 now reads the student's layer 0


def test_layer_figures_skip_a_mix_whose_consumer_would_read_a_layer_without_k_v():
    teacher = on_map_of(tiny_model(seed=0, n_layer=4), [0, 1, 1, 3])  # the teacher's layer 2 reads layer 1
    student = on_map_of(tiny_model(seed=0, n_layer=4), [0, 0, 2, 3])  # the student's layer 1 has no K/V
    windows = fixed_windows(np.random.default_rng(2).integers(0, len(CHARS), 200), 16, 16)
    r = compare_layers(student, teacher, windows)
    assert r["alone"][1] is None and r["up_to"][1] is None
    assert all(isinstance(r[k][l], float) for k, l in [("alone", 0), ("alone", 2), ("up_to", 2), ("up_to", 3)])


def test_figures_over_replies_count_the_reply_positions_only():
    """Both models read prompt + reply; only the positions that predict a reply token count (a prompt's own
    positions do not), each as the per-token formulas by hand."""
    student, teacher = tiny_model(seed=1), tiny_model(seed=2)
    prompts, replies = [[1, 5, 6, 7], [1, 8]], [[9, 10, 2], [11, 12, 13, 14]]
    got = compare_on_replies(student, teacher, prompts, replies)
    kl = nll_s = nll_t = agree = 0.0
    with torch.no_grad():
        for p, r in zip(prompts, replies):
            ids = torch.tensor([p + r])
            ls, _ = student(ids[:, :-1])
            lt, _ = teacher(ids[:, :-1])
            for pos in range(len(p) - 1, len(p) + len(r) - 1):
                ps, pt = torch.softmax(ls[0, pos].double(), -1), torch.softmax(lt[0, pos].double(), -1)
                kl += float((pt * (pt / ps).log()).sum())
                nll_s -= math.log(ps[ids[0, pos + 1]])
                nll_t -= math.log(pt[ids[0, pos + 1]])
                agree += int(ps.argmax() == pt.argmax())
    assert got["tokens"] == 7
    assert got["kl"] == pytest.approx(kl / 7, rel=1e-4) and got["agreement"] == agree / 7
    assert got["ppl_ratio"] == pytest.approx(math.exp((nll_s - nll_t) / 7), rel=1e-4)
    longer = compare_on_replies(student, teacher, [[1, 3, 4] + p for p in prompts], replies)
    assert longer["tokens"] == 7 and longer["kl"] != got["kl"]  # the same reply positions, in another context


# -----------------------------------------------------------------------------
# chat matching


@pytest.mark.parametrize("answer, expected, right", [
    ("The capital of France is Paris.", ["Paris"], True),
    ("the capital is PARIS", ["paris"], True),
    ("It is 4.", ["4", "four"], True),
    ("It is fourteen, or 14.", ["4", "four"], False),
    ("Water freezes at -18.0 degrees.", ["0", "zero"], False),
    ("About 4.5 of them.", ["4"], False),
    ("1,000 people", ["000"], False),
    ("Carbon dioxide (CO2) is taken in.", ["carbon  dioxide"], True),
    ("The sun is a star.", ["stars"], False),
    ("It is a starfish.", ["star"], False),
    ("Leonardo da\nVinci painted it.", ["da Vinci"], True),
    ("", ["x"], False),
])
def test_chat_matching_on_fixed_strings(answer, expected, right):
    assert answer_matches(answer, expected) is right


def test_committed_question_set_is_well_formed():
    qs = load_questions(os.path.join(ROOT, "data", "chat_questions.json"))
    assert len(qs) >= 50 and len({q["question"] for q in qs}) == len(qs)
    assert {q["category"] for q in qs} == {"facts", "arithmetic", "definitions", "instructions"}


# -----------------------------------------------------------------------------
# evaluate.py end to end


def run_evaluate(student, teacher, set_path, tmp_path, capsys, extra=()):
    import evaluate
    qs = tmp_path / "q.json"
    qs.write_text(json.dumps([{"category": "facts", "question": p, "expected": ["a"]} for p in PROMPTS[:5]]))
    out = tmp_path / "eval.json"
    argv = [f"--init_from={student}", f"--teacher={teacher}", f"--sets={set_path}", "--tokens=64", "--block_size=16",
            f"--questions={qs}", "--chat_batch_size=2", "--max_new_tokens=8", f"--out={out}", "--device=cpu", *extra]
    rc = run_script(evaluate.main, argv)
    assert rc == 0, capsys.readouterr().err
    return json.loads(out.read_text())


def test_evaluate_a_model_against_itself_gives_ratio_one_kl_zero_agreement_one(teacher_path, tmp_path, capsys):
    data = make_selfgen(teacher_path, tmp_path / "data", tokens=200, val_tokens=200)
    r = run_evaluate(teacher_path, teacher_path, data / "val.bin", tmp_path, capsys)
    figures = r["sets"][str(data / "val.bin")]
    assert figures["tokens"] + figures["left_out"] == 64 and figures["ppl_ratio"] == 1.0 and figures["kl"] == 0.0
    assert figures["agreement"] == 1.0 and figures["student_ppl"] > 1
    assert r["chat"]["same_as_teacher"] == 5 and r["chat"]["correct"] == r["chat"]["teacher_correct"]
    on = r["chat"]["on_teacher_answers"]
    assert 5 <= on["tokens"] <= 40 and on["kl"] == 0.0 and on["agreement"] == 1.0 and on["ppl_ratio"] == 1.0


def test_evaluate_another_student_reports_the_hand_computed_figures(teacher_path, tmp_path, capsys):
    from dataset import load_meta, open_tokens
    student_path = tmp_path / "student.pt"
    student = save_tiny(student_path, seed=9)
    data = make_selfgen(teacher_path, tmp_path / "data", tokens=200, val_tokens=200)
    r = run_evaluate(student_path, teacher_path, data / "val.bin", tmp_path, capsys)
    figures = r["sets"][str(data / "val.bin")]
    meta = load_meta(str(data))
    windows = fixed_windows(open_tokens(str(data), "val", meta), 64, 16)
    want = compare_on_windows(student, tiny_model(), windows, document_end=meta["eot_token"])
    assert figures["left_out"] == want["left_out"] == int((windows[:, :-1] == meta["eot_token"]).sum())
    assert figures["kl"] == pytest.approx(want["kl"], rel=1e-5) and figures["kl"] > 0.01
    assert figures["agreement"] == want["agreement"] < 1
    assert figures["ppl_ratio"] == pytest.approx(want["ppl_ratio"], rel=1e-5)
    on = r["chat"]["on_teacher_answers"]  # 5 answers of at most 8 tokens, read by two different models
    assert 5 <= on["tokens"] <= 40 and on["kl"] > 0.01


def test_evaluate_by_layer_reports_compare_layers_over_the_first_set(teacher_path, tmp_path, capsys):
    from dataset import load_meta, open_tokens
    student_path = tmp_path / "student.pt"
    student = save_tiny(student_path, seed=9)
    data = make_selfgen(teacher_path, tmp_path / "data", tokens=200, val_tokens=200)
    r = run_evaluate(student_path, teacher_path, data / "val.bin", tmp_path, capsys, ["--layers=32", "--chat=False"])
    meta = load_meta(str(data))
    windows = fixed_windows(open_tokens(str(data), "val", meta), 32, 16)
    want = compare_layers(student, tiny_model(), windows, document_end=meta["eot_token"])
    ends = int((windows[:, :-1] == meta["eot_token"]).sum())  # positions that read a document's end: left out
    assert r["layers"]["positions"] == want["positions"] == 32 - ends and r["layers"]["set"] == str(data / "val.bin")
    assert r["layers"]["alone"] == pytest.approx(want["alone"], rel=1e-5)
    assert r["layers"]["up_to"] == pytest.approx(want["up_to"], rel=1e-5) and min(want["alone"]) > 0.001


def test_evaluate_by_layer_refuses_models_of_another_depth_in_one_line(teacher_path, tmp_path, capsys):
    import evaluate
    save_tiny(tmp_path / "shallow.pt", seed=9, n_layer=2)  # the teacher has 3
    data = make_selfgen(teacher_path, tmp_path / "data", tokens=200, val_tokens=200)
    argv = [f"--init_from={tmp_path / 'shallow.pt'}", f"--teacher={teacher_path}", f"--sets={data / 'val.bin'}",
            "--tokens=16", "--block_size=16", "--layers=16", "--chat=False", f"--out={tmp_path / 'e.json'}"]
    assert run_script(evaluate.main, argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--layers" in err and "2 layers" in err and not (tmp_path / "e.json").exists()


def test_evaluate_refuses_windows_longer_than_a_models_context_in_one_line(teacher_path, tmp_path, capsys):
    import evaluate
    save_tiny(tmp_path / "short.pt", seed=9, block_size=8)  # as train.py leaves a run at --block_size=8
    data = make_selfgen(teacher_path, tmp_path / "data", tokens=200, val_tokens=200)
    argv = [f"--init_from={tmp_path / 'short.pt'}", f"--teacher={teacher_path}", f"--sets={data / 'val.bin'}",
            "--tokens=16", "--block_size=16", "--chat=False", f"--out={tmp_path / 'e.json'}"]
    assert run_script(evaluate.main, argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--block_size=16" in err and "the student's context (8" in err
    assert not (tmp_path / "e.json").exists()
    assert run_script(evaluate.main, [*argv[:4], "--block_size=8", *argv[5:]]) == 0  # within it: evaluated


@pytest.mark.parametrize("argv, words", [([], "--teacher"), (["--sets=nope"], "unknown set"),
                                         (["--layers=-1"], "--layers=-1"), (["--layers=64", "--sets="], "--layers=64"),
                                         (["--sets=/x/none.bin"], "/x/none.bin"), (["--tokens=0"], "--tokens"),
                                         (["--delta=/x/none.safetensors"], "--delta=/x/none.safetensors")])
def test_evaluate_bad_input_is_one_line(argv, words, capsys, tmp_path, teacher_path):
    import evaluate
    base = [] if not argv else [f"--init_from={teacher_path}", f"--teacher={teacher_path}"]
    assert run_script(evaluate.main, base + argv + [f"--out={tmp_path / 'e.json'}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and not (tmp_path / "e.json").exists()
