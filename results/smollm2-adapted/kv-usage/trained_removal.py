"""Does an adapted model use the K/V its consumers read? (2026-12-06, the AMX Xeon.) The adapted model (base + DELTA)
as trained, then with its consumers' attention output left out (every consumer, or PER=1 each alone): what the
shared K/V still bring after the distillation. Against the teacher on held-out text, as evaluate.py.
    [PER=1] .venv/bin/python results/smollm2-adapted/kv-usage/trained_removal.py DELTA SETS TOKENS"""
import os, sys
import torch
from measure import ROOT, held_out_windows, measure_each
from checkpoint import load_model
from delta import load_with_delta
torch.set_num_threads(2)
BASE = ROOT + "/data/smollm2/smollm2-135m-instruct.pt"
delta_path, set_names, n_tokens = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
teacher, _ = load_model(BASE)
student, _ = load_with_delta(BASE, delta_path)
teacher.eval()
student.eval()
windows = held_out_windows(set_names, n_tokens)
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


def remove(drop):
    removed.clear()
    removed.update(drop)


measure_each(student, teacher, windows, runs, remove)
