"""tokenizer.py: the offline GPT-2 BPE against tiktoken's own definition, and the interface's three kinds."""

import pytest

from dataset import sha256_file
from tokenizer import (GPT2_EOT, GPT2_PAT_STR, GPT2_TIKTOKEN, GPT2_TIKTOKEN_SHA256, CharTokenizer, GPT2Tokenizer,
                       HFTokenizer, from_meta, gpt2_encoding)

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        "It's 1,234 o'clock -- don't they've?  Ünïcödé & tabs\tand  spaces   \n")


def test_gpt2_file_is_the_pinned_one():
    assert sha256_file(GPT2_TIKTOKEN) == GPT2_TIKTOKEN_SHA256


def test_offline_gpt2_matches_tiktoken_r50k_base_definition(monkeypatch):
    """tiktoken's own r50k_base (= GPT-2) definition, fed our ranks file instead of its download."""
    import tiktoken
    import tiktoken_ext.openai_public as op

    def local_load(path, expected_hash=None):
        assert expected_hash == GPT2_TIKTOKEN_SHA256  # tiktoken pins the same file
        return tiktoken.load.load_tiktoken_bpe(GPT2_TIKTOKEN, expected_hash=expected_hash)

    monkeypatch.setattr(op, "load_tiktoken_bpe", local_load)
    ref_def = op.r50k_base()
    assert ref_def["pat_str"] == GPT2_PAT_STR
    assert ref_def["special_tokens"] == {"<|endoftext|>": GPT2_EOT}
    ref = tiktoken.Encoding(**{k: v for k, v in ref_def.items()})
    enc = gpt2_encoding()
    assert enc.n_vocab == ref.n_vocab == 50257
    assert enc.encode_ordinary(TEXT) == ref.encode_ordinary(TEXT)
    assert enc.encode("hi<|endoftext|>", allowed_special="all")[-1] == GPT2_EOT
    assert enc.encode("Hello world") == [15496, 995]  # the well-known GPT-2 ids
    assert enc.decode(enc.encode_ordinary(TEXT)) == TEXT


def test_the_three_kinds_share_one_interface():
    char = CharTokenizer(list("ab "))
    assert char.encode("ab ba") == [0, 1, 2, 1, 0] and char.decode([0, 1, 7]) == "ab\ufffd"
    gpt2 = GPT2Tokenizer()
    assert gpt2.encode("Hello world<|endoftext|>") == [15496, 995, GPT2_EOT] and gpt2.eot_id == GPT2_EOT
    assert gpt2.encode_batch(["Hello world<|endoftext|>"])[0][:2] == [15496, 995]  # there: text, not the separator
    tokenizers = pytest.importorskip("tokenizers")
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<s>": 0, "a": 1, "b": 2}, unk_token="<s>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<s>"])
    backend.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    model = HFTokenizer(backend, "model")  # prompts the model: BOS added, special tokens not printed
    assert model.encode("a b") == [0, 1, 2] and model.decode([0, 1]) == "a" and model.token_text(0) == "<s>"
    data = HFTokenizer(backend, "dataset", vocab_size=3, dataset=True)  # a corpus: no BOS, specials kept as text
    assert data.encode("a b") == [1, 2] and data.encode_batch(["a"]) == [[1]] and data.decode([0, 1, 5]) == "<s> a\ufffd"


def test_from_meta_names_where_the_meta_came_from():
    assert isinstance(from_meta({"tokenizer": "char", "vocab_size": 2, "chars": ["a", "b"]}), CharTokenizer)
    with pytest.raises(ValueError, match="^here lacks 'chars'"):
        from_meta({"tokenizer": "char", "vocab_size": 2}, "here")
    with pytest.raises(ValueError, match="^here: unknown tokenizer 'bpe'"):
        from_meta({"tokenizer": "bpe", "vocab_size": 2}, "here")
    with pytest.raises(ValueError, match="tokenizer file .* is missing"):
        from_meta({"tokenizer": "hf", "vocab_size": 2, "tokenizer_file": "/nonexistent/tokenizer.json"})
