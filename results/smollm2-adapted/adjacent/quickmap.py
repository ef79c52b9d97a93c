"""Untrained figures of K/V maps (comma-separated kv_source lists) against the teacher, 8,192 held-out generated tokens.
    .venv/bin/python results/smollm2-adapted/adjacent/quickmap.py 0,1,2,2,4,4,6,6,8,9,9,11,11,13,14,15,16,16,18,19,20,21,22,23,24,25,25,27,27,29"""
import os, sys, torch
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
sys.path.insert(0, ROOT)
from checkpoint import load_model
from adapt import convert_model
from fidelity import fixed_windows, compare_on_windows
from dataset import load_meta, open_tokens
torch.set_num_threads(2)
teacher = load_model(ROOT + "/data/smollm2/smollm2-135m-instruct.pt")[0]
meta = load_meta(ROOT + "/data/smollm2_selfgen")
heldout = fixed_windows(open_tokens(ROOT + "/data/smollm2_selfgen", "val", meta), 8192, 512)
for spec in sys.argv[1:]:
    kv = [int(x) for x in spec.split(",")]
    r = compare_on_windows(convert_model(teacher, kv_source=kv).eval(), teacher, heldout, 1)
    print(f"{spec}: ppl ratio {r['ppl_ratio']:.4f}  KL {r['kl']:.4f}  top-1 {r['agreement']:.4f}", flush=True)
