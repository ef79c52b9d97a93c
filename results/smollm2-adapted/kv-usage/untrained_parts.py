"""Which part of a shared K/V costs what, untrained (2026-12-06, the AMX Xeon). The dense teacher with each
consumer of MAP taking from its source layer: its keys and values (the switch, as model.py does it), only its
values (the consumer's own keys), only its keys (the consumer's own values), or no attention at all (the block's
attention output left out: what a consumer gives when what it reads is worth nothing). Against the teacher on
held-out text, as evaluate.py (bf16 autocast, windows of 512).
    [PER=1] [WHAT=kv,v,k,none] .venv/bin/python results/smollm2-adapted/kv-usage/untrained_parts.py MAP SETS TOKENS
PER=1: each consumer's switch alone instead of the whole map."""
import copy, os, sys
import torch
from measure import ROOT, held_out_windows, measure_each
from checkpoint import load_model
torch.set_num_threads(2)
BASE = ROOT + "/data/smollm2/smollm2-135m-instruct.pt"
kv_map = [int(x) for x in sys.argv[1].split(",")]
set_names, n_tokens = sys.argv[2].split(","), int(sys.argv[3])
teacher, _ = load_model(BASE)
teacher.eval()
student = copy.deepcopy(teacher)  # dense: every layer still has k_proj and v_proj, so all four variants can run
windows = held_out_windows(set_names, n_tokens)
taking = {}  # consumer layer -> (source layer, "kv" | "k" | "v" | "none")


def block_forward(block, x, hand):
    """model.Block.forward for a dense model, with the consumer's K and/or V replaced by its source's."""
    i, attn = block.layer_idx, block.self_attn
    h = block.input_layernorm(x)
    q, k, v = attn.project(h, hand.cos, hand.sin)
    hand.kv[i] = (k, v)  # every layer's own, so a source's are there when a consumer above asks
    source, what = taking.get(i, (i, "own"))
    if what != "none":
        k = hand.kv[source][0] if what in ("kv", "k") else k
        v = hand.kv[source][1] if what in ("kv", "v") else v
        x = x + attn(h, k, v, hand.cos, hand.sin, hand.mask, q=q)
    return x + block.mlp(block.post_attention_layernorm(x))


for b in student.layers:
    b.forward = lambda x, hand, b=b: block_forward(b, x, hand)
consumers = [(i, j) for i, j in enumerate(kv_map) if i != j]
runs = []
for what in os.environ.get("WHAT", "kv,v,k,none").split(","):
    if os.environ.get("PER") == "1":
        runs += [(f"{i}<-{j} {what}", {i: (j, what)}) for i, j in consumers]
    else:
        runs.append((f"whole map {what}", {i: (j, what) for i, j in consumers}))


def take_from_sources(take):
    taking.clear()
    taking.update(take)


measure_each(student, teacher, windows, runs, take_from_sources)
