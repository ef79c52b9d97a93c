"""
SmolLM2-135M-Instruct, a real pretrained Llama, made cheaper on a CPU: calibration, abrupt conversion and
adaptation into KV-shared models, measured on held-out Shakespeare plays and on a text of another kind
(the King James Bible), both never trained on.

    .venv/bin/python data/smollm2/prepare.py && .venv/bin/python data/shakespeare_smollm2/prepare.py
    .venv/bin/python experiments/smollm2.py                          # -> out-smollm2-results/
    .venv/bin/python experiments/smollm2.py --out=results/smollm2 --replace_tracked=True  # regenerate the committed results

1. calibration (adapt.kv_similarity) on the dense model, its heatmap, and the maps it proposes;
2. val loss right after conversion, no training: dense, cla:2, upper:half and the calibrated maps, with
   the owners' own K/V and with the mean of their users' K/V;
3. adaptation at one token budget (iters x batch_size x block_size tokens per run): the dense model
   fine-tuned on the same tokens (the fair baseline), abrupt, gradual, with distillation, with freezing,
   and with layer-local distillation first; then the KV cache fraction curve at that budget;
4. EchoAtt: attention-map calibration, conversion and two-stage distillation at the same budget, side by
   side with K/V sharing of as many layers;
5. decode tokens/s and KV cache bytes, and the greedy answers to five chat questions, dense vs adapted.
Every training run is a train.py command (printed), so any number can be re-run by hand; finished runs
are reused only when their settings match. Results: OUT/results.md, OUT/results.json, OUT/*.png.
"""

import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from adapt import (attention_similarity, convert_model, kv_similarity, propose_attn_source,  # noqa: E402
                   propose_kv_source, save_heatmap)
from checkpoint import load_model, save_checkpoint  # noqa: E402
from configurator import apply_threads, configure, run_script, settings_from  # noqa: E402
from monitor import read_log  # noqa: E402
from dataset import BatchSampler, ensure_dataset, load_meta, open_tokens  # noqa: E402
from experiments.decode_timing import decode_rates  # noqa: E402
from guards import check_not_tracked  # noqa: E402

# -----------------------------------------------------------------------------
out = "out-smollm2-results"  # the tables, JSON and plots
runs = "out-smollm2"         # converted checkpoints and training runs
replace_tracked = False      # let --out overwrite the repository's committed results (results/smollm2)
model = "data/smollm2/smollm2-135m-instruct.pt"
dataset = "shakespeare_smollm2"  # adaptation and evaluation data (data/<dataset>)
iters = 64                   # optimizer steps per adaptation run: the token budget
batch_size = 4               # sequences per batch
block_size = 256             # sequence length
dtype = "bfloat16"           # training autocast (evaluation is float32)
learning_rate = 2e-4         # peak learning rate of the adaptation runs
eval_batches = 16            # batches of each held-out text every model is evaluated on
calib_batches = 4            # batches of the calibration (adapt.py --batches)
local_iters = 40             # layer-local distillation steps before end-to-end training
share = "8,12,15,22"         # layers the calibrated K/V maps share (of 30): KV cache 0.73, 0.60, 0.50, 0.27
attn_share = "8,12"          # layers the EchoAtt maps share (27% and 40%)
compare_maps = "upper:half,cla:2"  # presets also adapted (local distillation + abrupt) beside the calibrated maps
speed_iters = 0              # > 0: only time each recipe's training for this many steps, one after another on
                             # a quiet machine (the runs above may have shared it), into OUT/speed.json
seed = 1337                  # RNG seed of every run
threads = 0                  # torch CPU threads, here and in the runs it starts: 0 = 1 on a CPU (apply_threads)
# -----------------------------------------------------------------------------
DEFAULTS = settings_from(globals())
QUESTIONS = ["What is the capital of France?", "What is the capital of Germany?", "How many legs does a spider have?",
             "Who wrote Romeo and Juliet?", "Give me a word that rhymes with cat."]


def progress(text, t0=[time.time()]):
    print(f"[{(time.time() - t0[0]) / 60:5.1f} min] {text}", flush=True)


@torch.no_grad()
def evaluate(model, data_dir, n_batches, batch_size, block_size, seed):
    """Mean cross-entropy on the same n_batches batches of each held-out text, for every model."""
    meta, losses = load_meta(data_dir), {}
    for split in ("val", "other"):
        sampler = BatchSampler(open_tokens(data_dir, split, meta), block_size, batch_size, seed, "cpu")
        losses[split] = sum(model(*sampler.get("eval_val", 0, k))[1].item() for k in range(n_batches)) / n_batches
    return losses


def cached(s, name, compute):
    """compute() once per runs directory (delete runs/<name>.pt to redo it): a long run stopped
    halfway goes on where it was."""
    path = os.path.join(s.runs, name + ".pt")
    if os.path.exists(path):
        progress(f"reusing {path}")
        return torch.load(path, weights_only=False)
    value = compute()
    torch.save(value, path)
    return value


def calibration_batches(data_dir, s):
    sampler = BatchSampler(open_tokens(data_dir, "train", load_meta(data_dir)), s.block_size, s.batch_size, s.seed + 1, "cpu")
    return [sampler.get("train", 0, k)[0] for k in range(s.calib_batches)]


def calibrate(dense, data_dir, s):
    sim = cached(s, "kv_similarity", lambda: kv_similarity(dense, calibration_batches(data_dir, s)))
    save_heatmap(sim, os.path.join(s.out, "kv_similarity.png"),
                 "SmolLM2-135M: 1 - relative change of layer i's output with layer j's K/V")
    maps = {f"calibrated {n}": propose_kv_source(sim, n) for n in map(int, s.share.split(","))}
    return sim, maps


def conversion_table(dense, maps, data_dir, s):
    """Val loss of every map and K/V init right after conversion; for each map the checkpoint of the
    init with the lower Shakespeare val loss is kept for training (BEST_INIT)."""
    rows = {"dense": evaluate(dense, data_dir, s.eval_batches, s.batch_size, s.block_size, s.seed)}
    for name, kv in maps.items():
        for init in ("own", "mean"):
            converted = convert_model(dense, kv, init)
            rows[f"{name}, {init} K/V"] = evaluate(converted, data_dir, s.eval_batches, s.batch_size, s.block_size, s.seed)
            progress(f"converted to {name} ({init}): {rows[f'{name}, {init} K/V']}")
            if name not in BEST_INIT or rows[f"{name}, {init} K/V"]["val"] < rows[f"{name}, {BEST_INIT[name]} K/V"]["val"]:
                BEST_INIT[name] = init
                save_checkpoint({"model": converted.state_dict(), "model_config": converted.config.to_dict()},
                                converted_path(s, name))
    return rows


def converted_path(s, name):
    return os.path.join(s.runs, "converted-" + name.replace(" ", "-").replace(":", "") + ".pt")


def train_run(name, args, s, k, n):
    """One train.py run into runs/<name>; reused when a finished run with the same arguments is there."""
    out_dir = os.path.join(s.runs, "train-" + name.replace(" ", "-").replace(":", "").replace("+", "plus"))
    cmd = [sys.executable, "train.py", f"--dataset={s.dataset}", f"--out_dir={out_dir}", f"--max_iters={s.iters}",
           f"--batch_size={s.batch_size}", f"--block_size={s.block_size}", f"--dtype={s.dtype}",
           f"--learning_rate={s.learning_rate}", f"--min_lr={s.learning_rate / 10}", "--warmup_iters=4",
           f"--lr_decay_iters={s.iters}", f"--eval_interval={s.iters}", "--eval_iters=4", "--log_interval=8",
           "--compile=False", "--weight_decay=0.0", f"--seed={s.seed}", *args]
    stamp = os.path.join(out_dir, "command.json")
    log = os.path.join(out_dir, "log.jsonl")
    done = os.path.exists(log) and any(r.get("kind") == "done" and not r.get("stopped") for r in read_log(log))
    if done and os.path.exists(stamp) and json.load(open(stamp)) == cmd[1:]:
        progress(f"run {k}/{n} {name}: reusing {out_dir}")
    else:
        if os.path.exists(log):
            os.remove(log)
        os.makedirs(out_dir, exist_ok=True)
        progress(f"run {k}/{n} {name}: $ {' '.join(cmd[1:])}")
        subprocess.run(cmd, cwd=ROOT, check=True)
        json.dump(cmd[1:], open(stamp, "w"))
    records = read_log(log)
    return out_dir, next(r for r in records if r["kind"] == "done")["tokens_per_s"]


def adaptation_runs(maps, s):
    """The recipes at the half-cache calibrated map, then the other maps with the local-distillation recipe.
    Returns {name: (out_dir, train tokens/s, kv_source)}."""
    half = maps["calibrated 15"]
    target = ",".join(map(str, half))
    teacher = [f"--distill_teacher={s.model}", "--distill_alpha=0.5", "--distill_temperature=1.0"]
    recipes = {
        "dense fine-tuned": ([f"--init_from={s.model}"], None),
        "abrupt": ([f"--init_from={converted_path(s, 'calibrated 15')}"], half),
        "abrupt + distillation": ([f"--init_from={converted_path(s, 'calibrated 15')}", *teacher], half),
        "abrupt + freezing": ([f"--init_from={converted_path(s, 'calibrated 15')}", f"--adapt_target={target}",
                               "--adapt_mode=abrupt", "--adapt_train_layers=upward"], half),
        "gradual": ([f"--init_from={s.model}", f"--adapt_target={target}", "--adapt_mode=gradual",
                     "--adapt_layers_per_stage=5", f"--adapt_stage_iters={s.iters // 4}"], half),
    }
    presets = [m for m in s.compare_maps.split(",") if m]
    for name in ["calibrated 15", *presets] + [m for m in maps if m.startswith("calibrated") and m != "calibrated 15"]:
        recipes[f"local + abrupt, {name}"] = ([f"--init_from={local_checkpoint(name, s)}"], maps[name])
    results = {}
    for k, (name, (args, kv)) in enumerate(recipes.items(), 1):
        out_dir, tps = train_run(name, args, s, k, len(recipes))
        results[name] = (out_dir, tps, kv)
    return results


def local_checkpoint(name, s):
    """The conversion to map `name` (its better K/V init), then layer-local distillation (adapt.py --convert_to)."""
    path = converted_path(s, name).replace("converted-", "local-")
    if not os.path.exists(path):
        kv = ",".join(map(str, MAPS[name]))
        cmd = [sys.executable, "adapt.py", f"--init_from={s.model}", f"--dataset={s.dataset}", f"--convert_to={kv}",
               f"--kv_init={BEST_INIT[name]}", f"--local_iters={s.local_iters}", "--batches=8", f"--batch_size={s.batch_size}",
               f"--block_size={s.block_size}", f"--out={path}"]
        progress(f"local distillation for {name}: $ {' '.join(cmd[1:])}")
        t0 = time.time()
        subprocess.run(cmd, cwd=ROOT, check=True)
        LOCAL_SECONDS[name] = time.time() - t0
    return path


MAPS, LOCAL_SECONDS, BEST_INIT = {}, {}, {}


def echoatt(dense, data_dir, s, k0, n_runs):
    """EchoAtt at each of attn_share: calibrate by attention maps, convert (sharers drop Q and K), then
    two-stage distillation (2/3 of the budget learning from the teacher: 0.25 KL + 0.5 argmax CE +
    0.25 hidden-state MSE at the shared blocks' ends; then plain CE). {name: row}."""
    sim = cached(s, "attn_similarity", lambda: attention_similarity(dense, calibration_batches(data_dir, s)))
    save_heatmap(sim, os.path.join(s.out, "attn_similarity.png"), "SmolLM2-135M: cosine similarity of attention maps",
                 "attention pattern")
    rows = {}
    for k, n in enumerate(map(int, s.attn_share.split(",")), k0):
        name = f"attention {n}"
        attn = propose_attn_source(sim, n)
        converted = convert_model(dense, attn_source=attn)
        path = converted_path(s, name)
        save_checkpoint({"model": converted.state_dict(), "model_config": converted.config.to_dict()}, path)
        after_conversion = evaluate(converted, data_dir, s.eval_batches, s.batch_size, s.block_size, s.seed)
        ends = [i + 1 for i in range(len(attn) - 1) if attn[i] != i and attn[i + 1] == i + 1]
        out_dir, tps = train_run(name, [f"--init_from={path}", f"--distill_teacher={s.model}",
                                        f"--distill_iters={2 * s.iters // 3}", "--distill_alpha=0.25",
                                        "--distill_argmax=0.5", "--distill_hidden=0.25",
                                        f"--distill_hidden_layers={','.join(map(str, ends))}"], s, k, n_runs)
        rows[name] = {"attn_source": list(attn), "converted": after_conversion, "out_dir": out_dir,
                      "tokens_per_s": tps, "params": converted.num_params()}
        progress(f"{name}: {rows[name]}")
    return sim, rows


def decode_speed(models, n_tokens=64, prompt_len=128, rounds=3):
    """Greedy batch-1 decode tokens/s (prefill excluded), median over interleaved rounds, fp32."""
    prompt = torch.randint(0, 49152, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    return {name: sorted(r)[len(r) // 2] for name, r in decode_rates(models, prompt, n_tokens, rounds).items()}


def chat_answers(checkpoints):
    """Greedy answers (sample.py --chat) of each checkpoint to QUESTIONS."""
    answers = {}
    for name, path in checkpoints.items():
        answers[name] = []
        for q in QUESTIONS:
            r = subprocess.run([sys.executable, "sample.py", f"--init_from={path}", "--chat", f"--start={q}",
                                "--temperature=0", "--max_new_tokens=40", "--device=cpu"],
                               cwd=ROOT, capture_output=True, text=True, check=True)
            answers[name].append(r.stdout.split("\n---------------")[0].strip().replace("\n", " "))
    return answers


def plot_kv_curve(points, path):
    """Val loss against the KV cache fraction at the token budget, one line per held-out text."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, split, title in zip(axes, ("val", "other"), ("held-out Shakespeare plays", "King James Bible (never trained)")):
        xs = sorted(points)
        ax.plot(xs, [points[x][split] for x in xs], "o-", label="adapted (local distillation + abrupt)")
        ax.axhline(points[1.0][split], color="gray", ls="--", label="dense fine-tuned, same tokens")
        ax.set_xlabel("KV cache fraction of dense")
        ax.set_ylabel("val loss")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows, header):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def report(s, sim_maps, converted, adapted, attn, decode, answers, minutes):
    dense, base = converted["dense"], adapted["dense fine-tuned"]
    gap = lambda r, k: f"{r[k]:.3f} ({100 * (r[k] / base[k] - 1):+.1f}%)"  # noqa: E731
    lines = [f"`experiments/smollm2.py` on {os.cpu_count()} CPU cores, torch {torch.__version__}, {minutes:.0f} min; "
             f"budget per run {s.iters} x {s.batch_size} x {s.block_size} = {s.iters * s.batch_size * s.block_size:,} "
             f"tokens, {s.dtype} autocast; val loss = mean CE over {s.eval_batches} x {s.batch_size} x {s.block_size} "
             "tokens of each held-out text (fp32).", "",
             "Calibrated K/V maps: " + "; ".join(f"{n}: {','.join(map(str, m))}" for n, m in sim_maps.items()), "",
             "**Right after conversion (no training)**", ""]
    lines += table([(n, f"{r['val']:.3f}", f"{r['other']:.3f}") for n, r in converted.items()] +
                   [(n + " (EchoAtt)", f"{r['converted']['val']:.3f}", f"{r['converted']['other']:.3f}") for n, r in attn.items()],
                   ["model", "Shakespeare val loss", "Bible val loss"])
    lines += ["", "Training starts from the K/V init with the lower val loss for each map: " +
              ", ".join(f"{n}: {i}" for n, i in BEST_INIT.items()), "",
              f"**After adaptation** (the dense model before training: {dense['val']:.3f} / {dense['other']:.3f})", ""]
    lines += table([(n, f"{r['kv_fraction']:.2f}", gap(r, "val"), gap(r, "other"),
                     f"{r['tokens_per_s']:,.0f} ({r['tokens_per_s'] / base['tokens_per_s']:.2f}x)") for n, r in adapted.items()],
                   ["run", "KV cache", "Shakespeare val (vs dense fine-tuned)", "Bible val (vs dense fine-tuned)",
                    "train tokens/s (vs dense fine-tuned)"])
    lines += ["", "**Decoding and the two kinds of sharing side by side** (batch 1, fp32, 64 tokens after a 128-token "
              "prompt, median of 3 interleaved rounds)", ""]
    lines += table([(n, f"{adapted[n]['val']:.3f}", f"{adapted[n]['params'] / 1e6:.2f}M", f"{adapted[n]['tokens_per_s']:,.0f}",
                     f"{d['tokens_per_s']:.1f}", f"{d['kv_bytes_per_token']:,}") for n, d in decode.items()],
                   ["model", "Shakespeare val", "parameters", "train tokens/s", "decode tokens/s", "KV cache bytes/token"])
    lines += ["", "**Greedy chat answers**", ""]
    lines += table([(q, *(answers[n][i] for n in answers)) for i, q in enumerate(QUESTIONS)], ["question", *answers])
    return "\n".join(lines) + "\n"


def evaluate_runs(runs, data_dir, s):
    """Both held-out losses of every trained run, with its speed and KV cache fraction."""
    rows = {}
    for name, (out_dir, tps, kv) in runs.items():
        model_, _ = load_model(out_dir)
        c = model_.config  # K of the key layers and V of the owners, against K and V of every layer
        fraction = (len(c.key_layers) + len(c.owners)) / (2 * c.n_layer)
        rows[name] = evaluate(model_, data_dir, s.eval_batches, s.batch_size, s.block_size, s.seed) | {
            "tokens_per_s": tps, "kv_fraction": fraction, "kv_source": list(model_.config.kv_source),
            "attn_source": list(model_.config.attn_source), "params": model_.num_params(), "out_dir": out_dir}
        progress(f"{name}: {rows[name]}")
    return rows


def speed_phase(s):
    """Train tokens/s of the recipes of a finished experiment, each run alone for speed_iters steps (first
    step and evaluation excluded), from the same starting checkpoints and with the same settings."""
    runs, rates = os.path.join(s.runs, "speed"), {}
    for name in ("dense fine-tuned", "abrupt", "abrupt + freezing", "abrupt + distillation", "attention 12"):
        stamp = os.path.join(s.runs, "train-" + name.replace(" ", "-").replace(":", "").replace("+", "plus"), "command.json")
        args = [a for a in json.load(open(stamp))[1:] if not a.startswith(("--out_dir=", "--max_iters=", "--eval_"))]
        cmd = [sys.executable, "train.py", *args, f"--out_dir={runs}", f"--max_iters={s.speed_iters}", "--eval_iters=1",
               f"--eval_interval={s.speed_iters}", "--overwrite=True", "--always_save_checkpoint=False"]
        progress(f"speed of {name}: $ {' '.join(cmd[1:])}")
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        done = [r for r in read_log(os.path.join(runs, "log.jsonl")) if r.get("kind") == "done"][-1]
        rates[name] = done["tokens_per_s"]
        progress(f"{name}: {rates[name]:,.0f} tokens/s ({rates[name] / rates['dense fine-tuned']:.2f}x dense)")
    json.dump(rates, open(os.path.join(s.out, "speed.json"), "w"), indent=1)
    return 0


def main(argv):
    s, _ = configure(DEFAULTS, argv, __doc__)
    apply_threads(s.threads, children=True)
    for key in ("out", "runs"):
        check_not_tracked(getattr(s, key), key, s.replace_tracked)
    for path in (s.out, s.runs):
        os.makedirs(path, exist_ok=True)
    if s.speed_iters:
        return speed_phase(s)
    t_start = time.time()
    data_dir = ensure_dataset(s.dataset, auto_prepare=False)
    dense, _ = load_model(s.model, block_size=s.block_size)
    sim, maps = calibrate(dense, data_dir, s)
    MAPS.update({"cla:2": convert_model(dense, "cla:2").config.kv_source,
                 "upper:half": convert_model(dense, "upper:half").config.kv_source, **maps})
    progress("calibrated maps: " + "; ".join(f"{n}: {m}" for n, m in maps.items()))
    converted, best = cached(s, "conversion", lambda: (
        conversion_table(dense, {k: MAPS[k] for k in ("cla:2", "upper:half", *maps)}, data_dir, s), BEST_INIT))
    BEST_INIT.update(best)
    runs = adaptation_runs(MAPS, s)
    attn_sim, attn = echoatt(dense, data_dir, s, len(runs) + 1, len(runs) + len(s.attn_share.split(",")))
    runs.update({name: (r["out_dir"], r["tokens_per_s"], None) for name, r in attn.items()})
    adapted = evaluate_runs(runs, data_dir, s)
    compared = ["dense fine-tuned", "local + abrupt, calibrated 15"] + [
        n for n in adapted if n.startswith("attention") or n in (f"local + abrupt, calibrated {k}" for k in s.attn_share.split(","))]
    models = {n: load_model(adapted[n]["out_dir"])[0] for n in dict.fromkeys(compared)}
    speed = decode_speed(models)
    decode = {n: {"tokens_per_s": speed[n], "kv_bytes_per_token": m.new_cache(1, 1).nbytes()} for n, m in models.items()}
    answers = chat_answers({"dense (as imported)": s.model, "dense fine-tuned": adapted["dense fine-tuned"]["out_dir"],
                            "KV-shared, half cache": adapted["local + abrupt, calibrated 15"]["out_dir"]})
    points = {adapted[n]["kv_fraction"]: adapted[n] for n in adapted if n.startswith("local + abrupt, calibrated")}
    points[1.0] = adapted["dense fine-tuned"]
    plot_kv_curve(points, os.path.join(s.out, "kv_fraction_vs_loss.png"))
    text = report(s, maps, converted, adapted, attn, decode, answers, (time.time() - t_start) / 60)
    open(os.path.join(s.out, "results.md"), "w").write(text)
    json.dump({"settings": vars(s), "maps": {k: list(v) for k, v in MAPS.items()}, "best_init": BEST_INIT,
               "converted": converted, "adapted": adapted, "attention": attn, "decode": decode, "answers": answers,
               "local_distillation_s": LOCAL_SECONDS, "kv_similarity": sim.tolist(),
               "attn_similarity": attn_sim.tolist()}, open(os.path.join(s.out, "results.json"), "w"), indent=1)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
