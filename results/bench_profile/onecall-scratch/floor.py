"""The serial part of a decode step: a SmolLM2-shaped step (30 layers) with tiny weights (n_embd 192, 3 heads, 1 K/V
head, MLP 256, vocabulary 512, int4), in one call against op by op (the compiled graph), best of 5 x 2,000 calls.
    .venv/bin/python results/bench_profile/onecall-scratch/floor.py 1   # threads"""
import os, sys, time, torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import model as M, speed  # noqa: E402
from quantize import QUANTIZERS  # noqa: E402
threads = int(sys.argv[1]); torch.set_num_threads(threads)
torch.manual_seed(0)
m = M.Llama(M.LlamaConfig(n_layer=30, n_head=3, n_kv_head=1, n_embd=192, intermediate_size=256, vocab_size=512,
                          block_size=256)).eval().to(torch.bfloat16)
m = speed.pack_weights(speed.block_weights(speed.fuse_projections(speed.use_decode_paths(QUANTIZERS["int4"](m)))))
step = speed.compile_decode_step(m)
assert type(step) is speed.LayersInOneCall
cache, tok, pos = m.new_cache(1, 128), torch.tensor([[42]]), torch.tensor([64])
with torch.no_grad():
    m.prefill(torch.randint(0, 500, (1, 64)), cache)
    def best(f, n=2000):
        times = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                f()
            times.append((time.perf_counter() - t) / n * 1e6)
        return min(times)
    one = best(lambda: step(tok, pos, cache))
    step.other(tok, pos, cache)  # compiles the graph
    print(f"{threads} thread(s): one call {one:.0f} us a token; op by op {best(lambda: step.other(tok, pos, cache)):.0f} us")
