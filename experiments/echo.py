"""
Reproduce the ECHO results table and plots (README, "ECHO adaptation: results"):

  1. pretraining from scratch at equal tokens: dense vs upper-half sharing vs cla:2, several seeds;
  2. adapting the pretrained dense model into upper-half sharing: val loss right after conversion,
     then after abrupt, gradual, gradual + freezing and gradual + distillation adaptation at equal
     tokens, with tokens/s against full dense training;
  3. decoding tokens/s and KV cache bytes, adapted vs dense;
plus the K/V similarity heatmap of the dense model.

    .venv/bin/python experiments/echo.py                    # the README's numbers into out-echo-results/ (2-core CPU, ~30 min)
    .venv/bin/python experiments/echo.py --out=results/echo --replace_tracked=True  # the same, replacing the committed results
    .venv/bin/python experiments/echo.py --pretrain_iters=200 --seeds=1 --runs=out-echo-quick --out=out-echo-quick  # a quick look

Every run is a plain `train.py` (or `adapt.py`) command, printed before it starts, so any single
number can be re-run by hand; a line per run says which run it is, k of n, the time so far and an
estimate of the time left. Runs go to RUNS/<name>/ and are reused when RUNS already holds that run
finished with the same settings (its log.jsonl's "start" record has them); a finished run there with
other settings is an error, never silently reused. Results go to OUT/results.md, OUT/results.json
and OUT/*.png; `--replot` redraws the plots of an OUT from its results.json without running anything.
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
from configurator import apply_threads, configure, parse_text, run_script, settings_from  # noqa: E402
from experiments.decode_timing import decode_rates  # noqa: E402
from guards import check_not_tracked  # noqa: E402
from model import parse_kv_source  # noqa: E402
from monitor import read_log  # noqa: E402

# -----------------------------------------------------------------------------
out = "out-echo-results"     # the table, the JSON and the plots; results/echo holds the committed ones
runs = "out-echo"            # the runs' checkpoints and logs (not committed)
pretrain_iters = 800         # the dense model's pretraining; adaptation gets adapt_fraction of it
adapt_fraction = 0.1         # adaptation runs train this fraction of pretrain_iters
seeds = "1,2,3"              # pretraining seeds (mean and spread over them)
target = "upper:half"        # the kv_source adaptation converts to
# the model: a 6-layer character-level Llama, so upper:half has 3 consumers to switch in stages
model = "--n_layer=6 --n_head=4 --n_kv_head=2 --n_embd=128 --intermediate_size=384 --block_size=128 --batch_size=16"
decode_tokens = 100          # after a 16-token prompt: fits the 128-token context
device = "cpu"               # every run's --device
threads = 0                  # torch CPU threads, here and in the runs it starts: 0 = 1 on a CPU (apply_threads)
replot = False               # only redraw OUT's plots from OUT/results.json
replace_tracked = False      # let --out overwrite the repository's committed results (results/echo)
# -----------------------------------------------------------------------------
DEFAULTS = settings_from(globals())
settings = dict(DEFAULTS)  # this run's values (main fills them in)


class Progress:
    """A line when a run starts and one when it ends: which run, k of n, the time so far, and the time
    left estimated from the seconds per iteration of the runs trained so far (reused runs cost nothing)."""

    def __init__(self, planned_iters):
        self.n, self.left, self.k = len(planned_iters), sum(planned_iters), 0
        self.t0, self.spent, self.trained = time.time(), 0.0, 0

    def start(self, name, iters, cmd):
        self.k += 1
        print(f"[{self.k}/{self.n}] {name}: {iters} iterations\n    $ {' '.join(cmd)}", flush=True)

    def end(self, iters, seconds, reused, val_loss):
        self.left -= iters
        if not reused:
            self.spent, self.trained = self.spent + seconds, self.trained + iters
        left = f", about {minutes(self.spent / self.trained * self.left)} left" if self.trained else ""
        how = "reused (same settings)" if reused else f"took {seconds:.0f} s"
        loss = f", val loss {val_loss:.4f}" if val_loss is not None else ""
        print(f"[{self.k}/{self.n}] {how}{loss}; {minutes(time.time() - self.t0)} so far{left}", flush=True)


def minutes(seconds):
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


progress = Progress([])


def setting_pairs(args):
    """{key: text} of the --key=value arguments of a train.py command."""
    return dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)


def finished_records(out_dir, args):
    """The log records of the run in out_dir if it finished with exactly these settings; None if there
    is no finished run there. A finished run with other settings is an error: reusing it would report
    another experiment's numbers, and re-running would destroy it."""
    log_path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(log_path):
        return None
    records = read_log(log_path)  # a torn last line is skipped, with a note naming the file
    start = next((r for r in records if r.get("kind") == "start"), None)
    kinds = {r.get("kind") for r in records}
    done = [r for r in records if r.get("kind") == "done"]
    finished = bool(done) and not done[-1].get("stopped")  # a run a signal stopped is not finished
    if start is None or not (finished or ("eval" in kinds and "--eval_only=True" in args)):
        return None  # unfinished: train.py runs it again from scratch
    logged = start.get("config", {})
    differ = [f"{k}={logged.get(k)!r} (this run: {v})" for k, v in setting_pairs(args).items()
              if k not in logged or parse_text(logged[k], v) != logged[k]]
    if differ:
        raise ValueError(f"{out_dir} holds a finished run with other settings ({'; '.join(differ)}): delete it, or "
                         "pass another --runs directory")
    return records


def run(name, args, out_dir):
    """One train.py run; returns its log records (log.jsonl), reusing a finished run of the same settings."""
    cmd = [sys.executable, "train.py", *settings["model"].split(), f"--out_dir={out_dir}",
           f"--device={settings['device']}", "--compile=False", *args]
    iters = 0 if "--eval_only=True" in args else int(setting_pairs(args)["max_iters"])
    progress.start(name, iters, [".venv/bin/python", *cmd[1:]])
    t0 = time.time()
    records = finished_records(out_dir, cmd[2:])
    reused = records is not None
    if not reused:
        os.makedirs(out_dir, exist_ok=True)
        output = os.path.join(out_dir, "train.out")  # the run's full output, shown when it fails
        with open(output, "w") as f:
            r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            with open(output) as f:
                raise ValueError(f"{name} failed (exit {r.returncode}); the end of {output}:\n{f.read()[-3000:]}")
        records = finished_records(out_dir, cmd[2:])
    evals = [r for r in records if r["kind"] == "eval"]
    progress.end(iters, time.time() - t0, reused, evals[-1]["val_loss"] if evals else None)
    return records


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
            records = run(f"pretraining {kv}, seed {seed}", [f"--kv_source={kv}", f"--seed={seed}",
                          f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--eval_interval={eval_every}"], out_dir)
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
    converted = run("adaptation: converted, no training", common + ["--adapt_mode=abrupt", "--eval_only=True"],
                    os.path.join(settings["runs"], f"adapt{iters}-converted-only"))
    results = {"converted, no training": {"val_loss": next(r for r in converted if r["kind"] == "eval")["val_loss"]}}
    for name, args in runs.items():
        slug = name.split(" (")[0].replace(" + ", "-").replace(", ", "-").replace(" ", "-")
        out_dir = os.path.join(settings["runs"], f"adapt{iters}-{slug}")
        results[name] = summarize(run(f"adaptation: {name}", args, out_dir)) | {"out_dir": out_dir}
    return results


@torch.no_grad()
def decoding(checkpoints, n_tokens, repeats=5):
    """Greedy decoding tokens/s at batch 1 (prefill of 16 tokens excluded), repeats interleaved."""
    models = {name: load_model(path)[0] for name, path in checkpoints.items()}
    prompt = torch.randint(0, models[next(iter(models))].config.vocab_size, (1, 16))
    times = decode_rates(models, prompt, n_tokens, repeats)
    return {name: {"decode_tokens_per_s": statistics.median(times[name]),
                   "decode_tokens_per_s_min": min(times[name]), "decode_tokens_per_s_max": max(times[name]),
                   "kv_cache_bytes": model.new_cache(1, model.config.block_size).nbytes(),
                   "kv_source": list(model.config.kv_source)}
            for name, model in models.items()}


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(runs, path, title):
    plt = pyplot()
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


def plot_vs_dense(pre, path, title):
    """Each map's val loss minus dense's, paired by seed and evaluation: the mean over seeds as a line and
    their range shaded. (Absolute curves of all maps lie on top of each other at this scale.)"""
    plt = pyplot()
    dense = {r["seed"]: [point[2] for point in r["curve"]] for r in pre["dense"]}
    fig, ax = plt.subplots(figsize=(7.5, 4))
    ax.axhline(0, color="black", lw=1, label="dense")
    for kv, rs in pre.items():
        if kv == "dense":
            continue
        tokens = [point[0] / 1e6 for point in rs[0]["curve"]][1:]  # from the first evaluation after iteration 0
        diffs = list(zip(*([p[2] - d for p, d in zip(r["curve"], dense[r["seed"]])][1:] for r in rs)))
        line, = ax.plot(tokens, [statistics.mean(d) for d in diffs], marker=".", label=f"{kv}, mean of {len(rs)} seeds")
        ax.fill_between(tokens, [min(d) for d in diffs], [max(d) for d in diffs], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("val loss minus dense's (same seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="shaded: min-max over seeds", title_fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(out, pre, ada, iters, adapt_iters):
    plot_vs_dense(pre, os.path.join(out, "pretrain_val_loss.png"),
                  f"Pretraining from scratch ({iters} iterations): val loss against dense")
    plot_curves([(name, r["curve"]) for name, r in ada.items() if "curve" in r],
                os.path.join(out, "adapt_val_loss.png"), f"Adapting dense -> {settings['target']} ({adapt_iters} iterations)")


def replot_from(out):
    path = os.path.join(out, "results.json")
    if not os.path.isfile(path):
        raise ValueError(f"--replot: {path} does not exist (run the experiment into --out={out} first)")
    with open(path) as f:
        saved = json.load(f)
    settings.update(target=saved["settings"]["target"])
    iters = saved["settings"]["pretrain_iters"]
    plot_all(out, saved["pretraining"], saved["adaptation"], iters, adapt_iters_for(iters, saved["settings"]["adapt_fraction"]))
    print(f"redrew the plots in {out} from {path}")


def adapt_iters_for(pretrain_iters, fraction):
    return max(int(pretrain_iters * fraction), 4)


def results_table(pre, ada, dec, argv, seconds, seeds, iters, adapt_iters):
    dense_val = statistics.mean(r["val_loss"] for r in pre["dense"])
    dense_train_tps = ada["dense, trained on (full training)"]["tokens_per_s"]
    lines = [f"Machine: {os.cpu_count()}-core CPU, torch {torch.__version__}; `.venv/bin/python experiments/echo.py "
             f"{' '.join(argv)}` took {seconds / 60:.0f} min (runs already finished in {settings['runs']} with the "
             "same settings are reused).", "",
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
    return "\n".join(lines) + "\n"


def check_plan(settings):
    """The experiment's own settings, checked before the first run starts (each is one line naming it)."""
    seeds = [t.strip() for t in settings["seeds"].split(",")]
    if not all(t.isdigit() for t in seeds):
        raise ValueError(f"--seeds={settings['seeds']!r}: give comma-separated non-negative integers, like 1,2,3")
    if settings["pretrain_iters"] < 1:
        raise ValueError(f"--pretrain_iters={settings['pretrain_iters']} must be at least 1")
    if not 0 < settings["adapt_fraction"] <= 1:  # also refuses NaN
        raise ValueError(f"--adapt_fraction={settings['adapt_fraction']} must be in (0, 1]: the share of "
                         "pretrain_iters the adaptation runs train")
    n_layer = int(parse_text(0, settings["model"].split("--n_layer=")[1].split()[0])) \
        if "--n_layer=" in settings["model"] else 6
    try:
        parse_kv_source(settings["target"], n_layer)
    except ValueError as e:
        raise ValueError(f"--target={settings['target']}: {e}") from None


def main(argv):
    global progress
    settings.update(vars(configure(DEFAULTS, argv, __doc__)[0]))
    apply_threads(settings["threads"], children=True)
    for key in ("out", "runs"):
        check_not_tracked(settings[key], key, settings["replace_tracked"])
    check_plan(settings)
    out = settings["out"] = os.path.abspath(settings["out"])
    if settings["replot"]:
        return replot_from(out)
    settings["runs"] = os.path.abspath(settings["runs"])
    os.makedirs(out, exist_ok=True)
    t_start = time.time()
    seeds = [int(s) for s in settings["seeds"].split(",")]
    iters = settings["pretrain_iters"]
    adapt_iters = adapt_iters_for(iters, settings["adapt_fraction"])
    progress = Progress([iters] * 3 * len(seeds) + [0] + [adapt_iters] * 5)  # as pretraining() and adaptation() run

    pre = pretraining(seeds, iters)
    dense_ckpt = os.path.join(pre["dense"][0]["out_dir"], "ckpt.pt")
    print(f"calibration of {dense_ckpt} (K/V similarity heatmap into {out})", flush=True)
    subprocess.run([sys.executable, "adapt.py", f"--init_from={dense_ckpt}", "--n_share=3", f"--out={out}"],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    ada = adaptation(dense_ckpt, adapt_iters)
    adapted_ckpt = os.path.join(ada["gradual + distillation (a=0.5, T=2)"]["out_dir"], "ckpt.pt")
    print("decoding speed, dense vs adapted", flush=True)
    dec = decoding({"dense": dense_ckpt, "adapted (gradual + distillation)": adapted_ckpt}, settings["decode_tokens"])
    plot_all(out, pre, ada, iters, adapt_iters)
    text = results_table(pre, ada, dec, argv, time.time() - t_start, seeds, iters, adapt_iters)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"pretraining": pre, "adaptation": ada, "decoding": dec, "settings": settings}, f, indent=1)
    print(text + f"wrote {out}/results.md, results.json and the plots")


if __name__ == "__main__":
    sys.exit(run_script(main))
