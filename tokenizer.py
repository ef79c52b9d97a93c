"""
One tokenizer interface for the datasets (data/*/prepare.py writes token files with it) and for sampling
(sample.py turns a prompt into ids and the model's ids back into text). Three kinds:

  CharTokenizer   a character table: a char dataset's meta.json "chars" (id -> character)
  GPT2Tokenizer   the GPT-2 BPE through tiktoken, offline from data/gpt2.tiktoken
  HFTokenizer     a Hugging Face tokenizer.json (a dataset's, a converted checkpoint's, a HF directory's)

Every tokenizer has
  name                  what messages call it, e.g. "char (data/x/meta.json)"
  vocab_size            the ids it knows (None: a model's own tokenizer, which knows its vocabulary)
  eot_id                the id that ends a document in a corpus, or None
  encode(text)          -> list of ids; special tokens written in the text are kept whole
  encode_batch(texts)   -> a list of id lists, for a corpus: many documents at once, no BOS added
  encode_chat(text)     -> ids of a rendered chat template, which writes its own special tokens: none added
  decode(ids)           -> text; ids at or above vocab_size print as U+FFFD
  token_text(id)        a special token's text, for a chat template ("" where there is none)

`from_meta(meta)` builds the tokenizer a dataset's meta.json names (see dataset.py for the file).
`tokenizer_identity(meta)` and `tokenizer_json_identity(text)` say whether two datasets or checkpoints
give their ids the same meaning: train.py's guard against training on ids of another tokenizer.
"""

import hashlib
import json
import os

# -----------------------------------------------------------------------------
# GPT-2 BPE through tiktoken, offline.
# tiktoken.get_encoding("gpt2") downloads its files on first use. The GPT-2 BPE is identical to
# r50k_base, whose ranks file OpenAI also ships (MIT) in openai-whisper as assets/gpt2.tiktoken; a
# copy lies in data/ and is checked against the hash tiktoken itself pins for r50k_base.
GPT2_TIKTOKEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "gpt2.tiktoken")
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_EOT = 50256
GPT2_VOCAB_SIZE = GPT2_EOT + 1
_gpt2 = None


def gpt2_encoding():
    """tiktoken's GPT-2 encoding built from the local ranks file: no network needed. Built once: loading
    the 50k ranks takes a moment."""
    global _gpt2
    if _gpt2 is None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
        if not os.path.exists(GPT2_TIKTOKEN):
            raise ValueError(f"{GPT2_TIKTOKEN} is missing: it is part of the repository, restore it with git checkout")
        try:
            ranks = load_tiktoken_bpe(GPT2_TIKTOKEN, expected_hash=GPT2_TIKTOKEN_SHA256)
        except ValueError as e:
            raise ValueError(f"{GPT2_TIKTOKEN} is corrupt ({e}); restore it with git checkout") from None
        _gpt2 = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                                  special_tokens={"<|endoftext|>": GPT2_EOT}, explicit_n_vocab=GPT2_VOCAB_SIZE)
    return _gpt2


# -----------------------------------------------------------------------------
# the interface and its three kinds


class Tokenizer:
    """The interface (see the module's docstring); a kind implements encode and _decode."""

    name, vocab_size, eot_id = "tokenizer", None, None

    def encode(self, text) -> list:
        raise NotImplementedError

    def encode_batch(self, texts) -> list:
        return [self.encode(t) for t in texts]

    def encode_chat(self, text) -> list:
        """A prompt a chat template rendered: it holds its special tokens itself (bos_token included)."""
        return self.encode(text)

    def _decode(self, ids) -> str:
        raise NotImplementedError

    def decode(self, ids) -> str:
        # a model's vocabulary may be bigger than its dataset's (train.py pads vocab_size up): the ids
        # the tokenizer does not know print as U+FFFD instead of failing
        if self.vocab_size is None:
            return self._decode(ids)
        parts, run = [], []
        for i in ids:
            if i < self.vocab_size:
                run.append(i)
            else:
                parts += [self._decode(run), "\ufffd"]
                run = []
        return "".join(parts) + self._decode(run)

    def token_text(self, i) -> str:
        return ""  # dataset tokenizers have no special tokens for a chat template


class CharTokenizer(Tokenizer):
    """One id per character of a table (a char dataset's meta.json "chars")."""

    def __init__(self, chars, vocab_size=None, name="char"):
        self.chars, self.name = list(chars), name
        self.vocab_size = len(self.chars) if vocab_size is None else vocab_size
        self.ids = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text):
        unknown = sorted(set(text) - self.ids.keys())
        if unknown:
            raise ValueError(f"characters {unknown!r} are not in this dataset's vocabulary")
        return [self.ids[c] for c in text]

    def _decode(self, ids):
        return "".join(self.chars[i] for i in ids)


class GPT2Tokenizer(Tokenizer):
    """The GPT-2 BPE (tiktoken, offline); <|endoftext|> (GPT2_EOT) separates documents."""

    eot_id = GPT2_EOT

    def __init__(self, vocab_size=GPT2_VOCAB_SIZE, name="gpt2"):
        self.encoding, self.vocab_size, self.name = gpt2_encoding(), vocab_size, name

    def encode(self, text):
        return self.encoding.encode(text, allowed_special={"<|endoftext|>"})

    def encode_batch(self, texts):
        # as tiktoken's encode_ordinary: "<|endoftext|>" written in a document is text, not the separator
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=os.cpu_count() or 1)

    def _decode(self, ids):
        return self.encoding.decode(list(ids))


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json through the tokenizers library (`backend`). Two uses, which differ:
    dataset=True reads and writes a corpus (like the GPT-2 tokenizer: no BOS added, special tokens in the
    text kept whole and decoded back as text); dataset=False prompts the model the tokenizer came with (a
    BOS where the tokenizer's post-processor adds one, as transformers does; special tokens left out of
    the printed text)."""

    def __init__(self, backend, name, vocab_size=None, dataset=False, eot_id=None):
        self.backend, self.name, self.vocab_size = backend, name, vocab_size
        self.dataset, self.eot_id = dataset, eot_id

    @classmethod
    def load(cls, path=None, text=None, **kwargs):
        """From a tokenizer.json file or its text; the tokenizers library is imported only here, so that a
        model trained on a char or GPT-2 dataset samples without it."""
        try:
            from tokenizers import Tokenizer as Backend
        except ImportError:
            raise ImportError("this model's tokenizer is a tokenizer.json, which needs the 'tokenizers' package: "
                             "pip install tokenizers") from None
        if text is not None:
            return cls(Backend.from_str(text), **kwargs)
        return cls(Backend.from_file(path), **kwargs)

    def encode(self, text):
        return self.backend.encode(text, add_special_tokens=not self.dataset).ids

    def encode_batch(self, texts):
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def encode_chat(self, text):
        # nothing added: a post-processor's BOS would come twice where the template writes bos_token, and
        # transformers' apply_chat_template adds none either
        return self.backend.encode(text, add_special_tokens=False).ids

    def _decode(self, ids):
        return self.backend.decode(list(ids), skip_special_tokens=not self.dataset)

    def token_text(self, i):
        return "" if i is None else (self.backend.id_to_token(i) or "")


def from_meta(meta, where="meta.json"):
    """The tokenizer a dataset's meta (dataset.load_meta) names, knowing meta's vocab_size. ValueError
    naming `where` (the file, or wherever the meta came from) when it cannot be built."""
    kind = meta.get("tokenizer")
    name = f"{kind} ({where})"
    try:
        if kind == "char":
            return CharTokenizer(meta["chars"], meta["vocab_size"], name)
        if kind == "gpt2":
            return GPT2Tokenizer(meta["vocab_size"], name)
        if kind == "hf":
            return _dataset_hf_tokenizer(meta.get("tokenizer_file"), meta["vocab_size"], name, meta.get("eot_token"))
    except KeyError as e:
        raise ValueError(f"{where} lacks {e}: not a dataset meta.json (re-run the dataset's prepare.py)") from None
    except (ValueError, ImportError) as e:  # gpt2.tiktoken or the tokenizer file missing; no tokenizers package
        raise ValueError(f"{where}: {e}") from None
    raise ValueError(f"{where}: unknown tokenizer {kind!r} in meta.json (known: char, gpt2, hf)")


def _dataset_hf_tokenizer(path, vocab_size, name, eot_id):
    if not path or not os.path.isfile(path):
        raise ValueError(f"the dataset's tokenizer file {path!r} is missing: re-run the dataset's prepare.py")
    return HFTokenizer.load(path, name=name, vocab_size=vocab_size, dataset=True, eot_id=eot_id)


# -----------------------------------------------------------------------------
# identity: whether two datasets or checkpoints give their ids the same meaning


def tokenizer_identity(meta):
    """What two datasets must share for their token ids to mean the same text: the character table of
    a char dataset (two texts give two tables), the content of a tokenizer.json, else the tokenizer's name."""
    if meta.get("tokenizer") == "char":
        return ("char", tuple(meta.get("chars") or ()))
    if meta.get("tokenizer") == "hf" and os.path.isfile(meta.get("tokenizer_file") or ""):
        with open(meta["tokenizer_file"], encoding="utf-8") as f:
            return tokenizer_json_identity(f.read())
    return (str(meta.get("tokenizer")),)


def tokenizer_json_identity(text):
    """A tokenizer.json's content, whatever its formatting (pretty-printed or not)."""
    canonical = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    return ("tokenizer.json", hashlib.sha256(canonical.encode()).hexdigest())
