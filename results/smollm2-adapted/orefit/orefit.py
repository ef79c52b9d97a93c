"""Pilot (2026-12-06, the AMX Xeon): refit each consumer's o_proj by least squares so that, attending over its source's K/V with its own
queries, its attention block gives the teacher's attention-block output (teacher activations, calibration text);
KL on 8,192 held-out generated tokens, untrained. With a path after the ridges: the teacher's checkpoint with the
first ridge's o_proj written there (a base for train.py --init_from=PATH --adapt_target=MAP --adapt_mode=abrupt).
    [MAP=0,1,...] .venv/bin/python results/smollm2-adapted/orefit/orefit.py 32768 0.1,0.3,1,3 [out-refit/base.pt]"""
import os, sys, time, torch, numpy as np
import torch.nn.functional as F
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
sys.path.insert(0, ROOT)
from checkpoint import load_model
from adapt import convert_model, teacher_activations
from fidelity import fixed_windows, compare_on_windows
from dataset import load_meta, open_tokens
from model import apply_rope
torch.set_num_threads(2)
KV = [0, 1, 2, 3, 4, 5, 0, 0, 8, 0, 10, 11, 12, 13, 14, 15, 16, 0, 18, 19, 20, 21, 0, 23, 24, 25, 0, 27, 12, 0]
if os.environ.get("MAP"):  # another map, comma-separated (the shipped KV-0.73 one above by default)
    KV = [int(x) for x in os.environ["MAP"].split(",")]
teacher, ckpt = load_model(ROOT + "/data/smollm2/smollm2-135m-instruct.pt")
c = teacher.config; H, Hkv, D, C = c.n_head, c.n_kv_head, c.head_dim, c.n_embd
meta = load_meta(ROOT + "/data/smollm2_selfgen")
ntok = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
calib = fixed_windows(open_tokens(ROOT + "/data/smollm2_selfgen", "train", meta), ntok, 512)
heldout = fixed_windows(open_tokens(ROOT + "/data/smollm2_selfgen", "val", meta), 8192, 512)
consumers = [i for i, j in enumerate(KV) if j != i]
cos, sin = teacher.rope_cos[:512], teacher.rope_sin[:512]

def attend(a, h, k, v):  # (1, T, C) -> per-head outputs (T, H*D) before o_proj
    q = apply_rope(a.q_proj(h).view(1, -1, H, D).transpose(1, 2), cos, sin)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return y.transpose(1, 2).reshape(-1, H * D)

def kv(a, h):
    k = apply_rope(a.k_proj(h).view(1, -1, Hkv, D).transpose(1, 2), cos, sin)
    return k, a.v_proj(h).view(1, -1, Hkv, D).transpose(1, 2)

t0 = time.time()
XtX = {i: torch.zeros(H * D, H * D, dtype=torch.float64) for i in consumers}
XtY = {i: torch.zeros(H * D, C, dtype=torch.float64) for i in consumers}
with torch.no_grad():
    for w in calib:
        xs = teacher_activations(teacher, torch.from_numpy(w[None, :-1]))
        for i in consumers:
            s, a = KV[i], teacher.layers[i].self_attn
            h = teacher.layers[i].input_layernorm(xs[i])
            ks, vs = kv(teacher.layers[s].self_attn, teacher.layers[s].input_layernorm(xs[s]))
            kc, vc = kv(a, h)
            A_s = attend(a, h, ks, vs).double()             # the student's attention outputs (source K/V)
            target = a.o_proj(attend(a, h, kc, vc)).double()  # the teacher's attention block output
            XtX[i] += A_s.T @ A_s; XtY[i] += A_s.T @ target
print(f"statistics over {len(calib) * 512} tokens: {time.time() - t0:.0f} s", flush=True)

def student(ridge):
    m = convert_model(teacher, kv_source=KV)
    with torch.no_grad():
        for i in consumers:
            A = XtX[i] + ridge * XtX[i].diagonal().mean() * torch.eye(H * D, dtype=torch.float64)
            W = torch.linalg.solve(A, XtY[i])  # (H*D, C): y = a W
            m.layers[i].self_attn.o_proj.weight.data.copy_(W.T.float())
    return m.eval()

r = compare_on_windows(convert_model(teacher, kv_source=KV).eval(), teacher, heldout, 1)
print(f"{'abrupt':22s} ppl ratio {r['ppl_ratio']:.4f}  KL {r['kl']:.4f}  top-1 {r['agreement']:.4f}", flush=True)
ridges = [float(x) for x in sys.argv[2].split(",")]
for ridge in ridges:
    r = compare_on_windows(student(ridge), teacher, heldout, 1)
    print(f"o_proj refit ridge {ridge:<6} ppl ratio {r['ppl_ratio']:.4f}  KL {r['kl']:.4f}  top-1 {r['agreement']:.4f}", flush=True)
if len(sys.argv) > 3:
    from checkpoint import save_checkpoint, load_checkpoint
    ck = {k: v for k, v in load_checkpoint(ROOT + "/data/smollm2/smollm2-135m-instruct.pt").items() if k != "tensor_digests"}
    refit = student(ridges[0])
    ck["model"] = {**ck["model"], **{f"layers.{i}.self_attn.o_proj.weight": refit.layers[i].self_attn.o_proj.weight.detach().clone()
                                     for i in consumers}}
    save_checkpoint(ck, sys.argv[3])
    print("saved", sys.argv[3], "with ridge", ridges[0])
