"""Steady steps: 32 steps at positions 64-95 (bench.py's), looped 15 times after warm-up; best and median ms a token
(int4, one call, 2 threads unless given; `real`: SmolLM2's imported weights, else random ones of its shape).
    .venv/bin/python results/bench_profile/onecall-scratch/steady.py 2 real"""
import os, sys, time, torch
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
sys.path.insert(0, ROOT)
import model as M, speed, checkpoint  # noqa: E402
from quantize import QUANTIZERS  # noqa: E402
torch.set_num_threads(int(sys.argv[1]))
if sys.argv[2] == "real":
    m = checkpoint.load_model(os.path.join(ROOT, "data/smollm2/smollm2-135m-instruct.pt"))[0]
else:
    torch.manual_seed(0)
    m = M.Llama(M.LlamaConfig(n_layer=30, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536, vocab_size=49152,
                              block_size=256, rope_theta=1e5, tie_embeddings=True))
m = QUANTIZERS["int4"](m.eval().to(torch.bfloat16))
m = speed.pack_weights(speed.block_weights(speed.fuse_projections(speed.use_decode_paths(m))))
step, cache, tok = speed.compile_decode_step(m), m.new_cache(1, 96), torch.tensor([[42]])
with torch.no_grad():
    m.prefill(torch.randint(0, 1000, (1, 64)), cache)
    positions, times = [torch.tensor([p]) for p in range(64, 96)], []
    for _ in range(15):
        t = time.perf_counter()
        for p in positions:
            step(tok, p, cache)
        times.append((time.perf_counter() - t) / len(positions) * 1e3)
    times.sort()
    print(f"{sys.argv[2]} weights, {sys.argv[1]} thread(s): best {times[0]:.3f} ms a token, median {times[7]:.3f}")
