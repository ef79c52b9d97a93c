"""Pilot 3: o_proj refit, consumers in order, each on the student's own activations (earlier refits in place); target
the teacher's attention-block output (mode 'block') or that plus the residual stream's drift (mode 'drift')."""
import os, sys, time, torch
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
teacher, ckpt = load_model(ROOT + "/data/smollm2/smollm2-135m-instruct.pt")
c = teacher.config; H, Hkv, D, C = c.n_head, c.n_kv_head, c.head_dim, c.n_embd
meta = load_meta(ROOT + "/data/smollm2_selfgen")
ntok, mode, ridge = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
calib = fixed_windows(open_tokens(ROOT + "/data/smollm2_selfgen", "train", meta), ntok, 512)
heldout = fixed_windows(open_tokens(ROOT + "/data/smollm2_selfgen", "val", meta), 8192, 512)
consumers = [i for i, j in enumerate(KV) if j != i]
cos, sin = teacher.rope_cos[:512], teacher.rope_sin[:512]

def attend(a, h, k, v):
    q = apply_rope(a.q_proj(h).view(1, -1, H, D).transpose(1, 2), cos, sin)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return y.transpose(1, 2).reshape(-1, H * D)

def kv(a, h):
    k = apply_rope(a.k_proj(h).view(1, -1, Hkv, D).transpose(1, 2), cos, sin)
    return k, a.v_proj(h).view(1, -1, Hkv, D).transpose(1, 2)

t0 = time.time()
student = convert_model(teacher, kv_source=KV).eval()
teacher_xs = []
with torch.no_grad():
    for w in calib:
        teacher_xs.append({i: x for i, x in teacher_activations(teacher, torch.from_numpy(w[None, :-1])).items() if i in consumers})
    for i in consumers:
        XtX = torch.zeros(H * D, H * D, dtype=torch.float64); XtY = torch.zeros(H * D, C, dtype=torch.float64)
        s, a, ta = KV[i], student.layers[i].self_attn, teacher.layers[i].self_attn
        for w, txs in zip(calib, teacher_xs):
            xs = teacher_activations(student, torch.from_numpy(w[None, :-1]))  # the student's own stream
            h = student.layers[i].input_layernorm(xs[i])
            ks, vs = kv(student.layers[s].self_attn, student.layers[s].input_layernorm(xs[s]))
            A_s = attend(a, h, ks, vs).double()
            th = teacher.layers[i].input_layernorm(txs[i])
            target = ta.o_proj(attend(ta, th, *kv(ta, th))).double()
            if mode == "drift":
                target = target + (txs[i] - xs[i]).view(-1, C).double()
            XtX += A_s.T @ A_s; XtY += A_s.T @ target
        A = XtX + ridge * XtX.diagonal().mean() * torch.eye(H * D, dtype=torch.float64)
        a.o_proj.weight.data.copy_(torch.linalg.solve(A, XtY).T.float())
        print(f"layer {i} refit ({time.time() - t0:.0f} s)", flush=True)
r = compare_on_windows(student, teacher, heldout, 1)
print(f"seq {mode} ridge {ridge} {ntok} tokens: ppl ratio {r['ppl_ratio']:.4f}  KL {r['kl']:.4f}  top-1 {r['agreement']:.4f}", flush=True)
