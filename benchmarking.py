"""benchmarking.py: the harness behind bench.py, which keeps only its settings, the timed loops and
the rows they produce. Here: the checks of bench.py's settings, the machine's limits (matmul rate,
memory read bandwidth), the contenders (our Llama, transformers' LlamaForCausalLM) and how one step
of each is run, the bytes a decode step must read, CPU peak memory in child processes, the
attention-reuse microbenchmark (--attn_reuse), the profiler (--profile), ratios, tables and JSON.
How each number is taken and why: docs/bench.md."""

import copy
import gc
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types

import torch
import torch.nn.functional as F

import model as M
from configurator import DTYPES, ConfigError, autocast, peak_flops_for
from checkpoint import hf_config_from_llama
from convert_hf import hf_state_dict, import_transformers
from guards import check_not_tracked
from quantize import QUANTIZERS
from speed import block_weights, compile_decode_step, fuse_projections, huge_page_bytes, pack_weights, use_decode_paths

SKIP_PARTS = ("train", "decode", "mem", "refmem")


# -----------------------------------------------------------------------------
# settings checks (bench.parse_settings calls them before any work)


def check_out_path(path, replace_tracked=False):
    if not path:
        return
    check_not_tracked(path, "out", replace_tracked)  # a committed result is replaced only when asked
    d = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"--out={path} is a directory: name a .json file")
    try:  # a missing directory is made, as train.py makes its out_dir
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out={path}: cannot create the directory {d} ({e.strerror})") from None
    try:
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as e:
        raise ConfigError(f"--out={path}: cannot write in {d} ({e.strerror})") from None


def parse_skip(text):
    parts = {x.strip() for x in text.split(",") if x.strip()}
    unknown = sorted(parts - set(SKIP_PARTS))
    if unknown:
        raise ConfigError(f"--skip: unknown part {', '.join(unknown)}; allowed: {', '.join(SKIP_PARTS)}")
    return parts


def parse_models(text, n_layer):
    specs = list(dict.fromkeys(x.strip() for x in text.split(";") if x.strip()))  # unique, in order
    if not specs:
        raise ConfigError("--models is empty: give kv_source specs separated by ';', e.g. 'dense;upper:half'")
    for spec in specs:
        if spec == "hf":
            raise ConfigError("--models: 'hf' is not a kv_source; add transformers with --reference hf")
        try:
            M.check_maps(*model_maps(spec, n_layer))
        except ValueError as e:
            raise ConfigError(f"--models: {e}") from None
    return specs


def model_maps(spec, n_layer):
    """(kv_source, attn_source) of a --models spec: 'upper:half' or, with attention sharing, 'dense@upper:half'."""
    kv, _, attn = spec.partition("@")
    return M.parse_kv_source(kv, n_layer), M.parse_kv_source(attn or None, n_layer, "attn_source")


# -----------------------------------------------------------------------------
# helpers and the machine's limits


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary(values):
    return statistics.median(values), min(values), max(values)


def round_order(names, r):
    """A B C, then C B A, ...: drifts in the machine's load fall on every model alike."""
    return names if r % 2 == 0 else names[::-1]


def tensor_bytes(tensors):
    """Bytes of the distinct tensors among tensors (tied weights count once; tensors that are views of one
    storage, speed.pack_weights', count each its own bytes)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        key = (t.data_ptr(), t.nbytes)
        if key not in seen:
            seen.add(key)
            total += t.nbytes
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


def memory_bandwidth(nbytes, device, reps=3):
    """Read bandwidth in bytes/s: the best of `reps` sums over a fresh buffer of nbytes, far larger than
    the caches. Fresh each time because on this project's VMs the speed depends on where a buffer
    lands: one allocation read at ~49 GB/s in every round, the next at ~78 (bench.py, docs/bench.md),
    and each round's best of fresh buffers is the bound, so a model's weights cannot beat it by luck.

    A sum reads every byte once and writes nothing, like a decode step streaming its weights; a copy
    would also write (and on x86 read the destination before writing it), so its byte count depends
    on the hardware. The sum's arithmetic is one add per element, far below what a core can do, so
    it runs at the memory's speed (on a quiet machine here the same as a copy counted as 2x bytes).
    The best read, not the median, because the bound is what the machine can do when least disturbed.
    On CPU also a buffer on 2 MiB pages (speed.huge_page_bytes), as speed.pack_weights lays a decoding model's
    weights: on the Zen 4 a sum read one at 31.3 GB/s where one on 4 KiB pages read at 26 (THP `madvise`), so a
    bound read on small pages alone let weights on huge pages read at 126% of it (docs/bench.md, "The bound on
    huge pages")."""
    if nbytes < 4:  # an empty buffer's sum takes no time to measure
        raise ValueError(f"memory_bandwidth needs at least one float32 to read: nbytes={nbytes}")
    best, buffers = float("inf"), [lambda: torch.ones(nbytes // 4, device=device)]
    if torch.device(device).type == "cpu":
        buffers.append(lambda: huge_page_bytes(nbytes // 4 * 4).view(torch.float32).fill_(1.0))
    for make in buffers:
        buf = make()
        buf.sum()  # warm-up
        for _ in range(reps):
            sync(buf.device)
            t0 = time.perf_counter()
            buf.sum()
            sync(buf.device)
            best = min(best, (time.perf_counter() - t0) / buf.nbytes)
        del buf
    return 1 / best


def step_bound(nbytes, device, big):
    """(the read of a buffer of a decode step's nbytes, re-read as steps re-read their weights; the better of it and
    `big`, the preset's big-buffer read): the bound of a decode row and of the profile's products. Where the caches hold
    much of a model (the AMX Xeon's 480 MiB L3) a step reads faster than the big buffer: int4 SmolLM2 at 117.8% of it
    (docs/bench.md, "The weight's stream prefetched on Intel; bf16 blocks by tiles")."""
    own = memory_bandwidth(int(nbytes), device, reps=5)
    return own, max(big, own)


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


def build_ours(s, spec, device):
    torch.manual_seed(s.seed)
    kv_source, attn_source = model_maps(spec, s.model_config["n_layer"])
    return M.Llama(M.LlamaConfig(**s.model_config, kv_source=kv_source, attn_source=attn_source)).to(device)


def build_hf(dense, device):
    """transformers.LlamaForCausalLM of dense's shape, SDPA attention, with dense's weights (the
    config and the name map are convert_hf's, the ones export writes)."""
    transformers = import_transformers()
    hcfg = transformers.LlamaConfig(**hf_config_from_llama(dense.config, torch.float32))
    hcfg._attn_implementation = "sdpa"
    hf = transformers.LlamaForCausalLM(hcfg).to(device)
    missing, unexpected = hf.load_state_dict(hf_state_dict(dense, torch.float32), strict=False)
    tied = ["lm_head.weight"] if dense.config.tie_embeddings else []  # hf_state_dict leaves a tied head out
    missing = [k for k in missing if "rotary_emb" not in k and k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"weights do not map onto LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    return hf


def check_reference(dense, hf, vocab, device):
    """Max |logits| difference between transformers' model and ours (fp32): they must compute the
    same function, or the comparison means nothing."""
    x = torch.randint(vocab, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        diff = (dense(x)[0] - hf(input_ids=x).logits).abs().max().item()
    print(f"hf reference: max |logits - ours| = {diff:.2e} (fp32, same weights)")
    if diff > 1e-3:
        raise RuntimeError(f"transformers' model does not match ours (max diff {diff}): benchmark not comparable")
    return diff


def n_params(m):
    return m.num_params() if isinstance(m, M.Llama) else sum(p.numel() for p in m.parameters())


def make_optimizer(m, device):
    if isinstance(m, M.Llama):
        return m.configure_optimizers(0.1, 3e-4, (0.9, 0.95), device.type)
    # the same groups and settings for transformers' model
    params = [p for p in m.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), fused=True)  # as ours: at its best


class FlopView:
    """model.py's FLOP accounting for a config, without weights (it only reads .config)."""
    flops_per_token = M.Llama.flops_per_token
    estimate_mfu = M.Llama.estimate_mfu

    def __init__(self, config):
        self.config = config


class Trainer:
    """One contender's training steps, the rates of its timed rounds and (CUDA) its peak memory."""

    def __init__(self, name, module, s, device):
        self.name, self.module, self.device, self.dtype = name, module, device, s.dtype
        self.is_hf = not isinstance(module, M.Llama)
        self.call = torch.compile(module) if s.compile else module
        self.opt = make_optimizer(module, device)
        gen = torch.Generator(device="cpu").manual_seed(s.seed + 1)
        # a few random batches (never zeros), reused round-robin so making data is not timed
        self.batches = []
        for _ in range(3):
            data = torch.randint(s.model_config["vocab_size"], (s.batch_size, s.seq_len + 1), generator=gen)
            self.batches.append((data[:, :-1].to(device), data[:, 1:].to(device)))
        self.k, self.tokens_per_step = 0, s.batch_size * s.seq_len
        self.rates, self.mem_peak = [], None

    def step(self):
        x, y = self.batches[self.k % len(self.batches)]
        self.k += 1
        with autocast(self.device.type, self.dtype):
            if self.is_hf:
                logits = self.call(input_ids=x, use_cache=False).logits
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
            else:
                _, loss = self.call(x, y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def timed_round(self, steps):
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            sync(self.device)
            base, own = torch.cuda.memory_allocated(self.device), state_bytes(self.module, self.opt)
            torch.cuda.reset_peak_memory_stats(self.device)
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        self.rates.append(steps * self.tokens_per_step / (time.perf_counter() - t0))
        if on_gpu:
            self.mem_peak = max(self.mem_peak or 0, torch.cuda.max_memory_allocated(self.device) - base + own)

    def release(self):
        self.opt.zero_grad(set_to_none=True)
        self.opt = self.call = self.batches = None


def greedy(logits):
    """The likeliest token of each row (B, 1), as model.sample_token picks it at temperature 0."""
    return M.sample_token(logits, temperature=0).unsqueeze(-1)


class Decoder:
    """Prefill and greedy decode of one model at one batch size, timed by the caller, gpt-fast style:
    our model.prefill and model.decode_step (compiled with fullgraph when asked; the projections joined,
    speed.fuse_projections, unless join is False; bf16 and int8 weights in blocks, speed.block_weights, unless block
    is False: int8 figures before 2026-12-04 evening were row-major; at more than one row a tied head's copy in blocks
    too, from 2026-12-04 late night; the weights end to end on huge pages,
    speed.pack_weights, unless pack is False: figures before 2026-12-04 night were not) into a static cache
    allocated once; transformers' forward with the cache it makes itself."""

    def __init__(self, module, prompt, new_tokens, compile_step, join=True, block=True, pack=True):
        self.module, self.prompt = module, prompt
        self.is_hf = not isinstance(module, M.Llama)
        B, T = prompt.shape
        # positions as ready device tensors: no host-to-device copy inside the timed loop
        self.positions = [torch.tensor([p], device=prompt.device) for p in range(T, T + new_tokens)]
        if self.is_hf:  # transformers 5.24 renamed the cache argument and output past_key_values -> cache
            self.cache_key = "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
        else:
            use_decode_paths(module)  # the CPU decoding paths (speed.py), before compiling
            if join:  # False: the projections' products separate, as before (experiments/batch_decode.py --old)
                fuse_projections(module)
            if block:  # False: row-major weights, as before (experiments/batch_decode.py --old=blocks)
                block_weights(module, tied_too=B > 1)  # batched rows: a tied head's copy in blocks too
            if pack:  # False: each weight in its own allocation, as before (experiments/batch_decode.py --old=packed)
                pack_weights(module)
            self.cache = module.new_cache(B, T + new_tokens)
            # dynamic=False: one specialised graph per batch size, as in a server with fixed batch slots.
            # No CUDA graphs (mode="reduce-overhead"): they would need the cache tensors marked static,
            # and no GPU was at hand to check that; batch-1 decoding on a GPU is launch-bound without them.
            self.step = compile_decode_step(module) if compile_step else module.decode_step

    @torch.no_grad()
    def prefill(self):
        """The first new token (B, 1); fills the cache."""
        if self.is_hf:
            out = self.module(input_ids=self.prompt, use_cache=True)
            self.hf_cache = out[self.cache_key]
            return greedy(out.logits[:, -1])
        return greedy(self.module.prefill(self.prompt, self.cache))

    @torch.no_grad()
    def decode(self, token):
        """One step per position after the prompt; the tokens (B, N)."""
        tokens = []
        for pos in self.positions:
            if self.is_hf:
                out = self.module(input_ids=token, use_cache=True, **{self.cache_key: self.hf_cache})
                self.hf_cache, logits = out[self.cache_key], out.logits[:, -1]
            else:
                logits = self.step(token, pos, self.cache)
            token = greedy(logits)
            tokens.append(token)
        return torch.cat(tokens, dim=1)

    def timed(self):
        """(prefill seconds, decode seconds): the device is synchronised only at the clock reads."""
        device = self.prompt.device
        sync(device)
        t0 = time.perf_counter()
        token = self.prefill()
        sync(device)
        t1 = time.perf_counter()
        tokens = self.decode(token)
        sync(device)
        t2 = time.perf_counter()
        assert tokens.shape == (self.prompt.shape[0], len(self.positions)), tokens.shape
        return t1 - t0, t2 - t1


def kv_cache_bytes(module, batch, max_len, dtype):
    if isinstance(module, M.Llama):
        return module.new_cache(batch, max_len, dtype=dtype).nbytes()
    c = module.config  # transformers' cache holds every layer's K and V
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * batch * c.num_key_value_heads * max_len * hd * dtype.itemsize


def decode_bytes_per_step(module, config, batch, keys):
    """(weight bytes, K/V bytes) one decode step has to read from memory at least.

    Weights: every parameter once, in its (decode) dtype, and every quantized weight with its scales,
    except the embedding table, of which a lookup reads only `batch` rows, unless it is tied to the LM
    head, which reads it whole.
    K/V: every layer attends over `keys` positions of its owner's K and V. Consumers read their
    owner's K/V again (sharing saves cache memory, not reads, unless a re-read hits in the CPU's
    caches), so this is the same for dense and shared models. Our static cache is masked beyond the
    current position: SDPA reads those rows too, but they are waste, not need, and not counted."""
    emb = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else module.embed_tokens
    weights = tensor_bytes(list(module.parameters()))
    weights += sum(m.read_bytes() for m in module.modules() if hasattr(m, "read_bytes"))  # quantize.py's
    if getattr(module.lm_head, "weight", None) is not emb.weight:  # an untied head in blocks has no .weight
        weights -= emb.weight.nbytes - batch * emb.weight[0].nbytes
    elsize = emb.weight.element_size()
    kv = config.n_layer * 2 * batch * config.n_kv_head * keys * config.head_dim * elsize
    return weights, kv


# -----------------------------------------------------------------------------
# CPU peak memory: one child process per model


def mem_child_main(s):
    """Runs in a child process that holds only one model: decode at batch 1, decode at the larger
    batch, then train, reading the process's peak RSS (VmHWM) after each phase. Peak RSS only grows,
    so each reading is that phase's peak when the phases grow in that order (they do: a decode holds
    the weights and a cache, training the weights, gradients, AdamW state and activations); else
    it is an upper bound."""
    name, device = s.mem_child, torch.device(s.device)
    torch.set_num_threads(1)  # only memory is read here; the children run side by side
    baseline = rss_bytes()
    dense = build_ours(s, "dense" if name == "hf" else name, device)
    module = build_hf(dense, device) if name == "hf" else dense
    del dense
    result = {"baseline_rss": baseline}
    if "decode" not in s.skip:
        module.to(DTYPES[s.dtype]).eval()
        gen = torch.Generator(device="cpu").manual_seed(s.seed + 2)
        for B in sorted({1, s.decode_batch}):
            prompt = torch.randint(s.model_config["vocab_size"], (B, s.prompt_len), generator=gen).to(device)
            Decoder(module, prompt, s.new_tokens, s.compile).timed()
            result[f"decode_{B}"] = rss_bytes("VmHWM")
        module.float().train()
    if "train" not in s.skip:
        trainer = Trainer(name, module, s, device)
        for _ in range(2):  # the second step holds gradients and AdamW state together
            trainer.step()
        result["train"] = rss_bytes("VmHWM")
    print("MEMCHILD " + json.dumps(result))


def measure_cpu_mem(s, names, script):
    """Peak RSS per phase of child processes of `script` (bench.py), each holding only one model (see
    mem_child_main). They run side by side (peak RSS is per process, so they do not disturb each
    other's numbers) before any timing starts."""
    t0 = time.perf_counter()
    procs = {n: subprocess.Popen([sys.executable, script] + s.argv + ["--mem_child", n],
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
    print(f"  peak RSS measured in child processes ({time.perf_counter() - t0:.1f}s)")
    return result


def peak_memory(env, name, phase, gpu_peak):
    """(peak bytes, baseline bytes, what the number is) of one model in one phase."""
    if env.on_gpu:
        return gpu_peak, None, f"cuda max_memory_allocated, own state + {phase} peak"
    mem = env.cpu_mem.get(name, {})
    kind = "peak RSS (VmHWM, process-wide) of a child process holding only this model" if phase in mem else None
    return mem.get(phase), mem.get("baseline_rss"), kind




# -----------------------------------------------------------------------------
# attention reuse (--attn_reuse): an EchoAtt sharer recomputing or reusing its source's pattern


def time_call(fn, device, reps=5):
    """Median seconds of fn() over reps calls, after one untimed call."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def attention_reuse(s, device, dtype):
    """An EchoAtt sharer recomputes softmax(q_j k_j^T) inside SDPA (flash: no T x T memory), or reuses the
    probabilities its source materialised (math attention: saves q k^T and the softmax per sharer, costs
    the source a math instead of a flash attention and B*H*T*T values kept). Times per call, one row
    per sequence length, and how many sharers per source make reuse pay."""
    c = s.model_config
    H, Hkv, hd = c["n_head"], c["n_kv_head"], c["n_embd"] // c["n_head"]
    rows = []
    for T in (int(t) for t in s.attn_reuse.split(",")):
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(s.batch_size, h, T, hd, generator=g).to(device, dtype) for h in (H, Hkv, Hkv))
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        probs = torch.softmax((q @ k.repeat_interleave(H // Hkv, 1).transpose(-1, -2) / hd ** 0.5)
                              .masked_fill(~causal, float("-inf")), dim=-1)
        v_rep = v.repeat_interleave(H // Hkv, 1)
        flash = time_call(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv), device)
        math = time_call(lambda: torch.softmax((q @ k.repeat_interleave(H // Hkv, 1).transpose(-1, -2) / hd ** 0.5)
                                               .masked_fill(~causal, float("-inf")), dim=-1) @ v_rep, device)
        reuse = time_call(lambda: probs @ v_rep, device)
        extra = math - flash  # what materialising costs the source
        rows.append({"seq_len": T, "sharer_recompute_s": flash, "sharer_reuse_s": reuse, "source_extra_s": extra,
                     "probs_bytes": probs.numel() * probs.element_size(),
                     "sharers_to_pay_off": extra / (flash - reuse) if flash > reuse else None})
        r = rows[-1]
        print(f"T={T}: sharer recomputes {1e3 * flash:.2f} ms, reuses {1e3 * reuse:.2f} ms; the source pays "
              f"{1e3 * extra:+.2f} ms and keeps {r['probs_bytes'] / 2**20:.1f} MiB of probabilities; reuse pays from "
              + (f"{r['sharers_to_pay_off']:.1f} sharers per source" if r["sharers_to_pay_off"] else "never"))
    return rows


# -----------------------------------------------------------------------------
# ratios and JSON


def paired_ratio(row, other, key):
    """Median, min and max over rounds of row's rate over other's in the same round: the two ran next
    to each other, so this cancels most of a shared machine's drift."""
    ratios = [a / b for a, b in zip(row["repeats"], other["repeats"])]
    row[key], row[key + "_min"], row[key + "_max"] = summary(ratios)


def add_ratios(rows):
    """Shared models against dense (and what the FLOPs or cache sizes predict), dense against hf."""
    for row in rows:
        peers = {r["model"]: r for r in rows if (r["mode"], r["batch_size"]) == (row["mode"], row["batch_size"])}
        dense = peers.get("dense")
        if dense is not None and row["model"] not in ("dense", "hf"):
            paired_ratio(row, dense, "vs_dense_ratio")
            if row["mode"] == "train":
                row["vs_dense_ratio_predicted"] = dense["flops_per_token"] / row["flops_per_token"]
            else:
                row["kv_cache_ratio"] = row["kv_cache_bytes"] / dense["kv_cache_bytes"]
        if row["model"] == "dense" and "hf" in peers:
            paired_ratio(row, peers["hf"], "vs_hf_ratio")


def write_json(rows, path):
    """Temp file and rename: an interrupted write leaves no half file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(tmp, path)
    print(f"wrote {len(rows)} measurements to {path}" if isinstance(rows, list) else f"wrote {path}")


# -----------------------------------------------------------------------------
# decode profile: where a step's time goes, op by op

# the leaves: aten::linear and aten::matmul call these; quantize.Int8Linear and Int4Linear the int8/int4 ones;
# speed.matvec (one row on a CPU, every weight kind) and speed.BlockedLinear's matvec_blocked (_int8, _q4) the last
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu",
              "speed::matvec", "speed::matvec_blocked", "speed::matvec_blocked_int8", "speed::matvec_blocked_q4",
              "speed::decode_layers")  # the last: a step's layers in one call, its products most of its time


def profile_train(t, s, env, matmul_rate, flops_per_token, top=12):
    """torch.profiler over one train step (after the timed rounds): self time per op and its share, and
    what the matmuls achieve against the measured matmul rate."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t.step()
        sync(env.device)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = max(sum(e.self_cpu_time_total for e in ops), 1e-9)
    print(f"\n== train profile: {t.name}, one step of {t.tokens_per_step} tokens, {s.dtype}, compile {s.compile}: "
          f"{1e-3 * total:.0f} ms of op self time")
    for e in ops[:top]:
        print(f"{e.key[:60]:<62}{e.count:>6} calls{1e-3 * e.self_cpu_time_total:>10.1f} ms{e.self_cpu_time_total / total:>7.1%}")
    mm = sum(e.self_cpu_time_total for e in ops if e.key in MATMUL_OPS)
    if mm:
        print(f"matmuls: {mm / total:.0%} of the op time; if they ran at the measured {matmul_rate / 1e9:.0f} GFLOP/s "
              f"the step's FLOPs would take {1e3 * t.tokens_per_step * flops_per_token / matmul_rate:.0f} ms")


def profile_decode(s, env, name, module, bandwidth):
    """torch.profiler over the decode steps at batch 1, after a warm-up (compilation included) and
    one run without the profiler, whose time per token is printed beside the profiled one."""
    gen = torch.Generator(device="cpu").manual_seed(s.seed + 3)
    prompt = torch.randint(s.model_config["vocab_size"], (1, s.prompt_len), generator=gen).to(env.device)
    dec = Decoder(module, prompt, s.new_tokens, s.compile)
    dec.timed()
    plain = dec.timed()[1]
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if env.on_gpu else [])
    token = dec.prefill()
    sync(env.device)
    with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
        dec.decode(token)
        sync(env.device)
    weights = getattr(dec.step, "weights", None)  # speed.LayersInOneCall's: what its one op reads a call
    one_call = sum(t.nbytes for t in weights[0] + weights[1]) if weights else None
    print_profile(prof, name, s, env, plain, bandwidth, one_call=one_call)


def op_bytes(e, elsize, one_call=None):
    """Bytes an op has to read, where that is clear from its input shapes: a matmul's largest operand
    (at decode batch sizes the weight), an attention kernel's K and V (the whole static cache); the step's
    layers in one call (speed::decode_layers, whose lists of tensors the profiler does not record): one_call."""
    shapes = [x for x in e.input_shapes or [] if x]
    if e.key == "speed::decode_layers":
        return one_call
    if e.key in ("aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu") and len(shapes) >= 2:
        return _numel(shapes[1])  # the int8 weight, one byte each, or the 4-bit one packed two a byte
    if e.key == "speed::matvec" and len(shapes) >= 2:  # a float weight, or int8 / 4-bit codes (with their scales)
        return _numel(shapes[1]) * (elsize if len(shapes) == 2 else 1)
    if e.key in ("speed::matvec_blocked_int8", "speed::matvec_blocked_q4") and len(shapes) >= 2:
        return _numel(shapes[1])  # int8 codes in blocks, or 4-bit ones with their scales and minimums, as bytes
    if e.key in MATMUL_OPS and shapes:
        return max(map(_numel, shapes)) * elsize
    if e.key.startswith("aten::_scaled_dot_product") and len(shapes) >= 3:
        return (_numel(shapes[1]) + _numel(shapes[2])) * elsize
    return None


def print_profile(prof, name, s, env, plain_s, bandwidth, top=20, one_call=None):
    """Per op and input shapes: calls and self time per token, share of the op time, and the bytes
    read per call and GB/s where op_bytes knows them, to set against the measured bandwidth."""
    steps, elsize = s.new_tokens, env.dtype.itemsize
    self_us = (lambda e: e.self_device_time_total) if env.on_gpu else (lambda e: e.self_cpu_time_total)
    ops = sorted(prof.key_averages(group_by_input_shape=True), key=self_us, reverse=True)
    if env.on_gpu:  # kernels are listed beside the aten ops that launch them: keep the ops (untested, no GPU)
        ops = [e for e in ops if e.device_type == torch.autograd.DeviceType.CPU]
    total = max(sum(map(self_us, ops)), 1e-9)
    print(f"\n== decode profile: {name}, batch 1, {steps} steps, {s.dtype}, compile {s.compile}, "
          f"{torch.get_num_threads()} threads: {1e6 * plain_s / steps:.0f} us/token without the profiler, "
          f"{total / steps:.0f} us/token of op self time under it; measured read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"{'op':<40}{'input shapes':<44}{'calls/tok':>10}{'us/tok':>9}{'share':>7}{'MiB read':>10}{'GB/s':>8}")
    mm_us = mm_bytes = 0
    for i, e in enumerate(ops):
        t, nbytes, read, gbps = self_us(e), op_bytes(e, elsize, one_call), "", ""
        if nbytes is not None:
            read, gbps = f"{nbytes / 2 ** 20:.2f}", f"{nbytes * e.count / max(t, 1e-9) / 1e3:.1f}"
        if e.key in MATMUL_OPS and nbytes is not None:
            mm_us, mm_bytes = mm_us + t, mm_bytes + nbytes * e.count
        if i < top and t >= 0.005 * total:
            print(f"{e.key[:39]:<40}{str(e.input_shapes)[:43]:<44}{e.count / steps:>10.1f}{t / steps:>9.1f}"
                  f"{t / total:>7.1%}{read:>10}{gbps:>8}")
    if mm_us:
        rate = mm_bytes / mm_us * 1e6
        own, top = step_bound(mm_bytes / steps, env.device, bandwidth)
        print(f"matmuls: {mm_us / total:.0%} of the op time; {mm_bytes / steps / 2 ** 20:.1f} MiB of weights per "
              f"token read at {rate / 1e9:.1f} GB/s, {rate / bandwidth:.0%} of the measured bandwidth, "
              f"{rate / top:.0%} of the better of it and a read of those bytes ({own / 1e9:.1f} GB/s)")


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


# -----------------------------------------------------------------------------
# printing


def fmt_ratio(row, key):
    if key not in row:
        return ""
    return f"{row[key]:.3f} [{row[key + '_min']:.3f}-{row[key + '_max']:.3f}]"


def fmt_range(row, key="tokens_per_s"):
    return f"[{row[key + '_min']:.0f}-{row[key + '_max']:.0f}]"


def fmt_mem(row):
    return f"{row['peak_mem_bytes'] / 2 ** 20:.0f}" if row["peak_mem_bytes"] else "n/a"


def print_train_table(rows, s):
    train = [r for r in rows if r["mode"] == "train"]
    if not train:
        return
    print(f"\n== train: batch {s.batch_size} x seq {s.seq_len}, {s.dtype}, compile {s.compile}, vocab "
          f"{s.model_config['vocab_size']}; tokens/s median [min-max] over {s.repeats} interleaved rounds; "
          f"bound: measured {s.dtype} matmul, {train[0]['bound'] / 1e9:.0f} GFLOP/s")
    print(f"{'model':<22}{'params':>11}{'tokens/s':>10}{'[min-max]':>18}{'GFLOP/tok':>10}{'of bound':>9}{'MFU':>7}"
          f"{'peak mem MiB':>13}  {'vs dense [min-max]':<24}{'FLOP-pred':>10}{'realised':>9}  {'dense vs hf':<22}")
    for r in train:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        pred = f"{r['vs_dense_ratio_predicted']:.3f}" if "vs_dense_ratio_predicted" in r else ""
        real = f"{r['vs_dense_ratio'] / r['vs_dense_ratio_predicted']:.3f}" if pred else ""
        print(f"{r['model']:<22}{r['n_params'] / 1e6:>10.2f}M{r['tokens_per_s']:>10.0f}{fmt_range(r):>18}"
              f"{r['flops_per_token'] / 1e9:>10.4f}{r['fraction_of_bound']:>9.1%}{mfu:>7}{fmt_mem(r):>13}  "
              f"{fmt_ratio(r, 'vs_dense_ratio'):<24}{pred:>10}{real:>9}  {fmt_ratio(r, 'vs_hf_ratio'):<22}")


def print_decode_table(rows, s):
    dec = [r for r in rows if r["mode"] == "decode"]
    if dec:
        print(f"\n== decode: prefill + {s.new_tokens} greedy steps after a {s.prompt_len}-token prompt, weights in "
              f"{s.dtype}, compiled step {s.compile}; bound: the better read of a big buffer, "
              f"{dec[0]['bandwidth_measured'] / 1e9:.1f} GB/s, and of one of the step's own size, re-read (column bound)")
        print(f"{'model':<22}{'batch':>6}{'prefill tok/s':>14}{'decode tok/s':>13}{'[min-max]':>16}{'MiB/step':>9}"
              f"{'GB/s':>7}{'bound':>7}{'of bound':>9}{'KV MiB':>8}{'cache/dense':>12}{'peak mem MiB':>13}  "
              f"{'vs dense [min-max]':<24}{'dense vs hf':<22}")
        for r in dec:
            cr = f"{r['kv_cache_ratio']:.4f}" if "kv_cache_ratio" in r else ""
            print(f"{r['model']:<22}{r['batch_size']:>6}{r['prefill_tokens_per_s']:>14.0f}{r['tokens_per_s']:>13.0f}"
                  f"{fmt_range(r):>16}{r['bytes_per_step'] / 2 ** 20:>9.1f}{r['achieved_bytes_per_s'] / 1e9:>7.1f}"
                  f"{r['bound'] / 1e9:>7.1f}{r['fraction_of_bound']:>9.1%}{r['kv_cache_bytes'] / 2 ** 20:>8.2f}{cr:>12}{fmt_mem(r):>13}  "
                  f"{fmt_ratio(r, 'vs_dense_ratio'):<24}{fmt_ratio(r, 'vs_hf_ratio'):<22}")
    if not s.device.startswith("cuda"):
        print(f"load average at end {loadavg()} (a shared machine's other jobs disturb CPU timings)")


# -----------------------------------------------------------------------------
# bench.py's plumbing: what every row shares, and the steps around the timed loops


def make_env(s):
    """What every row shares: the device, the run's dtype and the base fields; printed once. First of all,
    sizes that cannot fit are refused (check_sizes), before any model is built."""
    check_sizes(s)
    device = torch.device(s.device)
    env = types.SimpleNamespace(device=device, dtype=DTYPES[s.dtype], on_gpu=device.type == "cuda",
                                cpu_mem={}, ref_diff=None, flops={})
    name, load = device_name(device), loadavg()
    env.base_row = dict(device=name, dtype=s.dtype, preset=s.preset, compile=s.compile,
                        vocab_size=s.model_config["vocab_size"], threads=torch.get_num_threads(),
                        torch=torch.__version__, shared_machine_loadavg_start=load)
    print(f"bench.py: preset {s.preset}, device {name}, dtype {s.dtype}, compile {s.compile}, "
          f"torch {torch.__version__}")
    print(f"model shape: {s.model_config}")
    print(f"train: batch {s.batch_size} x seq {s.seq_len}, {s.warmup} warm-up steps, {s.repeats} rounds x {s.steps} "
          f"steps; decode: prompt {s.prompt_len}, {s.new_tokens} new tokens, batch 1 and {s.decode_batch}; "
          f"load average at start {load}")
    return env


def mfu(env, name, tokens_per_s, seq_len):
    """Train MFU against the datasheet peak: bf16 on a GPU the table knows, else None."""
    if not (env.on_gpu and env.dtype == torch.bfloat16):  # the datasheet table has bf16 peaks only
        return None
    try:
        return env.flops[name].estimate_mfu(tokens_per_s, seq_len,
                                               peak_flops=peak_flops_for(torch.cuda.get_device_name(env.device)))
    except ValueError:  # a GPU the table does not know
        return None


def release(trainers, env):
    """Frees the trainers' optimizer state and batches before decoding starts."""
    for t in trainers.values():
        t.release()
    trainers.clear()
    gc.collect()
    if env.on_gpu:
        torch.cuda.empty_cache()


def add_quantized_copies(s, env, modules):
    """Each of our models again with weight-only quantized linear layers (s.quantize: int8 or int4), as
    '<spec>+int8' or '<spec>+int4' (decode only)."""
    for spec in s.models:
        name = f"{spec}+{s.quantize}"
        modules[name] = QUANTIZERS[s.quantize](copy.deepcopy(modules[spec]))
        env.flops[name], env.n_params[name] = env.flops[spec], env.n_params[spec]


def announce_warmup(what, compiling):
    """Say that an untimed warm-up starts when it compiles (minutes for a big model); its start time."""
    if compiling:
        print(f"  warm-up {what}: compiling (torch.compile; minutes for a big model) ...", flush=True)
    return time.perf_counter()


def print_round(what, r, repeats, rates, bound, unit):
    """One line as each timed round ends: every model's tokens/s, and the bound measured in that round."""
    print(f"  {what} round {r + 1}/{repeats}: " + ", ".join(f"{n} {v:,.0f}" for n, v in rates.items()) +
          f" tokens/s; {bound:,.1f} {unit}", flush=True)


def warm_decoders(s, env, modules, prompt):
    """({name: Decoder}, {name: CUDA peak bytes}) after the untimed runs that compile the step and
    fill the caches; on CUDA the peak of each model's own decode."""
    decoders, mems = {}, {}
    for n, m in modules.items():
        if env.on_gpu:
            sync(env.device)
            base = torch.cuda.memory_allocated(env.device)
            torch.cuda.reset_peak_memory_stats(env.device)
        decoders[n] = Decoder(m, prompt, s.new_tokens, s.compile)
        t0 = announce_warmup(f"decode {n} at batch {prompt.shape[0]}", s.compile)
        for _ in range(2 if s.compile else 1):  # the second compiled run is the first at full speed
            decoders[n].timed()
        if s.compile:
            print(f"  warm-up decode {n} at batch {prompt.shape[0]}: {time.perf_counter() - t0:.1f}s", flush=True)
        if env.on_gpu:
            mems[n] = torch.cuda.max_memory_allocated(env.device) - base + state_bytes(m)
    return decoders, mems


def check_sizes(s):
    """Refuse, before anything is allocated, sizes that cannot fit: each model's training state, its
    activations at batch_size x seq_len and its decode cache at decode_batch beyond the device's memory,
    or timed rounds whose lower-bound time is over a day (guards: the same estimates as train.py's)."""
    from guards import GIB, LAYER_FORWARD_FLOOR_S, available_memory, parameter_count
    cfg = s.model_config
    params = parameter_count(cfg)
    kv_dim = cfg["n_embd"] // cfg["n_head"] * cfg["n_kv_head"]
    act = 2 if s.dtype == "bfloat16" else 4
    train = 16 * params + s.batch_size * s.seq_len * cfg["n_layer"] * (4 * cfg["n_embd"] + 2 * cfg["intermediate_size"]) * act
    cache = s.decode_batch * cfg["block_size"] * cfg["n_layer"] * 2 * kv_dim * act + 4 * params
    free = available_memory(s.device)
    need = max(0 if "train" in s.skip else train, 0 if "decode" in s.skip else cache)
    if free is not None and need > free:
        raise ConfigError(f"these sizes cannot fit: a model needs at least {need / GIB:,.1f} GiB (training at "
                          f"--batch_size={s.batch_size} --seq_len={s.seq_len}: {train / GIB:,.1f} GiB; decoding at "
                          f"--decode_batch={s.decode_batch}: {cache / GIB:,.1f} GiB) and {s.device} has "
                          f"{free / GIB:,.1f} GiB available")
    forwards = s.repeats * (3 * (s.steps + s.warmup) + 2 * (s.new_tokens + 1))  # two decode batches, each a prefill
    seconds = len(s.models) * forwards * cfg["n_layer"] * LAYER_FORWARD_FLOOR_S
    if seconds > 86400:
        raise ConfigError(f"these sizes would take at least {seconds / 3600:,.0f} hours (--repeats={s.repeats}, "
                          f"--steps={s.steps}, --new_tokens={s.new_tokens}): lower them")
