"""
Self-generated distillation data: SmolLM2-135M-Instruct's own samples, in its own tokenizer (selfgen.py;
LLM-QAT's data-free distillation). Chat turns answer a prompt list (the built-in instructions x topics of
selfgen.chat_prompts, or --prompts=FILE, one a line) in the model's chat template; free continuations start
from the BOS token. Prepare data/smollm2 first.

    .venv/bin/python data/smollm2_selfgen/prepare.py --init_from=data/smollm2/smollm2-135m-instruct.pt \\
        --tokens=200000 --val_tokens=65536 --seed=1337 --batch_size=16

train.bin   `tokens` tokens of documents (prompt + reply, or a free continuation), each ended by <|endoftext|>
val.bin     `val_tokens` tokens from the held-out 10% of the prompts and a random stream of its own
meta.json   {"tokenizer": "hf", "tokenizer_file": "tokenizer.json", "selfgen": {settings, counts, val prompts}}
The same settings and seed give the same files on the same machine and torch.
"""

import os
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

from checkpoint import load_model  # noqa: E402
from configurator import DTYPES, configure, resolve_device, resolve_dtype, run_script, settings_from  # noqa: E402
from selfgen import chat_prompts, compiled_decode_step, write_selfgen  # noqa: E402
from tokenizer import HFTokenizer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# -----------------------------------------------------------------------------
init_from = os.path.join("data", "smollm2", "smollm2-135m-instruct.pt")  # the teacher: a converted checkpoint
out_dir = ""                 # '' = this directory (data/smollm2_selfgen)
tokens = 200_000             # training tokens to generate
val_tokens = 65_536          # held-out tokens (evaluate.py's 'selfgen' set reads them)
seed = 1337
batch_size = 16              # rows generated together
temperature = 1.0            # 1.0 with top_k: the model's own distribution, its long tail cut
top_k = 50                   # 0: no top-k
max_new_tokens = 256         # per document
chat_fraction = 0.5          # share of documents that are chat turns (the rest: free text from BOS)
prompts = ""                 # a file of prompts, one a line ('' = selfgen.chat_prompts())
device = "auto"
dtype = "float32"            # float32, or bfloat16 (faster on a Zen 4; on an AVX2-only Zen 3 as fast: docs/evaluate.md; other samples)
compile = True               # compile the decode step (selfgen.compiled_decode_step): one graph per batch
                             # size, compiled in the first batch (a minute or two); False: eager
# -----------------------------------------------------------------------------
DEFAULTS = settings_from(globals())
CHOICES = {"dtype": ("auto", *DTYPES)}


def check(s):
    for key in ("tokens", "val_tokens", "batch_size", "max_new_tokens"):
        if getattr(s, key) < 1:
            raise ValueError(f"--{key} must be at least 1, got {getattr(s, key)}")
    if not 0 <= s.chat_fraction <= 1:
        raise ValueError(f"--chat_fraction must lie in 0..1, got {s.chat_fraction}")
    if not (0 <= s.temperature < float("inf")) or s.top_k < 0:
        raise ValueError(f"--temperature must be >= 0 and --top_k >= 0 (0: off), got {s.temperature}, {s.top_k}")
    if s.prompts and not os.path.isfile(s.prompts):
        raise ValueError(f"--prompts={s.prompts}: no such file (a text file, one prompt a line)")
    if not os.path.exists(s.init_from):
        raise ValueError(f"--init_from={s.init_from} does not exist: run data/smollm2/prepare.py first, or name "
                         "a converted checkpoint")


def read_prompts(path):
    if not path:
        return chat_prompts()
    with open(path, encoding="utf-8") as f:
        found = [line.strip() for line in f if line.strip()]
    if not found:
        raise ValueError(f"--prompts={path} holds no prompt (one a line)")
    return found


def main(argv):
    s, _ = configure(DEFAULTS, argv, __doc__, CHOICES)
    check(s)
    prompt_list = read_prompts(s.prompts)
    model, ckpt = load_model(s.init_from)
    if not ckpt.get("tokenizer_json"):
        raise ValueError(f"{s.init_from} carries no tokenizer.json: self-generated data needs the model's own "
                         "tokenizer (a checkpoint from convert_hf.py carries it)")
    hf = ckpt.get("hf_config") or {}
    bos, eos = hf.get("bos_token_id"), hf.get("eos_token_id")
    if not isinstance(bos, int) or not isinstance(eos, int):
        raise ValueError(f"{s.init_from} names no BOS / EOS token id (hf_config): free text starts from BOS")
    if s.chat_fraction > 0 and not ckpt.get("chat_template"):
        raise ValueError(f"{s.init_from} carries no chat template: pass --chat_fraction=0 for free text only")
    tok = HFTokenizer.load(text=ckpt["tokenizer_json"], name="the checkpoint's tokenizer")
    eot = tok.backend.token_to_id("<|endoftext|>")
    dev = resolve_device(s.device)
    model.to(device=dev, dtype=DTYPES[resolve_dtype(s.dtype, dev.split(":")[0])]).eval()
    ckpt.pop("model", None)  # the model holds its weights: the dict's would keep a second copy once they are packed
    g = types.SimpleNamespace(tokens=s.tokens, val_tokens=s.val_tokens, seed=s.seed, batch_size=s.batch_size,
                              temperature=s.temperature, top_k=s.top_k, max_new_tokens=s.max_new_tokens,
                              chat_fraction=s.chat_fraction, prompts=prompt_list, template=ckpt.get("chat_template"),
                              bos=bos, eos=eos, eot=eot if eot is not None else eos,
                              decode_step=compiled_decode_step(model) if s.compile else None)
    out = s.out_dir or HERE
    t0 = time.perf_counter()

    def progress(split, n, budget):
        print(f"{split}: {n:,} / {budget:,} tokens ({time.perf_counter() - t0:.0f} s)", flush=True)

    with torch.inference_mode():
        meta = write_selfgen(model, tok, out, g, ckpt["tokenizer_json"], source=s.init_from, progress=progress)
    splits = meta["selfgen"]["splits"]
    print(f"wrote {out}: train {splits['train']['tokens']:,} tokens, val {splits['val']['tokens']:,} "
          f"in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
