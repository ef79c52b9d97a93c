"""convert_hf.py export keeps what sampling and chat need: a chat checkpoint's export carries its tokenizer,
chat template, special tokens and generation config, so that sample.py --chat and transformers
(AutoTokenizer.apply_chat_template, generate) use it as the checkpoint was used; a char model's export
carries its character table (meta.json)."""

import json
import os

import pytest
import torch

import sample
from checkpoint import hf_config_from_llama, save_checkpoint
from configurator import run_script
from convert_hf import checkpoint_dict, read_chat_template
from convert_hf import main as convert_main
from model import Llama, LlamaConfig

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML as SmolLM2-Instruct writes it (a default system turn, the generation prompt), opened by the
# bos_token so that the special tokens' texts matter to the comparison
CHATML = ("{{ bos_token }}{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QUESTION = "Where is the cat, and what is 12 + 7?"


@pytest.fixture(scope="module")
def tokenizer_json():
    """A small byte-level BPE trained here, with ChatML's special tokens at ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat; where is the cat?", "You are a helpful assistant.",
                             "user assistant system 12 + 7 = 19"] * 20, trainer)
    assert [tok.token_to_id(t) for t in SPECIALS] == [0, 1, 2]
    return tok.to_str()


def with_bos_post_processor(tokenizer_json):
    """The tokenizer adding a BOS to every text it encodes (as Llama 3's and GGUFs with add_bos_token do)."""
    from tokenizers import Tokenizer, processors
    tok = Tokenizer.from_str(tokenizer_json)
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    return tok.to_str()


def chat_checkpoint(path, tokenizer_json, eos=2, seed=0):
    from tokenizers import Tokenizer
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=96, block_size=96,
                              vocab_size=Tokenizer.from_str(tokenizer_json).get_vocab_size()))
    hf = hf_config_from_llama(model.config, extra={"bos_token_id": 0, "eos_token_id": eos})
    save_checkpoint(checkpoint_dict(model, hf, tokenizer_json, chat_template=CHATML), str(path))
    return model


def sample_text(init_from, capsys, *extra):
    rc = run_script(sample.main, [f"--init_from={init_from}", "--chat", f"--start={QUESTION}", "--temperature=0",
                                  "--max_new_tokens=12", "--device=cpu", *extra])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def our_chat_ids(ckpt, hf_dir):
    """The ids sample.py --chat feeds the model: its tokenizer, template and special tokens."""
    tok = sample.find_tokenizer("", "", ckpt, hf_dir)
    bos, eos = sample.special_ids(ckpt, hf_dir)
    prompt = sample.wrap_in_chat(sample.chat_template(ckpt, hf_dir), QUESTION, tok.token_text(bos),
                                 tok.token_text(eos))
    return sample.encode_prompt(tok, prompt, 10 ** 6, chat=True)


@pytest.mark.parametrize("adds_bos", [False, True])
def test_export_of_a_chat_checkpoint_chats_in_sample_and_transformers(tmp_path, tokenizer_json, capsys, adds_bos):
    transformers = pytest.importorskip("transformers")
    chat_checkpoint(tmp_path / "chat.pt", with_bos_post_processor(tokenizer_json) if adds_bos else tokenizer_json)
    assert convert_main(["export", str(tmp_path / "chat.pt"), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    files = set(os.listdir(tmp_path / "hf"))
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"} <= files
    # sample.py chats with the export exactly as with the checkpoint
    assert sample_text(tmp_path / "hf", capsys) == sample_text(tmp_path / "chat.pt", capsys)

    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (tok.bos_token, tok.eos_token, tok.model_max_length) == ("<|endoftext|>", "<|im_end|>", 96)
    theirs = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
    ours = our_chat_ids(torch.load(tmp_path / "chat.pt", weights_only=False), None)
    assert ours == our_chat_ids({}, str(tmp_path / "hf")) == list(theirs)
    assert ours[:2] == [0, 1]  # the template's bos_token once, then <|im_start|>, whatever the post-processor
    assert tok.decode(theirs).startswith("<|endoftext|><|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert (generation.bos_token_id, generation.eos_token_id) == (0, 2)
    # and back: importing the directory keeps the template, so the checkpoint chats as before
    assert convert_main(["import", str(tmp_path / "hf"), str(tmp_path / "back.pt")]) == 0
    capsys.readouterr()
    assert torch.load(tmp_path / "back.pt", weights_only=False)["chat_template"] == CHATML
    assert sample_text(tmp_path / "back.pt", capsys) == sample_text(tmp_path / "chat.pt", capsys)
    # where newer transformers save the template, and which they prefer: chat_template.jinja
    (tmp_path / "hf" / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert read_chat_template(tmp_path / "hf") == "{{ messages[0]['content'] }}"


def test_transformers_generation_of_the_export_stops_at_the_eos(tmp_path, tokenizer_json):
    """The eos made the token this random model greedily writes fifth (or so): transformers must stop
    right after it, as our generate does."""
    transformers = pytest.importorskip("transformers")
    model = chat_checkpoint(tmp_path / "probe.pt", tokenizer_json)
    x = torch.tensor([our_chat_ids(torch.load(tmp_path / "probe.pt", weights_only=False), None)])
    free = model.generate(x, 12, temperature=0)[0, x.shape[1]:].tolist()
    k = next(k for k in range(4, 12) if free[k] not in free[:k])
    chat_checkpoint(tmp_path / "chat.pt", tokenizer_json, eos=free[k])
    assert convert_main(["export", str(tmp_path / "chat.pt"), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == free[k]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False)
    assert got[0, x.shape[1]:].tolist() == free[:k + 1]
    ours = Llama(model.config)
    ours.load_state_dict(model.state_dict())
    assert ours.generate(x, 12, temperature=0, eos_id=free[k])[0, x.shape[1]:].tolist() == free[:k + 1]


def char_checkpoint(path, kv_source=None, attn_source=None):
    chars = sorted(set("first citizen: before we proceed any further, hear me speak.\n"))
    torch.manual_seed(0)
    model = Llama(LlamaConfig(n_layer=4, n_head=4, n_kv_head=2, n_embd=64, vocab_size=len(chars), block_size=32,
                              kv_source=kv_source, attn_source=attn_source))
    meta = {"vocab_size": len(chars), "dtype": "uint16", "tokenizer": "char", "chars": chars}
    # as train.py writes it: the dataset's meta travels in the checkpoint; the dataset itself is not needed
    save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict(),
                     "config": {"dataset": "gone_char"}, "meta": meta}, str(path))
    return model


# dense, the default run's upper:half (exported with modeling_echo_llama.py), and EchoAtt attention sharing
@pytest.mark.parametrize("kv_source, attn_source", [(None, None), ("upper:half", None), (None, "0,1,1,3")])
def test_export_of_a_char_model_samples_without_a_tokenizer_option(tmp_path, capsys, kv_source, attn_source):
    model = char_checkpoint(tmp_path / "ckpt.pt", kv_source, attn_source)
    assert convert_main(["export", str(tmp_path / "ckpt.pt"), str(tmp_path / "hf")]) == 0
    assert "meta.json" in capsys.readouterr().out
    argv = ["--start=first ", "--max_new_tokens=20", "--seed=3", "--device=cpu"]
    assert run_script(sample.main, [f"--init_from={tmp_path / 'hf'}", *argv]) == 0
    from_export = capsys.readouterr().out
    assert run_script(sample.main, [f"--init_from={tmp_path / 'ckpt.pt'}", *argv]) == 0
    assert from_export == capsys.readouterr().out and from_export.startswith("first ")
    # without the table: one line that names the fix
    os.remove(tmp_path / "hf" / "meta.json")
    assert run_script(sample.main, [f"--init_from={tmp_path / 'hf'}", *argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no tokenizer.json or meta.json" in err
    assert "--tokenizer=data/shakespeare_char/meta.json" in err


def test_an_exported_shared_model_imports_back_as_itself(tmp_path):
    """convert_hf.py import (and so sample.py) reads our export of a shared model: its maps from config.json,
    no sharer projections expected; re-sharing it at import is refused in one line."""
    from checkpoint import ConversionError, load_model
    model = char_checkpoint(tmp_path / "ckpt.pt", "0,0,2,3", "0,1,2,2")  # both maps in one model
    assert convert_main(["export", str(tmp_path / "ckpt.pt"), str(tmp_path / "hf")]) == 0
    assert convert_main(["import", str(tmp_path / "hf"), str(tmp_path / "back.pt")]) == 0
    back, _ = load_model(str(tmp_path / "back.pt"))
    assert (back.config.kv_source, back.config.attn_source) == (model.config.kv_source, model.config.attn_source)
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ConversionError, match=r"shares already .* --kv_source applies to a dense Llama only"):
        convert_main(["import", str(tmp_path / "hf"), str(tmp_path / "again.pt"), "--kv_source=cla:2"])
