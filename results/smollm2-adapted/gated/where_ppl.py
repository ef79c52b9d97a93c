"""Where the gated delta's generated-text perplexity comes from (2026-12-06, the AMX Xeon): per position, each
student's and the teacher's NLL of the next token and the KL, over evaluate.py's 65,536 held-out generated positions
(the same windows of 512, bf16 autocast), for the gated delta (its gates) and the no-attention delta (gates at 0,
which is ../kv-usage/without_attention.py's block exactly). Sums by where the position sits: a chat turn's user
text, its assistant text, another turn ("other": the system prompt, or whatever the teacher's free text put after
`<|im_start|>`), free text (no turn open), and the positions whose next token is `<|im_start|>` ("marker").
    .venv/bin/python results/smollm2-adapted/gated/where_ppl.py GATED_DELTA GATES NOATTN_DELTA"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gated_attention  # noqa: F401  (patches model.Block: a gate per consumer head)
import torch
import torch.nn.functional as F
from delta import load_with_delta
from checkpoint import load_model
import dataset
from tokenizer import from_meta

BASE = "data/smollm2/smollm2-135m-instruct.pt"


def student(delta, gates):
    m = load_with_delta(BASE, delta)[0]
    for i, block in enumerate(m.layers):
        block.attn_gate.data.copy_(gates.get(i, torch.zeros_like(block.attn_gate)))
    return m


@torch.no_grad()
def per_position(m, teacher, windows):
    nll_s, nll_t, kl = [], [], []
    for w in windows:
        x, y = torch.from_numpy(w[None, :-1]), torch.from_numpy(w[1:])
        with torch.autocast("cpu", torch.bfloat16):
            zs, zt = m(x)[0][0], teacher(x)[0][0]
        ls, lt = F.log_softmax(zs.float(), -1), F.log_softmax(zt.float(), -1)
        nll_s.append(-ls.gather(-1, y[:, None])[:, 0]), nll_t.append(-lt.gather(-1, y[:, None])[:, 0])
        kl.append((lt.exp() * (lt - ls)).sum(-1))
    return torch.cat(nll_s), torch.cat(nll_t), torch.cat(kl)


def regions(windows, tok):
    """Per predicted position, by the chat markers seen so far in the window: 'user', 'assistant', 'other' (a turn
    of another role), 'free' (no turn open); 'marker' where the next token is <|im_start|>."""
    start, end = tok.encode("<|im_start|>")[0], tok.encode("<|im_end|>")[0]
    user, assistant = tok.encode("user"), tok.encode("assistant")
    out = []
    for w in windows:
        state = "free"
        for p in range(len(w) - 1):
            if w[p] == start:
                state = "marker"
            elif state == "marker":
                state = "user" if w[p] == user[0] else "assistant" if w[p] == assistant[0] else "other"
            elif w[p] == end:
                state = "free"
            out.append(state if w[p + 1] != start else "marker")
    return out


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kv-usage"))
    gated_delta, gates_file, noattn_delta = sys.argv[1:4]
    teacher = load_model(BASE)[0].eval()
    from measure import held_out_windows  # ../kv-usage/measure.py
    windows = held_out_windows(["selfgen"], 65536)["selfgen"]
    d = os.path.join("data", "smollm2_selfgen")
    tok = from_meta(dataset.load_meta(d), d)
    where = regions(windows, tok)
    res = {}
    for label, delta, gates in (("gated", gated_delta, torch.load(gates_file)), ("no attention", noattn_delta, {})):
        res[label] = per_position(student(delta, gates), teacher, windows)
    nt = res["gated"][1]
    print(f"{len(where):,} positions; teacher NLL {nt.mean():.4f}")
    for kind in ("user", "assistant", "free", "marker", "other"):
        idx = torch.tensor([k == kind for k in where])
        if idx.sum() == 0:
            continue
        line = f"{kind:9s} {int(idx.sum()):6,} positions:"
        for label, (ns, _, kl) in res.items():
            extra, part = (ns[idx] - nt[idx]).sum() / len(where), kl[idx].sum() / len(where)
            line += f"  {label}: extra NLL {extra:+.4f} KL {part:.4f}"
        print(line)
    for label, (ns, _, kl) in res.items():
        print(f"{label}: ln ppl ratio {(ns - nt).mean():.4f}, KL {kl.mean():.4f}")
    d = res["gated"][0] - res["no attention"][0]
    print(f"gated - no attention, NLL per position: mean {d.mean():+.4f}; the 20 largest gains:")
    flat = windows[:, 1:].reshape(-1)
    ctx = windows[:, :-1].reshape(-1)
    for i in torch.topk(-d, 20).indices.tolist():
        w, p = divmod(i, windows.shape[1] - 1)
        before = tok.decode(windows[w, max(0, p - 12):p + 1].tolist()).replace("\n", "\\n")
        print(f"  {d[i]:+.2f} at {where[i]:9s} ...{before[-60:]!r} -> {tok.decode([int(flat[i])])!r}")
