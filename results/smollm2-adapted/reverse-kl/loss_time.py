"""The distillation loss alone, forward and backward, on 4 x 256 x 49,152 bf16 logits: reverse 0, 0.5, 1 (median of 10,
two rounds). Run alone, from the repository root:
    PYTHONPATH=. .venv/bin/python results/smollm2-adapted/reverse-kl/loss_time.py"""
import statistics
import time

import torch

from adapt import distillation_loss
torch.set_num_threads(2)
torch.manual_seed(0)
z = (torch.randn(4, 256, 49152) * 3).bfloat16().requires_grad_()
t = (torch.randn(4, 256, 49152) * 3).bfloat16()
y = torch.randint(0, 49152, (4, 256))
for reverse in (0.0, 0.5, 1.0, 0.0, 0.5, 1.0):
    times = []
    for _ in range(10):
        s = time.perf_counter()
        distillation_loss(z, t, y, 1.0, 1.0, data=0.0, reverse=reverse).backward()
        times.append(time.perf_counter() - s)
        z.grad = None
    print(f"reverse {reverse}: {statistics.median(times) * 1e3:.0f} ms (median of 10)")
