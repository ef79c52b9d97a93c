"""Run a script (train.py, lora.py, evaluate.py) with every K/V consumer's attention scaled per head by a learned
gate that starts at 0 (2026-12-06, the AMX Xeon). At the start a consumer adds its MLP only, the best untrained
start measured (../kv-usage/); the gates open where what the consumer reads from its source helps.
    GATE_SCALE=10 [GATES=FILE] .venv/bin/python results/smollm2-adapted/gated/gated_attention.py SCRIPT [its flags...]
GATES: a file of gate values (torch.save of {layer: tensor}) put into the model once it is built (evaluate.py);
without it the gates start at 0 and train.py trains them beside the LoRA adapters. The gate a head applies is
GATE_SCALE x its parameter, so that Adam's steps of about the rate open it within the run's 400 steps."""
import os, runpy, sys
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
sys.path.insert(0, ROOT)
import torch
import torch.nn.functional as F
import lora
import model

SCALE = float(os.environ.get("GATE_SCALE", "10"))
LOADED = torch.load(os.environ["GATES"]) if os.environ.get("GATES") else {}
block_init, block_forward, setup_lora = model.Block.__init__, model.Block.forward, lora.setup_lora


def init(self, config, layer_idx):
    block_init(self, config, layer_idx)
    self.attn_gate = torch.nn.Parameter(start_gate(layer_idx, config.n_head))  # every layer: the switch comes later
    # checkpoints without gates (the teacher, a base) load
    self._register_load_state_dict_pre_hook(keep_gate, with_module=True)


def start_gate(layer_idx, n_head):
    return LOADED[layer_idx].float().clone() if layer_idx in LOADED else torch.zeros(n_head)


def keep_gate(module, state_dict, prefix, *args):  # the model is built on the meta device, then given its weights
    if prefix + "attn_gate" not in state_dict:
        state_dict[prefix + "attn_gate"] = start_gate(module.layer_idx, module.attn_gate.numel())


def forward(self, x, hand):
    if self.kv_source == self.layer_idx:
        return block_forward(self, x, hand)
    attn, (B, T, C) = self.self_attn, x.shape
    h = self.input_layernorm(x)
    q = attn.project(h, hand.cos, hand.sin)[0]
    k, v = hand.kv[self.kv_source]
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=hand.mask, is_causal=hand.mask is None, enable_gqa=True)
    y = y * (SCALE * self.attn_gate).to(y.dtype).view(1, -1, 1, 1)
    x = x + attn.o_proj(y.transpose(1, 2).reshape(B, T, C))
    return x + self.mlp(self.post_attention_layernorm(x))


def setup_lora_and_gates(s, explicit, raw_model, *args):
    out = setup_lora(s, explicit, raw_model, *args)
    for block in raw_model.layers:
        block.attn_gate.requires_grad_(True)
    return out


model.Block.__init__, model.Block.forward, lora.setup_lora = init, forward, setup_lora_and_gates
if __name__ == "__main__":  # imported (where_ppl.py), it only patches
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
