"""
QDyLoRA on SmolLM2-135M-Instruct: one dynamic-rank LoRA run over a 4-bit NF4 base against fixed-rank runs,
a full fine-tune, and the NF4 base alone against the float base (issue 22).

    .venv/bin/python data/smollm2/prepare.py && .venv/bin/python data/shakespeare_smollm2/prepare.py
    OMP_NUM_THREADS=1 .venv/bin/python experiments/qdylora.py                  # -> results/qdylora/
    .venv/bin/python experiments/qdylora.py --quick=True --out=/tmp/q --runs=/tmp/q-runs  # tiny budgets

1. the base alone: val loss (and perplexity) of the float base and of its NF4 form, no training;
2. every training run is a train.py command (printed) on the same tokens (same seed, iterations, batch):
   QDyLoRA R=lora_rank (dynamic, nested rule), fixed-rank LoRA at each of fixed_ranks (same NF4 base), and
   a full fine-tune (float weights, every parameter);
3. each run's final checkpoint evaluated here on the same val batches: the dynamic run at every rank of
   eval_ranks, the others at their own rank.
Per run: val loss, trainable parameters, AdamW state bytes, base-weight bytes (the layers' linears as
stored, and the whole model), peak RSS of its process, tokens/s and wall time (both depend on what else
the machine runs). Results: OUT/results.json, OUT/results.md.
"""

import json
import math
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import lora  # noqa: E402
from checkpoint import load_checkpoint, load_model  # noqa: E402
from configurator import configure, run_script, settings_from  # noqa: E402
from dataset import BatchSampler, ensure_dataset, load_meta, open_tokens  # noqa: E402
from monitor import read_log  # noqa: E402

# -----------------------------------------------------------------------------
out = "results/qdylora"      # results.json, results.md
runs = "out-qdylora"         # the training runs
model = "data/smollm2/smollm2-135m-instruct.pt"
dataset = "shakespeare_smollm2"
targets = "q,k,v,o,gate,up,down"  # QLoRA's: every linear of the layers
lora_rank = 64               # R of the dynamic run
fixed_ranks = "4,16,64"      # one fixed-rank run each
eval_ranks = "1,2,4,8,16,32,64"  # the dynamic run's rank curve
lora_alpha = 16.0
iters = 20                   # optimizer steps per run: the token budget (iters x batch_size x block_size)
batch_size = 1
block_size = 128
eval_batches = 4             # val batches every model is evaluated on
dtype = "float32"            # training autocast; bfloat16 is ~12x slower than float32 on this CPU (see docs)
lora_lr = 1e-3
full_lr = 1e-4               # full fine-tuning takes a smaller step than adapters (as QLoRA's and peft's recipes)
quick = False                # tiny budgets, for the test
seed = 1337
# -----------------------------------------------------------------------------
DEFAULTS = settings_from(globals())


def progress(text, t0=[time.time()]):
    print(f"[{(time.time() - t0[0]) / 60:5.1f} min] {text}", flush=True)


def val_batches(s):
    data_dir = ensure_dataset(s.dataset, True, True, lambda: None)
    sampler = BatchSampler(open_tokens(data_dir, "val", load_meta(data_dir)), s.block_size, s.batch_size, s.seed, "cpu")
    return [sampler.get("eval_val", 0, k) for k in range(s.eval_batches)]


@torch.no_grad()
def evaluate(model, batches, dtype):
    """Mean cross-entropy over the same batches, under the runs' autocast."""
    model.eval()
    with torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bfloat16"):
        return sum(model(X, Y)[1].item() for X, Y in batches) / len(batches)


def model_bytes(model) -> dict:
    """The layers' linears as stored (lora.lora_sizes) and the whole model's parameters and buffers
    (embedding, norms, adapters, packed base), against the same model's weights in bf16."""
    sizes = lora.lora_sizes(model)
    whole = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
                if t is not getattr(model, "rope_cos", None) and t is not getattr(model, "rope_sin", None))
    return {"base_linear_bytes": sizes["base_linear_bytes"], "model_bytes": whole}


def base_table(s, batches):
    """The float base and its NF4 form, before any training."""
    rows = {}
    for kind in ("none", "nf4"):
        base, _ = load_model(s.model, block_size=s.block_size)
        lora.quantize_base(base, kind)
        rows["float base" if kind == "none" else "NF4 base"] = {"val_loss": evaluate(base, batches, s.dtype),
                                                               **model_bytes(base)}
        progress(f"base {kind}: val loss {rows['float base' if kind == 'none' else 'NF4 base']['val_loss']:.4f}")
    return rows


def train_run(name, args, s):
    """One train.py run into runs/<name>: (out_dir, wall seconds, peak RSS bytes of its process)."""
    out_dir = os.path.join(s.runs, name)
    lr = s.full_lr if name == "full" else s.lora_lr
    cmd = [sys.executable, "train.py", f"--init_from={s.model}", f"--dataset={s.dataset}", f"--out_dir={out_dir}",
           f"--max_iters={s.iters}", f"--lr_decay_iters={s.iters}", f"--eval_interval={s.iters}", "--eval_iters=1",
           f"--batch_size={s.batch_size}", f"--block_size={s.block_size}", f"--dtype={s.dtype}",
           f"--learning_rate={lr}", f"--min_lr={lr / 10}", f"--warmup_iters={max(1, s.iters // 10)}",
           f"--log_interval={max(1, s.iters // 4)}", "--compile=False", "--weight_decay=0.0", f"--seed={s.seed}",
           "--overwrite=True", "--kv_source=dense", *args]
    progress(f"run {name}: {' '.join(cmd[1:])}")
    t0 = time.time()
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "stdout.txt"), "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (ru_maxrss: KiB on Linux)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"run {name} failed:\n{open(os.path.join(out_dir, 'stdout.txt')).read()[-3000:]}")
    return out_dir, time.time() - t0, usage.ru_maxrss * 1024


def done_record(out_dir):
    return [r for r in read_log(os.path.join(out_dir, "log.jsonl")) if r.get("kind") == "done"][-1]


def run_row(name, out_dir, wall, rss, s, batches):
    ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    model = lora.model_from_lora_checkpoint(ckpt) if "lora" in ckpt else load_model(out_dir)[0]
    if "lora" not in ckpt:
        model.requires_grad_(True)
    sizes = lora.lora_sizes(model)
    row = {"trainable_params": sizes["trainable_params"], "optimizer_state_bytes": sizes["optimizer_state_bytes"],
           **model_bytes(model), "peak_rss_bytes": rss, "tokens_per_s": done_record(out_dir)["tokens_per_s"],
           "wall_s": wall}
    if "lora" in ckpt and ckpt["lora"]["settings"]["dynamic"]:
        row["val_loss_at_rank"] = {}
        for r in lora.parse_ranks(s.eval_ranks):
            lora.set_rank(model, r)
            row["val_loss_at_rank"][r] = evaluate(model, batches, s.dtype)
            progress(f"{name} at rank {r}: val loss {row['val_loss_at_rank'][r]:.4f}")
        lora.set_rank(model, ckpt["lora"]["settings"]["rank"])
    row["val_loss"] = evaluate(model, batches, s.dtype)
    progress(f"{name}: val loss {row['val_loss']:.4f}, {row['trainable_params']:,} trainable")
    return row


def goals(results, s):
    """The issue's goals against what was measured."""
    base, rows = results["base"], results["runs"]
    dyn = rows["dynamic"]["val_loss_at_rank"]
    out = []
    for r in lora.parse_ranks(s.fixed_ranks):
        fixed = rows[f"fixed r={r}"]["val_loss"]
        if r in dyn:
            gap = (dyn[r] - fixed) / fixed
            out.append((f"dynamic within 1% val loss of fixed rank {r}", f"{dyn[r]:.4f} vs {fixed:.4f} ({100 * gap:+.2f}%)",
                        gap <= 0.01))
    ppl = math.exp(base["NF4 base"]["val_loss"] - base["float base"]["val_loss"]) - 1
    out.append(("NF4 base alone within 2% perplexity of the float base", f"{100 * ppl:+.2f}%", ppl <= 0.02))
    numel = base["float base"]["base_linear_bytes"] / 4  # the float base is float32 in memory
    lin = base["NF4 base"]["base_linear_bytes"] / (2 * numel)
    out.append(("base weights <= 30% of bf16: the layers' linears", f"{100 * lin:.1f}%", lin <= 0.30))
    whole_bf16 = base["float base"]["model_bytes"] / 2
    whole = base["NF4 base"]["model_bytes"] / whole_bf16
    out.append(("base weights <= 30% of bf16: the whole model (embedding fp32 as loaded)", f"{100 * whole:.1f}%",
                whole <= 0.30))
    full = rows["full"]["trainable_params"]
    for name, row in rows.items():
        if name != "full":
            share = row["trainable_params"] / full
            out.append((f"trainable state <= 3% of full fine-tune's: {name}", f"{100 * share:.2f}%", share <= 0.03))
    return out


def write_results(results, s):
    os.makedirs(s.out, exist_ok=True)
    with open(os.path.join(s.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    mib = 2 ** 20
    lines = [f"# QDyLoRA on {os.path.basename(s.model)}", "",
             f"{s.iters} steps x {s.batch_size} x {s.block_size} tokens per run (the same tokens for every run), "
             f"dtype {s.dtype}, targets {s.targets}, alpha {s.lora_alpha}; val loss on {s.eval_batches} val batches. "
             "tokens/s and wall time were taken with other jobs on the machine.", "",
             "| run | val loss | trainable params | AdamW state MiB | base linears MiB | model MiB | peak RSS MiB "
             "| tokens/s | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["base"].items():
        lines.append(f"| {name} (no training) | {r['val_loss']:.4f} | | | {r['base_linear_bytes'] / mib:.1f} | "
                     f"{r['model_bytes'] / mib:.1f} | | | |")
    for name, r in results["runs"].items():
        lines.append(f"| {name} | {r['val_loss']:.4f} | {r['trainable_params']:,} | "
                     f"{r['optimizer_state_bytes'] / mib:.1f} | {r['base_linear_bytes'] / mib:.1f} | "
                     f"{r['model_bytes'] / mib:.1f} | {r['peak_rss_bytes'] / mib:.0f} | {r['tokens_per_s']:.0f} | "
                     f"{r['wall_s']:.0f} |")
    curve = results["runs"]["dynamic"]["val_loss_at_rank"]
    lines += ["", "The dynamic run's rank curve (one run, evaluated at each rank):", "",
              "| rank | " + " | ".join(map(str, curve)) + " |", "|---" * (len(curve) + 1) + "|",
              "| val loss | " + " | ".join(f"{v:.4f}" for v in curve.values()) + " |", "", "Goals:", "",
              "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {g} | {m} | {'yes' if ok else 'MISSED'} |" for g, m, ok in results["goals"]]
    with open(os.path.join(s.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv):
    s, _ = configure(DEFAULTS, argv, __doc__)
    if s.quick:
        s.iters, s.eval_batches = min(s.iters, 4), min(s.eval_batches, 2)
    os.makedirs(s.runs, exist_ok=True)
    batches = val_batches(s)
    results = {"settings": vars(s), "base": base_table(s, batches), "runs": {}}
    common = [f"--lora_targets={s.targets}", f"--lora_alpha={s.lora_alpha}", "--base_quant=nf4"]
    plan = [("dynamic", common + [f"--lora_rank={s.lora_rank}", "--lora_dynamic=True"])]
    plan += [(f"fixed r={r}", common + [f"--lora_rank={r}"]) for r in lora.parse_ranks(s.fixed_ranks)]
    plan += [("full", [])]
    for name, args in plan:
        out_dir, wall, rss = train_run(name.replace(" ", "").replace("=", ""), args, s)
        results["runs"][name] = run_row(name, out_dir, wall, rss, s, batches)
    results["goals"] = goals(results, s)
    write_results(results, s)
    progress(f"wrote {s.out}/results.json and results.md")
    return results


if __name__ == "__main__":
    sys.exit(run_script(main))
