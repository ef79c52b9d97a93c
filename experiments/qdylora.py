"""
QDyLoRA on SmolLM2-135M-Instruct: one dynamic-rank LoRA run over a 4-bit NF4 base against fixed-rank runs,
a full fine-tune, and the NF4 base alone against the float base (issue 22).

    .venv/bin/python data/smollm2/prepare.py && .venv/bin/python data/shakespeare_smollm2/prepare.py
    .venv/bin/python experiments/qdylora.py --threads=2     # alone on a 2-core machine: ~35 min -> out-qdylora-results/
    .venv/bin/python experiments/qdylora.py --nf4_study=True   # ~3 min: NF4's error per layer and by variant -> nf4.md
    .venv/bin/python experiments/qdylora.py --quick=True --out=/tmp/q --runs=/tmp/q-runs  # tiny budgets

1. the base alone: val loss (and perplexity) of the float base and of its NF4 form, no training;
2. every training run is a train.py command (printed) on the same tokens (same seed, iterations, batch):
   QDyLoRA R=lora_rank (dynamic, one run per update rule of `rules`), fixed-rank LoRA at each of fixed_ranks
   (same NF4 base), fixed-rank LoRA over the float base at each of float_base_ranks, and a full fine-tune (float weights,
   every parameter);
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
from configurator import apply_threads, configure, run_script, settings_from  # noqa: E402
from dataset import BatchSampler, ensure_dataset, load_meta, open_tokens  # noqa: E402
from monitor import read_log  # noqa: E402

# -----------------------------------------------------------------------------
out = "out-qdylora-results"  # results.json/.md, nf4.json/.md; results/qdylora holds the committed ones
runs = "out-qdylora"         # the training runs
model = "data/smollm2/smollm2-135m-instruct.pt"
dataset = "shakespeare_smollm2"
targets = "q,k,v,o,gate,up,down"  # QLoRA's: every linear of the layers
lora_rank = 64               # R of the dynamic run
fixed_ranks = "4,16,64"      # one fixed-rank run each
eval_ranks = "1,2,4,8,16,32,64"  # the dynamic run's rank curve
lora_alpha = 16.0
iters = 40                   # optimizer steps per run: the token budget (iters x batch_size x block_size)
batch_size = 4
block_size = 128
eval_batches = 8             # val batches every model is evaluated on
dtype = "float32"            # training autocast; bfloat16 is ~12x slower than float32 on this CPU (see docs)
lora_lr = 1e-3
full_lr = 1e-4               # full fine-tuning takes a smaller step than adapters (as QLoRA's and peft's recipes)
float_base_ranks = "16"      # fixed-rank LoRA runs over the float base (no quantization): NF4 vs float base
rules = "nested,frozen"      # one dynamic run per update rule (lora.py's --lora_rule); the first is "dynamic"
nf4_study = False            # only the NF4 base's sensitivity (per-layer error, block size, which linears): OUT/nf4.md
reuse = False                # keep a run whose run.json shows the same command finished (only new runs train)
quick = False                # tiny budgets, for the test
seed = 1337
threads = 0                  # torch CPU threads, here and in the runs it starts: 0 = 1 on a CPU (apply_threads)
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


def nf4_variants(s, batches):
    """Why NF4 costs what it costs: every linear's relative error against a Gaussian matrix's, and the val
    loss with the NF4 variants (block size, double quantization, which linears)."""
    import nf4
    base, _ = load_model(s.model, block_size=s.block_size)
    errors = {}
    for name, _, _, linear in nf4.layer_linears(base):
        w = linear.weight.detach().float()
        error = (w - nf4.dequantize_nf4_tensor(nf4.quantize_nf4_tensor(w), w.shape)).norm() / w.norm()
        errors.setdefault(name.split(".")[-1], []).append(error.item())
    gauss = torch.randn(576, 1536, generator=torch.Generator().manual_seed(s.seed))
    gauss_error = ((gauss - nf4.dequantize_nf4_tensor(nf4.quantize_nf4_tensor(gauss), gauss.shape)).norm() / gauss.norm())
    rows = {"float base": evaluate(base, batches, s.dtype)}
    variants = {"NF4 block 64, double-quantized scales": dict(block=64), "NF4 block 64, fp32 scales": dict(double_quant=False),
                "NF4 block 32": dict(block=32), "NF4 block 16": dict(block=16), "NF4 on attention linears only": dict(part="self_attn"),
                "NF4 on MLP linears only": dict(part="mlp")}
    for label, v in variants.items():
        model, _ = load_model(s.model, block_size=s.block_size)
        for name, parent, attr, linear in nf4.layer_linears(model):
            if f".{v.get('part', '')}." in name or "part" not in v:
                setattr(parent, attr, nf4.NF4Linear(linear.weight, v.get("block", 64), v.get("double_quant", True)))
        rows[label] = evaluate(model, batches, s.dtype)
        progress(f"{label}: val loss {rows[label]:.4f}")
    return {"relative_error": {k: (sum(e) / len(e), max(e)) for k, e in errors.items()},
            "gaussian_relative_error": gauss_error.item(), "val_loss": rows}


def write_nf4_study(study, s):
    os.makedirs(s.out, exist_ok=True)
    with open(os.path.join(s.out, "nf4.json"), "w") as f:
        json.dump(study, f, indent=1)
    f0 = study["val_loss"]["float base"]
    lines = [f"# NF4 on {os.path.basename(s.model)}: where the loss comes from", "",
             f"||W - NF4(W)|| / ||W|| per kind of linear (mean, max over layers); a {576}x{1536} Gaussian matrix: "
             f"{study['gaussian_relative_error']:.4f}", "", "| linear | mean | max |", "|---|---|---|"]
    lines += [f"| {k} | {m:.4f} | {x:.4f} |" for k, (m, x) in study["relative_error"].items()]
    lines += ["", f"Val loss on {s.eval_batches} x {s.batch_size} x {s.block_size} val tokens, {s.dtype}:", "",
              "| base | val loss | perplexity vs float |", "|---|---|---|"]
    lines += [f"| {k} | {v:.4f} | {100 * (math.exp(v - f0) - 1):+.1f}% |" for k, v in study["val_loss"].items()]
    with open(os.path.join(s.out, "nf4.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def train_run(name, args, s):
    """One train.py run into runs/<name>: (out_dir, wall seconds, peak RSS bytes of its process)."""
    out_dir = os.path.join(s.runs, name)
    lr = s.full_lr if name == "full" else s.lora_lr
    cmd = [sys.executable, "train.py", f"--init_from={s.model}", f"--dataset={s.dataset}", f"--out_dir={out_dir}",
           f"--max_iters={s.iters}", f"--lr_decay_iters={s.iters}", f"--eval_interval={s.iters}", "--eval_iters=1",
           f"--batch_size={s.batch_size}", f"--block_size={s.block_size}", f"--dtype={s.dtype}",
           f"--learning_rate={lr}", f"--min_lr={lr / 10}", f"--warmup_iters={max(1, s.iters // 10)}",
           f"--log_interval={max(1, s.iters // 4)}", "--compile=False", "--weight_decay=0.0", f"--seed={s.seed}",
           "--overwrite=True", "--kv_source=dense", f"--threads={s.threads}", *args]
    record = os.path.join(out_dir, "run.json")
    if s.reuse and os.path.exists(record) and json.load(open(record))["cmd"] == cmd[1:]:
        done = json.load(open(record))
        progress(f"run {name}: reused (same command, finished)")
        return out_dir, done["wall_s"], done["peak_rss_bytes"]
    progress(f"run {name}: {' '.join(cmd[1:])}")
    t0 = time.time()
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "stdout.txt"), "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (ru_maxrss: KiB on Linux)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"run {name} failed:\n{open(os.path.join(out_dir, 'stdout.txt')).read()[-3000:]}")
    wall, rss = time.time() - t0, usage.ru_maxrss * 1024
    with open(record, "w") as f:
        json.dump({"cmd": cmd[1:], "wall_s": wall, "peak_rss_bytes": rss}, f)
    return out_dir, wall, rss


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
    out = []
    for name in [n for n in rows if "val_loss_at_rank" in rows[n]]:
        dyn = rows[name]["val_loss_at_rank"]
        for r in lora.parse_ranks(s.fixed_ranks):
            fixed = rows[f"fixed r={r}"]["val_loss"]
            if r in dyn:
                gap = (dyn[r] - fixed) / fixed
                out.append((f"{name} within 1% val loss of fixed rank {r}",
                            f"{dyn[r]:.4f} vs {fixed:.4f} ({100 * gap:+.2f}%)", gap <= 0.01))
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
             f"Timing: {results['cpu_count']} cores, runs at --threads={s.threads}, load average (1, 5, 15 min) before the "
             f"first run {', '.join(f'{x:.2f}' for x in results['load_average_before'])} (a reused run keeps the timing "
             "of the invocation that trained it).", "",
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
    curves = {name: r["val_loss_at_rank"] for name, r in results["runs"].items() if "val_loss_at_rank" in r}
    ranks = list(curves["dynamic"])
    lines += ["", "Rank curves (each dynamic run's one checkpoint evaluated at each rank; 'dynamic' is the nested "
              "rule), and the fixed-rank runs at their own rank:", "",
              "| val loss at rank | " + " | ".join(map(str, ranks)) + " |", "|---" * (len(ranks) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{c[r]:.4f}" for r in ranks) + " |" for name, c in curves.items()]
    fixed = {int(n.split("=")[1]): r["val_loss"] for n, r in results["runs"].items() if n.startswith("fixed r=")}
    lines += ["| fixed-rank runs | " + " | ".join(f"{fixed[r]:.4f}" if r in fixed else "" for r in ranks) + " |",
              "", "Goals:", "",
              "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {g} | {m} | {'yes' if ok else 'MISSED'} |" for g, m, ok in results["goals"]]
    with open(os.path.join(s.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv):
    s, _ = configure(DEFAULTS, argv, __doc__)
    if s.quick:
        s.iters, s.eval_batches = min(s.iters, 4), min(s.eval_batches, 2)
    s.threads = apply_threads(s.threads, children=True)
    os.makedirs(s.runs, exist_ok=True)
    common = [f"--lora_targets={s.targets}", f"--lora_alpha={s.lora_alpha}", "--base_quant=nf4"]
    rules = [r.strip() for r in s.rules.split(",") if r.strip()]
    dynamic = common + [f"--lora_rank={s.lora_rank}", "--lora_dynamic=True"]
    plan = [("dynamic" if i == 0 else f"dynamic {rule}", dynamic + ([f"--lora_rule={rule}"] if rule != "nested" else []))
            for i, rule in enumerate(rules)]  # nested is lora.py's default rule
    plan += [(f"fixed r={r}", common + [f"--lora_rank={r}"]) for r in lora.parse_ranks(s.fixed_ranks)]
    plan += [(f"LoRA r={r} float base", [f"--lora_targets={s.targets}", f"--lora_alpha={s.lora_alpha}", "--base_quant=none",
                                          f"--lora_rank={r}"]) for r in lora.parse_ranks(s.float_base_ranks, "float_base_ranks")]
    plan += [("full", [])]
    batches = val_batches(s)
    if s.nf4_study:
        study = nf4_variants(s, batches)
        write_nf4_study(study, s)
        progress(f"wrote {s.out}/nf4.json and nf4.md")
        return study
    results = {"settings": vars(s), "load_average_before": os.getloadavg(), "cpu_count": os.cpu_count(),
               "base": base_table(s, batches), "runs": {}}
    for name, args in plan:
        out_dir, wall, rss = train_run(name.replace(" ", "").replace("=", "").replace(",", ""), args, s)
        results["runs"][name] = run_row(name, out_dir, wall, rss, s, batches)
    results["goals"] = goals(results, s)
    write_results(results, s)
    progress(f"wrote {s.out}/results.json and results.md")
    return results


if __name__ == "__main__":
    sys.exit(run_script(main))
