"""
Weight-only int8 and int4 decoding (quantize.py) on a real model: SmolLM2-135M-Instruct's held-out
loss and perplexity, and its greedy batch-1 decode speed, float against quantized, in one run.

    .venv/bin/python data/smollm2/prepare.py && .venv/bin/python data/shakespeare_smollm2/prepare.py
    .venv/bin/python experiments/quantized.py                     # -> out-quantized/quantized.json
    .venv/bin/python experiments/quantized.py --out=results/smollm2 --replace_tracked=True  # replace the committed figures

Loss: mean cross-entropy over the same eval_batches batches of the held-out Shakespeare plays (val) and
of the King James Bible (other), perplexity = exp(loss). Speed: model.generate with the decode step
compiled (as sample.py --compile), a generate of 1 new token and one of new_tokens + 1 timed back to
back (experiments/decode_timing.py), rounds interleaved across the variants; median and range.
"""

import copy
import math
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import benchmarking as H  # noqa: E402
from checkpoint import load_model  # noqa: E402
from configurator import ConfigError, apply_threads, configure, run_script, settings_from  # noqa: E402
from dataset import BatchSampler, ensure_dataset, load_meta, open_tokens  # noqa: E402
from experiments.decode_timing import decode_rates  # noqa: E402
from guards import check_not_tracked  # noqa: E402
from quantize import QUANTIZERS  # noqa: E402
from speed import compile_decode_step  # noqa: E402

# -----------------------------------------------------------------------------
out = "out-quantized"        # where quantized.json goes
replace_tracked = False      # let --out overwrite the repository's committed figures (results/smollm2/quantized.json)
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
variants = "bf16,fp32,bf16+int8,bf16+int4"  # which of VARIANTS; the first is the reference of the ratios
decode = True                # also time decoding (False: the held-out losses only)
# -----------------------------------------------------------------------------
DEFAULTS = settings_from(globals())
# name: (activations, quantize.py's weights); on a CPU without bf16 instructions (AVX2) the bf16 rows' loss
# (a forward of many rows: bf16 matmuls) is very slow (docs/bench.md), so there compare fp32 with fp32+int4
VARIANTS = {"fp32": (torch.float32, ""), "bf16": (torch.bfloat16, ""), "bf16+int8": (torch.bfloat16, "int8"),
            "bf16+int4": (torch.bfloat16, "int4"), "fp32+int4": (torch.float32, "int4")}


@torch.no_grad()
def held_out_losses(model, data_dir, s):
    meta, losses = load_meta(data_dir), {}
    for split in ("val", "other"):
        sampler = BatchSampler(open_tokens(data_dir, split, meta), s.block_size, s.batch_size, s.seed, "cpu")
        batches = [sampler.get("eval_val", 0, k) for k in range(s.eval_batches)]
        # from the logits: a quantized head has no float weight for the model's own (chunked) loss
        losses[split] = sum(F.cross_entropy(model(x)[0].float().flatten(0, 1), y.flatten()).item()
                            for x, y in batches) / len(batches)
    return losses


def main(argv):
    s, _ = configure(DEFAULTS, argv, __doc__)
    chosen = [v.strip() for v in s.variants.split(",") if v.strip()]
    if not chosen or any(v not in VARIANTS for v in chosen):
        raise ConfigError(f"--variants={s.variants!r}: choose from {', '.join(VARIANTS)}, comma-separated")
    apply_threads(s.threads)
    check_not_tracked(s.out, "out", s.replace_tracked)
    os.makedirs(s.out, exist_ok=True)
    data_dir = ensure_dataset(s.dataset, auto_prepare=False)
    dense, _ = load_model(s.model, block_size=s.block_size)
    models = {}
    for name in chosen:
        dtype, quantize = VARIANTS[name]
        m = copy.deepcopy(dense).to(dtype).eval()
        models[name] = QUANTIZERS[quantize](m) if quantize else m
    rows = {}
    for name, m in models.items():
        rows[name] = {"loss": held_out_losses(m, data_dir, s)}
        print(f"{name}: held-out losses {rows[name]['loss']}", flush=True)
    prompt = BatchSampler(open_tokens(data_dir, "val", load_meta(data_dir)), s.prompt_len, 1, s.seed, "cpu").get(
        "eval_val", 0, 0)[0]
    steps = {n: compile_decode_step(m) for n, m in models.items()} if s.compile else None
    rates = decode_rates(models, prompt, s.new_tokens, s.rounds, steps) if s.decode else {}
    ref = chosen[0]
    for name, row in rows.items():
        row["perplexity"] = {k: math.exp(v) for k, v in row["loss"].items()}
        if rates:
            r = sorted(rates[name])
            row.update(decode_tokens_per_s=r[len(r) // 2], decode_tokens_per_s_range=[r[0], r[-1]], rounds=rates[name])
    for name, row in rows.items():
        row["perplexity_vs_reference"] = {k: row["perplexity"][k] / rows[ref]["perplexity"][k] for k in row["loss"]}
        line = (f"{name:<10} val loss {row['loss']['val']:.4f} (ppl {row['perplexity']['val']:.3f}, "
                f"{row['perplexity_vs_reference']['val']:.4f}x {ref}), other {row['loss']['other']:.4f} "
                f"({row['perplexity_vs_reference']['other']:.4f}x)")
        if rates:
            r = row["decode_tokens_per_s_range"]
            row["speed_vs_reference"] = row["decode_tokens_per_s"] / rows[ref]["decode_tokens_per_s"]
            line += (f"; decode {row['decode_tokens_per_s']:.1f} tokens/s [{r[0]:.1f}-{r[-1]:.1f}], "
                     f"{row['speed_vs_reference']:.2f}x {ref}")
        print(line)
    result = dict(settings={k: getattr(s, k) for k in DEFAULTS}, threads=torch.get_num_threads(),
                  torch=torch.__version__, reference=ref, variants=rows)
    H.write_json(result, os.path.join(s.out, "quantized.json"))
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
