"""
ECHO-LLaMA for Hugging Face transformers: a Llama whose layers may reuse an earlier layer's keys and
values (`kv_source`) or attention pattern (`attn_source`). convert_hf.py export copies this file next
to config.json, whose auto_map points here, so that

    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)

loads the model and `generate` runs with transformers' own DynamicCache. Everything is transformers'
Llama except what sharing needs:

- kv_source[i] = j != i (a K/V consumer): layer i has no k_proj/v_proj; it attends with its own queries
  over the keys and values layer j computed in this forward pass (with a cache: all of j's cached ones).
  Its cache entry is a DummyLayer (`kv_sharing_modes`, as transformers' own KV-sharing models do): it is
  never written and never read.
- attn_source[i] = j != i (EchoAtt): layer i has no q_proj/k_proj; it attends with layer j's queries and
  keys over its own values. Its cache entry holds its values and empty (head size 0) keys.

Layers hand these on through a dict the model passes down each forward (`echo_shared`).
"""

import torch
from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (ALL_ATTENTION_FUNCTIONS, LlamaAttention, LlamaDecoderLayer,
                                                      LlamaForCausalLM, LlamaModel, apply_rotary_pos_emb,
                                                      eager_attention_forward)


@strict
class EchoLlamaConfig(LlamaConfig):
    model_type = "echo_llama"
    kv_source: list | None = None    # one entry per layer: whose keys and values it attends over
    attn_source: list | None = None  # one entry per layer: whose queries and keys it attends with

    def __post_init__(self, **kwargs):
        n = self.num_hidden_layers
        self.kv_source = list(range(n)) if self.kv_source is None else [int(j) for j in self.kv_source]
        self.attn_source = list(range(n)) if self.attn_source is None else [int(j) for j in self.attn_source]
        for name, m in (("kv_source", self.kv_source), ("attn_source", self.attn_source)):
            if len(m) != n or any(not 0 <= j <= i or m[j] != j for i, j in enumerate(m)):
                raise ValueError(f"config.json: {name}={m} must give each of the {n} layers itself or an earlier "
                                 "layer that is its own source")
        for i in range(n):
            if self.kv_source[i] != i and self.attn_source[i] != i:
                raise ValueError(f"config.json: layer {i} shares both K/V and its attention pattern")
        super().__post_init__(**kwargs)

    @property
    def kv_sharing_modes(self):
        """None for a layer with a cache of its own, 'reuse' for a K/V consumer (a DummyLayer in the cache)."""
        return [None if j == i else "reuse" for i, j in enumerate(self.kv_source)]


class EchoLlamaAttention(LlamaAttention):
    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.kv_owner, self.qk_source = config.kv_source[layer_idx], config.attn_source[layer_idx]
        if self.kv_owner != layer_idx:
            del self.k_proj, self.v_proj
        if self.qk_source != layer_idx:
            del self.q_proj, self.k_proj

    def _heads(self, proj, x):
        return proj(x).view(*x.shape[:-1], -1, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                echo_shared=None, **kwargs):
        i, shared = self.layer_idx, echo_shared if echo_shared is not None else {}
        cos, sin = position_embeddings
        if self.kv_owner == i:  # compute (and cache) values, and keys unless the pattern is borrowed
            v = self._heads(self.v_proj, hidden_states)
            k = v.new_zeros(*v.shape[:-1], 0)  # an attention sharer caches no keys
            if self.qk_source == i:
                k = self._heads(self.k_proj, hidden_states)
                k = apply_rotary_pos_emb(k, k, cos, sin)[0]
            if cache is not None:
                k, v = cache.update(k, v, i, kwargs=kwargs)
            shared[("kv", i)] = (k, v)
        if self.qk_source == i:
            q = self._heads(self.q_proj, hidden_states)
            q = apply_rotary_pos_emb(q, q, cos, sin)[0]
            k, v = shared[("kv", self.kv_owner)]
            shared[("qk", i)] = (q, k)
        else:
            q, k = shared[("qk", self.qk_source)]
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(self, q, k, v, attention_mask, dropout=0.0 if not self.training else
                                 self.attention_dropout, scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


class EchoLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.self_attn = EchoLlamaAttention(config, layer_idx)


class EchoLlamaModel(LlamaModel):
    config_class = EchoLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self.layers = torch.nn.ModuleList(EchoLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.post_init()

    def forward(self, *args, **kwargs):
        return super().forward(*args, echo_shared={}, **kwargs)  # a fresh hand-over for every forward pass


class EchoLlamaForCausalLM(LlamaForCausalLM):
    config_class = EchoLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = EchoLlamaModel(config)
        self.post_init()
