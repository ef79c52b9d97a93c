"""
Reproduce the ECHO results table and plots (README, "ECHO adaptation: results"):

  1. pretraining from scratch at equal tokens: dense vs upper-half sharing vs cla:2, several seeds;
  2. adapting the pretrained dense model into upper-half sharing: val loss right after conversion,
     then after abrupt, gradual, gradual + freezing and gradual + distillation adaptation at equal
     tokens, with tokens/s against full dense training;
  3. decoding tokens/s and KV cache bytes, adapted vs dense;
plus the K/V similarity heatmap of the dense model.

    python experiments/echo.py                      # the README's numbers (2-core CPU, about 30 minutes)
    python experiments/echo.py --pretrain_iters=200 --seeds=1 --out=/tmp/echo   # a quick look

Every run is a plain `train.py` (or `adapt.py`) command, printed before it starts, so any single
number can be re-run by hand. Results go to OUT/results.md, OUT/results.json and OUT/*.png.
"""

import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checkpoint import load_model  # noqa: E402  (the repository root is on the path only from here)
from configurator import configure, run_script, settings_from  # noqa: E402

# -----------------------------------------------------------------------------
out = "results/echo"         # the table, the JSON and the plots (committed)
runs = "out-echo"            # the runs' checkpoints and logs (not committed)
pretrain_iters = 800         # the dense model's pretraining; adaptation gets adapt_fraction of it
adapt_fraction = 0.1
seeds = "1,2,3"
target = "upper:half"
# the model: a 6-layer character-level Llama, so upper:half has 3 consumers to switch in stages
model = "--n_layer=6 --n_head=4 --n_kv_head=2 --n_embd=128 --intermediate_size=384 --block_size=128 --batch_size=16"
decode_tokens = 100          # after a 16-token prompt: fits the 128-token context
device = "cpu"
# -----------------------------------------------------------------------------
DEFAULTS = settings_from(globals())
settings = dict(DEFAULTS)  # this run's values (main fills them in)


def run(args, out_dir):
    """One train.py run; returns its log records (log.jsonl), re-using a finished run's log."""
    log_path = os.path.join(out_dir, "log.jsonl")
    if os.path.exists(log_path) and any('"kind": "done"' in line for line in open(log_path)):
        print(f"(reusing {out_dir})")
    else:
        if os.path.exists(log_path):
            os.remove(log_path)
        cmd = [sys.executable, "train.py", *settings["model"].split(), f"--out_dir={out_dir}",
               f"--device={settings['device']}", "--compile=False", *args]
        print("$ " + " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in open(log_path)]


def summarize(records):
    start = next(r for r in records if r["kind"] == "start")
    done = next(r for r in records if r["kind"] == "done")
    evals = [r for r in records if r["kind"] == "eval"]
    return {
        "val_loss": done["val_loss"],
        "tokens_per_s": done["tokens_per_s"],
        "curve": [(r["iter"] * start["tokens_per_iter"], r.get("time", 0.0), r["val_loss"]) for r in evals],
    }


def mean_spread(values):
    m = statistics.mean(values)
    return m, (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def pretraining(seeds, iters):
    eval_every = max(iters // 10, 1)
    results = {}
    for seed in seeds:  # seed-major, so slow drift of the machine touches every map alike
        for kv in ("dense", settings["target"], "cla:2"):
            out_dir = os.path.join(settings["runs"], f"pretrain-{kv.replace(':', '')}-s{seed}")
            records = run([f"--kv_source={kv}", f"--seed={seed}", f"--max_iters={iters}",
                           f"--lr_decay_iters={iters}", f"--eval_interval={eval_every}"], out_dir)
            results.setdefault(kv, []).append(summarize(records) | {"seed": seed, "out_dir": out_dir})
    return results


def adaptation(dense_ckpt, iters):
    n_stages = 3  # upper:half of 6 layers: layers 5, 4, 3 switch, one per stage
    stage = max(iters // (n_stages + 1), 1)  # the last quarter trains the finished shared model
    common = [f"--init_from={dense_ckpt}", f"--max_iters={iters}", f"--lr_decay_iters={iters}",
              "--learning_rate=1e-3", "--min_lr=1e-4", "--warmup_iters=10",
              f"--eval_interval={max(iters // 5, 1)}", f"--adapt_target={settings['target']}"]
    gradual = ["--adapt_mode=gradual", "--adapt_order=top-down", f"--adapt_stage_iters={stage}"]
    runs = {
        "dense, trained on (full training)": common[:-1],
        "abrupt": common + ["--adapt_mode=abrupt"],
        "gradual": common + gradual,
        "gradual + freezing (upward)": common + gradual + ["--adapt_train_layers=upward"],
        "gradual + distillation (a=0.5, T=2)": common + gradual + ["--distill_alpha=0.5", "--distill_temperature=2.0"],
    }
    converted = run(common + ["--adapt_mode=abrupt", "--eval_only=True"], os.path.join(settings["runs"], f"adapt{iters}-converted-only"))
    results = {"converted, no training": {"val_loss": next(r for r in converted if r["kind"] == "eval")["val_loss"]}}
    for name, args in runs.items():
        slug = name.split(" (")[0].replace(" + ", "-").replace(", ", "-").replace(" ", "-")
        out_dir = os.path.join(settings["runs"], f"adapt{iters}-{slug}")
        results[name] = summarize(run(args, out_dir)) | {"out_dir": out_dir}
    return results


@torch.no_grad()
def decoding(checkpoints, n_tokens, repeats=5):
    """Greedy decoding tokens/s at batch 1 (prefill of 16 tokens excluded), repeats interleaved."""
    models = {name: load_model(path)[0] for name, path in checkpoints.items()}
    prompt = torch.randint(0, models[next(iter(models))].config.vocab_size, (1, 16))
    times = {name: [] for name in models}
    for rep in range(repeats + 1):
        for name, model in models.items():
            t0 = time.perf_counter()
            model.generate(prompt, 1, temperature=0)
            t1 = time.perf_counter()
            model.generate(prompt, n_tokens + 1, temperature=0)
            t2 = time.perf_counter()
            if rep:  # the first round warms up
                times[name].append(n_tokens / ((t2 - t1) - (t1 - t0)))
    return {name: {"decode_tokens_per_s": statistics.median(times[name]),
                   "decode_tokens_per_s_min": min(times[name]), "decode_tokens_per_s_max": max(times[name]),
                   "kv_cache_bytes": model.new_cache(1, model.config.block_size).nbytes(),
                   "kv_source": list(model.config.kv_source)}
            for name, model in models.items()}


def plot_curves(runs, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in runs:
        tokens, seconds, loss = zip(*curve)
        axes[0].plot([t / 1e6 for t in tokens], loss, label=name)
        axes[1].plot(seconds, loss, label=name)
    axes[0].set_xlabel("training tokens (millions)")
    axes[1].set_xlabel("training wall time (s, evaluations excluded)")
    for ax in axes:
        ax.set_ylabel("val loss")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    settings.update(vars(configure(DEFAULTS, argv, __doc__)[0]))
    out = settings["out"] = os.path.abspath(settings["out"])
    settings["runs"] = os.path.abspath(settings["runs"])
    os.makedirs(out, exist_ok=True)
    t_start = time.time()
    seeds = [int(s) for s in settings["seeds"].split(",")]
    iters = settings["pretrain_iters"]
    adapt_iters = max(int(iters * settings["adapt_fraction"]), 4)

    pre = pretraining(seeds, iters)
    dense_ckpt = os.path.join(pre["dense"][0]["out_dir"], "ckpt.pt")
    subprocess.run([sys.executable, "adapt.py", f"--init_from={dense_ckpt}", "--n_share=3", f"--out={out}"],
                   cwd=ROOT, check=True)
    ada = adaptation(dense_ckpt, adapt_iters)
    adapted_ckpt = os.path.join(ada["gradual + distillation (a=0.5, T=2)"]["out_dir"], "ckpt.pt")
    dec = decoding({"dense": dense_ckpt, "adapted (gradual + distillation)": adapted_ckpt}, settings["decode_tokens"])

    plot_curves([(f"{kv} s{r['seed']}", r["curve"]) for kv, rs in pre.items() for r in rs],
                os.path.join(out, "pretrain_val_loss.png"), f"Pretraining from scratch ({iters} iterations)")
    plot_curves([(name, r["curve"]) for name, r in ada.items() if "curve" in r],
                os.path.join(out, "adapt_val_loss.png"), f"Adapting dense -> {settings['target']} ({adapt_iters} iterations)")

    dense_val = statistics.mean(r["val_loss"] for r in pre["dense"])
    dense_train_tps = ada["dense, trained on (full training)"]["tokens_per_s"]
    lines = [f"Machine: {os.cpu_count()}-core CPU, torch {torch.__version__}; `python experiments/echo.py {' '.join(argv)}` "
             f"took {(time.time() - t_start) / 60:.0f} min (runs already finished in {settings['runs']} are reused).", "",
             f"1. Pretraining from scratch, {iters} iterations, seeds {settings['seeds']}:", "",
             "| kv_source | val loss (mean ± half-range) | vs dense | train tokens/s (mean) |", "|---|---|---|---|"]
    for kv, rs in pre.items():
        m, s = mean_spread([r["val_loss"] for r in rs])
        tps = statistics.mean(r["tokens_per_s"] for r in rs)
        lines.append(f"| {kv} | {m:.4f} ± {s:.4f} | {100 * (m / dense_val - 1):+.2f}% | {tps:,.0f} |")
    # the pretrained dense model's val loss on the adaptation runs' own validation batches (iteration 0)
    base = ada["dense, trained on (full training)"]["curve"][0][2]
    lines += ["", f"2. Adapting the dense model (seed {seeds[0]}, val loss {base:.4f} on these runs' validation batches) into "
              f"{settings['target']} with {adapt_iters} iterations ({100 * settings['adapt_fraction']:.0f}% of its pretraining tokens):", "",
              "| run | val loss | vs pretrained dense | train tokens/s | vs dense full training |", "|---|---|---|---|---|"]
    for name, r in ada.items():
        tps = r.get("tokens_per_s")
        lines.append(f"| {name} | {r['val_loss']:.4f} | {100 * (r['val_loss'] / base - 1):+.2f}% | "
                     + (f"{tps:,.0f} | {tps / dense_train_tps:.2f}x |" if tps else "- | - |"))
    lines += ["", f"3. Greedy decoding at batch 1, {settings['decode_tokens']} tokens after a 16-token prompt (median of 5):", "",
              "| model | decode tokens/s (min-max) | KV cache bytes at block_size |", "|---|---|---|"]
    for name, r in dec.items():
        lines.append(f"| {name} | {r['decode_tokens_per_s']:,.0f} ({r['decode_tokens_per_s_min']:,.0f}-"
                     f"{r['decode_tokens_per_s_max']:,.0f}) | {r['kv_cache_bytes']:,} |")
    text = "\n".join(lines) + "\n"
    open(os.path.join(out, "results.md"), "w").write(text)
    json.dump({"pretraining": pre, "adaptation": ada, "decoding": dec, "settings": settings},
              open(os.path.join(out, "results.json"), "w"), indent=1)
    print(text)


if __name__ == "__main__":
    sys.exit(run_script(main))
