"""Pilot: fit each K/V consumer's own values (and keys, per RoPE frequency) from its source's, on the teacher's
activations, and fold the fits into the consumer's o_proj (and q_proj). Untrained KL on held-out generated text."""
import os, sys, time, json, torch, numpy as np
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
sys.path.insert(0, ROOT)
from checkpoint import load_model
from adapt import convert_model, teacher_activations
from fidelity import fixed_windows, compare_on_windows
from dataset import load_meta, open_tokens
torch.set_num_threads(2); torch.manual_seed(0)
KV = [0, 1, 2, 3, 4, 5, 0, 0, 8, 0, 10, 11, 12, 13, 14, 15, 16, 0, 18, 19, 20, 21, 0, 23, 24, 25, 0, 27, 12, 0]
if len(sys.argv) > 1 and sys.argv[1] == "kv50":
    raise SystemExit('only the KV-0.73 map here')
teacher, ckpt = load_model(ROOT + "/data/smollm2/smollm2-135m-instruct.pt")
c = teacher.config; H, Hkv, D, C = c.n_head, c.n_kv_head, c.head_dim, c.n_embd; G = H // Hkv
meta = load_meta(ROOT + "/data/smollm2_selfgen")
calib = fixed_windows(open_tokens(ROOT + "/data/smollm2_selfgen", "train", meta), int(sys.argv[2]) if len(sys.argv) > 2 else 8192, 512)
heldout = fixed_windows(open_tokens(ROOT + "/data/smollm2_selfgen", "val", meta), 8192, 512)
t0 = time.time()
consumers = [i for i, j in enumerate(KV) if j != i]
needed = sorted(set(consumers) | {KV[i] for i in consumers})
Ks, Vs = {i: [] for i in needed}, {i: [] for i in needed}
with torch.no_grad():
    for w in calib:
        xs = teacher_activations(teacher, torch.from_numpy(w[None, :-1]))
        for i in needed:
            a = teacher.layers[i].self_attn
            h = teacher.layers[i].input_layernorm(xs[i])[0]
            Ks[i].append(a.k_proj(h).view(-1, Hkv, D)); Vs[i].append(a.v_proj(h).view(-1, Hkv, D))
Ks = {i: torch.cat(v).double() for i, v in Ks.items()}; Vs = {i: torch.cat(v).double() for i, v in Vs.items()}
print(f"activations of {len(calib) * 512} tokens: {time.time() - t0:.0f} s", flush=True)

def fit_v(X, Y, ridge=1e-3):
    A = X.T @ X; A += ridge * A.diagonal().mean() * torch.eye(A.shape[0], dtype=A.dtype)
    B = torch.linalg.solve(A, X.T @ Y)
    return B, 1 - ((Y - X @ B) ** 2).sum() / (Y ** 2).sum()

def fit_k(X, Y):  # a complex scalar a frequency: z_c ~ alpha z_s
    zs, zc = torch.complex(X[:, :D // 2], X[:, D // 2:]), torch.complex(Y[:, :D // 2], Y[:, D // 2:])
    alpha = (zs.conj() * zc).sum(0) / (zs.abs() ** 2).sum(0)
    return alpha, 1 - ((zc - zs * alpha).abs() ** 2).sum() / (zc.abs() ** 2).sum()

fits = {}
for i in consumers:
    s = KV[i]
    rv = torch.zeros(Hkv, Hkv); rk = torch.zeros(Hkv, Hkv)
    for j in range(Hkv):
        for js in range(Hkv):
            rv[j, js] = fit_v(Vs[s][:, js], Vs[i][:, j])[1]; rk[j, js] = fit_k(Ks[s][:, js], Ks[i][:, j])[1]
    fits[i] = (rv, rk)
    print(f"layer {i} <- {s}: R2 V (own head j rows, source head cols) {rv.numpy().round(2).tolist()}  K {rk.numpy().round(2).tolist()}")

def student(fold_v, fold_k, permute):
    m = convert_model(teacher, kv_source=KV)
    with torch.no_grad():
        for i in consumers:
            s = KV[i]; a = m.layers[i].self_attn
            rv, rk = fits[i]
            if permute:  # best assignment of own K/V heads to the source's (all permutations of Hkv)
                import itertools
                perm = max(itertools.permutations(range(Hkv)), key=lambda p: sum(rv[j, p[j]] + (rk[j, p[j]] if fold_k else 0) for j in range(Hkv)))
            else:
                perm = tuple(range(Hkv))
            Wq, Wo = a.q_proj.weight.data.clone().view(Hkv, G, D, C), a.o_proj.weight.data.clone().view(C, Hkv, G, D)
            newq, newo = Wq.clone(), Wo.clone()
            for j in range(Hkv):
                js = perm[j]  # own group j now reads source head js: its query heads move to group js
                q, o = Wq[j].double(), Wo[:, j].double()  # (G, D, C), (C, G, D)
                if fold_v:
                    B, _ = fit_v(Vs[s][:, js], Vs[i][:, j])  # v_c ~ v_s B
                    o = torch.einsum("cgd,ed->cge", o, B)  # W_o,h <- W_o,h B^T
                if fold_k:
                    alpha, _ = fit_k(Ks[s][:, js], Ks[i][:, j])
                    ar, ai = alpha.real[None, :, None], alpha.imag[None, :, None]
                    q1, q2 = q[:, :D // 2], q[:, D // 2:]
                    q = torch.cat([ar * q1 + ai * q2, ar * q2 - ai * q1], dim=1)
                newq[js], newo[:, js] = q.float(), o.float()
            a.q_proj.weight.data.copy_(newq.view(H * D, C)); a.o_proj.weight.data.copy_(newo.view(C, H * D))
    return m.eval()

for name, args in [("abrupt", (False, False, False)), ("fold V", (True, False, False)), ("fold K", (False, True, False)),
                   ("fold V+K", (True, True, False)), ("fold V+K, heads assigned", (True, True, True))]:
    t0 = time.time()
    r = compare_on_windows(student(*args), teacher, heldout, 1)
    print(f"{name:28s} ppl ratio {r['ppl_ratio']:.4f}  KL {r['kl']:.4f}  top-1 {r['agreement']:.4f}  ({time.time() - t0:.0f} s)", flush=True)
