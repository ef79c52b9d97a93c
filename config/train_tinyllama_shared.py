# A TinyLlama-1.1B-shaped Llama with KV sharing, for GPUs: 22 layers, d=2048, 32 query heads,
# 4 K/V heads, FFN 5632, vocabulary 32000, context 2048. 'upper:half' makes the top 11 layers reuse
# the K/V of layer 10 (12 owners instead of 22: the KV cache shrinks to 12/22).
#
# TinyLlama's own vocabulary is the Llama tokenizer's 32000; the datasets here are GPT-2 BPE (50257),
# so from scratch the vocabulary is the dataset's (vocab_size = 0). To continue a converted TinyLlama
# instead, pass init_from=<file from convert_hf.py> with data tokenized by its tokenizer.
#   .venv/bin/python data/tinystories/prepare.py
#   .venv/bin/torchrun --standalone --nproc_per_node=8 train.py config/train_tinyllama_shared.py
out_dir = "out-tinyllama-shared"
dataset = "tinystories"
eval_interval = 500
log_interval = 10
eval_iters = 50

# 8 sequences x 2048 tokens x 64 micro-steps = 1 M tokens per optimizer step (over all ranks)
batch_size = 8
block_size = 2048
gradient_accumulation_steps = 64

n_layer = 22
n_head = 32
n_kv_head = 4
n_embd = 2048
intermediate_size = 5632
vocab_size = 0  # the dataset's: 50257 for tinystories
rope_theta = 10000.0
kv_source = "upper:half"

learning_rate = 4e-4
max_iters = 20000
min_lr = 4e-5
warmup_iters = 2000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

dtype = "auto"      # bf16 autocast on GPUs that have it
compile = True
