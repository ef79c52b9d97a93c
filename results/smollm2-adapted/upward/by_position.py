"""Diagnostic (2026-12-06, the AMX Xeon): KL(teacher || base + delta) by position within evaluate.py's 512-token
windows (bf16 autocast, as evaluate.py). The distillation trains on 256-token windows; do positions 256-511, which
it never saw, cost more?
    .venv/bin/python results/smollm2-adapted/upward/by_position.py DELTA [SET=selfgen|plays] [TOKENS=8192]"""
import os, sys, time, torch
import torch.nn.functional as F
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."); sys.path.insert(0, ROOT)
from checkpoint import load_model
from delta import load_with_delta
from fidelity import fixed_windows
from dataset import load_meta, open_tokens
torch.set_num_threads(2)
BASE = ROOT + "/data/smollm2/smollm2-135m-instruct.pt"
delta = sys.argv[1]
set_name = sys.argv[2] if len(sys.argv) > 2 else "selfgen"
n_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 8192
sets = {"selfgen": (ROOT + "/data/smollm2_selfgen", "val"), "plays": (ROOT + "/data/shakespeare_smollm2", "val")}
teacher, _ = load_model(BASE); student, _ = load_with_delta(BASE, delta)
teacher.eval(); student.eval()
d, split = sets[set_name]
W = torch.from_numpy(fixed_windows(open_tokens(d, split, load_meta(d)), n_tokens, 512))
kl = torch.zeros(512); t0 = time.time()
with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
    for w in W:
        x = w[None, :-1]
        ls = F.log_softmax(student(x)[0][0].float(), -1); lt = F.log_softmax(teacher(x)[0][0].float(), -1)
        kl += (lt.exp() * (lt - ls)).sum(-1)
kl /= len(W)
for a in range(0, 512, 64):
    print(f"positions {a:3d}-{a+63:3d}: KL {kl[a:a+64].mean():.4f}")
print(f"0-255 {kl[:256].mean():.4f}  256-511 {kl[256:].mean():.4f}  all {kl.mean():.4f}  ({len(W)} windows, {time.time()-t0:.0f} s)")
