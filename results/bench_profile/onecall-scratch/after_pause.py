"""Decode steps after a pause (int4, random SmolLM2-shaped weights, bench.py's Decoder, one call; --op_by_op: the
compiled graph): each line the first 16 steps' ms, at positions 64-79, after what it names.
    .venv/bin/python results/bench_profile/onecall-scratch/after_pause.py 2 [--op_by_op]   # threads"""
import os, sys, time, torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import model as M, benchmarking as B  # noqa: E402
from quantize import QUANTIZERS  # noqa: E402
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
m = M.Llama(M.LlamaConfig(n_layer=30, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536, vocab_size=49152,
                          block_size=256, rope_theta=1e5, tie_embeddings=True)).eval().to(torch.bfloat16)
prompt = torch.randint(0, 49152, (1, 64))
d = B.Decoder(QUANTIZERS["int4"](m), prompt, 32, True)
if "--op_by_op" in sys.argv:
    d.step = d.step.other
d.timed(), d.timed()
big = torch.ones(64 << 20)  # 256 MB
def steps(n=16):
    times, tok = [], torch.tensor([[5]])
    for pos in d.positions[:n]:
        t = time.perf_counter()
        tok = B.greedy(d.step(tok, pos, d.cache))
        times.append((time.perf_counter() - t) * 1e3)
    return " ".join(f"{x:.1f}" for x in times)
with torch.no_grad():
    for what, pause in [("steady", lambda: None), ("a 64-token prefill", d.prefill), ("a 50 ms sleep", lambda: time.sleep(0.05)),
                        ("a sum over 256 MB", big.sum), ("steady", lambda: None), ("a 64-token prefill", d.prefill)]:
        steps()
        pause()
        print(f"after {what:20s}", steps())
