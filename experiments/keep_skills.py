"""
Keep what the model knows (issue 21): SmolLM2-135M-Instruct given a smaller KV cache by K/V sharing, distilled
on its own generations and as many tokens of Shakespeare, shipped as a small delta, and measured against the
dense model it came from.

    .venv/bin/python data/smollm2/prepare.py && .venv/bin/python data/shakespeare_smollm2/prepare.py
    .venv/bin/python experiments/keep_skills.py --threads=2     # alone on a 2-core machine: the shipped deltas' recipe
    .venv/bin/python experiments/keep_skills.py --share=22 --reuse=True --threads=2   # one more map; finished phases kept
    .venv/bin/python experiments/keep_skills.py --sharing=attention --share=8,12 --runs=out-keep-skills-attn \
        --out=out-keep-skills-attn-results --beside=results/smollm2-adapted/results.json --threads=2  # EchoAtt maps

Every phase is a command of the project's own (printed, timed, its output in RUNS/<phase>.txt):
  generation    data/smollm2_selfgen/prepare.py: the teacher's own samples (chat turns and free text), a
                held-out split; once for all maps
  mix           data/smollm2_mix/prepare.py: the generated text plus --mix=DIR:TOKENS of another dataset's
                train split (Shakespeare's by default), the distillation's text; once for all maps
  calibration   adapt.py --n_share=N --criterion=logits: which N layers read which earlier layer's K/V (the map);
                each single switch scored by the KL of the logits, once; later maps propose from the saved matrix
                (--calib_search=k: the map grows switch by switch, each of the k best single switches scored with
                those chosen before it: adapt.py --search; on --calib_search_batches batches)
                (--sharing=attention: --criterion=attention, which layers take which earlier layer's pattern)
  conversion    (train_set=consumers_qo) adapt.py --convert_to=MAP --local_iters=..: the abrupt switch, then
                layer-local distillation of the consumers' q_proj/o_proj against the teacher's hidden states
  distillation  train.py: KL(teacher || student) on that text, training train_set:
                  lora          (the default) LoRA adapters on every linear of every layer, over the teacher
                                itself, switched to the map at step 0 (no conversion phase: the adapters
                                are the whole delta, so the base stays the teacher; attention sharers have
                                no q/k_proj to adapt)
                  consumers_qo  only the consumers' q_proj/o_proj (what the change touches, as SwiftKV)
                with --teacher_topk=K the teacher's K likeliest tokens for every batch are made once, in the
                first map's distillation (RUNS/teacher_topK.pt), and every map's steps read them;
                with --lowest_consumer=L every consumer lies at layer L or above and the adapters sit on layers
                L and up only (q, o, gate, up, down), so the backward stops at layer L
  delta         lora.py --adapters (the adapters, fp32 or --adapters_dtype) or delta.py (the changed tensors in bf16):
                OUT/kvN.safetensors; results/smollm2-adapted/ holds the committed ones
  evaluation    evaluate.py --delta: the shipped delta on the base against the teacher, held-out generated
                text, plays and Bible (perplexity ratio, KL, top-1 agreement) and the chat questions
With --reuse=True a phase whose record (RUNS/<phase>.json) shows the same command finished is not run again.
Results: OUT/results.json and OUT/results.md (goals, phase times, the chat table), OUT/pareto.png.
"""

import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configurator import (ConfigError, apply_threads, configure, resolve_device, run_script,  # noqa: E402
                          settings_from, warn_slow_bf16)
from checkpoint import load_checkpoint  # noqa: E402
from model import LlamaConfig  # noqa: E402
from speed import cpu_multiplies_bf16  # noqa: E402

# -----------------------------------------------------------------------------
out = "out-keep-skills-results"  # results.json/.md, pareto.png, the deltas
runs = "out-keep-skills"     # every phase's output and record
teacher = "data/smollm2/smollm2-135m-instruct.pt"
share = "8,15"               # one adapted model per entry: how many of the 30 layers read another's K/V (or pattern)
sharing = "kv"               # what they reuse: 'kv' (an earlier layer's keys and values: the maps ECHO-LLaMA caches
                             # less with) or 'attention' (EchoAtt: an earlier layer's attention pattern over their
                             # own values; adapt.py --criterion=attention maps, train.py --adapt_attn_target)
beside = ""                  # results.json files of other runs of this script, plotted beside this one's
data = "data/smollm2_selfgen"  # where the generated dataset goes (train.bin, val.bin, meta.json)
gen_tokens = 120_000         # generated training tokens (the teacher's own samples)
gen_val_tokens = 65_536      # generated held-out tokens (evaluate.py's 'selfgen' set)
gen_batch_size = 16          # rows sampled together; 32 on a CPU with AMX: ~1.5x the tokens/s of 16 (docs/keep_skills.md)
gen_max_new_tokens = 256     # per generated document
gen_compile = True           # compile the generation's decode step
gen_dtype = "bfloat16"       # the generation's precision: bfloat16 (the shipped deltas' text; 937 s on a Zen 4 where
                             # float32 took 2,219: docs/keep_skills.md, "One map within the hour"; the decoding kernel
                             # reads bf16 weights on any x86) or float32 (the text of the earlier runs)
mix = "data/shakespeare_smollm2:120000"  # DIR:TOKENS: distil on the generated text plus TOKENS tokens of DIR's train
                             # split (same tokenizer, evenly spaced runs; data/smollm2_mix/prepare.py); KL needs no
                             # labels, and the generated text alone is narrow; '' = the generated text alone
prompts = ""                 # chat prompts for the generation, a file with one a line ('' = selfgen.chat_prompts())
criterion = "logits"         # sharing=kv: adapt.py's calibration criterion: 'logits' (each switch scored end to end
                             # by the KL of the logits; ~n_layer^2/6 forwards per batch, computed once for all maps)
                             # or 'kv' (the switched layer's own output: cheap, but blind to the few huge residual
                             # channels); sharing=attention: always 'attention' (cosine of the attention maps)
calib_dataset = "data/smollm2_selfgen"  # the text the map is chosen on ('logits': its train split; 'kv': its val split)
calib_batches = 1
calib_batch_size = 2
calib_dtype = "auto"         # the calibration's precision (adapt.py --dtype): bfloat16 took 104 s against 173 (paired,
                             # one sequence) on the AMX Xeon and proposed the same map (docs/keep_skills.md); auto: as
                             # distill_dtype
calib_search = 16            # sharing=kv: 0 = the map is the matrix's best single switches; k > 0 = adapt.py --search=k:
                             # switch by switch, each the one of the k best single switches whose addition to those
                             # chosen costs the least KL (k x share more forwards; docs/keep_skills.md, "Maps searched");
                             # sharing=attention: not used
calib_search_batches = 8     # calib_search > 0: the search's batches (adapt.py --search_batches; the matrix keeps
                             # calib_batches of them), 0 = calib_batches; the shipped maps: 8 (4,096 tokens)
train_set = "lora"           # what the KL distillation trains: 'lora' or 'consumers_qo' (see above)
lowest_consumer = 0          # sharing=kv, train_set=lora: 0 = consumers anywhere, adapters on every layer; L > 0 = every
                             # consumer at layer L or above (adapt.py --lowest_consumer) and LoRA on q, o, gate, up, down
                             # of layers L and up only (train.py --lora_layers): the backward stops at L. L = 12 with
                             # teacher_topk=64: 1.9-2.1x a dense fine-tune's tokens/s, 1.24-1.37x the shipped delta's KL
                             # (docs/keep_skills.md, "Where the backward stops")
lora_rank = 32               # train_set=lora: every linear's adapter rank (r32 on SmolLM2: 9.8 M values, 19 MB in bf16)
lora_alpha = 64.0
adapters_dtype = "bfloat16"  # train_set=lora: the shipped adapters' dtype, bfloat16 or float32 (twice the bytes)
local_iters = 40             # train_set=consumers_qo: layer-local distillation steps after the switch
local_lr = 1e-3
iters = 400                  # KL distillation steps (iters x batch_size x block_size tokens)
distill_dtype = "auto"       # the distillation's precision: bfloat16 (autocast; fp32 weights and adapters) or float32;
                             # auto: bfloat16 on a GPU or a CPU with bf16 instructions (1.6-1.9x fp32 on a Zen 4),
                             # float32 on other CPUs (a bf16 step took ~19x as long on a Zen 3: docs/keep_skills.md)
teacher_topk = 0             # 0: the teacher's forward runs at every distillation step; k > 0: its k likeliest tokens
                             # for every batch are made once (RUNS/teacher_topK.pt, in the first map's distillation)
                             # and every map's distillation reads them (train.py --distill_cache): the KL over
                             # those k and one bucket for the rest; a step without the teacher's forward
batch_size = 4
block_size = 256
learning_rate = 1e-3         # cosine to a tenth of it after iters // 10 warm-up steps (2e-4 moved the consumers'
                             # q/o too little: docs/keep_skills.md, the trainable-set pilot)
eval_tokens = 65_536         # scored positions per held-out set
eval_sets = "selfgen,plays,bible"  # evaluate.py's names (selfgen reads data/smollm2_selfgen) or .bin paths
eval_block_size = 512        # evaluation window length
eval_dtype = "auto"          # the held-out sets' precision (evaluate.py --dtype; the chat runs in float32): bfloat16
                             # autocast is ~1.6x faster on a Zen 4 (2.6x slower on an AVX2-only Zen 3) and moved the
                             # KV-0.73 figures by <= 0.001 (docs/keep_skills.md); auto: as distill_dtype
chat = True                  # the chat questions
questions = ""               # '' = data/chat_questions.json
reuse = False                # keep phases whose record shows the same command finished
seed = 1337
threads = 0                  # torch CPU threads of every phase: 0 = 1 on a CPU (configurator.apply_threads)
# -----------------------------------------------------------------------------
DEFAULTS = settings_from(globals())
SIMILARITY_FILES = {"kv": "kv_similarity", "logits": "logit_kl_similarity", "attention": "attn_similarity"}  # adapt.py's
TRAIN_SETS = ("lora", "consumers_qo")
SHARING = {"kv": "K/V sharing", "attention": "attention sharing (EchoAtt)"}  # also each row's name: kv8, attention8
LORA_TARGETS = "q,k,v,o,gate,up,down"  # every linear of a layer (a consumer's k/v go with the switch)
UPPER_LORA_TARGETS = "q,o,gate,up,down"  # lowest_consumer > 0: train.py --lora_layers refuses k/v a consumer lacks
PRECISION = {"bfloat16": "bf16 autocast", "float32": "fp32"}
GOALS = {8: (0.01, "teacher - 1"), 15: (0.03, "90% of teacher")}  # the issue's: perplexity ratio bound, chat bound


def progress(text, t0=[time.time()]):
    print(f"[{(time.time() - t0[0]) / 60:5.1f} min] {text}", flush=True)


def phase(name, script, args, s) -> dict:
    """Run `python script args` from the repository root, its output to RUNS/name.txt; returns its record
    (command, wall seconds). With --reuse the record of the same finished command is returned instead."""
    cmd = [script, *args]
    record = os.path.join(s.runs, f"{name}.json")
    if s.reuse and os.path.exists(record):
        with open(record) as f:
            done = json.load(f)
        if done["cmd"] == cmd:
            progress(f"{name}: reused ({done['wall_s']:.0f} s when it ran)")
            return done | {"reused": True}
    progress(f"{name}: .venv/bin/python {' '.join(cmd)}")
    os.makedirs(os.path.dirname(record), exist_ok=True)
    t0 = time.time()
    with open(os.path.join(s.runs, f"{name}.txt"), "w") as log:
        code = subprocess.call([sys.executable, *cmd], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        with open(os.path.join(s.runs, f"{name}.txt")) as f:
            tail = f.read()[-2000:]
        raise ConfigError(f"phase {name} failed (exit {code}); its output ends:\n{tail}")
    done = {"cmd": cmd, "wall_s": round(time.time() - t0, 1)}
    with open(record, "w") as f:
        json.dump(done, f)
    progress(f"{name}: done in {done['wall_s']:.0f} s")
    return done


def proposed_map(s, name):
    """The map adapt.py printed: 'proposed kv_source (or attn_source) sharing N layers: 0,1,...'."""
    with open(os.path.join(s.runs, f"{name}.txt")) as f:
        line = [x for x in f if x.startswith("proposed ")][-1]
    return line.rsplit(":", 1)[1].strip()


def adapt_one(n, s, common, matrix=""):
    """Calibration, conversion, distillation, delta and evaluation of the map sharing n layers; the calibration
    proposes from the saved similarity matrix when one is given (an earlier map's, same criterion and data)."""
    name = f"{s.sharing}{n}"
    d, times = os.path.join(s.runs, name), {}
    times["calibration"] = phase(f"{name}/calibration", "adapt.py", [
        f"--init_from={s.teacher}", f"--dataset={s.calib_dataset}", f"--n_share={n}", f"--batches={s.calib_batches}",
        f"--batch_size={s.calib_batch_size}", f"--block_size={s.block_size}", f"--seed={s.seed}", f"--out={d}", *common,
        *([f"--criterion={s.criterion}", "--split=train"] if s.criterion != "kv" else []),
        *([f"--similarity={matrix}"] if matrix else []), *([f"--search={s.calib_search}"] if s.calib_search else []),
        *([f"--search_batches={s.calib_search_batches}"] if s.calib_search_batches else []),
        *([f"--dtype={s.calib_dtype}"] if s.calib_dtype != "float32" and (s.calib_search or not matrix) else []),
        *([f"--lowest_consumer={s.lowest_consumer}"] if s.lowest_consumer else [])], s)
    map_spec = proposed_map(s, f"{name}/calibration")
    switch = [f"--adapt_target={map_spec}", "--adapt_mode=abrupt"] if s.sharing == "kv" else [f"--adapt_attn_target={map_spec}"]
    trained, delta = os.path.join(d, "distill"), os.path.join(s.out, f"{name}.safetensors")
    upper = range(s.lowest_consumer, len(map_spec.split(",")))  # lowest_consumer > 0: the layers that train
    start, trainable = s.teacher, ["--lora_targets=" + (UPPER_LORA_TARGETS if s.lowest_consumer else LORA_TARGETS),
                                   *([f"--lora_layers={','.join(map(str, upper))}"] if s.lowest_consumer else []),
                                   f"--lora_rank={s.lora_rank}", f"--lora_alpha={s.lora_alpha}"]
    if s.train_set == "consumers_qo":
        start, trainable = os.path.join(d, "converted.pt"), ["--adapt_train_layers=consumers_qo"]
        times["conversion"] = phase(f"{name}/conversion", "adapt.py", [
            f"--init_from={s.teacher}", f"--convert_to={map_spec}", f"--local_iters={s.local_iters}",
            f"--local_lr={s.local_lr}", "--local_train=consumers_qo", f"--dataset={s.data}", "--batches=8",
            f"--batch_size={s.batch_size}", f"--block_size={s.block_size}", f"--seed={s.seed}", f"--out={start}",
            "--overwrite=True", *common], s)
    times["distillation"] = phase(f"{name}/distillation", "train.py", [
        f"--init_from={start}", f"--out_dir={trained}", *switch, *trainable,
        f"--distill_teacher={s.teacher}", "--distill_alpha=1.0",
        *([f"--distill_cache={os.path.join(s.runs, f'teacher_top{s.teacher_topk}.pt')}",
           f"--distill_cache_topk={s.teacher_topk}"] if s.teacher_topk else []),
        f"--dataset={distill_data(s)}", f"--batch_size={s.batch_size}", f"--block_size={s.block_size}",
        f"--dtype={s.distill_dtype}", "--compile=False", f"--max_iters={s.iters}", f"--learning_rate={s.learning_rate}",
        f"--min_lr={s.learning_rate / 10}", f"--warmup_iters={max(1, s.iters // 10)}", "--weight_decay=0.0",
        f"--eval_interval={s.iters}", "--eval_iters=4", f"--log_interval={max(1, s.iters // 10)}",
        f"--seed={s.seed}", "--overwrite=True", *common], s)
    times["delta"] = phase(f"{name}/delta", "lora.py", [f"--init_from={trained}", f"--adapters={delta}",
                                                        f"--adapters_dtype={s.adapters_dtype}"], s) \
        if s.train_set == "lora" else phase(f"{name}/delta", "delta.py", [
            f"--init_from={trained}", f"--base={s.teacher}", f"--out={delta}", "--overwrite=True", *common], s)
    report = os.path.join(d, "eval.json")
    times["evaluation"] = phase(f"{name}/evaluation", "evaluate.py", [
        f"--init_from={s.teacher}", f"--delta={delta}", f"--teacher={s.teacher}", f"--sets={s.eval_sets}",
        f"--tokens={s.eval_tokens}", f"--block_size={s.eval_block_size}", f"--chat={s.chat}", *([f"--questions={s.questions}"] if s.questions else []),
        *([f"--dtype={s.eval_dtype}"] if s.eval_dtype != "float32" else []), f"--out={report}"], s)
    with open(report) as f:
        evaluation = json.load(f)
    new_map = [int(x) for x in map_spec.split(",")]
    kv_source, attn_source = (new_map, None) if s.sharing == "kv" else (None, new_map)
    config = LlamaConfig(n_layer=len(new_map), kv_source=kv_source, attn_source=attn_source)
    return {"kv_source": list(config.kv_source), "attn_source": list(config.attn_source),
            "kv_fraction": (len(config.owners) + len(config.key_layers)) / (2 * config.n_layer),  # model.py's cache
            "delta_bytes": os.path.getsize(delta), "phase_s": {k: v["wall_s"] for k, v in times.items()},
            "evaluation": evaluation}


def distill_data(s):
    """The distillation's text: the generated dataset, or its mix with another (phase 'mix' writes it)."""
    return os.path.join(s.runs, "mix") if s.mix else s.data


def mix_parts(mix):
    """--mix=DIR:TOKENS as (DIR, TOKENS as written); the folder may itself hold a ':'."""
    second, _, tokens = mix.rpartition(":")
    return second, tokens


def check_mix(s):
    second, tokens = mix_parts(s.mix)
    if not second or not tokens.isdigit() or int(tokens) < 1:
        raise ConfigError(f"--mix={s.mix!r}: give DIR:TOKENS, like data/shakespeare_smollm2:120000")
    if not os.path.isfile(os.path.join(second, "train.bin")):
        raise ConfigError(f"--mix={s.mix}: {second} has no train.bin; prepare that dataset first")


def mix_phase(s):
    second, tokens = mix_parts(s.mix)
    return phase("mix", "data/smollm2_mix/prepare.py", [f"--first={s.data}", f"--second={second}",
                                                         f"--tokens={tokens}", f"--out_dir={distill_data(s)}"], s)


def goals(n, row, n_layer=30):
    """The issue's goals for the maps it names (8 and 15 of 30 layers sharing), against what was measured."""
    if n_layer != 30 or n not in GOALS:
        return []
    bound, chat_rule = GOALS[n]
    out = [(f"KV {row['kv_fraction']:.2f}: perplexity within {100 * bound:.0f}% of the teacher on {name}",
            f"ratio {r['ppl_ratio']:.4f}", r["ppl_ratio"] <= 1 + bound) for name, r in row["evaluation"]["sets"].items()]
    chat = row["evaluation"].get("chat")
    if chat:
        need = chat["teacher_correct"] - 1 if n == 8 else 0.9 * chat["teacher_correct"]
        out.append((f"KV {row['kv_fraction']:.2f}: chat accuracy >= {chat_rule}",
                    f"{chat['correct']} vs teacher {chat['teacher_correct']} of {chat['questions']}",
                    chat["correct"] >= need))
    out.append((f"KV {row['kv_fraction']:.2f}: delta <= 25 MB", f"{row['delta_bytes'] / 1e6:.1f} MB",
                row["delta_bytes"] <= 25e6))
    return out


def pareto_plot(series, path):
    """KV cache fraction against the perplexity ratio to the teacher, a panel per held-out set, a line per
    recipe: series = {label: {set name: [(fraction, ratio), ...]}}, each line from the teacher's (1, 1)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sets = list(dict.fromkeys(name for per_set in series.values() for name in per_set))
    fig, axes = plt.subplots(1, len(sets), figsize=(3.6 * len(sets), 3.8), sharex=True, sharey=True, squeeze=False)
    styles = ("o-", "^-", "s--", "x:", "d-.", "v-")  # a recipe keeps its colour and marker in every panel
    for ax, name in zip(axes[0], sets):
        for k, (label, per_set) in enumerate(series.items()):
            if per_set.get(name):
                ax.plot(*zip(*sorted([(1.0, 1.0)] + per_set[name])), styles[k % 6], color=f"C{k}", label=label)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("KV cache fraction")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].invert_xaxis()  # shared: once for all panels
    axes[0][0].set_ylabel("perplexity / teacher's")
    shown = {label: h for ax in axes[0] for h, label in zip(*ax.get_legend_handles_labels())}  # each line once
    fig.legend(list(shown.values()), list(shown), loc="lower center", ncol=2, fontsize=7)
    fig.tight_layout(rect=(0, 0.04 + 0.05 * ((len(shown) + 1) // 2), 1, 1))
    fig.savefig(path, dpi=120)
    return True


def run_series(results) -> tuple:
    """(label, {set name: [(KV cache fraction, perplexity ratio)]}) of one run's results.json."""
    settings = results["settings"]
    trained = "LoRA" if settings.get("train_set", "lora") == "lora" else settings["train_set"]
    per_set = {}
    for row in results["models"].values():
        for name, e in row["evaluation"]["sets"].items():
            per_set.setdefault(name, []).append((row["kv_fraction"], e["ppl_ratio"]))
    text = "generated text + " + os.path.basename(mix_parts(settings["mix"])[0]) if settings.get("mix") else "generated text"
    if settings.get("gen_dtype", "float32") != "float32":  # other samples: another text
        text = f"{PRECISION[settings['gen_dtype']].split()[0]}-{text}"
    precision = PRECISION[settings.get("distill_dtype", "float32")]  # runs before the setting distilled in fp32
    return (f"{SHARING[settings.get('sharing', 'kv')]}: KL on {text}, {trained}, {settings.get('iters', 100)} steps, "
            f"{precision}", per_set)


def old_recipe_series(runs, folder=os.path.join(ROOT, "results", "smollm2-adapted", "old_recipe")) -> dict:
    """The old recipe (experiments/smollm2.py: layer-local distillation, then CE on Shakespeare) on the same
    evaluation, run on a K/V run's maps (docs/keep_skills.md): folder/NAME.json, evaluate.py's reports, at
    the fraction of that run's map of the same name."""
    per_set = {}
    for results in runs:
        for name, row in results["models"].items():
            path = os.path.join(folder, f"{name}.json")
            if results["settings"].get("sharing", "kv") == "kv" and os.path.exists(path):
                with open(path) as f:
                    for set_name, e in json.load(f)["sets"].items():
                        per_set.setdefault(set_name, []).append((row["kv_fraction"], e["ppl_ratio"]))
    return per_set


def old_recipe(path=os.path.join(ROOT, "results", "smollm2", "results.json")):
    """The old recipe's own points (experiments/smollm2.py), perplexity ratio to the imported model on its
    small plays / Bible val batches (4 x 4 x 256 tokens), per KV fraction."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        r = json.load(f)
    dense = r["converted"]["dense"]
    pts = {"plays": [], "bible": []}
    for name, row in r["adapted"].items():
        if name.startswith("local + abrupt"):
            for key, split in (("plays", "val"), ("bible", "other")):
                pts[key].append((row["kv_fraction"], math.exp(row[split] - dense[split])))
    return pts


def plot_series(runs) -> dict:
    """The Pareto plot's lines: {label: {set name: [(fraction, ratio)]}}: the runs (runs of one recipe, say two
    K/V runs, make one line), the old recipe on the same evaluation and on its own batches."""
    series = {}
    for label, per_set in map(run_series, runs):
        for name, points in per_set.items():
            series.setdefault(label, {}).setdefault(name, []).extend(points)
    series["old recipe (local + CE on Shakespeare), same evaluation"] = old_recipe_series(runs)
    series["old recipe, its own 4 x 4 x 256-token val batches"] = old_recipe()
    return {k: v for k, v in series.items() if v}


def plot_all(results, beside, path):
    """This run beside the runs in `beside` (results.json of earlier runs of this script)."""
    return pareto_plot(plot_series([results] + beside), path)


def chat_table(rows, questions=""):
    """Per question: the teacher's answer and each adapted model's, each marked right or wrong (first line,
    cut to 80 characters)."""
    first = next((r["evaluation"]["chat"] for r in rows.values() if r["evaluation"].get("chat")), None)
    if first is None:
        return []
    from fidelity import answer_matches, default_questions_path, load_questions
    expected = {q["question"]: q["expected"] for q in load_questions(questions or default_questions_path())}
    short = lambda a: a.strip().split("\n")[0][:80].replace("|", "/")  # noqa: E731
    mark = lambda right, a: f"{'ok' if right else 'WRONG'}: {short(a)}"  # noqa: E731
    names = list(rows)
    lines = ["| question | teacher | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for i, item in enumerate(first["answers"]):
        q = item["question"]
        cells = [mark(answer_matches(item["teacher_answer"], expected[q]), item["teacher_answer"]) if q in expected
                 else short(item["teacher_answer"])]
        for name in names:
            a = rows[name]["evaluation"]["chat"]["answers"][i]
            cells.append(mark(a["correct"], a["answer"]))
        lines.append(f"| {item['question']} | " + " | ".join(cells) + " |")
    return lines


def recipe(s):
    """What the switch is followed by, in words (results.md)."""
    other, tokens = mix_parts(s.mix)
    text = f"tokens of the generated text and {int(tokens):,} of {other}'s train split" if s.mix else "generated tokens"
    steps = f"{s.iters} KL steps x {s.batch_size} x {s.block_size} {text} at lr {s.learning_rate:g} in {PRECISION[s.distill_dtype]}"
    if s.train_set == "lora":
        where = (f"on q, o, gate, up, down of layers {s.lowest_consumer} and up" if s.lowest_consumer else
                 "on every linear")
        return f"{steps} (LoRA r{s.lora_rank}, alpha {s.lora_alpha:g}, {where}), the adapters as the delta"
    return f"{s.local_iters} layer-local steps, {steps} (consumers' q_proj/o_proj only), a bf16 delta"


def search_words(s):
    if not s.calib_search:
        return ""
    return f" (the map searched among {s.calib_search} switches on {s.calib_search_batches or s.calib_batches} batches)"


def write_results(results, s):
    with open(os.path.join(s.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    rows = results["models"]
    lines = [f"# Keeping what {os.path.basename(s.teacher)} knows with a smaller KV cache", "",
             f"Generation: {s.gen_tokens:,} training + {s.gen_val_tokens:,} held-out tokens of the teacher's own "
             f"samples, sampled in {s.gen_dtype}. Per map: calibration ({s.criterion} criterion, {s.calib_dtype}) on {s.calib_batches} x {s.calib_batch_size} x "
             f"{s.block_size} {s.calib_dataset} tokens{search_words(s)}, the switch, {recipe(s)}; evaluation of base + "
             f"delta against the teacher over {s.eval_tokens:,} positions per set in {s.eval_dtype}. {results['cpu_count']} cores, "
             f"--threads={s.threads}, load average before {', '.join(f'{x:.2f}' for x in results['load_average_before'])}.",
             "", f"{SHARING[s.sharing][0].upper()}{SHARING[s.sharing][1:]}. KV cache: the fraction of the dense model's cache the model keeps (values for "
             "the K/V owners, keys for those of them that compute their own attention pattern).",
             "", "| KV cache | set | ppl ratio | KL | top-1 agreement |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        figures = dict(r["evaluation"]["sets"])
        on_answers = (r["evaluation"].get("chat") or {}).get("on_teacher_answers")  # both models read them
        if on_answers:
            figures["the teacher's chat answers"] = on_answers
        for set_name, e in figures.items():
            lines.append(f"| {r['kv_fraction']:.2f} ({name}) | {set_name} | {e['ppl_ratio']:.4f} | {e['kl']:.4f} | "
                         f"{e['agreement']:.4f} |")
    lines += ["", "| KV cache | chat right | teacher right | answers equal to the teacher's | delta MB |",
              "|---|---|---|---|---|"]
    for name, r in rows.items():
        c = r["evaluation"].get("chat") or {}
        lines.append(f"| {r['kv_fraction']:.2f} ({name}) | {c.get('correct', '')} | {c.get('teacher_correct', '')} | "
                     f"{c.get('same_as_teacher', '')} | {r['delta_bytes'] / 1e6:.1f} |")
    phases = ["calibration", "conversion", "distillation", "delta", "evaluation"]
    reused = " (reused: the time of the run that made it)" if results.get("generation_reused") else ""
    mixed = f"; mix, once: {results['mix_s']:.0f}" if "mix_s" in results else ""
    lines += ["", f"Phase wall times, seconds (generation, once: {results['generation_s']:.0f}{reused}{mixed}):", "",
              "| KV cache | " + " | ".join(phases) + " | total with generation |", "|---" * (len(phases) + 2) + "|"]
    for name, r in rows.items():
        t = r["phase_s"]
        lines.append(f"| {r['kv_fraction']:.2f} ({name}) | " + " | ".join(f"{t[p]:.0f}" if p in t else "-" for p in phases) +
                     f" | {sum(t.values()) + results['generation_s']:.0f} |")
    if results["goals"]:
        lines += ["", "Goals:", "", "| goal | measured | met |", "|---|---|---|"]
        lines += [f"| {g} | {m} | {'yes' if ok else 'MISSED'} |" for g, m, ok in results["goals"]]
    else:
        lines += ["", "Goals: the issue sets them for K/V sharing in 8 and 15 of 30 layers only."]
    lines += ["", "Chat answers (greedy, first line):", "", *chat_table(rows, s.questions)]
    with open(os.path.join(s.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def check_teacher(s):
    path = os.path.join(ROOT, s.teacher) if not os.path.isabs(s.teacher) else s.teacher  # the phases run in ROOT
    if not os.path.isfile(path):
        raise ConfigError(f"--teacher={s.teacher}: no such checkpoint; run .venv/bin/python data/smollm2/prepare.py")
    config = load_checkpoint(path, mmap=True)["model_config"] if s.teacher_topk or s.lowest_consumer else {}
    vocab = config.get("vocab_size", 1)
    if not 0 <= s.teacher_topk < vocab:
        raise ConfigError(f"--teacher_topk={s.teacher_topk}: give 0 (the teacher runs every step) or 1.."
                          f"{vocab - 1} (the teacher's vocabulary has {vocab} tokens)")
    most = max(int(x) for x in s.share.split(",") if x.strip())
    if s.lowest_consumer and most > config["n_layer"] - s.lowest_consumer:
        raise ConfigError(f"--lowest_consumer={s.lowest_consumer} leaves {config['n_layer'] - s.lowest_consumer} of the "
                          f"teacher's {config['n_layer']} layers to share, fewer than --share={most}: lower either")


def check_map_settings(s, explicit):
    """How the maps are chosen: a ConfigError naming the setting; sharing=attention sets its criterion."""
    if s.sharing == "attention":
        if s.train_set != "lora" or ("criterion" in explicit and s.criterion != "attention"):
            wrong = "train_set=consumers_qo (K/V consumers' q/o)" if s.train_set != "lora" else f"criterion={s.criterion}"
            raise ConfigError(f"--sharing=attention with --{wrong}: attention maps come from the 'attention' "
                              "criterion and train LoRA adapters; drop that setting")
        s.criterion = "attention"
        if "calib_search" in explicit and s.calib_search:
            raise ConfigError(f"--calib_search={s.calib_search} searches K/V maps: drop it with --sharing=attention")
        s.calib_search = 0  # the default search is for K/V maps (its batches are dropped below)
    elif s.criterion == "attention":
        raise ConfigError("--criterion=attention proposes attention maps: give --sharing=attention too")
    if s.lowest_consumer < 0 or (s.lowest_consumer and (s.sharing != "kv" or s.train_set != "lora")):
        raise ConfigError(f"--lowest_consumer={s.lowest_consumer}: give 0, or a layer L > 0 with --sharing=kv and "
                          f"--train_set=lora (K/V consumers from L up, adapters on layers L and up)")
    if s.calib_search < 0:
        raise ConfigError(f"--calib_search={s.calib_search}: give 0 (the best single switches) or k >= 1 candidates")
    if not s.calib_search:  # the default search batches go with the default search
        if s.calib_search_batches and "calib_search_batches" in explicit:
            raise ConfigError(f"--calib_search_batches={s.calib_search_batches} applies only with --calib_search=K")
        s.calib_search_batches = 0
    if s.calib_search_batches and s.calib_search_batches < s.calib_batches:
        raise ConfigError(f"--calib_search_batches={s.calib_search_batches} is below --calib_batches={s.calib_batches}: "
                          "the search's batches include the matrix's; give at least as many, or 0 for the same")


def main(argv):
    s, explicit = configure(DEFAULTS, argv, __doc__, {"criterion": tuple(SIMILARITY_FILES), "train_set": TRAIN_SETS,
                                                      "sharing": tuple(SHARING), "distill_dtype": ("auto", *PRECISION),
                                                      "gen_dtype": tuple(PRECISION), "eval_dtype": ("auto", *PRECISION),
                                                      "calib_dtype": ("auto", *PRECISION),
                                                      "adapters_dtype": ("float32", "bfloat16")})
    device_type = resolve_device("auto").split(":")[0]  # where the phases run (each resolves device=auto alike)
    auto = "bfloat16" if device_type != "cpu" or cpu_multiplies_bf16() else "float32"
    for key in ("distill_dtype", "calib_dtype", "eval_dtype"):
        setattr(s, key, auto if getattr(s, key) == "auto" else getattr(s, key))
    check_map_settings(s, explicit)
    unused = sorted(explicit & ({"local_iters", "local_lr"} if s.train_set == "lora" else
                                {"lora_rank", "lora_alpha", "adapters_dtype"}))
    if unused:
        raise ConfigError(f"--{', --'.join(unused)} appl{'ies' if len(unused) == 1 else 'y'} only with --train_set="
                          f"{'consumers_qo' if s.train_set == 'lora' else 'lora'}, not {s.train_set}: drop it or change the set")
    shares = [int(x) for x in s.share.split(",") if x.strip()]
    if not shares or min(shares) < 1:
        raise ConfigError(f"--share={s.share!r}: give layer counts >= 1, like 8,15")
    check_teacher(s)
    beside = []
    for path in [p for p in s.beside.split(",") if p.strip()]:
        try:
            with open(path) as f:
                beside.append(json.load(f))
            run_series(beside[-1])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--beside={path}: not a results.json of this script ({type(e).__name__}: {e})") from None
    if s.mix:
        check_mix(s)
    for key in ("distill_dtype", "eval_dtype", "calib_dtype"):  # not gen_dtype: the decoding kernel reads bf16 weights on any x86
        warn_slow_bf16(getattr(s, key), device_type, key)
    s.threads = apply_threads(s.threads, children=True)
    os.makedirs(s.out, exist_ok=True)
    common = [f"--threads={s.threads}"]
    results = {"settings": vars(s), "load_average_before": os.getloadavg(), "cpu_count": os.cpu_count(), "models": {}}
    generation = phase("generation", "data/smollm2_selfgen/prepare.py", [
        f"--init_from={s.teacher}", f"--out_dir={s.data}", f"--tokens={s.gen_tokens}", f"--val_tokens={s.gen_val_tokens}", f"--seed={s.seed}",
        f"--batch_size={s.gen_batch_size}", f"--max_new_tokens={s.gen_max_new_tokens}", f"--compile={s.gen_compile}",
        *([f"--dtype={s.gen_dtype}"] if s.gen_dtype != "float32" else []),  # older records hold no --dtype
        *([f"--prompts={s.prompts}"] if s.prompts else [])], s)
    results["generation_s"], results["generation_reused"] = generation["wall_s"], generation.get("reused", False)
    results["goals"] = []
    if s.mix:
        results["mix_s"] = mix_phase(s)["wall_s"]
    for k, n in enumerate(shares):
        matrix = os.path.join(s.runs, f"{s.sharing}{shares[0]}", f"{SIMILARITY_FILES[s.criterion]}.pt") if k else ""
        row = adapt_one(n, s, common, matrix)
        results["models"][f"{s.sharing}{n}"] = row
        results["goals"] += goals(n, row, len(row["kv_source"])) if s.sharing == "kv" else []
        write_results(results, s)  # after each model: a later failure keeps what finished
    plotted = plot_all(results, beside, os.path.join(s.out, "pareto.png"))
    progress(f"wrote {s.out}/results.json, results.md" + (" and pareto.png" if plotted else
                                                          "; no pareto.png: matplotlib is missing (./setup.sh --dev)"))
    return results


if __name__ == "__main__":
    sys.exit(run_script(main))
