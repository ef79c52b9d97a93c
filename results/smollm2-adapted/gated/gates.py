"""The consumers' trained gates out of a gated run's checkpoint (gated_attention.py), and what they came to:
    .venv/bin/python results/smollm2-adapted/gated/gates.py OUT_DIR/ckpt.pt GATES_FILE"""
import os, sys
import torch

ckpt = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
kv_source, scale = ckpt["model_config"]["kv_source"], float(os.environ.get("GATE_SCALE", "10"))
gates = {i: ckpt["model"][f"layers.{i}.attn_gate"].float() for i, j in enumerate(kv_source) if i != j}
torch.save(gates, sys.argv[2])
for i, g in gates.items():  # the gate a head applies: scale x the parameter
    print(f"layer {i} reads {kv_source[i]}: gates " + " ".join(f"{scale * x:+.2f}" for x in g.tolist()))
