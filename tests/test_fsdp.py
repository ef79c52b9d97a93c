"""train.py --fsdp=True (sharding.py): FSDP2 on CPU with gloo in two processes against one process, with
gradient accumulation, clipping, distillation and a stage switch that drops K/V weights; exact resume;
and the settings it refuses."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import train
from model import Llama, LlamaConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# eval_iters=3 does not divide over 2 ranks: FSDP's padded evaluation must give the single-process number
TINY = ["--n_head=2", "--n_kv_head=1", "--n_embd=32", "--intermediate_size=64", "--block_size=16", "--batch_size=4",
        "--eval_iters=3", "--log_interval=1", "--compile=False", "--learning_rate=1e-2", "--warmup_iters=2",
        "--min_lr=1e-3", "--dtype=float32", "--device=cpu", "--gradient_accumulation_steps=2", "--grad_clip=0.5"]
ADAPT = ["--adapt_target=upper:half", "--adapt_stage_iters=2", "--max_iters=8", "--lr_decay_iters=8",
         "--eval_interval=4", "--distill_alpha=0.5", "--adapt_train_layers=upward"]


def records(out_dir, kind):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("kind") == kind]


def losses(out_dir):
    return {r["iter"]: r["loss"] for r in records(out_dir, "train")}


def torchrun(args, cwd):
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = subprocess.run([exe, "--standalone", "--nproc_per_node=2", os.path.join(ROOT, "train.py"), *args, "--fsdp=True"],
                       cwd=cwd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def close(a, b, tol):
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) < tol for k in a)


@pytest.fixture(scope="module")
def dense_ckpt(data_dir, tmp_path_factory):
    """A 4-layer dense checkpoint to adapt (two iterations of one process)."""
    out = tmp_path_factory.mktemp("dense")
    train.main(TINY + [f"--dataset={data_dir}", f"--out_dir={out}", "--n_layer=4", "--kv_source=dense",
                       "--max_iters=2", "--lr_decay_iters=2"])
    return str(out / "ckpt.pt")


def test_fsdp_two_ranks_equals_one_process(data_dir, tmp_path):
    common = TINY + [f"--dataset={data_dir}", "--n_layer=3", "--kv_source=0,0,2", "--tie_embeddings=True",
                     "--max_iters=4", "--lr_decay_iters=4", "--eval_interval=4"]
    out = torchrun(common + [f"--out_dir={tmp_path / 'fsdp'}"], tmp_path)
    assert "ranks 2 (FSDP)" in out and "gathered weights on all 2 ranks are identical" in out
    assert out.count("saved ") == 1  # rank 0 writes the one gathered file
    train.main(common + [f"--out_dir={tmp_path / 'one'}"])
    assert close(losses(tmp_path / "fsdp"), losses(tmp_path / "one"), 1e-5)
    assert sorted(losses(tmp_path / "fsdp")) == [0, 1, 2, 3]
    ev_f, ev_1 = records(tmp_path / "fsdp", "eval"), records(tmp_path / "one", "eval")
    assert [e["iter"] for e in ev_f] == [0, 4] and all(abs(a["val_loss"] - b["val_loss"]) < 1e-5
                                                       for a, b in zip(ev_f, ev_1))
    a = torch.load(tmp_path / "fsdp" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert all(type(t) is torch.Tensor and torch.allclose(t, b["model"][k], atol=1e-5) for k, t in a["model"].items())
    # the optimizer state is the unsharded layout: index -> full moments, as one process writes it
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, st in a["optimizer"]["state"].items():
        assert torch.allclose(st["exp_avg"], b["optimizer"]["state"][i]["exp_avg"], atol=1e-6)
    model = Llama(LlamaConfig(**a["model_config"]))
    model.load_state_dict(a["model"])


def test_fsdp_compiled_block_by_block(data_dir, dense_ckpt, tmp_path):
    """--compile=True under FSDP (sharding.compile_blocks): every block gets its own graphs, for training and
    for evaluation, none left to run eagerly past dynamo's limit, also after a stage switch drops K/V weights;
    the losses are the uncompiled single process's."""
    common = TINY + ADAPT + [f"--dataset={data_dir}", f"--init_from={dense_ckpt}", f"--distill_teacher={dense_ckpt}",
                             "--max_iters=6", "--lr_decay_iters=6"]
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = subprocess.run([exe, "--standalone", "--nproc_per_node=2", os.path.join(ROOT, "train.py"), *common,
                        f"--out_dir={tmp_path / 'fsdp'}", "--fsdp=True", "--compile=True"], cwd=tmp_path,
                       env=dict(os.environ, OMP_NUM_THREADS="1", TORCH_LOGS="recompiles"), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    train.main(common + [f"--out_dir={tmp_path / 'one'}"])
    assert close(losses(tmp_path / "fsdp"), losses(tmp_path / "one"), 1e-4) and len(losses(tmp_path / "one")) == 6
    assert "recompile_limit" not in r.stderr and "cache_size_limit" not in r.stderr
    # graphs of the blocks per rank (the first after each reset comes without a "Recompiling" line): 4 blocks
    # x (evaluation, training) at iters 0-1; the switch at 2 makes a new model: 4 in training; the switch at 4
    # another: 4 x (evaluation, training)
    block_forward = f"Recompiling function forward in {os.path.join(ROOT, 'model.py')}"
    assert r.stderr.count(block_forward) == 2 * ((4 * 2 - 1) + (4 - 1) + (4 * 2 - 1))


def test_fsdp_stage_switch_and_resume(data_dir, dense_ckpt, tmp_path):
    """Adaptation under FSDP drops K/V at iterations 2 and 4 and re-shards; it follows one process, and a
    run stopped at 4 and resumed (under FSDP, and in one process) equals the uninterrupted one."""
    common = TINY + ADAPT + [f"--dataset={data_dir}", f"--init_from={dense_ckpt}"]
    torchrun(common + [f"--out_dir={tmp_path / 'straight'}"], tmp_path)
    train.main(common + [f"--out_dir={tmp_path / 'one'}"])
    straight = losses(tmp_path / "straight")
    assert sorted(straight) == list(range(8)) and close(straight, losses(tmp_path / "one"), 1e-5)
    assert [r["kv_source"] for r in records(tmp_path / "straight", "adapt")] == [[0, 1, 2, 1], [0, 1, 1, 1]]

    torchrun(common + [f"--out_dir={tmp_path / 'half'}", "--max_iters=4"], tmp_path)
    shutil.copytree(tmp_path / "half", tmp_path / "half_one")
    torchrun(common + [f"--out_dir={tmp_path / 'half'}", "--init_from=resume", f"--distill_teacher={dense_ckpt}"],
             tmp_path)
    assert losses(tmp_path / "half") == straight  # the log holds iters 0-3 and the resumed 4-7: equal
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "half" / "ckpt.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and "layers.3.self_attn.k_proj.weight" not in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the gathered checkpoint resumes in one process too
    train.main(common + [f"--out_dir={tmp_path / 'half_one'}", "--init_from=resume", f"--distill_teacher={dense_ckpt}"])
    assert close(losses(tmp_path / "half_one"), straight, 1e-5)


@pytest.mark.parametrize("extra, env, match", [
    ([], False, "fsdp=True shards over the processes of torchrun"),
    (["--dtype=float16", "--device=cpu"], True, "fsdp=True with dtype=float16"),
    (["--gradient_accumulation_steps=3"], True, "gradient_accumulation_steps=3 does not divide over 2 ranks"),
])
def test_fsdp_refuses_what_it_cannot_take(data_dir, tmp_path, monkeypatch, extra, env, match):
    if env:  # as torchrun sets it; the check comes before any process group is made
        for k, v in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
            monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        train.main([f"--dataset={data_dir}", f"--out_dir={tmp_path / 'o'}", "--fsdp=True"] + extra)
    assert not os.path.exists(tmp_path / "o")
