"""
bench.py: training and decoding speed of ECHO-LLaMA models, dense and KV-shared side by side in one
process, each set against a limit of this machine measured in the same run, optionally beside
Hugging Face transformers' LlamaForCausalLM. The harness (the contenders, bounds, CPU memory, the
profiler, the attention-reuse microbenchmark, tables) is benchmarking.py; docs/bench.md explains it.

    python bench.py --preset cpu                                  # dense vs upper:half, fp32
    python bench.py --preset smollm2 --dtype bf16 --reference hf --quantize int8 --out /tmp/b.json
    python bench.py --preset cpu --models "dense;cla:2;0,0,2,2,4,4,6,6" --skip train,mem --profile

Settings: the globals below; sizes at 0 take the preset's; --models separates kv_source specs by ';'.

  train   forward + backward + AdamW on random token ids, warm-up (and compilation) untimed; rounds
          interleave the models (A B C, C B A, ...); median, min and max over the rounds. Bound: the
          large-matmul rate in the run's dtype, measured in every round (`fraction_of_bound`); on a
          GPU also `mfu` against the datasheet bf16 peak (configurator.PEAK_BF16_FLOPS).
  decode  prefill, then N greedy model.decode_step calls into a static cache (compiled with --compile),
          batch 1 and a larger one. Bound: the memory read bandwidth measured in every round, against the
          bytes a step must read (weights + K/V). --quantize int8 (int4) adds quantized copies ('dense+int8').
  memory  CUDA: own state + peak max_memory_allocated; CPU: peak RSS of a child holding only that model.
"""

import os
import statistics
import sys
import time

import torch

import benchmarking as H
from configurator import DTYPES, ConfigError, apply_threads, configure, resolve_device, run_script, settings_from

# -----------------------------------------------------------------------------
# settings (sizes at 0 take the preset's value)
preset = "cpu"               # tiny, cpu, smollm2, gpu-small, tinyllama (PRESETS below)
models = "dense;upper:half"  # model specs separated by ';': a kv_source, or KV@ATTN with an attn_source (EchoAtt)
dtype = "float32"            # float32 or bfloat16: training autocasts over fp32 weights, decoding casts the weights
compile = False              # torch.compile the train step (the reference's too) and our decode step
quantize = ""                # 'int8' or 'int4': also decode quantize.py copies of our models (rows 'dense+int8', ...)
reference = ""               # 'hf': add transformers' LlamaForCausalLM (SDPA), dense, with the dense model's weights
device = "auto"              # auto, cpu, cuda, cuda:N
batch_size = 0               # train batch
seq_len = 0                  # train sequence length
repeats = 0                  # timed rounds, interleaved across the models
warmup = 0                   # untimed train steps per model before timing
steps = 0                    # train steps per model per round
decode_batch = 0             # the larger decode batch (batch 1 always runs)
prompt_len = 0               # decode prompt
new_tokens = 0               # decode steps timed after the prefill
threads = 0                  # torch CPU threads: 0 = the preset's (tiny: 1), else 1 on a CPU (apply_threads)
skip = ""                    # comma list: train, decode, mem (CPU peak-RSS children), refmem (the reference's)
profile = False              # torch.profiler over one train step (unless skipped) and the decode steps at batch 1:
                             # time per op; for decode the GB/s of the matmuls
attn_reuse = ""              # e.g. '256,1024': only time an EchoAtt sharer's attention at these sequence lengths,
                             # recomputing softmax(q_j k_j^T) in SDPA vs reusing the source's materialised probabilities
out = ""                     # write the measurements to this JSON file (e.g. out-bench/x.json; folders are made)
replace_tracked = False      # let --out overwrite a file the repository tracks (a committed result)
seed = 1337                  # RNG seed of the random weights and token ids
mem_child = ""               # internal: the model a child process measures the peak RSS of (measure_cpu_mem)
# -----------------------------------------------------------------------------
DEFAULTS = settings_from(globals())

PRESETS = {
    # smoke tests: seconds. One thread: ops this small only stall waiting for a second core.
    "tiny": dict(model=dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=128,
                            vocab_size=256, block_size=64),
                 batch_size=2, seq_len=32, decode_batch=4, prompt_len=16, new_tokens=8,
                 repeats=3, warmup=1, steps=1, matmul_n=256, bandwidth_mib=256, threads=1),
    # 2 CPU cores, a couple of minutes; vocabulary 256 so the LM head does not hide the attention savings
    "cpu": dict(model=dict(n_layer=8, n_head=8, n_kv_head=4, n_embd=512, intermediate_size=1408,
                           vocab_size=256, block_size=256),
                batch_size=8, seq_len=256, decode_batch=8, prompt_len=128, new_tokens=64,
                repeats=5, warmup=2, steps=2, matmul_n=2048, bandwidth_mib=1024),
    # SmolLM2-135M's shape (random weights): a real small LM, tied 49k head; a few minutes on 2 cores
    "smollm2": dict(model=dict(n_layer=30, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536,
                               vocab_size=49152, block_size=256, rope_theta=1e5, tie_embeddings=True),
                    batch_size=2, seq_len=128, decode_batch=4, prompt_len=64, new_tokens=32,
                    repeats=3, warmup=1, steps=1, matmul_n=2048, bandwidth_mib=1024),
    "gpu-small": dict(model=dict(n_layer=12, n_head=12, n_kv_head=4, n_embd=768, intermediate_size=2048,
                                 vocab_size=32000, block_size=1024),
                      batch_size=16, seq_len=1024, decode_batch=16, prompt_len=512, new_tokens=128,
                      repeats=5, warmup=3, steps=5, matmul_n=8192, bandwidth_mib=4096, gpu=True),
    # TinyLlama-1.1B shape
    "tinyllama": dict(model=dict(n_layer=22, n_head=32, n_kv_head=4, n_embd=2048, intermediate_size=5632,
                                 vocab_size=32000, block_size=2048),
                      batch_size=4, seq_len=2048, decode_batch=16, prompt_len=1024, new_tokens=128,
                      repeats=5, warmup=3, steps=3, matmul_n=8192, bandwidth_mib=4096, gpu=True),
}
CHOICES = {"preset": tuple(PRESETS), "dtype": ("float32", "bfloat16"), "reference": ("", "hf"), "quantize": ("", "int8", "int4")}
SIZES = ("batch_size", "seq_len", "repeats", "warmup", "steps", "decode_batch", "prompt_len", "new_tokens",
         "threads")


# -----------------------------------------------------------------------------
# settings: parsed and checked before any work


def parse_settings(argv):
    """The run's settings from argv, every one checked; ConfigError (a ValueError) names a bad one."""
    argv = list(argv)
    if sum(a == "--models" or a.startswith("--models=") for a in argv) > 1:
        raise ConfigError("--models is given more than once: name every spec in one, separated by ';'")
    s, explicit = configure(DEFAULTS, argv, __doc__, CHOICES)
    s.argv = argv
    H.check_out_path(s.out, s.replace_tracked)  # first: a long run must never end unable to write its results
    p = PRESETS[s.preset]
    for key in SIZES:
        value = getattr(s, key)
        if value < 0 or (value == 0 and key in explicit):
            raise ConfigError(f"--{key} must be a positive integer, got {value}")
        if value == 0:
            setattr(s, key, p.get(key, 0))  # threads 0 (no preset value): configurator.apply_threads's
    s.skip = H.parse_skip(s.skip)
    if s.attn_reuse and not all(t.strip().isdigit() and int(t) > 0 for t in s.attn_reuse.split(",")):
        raise ConfigError(f"--attn_reuse={s.attn_reuse!r}: expected sequence lengths like 256,1024")
    s.models = H.parse_models(s.models, p["model"]["n_layer"])
    s.device = resolve_device(s.device)
    if p.get("gpu") and not s.device.startswith("cuda") and "device" not in explicit:
        raise ConfigError(f"preset {s.preset} is sized for a GPU and torch sees none: run it on a GPU, or give "
                          "--device=cpu to run it on the CPU anyway (slow)")
    if s.reference == "hf":
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise ConfigError("--reference hf needs the transformers package (./setup.sh --dev)") from None
    if s.mem_child and s.mem_child not in s.models + ["hf"]:
        raise ConfigError(f"--mem_child={s.mem_child!r} is not one of the models (it is internal: leave it out)")
    s.matmul_n, s.bandwidth_bytes = p["matmul_n"], p["bandwidth_mib"] * 2 ** 20
    cfg = dict(p["model"])
    cfg["block_size"] = max(cfg["block_size"], s.seq_len, s.prompt_len + s.new_tokens)
    s.model_config = cfg
    return s


# -----------------------------------------------------------------------------
# the benchmark


def main(argv=None):
    """Run the benchmark with command-line arguments `argv`; return the measurements (list of dicts)."""
    s = parse_settings(sys.argv[1:] if argv is None else argv)
    threads = torch.get_num_threads()
    apply_threads(s.threads, "cuda" if s.device.startswith("cuda") else s.device)
    try:
        if s.mem_child:
            return H.mem_child_main(s)
        return benchmark(s)
    finally:  # callers in the same process (tests) keep their thread count
        torch.set_num_threads(threads)


def benchmark(s):
    if s.attn_reuse:
        rows = H.attention_reuse(s, torch.device(s.device), DTYPES[s.dtype])
        if s.out:
            H.write_json(rows, s.out)
        return rows
    env = H.make_env(s)
    modules = build_all(s, env)
    if not env.on_gpu and "mem" not in s.skip:  # first, while this process holds only the weights
        names = [n for n in modules if not (n == "hf" and "refmem" in s.skip)]
        env.cpu_mem = H.measure_cpu_mem(s, names, os.path.abspath(__file__))
    rows = []
    if "train" not in s.skip:
        rows += bench_train(s, env, modules)
    if "decode" not in s.skip or s.profile:
        for m in modules.values():  # free any gradients; decode in the run's dtype
            m.zero_grad(set_to_none=True)
            m.to(env.dtype).eval()
        if s.quantize:  # decode only: quantized weights have no training step
            H.add_quantized_copies(s, env, modules)
        if "decode" not in s.skip:
            for B in sorted({1, s.decode_batch}):
                rows += bench_decode(s, env, modules, B)
        if s.profile:
            bandwidth = max(H.memory_bandwidth(s.bandwidth_bytes, env.device) for _ in range(3))
            for name, module in modules.items():
                H.profile_decode(s, env, name, module, bandwidth)
    H.add_ratios(rows)
    for row in rows:
        if row["model"] == "hf":
            row["ref_logits_max_abs_diff"] = env.ref_diff
    H.print_train_table(rows, s)
    H.print_decode_table(rows, s)
    if s.out:
        H.write_json(rows, s.out)
    return rows


def build_all(s, env):
    """Every contender, in this process; for each, the model whose FLOP accounting it has."""
    modules = {spec: H.build_ours(s, spec, env.device) for spec in s.models}
    env.flops = dict(modules)
    if s.reference == "hf":
        dense = modules.get("dense") or H.build_ours(s, "dense", env.device)
        modules["hf"] = H.build_hf(dense, env.device)
        env.flops["hf"] = H.FlopView(dense.config)  # the reference is our dense model's function
        env.ref_diff = H.check_reference(dense, modules["hf"], s.model_config["vocab_size"], env.device)
    env.n_params = {n: H.n_params(m) for n, m in modules.items()}
    # fp32 runs on a GPU use TF32 tensor cores, as a user would (after the fp32 reference check above)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    # one compiled training graph per model on the same forward code (decode steps have their own: speed.py)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(modules) + 2)
    return modules


# -----------------------------------------------------------------------------
# training: tokens/s, and FLOP/s over the matmul rate measured in the same rounds


def bench_train(s, env, modules):
    trainers = {n: H.Trainer(n, m, s, env.device) for n, m in modules.items()}
    for n, t in trainers.items():  # warm-up, compilation included: not timed
        t0 = H.announce_warmup(f"train {n}", s.compile)
        for _ in range(s.warmup):
            t.step()
        H.sync(env.device)
        print(f"  warm-up {n}: {time.perf_counter() - t0:.1f}s", flush=True)
    names, matmul_rates = list(trainers), []
    for r in range(s.repeats):
        for n in H.round_order(names, r):
            trainers[n].timed_round(s.steps)
        matmul_rates.append(H.matmul_rate(s.matmul_n, env.dtype, env.device))
        H.print_round("train", r, s.repeats, {n: trainers[n].rates[-1] for n in names}, matmul_rates[-1] / 1e9, "GFLOP/s")
    bound = statistics.median(matmul_rates)
    print(f"  measured {s.matmul_n}^3 matmul rate, {s.dtype}: {bound / 1e9:.0f} GFLOP/s (median of "
          f"{len(matmul_rates)} rounds; min {min(matmul_rates) / 1e9:.0f}, max {max(matmul_rates) / 1e9:.0f})")
    rows = [train_row(s, env, t, bound) for t in trainers.values()]
    if s.profile:
        for t in trainers.values():
            H.profile_train(t, s, env, bound, env.flops[t.name].flops_per_token(s.seq_len)["train"])
    H.release(trainers, env)
    return rows


def train_row(s, env, t, bound):
    med, lo, hi = H.summary(t.rates)
    flops = env.flops[t.name].flops_per_token(s.seq_len)["train"]
    mem, mem_base, mem_kind = H.peak_memory(env, t.name, "train", t.mem_peak)
    return dict(env.base_row, model=t.name, mode="train", batch_size=s.batch_size, seq_len=s.seq_len,
                tokens_per_s=med, tokens_per_s_min=lo, tokens_per_s_max=hi, repeats=list(t.rates),
                mfu=H.mfu(env, t.name, med, s.seq_len), flops_per_token=flops, achieved_flops=flops * med,
                matmul_flops_measured=bound, util_vs_matmul=flops * med / bound,
                bound=bound, bound_kind="matmul_flops_measured", fraction_of_bound=flops * med / bound,
                peak_mem_bytes=mem, mem_baseline_bytes=mem_base, peak_mem_kind=mem_kind,
                kv_cache_bytes=None, n_params=env.n_params[t.name], loadavg_after=H.loadavg())


# -----------------------------------------------------------------------------
# decoding: tokens/s, and bytes read per second over the bandwidth measured in the same rounds


def bench_decode(s, env, modules, B):
    """Decode rows at batch B: rounds interleaved across the models, the bandwidth read in each."""
    T, N = s.prompt_len, s.new_tokens
    gen = torch.Generator(device="cpu").manual_seed(s.seed + 2)
    prompt = torch.randint(s.model_config["vocab_size"], (B, T), generator=gen).to(env.device)
    decoders, mems = H.warm_decoders(s, env, modules, prompt)  # untimed: compiles, fills caches
    names, prefill, decode, bandwidth = list(modules), {n: [] for n in modules}, {n: [] for n in modules}, []
    for r in range(s.repeats):
        for n in H.round_order(names, r):
            t_prefill, t_decode = decoders[n].timed()
            prefill[n].append(B * T / t_prefill)
            decode[n].append(B * N / t_decode)
        bandwidth.append(H.memory_bandwidth(s.bandwidth_bytes, env.device))
        H.print_round(f"decode batch {B}", r, s.repeats, {n: decode[n][-1] for n in names}, bandwidth[-1] / 1e9, "GB/s")
    del decoders
    bound = max(bandwidth)  # the best a fresh buffer was read at: fractions of it are lower bounds
    print(f"  measured memory read bandwidth ({s.bandwidth_bytes / 2 ** 20:.0f} MiB sum): {bound / 1e9:.1f} GB/s "
          f"(best of {len(bandwidth)} rounds; median {statistics.median(bandwidth) / 1e9:.1f}, min {min(bandwidth) / 1e9:.1f})")
    return [dict(decode_row(s, env, n, modules[n], B, decode[n], prefill[n], bound, mems.get(n)),
                 bandwidth_rounds=bandwidth) for n in names]


def decode_row(s, env, name, module, B, rates, prefill_rates, bound, gpu_mem):
    T, N = s.prompt_len, s.new_tokens
    med, lo, hi = H.summary(rates)
    pmed, plo, phi = H.summary(prefill_rates)
    config = env.flops[name].config
    keys = T + (N + 1) / 2  # step i attends over T + i + 1 positions, i = 0 .. N-1
    weights, kv = H.decode_bytes_per_step(module, config, B, keys)
    achieved = (weights + kv) * med / B  # B tokens per step
    own, top = H.step_bound(weights + kv, env.device, bound)  # the better of the big read and one of the step's size
    mem, mem_base, mem_kind = H.peak_memory(env, name, f"decode_{B}", gpu_mem)
    return dict(env.base_row, model=name, mode="decode", batch_size=B, prompt_len=T, new_tokens=N,
                tokens_per_s=med, tokens_per_s_min=lo, tokens_per_s_max=hi, repeats=list(rates),
                prefill_tokens_per_s=pmed, prefill_tokens_per_s_min=plo, prefill_tokens_per_s_max=phi,
                mfu=None, flops_per_token=env.flops[name].flops_per_token(keys, causal=False)["total"],
                weight_bytes_per_step=weights, kv_bytes_per_step=kv, bytes_per_step=weights + kv,
                achieved_bytes_per_s=achieved, bandwidth_measured=bound, bandwidth_at_step_bytes=own, bound=top,
                bound_kind="memory_read_bandwidth_measured", fraction_of_bound=achieved / top,
                peak_mem_bytes=mem, mem_baseline_bytes=mem_base, peak_mem_kind=mem_kind,
                kv_cache_bytes=H.kv_cache_bytes(module, B, T + N, env.dtype),
                n_params=env.n_params[name], loadavg_after=H.loadavg())


if __name__ == "__main__":
    sys.exit(run_script(main))
