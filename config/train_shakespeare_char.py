# The default run (`.venv/bin/python train.py` with no arguments uses exactly these values): a small
# character-level Llama whose upper half of layers reuses the K/V of the last lower layer
# (kv_source 'upper:half' = [0, 1, 1, 1]). Trains on a CPU in minutes; the dataset is prepared
# offline on first use. Compare with config/train_shakespeare_char_dense.py.
out_dir = "out-shakespeare-char"
dataset = "shakespeare_char"
eval_interval = 100
log_interval = 10
eval_iters = 20

batch_size = 16
block_size = 128
gradient_accumulation_steps = 1

n_layer = 4
n_head = 4
n_kv_head = 2
n_embd = 128
intermediate_size = 384
kv_source = "upper:half"

learning_rate = 2e-3
max_iters = 300
min_lr = 2e-4
warmup_iters = 30
beta2 = 0.99
