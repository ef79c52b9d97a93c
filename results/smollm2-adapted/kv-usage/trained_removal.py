"""Does an adapted model use the K/V its consumers read? (2026-12-06, the AMX Xeon.) The adapted model (base + DELTA)
as trained, then with its consumers' attention output left out (every consumer, or PER=1 each alone): what the
shared K/V still bring after the distillation. Against the teacher on held-out text, as evaluate.py.
    [PER=1] .venv/bin/python results/smollm2-adapted/kv-usage/trained_removal.py DELTA SETS TOKENS"""
import json, os, sys, time
import torch
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
sys.path.insert(0, ROOT)
from checkpoint import load_model
from delta import load_with_delta
from dataset import load_meta, open_tokens
from evaluate import resolve_set
from fidelity import compare_on_windows, fixed_windows
torch.set_num_threads(2)
BASE = ROOT + "/data/smollm2/smollm2-135m-instruct.pt"
delta_path, set_names, n_tokens = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
teacher, _ = load_model(BASE)
student, _ = load_with_delta(BASE, delta_path)
teacher.eval()
student.eval()
windows = {}
for name in set_names:
    d, f = resolve_set(name)
    windows[name] = fixed_windows(open_tokens(d, f.removesuffix(".bin"), load_meta(d)), n_tokens, 512)
amp = lambda: torch.autocast("cpu", torch.bfloat16)
consumers = [i for i, j in enumerate(student.config.kv_source) if i != j]
removed = set()


def without_attention(block):
    """Block.forward, or for a removed consumer the block without its attention (a consumer hands nothing on)."""
    trained_forward = block.forward
    return lambda x, hand: (x + block.mlp(block.post_attention_layernorm(x)) if block.layer_idx in removed
                            else trained_forward(x, hand))


for b in student.layers:
    b.forward = without_attention(b)
runs = [("as trained", set())]
runs += [(f"{i} removed", {i}) for i in consumers] if os.environ.get("PER") == "1" else \
    [("every consumer's attention removed", set(consumers))]
out = {}
for label, drop in runs:
    removed.clear()
    removed.update(drop)
    for name, w in windows.items():
        t0 = time.time()
        r = compare_on_windows(student, teacher, w, 1, amp)
        out[f"{label} {name}"] = {k: r[k] for k in ("kl", "ppl_ratio", "agreement", "tokens")}
        print(f"{label}, {name}: KL {r['kl']:.4f}  ppl ratio {r['ppl_ratio']:.4f}  top-1 {r['agreement']:.4f}  "
              f"({time.time() - t0:.0f} s)", flush=True)
print(json.dumps(out))
