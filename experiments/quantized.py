"""
Weight-only int8 decoding (quantize.py) on a real model: SmolLM2-135M-Instruct's held-out loss
and perplexity, and its greedy batch-1 decode speed, float against int8, in one run.

    .venv/bin/python data/smollm2/prepare.py && .venv/bin/python data/shakespeare_smollm2/prepare.py
    .venv/bin/python experiments/int8.py                          # -> out-int8/int8.json
    .venv/bin/python experiments/int8.py --out=results/smollm2 --replace_tracked=True  # replace the committed figures

Loss: mean cross-entropy over the same eval_batches batches of the held-out Shakespeare plays (val) and
of the King James Bible (other), perplexity = exp(loss). Speed: model.generate with the decode step
compiled (as sample.py --compile), a generate of 1 new token and one of new_tokens + 1 timed back to
back (experiments/decode_timing.py), rounds interleaved across the variants; median and range.
"""

import copy
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from checkpoint import load_model  # noqa: E402
from configurator import apply_threads, configure, run_script, settings_from  # noqa: E402
from dataset import BatchSampler, ensure_dataset, load_meta, open_tokens  # noqa: E402
from experiments.decode_timing import decode_rates  # noqa: E402
from guards import check_not_tracked  # noqa: E402
from quantize import quantize_int8  # noqa: E402

# -----------------------------------------------------------------------------
out = "out-int8"             # where int8.json goes
replace_tracked = False      # let --out overwrite the repository's committed figures (results/smollm2/int8.json)
model = "data/smollm2/smollm2-135m-instruct.pt"
dataset = "shakespeare_smollm2"  # held-out texts to evaluate on (data/<dataset>)
eval_batches = 16            # batches of each held-out text
batch_size = 4               # sequences per evaluation batch
block_size = 256             # evaluation sequence length
prompt_len = 128             # decode timing: a prompt from the val text, then new_tokens greedy steps
new_tokens = 64              # greedy decode steps timed
rounds = 3                   # timed rounds (median reported)
compile = True               # compile the decode step (False: eager, as sample.py's default)
seed = 1337                  # RNG seed
threads = 0                  # torch CPU threads: 0 = 1 on a CPU (apply_threads)
# -----------------------------------------------------------------------------
DEFAULTS = settings_from(globals())
VARIANTS = {"float32": (torch.float32, False), "bfloat16": (torch.bfloat16, False),
            "bfloat16 + int8 weights": (torch.bfloat16, True)}


@torch.no_grad()
def held_out_losses(model, data_dir, s):
    meta, losses = load_meta(data_dir), {}
    for split in ("val", "other"):
        sampler = BatchSampler(open_tokens(data_dir, split, meta), s.block_size, s.batch_size, s.seed, "cpu")
        batches = [sampler.get("eval_val", 0, k) for k in range(s.eval_batches)]
        # from the logits: an int8 head has no float weight for the model's own (chunked) loss
        losses[split] = sum(F.cross_entropy(model(x)[0].float().flatten(0, 1), y.flatten()).item()
                            for x, y in batches) / len(batches)
    return losses


def main(argv):
    s, _ = configure(DEFAULTS, argv, __doc__)
    apply_threads(s.threads)
    check_not_tracked(s.out, "out", s.replace_tracked)
    os.makedirs(s.out, exist_ok=True)
    data_dir = ensure_dataset(s.dataset, auto_prepare=False)
    dense, _ = load_model(s.model, block_size=s.block_size)
    models = {}
    for name, (dtype, int8) in VARIANTS.items():
        m = copy.deepcopy(dense).to(dtype).eval()
        models[name] = quantize_int8(m) if int8 else m
    rows = {name: {"loss": held_out_losses(m, data_dir, s)} for name, m in models.items()}
    prompt = BatchSampler(open_tokens(data_dir, "val", load_meta(data_dir)), s.prompt_len, 1, s.seed, "cpu").get(
        "eval_val", 0, 0)[0]
    steps = {n: torch.compile(m.decode_step, fullgraph=True, dynamic=False) for n, m in models.items()} if s.compile else None
    rates = decode_rates(models, prompt, s.new_tokens, s.rounds, steps)
    for name, row in rows.items():
        r = sorted(rates[name])
        row.update(perplexity={k: math.exp(v) for k, v in row["loss"].items()}, decode_tokens_per_s=r[len(r) // 2],
                   decode_tokens_per_s_range=[r[0], r[-1]], rounds=rates[name])
    base = rows["bfloat16"]
    for name, row in rows.items():
        r = row["decode_tokens_per_s_range"]
        row["perplexity_vs_bfloat16"] = {k: row["perplexity"][k] / base["perplexity"][k] for k in row["loss"]}
        row["speed_vs_bfloat16"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        print(f"{name:<26} val loss {row['loss']['val']:.4f} (ppl {row['perplexity']['val']:.3f}, "
              f"{row['perplexity_vs_bfloat16']['val']:.4f}x bf16), other {row['loss']['other']:.4f} "
              f"({row['perplexity_vs_bfloat16']['other']:.4f}x); decode {row['decode_tokens_per_s']:.1f} tokens/s "
              f"[{r[0]:.1f}-{r[-1]:.1f}], {row['speed_vs_bfloat16']:.2f}x bf16")
    result = dict(settings={k: getattr(s, k) for k in DEFAULTS}, threads=torch.get_num_threads(),
                  torch=torch.__version__, variants=rows)
    path = os.path.join(s.out, "int8.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
