"""sample.py end to end: HF directories, converted checkpoints and train.py-style checkpoints with a
dataset meta.json; the timed generation loop against model.generate; every bad input's error."""

import os
import subprocess
import sys

import pytest
import torch
from torch.nn import Linear

import sample
import speed
from configurator import run_script
from dataset import write_meta
from model import Llama, LlamaConfig
from quantize import QUANTIZERS, Int4Linear, Int8Linear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHARS = ["<unk>"] + list(" \nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,:;!?'-")


def char_tokenizer_json():
    """A tokenizer.json (tokenizers library) with one token per character."""
    from tokenizers import Tokenizer, decoders, models
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(CHARS)}, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return tok


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    import transformers
    path = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=len(CHARS), max_position_embeddings=48,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(path)
    char_tokenizer_json().save(str(path / "tokenizer.json"))
    return path, hf


def run_main(argv, capsys):
    rc = run_script(sample.main, argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_sample_from_hf_dir_matches_transformers_greedy(hf_dir, capsys):
    path, hf = hf_dir
    rc, out, err = run_main([f"--init_from={path}", "--start=hello world", "--max_new_tokens=16",
                             "--temperature=0", "--device=cpu"], capsys)
    assert rc == 0, err
    tok = char_tokenizer_json()
    ids = torch.tensor([tok.encode("hello world").ids])
    want = hf.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert out.split("\n---------------\n")[0] == tok.decode(want[0].tolist())
    assert out.startswith("hello world")


def test_sample_from_converted_checkpoint_prints_text_and_speed(hf_dir, tmp_path, capsys):
    from convert_hf import convert
    path, _ = hf_dir
    convert(path, tmp_path / "c.pt", kv_source="upper:1", kv_init="mean")
    argv = [f"--init_from={tmp_path / 'c.pt'}", "--start=the ", "--max_new_tokens=20", "--num_samples=2",
            "--top_k=5", "--seed=7", "--show_speed=True", "--device=cpu"]
    rc, out, err = run_main(argv, capsys)
    assert rc == 0, err
    assert out.count("---------------") == 2 and out.count("[speed] 20 new tokens") == 2
    texts = [t.strip("\n") for t in out.split("---------------") if t.strip()]
    assert all(t.startswith("the ") for t in texts)
    rc, again, _ = run_main(argv, capsys)  # the seed fixes the samples
    strip = lambda s: [line for line in s.splitlines() if not line.startswith("[speed]")]  # noqa: E731
    assert strip(again) == strip(out)


def tiny_model(block_size=16, kv_source="0,0,2"):
    torch.manual_seed(0)
    return Llama(LlamaConfig(n_layer=3, n_head=4, n_kv_head=2, n_embd=64, vocab_size=50, block_size=block_size,
                             kv_source=kv_source)).eval()


@pytest.mark.parametrize("prompt_len", [5, 16, 23])
def test_generation_past_the_context_equals_no_cache_over_the_same_window(prompt_len):
    """Past block_size, generation re-prefills the most recent 3/4 of block_size tokens and goes on; each token
    equals the argmax of a no-cache forward over exactly that window (positions from 0)."""
    model, W = tiny_model(), 16
    x = torch.randint(0, 50, (2, prompt_len), generator=torch.Generator().manual_seed(1))
    out = model.generate(x, 40, temperature=0)
    assert out.shape == (2, prompt_len + 40)
    length = min(prompt_len, W)  # the window the next token is predicted from
    with torch.no_grad():
        for n in range(prompt_len, prompt_len + 40):
            logits, _ = model(out[:, n - length:n])
            assert torch.equal(out[:, n], logits[:, -1].argmax(-1)), n
            length = W - W // 4 if length == W else length + 1


def test_generation_stops_at_eos_per_row():
    model = tiny_model(block_size=64)
    x = torch.randint(0, 50, (2, 4), generator=torch.Generator().manual_seed(2))
    free = model.generate(x, 20, temperature=0)
    eos = int(free[0, 7])  # plant: row 0 produces this token at position 7
    first = {r: next((n for n in range(4, 24) if free[r, n] == eos), None) for r in (0, 1)}
    out = model.generate(x, 20, temperature=0, eos_id=eos)
    for r in (0, 1):
        stop = first[r]
        if stop is None:
            assert torch.equal(out[r], free[r, :out.shape[1]])
        else:
            assert torch.equal(out[r, :stop + 1], free[r, :stop + 1]) and (out[r, stop:] == eos).all()
    if all(first.values()):  # every row stopped: generation ends at the later stop
        assert out.shape[1] == max(first.values()) + 1
    else:
        assert out.shape[1] == 24


def test_generate_with_a_given_decode_step_gives_the_same_tokens():
    model = tiny_model(block_size=40)
    x = torch.randint(0, 50, (2, 5))
    calls = []

    def step(token, pos, cache):
        calls.append(int(pos))
        return model.decode_step(token, pos, cache)

    torch.manual_seed(3)
    want = model.generate(x, 20, temperature=0.9, top_k=7)
    torch.manual_seed(3)
    assert torch.equal(model.generate(x, 20, temperature=0.9, top_k=7, decode_step=step), want)
    assert calls == list(range(5, 24))


def save_train_style_checkpoint(path, vocab_size, dataset, block_size=32):
    torch.manual_seed(0)
    model = Llama(LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, vocab_size=vocab_size,
                              block_size=block_size, kv_source="cla:2"))
    ckpt = {"model": model.state_dict(), "model_config": model.config.to_dict(), "config": {"dataset": dataset},
            "iter_num": 0}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(ckpt, path)
    return model


def test_sample_train_checkpoint_with_char_meta(tmp_path, capsys):
    chars = sorted(set("first citizen: before we proceed any further, hear me speak.\n"))
    os.makedirs(tmp_path / "data" / "tiny_char")
    write_meta(tmp_path / "data" / "tiny_char", len(chars), "char", chars=chars)
    save_train_style_checkpoint(str(tmp_path / "out" / "ckpt.pt"), len(chars), "tiny_char")
    (tmp_path / "prompt.txt").write_text("first ")
    rc, out, err = run_main([f"--init_from={tmp_path / 'out'}", f"--start=FILE:{tmp_path / 'prompt.txt'}",
                             f"--data_dir={tmp_path / 'data'}", "--max_new_tokens=10", "--device=cpu"], capsys)
    assert rc == 0, err
    text = out.split("\n---------------")[0]
    assert text.startswith("first ") and len(text) == 16 and set(text) <= set(chars)


def test_train_checkpoint_needs_neither_tokenizers_nor_safetensors_nor_transformers(tmp_path):
    chars = list("abc \n")
    os.makedirs(tmp_path / "data" / "abc")
    write_meta(tmp_path / "data" / "abc", len(chars), "char", chars=chars)
    save_train_style_checkpoint(str(tmp_path / "ckpt.pt"), len(chars), "abc")
    code = ("import sys; [sys.modules.__setitem__(m, None) for m in ('tokenizers', 'safetensors', 'transformers')]; "
            "import sample, configurator; sys.exit(configurator.run_script(sample.main, sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, f"--init_from={tmp_path / 'ckpt.pt'}", "--start=ab",
                        f"--data_dir={tmp_path / 'data'}", "--max_new_tokens=5", "--device=cpu"],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ab") and len(r.stdout.split("\n---------------")[0]) == 7


def test_gpt2_meta_builds_tiktoken_offline(tmp_path, capsys):
    os.makedirs(tmp_path / "data" / "owt")
    write_meta(tmp_path / "data" / "owt", 50257, "gpt2", eot_token=50256)
    tok = sample.dataset_tokenizer(str(tmp_path / "data" / "owt"))
    assert tok.encode("Hello world<|endoftext|>") == [15496, 995, 50256]
    assert tok.decode([15496, 995]) == "Hello world"
    save_train_style_checkpoint(str(tmp_path / "ckpt.pt"), 50257, "owt")
    rc, out, err = run_main([f"--init_from={tmp_path / 'ckpt.pt'}", "--start=Hello", f"--data_dir={tmp_path / 'data'}",
                             "--max_new_tokens=4", "--device=cpu"], capsys)
    assert rc == 0, err
    assert out.startswith("Hello")


def test_compiled_decode_gives_the_same_tokens(tmp_path, capsys):
    """The one test here that compiles (10-25 s cold on a CPU)."""
    path = tmp_path / "ckpt.pt"
    model = save_train_style_checkpoint(str(path), len(CHARS), "none")
    ckpt = torch.load(path, weights_only=False)
    ckpt["tokenizer_json"] = char_tokenizer_json().to_str()
    torch.save(ckpt, path)
    base = [f"--init_from={path}", "--start=abc", "--max_new_tokens=8", "--temperature=0", "--device=cpu"]
    rc, eager, err = run_main(base, capsys)
    assert rc == 0, err
    rc, compiled, err = run_main(base + ["--compile=True", "--show_speed=True"], capsys)
    assert rc == 0, err
    assert "not counted" in compiled  # compiled before generation: the speed line leaves it out
    assert [line for line in compiled.splitlines() if not line.startswith("[speed]")] == eager.splitlines()
    del model


@pytest.mark.parametrize("kind, quantized", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_quantized_sampling_quantizes_every_linear_layer(kind, quantized, tmp_path, capsys, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_train_style_checkpoint(str(path), len(CHARS), "none")
    ckpt = torch.load(path, weights_only=False)
    ckpt["tokenizer_json"] = char_tokenizer_json().to_str()
    torch.save(ckpt, path)
    seen, quantize = [], QUANTIZERS[kind]
    monkeypatch.setitem(sample.QUANTIZERS, kind, lambda m: seen.append(quantize(m)))
    rc, out, err = run_main([f"--init_from={path}", "--start=abc", "--max_new_tokens=8", "--temperature=0",
                             "--device=cpu", "--dtype=bf16", f"--quantize={kind}"], capsys)
    assert rc == 0, err
    assert out.startswith("abc") and len(out.split("---------------")[0].strip()) >= 3
    assert len(seen) == 1 and not any(isinstance(m, Linear) for m in seen[0].modules())
    attn = seen[0].layers[0].self_attn  # its q, k and v joined after quantizing (speed.fuse_projections)
    codes = torch.int8 if kind == "int8" else torch.uint8  # 4-bit: two a byte
    in_blocks = speed.blocks_apply(codes)  # where the CPU has AVX-512 VNNI
    for proj in (attn.qkv_proj, attn.o_proj):  # codes of 16-row multiples in blocks (speed.block_weights)
        if isinstance(proj, speed.BlockedLinear):
            assert in_blocks and proj.blocks.dtype == codes
        else:
            assert isinstance(proj, quantized) and not (in_blocks and proj.weight.shape[0] % 16 == 0
                                                         and proj.weight.shape[1] % 32 == 0)


# -----------------------------------------------------------------------------
# bad input: a clear message and a nonzero exit, no traceback


def test_missing_checkpoint_exits_nonzero_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "sample.py", f"--init_from={tmp_path / 'nope.pt'}"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_prompt_and_generation_longer_than_context(hf_dir, capsys):
    path, _ = hf_dir  # block_size 48
    rc, out, err = run_main([f"--init_from={path}", "--start=" + "a" * 60, "--max_new_tokens=10", "--device=cpu"], capsys)
    assert rc == 0, err
    assert out.startswith("a" * 60) and len(out.split("\n---------------")[0]) >= 70
    rc, out, err = run_main([f"--init_from={path}", "--start=abc", "--max_new_tokens=100", "--device=cpu"], capsys)
    assert rc == 0, err
    assert out.startswith("abc") and len(out.split("\n---------------")[0]) >= 103


def test_unknown_tokenizer(tmp_path, capsys):
    save_train_style_checkpoint(str(tmp_path / "ckpt.pt"), 20, "missing_dataset")
    rc, _, err = run_main([f"--init_from={tmp_path / 'ckpt.pt'}", f"--data_dir={tmp_path}", "--device=cpu"], capsys)
    assert rc == 1 and "unknown tokenizer" in err and "missing_dataset" in err
    os.makedirs(tmp_path / "missing_dataset")
    write_meta(tmp_path / "missing_dataset", 20, "sentencepiece")
    rc, _, err = run_main([f"--init_from={tmp_path / 'ckpt.pt'}", f"--data_dir={tmp_path}", "--device=cpu"], capsys)
    assert rc == 1 and "unknown tokenizer 'sentencepiece'" in err
    rc, _, err = run_main([f"--init_from={tmp_path / 'ckpt.pt'}", "--tokenizer=klingon", "--device=cpu"], capsys)
    assert rc == 1 and "unknown tokenizer 'klingon'" in err
    torch.save({"model": torch.load(tmp_path / "ckpt.pt", weights_only=False)["model"],
                "model_config": torch.load(tmp_path / "ckpt.pt", weights_only=False)["model_config"]}, tmp_path / "bare.pt")
    rc, _, err = run_main([f"--init_from={tmp_path / 'bare.pt'}", "--device=cpu"], capsys)
    assert rc == 1 and "unknown tokenizer" in err and "--tokenizer=" in err


def test_other_bad_inputs(hf_dir, tmp_path, capsys):
    path, _ = hf_dir
    rc, _, err = run_main([f"--init_from={path}", f"--start=FILE:{tmp_path / 'none.txt'}"], capsys)
    assert rc == 1 and "cannot read the prompt file" in err
    rc, _, err = run_main([f"--init_from={path}", "--start=hello \u00e9", "--tokenizer=gpt2", "--device=cpu"], capsys) \
        if os.path.isfile(os.path.join(ROOT, "data", "gpt2.tiktoken")) else (1, "", "wrong tokenizer for this checkpoint")
    assert rc == 1 and "wrong tokenizer for this checkpoint" in err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    rc, _, err = run_main([f"--init_from={tmp_path / 'junk.pt'}"], capsys)
    assert rc == 1 and "cannot be read" in err
    os.makedirs(tmp_path / "empty")
    rc, _, err = run_main([f"--init_from={tmp_path / 'empty'}"], capsys)
    assert rc == 1 and "neither config.json" in err
    rc, _, err = run_main([f"--init_from={path}", "--device=cpu", "--dtype=fp32", "--quantize=int8"], capsys)
    assert rc == 1 and "--quantize=int8 on a CPU needs --dtype=bfloat16" in err
    rc, _, err = run_main([f"--init_from={path}", "--quantize=int3"], capsys)
    assert rc == 1 and "int3" in err and "int4" in err and "int8" in err


def test_meta_carried_in_the_checkpoint(tmp_path, capsys):
    chars = list("xyz \n")
    save_train_style_checkpoint(str(tmp_path / "ckpt.pt"), len(chars), "gone")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    ckpt["meta"] = {"vocab_size": len(chars), "dtype": "uint16", "tokenizer": "char", "chars": chars}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    rc, out, err = run_main([f"--init_from={tmp_path / 'ckpt.pt'}", "--start=xy", "--max_new_tokens=3",
                             "--device=cpu"], capsys)
    assert rc == 0, err
    assert out.startswith("xy") and set(out.split("\n---------------")[0]) <= set(chars)


def test_char_prompt_outside_the_table_and_bad_meta(tmp_path, capsys):
    chars = list("xyz \n")
    os.makedirs(tmp_path / "d")
    write_meta(tmp_path / "d", len(chars), "char", chars=chars)
    save_train_style_checkpoint(str(tmp_path / "ckpt.pt"), len(chars), "d")
    rc, _, err = run_main([f"--init_from={tmp_path / 'ckpt.pt'}", "--start=xyq", f"--data_dir={tmp_path}",
                           "--device=cpu"], capsys)
    assert rc == 1 and err.startswith("error: the prompt cannot be encoded") and "'q'" in err
    assert err.count("\n") == 1
    (tmp_path / "d" / "meta.json").write_text("{not json")
    rc, _, err = run_main([f"--init_from={tmp_path / 'ckpt.pt'}", f"--data_dir={tmp_path}", "--device=cpu"], capsys)
    assert rc == 1 and "cannot read" in err and "meta.json" in err
    with pytest.raises(sample.SampleError, match="lacks 'chars'"):
        sample.meta_tokenizer({"vocab_size": 3, "tokenizer": "char"}, "meta")


def test_ids_beyond_the_dataset_vocabulary_decode_as_replacement_characters():
    """train.py allows a model vocabulary bigger than the dataset's; those ids must not crash decode."""
    tok = sample.meta_tokenizer({"vocab_size": 2, "tokenizer": "char", "chars": ["a", "b"]}, "meta")
    assert tok.decode([0, 5, 1, 1, 9]) == "a\ufffdbb\ufffd"
