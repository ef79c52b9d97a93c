"""Diagnostic (2026-12-06, the AMX Xeon): where in depth does an adapted model's remaining KL arise? Hybrids of
the teacher and the adapted student (base + delta, merged; the delta changes layers only), layer by layer, on
held-out text; KL(teacher || hybrid) per position, bf16 autocast as evaluate.py.
  suffix[l]: the teacher's layers 0..l-1, the student's l..29 (suffix[0] is the student; suffix[30] the teacher)
  prefix[l]: the student's layers 0..l, the teacher's above
  alone[l]:  the teacher with its layer l replaced by the student's
A consumer of the student attends over whatever its source layer handed on in the hybrid (the teacher's layer-0
K/V where the teacher's layer 0 ran): the blocks take their sources from the forward's hand-over.
    .venv/bin/python results/smollm2-adapted/patching/patch.py DELTA [SET=selfgen|plays] [TOKENS=8192]"""
import copy, json, os, sys, time
import torch
import torch.nn.functional as F
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
sys.path.insert(0, ROOT)
from checkpoint import load_model
from delta import load_with_delta
from fidelity import fixed_windows
from dataset import load_meta, open_tokens
torch.set_num_threads(2)
BASE = ROOT + "/data/smollm2/smollm2-135m-instruct.pt"
delta_path = sys.argv[1]
sets = {"selfgen": (ROOT + "/data/smollm2_selfgen", "val"), "plays": (ROOT + "/data/shakespeare_smollm2", "val")}
set_name = sys.argv[2] if len(sys.argv) > 2 else "selfgen"
n_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 8192
teacher, _ = load_model(BASE)
student, ckpt = load_with_delta(BASE, delta_path)
teacher.eval(); student.eval()
kv_source = list(student.config.kv_source)
L = teacher.config.n_layer
d, split = sets[set_name]
windows = torch.from_numpy(fixed_windows(open_tokens(d, split, load_meta(d)), n_tokens, 512))
hybrid = copy.copy(teacher)  # shares every module; only its layer list is swapped below,
hybrid._modules = dict(teacher._modules)  # in its own module table (a shallow copy shares the teacher's)
layouts = {f"suffix{l}": [teacher.layers[i] if i < l else student.layers[i] for i in range(L)] for l in range(L + 1)}
layouts |= {f"prefix{l}": [student.layers[i] if i <= l else teacher.layers[i] for i in range(L)] for l in range(L)}
layouts |= {f"alone{l}": [student.layers[i] if i == l else teacher.layers[i] for i in range(L)] for l in range(L)}
sums = {k: 0.0 for k in layouts}
n, t0 = 0, time.time()
with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
    for w in windows:
        idx = w[None, :-1]
        p_log = F.log_softmax(teacher(idx)[0].float(), -1)
        p = p_log.exp()
        for name, layers in layouts.items():
            hybrid.layers = torch.nn.ModuleList(layers)
            q_log = F.log_softmax(hybrid(idx)[0].float(), -1)
            sums[name] += (p * (p_log - q_log)).sum(-1).sum().item()
        n += idx.shape[1]
        print(f"{n} positions, {time.time() - t0:.0f} s", flush=True)
kl = {k: v / n for k, v in sums.items()}
out = {"delta": delta_path, "set": set_name, "positions": n, "kv_source": kv_source, "seconds": round(time.time() - t0),
       "suffix": [kl[f"suffix{l}"] for l in range(L + 1)], "prefix": [kl[f"prefix{l}"] for l in range(L)],
       "alone": [kl[f"alone{l}"] for l in range(L)]}
print(json.dumps(out))
print("layer source  suffix(from l)  prefix(to l)  alone")
for l in range(L):
    print(f"{l:5d} {kv_source[l]:6d}  {out['suffix'][l]:.4f}  {out['prefix'][l]:.4f}  {out['alone'][l]:.4f}")
