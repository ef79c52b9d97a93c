"""What untrained_parts.py and trained_removal.py share: the held-out windows, and one pass of a student against the
teacher for each setting of a run list (as evaluate.py: bf16 autocast, windows of 512, one at a time)."""
import json, os, sys, time
import torch
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
sys.path.insert(0, ROOT)
from dataset import load_meta, open_tokens
from evaluate import resolve_set
from fidelity import compare_on_windows, fixed_windows


def held_out_windows(set_names, n_tokens) -> dict:
    windows = {}
    for name in set_names:
        d, f = resolve_set(name)
        windows[name] = fixed_windows(open_tokens(d, f.removesuffix(".bin"), load_meta(d)), n_tokens, 512)
    return windows


def measure_each(student, teacher, windows, runs, apply):
    """For each (label, setting) of runs: apply(setting) to the student, then its KL, perplexity ratio and top-1
    agreement on every set, printed as they come and then as one JSON line."""
    out = {}
    for label, setting in runs:
        apply(setting)
        for name, w in windows.items():
            t0 = time.time()
            r = compare_on_windows(student, teacher, w, 1, lambda: torch.autocast("cpu", torch.bfloat16))
            out[f"{label} {name}"] = {k: r[k] for k in ("kl", "ppl_ratio", "agreement", "tokens")}
            print(f"{label}, {name}: KL {r['kl']:.4f}  ppl ratio {r['ppl_ratio']:.4f}  top-1 {r['agreement']:.4f}  "
                  f"({time.time() - t0:.0f} s)", flush=True)
    print(json.dumps(out))
