"""Where a one-call int4 step's time goes, by phase and thread: run in a clone of this repository with op_phases.diff
applied to speed_kernels.cpp (TSC cycle counters around each product, attention, the head and the op; they print every
2,000 calls). Real SmolLM2 weights, int4 (int8 head), steps at positions 64-95 looped, 2 threads:
    git clone . /tmp/phases && cd /tmp/phases && git apply results/bench_profile/onecall-scratch/op_phases.diff
    OMP_NUM_THREADS=2 /path/to/main/.venv/bin/python results/bench_profile/onecall-scratch/op_phases.py 2 int4 130 /path/to/main/data/smollm2/smollm2-135m-instruct.pt"""
import os, sys, time, torch
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
sys.path.insert(0, ROOT)
import speed, checkpoint  # noqa: E402
from quantize import QUANTIZERS  # noqa: E402
torch.set_num_threads(int(sys.argv[1]))
kind, rounds = sys.argv[2], int(sys.argv[3])
m = checkpoint.load_model(sys.argv[4])[0].eval().to(torch.bfloat16)
if kind != "bf16":
    m = QUANTIZERS[kind](m)
m = speed.pack_weights(speed.block_weights(speed.fuse_projections(speed.use_decode_paths(m))))
step, cache, tok = speed.compile_decode_step(m), m.new_cache(1, 96), torch.tensor([[42]])
assert type(step) is speed.LayersInOneCall
with torch.no_grad():
    m.prefill(torch.randint(0, 1000, (1, 64)), cache)
    positions, times = [torch.tensor([p]) for p in range(64, 96)], []
    for _ in range(rounds):
        t = time.perf_counter()
        for p in positions:
            step(tok, p, cache)
        times.append((time.perf_counter() - t) / len(positions) * 1e3)
    s = sorted(times)
    print(f"{kind} {sys.argv[1]} thread(s): best {s[0]:.3f} ms a token, median {s[len(s) // 2]:.3f}")
