"""Write a randomly initialised Hugging Face Llama directory of any size, shard by shard, without
transformers and without holding the model in memory: the input for measuring convert_hf.py's peak
memory on a model of a realistic size. (Not a test; pytest does not collect it.)

    python tests/make_random_hf_llama.py /tmp/tinyllama_shape --shape=tinyllama --dtype=bfloat16
"""

import argparse
import json
import os
import sys

import torch

SHAPES = {  # HF config fields
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--shape", default="tinyllama", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--shard_mb", type=int, default=1000)
    args = p.parse_args(argv)
    from safetensors.torch import save_file
    cfg = dict(SHAPES[args.shape], model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
               rms_norm_eps=1e-5, tie_word_embeddings=False, dtype=args.dtype,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    dtype = getattr(torch, args.dtype)
    d, hd = cfg["hidden_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    shapes = [("model.embed_tokens.weight", (cfg["vocab_size"], d))]
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        shapes += [(pre + "input_layernorm.weight", (d,)), (pre + "post_attention_layernorm.weight", (d,)),
                   (pre + "self_attn.q_proj.weight", (d, d)),
                   (pre + "self_attn.k_proj.weight", (cfg["num_key_value_heads"] * hd, d)),
                   (pre + "self_attn.v_proj.weight", (cfg["num_key_value_heads"] * hd, d)),
                   (pre + "self_attn.o_proj.weight", (d, d)),
                   (pre + "mlp.gate_proj.weight", (cfg["intermediate_size"], d)),
                   (pre + "mlp.up_proj.weight", (cfg["intermediate_size"], d)),
                   (pre + "mlp.down_proj.weight", (d, cfg["intermediate_size"]))]
    shapes += [("model.norm.weight", (d,)), ("lm_head.weight", (cfg["vocab_size"], d))]
    os.makedirs(args.out_dir, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    shards, current, size, weight_map = [], {}, 0, {}

    def flush():
        nonlocal current, size
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(current, os.path.join(args.out_dir, name), metadata={"format": "pt"})
        shards.append(name)
        weight_map.update({k: name for k in current})
        current, size = {}, 0

    for name, shape in shapes:
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
        current[name] = t.to(dtype)
        size += current[name].numel() * current[name].element_size()
        if size >= args.shard_mb * 2**20:
            flush()
    if current:
        flush()
    total = sum(os.path.getsize(os.path.join(args.out_dir, s)) for s in shards)
    with open(os.path.join(args.out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(args.out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    print(f"wrote {args.out_dir}: {len(shards)} shards, {total / 2**30:.2f} GiB")


if __name__ == "__main__":
    sys.exit(main())
