"""Run a script (train.py, evaluate.py) with every K/V consumer's attention left out: its block adds only its MLP
(2026-12-06, the AMX Xeon). What the KV-0.73 recipe reaches when the consumers read nothing at all.
    .venv/bin/python results/smollm2-adapted/kv-usage/without_attention.py SCRIPT [its flags...]"""
import os, runpy, sys
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
sys.path.insert(0, ROOT)
import model

block_forward = model.Block.forward


def forward(self, x, handover):
    if self.kv_source != self.layer_idx:  # a consumer: no attention, its MLP only
        return x + self.mlp(self.post_attention_layernorm(x))
    return block_forward(self, x, handover)


model.Block.forward = forward
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
