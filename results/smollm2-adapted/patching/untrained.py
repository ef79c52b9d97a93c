"""Each switch of a map alone, untrained (abrupt: the base's weights, the consumer reading its source's K/V), against
the teacher on held-out text (2026-12-06, the AMX Xeon): what each switch costs before any training.
    [ONLY=7,26] .venv/bin/python results/smollm2-adapted/patching/untrained.py MAP [SETS=selfgen] [TOKENS=8192]
SETS: comma-separated, as evaluate.py's --sets; ONLY: just these consumers' switches; WHOLE=1: the map itself (every
switch at once) instead."""
import json, os, sys, time
import torch
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
sys.path.insert(0, ROOT)
from checkpoint import build_on_meta, load_model, model_weights
from delta import on_maps
from dataset import load_meta, open_tokens
from evaluate import resolve_set
from fidelity import compare_on_windows, fixed_windows
from model import LlamaConfig
torch.set_num_threads(2)
BASE = ROOT + "/data/smollm2/smollm2-135m-instruct.pt"
kv_map = [int(x) for x in sys.argv[1].split(",")]
set_names = (sys.argv[2] if len(sys.argv) > 2 else "selfgen").split(",")
only = [int(x) for x in os.environ["ONLY"].split(",")] if os.environ.get("ONLY") else None
n_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 8192
teacher, ckpt = load_model(BASE)
windows = {}
for name in set_names:
    d, f = resolve_set(name)
    windows[name] = fixed_windows(open_tokens(d, f.removesuffix(".bin"), load_meta(d)), n_tokens, 512)
amp = lambda: torch.autocast("cpu", torch.bfloat16)
out = {}
maps = {f"{i}<-{j}": [j if k == i else k for k in range(len(kv_map))] for i, j in enumerate(kv_map)
        if i != j and (not only or i in only)}
if os.environ.get("WHOLE"):
    maps = {"whole map": kv_map}
for label, one in maps.items():
    config = LlamaConfig(**{**ckpt["model_config"], "kv_source": one})
    student = build_on_meta(config, on_maps(model_weights(ckpt), config.kv_source, config.attn_source)).eval()
    for name, w in windows.items():
        t0 = time.time()
        r = compare_on_windows(student, teacher, w, 1, amp)
        out[f"{label} {name}"] = {k: r[k] for k in ("kl", "ppl_ratio", "agreement", "tokens")}
        print(f"{label}, {name}: KL {r['kl']:.4f}  ppl ratio {r['ppl_ratio']:.4f}  top-1 "
              f"{r['agreement']:.4f}  ({time.time() - t0:.0f} s)", flush=True)
print(json.dumps(out))
