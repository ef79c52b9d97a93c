"""
bench.py: training and decoding throughput, utilisation and memory of ECHO-LLaMA models, dense and
KV-shared side by side in one process, optionally against Hugging Face transformers' LlamaForCausalLM.

    python bench.py --preset cpu                                  # dense vs upper:half, fp32
    python bench.py --preset cpu --dtype bf16 --reference hf --out bench_cpu_bf16.json
    python bench.py --preset tinyllama --dtype bf16 --compile     # on a GPU
    python bench.py --preset cpu --models "dense;cla:2;0,0,2,2,4,4,6,6"

--models takes kv_source specs separated by ';' (a kv_source list itself contains commas), or the
flag repeated: --models dense --models cla:2. Every spec names the same shape (the preset's).

What is timed, and how:
  train   forward + backward + AdamW step on random token ids (torch.randint), after warm-up steps
          (torch.compile included) that are not timed. Repeats are interleaved across the models
          (A B C A B C ...), the device is synchronised before each clock read, and the median,
          min and max over repeats are reported.
  decode  each library's own `generate` (greedy, cache on): a generate of 1 new token (= prefill +
          first token) and one of N+1 new tokens are timed back to back; prefill tokens/s is
          B*T_prompt / t(1), decode tokens/s is B*N / (t(N+1) - t(1)). At batch 1 and a larger batch.

Utilisation: on a GPU, mfu = model.estimate_mfu against the datasheet bf16 peak (model.PEAK_BF16_FLOPS;
null for fp32 runs, whose peak is not in the table). On a CPU no datasheet peak applies: mfu is null
and `util_vs_matmul` is the achieved train FLOP/s (model.flops_per_token(T)['train'] * tokens/s) over
this machine's own large-matmul rate in the run's dtype, measured in every repeat round (so it sees
the same machine load as the models).

Memory (peak_mem_bytes): on CUDA, this model's own parameters, gradients and optimizer state plus the
transient peak of max_memory_allocated over its steps (other models in the process are subtracted).
On CPU, peak RSS (VmHWM) of a child process that builds only this model and runs the same steps
(process-wide: includes the Python/torch runtime, given separately as mem_baseline_bytes).
"""

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import model as M

# -----------------------------------------------------------------------------
# presets

PRESETS = {
    # smoke tests: seconds
    "tiny": dict(model=dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=128,
                            vocab_size=256, block_size=64),
                 batch_size=2, seq_len=32, decode_batch=4, prompt_len=16, new_tokens=8,
                 repeats=3, warmup=1, steps=1, matmul_n=256, threads=1),
    # 2 CPU cores, a couple of minutes; vocabulary 256 so the LM head does not hide the attention
    # savings (the same shape as REFERENCE.md's transformers measurement)
    "cpu": dict(model=dict(n_layer=8, n_head=8, n_kv_head=4, n_embd=512, intermediate_size=1408,
                           vocab_size=256, block_size=256),
                batch_size=8, seq_len=256, decode_batch=8, prompt_len=128, new_tokens=64,
                repeats=5, warmup=2, steps=2, matmul_n=2048),
    "gpu-small": dict(model=dict(n_layer=12, n_head=12, n_kv_head=4, n_embd=768, intermediate_size=2048,
                                 vocab_size=32000, block_size=1024),
                      batch_size=16, seq_len=1024, decode_batch=16, prompt_len=512, new_tokens=128,
                      repeats=5, warmup=3, steps=5, matmul_n=8192),
    # TinyLlama-1.1B shape
    "tinyllama": dict(model=dict(n_layer=22, n_head=32, n_kv_head=4, n_embd=2048, intermediate_size=5632,
                                 vocab_size=32000, block_size=2048),
                      batch_size=4, seq_len=2048, decode_batch=16, prompt_len=1024, new_tokens=128,
                      repeats=5, warmup=3, steps=3, matmul_n=8192),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--models", action="append", default=None,
                   help="kv_source specs separated by ';' or the flag repeated (default: 'dense;upper:half')")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                   help="train: fp32, or bf16 autocast over fp32 weights; decode: weights cast to this dtype")
    p.add_argument("--compile", action="store_true", help="torch.compile the train step's model and generate's decode step "
                   "(the Hugging Face reference too)")
    p.add_argument("--reference", default=None, choices=["hf"], help="add transformers.LlamaForCausalLM (sdpa), dense, same weights")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--seq_len", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None, help="timed rounds, interleaved across the models")
    p.add_argument("--warmup", type=int, default=None, help="untimed train steps per model before timing")
    p.add_argument("--steps", type=int, default=None, help="train steps per model per timed round")
    p.add_argument("--decode_batch", type=int, default=None, help="the larger decode batch (batch 1 is always run)")
    p.add_argument("--prompt_len", type=int, default=None)
    p.add_argument("--new_tokens", type=int, default=None, help="decode steps timed per generate")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads); default: torch's, "
                   "1 for the tiny preset, whose ops are too small to split and stall on a busy machine")
    p.add_argument("--skip", default="", help="comma list of phases to skip: train, decode, mem (CPU peak-RSS child processes), "
                   "refmem (only the reference's child: it imports transformers, seconds)")
    p.add_argument("--out", default=None, help="write a JSON list, one object per measurement")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--_mem_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    for key in ("batch_size", "seq_len", "repeats", "warmup", "steps", "decode_batch", "prompt_len", "new_tokens"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.matmul_n = preset["matmul_n"]
    if args.threads is None:
        args.threads = preset.get("threads")
    specs = []
    for item in (args.models or ["dense;upper:half"]):
        specs += [s.strip() for s in item.split(";") if s.strip()]
    args.models = list(dict.fromkeys(specs))  # unique, in order
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = dict(preset["model"])
    cfg["block_size"] = max(cfg["block_size"], args.seq_len, args.prompt_len + args.new_tokens + 1)
    args.model_config = cfg
    return args


# -----------------------------------------------------------------------------
# helpers


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_ctx(device, dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def summary(values):
    return statistics.median(values), min(values), max(values)


def tensor_bytes(tensors):
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def state_bytes(model, opt=None):
    """Bytes of this model's parameters, buffers, gradients and optimizer state."""
    ts = list(model.parameters()) + list(model.buffers()) + [p.grad for p in model.parameters()]
    if opt is not None:
        for st in opt.state.values():
            ts += [v for v in st.values() if torch.is_tensor(v)]
    return tensor_bytes(ts)


def rss_bytes(field="VmRSS"):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if field == "VmHWM":
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return None


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def matmul_rate(n, dtype, device, reps=3):
    """FLOP/s of an n x n x n matmul in `dtype` on this device: median of `reps`."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)  # warm-up
    sync(device)
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        rates.append(2 * n ** 3 / (time.perf_counter() - t0))
    return statistics.median(rates)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {name} ({torch.get_num_threads()} threads)"


# -----------------------------------------------------------------------------
# the contenders: this project's Llama with a kv_source spec, or transformers' LlamaForCausalLM


def build_ours(args, spec, device):
    torch.manual_seed(args.seed)
    cfg = M.LlamaConfig(**args.model_config, kv_source=spec)
    return M.Llama(cfg).to(device)


def build_hf(args, dense, device):
    """transformers.LlamaForCausalLM of the same shape, SDPA attention, with `dense`'s weights."""
    import transformers
    c = dense.config
    hcfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
        max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=c.tie_embeddings, attention_bias=False, mlp_bias=False, hidden_act="silu",
        bos_token_id=None, eos_token_id=None, pad_token_id=0)
    hcfg._attn_implementation = "sdpa"
    hf = transformers.LlamaForCausalLM(hcfg).to(device)
    sd = {("lm_head.weight" if k == "lm_head.weight" else "model." + k): v for k, v in dense.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"weights do not map onto LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def n_params(m):
    return m.num_params() if isinstance(m, M.Llama) else sum(p.numel() for p in m.parameters())


def make_optimizer(m, device):
    if isinstance(m, M.Llama):
        return m.configure_optimizers(0.1, 3e-4, (0.9, 0.95), device.type)
    # the same groups and settings for transformers' model
    params = [p for p in m.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), **({"fused": True} if device.type == "cuda" else {}))


class FlopView:
    """model.py's FLOP accounting for a config, without weights (it only reads .config)."""
    flops_per_token = M.Llama.flops_per_token
    estimate_mfu = M.Llama.estimate_mfu

    def __init__(self, config):
        self.config = config


class Contender:
    def __init__(self, name, module, args, device, dtype):
        self.name, self.module, self.device, self.dtype = name, module, device, dtype
        self.is_hf = not isinstance(module, M.Llama)
        self.call = torch.compile(module) if args.compile else module
        self.opt = make_optimizer(module, device)
        self.vocab = args.model_config["vocab_size"]
        gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
        # a few random batches (never zeros), reused round-robin so data creation is not timed
        self.batches = []
        for _ in range(3):
            data = torch.randint(self.vocab, (args.batch_size, args.seq_len + 1), generator=gen)
            self.batches.append((data[:, :-1].to(device), data[:, 1:].to(device)))
        self.k = 0
        self.train_rates, self.mem_peak = [], None

    def train_step(self):
        x, y = self.batches[self.k % len(self.batches)]
        self.k += 1
        with autocast_ctx(self.device, self.dtype):
            if self.is_hf:
                logits = self.call(input_ids=x, use_cache=False).logits
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
            else:
                _, loss = self.call(x, y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def release_training(self):
        self.opt.zero_grad(set_to_none=True)
        self.opt = None
        self.call = None
        self.batches = None


def generate(module, prompt, n, compile_decode):
    if isinstance(module, M.Llama):
        return module.generate(prompt, n, temperature=0, compile_decode=compile_decode)
    return module.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, use_cache=True)


def kv_cache_bytes(module, batch, max_len, dtype):
    if isinstance(module, M.Llama):
        return module.new_cache(batch, max_len, dtype=dtype).nbytes()
    c = module.config  # transformers' cache holds every layer's K and V
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * batch * c.num_key_value_heads * max_len * hd * torch.empty(0, dtype=dtype).element_size()


# -----------------------------------------------------------------------------
# CPU peak memory: one child process per (model, phase)


def mem_child(args):
    """Runs in a child process that holds only one model: decode at batch 1, decode at the larger
    batch, then train, reading the process's peak RSS (VmHWM) after each phase. Peak RSS only grows,
    so each reading is that phase's peak when the phases grow in that order (they do: a decode holds
    the weights and a cache, training the weights, gradients, AdamW state and activations); else
    it is an upper bound."""
    name = args._mem_child
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.set_num_threads(1)  # only memory is read here; the children run side by side
    baseline = rss_bytes()
    dense = build_ours(args, "dense" if name == "hf" else name, device)
    module = build_hf(args, dense, device) if name == "hf" else dense
    del dense
    result = {"baseline_rss": baseline}
    if "decode" not in args.skip:
        module.to(dtype).eval()
        gen = torch.Generator(device="cpu").manual_seed(args.seed + 2)
        for B in sorted({1, args.decode_batch}):
            prompt = torch.randint(args.model_config["vocab_size"], (B, args.prompt_len), generator=gen).to(device)
            generate(module, prompt, args.new_tokens + 1, args.compile)
            result[f"decode_{B}"] = rss_bytes("VmHWM")
        module.float().train()
    if "train" not in args.skip:
        c = Contender(name, module, args, device, dtype)
        for _ in range(2):  # the second step holds gradients and AdamW state together
            c.train_step()
        result["train"] = rss_bytes("VmHWM")
    print("MEMCHILD " + json.dumps(result))


def measure_cpu_mem(args, names):
    """Peak RSS per phase of child processes, each holding only one model (see mem_child). They run
    side by side (peak RSS is per process, so they do not disturb each other's numbers) before any
    timing starts."""
    procs = {n: subprocess.Popen([sys.executable, os.path.abspath(__file__)] + args._argv + ["--_mem_child", n],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in names}
    result = {}
    for n, p in procs.items():
        out, err = p.communicate(timeout=900)
        result[n] = {}
        for line in out.splitlines():
            if line.startswith("MEMCHILD "):
                result[n] = json.loads(line[len("MEMCHILD "):])
        if p.returncode or not result[n]:
            print(f"  (peak memory of {n} not measured: exit {p.returncode}: {err.strip()[-500:]})", file=sys.stderr)
    return result


# -----------------------------------------------------------------------------
# the benchmark


def run(argv=None):
    """Run the benchmark with command-line arguments `argv`; return the measurements (list of dicts)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args._argv = [a for a in argv]
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args._mem_child is not None:
            mem_child(args)
            return None
        return _run(args)
    finally:  # callers in the same process (tests) keep their thread count
        torch.set_num_threads(threads)


def _run(args):
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    on_gpu = device.type == "cuda"
    load_start = loadavg()
    dev_name = device_name(device)
    print(f"bench.py: preset {args.preset}, device {dev_name}, dtype {args.dtype}, compile {args.compile}, "
          f"torch {torch.__version__}")
    print(f"model shape: {args.model_config} (vocabulary {args.model_config['vocab_size']})")
    print(f"train: batch {args.batch_size} x seq {args.seq_len}, {args.warmup} warm-up steps, {args.repeats} rounds "
          f"x {args.steps} steps; decode: prompt {args.prompt_len}, {args.new_tokens} new tokens, batch 1 and "
          f"{args.decode_batch}; load average at start {load_start}")

    # build every contender in this process
    modules = {spec: build_ours(args, spec, device) for spec in args.models}
    if args.reference == "hf":
        dense = modules.get("dense") or build_ours(args, "dense", device)
        modules["hf"] = build_hf(args, dense, device)
        # the reference must compute the same function as our dense model
        ref_check = torch.randint(args.model_config["vocab_size"], (1, min(16, args.seq_len)), device=device)
        with torch.no_grad():
            ours_logits, _ = dense(ref_check)
            hf_logits = modules["hf"](input_ids=ref_check).logits
        ref_diff = (ours_logits - hf_logits).abs().max().item()
        print(f"hf reference: max |logits - ours| = {ref_diff:.2e} (fp32, same weights)")
        if ref_diff > 1e-3:
            raise RuntimeError(f"transformers' model does not match ours (max diff {ref_diff}): benchmark not comparable")
    # fp32 runs on a GPU use TF32 tensor cores, as a user would (after the fp32 reference check above)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    names = list(modules)
    dense_cfg = M.LlamaConfig(**args.model_config, kv_source="dense")
    dense_ref = FlopView(dense_cfg)  # the dense model's FLOP accounting, without building its weights

    def flop_model(name):
        return dense_ref if name == "hf" else modules[name]

    rows = []
    base_row = dict(device=dev_name, dtype=args.dtype, preset=args.preset, compile=args.compile,
                    vocab_size=args.model_config["vocab_size"], torch=torch.__version__, shared_machine_loadavg_start=load_start)

    # CPU peak memory: measured first, in child processes, while this process only holds the weights
    cpu_mem = {n: {} for n in names}
    if not on_gpu and "mem" not in args.skip:
        t0 = time.perf_counter()
        cpu_mem.update(measure_cpu_mem(args, [n for n in names if not (n == "hf" and "refmem" in args.skip)]))
        print(f"  peak RSS measured in child processes ({time.perf_counter() - t0:.1f}s)")

    # ---------------- training
    if "train" not in args.skip:
        contenders = {n: Contender(n, modules[n], args, device, dtype) for n in names}
        for n, c in contenders.items():
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                c.train_step()
            sync(device)
            print(f"  warm-up {n}: {time.perf_counter() - t0:.1f}s")
        tokens = args.steps * args.batch_size * args.seq_len
        matmul_rates = []
        for r in range(args.repeats):
            order = names if r % 2 == 0 else names[::-1]  # A B C, C B A, ... cancels drifts in load
            for n in order:
                c = contenders[n]
                if on_gpu:
                    sync(device)
                    base = torch.cuda.memory_allocated(device)
                    own = state_bytes(c.module, c.opt)
                    torch.cuda.reset_peak_memory_stats(device)
                sync(device)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    c.train_step()
                sync(device)
                c.train_rates.append(tokens / (time.perf_counter() - t0))
                if on_gpu:
                    peak = torch.cuda.max_memory_allocated(device) - base + own
                    c.mem_peak = max(c.mem_peak or 0, peak)
            matmul_rates.append(matmul_rate(args.matmul_n, dtype, device))
        load_train = loadavg()
        matmul_peak = statistics.median(matmul_rates)
        print(f"  measured {args.matmul_n}^3 matmul rate, {args.dtype}: {matmul_peak / 1e9:.0f} GFLOP/s "
              f"(median of {len(matmul_rates)} rounds; min {min(matmul_rates) / 1e9:.0f}, max {max(matmul_rates) / 1e9:.0f})")
        for n in names:
            c = contenders[n]
            med, lo, hi = summary(c.train_rates)
            fpt = flop_model(n).flops_per_token(args.seq_len)["train"]
            mfu = None
            if on_gpu and dtype == torch.bfloat16:
                try:
                    mfu = flop_model(n).estimate_mfu(med, args.seq_len, device_name=torch.cuda.get_device_name(device))
                except ValueError:
                    mfu = None
            mem, mem_base = (c.mem_peak, None) if on_gpu else (cpu_mem[n].get("train"), cpu_mem[n].get("baseline_rss"))
            rows.append(dict(base_row, model=n, mode="train", batch_size=args.batch_size, seq_len=args.seq_len,
                             tokens_per_s=med, tokens_per_s_min=lo, tokens_per_s_max=hi, repeats=list(c.train_rates),
                             mfu=mfu, flops_per_token=fpt, achieved_flops=fpt * med,
                             matmul_flops_measured=matmul_peak, util_vs_matmul=fpt * med / matmul_peak,
                             peak_mem_bytes=mem, mem_baseline_bytes=mem_base,
                             peak_mem_kind="cuda max_memory_allocated, own state + step peak" if on_gpu
                             else "peak RSS (VmHWM, process-wide) of a child process holding only this model",
                             kv_cache_bytes=None, n_params=n_params(modules[n]),
                             loadavg_after=load_train))
        # paired per-round ratios against dense, and the ratio the FLOP accounting predicts
        if "dense" in contenders:
            d = contenders["dense"]
            for row in rows:
                if row["mode"] != "train" or row["model"] == "dense":
                    continue
                ratios = [a / b for a, b in zip(contenders[row["model"]].train_rates, d.train_rates)]
                row["vs_dense_ratio"] = statistics.median(ratios)
                row["vs_dense_ratio_min"], row["vs_dense_ratio_max"] = min(ratios), max(ratios)
                row["vs_dense_ratio_predicted"] = (dense_ref.flops_per_token(args.seq_len)["train"] / row["flops_per_token"])
        for c in contenders.values():
            c.release_training()
        del contenders
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()

    # ---------------- decoding
    if "decode" not in args.skip:
        for m in modules.values():  # free any gradients; decode in the run's dtype
            m.zero_grad(set_to_none=True)
        dec = {n: modules[n].to(dtype).eval() for n in names}
        gen = torch.Generator(device="cpu").manual_seed(args.seed + 2)
        T, N = args.prompt_len, args.new_tokens
        for B in sorted({1, args.decode_batch}):
            prompt = torch.randint(args.model_config["vocab_size"], (B, T), generator=gen).to(device)
            pre, decr, mems = {n: [] for n in names}, {n: [] for n in names}, {}
            for n in names:  # warm-up (compiles the decode step, fills caches) and memory
                if on_gpu:
                    sync(device)
                    base = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                generate(dec[n], prompt, N + 1, args.compile)
                generate(dec[n], prompt, 1, args.compile)
                sync(device)
                if on_gpu:
                    mems[n] = torch.cuda.max_memory_allocated(device) - base + state_bytes(dec[n])
            for r in range(args.repeats):
                order = names if r % 2 == 0 else names[::-1]
                for n in order:
                    sync(device)
                    t0 = time.perf_counter()
                    out1 = generate(dec[n], prompt, 1, args.compile)
                    sync(device)
                    t1 = time.perf_counter()
                    outn = generate(dec[n], prompt, N + 1, args.compile)
                    sync(device)
                    t2 = time.perf_counter()
                    assert out1.shape == (B, T + 1) and outn.shape == (B, T + N + 1), (out1.shape, outn.shape)
                    pre[n].append(B * T / (t1 - t0))
                    decr[n].append(B * N / max((t2 - t1) - (t1 - t0), 1e-9))
            load_dec = loadavg()
            for n in names:
                med, lo, hi = summary(decr[n])
                pmed, plo, phi = summary(pre[n])
                mem, mem_base = (mems[n], None) if on_gpu else (cpu_mem[n].get(f"decode_{B}"), cpu_mem[n].get("baseline_rss"))
                rows.append(dict(base_row, model=n, mode="decode", batch_size=B, prompt_len=T, new_tokens=N,
                                 tokens_per_s=med, tokens_per_s_min=lo, tokens_per_s_max=hi, repeats=decr[n],
                                 prefill_tokens_per_s=pmed, prefill_tokens_per_s_min=plo, prefill_tokens_per_s_max=phi,
                                 mfu=None, flops_per_token=flop_model(n).flops_per_token(T + N + 1)["total"],
                                 peak_mem_bytes=mem, mem_baseline_bytes=mem_base,
                                 peak_mem_kind="cuda max_memory_allocated, weights + generate peak" if on_gpu
                                 else "peak RSS (VmHWM, process-wide) of a child process holding only this model",
                                 kv_cache_bytes=kv_cache_bytes(dec[n], B, T + N + 1, dtype),
                                 n_params=n_params(dec[n]), loadavg_after=load_dec))
            if "dense" in names:
                for n in names:
                    if n == "dense":
                        continue
                    row = next(r for r in rows if r["mode"] == "decode" and r["model"] == n and r["batch_size"] == B)
                    ratios = [a / b for a, b in zip(decr[n], decr["dense"])]
                    row["vs_dense_ratio"] = statistics.median(ratios)
                    row["vs_dense_ratio_min"], row["vs_dense_ratio_max"] = min(ratios), max(ratios)
                    drow = next(r for r in rows if r["mode"] == "decode" and r["model"] == "dense" and r["batch_size"] == B)
                    row["kv_cache_ratio"] = row["kv_cache_bytes"] / drow["kv_cache_bytes"]

    if "hf" in names:  # ours over transformers, paired per round
        for row in rows:
            if row["model"] == "hf" or row["model"] != "dense":
                continue
            hf_row = next((r for r in rows if r["model"] == "hf" and r["mode"] == row["mode"]
                           and r["batch_size"] == row["batch_size"]), None)
            if hf_row:
                ratios = [a / b for a, b in zip(row["repeats"], hf_row["repeats"])]
                row["vs_hf_ratio"] = statistics.median(ratios)
                row["vs_hf_ratio_min"], row["vs_hf_ratio_max"] = min(ratios), max(ratios)
    if args.reference == "hf":
        for row in rows:
            if row["model"] == "hf":
                row["ref_logits_max_abs_diff"] = ref_diff

    print_table(rows, args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {len(rows)} measurements to {args.out}")
    return rows


def fmt_ratio(row, key):
    if key not in row:
        return ""
    return f"{row[key]:.3f} [{row[key + '_min']:.3f}-{row[key + '_max']:.3f}]"


def print_table(rows, args):
    util_label = "MFU (datasheet bf16 peak)" if args.device.startswith("cuda") else "util vs measured matmul"
    print()
    print(f"== train: batch {args.batch_size} x seq {args.seq_len}, dtype {args.dtype}, compile {args.compile}, "
          f"vocab {args.model_config['vocab_size']}; tokens/s median [min-max] over {args.repeats} interleaved rounds")
    hdr = f"{'model':<22}{'params':>11}{'tokens/s':>10}{'[min-max]':>18}{'GFLOP/tok':>10}{util_label:>26}{'peak mem MiB':>13}" \
          f"  {'vs dense: measured [min-max]':<30}{'FLOP-pred':>10}{'realised':>9}  {'dense vs hf':<22}"
    print(hdr)
    for r in (r for r in rows if r["mode"] == "train"):
        util = r["mfu"] if r["mfu"] is not None else (r["util_vs_matmul"] if not args.device.startswith("cuda") else None)
        util_s = f"{100 * util:.1f}%" if util is not None else "n/a"
        mem = f"{r['peak_mem_bytes'] / 2 ** 20:.0f}" if r["peak_mem_bytes"] else "n/a"
        pred = f"{r['vs_dense_ratio_predicted']:.3f}" if "vs_dense_ratio_predicted" in r else ""
        real = f"{r['vs_dense_ratio'] / r['vs_dense_ratio_predicted']:.3f}" if "vs_dense_ratio_predicted" in r else ""
        print(f"{r['model']:<22}{r['n_params'] / 1e6:>10.2f}M{r['tokens_per_s']:>10.0f}"
              f"{'[%.0f-%.0f]' % (r['tokens_per_s_min'], r['tokens_per_s_max']):>18}{r['flops_per_token'] / 1e9:>10.4f}"
              f"{util_s:>26}{mem:>13}  {fmt_ratio(r, 'vs_dense_ratio'):<30}{pred:>10}{real:>9}  {fmt_ratio(r, 'vs_hf_ratio'):<22}")
    dec = [r for r in rows if r["mode"] == "decode"]
    if dec:
        print()
        print(f"== decode: generate(), greedy, prompt {args.prompt_len}, {args.new_tokens} new tokens, weights in {args.dtype}")
        print(f"{'model':<22}{'batch':>6}{'prefill tok/s':>14}{'decode tok/s':>13}{'[min-max]':>18}{'KV cache MiB':>13}"
              f"{'cache/dense':>12}{'peak mem MiB':>13}  {'vs dense [min-max]':<24}{'dense vs hf':<22}")
        for r in dec:
            mem = f"{r['peak_mem_bytes'] / 2 ** 20:.0f}" if r["peak_mem_bytes"] else "n/a"
            cr = f"{r['kv_cache_ratio']:.4f}" if "kv_cache_ratio" in r else ""
            print(f"{r['model']:<22}{r['batch_size']:>6}{r['prefill_tokens_per_s']:>14.0f}{r['tokens_per_s']:>13.0f}"
                  f"{'[%.0f-%.0f]' % (r['tokens_per_s_min'], r['tokens_per_s_max']):>18}{r['kv_cache_bytes'] / 2 ** 20:>13.2f}"
                  f"{cr:>12}{mem:>13}  {fmt_ratio(r, 'vs_dense_ratio'):<24}{fmt_ratio(r, 'vs_hf_ratio'):<22}")
    print(f"load average at end {loadavg()} (2 shared cores: other jobs on the machine disturb CPU timings)"
          if not args.device.startswith("cuda") else "")


if __name__ == "__main__":
    run()
