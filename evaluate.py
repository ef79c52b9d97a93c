"""
Evaluate a model against its teacher (fidelity.py): how much of what the teacher knows the student kept.

    .venv/bin/python evaluate.py --init_from=out-adapted/ckpt.pt --teacher=data/smollm2/smollm2-135m-instruct.pt
    .venv/bin/python evaluate.py --init_from=STUDENT --teacher=TEACHER --sets=plays --tokens=8192 --chat=False
    .venv/bin/python evaluate.py --init_from=BASE --delta=results/smollm2-adapted/kv8.safetensors --teacher=BASE
    .venv/bin/python evaluate.py --init_from=BASE --delta=DELTA --teacher=BASE --sets=selfgen --tokens=8192 --layers=8192 --chat=False

Held-out sets (--sets, comma-separated; each read over --tokens positions in fixed, evenly spaced windows):
  selfgen   data/smollm2_selfgen/val.bin     the teacher's own samples on held-out prompts (its prepare.py)
  plays     data/shakespeare_smollm2/val.bin  four plays never trained on (data/shakespeare_smollm2/prepare.py)
  bible     data/shakespeare_smollm2/other.bin the King James Bible, a text of another kind (same prepare.py)
  or a path to a .bin file whose directory holds its meta.json.
Per set: each model's perplexity, their ratio student / teacher, the mean KL(teacher || student) per token
and top-1 agreement. Chat (--chat): greedy answers to --questions (data/chat_questions.json), accuracy (an
expected string appears in the answer) for both, how many of the student's answers equal the teacher's, and
the held-out figures over the teacher's answers (both models reading the teacher's answer tokens: KL and
agreement on the very positions the greedy answers are made from: a figure that moves by degrees where the count
flips with an answer's first different token).
By layer (--layers=N, off at 0): over N positions of the first set, the KL of hybrids of the two models, a forward
each per layer and kind (fidelity.compare_layers): the teacher with one of the student's layers, and the student's
layers up to l under the teacher's: where in depth the student's distance arises.
Everything goes to --out (JSON); a summary is printed.
"""

import json
import os
import sys
import time
from functools import partial

import torch

from checkpoint import load_model
from configurator import (DTYPES, autocast, configure, resolve_device, resolve_dtype, run_script, settings_from,
                          warn_slow_bf16)
from dataset import dataset_dir, load_meta, open_tokens
from delta import load_with_delta
from fidelity import (chat_prompts, chat_report, compare_layers, compare_on_replies, compare_on_windows,
                      default_questions_path, fixed_windows, greedy_replies, load_questions)
from guards import trained_tokenizer
from speed import linears_in
from tokenizer import HFTokenizer, tokenizer_identity

# -----------------------------------------------------------------------------
init_from = ""               # the student: a checkpoint file or a training out_dir
delta = ""                   # a delta file (delta.py, lora.py --adapters) of init_from: the student is base + delta
teacher = ""                 # the teacher: a checkpoint file or a training out_dir
sets = "selfgen,plays,bible"  # held-out sets ('' = none)
tokens = 65_536              # positions scored per set
block_size = 512             # window length
batch_size = 1               # windows per forward pass: the full-vocabulary logits of one chunk
chat = True                  # answer the chat questions
layers = 0                   # > 0: per-layer KL over this many positions of the first set (2 x n_layer forwards)
questions = ""               # '' = data/chat_questions.json
chat_batch_size = 16
max_new_tokens = 48          # per chat answer
device = "auto"
dtype = "float32"            # float32, or bfloat16 (autocast for the held-out sets; chat runs in float32)
out = "eval.json"
# -----------------------------------------------------------------------------
DEFAULTS = settings_from(globals())
CHOICES = {"dtype": ("float32", "bfloat16")}
SETS = {"selfgen": ("smollm2_selfgen", "val.bin"), "plays": ("shakespeare_smollm2", "val.bin"),
        "bible": ("shakespeare_smollm2", "other.bin")}


def resolve_set(name):
    """(directory, file) of a held-out set, with the prepare script to run when it is missing."""
    if name in SETS:
        d, f = dataset_dir(SETS[name][0]), SETS[name][1]
        hint = f"run `.venv/bin/python data/{SETS[name][0]}/prepare.py` first"
    elif name.endswith(".bin"):
        d, f, hint = os.path.dirname(name) or ".", os.path.basename(name), "check the path"
    else:
        raise ValueError(f"--sets: unknown set {name!r}: use {', '.join(SETS)} or a path to a .bin file")
    if not os.path.isfile(os.path.join(d, f)) or not os.path.isfile(os.path.join(d, "meta.json")):
        raise ValueError(f"--sets: {name} needs {os.path.join(d, f)} and {os.path.join(d, 'meta.json')}: {hint}")
    return d, f


def check(s):
    if not s.init_from or not s.teacher:
        raise ValueError("pass both --init_from=STUDENT and --teacher=TEACHER (the same file to measure a model "
                         "against itself)")
    for key in ("tokens", "block_size", "batch_size", "chat_batch_size", "max_new_tokens"):
        if getattr(s, key) < 1:
            raise ValueError(f"--{key} must be at least 1, got {getattr(s, key)}")
    if s.delta and not os.path.isfile(s.delta):
        raise ValueError(f"--delta={s.delta}: no such file (delta.py writes one from an adapted model and its base)")
    if not s.out or os.path.isdir(s.out):  # found now, not after the evaluation's minutes
        raise ValueError(f"--out={s.out!r} must name a .json file to write, not a directory")
    names = [n for n in s.sets.split(",") if n]
    if not names and not s.chat:
        raise ValueError("nothing to evaluate: give --sets or --chat=True")
    if s.layers < 0 or (s.layers and not names):
        raise ValueError(f"--layers={s.layers}: give a number of positions (0: off) and a set in --sets to read "
                         "them from")
    found = {n: resolve_set(n) for n in names}
    qs = load_questions(s.questions or default_questions_path()) if s.chat else None
    return found, qs


def check_pair(student_ckpt, teacher_ckpt, s):
    """Student and teacher must give token ids the same meaning."""
    mine, theirs = trained_tokenizer(student_ckpt), trained_tokenizer(teacher_ckpt)
    if mine is None or theirs is None or mine[1] != theirs[1]:
        raise ValueError(f"{s.init_from} and {s.teacher} do not share a known tokenizer ({mine and mine[0]}; "
                         f"{theirs and theirs[0]}): their predictions cannot be compared token by token")
    return theirs


def sets_autocast(s, dev):
    """The held-out forwards' autocast (a context factory), None in float32."""
    return partial(autocast, dev.split(":")[0], s.dtype) if s.dtype != "float32" else None


def held_out(student, teacher, found, identity, s, dev):
    results = {}
    amp = sets_autocast(s, dev)
    for name, (d, f) in found.items():
        meta = load_meta(d)
        if tokenizer_identity(meta) != identity[1]:
            raise ValueError(f"set {name} ({d}) is not tokenized with {identity[0]}: prepare it with the models' "
                             "tokenizer")
        windows = fixed_windows(open_tokens(d, f.removesuffix(".bin"), meta), s.tokens, s.block_size)
        t0 = time.perf_counter()
        results[name] = {**compare_on_windows(student, teacher, windows, s.batch_size, amp, meta.get("eot_token")),
                         "file": os.path.join(d, f), "seconds": round(time.perf_counter() - t0, 1)}
        r = results[name]
        print(f"{name:>8}: {r['tokens']:,} tokens ({r['left_out']} after a document's end left out)  "
              f"ppl {r['student_ppl']:.3f} / teacher {r['teacher_ppl']:.3f} = {r['ppl_ratio']:.4f}  KL {r['kl']:.4f}  "
              f"top-1 agreement {r['agreement']:.4f}", flush=True)
    return results


def by_layer(student, teacher, found, s, dev):
    name, (d, f) = next(iter(found.items()))
    meta = load_meta(d)
    windows = fixed_windows(open_tokens(d, f.removesuffix(".bin"), meta), s.layers, s.block_size)
    amp = sets_autocast(s, dev)
    t0 = time.perf_counter()
    result = compare_layers(student, teacher, windows, amp, meta.get("eot_token"))
    print(f"by layer, {name}, {result['positions']:,} positions: KL of the teacher with the student's layer "
          "alone / of the student's layers up to it under the teacher's")
    kv, attn = student.config.kv_source, student.config.attn_source
    for l, (alone, up_to) in enumerate(zip(result["alone"], result["up_to"])):
        show = [f"{x:.4f}" if x is not None else "  -   " for x in (alone, up_to)]
        print(f"  layer {l:3d}  K/V from {kv[l]:3d}  pattern from {attn[l]:3d}  {show[0]}  {show[1]}")
    return result | {"set": name, "seconds": round(time.perf_counter() - t0, 1)}


def chat_eval(student, teacher, student_ckpt, teacher_ckpt, qs, s):
    ckpt = student_ckpt if student_ckpt.get("chat_template") else teacher_ckpt
    hf = ckpt.get("hf_config") or teacher_ckpt.get("hf_config") or {}
    if not ckpt.get("chat_template") or not ckpt.get("tokenizer_json") or not isinstance(hf.get("eos_token_id"), int):
        raise ValueError("--chat needs a chat template, a tokenizer.json and an eos token id, which neither "
                         "checkpoint carries: pass --chat=False")
    tok = HFTokenizer.load(text=ckpt["tokenizer_json"], name="the checkpoint's tokenizer")
    prompts = chat_prompts(tok, ckpt["chat_template"], qs, hf.get("bos_token_id"), hf["eos_token_id"])
    ask = partial(greedy_replies, prompts=prompts, eos=hf["eos_token_id"], batch_size=s.chat_batch_size,
                  max_new_tokens=s.max_new_tokens)
    t0 = time.perf_counter()
    teacher_replies = ask(teacher)
    replies = ask(student)
    report = chat_report(qs, [tok.decode(r).strip() for r in replies], [tok.decode(r).strip() for r in teacher_replies])
    report["on_teacher_answers"] = on = compare_on_replies(student, teacher, prompts, teacher_replies)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"    chat: {report['correct']} / {report['questions']} right (teacher {report['teacher_correct']}), "
          f"{report['kept']} of the teacher's right answers kept, {report['same_as_teacher']} answers equal "
          f"the teacher's; over the teacher's {on['tokens']:,} answer tokens ppl ratio {on['ppl_ratio']:.4f}  "
          f"KL {on['kl']:.4f}  top-1 agreement {on['agreement']:.4f}", flush=True)
    return report


def main(argv):
    s, _ = configure(DEFAULTS, argv, __doc__, CHOICES)
    found, qs = check(s)
    dev = resolve_device(s.device)
    warn_slow_bf16(s.dtype, dev.split(":")[0])
    student, student_ckpt = load_with_delta(s.init_from, s.delta) if s.delta else load_model(s.init_from)
    teacher, teacher_ckpt = load_model(s.teacher)
    identity = check_pair(student_ckpt, teacher_ckpt, s)
    for model, who in ((student, "the student"), (teacher, "the teacher")):
        if s.block_size > model.config.block_size:
            raise ValueError(f"--block_size={s.block_size} is longer than {who}'s context ({model.config.block_size} "
                             "positions; train.py keeps the block_size it trained at): pass a --block_size within it, "
                             "or ship the run as a delta on its base (delta.py), which reads as far as the base")
    if s.layers and student.config.n_layer != teacher.config.n_layer:
        raise ValueError(f"--layers: the student has {student.config.n_layer} layers and the teacher "
                         f"{teacher.config.n_layer}: per-layer figures swap layers between models of one depth")
    for m in (student, teacher):
        m.to(dev).eval().requires_grad_(False)
    result = {"student": s.init_from, "delta": s.delta, "teacher": s.teacher, "settings": vars(s)}
    with torch.inference_mode():
        with linears_in(student, DTYPES[s.dtype]), linears_in(teacher, DTYPES[s.dtype]):  # the chat: float32
            result["sets"] = held_out(student, teacher, found, identity, s, dev)
            if s.layers:
                result["layers"] = by_layer(student, teacher, found, s, dev)
        if s.chat:
            result["chat"] = chat_eval(student, teacher, student_ckpt, teacher_ckpt, qs, s)
    with open(s.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {s.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
