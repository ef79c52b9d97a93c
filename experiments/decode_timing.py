"""
Greedy batch-1 decode tokens/s of several models, measured the way both experiment scripts report it:
a generate of 1 new token (prefill + first token) and one of n_tokens + 1 timed back to back, their
difference being n_tokens decode steps; rounds interleaved across the models, the first one a warm-up.
(bench.py times its own prefill and decode-step loop, with the machine's limits beside it.)
"""

import time

import torch

from speed import use_decode_paths


@torch.no_grad()
def decode_rates(models: dict, prompt, n_tokens, rounds, steps=None):
    """{name: [tokens/s of each timed round]}; steps: {name: a decode step to use, e.g. compiled}."""
    for model in models.values():  # the CPU batch-1 paths sample.py and bench.py decode with
        use_decode_paths(model)
    rates = {name: [] for name in models}
    for r in range(rounds + 1):
        for name, model in models.items():
            step = (steps or {}).get(name)
            if not r and step is not None:
                print(f"  decode {name}: compiling its step (torch.compile; minutes for a big model) ...", flush=True)
            t0 = time.perf_counter()
            model.generate(prompt, 1, temperature=0, decode_step=step)
            t1 = time.perf_counter()
            model.generate(prompt, n_tokens + 1, temperature=0, decode_step=step)
            if r:  # the first round warms up
                rates[name].append(n_tokens / ((time.perf_counter() - t1) - (t1 - t0)))
            print(f"  decode {name}: " + (f"round {r}/{rounds}, {rates[name][-1]:.1f} tokens/s" if r else
                                          f"warm-up {time.perf_counter() - t0:.1f} s"), flush=True)
    return rates
