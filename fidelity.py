"""
How faithfully a student (an adapted model) reproduces its teacher: the library of evaluate.py.

  held-out text   student and teacher read the same fixed windows of a token file; per token position
                  NLL of the true next token under each (perplexity = exp of the mean), KL(teacher || student)
                  of the two next-token distributions, and whether their top-1 tokens agree
  chat            greedy answers to data/chat_questions.json; an answer is right when one of the question's
                  expected strings appears in it (answer_matches), and the student's answers are compared
                  with the teacher's, character for character; the held-out figures again over the teacher's
                  answers alone, both models reading them (compare_on_replies)
  by layer        the KL again from hybrids of the two (compare_layers): the teacher with one of the student's
                  layers, and the student's layers up to l under the teacher's: where in depth the distance arises

Logits are reduced to sums one batch of windows at a time (compare_logits): no (tokens, vocab) array outlives
its chunk, so 64k tokens at a 49k vocabulary cost the memory of one batch, not 12 GB.
"""

import copy
import json
import os
import re

import numpy as np
import torch
import torch.nn.functional as F

from selfgen import chat_ids, generate_rows

SUMS = ("tokens", "student_nll", "teacher_nll", "kl", "agree")


COMPARE_ROWS = 8  # rows of logits held in float32 at once (1.5 MiB each at a 49k vocabulary): the passes over
                  # a chunk then stay in the core's cache. One 512-token window's comparison took 463-478 ms
                  # in one piece, 256-259 ms in chunks of 8; evaluate.py's 65,536-token set 128.7 s against
                  # 118.2 s (2-core Xeon, docs/keep_skills.md)


def compare_logits(student_logits, teacher_logits, targets, keep=None):
    """Sums over the rows of (N, vocab) logits and (N,) next tokens: tokens, each model's NLL of the targets,
    KL(teacher || student) = sum_v p_t(v) (log p_t(v) - log p_s(v)), and rows whose argmaxes agree.
    keep: an (N,) bool mask of the rows to count (None: all). In float32 whatever the logits' dtype,
    COMPARE_ROWS rows at a time."""
    if keep is not None and not keep.all():  # a copy of the rows kept: only where some are left out
        student_logits, teacher_logits, targets = student_logits[keep], teacher_logits[keep], targets[keep]
    sums = dict.fromkeys(SUMS, 0.0)
    for r in range(0, len(targets), COMPARE_ROWS):
        zs, zt, y = student_logits[r:r + COMPARE_ROWS], teacher_logits[r:r + COMPARE_ROWS], targets[r:r + COMPARE_ROWS]
        log_s = F.log_softmax(zs, dim=-1, dtype=torch.float32)
        log_t = F.log_softmax(zt, dim=-1, dtype=torch.float32)
        sums["tokens"] += y.numel()
        sums["student_nll"] -= log_s.gather(-1, y[:, None]).sum().item()
        sums["teacher_nll"] -= log_t.gather(-1, y[:, None]).sum().item()
        sums["kl"] += F.kl_div(log_s, log_t, log_target=True, reduction="sum").item()
        # max's indices are argmax's (the first of tied maxima) at 0.47 ms for 8 bf16 rows against 1.24 (the Xeon)
        sums["agree"] += (zs.max(-1).indices == zt.max(-1).indices).sum().item()
    return sums


def summarize(sums):
    """Per-token figures from compare_logits' sums (added over chunks)."""
    n = int(sums["tokens"])
    student_ppl, teacher_ppl = float(np.exp(sums["student_nll"] / n)), float(np.exp(sums["teacher_nll"] / n))
    return {"tokens": n, "student_ppl": student_ppl, "teacher_ppl": teacher_ppl,
            "ppl_ratio": student_ppl / teacher_ppl, "kl": sums["kl"] / n, "agreement": int(sums["agree"]) / n}


def fixed_windows(tokens, n_tokens, block_size):
    """Windows of block_size + 1 tokens (input and its next tokens) that predict about n_tokens positions in
    all, evenly spaced over the file (the same for every model; a file's whole range, not just its start).
    ValueError when the file holds fewer tokens than asked for."""
    n_windows = max(1, -(-n_tokens // block_size))
    if len(tokens) < n_windows * block_size + 1:
        raise ValueError(f"{len(tokens):,} tokens are fewer than the {n_windows * block_size + 1:,} asked for "
                         f"({n_windows} windows of {block_size}): lower --tokens or generate more")
    starts = np.linspace(0, len(tokens) - block_size - 1, n_windows).astype(np.int64)
    return np.stack([np.asarray(tokens[s:s + block_size + 1], dtype=np.int64) for s in starts])


@torch.no_grad()
def compare_on_windows(student, teacher, windows, batch_size=1, autocast=None, document_end=None):
    """summarize() of student against teacher over the windows (from fixed_windows), batch_size windows
    at a time. autocast: a context manager factory (e.g. configurator.autocast's) or None. document_end: the
    token that ends a document in the file (its meta's eot_token); the positions that read it predict the
    next document's first token, which is the file's order, not the text, so they are left out (counted as
    "left_out"): a student that learnt how the file joins its samples would gain perplexity there alone."""
    sums, left_out = dict.fromkeys(SUMS, 0.0), 0
    device = student.embed_tokens.weight.device
    for b in range(0, len(windows), batch_size):
        chunk = torch.from_numpy(windows[b:b + batch_size]).to(device)
        x, y = chunk[:, :-1], chunk[:, 1:]
        keep = None if document_end is None else (x != document_end).reshape(-1)
        left_out += 0 if keep is None else int((~keep).sum())
        with autocast() if autocast else torch.no_grad():
            s_logits, _ = student(x)
            t_logits, _ = teacher(x)
        for k, v in compare_logits(s_logits.flatten(0, 1), t_logits.flatten(0, 1), y.reshape(-1), keep).items():
            sums[k] += v
        del s_logits, t_logits
    return summarize(sums) | {"left_out": left_out}


# -----------------------------------------------------------------------------
# where in depth: hybrids of student and teacher, layer by layer


def hybrid(student, teacher, take):
    """The teacher with the student's blocks at the layers in `take`, sharing their modules (nothing is copied).
    A block takes its K/V and attention pattern from its source layer through the forward's hand-over, so the
    student's consumer attends over whatever the mix's block at its source makes; None where that block makes
    none (a source layer that is a consumer in the mix)."""
    blocks = [student.layers[i] if i in take else teacher.layers[i] for i in range(len(teacher.layers))]
    if any(blocks[b.kv_source].kv_source != b.kv_source or blocks[b.attn_source].attn_source != b.attn_source
           for b in blocks):
        return None
    mix = copy.copy(teacher)
    mix._modules = dict(teacher._modules, layers=torch.nn.ModuleList(blocks))  # copy.copy would share the table
    return mix


@torch.no_grad()
def compare_layers(student, teacher, windows, autocast=None, document_end=None):
    """Mean KL(teacher || hybrid) per layer l over the windows: "alone", the teacher with the student's layer l
    in place of its own; "up_to", the student's layers 0..l under the teacher's above (the last is the student,
    with the teacher's embedding, final norm and head). None where hybrid() cannot mix. A layer's alone figure
    is what it costs by itself; the rise of up_to at it, what it adds where the student's layers below feed it.
    document_end: as compare_on_windows', the positions that read it left out ("positions": those counted)."""
    n = len(teacher.layers)
    if len(student.layers) != n:
        raise ValueError(f"per-layer figures need as many layers in both models ({len(student.layers)} against {n})")
    mixes = {(kind, l): hybrid(student, teacher, {l} if kind == "alone" else set(range(l + 1)))
             for kind in ("alone", "up_to") for l in range(n)}
    sums, positions = dict.fromkeys(mixes, 0.0), 0
    device = teacher.embed_tokens.weight.device
    for window in windows:
        chunk = torch.from_numpy(window[None]).to(device)
        x, y = chunk[:, :-1], chunk[0, 1:]
        keep = None if document_end is None else x[0] != document_end
        with autocast() if autocast else torch.no_grad():
            t_logits = teacher(x)[0][0]
            for key, mix in mixes.items():
                if mix is not None:
                    sums[key] += compare_logits(mix(x)[0][0], t_logits, y, keep)["kl"]
        positions += y.numel() if keep is None else int(keep.sum())
    return {kind: [None if mixes[kind, l] is None else sums[kind, l] / positions for l in range(n)]
            for kind in ("alone", "up_to")} | {"positions": positions}


# -----------------------------------------------------------------------------
# the chat questions


def normalize(text):
    return re.sub(r"\s+", " ", text).strip().lower()


def answer_matches(answer, expected):
    """Whether one of the expected strings appears in the answer: case-insensitive, runs of whitespace as
    one space, and whole words only at its ends: "4" is in "It is 4." but not in "14", "-18.4" or "4.5" (a
    decimal point or thousands comma between digits joins them into one number); "Paris" is in "Paris."."""
    text = normalize(answer)
    for want in expected:
        w = normalize(want)
        if w and re.search(r"(?<![0-9a-z])(?<![0-9][.,])" + re.escape(w) + r"(?![0-9a-z])(?![.,][0-9])", text):
            return True
    return False


def load_questions(path):
    """The question set: a JSON list of {"category", "question", "expected": [strings]}. ValueError naming
    the first bad entry."""
    try:
        with open(path, encoding="utf-8") as f:
            items = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the chat questions {path}: {e}") from None
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected a non-empty JSON list of questions")
    for i, q in enumerate(items):
        ok = isinstance(q, dict) and isinstance(q.get("question"), str) and isinstance(q.get("category"), str) \
            and isinstance(q.get("expected"), list) and q["expected"] and all(isinstance(e, str) and e.strip()
                                                                                for e in q["expected"])
        if not ok:
            raise ValueError(f"{path}: entry {i} needs 'category', 'question' and a non-empty 'expected' list of "
                             f"strings, got {q!r}")
    return items


def chat_prompts(tok, template, questions, bos, eos):
    """Each question as one user turn, token ids ready for the assistant's reply."""
    return [chat_ids(tok, template, q["question"], bos, eos) for q in questions]


def greedy_replies(model, prompts, eos, batch_size=16, max_new_tokens=48):
    """Greedy replies (token ids, eos included when produced), batch_size prompts at a time; prompts of
    similar length are batched together, which saves the forced prompt steps of generate_rows."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies = [None] * len(prompts)
    for b in range(0, len(order), batch_size):
        rows = order[b:b + batch_size]
        for i, reply in zip(rows, generate_rows(model, [prompts[i] for i in rows], max_new_tokens, 0.0, None, eos)):
            replies[i] = reply
    return replies


@torch.no_grad()
def compare_on_replies(student, teacher, prompts, replies):
    """summarize() over the reply positions only, teacher-forced: each prompt + reply (e.g. the teacher's greedy
    answer) read by both models, the logits that predict each reply token compared: it moves by degrees, where a
    count of right answers flips with the first token a greedy answer takes differently."""
    sums = dict.fromkeys(SUMS, 0.0)
    device = student.embed_tokens.weight.device
    for prompt, reply in zip(prompts, replies):
        if not reply:
            continue
        ids = torch.tensor(prompt + reply, device=device)[None]
        first = len(prompt) - 1  # the position whose logits predict the reply's first token
        s_logits, _ = student(ids[:, :-1])
        t_logits, _ = teacher(ids[:, :-1])
        for k, v in compare_logits(s_logits[0, first:], t_logits[0, first:], ids[0, first + 1:]).items():
            sums[k] += v
    return summarize(sums)


def chat_report(questions, answers, teacher_answers=None):
    """Accuracy overall and per category, and (with the teacher's answers) how many are the teacher's exactly."""
    right = [answer_matches(a, q["expected"]) for q, a in zip(questions, answers)]
    report = {"questions": len(questions), "correct": sum(right), "accuracy": sum(right) / len(questions),
              "by_category": {}}
    for q, r in zip(questions, right):
        cat = report["by_category"].setdefault(q["category"], {"questions": 0, "correct": 0})
        cat["questions"] += 1
        cat["correct"] += int(r)
    report["answers"] = [{"question": q["question"], "answer": a, "correct": r} for q, a, r in zip(questions, answers, right)]
    if teacher_answers is not None:
        same = [a == t for a, t in zip(answers, teacher_answers)]
        report["same_as_teacher"] = sum(same)
        teacher_right = [answer_matches(t, q["expected"]) for q, t in zip(questions, teacher_answers)]
        report["teacher_correct"] = sum(teacher_right)
        report["kept"] = sum(r and t for r, t in zip(right, teacher_right))  # what the teacher knows, still known
        for item, t, s in zip(report["answers"], teacher_answers, same):
            item["teacher_answer"], item["same_as_teacher"] = t, s
    return report


def default_questions_path():
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "chat_questions.json")
