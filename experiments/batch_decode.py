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
--old=layers: one row's step op by op (the compiled graph), against its layers in one call of speed::decode_layers
(speed.LayersInOneCall, where every projection lies in blocks). Every other --old compares compiled graphs, op by op, at
one row too (what each of them changed lies in the graph).
--old=kernels --kernels=REV: speed_kernels.cpp as of git revision REV (or a file) against the working tree's: the old
source is built with its ops renamed (speed::* -> speed_old::*) and loaded beside the new, and the old path's step is
compiled while torch.ops.speed points at speed_old, so its graph calls the old kernels (a profiled step checks it);
prefill and the greedy pick run the new ones on both paths. REV's build must hold the ops, by name and schema,
that today's speed.py calls (a revision from before an op was renamed cannot run). A change of a few percent in the
kernels shows here, in one process, where processes timed one after another cannot see it (the memory rate swings
~10% between them).
--quantize=int8 (int4): both paths quantized (quantize.py) before the rest (the dtype then is the activations').

    .venv/bin/python experiments/batch_decode.py                                  # -> out-batch/batch_decode.json
    .venv/bin/python experiments/batch_decode.py --dtypes=bfloat16 --batches=1,16 # the issue's ratio only
    .venv/bin/python experiments/batch_decode.py --old=kernels --kernels=HEAD~1 --quantize=int4 --dtypes=bfloat16 --batches=1

Each (dtype, batch) builds both paths on the same weights (random, bench.py's smollm2 preset shape, or
--model=FILE), compiles their decode steps (untimed warm-up), then times prefill + new_tokens greedy
steps with benchmarking.Decoder, bench.py's decode loop, in rounds that alternate the two paths.
fp32 weights run the same code on both paths at batch 1 (inductor's loop: it beat the kernel there), and at
more rows on a CPU with AVX-512 (F.linear; speed.FP32_CPU_ROWS), so they are timed once there. Reported:
median tokens/s and the range over the rounds; ratios to batch 1 of the same dtype.
"""

import copy
import os
import subprocess
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
old = "products"             # what the old path keeps as it was: 'products', 'attention', 'projections', 'blocks', 'packed', 'dynamo', 'layers', 'kernels' (docstring)
kernels = ""                 # --old=kernels: the git revision (or file) of speed_kernels.cpp the old path runs
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
                         "weight its own allocation), 'dynamo' (every step through dynamo) or 'kernels' (an older "
                         "speed_kernels.cpp, --kernels=REV)")
    if s.quantize and s.quantize not in QUANTIZERS:
        raise ValueError(f"--quantize={s.quantize!r}: expected '', {', '.join(map(repr, QUANTIZERS))}")
    if (s.old == "kernels") != bool(s.kernels):
        raise ValueError("--old=kernels takes --kernels=REV (a git revision or a file of speed_kernels.cpp), and "
                         "--kernels only goes with --old=kernels")
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


def old_kernels(ref):
    """torch.ops.speed_old: speed_kernels.cpp as of `ref` (a file, else a git revision of this checkout) built with
    its ops renamed, into the kernel cache (named as speed.py names its build: built once), and loaded beside the new.
    ValueError where the source cannot be had or holds no library of speed's ops."""
    if os.path.isfile(ref):
        with open(ref) as f:
            source = f.read()
    else:
        got = subprocess.run(["git", "show", f"{ref}:speed_kernels.cpp"], cwd=ROOT, capture_output=True, text=True)
        if got.returncode:
            raise ValueError(f"--kernels={ref}: neither a file nor a git revision with speed_kernels.cpp "
                             f"({got.stderr.strip().splitlines()[-1] if got.stderr.strip() else 'git failed'})")
        source = got.stdout
    renamed = source.replace("TORCH_LIBRARY(speed,", "TORCH_LIBRARY(speed_old,").replace(
        "TORCH_LIBRARY_IMPL(speed,", "TORCH_LIBRARY_IMPL(speed_old,")
    if renamed.count("TORCH_LIBRARY(speed_old,") != 1 or "TORCH_LIBRARY_IMPL(speed_old," not in renamed:
        raise ValueError(f"--kernels={ref}: its speed_kernels.cpp defines no `TORCH_LIBRARY(speed, m)` to rename")
    compiler = os.environ.get("CXX", "c++")
    path = speed.kernel_build_path(renamed.encode(), "speed_old", compiler)
    if not os.path.exists(path):
        source_path = path[:-3] + ".cpp"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(source_path, "w") as f:
            f.write(renamed)
        print(f"building {ref}'s speed_kernels.cpp as speed_old (~15 s) ...", flush=True)
        try:
            speed.build_kernels(source_path, path, compiler)
        except subprocess.CalledProcessError as e:
            raise ValueError(f"--kernels={ref}: its speed_kernels.cpp did not build: "
                             f"{(e.stderr.strip().splitlines() or ['?'])[-1]}") from None
    torch.ops.load_library(path)
    return torch.ops.speed_old


def kernel_calls(decoder):
    """{namespace: calls} of speed's ops (speed, speed_old) in one compiled decode step, by the profiler"""
    from torch.profiler import profile
    token = decoder.prefill()
    with profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, torch.no_grad():
        decoder.step(token, decoder.positions[0], decoder.cache)
    calls = {}
    for event in prof.events():
        space = event.name.split("::")[0]
        if space in ("speed", "speed_old"):
            calls[space] = calls.get(space, 0) + 1
    return calls


def time_batch(base, dtype, B, s, old_ops=None):
    """{path: [tokens/s per round]} at batch B; old_ops: the old build's ops (old_kernels) for --old=kernels."""
    gen = torch.Generator().manual_seed(s.seed + B)
    prompt = torch.randint(base.config.vocab_size, (B, s.prompt_len), generator=gen)
    models = {"streaming": copy.deepcopy(base).to(dtype)}
    if s.old in ("attention", "projections", "blocks", "packed", "dynamo", "layers") or dtype in HALF or (B > 1 and speed.FP32_CPU_ROWS > 1):  # else the same products
        models["old"] = copy.deepcopy(base).to(dtype)
    if s.quantize:
        models = {name: QUANTIZERS[s.quantize](m) for name, m in models.items()}
    if s.old == "kernels":  # both steps on the very same weights: with two copies (apart in memory) the ratio
        models["old"] = models["streaming"]  # swung 0.92x-1.02x between two runs (docs/bench.md)
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
                decoders[name].step = getattr(decoders[name].step, "other", decoders[name].step).dynamo
        if s.old != "layers" or name == "old":  # the compiled graph, op by op, which LayersInOneCall hands more rows
            decoders[name].step = getattr(decoders[name].step, "other", decoders[name].step)
        t0 = H.announce_warmup(f"{name} {str(dtype)[6:]} batch {B}", True)
        new_ops = torch.ops.speed
        try:
            if name == "old" and old_ops is not None:  # its graph, compiled at its first step, calls the old build
                torch.ops.speed = old_ops
            for _ in range(2):  # the second run is the first at full speed
                decoders[name].timed()
        finally:
            torch.ops.speed = new_ops
        print(f"  warm-up {time.perf_counter() - t0:.1f}s", flush=True)
        if s.old == "layers" and name == "streaming" and B == 1 and getattr(decoders[name].step, "one_call_steps", 0) == 0:
            raise RuntimeError("--old=layers: the new path's steps did not take speed::decode_layers (every projection "
                               "in blocks of one kind? a CPU without AVX-512 VNNI?)")
        if s.old == "kernels":
            calls = kernel_calls(decoders[name])
            print(f"  {name}'s step calls {calls}", flush=True)
            if calls.get("speed_old" if name == "old" else "speed", 0) == 0 or len(calls) != 1:
                raise RuntimeError(f"the {name} path's compiled step calls {calls}: not its own build alone")
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
           "dynamo": "old (every step through dynamo), tokens/s | new (the compiled graph called directly: speed.DirectStep)",
           "layers": "old (one row's step op by op: the compiled graph), tokens/s | new (its layers in one call: "
                     "speed::decode_layers)",
           "kernels": "old (speed_kernels.cpp of --kernels), tokens/s | new (the working tree's speed_kernels.cpp)"}


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
    old_ops = old_kernels(s.kernels) if s.old == "kernels" else None
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
            rates = time_batch(base, dtype, B, s, old_ops)
            rows.setdefault(str(dtype)[6:], {})[B] = {
                name: dict(zip(("median", "min", "max"), H.summary(v)), rounds=v) for name, v in rates.items()}
    print_table(rows, dtypes, batch_sizes, s.old)
    result = dict(settings={k: getattr(s, k) for k in DEFAULTS}, threads=torch.get_num_threads(),
                  torch=torch.__version__, loadavg=H.loadavg(), rows=rows)
    H.write_json(result, os.path.join(s.out, "batch_decode.json"))
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
