"""
TinyStories (Eldan & Li 2023, roneneldan/TinyStories on the Hugging Face Hub, CDLA-Sharing-1.0):
short simple stories, the usual corpus for pretraining small Llamas. Needs internet and the
optional `datasets` package (pip install datasets); nothing else in the project needs either.
Each story is tokenized with the GPT-2 BPE (offline, data/gpt2.tiktoken) followed by <|endoftext|>
and streamed into train.bin / val.bin (uint16) with meta.json beside them.

    python data/tinystories/prepare.py                 # all ~2.1 M stories, ~470 M tokens
    python data/tinystories/prepare.py --max_docs 100000   # a quick sample
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from dataset import TokenWriter, write_meta  # noqa: E402
from tokenizer import GPT2Tokenizer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
HF_DATASET = "roneneldan/TinyStories"
SPLITS = {"train": "train", "val": "validation"}  # our file name -> the Hub's split name


def tokenize_and_write(splits, data_dir, batch_docs=1024, quiet=False):
    """splits: {"train": iterable of str, "val": iterable of str}. Streams each split into
    data_dir/<split>.bin, every document followed by <|endoftext|>, then writes meta.json."""
    tok = GPT2Tokenizer()
    os.makedirs(data_dir, exist_ok=True)
    counts = {}
    for split, docs in splits.items():
        writer = TokenWriter(os.path.join(data_dir, f"{split}.bin"), tok.vocab_size)
        batch = []
        for doc in docs:
            batch.append(doc)
            if len(batch) == batch_docs:
                _write_batch(tok, writer, batch)
                batch = []
        if batch:
            _write_batch(tok, writer, batch)
        counts[split] = writer.close()
        if not quiet:
            print(f"{split}: {counts[split]:,} tokens")
    write_meta(data_dir, tok.vocab_size, "gpt2", eot_token=tok.eot_id)
    return counts


def _write_batch(tok, writer, docs):
    for ids in tok.encode_batch(docs):
        writer.write(np.array(ids + [tok.eot_id], dtype=np.int64))


def download_splits(max_docs=None):
    try:
        import datasets  # optional, only this download path needs it
    except ImportError:
        raise ValueError("data/tinystories/prepare.py needs the `datasets` package: .venv/bin/pip install datasets") from None
    out = {}
    for ours, theirs in SPLITS.items():
        ds = datasets.load_dataset(HF_DATASET, split=theirs)
        if max_docs is not None:
            ds = ds.select(range(min(max_docs, len(ds))))
        out[ours] = (row["text"] for row in ds)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max_docs", type=int, default=None, help="at most this many stories per split")
    a = p.parse_args()
    try:
        tokenize_and_write(download_splits(a.max_docs), HERE)
    except ValueError as e:
        sys.exit(f"error: {e}")
