"""
Distillation text mixed from two datasets in the same tokenizer: all of the first's train split, then `tokens`
tokens of the second's train split taken as evenly spaced chunks (so every part of it is represented). KL
distillation needs no labels, so any text works; the generated text alone is narrow (the teacher's own chat
and free text), and the student learns to follow the teacher only there. The held-out split is the first's.

    .venv/bin/python data/smollm2_mix/prepare.py --first=data/smollm2_selfgen --second=data/shakespeare_smollm2 \\
        --tokens=120000

train.bin   the first's train.bin, then the second's chunks
val.bin     the first's val.bin
meta.json   the first's meta, with "mix": {first, second, tokens of each, chunk}
"""

import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import numpy as np  # noqa: E402

from configurator import configure, run_script, settings_from  # noqa: E402
from dataset import atomic_write_text, load_meta, open_tokens, sha256_file, write_tokens  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# -----------------------------------------------------------------------------
first = os.path.join("data", "smollm2_selfgen")       # all of its train split, and its val split
second = os.path.join("data", "shakespeare_smollm2")  # `tokens` of its train split
tokens = 120_000             # tokens taken from the second
chunk = 4096                 # they come as evenly spaced runs of this many tokens
out_dir = ""                 # '' = this directory (data/smollm2_mix)
# -----------------------------------------------------------------------------
DEFAULTS = settings_from(globals())


def tokenizer_digest(meta):
    """What decides the ids: the tokenizer file's content for an hf tokenizer, else the meta's own description."""
    if meta["tokenizer"] == "hf":
        return sha256_file(meta["tokenizer_file"])
    return json.dumps({k: meta.get(k) for k in ("tokenizer", "chars", "eot_token")}, sort_keys=True)


def evenly_spaced_chunks(data, total, chunk):
    """`total` tokens of data as runs of `chunk` (the last one shorter) starting at evenly spaced offsets."""
    if total > len(data):
        raise ValueError(f"--tokens={total} is more than the second dataset's {len(data)} training tokens")
    n = -(-total // chunk)
    sizes = [chunk] * (n - 1) + [total - chunk * (n - 1)]
    starts = np.linspace(0, len(data) - chunk, n).astype(np.int64) if len(data) > chunk else np.zeros(n, np.int64)
    return np.concatenate([np.asarray(data[a:a + k]) for a, k in zip(starts, sizes)])


def main(argv):
    s, _ = configure(DEFAULTS, argv, __doc__)
    if s.tokens < 1 or s.chunk < 1:
        raise ValueError(f"--tokens and --chunk must be at least 1, got {s.tokens}, {s.chunk}")
    metas = {}
    for key in ("first", "second"):
        d = getattr(s, key)
        if not all(os.path.isfile(os.path.join(d, f)) for f in ("meta.json", "train.bin")):
            raise ValueError(f"--{key}={d}: not a prepared dataset (meta.json, train.bin); run its prepare.py first")
        metas[key] = load_meta(d)
    a, b = metas["first"], metas["second"]
    if (a["vocab_size"], a["dtype"], tokenizer_digest(a)) != (b["vocab_size"], b["dtype"], tokenizer_digest(b)):
        raise ValueError(f"--first={s.first} and --second={s.second} use different tokenizers (vocabulary "
                         f"{a['vocab_size']} / {b['vocab_size']}, or another tokenizer file): their ids do not mix")
    own = open_tokens(s.first, "train", a)
    taken = evenly_spaced_chunks(open_tokens(s.second, "train", b), s.tokens, s.chunk)
    out = s.out_dir or HERE
    os.makedirs(out, exist_ok=True)
    write_tokens(os.path.join(out, "train.bin"), np.concatenate([np.asarray(own), taken]), a["vocab_size"])
    shutil.copyfile(os.path.join(s.first, "val.bin"), os.path.join(out, "val.bin"))
    with open(os.path.join(s.first, "meta.json")) as f:
        meta = json.load(f)
    if a["tokenizer"] == "hf":
        shutil.copyfile(a["tokenizer_file"], os.path.join(out, os.path.basename(a["tokenizer_file"])))
        meta["tokenizer_file"] = os.path.basename(a["tokenizer_file"])
    meta["mix"] = {"first": s.first, "second": s.second, "first_tokens": len(own), "second_tokens": len(taken),
                   "chunk": s.chunk}
    atomic_write_text(os.path.join(out, "meta.json"), json.dumps(meta))
    print(f"wrote {out}: train {len(own):,} tokens of {s.first} + {len(taken):,} of {s.second} "
          f"({-(-s.tokens // s.chunk)} runs of up to {s.chunk}); val = {s.first}'s")


if __name__ == "__main__":
    sys.exit(run_script(main))
