"""
Decode speed of the compiled decode step, the old path against the new one, on SmolLM2-135M's shape, at
several batch sizes and dtypes, in one process. --old=products (default): the old products, BLAS for rows > 1,
inductor's multiply-and-sum loop for one row; new: the decoding kernel speed.matvec (speed_kernels.cpp) for one
row and for a few (up to StreamingLinear.stream_rows, 64; bf16 on a CPU with AVX-512 BF16, its rows across the
vector lanes from 9 rows; with AMX, its tile products). --old=attention: the old attention over the cache, torch's ops
(speed.decode_attention_by_ops), against the kernel's speed.decode_attention; the products the same on both paths.
--old=projections: each layer's q, k, v and gate, up products separate, against speed.fuse_projections' joined ones.
--old=blocks: bf16 (or int8, 4-bit) weights row-major, against speed.block_weights' blocks of 16 rows (bf16: where
the CPU multiplies bf16; int8 and 4-bit: where it has AVX-512 VNNI).
--old=packed: each weight in its own allocation, against speed.pack_weights' one allocation on huge pages.
--old=dynamo: every step called through dynamo, against speed.DirectStep's steps that call the compiled graph directly.
--quantize=int8 (int4): both paths quantized (quantize.py) before the rest (the dtype then is the activations').

    .venv/bin/python experiments/batch_decode.py                                  # -> out-batch/batch_decode.json
    .venv/bin/python experiments/batch_decode.py --dtypes=bfloat16 --batches=1,16 # the issue's ratio only

Each (dtype, batch) builds both paths on the same weights (random, bench.py's smollm2 preset shape, or
--model=FILE), compiles their decode steps (untimed warm-up), then times prefill + new_tokens greedy
steps with benchmarking.Decoder, bench.py's decode loop, in rounds that alternate the two paths.
fp32 weights run the same code on both paths at batch 1 (inductor's loop: it beat the kernel there), and at
more rows on a CPU with AVX-512 (F.linear; speed.FP32_CPU_ROWS), so they are timed once there. Reported:
median tokens/s and the range over the rounds; ratios to batch 1 of the same dtype.
"""

import copy
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import benchmarking as H  # noqa: E402
import model as M  # noqa: E402
import speed  # noqa: E402
from configurator import DTYPES, apply_threads, configure, run_script, settings_from  # noqa: E402
from guards import check_not_tracked  # noqa: E402
from quantize import QUANTIZERS  # noqa: E402
from speed import HALF, StreamingLinear  # noqa: E402

# -----------------------------------------------------------------------------
out = "out-batch"            # where batch_decode.json goes
replace_tracked = False      # let --out overwrite a committed result
model = ""                   # a checkpoint (e.g. data/smollm2/smollm2-135m-instruct.pt); '' = random weights, smollm2 shape
dtypes = "float32,bfloat16"  # comma list
batches = "1,4,16,32"        # comma list of decode batch sizes
old = "products"             # what the old path keeps as it was: 'products', 'attention', 'projections', 'blocks', 'packed', 'dynamo' (docstring)
prompt_len = 64              # prompt tokens per row (random ids)
new_tokens = 16              # greedy decode steps timed per round
rounds = 3                   # timed rounds per path (median reported)
quantize = ""                # 'int8' or 'int4': both paths' linear layers quantized first (quantize.py)
seed = 1337
threads = 0                  # torch CPU threads: 0 = 1 on a CPU (apply_threads)
# -----------------------------------------------------------------------------
DEFAULTS = settings_from(globals())
SMOLLM2 = dict(n_layer=30, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536, vocab_size=49152,
               block_size=256, rope_theta=1e5, tie_embeddings=True)  # bench.py's smollm2 preset


def parse(s):
    """(dtypes, batches) from the settings; ValueError names a bad one."""
    names = [d.strip() for d in s.dtypes.split(",") if d.strip()]
    unknown = [d for d in names if d not in DTYPES]
    if not names or unknown:
        raise ValueError(f"--dtypes={s.dtypes!r}: expected a comma list of {', '.join(sorted(DTYPES))}")
    parts = [b.strip() for b in s.batches.split(",")]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--batches={s.batches!r}: expected a comma list of positive integers, like 1,4,16,32")
    for key in ("prompt_len", "new_tokens", "rounds"):
        if getattr(s, key) < 1:
            raise ValueError(f"--{key} must be at least 1, got {getattr(s, key)}")
    if s.old not in HEADERS:
        raise ValueError(f"--old={s.old!r}: expected 'products' (BLAS / inductor's loop), 'attention' (torch's ops), "
                         "'projections' (not joined), 'blocks' (row-major bf16, int8 or 4-bit weights), 'packed' (each "
                         "weight its own allocation) or 'dynamo' (every step through dynamo)")
    if s.quantize and s.quantize not in QUANTIZERS:
        raise ValueError(f"--quantize={s.quantize!r}: expected '', {', '.join(map(repr, QUANTIZERS))}")
    if s.model and not os.path.isfile(s.model):
        raise ValueError(f"--model={s.model}: no such checkpoint (or '' for random weights of SmolLM2's shape)")
    return [DTYPES[d] for d in names], sorted({int(p) for p in parts})


def old_path(model, old):
    """The old path. 'products': products of more than one row go to F.linear (BLAS) even when compiled, and
    one row to inductor's loop, not the kernel. 'attention': attention over the cache by torch's ops."""
    for m in model.modules():
        if isinstance(m, StreamingLinear) and old == "products":
            m.stream_rows, m.use_kernel = 1, False
        if hasattr(m, "cache_attention") and old == "attention":
            m.cache_attention = speed.decode_attention_by_ops
    return model


def time_batch(base, dtype, B, s):
    """{path: [tokens/s per round]} at batch B."""
    gen = torch.Generator().manual_seed(s.seed + B)
    prompt = torch.randint(base.config.vocab_size, (B, s.prompt_len), generator=gen)
    models = {"streaming": copy.deepcopy(base).to(dtype)}
    if s.old in ("attention", "projections", "blocks", "packed", "dynamo") or dtype in HALF or (B > 1 and speed.FP32_CPU_ROWS > 1):  # else the same products
        models["old"] = copy.deepcopy(base).to(dtype)
    if s.quantize:
        models = {name: QUANTIZERS[s.quantize](m) for name, m in models.items()}
    decoders = {}
    for name, m in models.items():
        join = not (name == "old" and s.old == "projections")
        block = not (name == "old" and s.old in ("products", "blocks"))  # the old products: row-major weights
        pack = not (name == "old" and s.old == "packed")
        decoders[name] = H.Decoder(m, prompt, s.new_tokens, compile_step=True, join=join, block=block,
                                   pack=pack)  # speed.py's paths
        if name == "old":
            old_path(m, s.old)
            if s.old == "dynamo":  # every step through dynamo, as compiled steps ran before speed.DirectStep
                decoders[name].step = decoders[name].step.dynamo
        t0 = H.announce_warmup(f"{name} {str(dtype)[6:]} batch {B}", True)
        for _ in range(2):  # the second run is the first at full speed
            decoders[name].timed()
        print(f"  warm-up {time.perf_counter() - t0:.1f}s", flush=True)
    rates = {name: [] for name in decoders}
    for r in range(s.rounds):
        for name in H.round_order(list(decoders), r):
            rates[name].append(B * s.new_tokens / decoders[name].timed()[1])
        print(f"  round {r + 1}/{s.rounds}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in rates.items()), flush=True)
    return rates


HEADERS = {"products": "old (BLAS; one row: inductor's loop), tokens/s | new (speed.matvec for up to 64 rows; one row: "
                        "speed.matvec)",
           "attention": "old (attention by torch's ops), tokens/s | new (speed_kernels.cpp's attention)",
           "projections": "old (q, k, v and gate, up separate), tokens/s | new (joined: speed.fuse_projections)",
           "blocks": "old (bf16, int8 or 4-bit weights row-major), tokens/s | new (blocks of 16 rows: speed.block_weights)",
           "packed": "old (each weight its own allocation), tokens/s | new (one on huge pages: speed.pack_weights)",
           "dynamo": "old (every step through dynamo), tokens/s | new (the compiled graph called directly: speed.DirectStep)"}


def print_table(rows, dtypes, batches, old):
    print(f"\n| dtype | batch | {HEADERS[old]} | new / old | new / batch 1 |")
    print("|---|---|---|---|---|---|")
    for dtype in dtypes:
        d = str(dtype)[6:]
        one = rows[d].get(1, {}).get("streaming")
        for B in batches:
            r = rows[d][B]
            new, old = r["streaming"], r.get("old")
            print(f"| {d} | {B} | {old['median']:.1f} [{old['min']:.1f}-{old['max']:.1f}] | " if old else f"| {d} | {B} | (same) | ",
                  end="")
            print(f"{new['median']:.1f} [{new['min']:.1f}-{new['max']:.1f}] | {new['median'] / old['median']:.2f}x | " if old
                  else f"{new['median']:.1f} [{new['min']:.1f}-{new['max']:.1f}] | | ", end="")
            print(f"{new['median'] / one['median']:.2f}x |" if one else " |")


def main(argv):
    s, _ = configure(DEFAULTS, argv, __doc__)
    dtypes, batch_sizes = parse(s)
    apply_threads(s.threads)
    check_not_tracked(s.out, "out", s.replace_tracked)
    torch.manual_seed(s.seed)
    if s.model:
        from checkpoint import load_model
        base = load_model(s.model)[0]
    else:
        base = M.Llama(M.LlamaConfig(**SMOLLM2))
    base.eval()
    if s.prompt_len + s.new_tokens > base.config.block_size:
        raise ValueError(f"--prompt_len={s.prompt_len} plus --new_tokens={s.new_tokens} exceeds the model's context of "
                         f"{base.config.block_size} positions: lower them")
    os.makedirs(s.out, exist_ok=True)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(batch_sizes) * len(dtypes))
    rows = {}
    for dtype in dtypes:
        for B in batch_sizes:
            rates = time_batch(base, dtype, B, s)
            rows.setdefault(str(dtype)[6:], {})[B] = {
                name: dict(zip(("median", "min", "max"), H.summary(v)), rounds=v) for name, v in rates.items()}
    print_table(rows, dtypes, batch_sizes, s.old)
    result = dict(settings={k: getattr(s, k) for k in DEFAULTS}, threads=torch.get_num_threads(),
                  torch=torch.__version__, loadavg=H.loadavg(), rows=rows)
    H.write_json(result, os.path.join(s.out, "batch_decode.json"))
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
