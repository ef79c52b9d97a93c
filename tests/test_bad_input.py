"""Bad input to the four scripts, and the ways a run can lose or corrupt data.

The table: each case runs a script's main(argv) through configurator.run_script, as the command line
does, and must exit 1 with one line on stderr that names the setting or file, no traceback, and write
nothing anywhere. Then the cases that need more than one call or a process of their own: resume with
the checkpoint's model settings, a second run into a locked out_dir, a full disk, SIGTERM and Ctrl-C
(under torchrun too), export over an existing directory and its verification in bfloat16."""

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

import adapt
import bench
import checkpoint
import convert_hf
import delta
import guards
import sample
import train
from checkpoint import load_checkpoint, save_safetensors
from configurator import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"train": train, "sample": sample, "convert_hf": convert_hf, "adapt": adapt, "bench": bench, "delta": delta}
MODEL = ["--n_layer=2", "--n_head=2", "--n_kv_head=1", "--n_embd=32", "--intermediate_size=64", "--block_size=16"]
RUN = ["--batch_size=4", "--eval_iters=2", "--log_interval=1", "--compile=False", "--learning_rate=1e-2",
       "--warmup_iters=2", "--min_lr=1e-3", "--dtype=float32", "--device=cpu", "--max_iters=2",
       "--lr_decay_iters=2", "--eval_interval=2"]
TINY = MODEL + RUN
REAL_FDOPEN = os.fdopen


def flip_a_byte(path):
    """Flip one bit in the middle of the biggest tensor of a torch zip file: torch.load still reads it."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), dtype="<u2")
        f.seek(info.header_offset + 30 + int(name_len) + int(extra_len) + info.file_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))


@pytest.fixture(scope="module")
def world(tmp_path_factory, data_dir):
    """Everything the bad inputs point at: a trained checkpoint and a damaged copy, bad datasets, Hugging
    Face directories with broken weights, a locked out_dir, a few odd files."""
    w = tmp_path_factory.mktemp("world")
    p = {"root": str(w), "data": data_dir}
    run_script(train.main, TINY + [f"--dataset={data_dir}", f"--out_dir={w / 'ck'}", "--kv_source=dense"])
    p["ck"] = str(w / "ck" / "ckpt.pt")
    shutil.copytree(w / "ck", w / "flip")
    flip_a_byte(w / "flip" / "ckpt.pt")
    torch.load(w / "flip" / "ckpt.pt", weights_only=True)  # the damage torch.load does not see
    shutil.copytree(data_dir, w / "baddata")
    ids = np.fromfile(w / "baddata" / "train.bin", dtype=np.uint16)
    ids[100] = json.load(open(w / "baddata" / "meta.json"))["vocab_size"]
    ids.tofile(w / "baddata" / "train.bin")
    shutil.copytree(data_dir, w / "badmeta")
    (w / "badmeta" / "meta.json").write_text("{not json")
    model, _ = checkpoint.load_model(p["ck"])
    convert_hf.export_hf(model, w / "hf")
    for name, damage in (("hf_trunc", lambda b: b[: len(b) // 2]), ("hf_garbage", lambda b: b"\x07" * 64)):
        shutil.copytree(w / "hf", w / name)
        weights = w / name / "model.safetensors"
        weights.write_bytes(damage(weights.read_bytes()))
    shutil.copytree(w / "hf", w / "hf_list")
    (w / "hf_list" / "config.json").write_text("[1, 2]")
    os.makedirs(w / "nonempty")
    (w / "nonempty" / "README.md").write_text("someone's notes")
    (w / "afile").write_text("not a directory")
    (w / "notutf8.txt").write_bytes(b"\xff\xfe caf\xe9")
    torch.save({"model": 1}, w / "dict.pt")
    torch.save(torch.zeros(3, 3), w / "sim3.pt")
    os.makedirs(w / "locked")
    p.update({k: str(w / k) for k in ("hf", "hf_trunc", "hf_garbage", "hf_list", "nonempty", "afile", "baddata",
                                      "badmeta", "locked")})
    p.update(flip=str(w / "flip" / "ckpt.pt"), notutf8=str(w / "notutf8.txt"), dict=str(w / "dict.pt"),
             sim3=str(w / "sim3.pt"))
    os.mkfifo(w / "fifo")
    p["fifo"] = str(w / "fifo")
    (w / "exits.py").write_text("import sys\nsys.exit(0)\n")
    os.symlink(w / "loop_a", w / "loop_b")
    os.symlink(w / "loop_b", w / "loop_a")
    p["exits"] = str(w / "exits.py")
    good = torch.load(p["ck"], weights_only=True)
    malformed = {"mc_empty": {"model_config": {}}, "mc_list": {"model_config": [2, 2]},
                 "model_tensor": {"model": torch.zeros(3)}, "iter_str": {"iter_num": "5"},
                 "opt_list": {"optimizer": [1, 2]}, "rng_bad": {"rng": {"torch": 5}},
                 "theta_nan": {"model_config": {**good["model_config"], "rope_theta": float("nan")}}}
    for name, change in malformed.items():  # as another program might write them: no digests, schema wrong
        torch.save({k: v for k, v in good.items() if k != "tensor_digests"} | change, w / f"{name}.pt")
        p[name] = str(w / f"{name}.pt")
    # a delta (delta.py) of ck converted to kv_source 0,0; damaged copies, one with a map ck cannot take, another base
    converted = adapt.convert_model(model, "0,0", "mean")
    tensors, meta = delta.make_delta({"model": converted.state_dict(), "model_config": converted.config.to_dict()}, good)
    save_safetensors(tensors, meta, w / "d.safetensors")
    data = (w / "d.safetensors").read_bytes()
    (w / "d_trunc.safetensors").write_bytes(data[: len(data) // 2])
    (w / "d_flip.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 0x10]))  # in the last tensor's bytes
    save_safetensors(tensors, meta | {"kv_source": "[0, 5]"}, w / "d_badmap.safetensors")
    checkpoint.save_checkpoint(good | {"model": good["model"] | {"norm.weight": good["model"]["norm.weight"] + 1}},
                               w / "ck2.pt")
    p.update({k: str(w / f"{k}.safetensors") for k in ("d", "d_trunc", "d_flip", "d_badmap")}, ck2=str(w / "ck2.pt"))
    lock = guards.lock_out_dir(p["locked"])  # as a run in progress holds it
    yield p
    lock.close()


ADAPT = ["--init_from={ck}", "--adapt_target=upper:1", "--adapt_order=similarity"]
CASES = [  # (script, arguments, what the one line must name); train cases get TINY, the dataset, an out_dir
    # train.py: ranges, checked at the start and named
    ("train", ["--learning_rate=nan"], "learning_rate"), ("train", ["--learning_rate=-1"], "learning_rate"),
    ("train", ["--learning_rate=0"], "learning_rate"), ("train", ["--min_lr=-1e-4"], "min_lr"),
    ("train", ["--min_lr=0.1"], "min_lr=0.1 is above learning_rate"), ("train", ["--beta1=1.0"], "beta1"),
    ("train", ["--beta2=nan"], "beta2"), ("train", ["--weight_decay=-0.1"], "weight_decay"),
    ("train", ["--norm_eps=0"], "norm_eps"), ("train", ["--rope_theta=inf"], "rope_theta"),
    ("train", ["--grad_clip=nan"], "grad_clip"), ("train", ["--max_iters=-1"], "max_iters"),
    ("train", ["--warmup_iters=-1"], "warmup_iters"), ("train", ["--lr_decay_iters=-5"], "lr_decay_iters"),
    ("train", ["--eval_iters=0"], "eval_iters"), ("train", ["--seed=-1"], "seed"),
    ("train", ["--kv_source=0,,1", "--n_layer=3"], "kv_source '0,,1' has an empty entry"),
    ("train", ["--kv_source=0,0,"], "kv_source '0,0,' has an empty entry"),
    ("train", ["--adapt_stage_iters=5"], "adapt_stage_iters applies only to an adaptation run"),
    ("train", ["--distill_end_weight=5"], "distill_end_weight applies only to distillation"),
    ("train", ["--distill_alpha=1.0", "--distill_reverse=1.5"], "distill_reverse=1.5 must lie in [0, 1]"),
    ("train", ["--distill_alpha=1.0", "--distill_reverse=nan"], "distill_reverse=nan must lie in [0, 1]"),
    ("train", ["--distill_argmax=0.5", "--distill_reverse=0.5"], "distill_reverse is a share of the soft term"),
    ("train", ["--backend=nccl"], "backend=nccl"),
    # train.py: data, calibration file, out_dir, checkpoint
    ("train", ["--dataset={baddata}"], "baddata/train.bin holds token id"),
    ("train", ["--dataset={badmeta}"], "badmeta/meta.json"),
    ("train", ADAPT + ["--adapt_similarity={afile}"], "adapt_similarity"),
    ("train", ADAPT + ["--adapt_similarity={dict}"], "adapt_similarity"),
    ("train", ADAPT + ["--adapt_similarity={sim3}"], "adapt_similarity"),
    ("train", ["--out_dir={afile}"], "out_dir"), ("train", ["--out_dir={afile}/run"], "out_dir"),
    ("train", ["--out_dir="], "out_dir"), ("train", ["--out_dir={locked}"], "is in use by another training run"),
    ("train", ["--out_dir={root}/flip", "--init_from=resume"], "flip/ckpt.pt is corrupt"),
    # sample.py
    ("sample", ["--temperature=nan"], "--temperature"), ("sample", ["--temperature=inf"], "--temperature"),
    ("sample", ["--top_k=-1"], "--top_k"), ("sample", ["--start=FILE:{notutf8}"], "notutf8.txt is not UTF-8"),
    ("sample", ["--init_from={hf_trunc}"], "hf_trunc/model.safetensors cannot be read"),
    ("sample", ["--init_from={hf_garbage}"], "hf_garbage/model.safetensors cannot be read"),
    ("sample", ["--init_from={hf_list}"], "hf_list/config.json"),
    ("sample", ["--kv_source=cla:2"], "--kv_source applies only to a Hugging Face directory"),
    ("sample", ["--init_from={hf}", "--kv_init=mean"], "--kv_init applies only with --kv_source"),
    ("sample", ["--init_from={hf}", "--data_dir={root}"], "--data_dir applies only"),
    ("sample", ["--init_from={flip}"], "flip/ckpt.pt is corrupt"),
    # convert_hf.py
    ("convert_hf", ["import", "{hf_trunc}", "{root}/c.pt"], "hf_trunc/model.safetensors cannot be read"),
    ("convert_hf", ["import", "{hf_garbage}", "{root}/c.pt"], "hf_garbage/model.safetensors cannot be read"),
    ("convert_hf", ["import", "{hf_list}", "{root}/c.pt"], "hf_list/config.json"),
    ("convert_hf", ["import", "{hf}"], "expected `import HF_DIR"),
    ("convert_hf", ["export", "{ck}", "{nonempty}"], "nonempty is not empty"),
    ("convert_hf", ["export", "{ck}", "{nonempty}", "--overwrite"], "nonempty holds no config.json"),
    ("convert_hf", ["export", "{ck}", "{root}/ck", "--overwrite"], "--overwrite would delete it"),
    ("convert_hf", ["export", "{flip}", "{root}/e"], "flip/ckpt.pt is corrupt"),
    # adapt.py
    ("adapt", ["--init_from={ck}", "--batches=0"], "batches"),
    ("adapt", ["--init_from={ck}", "--convert_to=upper:1", "--local_lr=nan", "--out={root}/a.pt"], "local_lr"),
    ("adapt", ["--init_from={ck}", "--kv_init=mean"], "kv_init applies only with --convert_to"),
    ("adapt", ["--init_from={flip}"], "flip/ckpt.pt is corrupt"),
]
# one rule for every writer into a place another owns: an existing file needs --overwrite, an out_dir its lock
WRITERS = [
    ("convert_hf", ["import", "{hf}", "{afile}"], "afile exists: choose a new file, or pass --overwrite"),
    ("convert_hf", ["import", "{hf}", "{locked}/ckpt.pt"], "is in use by another training run"),
    ("convert_hf", ["import", "{hf}", "{locked}/ckpt.pt", "--overwrite"], "is in use by another training run"),
    ("convert_hf", ["import", "{hf}", "{root}/ck", "--overwrite"], "ck is a directory"),
    ("convert_hf", ["import", "{hf}", ""], "destination of import is empty"),
    ("convert_hf", ["export", "{ck}", ""], "destination of export is empty"),
    ("convert_hf", ["export", "", "{root}/e"], "source of export is empty"),
    ("adapt", ["--init_from={ck}", "--convert_to=upper:1", "--out={afile}"], "afile exists"),
    ("adapt", ["--init_from={ck}", "--convert_to=upper:1", "--out={locked}/x.pt"], "in use by another training run"),
    ("adapt", ["--init_from={ck}", "--convert_to=upper:1", "--local_iters=3", "--local_lr=1e30", "--out={root}/n.pt"],
     "local distillation diverged at local_lr=1e+30"),
]
CASES += WRITERS
# sizes get an estimate before anything is allocated; prompts come from regular files only
SIZES = [
    ("train", ["--batch_size=100000000"], "this run cannot fit"), ("train", ["--n_layer=200000"], "this run cannot fit"),
    ("train", ["--vocab_size=1000000000"], "this run cannot fit"), ("train", ["--eval_iters=100000000"], "eval_iters"),
    ("sample", ["--max_new_tokens=100000000000"], "--max_new_tokens=100000000000 cannot fit"),
    ("sample", ["--max_new_tokens=100000000", "--num_samples=1000"], "would take at least"),
    ("sample", ["--max_new_tokens=0", "--num_samples=10000000000"], "would take at least"),
    ("sample", ["--start=FILE:/dev/zero"], "/dev/zero is not a regular file"),
    ("sample", ["--start=FILE:/dev/urandom"], "/dev/urandom is not a regular file"),
    ("sample", ["--start=FILE:{root}"], "is not a regular file"),
    ("sample", ["--temperature=1e-50"], "--temperature=1e-50 is below"),
    ("sample", ["--start=FILE:{fifo}"], "fifo is not a regular file"),
    ("train", ["--gradient_accumulation_steps=1000000000"], "one optimizer step would take at least"),
    ("bench", ["--preset=tiny", "--batch_size=100000000"], "these sizes cannot fit"),
    ("bench", ["--preset=tiny", "--decode_batch=100000000"], "these sizes cannot fit"),
    ("bench", ["--preset=tiny", "--repeats=100000000"], "would take at least"),
]
CASES += SIZES
# messages name the true source: the command line or the file, what a path is, the flag as given
MESSAGES = [
    ("convert_hf", ["import", "{hf}", "{root}/c.pt", "--kv_source=bogus"], "--kv_source=bogus: unknown kv_source"),
    ("convert_hf", ["import", "{hf}", "{root}/c.pt", "--kv_source=0,1,1,1"], "--kv_source=0,1,1,1: kv_source has 4"),
    ("adapt", ["--init_from={ck}", "--attn_to=bogus", "--out={root}/a.pt"], "unknown --attn_to 'bogus'"),
    ("adapt", ["--init_from={ck}", "--attn_to=0,7", "--out={root}/a.pt"], "--attn_to[1] = 7 is out of range"),
    ("train", ["--init_from={hf}"], "is a Hugging Face directory, not a checkpoint: convert it first"),
    ("train", ["--init_from={nonempty}"], "nonempty is a directory without ckpt.pt"),
    ("train", ["--init_from=/dev/null"], "/dev/null is not a regular file"),
    ("train", ["--init_from={fifo}"], "fifo is not a regular file"),
    ("train", ["{exits}"], "exits.py called sys.exit(0)"),
    ("train", ["--dataset={afile}"], "afile is not a directory"),
    ("sample", ["--init_from={root}/loop_a"], "loop_a is a symbolic link to nothing"),
    ("sample", ["--tokenizer={root}/nothing.json"], "--tokenizer={root}/nothing.json: no such file"),
    ("sample", ["--init_from={mc_empty}"], "model_config lacks n_layer"),
    ("sample", ["--init_from={mc_list}"], "model_config is a list"),
    ("sample", ["--init_from={model_tensor}"], "'model' is a Tensor, not a dict of tensors"),
    ("sample", ["--init_from={theta_nan}"], "rope_theta=nan must be a positive finite number"),
    ("train", ["--init_from={iter_str}"], "iter_num='5' must be an integer"),
    ("train", ["--init_from={opt_list}"], "optimizer must be an optimizer state dict"),
    ("adapt", ["--init_from={rng_bad}"], "rng must be the random-generator state"),
]
CASES += MESSAGES
# deltas (delta.py): the file, its base, and what takes --delta
DELTAS = [
    ("sample", ["--delta={root}/nothing.safetensors"], "delta {root}/nothing.safetensors does not exist"),
    ("sample", ["--delta={root}"], "is not a regular file"),
    ("sample", ["--delta={hf}/model.safetensors"], "model.safetensors is not a delta of this project"),
    ("sample", ["--delta={afile}"], "afile cannot be read: it is corrupt, truncated or not a safetensors file"),
    ("sample", ["--delta={d_trunc}"], "d_trunc.safetensors cannot be read: it is corrupt"),
    ("sample", ["--delta={d_flip}"], "d_flip.safetensors is corrupt: tensor"),
    ("sample", ["--init_from={ck2}", "--delta={d}"], "d.safetensors was made for base sha256"),
    ("sample", ["--delta={d_badmap}"], "records a model that {ck} cannot take (kv_source [0, 5]"),
    ("sample", ["--init_from={hf}", "--delta={d}"], "--delta applies to a checkpoint"),
    ("train", ["--delta={d}"], "--delta with init_from=scratch"),
    ("train", ["--init_from=resume", "--delta={d}"], "--delta with init_from=resume"),
    ("train", ["--init_from={ck}", "--delta={root}/nothing.safetensors"], "nothing.safetensors does not exist"),
    ("train", ["--init_from={ck2}", "--delta={d}"], "d.safetensors was made for base sha256"),
    ("convert_hf", ["export", "{ck2}", "{root}/e", "--delta={d}"], "d.safetensors was made for base sha256"),
    ("convert_hf", ["import", "{hf}", "{root}/c.pt", "--delta={d}"], "import takes no --delta"),
    ("delta", ["--base={ck}", "--out={root}/x.safetensors"], "--init_from is empty"),
    ("delta", ["--init_from={ck}", "--out={root}/x.safetensors"], "--base is empty"),
    ("delta", ["--init_from={ck}", "--base={ck}"], "--out is empty"),
    ("delta", ["--init_from={ck}", "--base={ck}", "--out={afile}"], "afile exists: choose a new file"),
    ("delta", ["--init_from={ck}", "--base={ck}", "--out={locked}/x.safetensors"], "in use by another training run"),
    ("delta", ["--init_from={flip}", "--base={ck}", "--out={root}/x.safetensors"], "flip/ckpt.pt is corrupt"),
    ("delta", ["--init_from={ck}", "--base={sim3}", "--out={root}/x.safetensors"], "is not a checkpoint of this project"),
    ("delta", ["--init_from={ck}", "--base={ck}", "--out={root}/x.safetensors", "--dtype=int8"], "dtype"),
]
CASES += DELTAS


def snapshot(*dirs):
    return {os.path.join(dp, f): (os.lstat(os.path.join(dp, f)).st_size, os.lstat(os.path.join(dp, f)).st_mtime_ns)
            for d in dirs for dp, dn, fn in os.walk(d) for f in fn + dn}


@pytest.mark.parametrize("script, args, names", CASES, ids=[f"{c[0]}:{' '.join(c[1])}"[:70] for c in CASES])
def test_bad_input_is_one_line_naming_it_and_writes_nothing(world, script, args, names, tmp_path, monkeypatch,
                                                            capsys):
    monkeypatch.chdir(tmp_path)  # whatever a script would write beside it lands here
    argv = [a.format(**world) for a in args]
    if script == "train":
        argv = TINY + [f"--dataset={world['data']}", f"--out_dir={tmp_path / 'out'}"] + argv
    elif script == "sample":
        argv = [f"--init_from={world['ck']}", "--device=cpu", "--max_new_tokens=2"] + argv
    before = snapshot(world["root"], world["data"])
    rc = run_script(SCRIPTS[script].main, argv)  # an exception escaping here is the traceback we forbid
    out, err = capsys.readouterr()
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert names.format(**world) in err and "Traceback" not in err, err
    assert snapshot(world["root"], world["data"]) == before and os.listdir(tmp_path) == []


# -----------------------------------------------------------------------------
# resume, out_dir, checkpoints


def test_resume_takes_block_size_and_the_model_settings_from_the_checkpoint(data_dir, tmp_path):
    """A run trained at block_size=160 resumes at 160, not at this file's default 128, and what it logs and
    saves says 2 layers, not this file's 4."""
    base = RUN + [f"--dataset={data_dir}", f"--out_dir={tmp_path}"]
    train.main(MODEL[:-1] + ["--block_size=160"] + base)
    train.main(base + ["--init_from=resume", "--max_iters=3", "--eval_interval=3"])
    start = [r for r in map(json.loads, open(tmp_path / "log.jsonl")) if r["kind"] == "start"][-1]
    assert start["iter"] == 2 and start["tokens_per_iter"] == 4 * 160
    assert start["config"]["block_size"] == 160 and start["config"]["n_layer"] == 2
    ckpt = load_checkpoint(str(tmp_path))
    assert ckpt["iter_num"] == 3 and ckpt["model_config"]["block_size"] == 160
    assert ckpt["config"]["block_size"] == 160 and ckpt["config"]["n_layer"] == 2 and ckpt["config"]["n_embd"] == 32


@pytest.mark.parametrize("flags", ["flags : fpu avx2 fma f16c", "flags : fpu avx2 fma avx512f avx512_bf16"])
def test_bf16_on_a_cpu_that_emulates_it_is_one_warning_line_and_the_run_goes_on(data_dir, tmp_path, monkeypatch,
                                                                                capsys, flags):
    """Without AVX-512 BF16 or AMX torch emulates bf16 products (a distillation step measured ~19x slower than
    fp32 on a Zen 3): --dtype=bfloat16 still trains, after one line naming the setting and the faster choice."""
    import speed
    monkeypatch.setattr(speed, "cpu_flags", lambda: flags)
    bf16 = [a if not a.startswith("--dtype=") else "--dtype=bfloat16" for a in RUN]
    assert run_script(train.main, MODEL + bf16 + [f"--dataset={data_dir}", f"--out_dir={tmp_path}"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    if "avx512_bf16" in flags:
        assert warned == []
    else:
        assert len(warned) == 1 and "--dtype=bfloat16" in warned[0] and "--dtype=float32" in warned[0], warned
    assert load_checkpoint(str(tmp_path))["iter_num"] == 2
    import evaluate  # the held-out sets under bf16 autocast: the same line, and the scores still come
    report = tmp_path / "eval.json"
    assert run_script(evaluate.main, [f"--init_from={tmp_path}", f"--teacher={tmp_path}", "--dtype=bfloat16",
                                      f"--sets={os.path.join(data_dir, 'val.bin')}", "--tokens=32",
                                      "--block_size=16", "--chat=False", f"--out={report}"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warned) == (0 if "avx512_bf16" in flags else 1) and json.loads(report.read_text())["sets"]


@pytest.mark.parametrize("environ", [{"WORLD_SIZE": "2"}, {"RANK": "1"}, {"WORLD_SIZE": "two", "RANK": "0"},
                                     {"WORLD_SIZE": "2", "RANK": "2"}])
def test_a_half_set_torchrun_environment_is_refused(data_dir, tmp_path, monkeypatch, capsys, environ):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    rc = run_script(train.main, TINY + [f"--dataset={data_dir}", f"--out_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and ("RANK" in err and "WORLD_SIZE" in err), err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_without_read_permission_is_not_called_corrupt(world, monkeypatch, capsys):
    """As root a chmod cannot take the permission away, so os.access answers as it would for a user."""
    monkeypatch.setattr(checkpoint.os, "access", lambda path, mode: path != world["ck"])
    rc = run_script(sample.main, [f"--init_from={world['ck']}", "--device=cpu"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "permission denied (it is not corrupt)" in err, err


def test_an_out_dir_without_write_permission_is_found_at_the_start(data_dir, tmp_path, monkeypatch, capsys):
    """As root a chmod cannot take the permission away, so os.access answers as it would for a user."""
    os.makedirs(tmp_path / "ro")
    monkeypatch.setattr(guards.os, "access", lambda path, mode: os.path.abspath(path) != str(tmp_path / "ro"))
    rc = run_script(train.main, TINY + [f"--dataset={data_dir}", f"--out_dir={tmp_path / 'ro' / 'run'}"])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and f"no write permission on {tmp_path / 'ro'}" in err, err
    assert os.listdir(tmp_path / "ro") == []


def test_a_second_run_into_a_locked_out_dir_refuses_and_a_killed_run_leaves_no_lock(data_dir, tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, guards; lock = guards.lock_out_dir(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(120)", str(tmp_path)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = TINY + [f"--dataset={data_dir}", f"--out_dir={tmp_path}"]
        assert run_script(train.main, argv) == 1
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and err.count("\n") == 1
        assert sorted(os.listdir(tmp_path)) == [".lock"]  # neither a checkpoint nor a log line
    finally:
        holder.kill()  # SIGKILL: no chance to clean up, yet the OS drops the lock
        holder.wait()
    assert run_script(train.main, argv) == 0
    assert load_checkpoint(str(tmp_path))["iter_num"] == 2


def test_stale_temp_checkpoints_are_removed(data_dir, tmp_path, capsys):
    argv = TINY + [f"--dataset={data_dir}", f"--out_dir={tmp_path}"]
    train.main(argv)
    (tmp_path / ".ckpt.pt.k1lled.tmp").write_bytes(b"PK\x03\x04 cut short")
    train.main(argv + ["--init_from=resume", "--max_iters=3", "--eval_interval=3"])
    assert not (tmp_path / ".ckpt.pt.k1lled.tmp").exists()
    assert "removed .ckpt.pt.k1lled.tmp" in capsys.readouterr().out


class FullDisk(io.RawIOBase):
    """A file on a device that fills up after `room` bytes, as the OS reports it: OSError ENOSPC."""

    def __init__(self, fd, room=1000):
        self.f, self.room = REAL_FDOPEN(fd, "wb"), room

    def writable(self):
        return True

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def fileno(self):
        return self.f.fileno()

    def close(self):
        self.f.close()
        super().close()


def test_a_full_disk_says_which_checkpoint_was_kept(data_dir, tmp_path, monkeypatch, capsys):
    argv = TINY + [f"--dataset={data_dir}", f"--out_dir={tmp_path}"]
    train.main(argv)
    before = (tmp_path / "ckpt.pt").read_bytes()
    monkeypatch.setattr(checkpoint.os, "fdopen", lambda fd, mode="r", *a, **k:
                        FullDisk(fd) if mode == "wb" else REAL_FDOPEN(fd, mode, *a, **k))
    rc = run_script(train.main, argv + ["--init_from=resume", "--max_iters=4", "--eval_interval=4"])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "no space left" in err and "checkpoint of iter 4" in err and "ckpt.pt (iter 2) was kept" in err, err
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [".lock", "ckpt.pt", "log.jsonl"]


def test_a_flipped_byte_is_refused_and_the_crc_check_costs_little(tmp_path):
    torch.manual_seed(0)
    sd = {f"w{i}": torch.randn(256, 1024) for i in range(10)}  # 10 MB
    config = {"n_layer": 1, "n_head": 1, "n_kv_head": 1, "n_embd": 2, "intermediate_size": 2, "vocab_size": 2,
              "block_size": 2, "kv_source": [0]}
    checkpoint.save_checkpoint({"model": sd, "model_config": config}, str(tmp_path / "c.pt"))
    torch.save({"model": sd, "model_config": config}, str(tmp_path / "old.pt"))  # no digests: CRCs only
    t0 = time.perf_counter()
    checkpoint.verify_crcs(str(tmp_path / "c.pt"))
    assert time.perf_counter() - t0 < 2.0  # ~2.5 ms here; generous for a loaded machine
    flip_a_byte(tmp_path / "c.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"c.pt is corrupt: tensor model.w\d does not match its digest"):
        load_checkpoint(str(tmp_path / "c.pt"))
    flip_a_byte(tmp_path / "old.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"old.pt is corrupt \(Bad CRC-32 for file '.*data/\d+'\)"):
        load_checkpoint(str(tmp_path / "old.pt"))


# -----------------------------------------------------------------------------
# signals: finish the step, checkpoint, exit


def test_sigterm_finishes_the_step_checkpoints_and_resumes_exactly(data_dir, tmp_path):
    argv = TINY + [f"--dataset={data_dir}", "--max_iters=100000", "--eval_interval=100000"]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")] + argv + [f"--out_dir={tmp_path / 'a'}"],
                            cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("iter 3: loss"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped = load_checkpoint(str(tmp_path / "a"))["iter_num"]
    assert f"stopped by SIGTERM at iter {stopped}; " in out and "Traceback" not in err
    # what was saved is exactly where the run was: resumed, it ends where a run straight through does
    short = ["--max_iters=" + str(stopped + 2), f"--eval_interval={stopped + 2}"]
    train.main(argv + short + [f"--out_dir={tmp_path / 'a'}", "--init_from=resume"])
    train.main(argv + short + [f"--out_dir={tmp_path / 'b'}"])
    a, b = (load_checkpoint(str(tmp_path / d)) for d in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def interrupt_at(monkeypatch, iteration, *gaps):
    """The forward pass of training step `iteration` (one micro-step each) sends this process SIGINT, then
    again after each gap (seconds)."""
    from model import Llama
    real, calls = Llama.forward, {"train": 0}

    def forward(self, *args, **kw):
        if torch.is_grad_enabled():
            calls["train"] += 1
            if calls["train"] == iteration + 1:
                os.kill(os.getpid(), signal.SIGINT)
                for gap in gaps:
                    time.sleep(gap)
                    os.kill(os.getpid(), signal.SIGINT)
        return real(self, *args, **kw)

    monkeypatch.setattr(Llama, "forward", forward)


def test_ctrl_c_twice_at_once_is_one_stop_and_checkpoints(data_dir, tmp_path, monkeypatch):
    """torchrun passes the terminal's SIGINT on to workers that got it too: two within a second are one."""
    interrupt_at(monkeypatch, 3, 0.05)
    handler = signal.getsignal(signal.SIGINT)
    argv = TINY + [f"--dataset={data_dir}", f"--out_dir={tmp_path}", "--max_iters=50", "--eval_interval=50"]
    assert train.main(argv) == 128 + signal.SIGINT
    assert load_checkpoint(str(tmp_path))["iter_num"] == 4  # the step in progress was finished and saved
    assert signal.getsignal(signal.SIGINT) is handler


def test_a_second_ctrl_c_quits_at_once(data_dir, tmp_path, monkeypatch, capsys):
    interrupt_at(monkeypatch, 3, 1.2)
    argv = TINY + [f"--dataset={data_dir}", f"--out_dir={tmp_path}", "--max_iters=50", "--eval_interval=50"]
    assert run_script(train.main, argv) == 130
    assert capsys.readouterr().err == "interrupted\n"
    assert not (tmp_path / "ckpt.pt").exists()


def worker_pids(parent):
    pids = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1]) == parent:
                pids.append(int(d))
        except OSError:
            pass
    return pids


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers through /proc")
def test_sigterm_to_one_ddp_rank_stops_both_at_the_same_step(data_dir, tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", os.path.join(ROOT, "train.py")] + TINY + [
        f"--dataset={data_dir}", f"--out_dir={tmp_path}", "--max_iters=100000", "--eval_interval=100000"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("iter 3: loss"):
            os.kill(max(worker_pids(proc.pid)), signal.SIGTERM)  # one rank only (which one does not matter)
            break
    out, err = proc.communicate(timeout=180)
    stopped = load_checkpoint(str(tmp_path))["iter_num"]
    assert f"stopped by SIGTERM at iter {stopped}; " in out, out[-2000:] + err[-2000:]
    assert "weights on all 2 ranks are identical" in out  # both got there, at the same step


# -----------------------------------------------------------------------------
# export to Hugging Face


def test_export_overwrite_onto_a_symlink_replaces_what_it_points_to(world, tmp_path, capsys):
    shutil.copytree(world["hf"], tmp_path / "target")
    (tmp_path / "target" / "stale.bin").write_bytes(b"an earlier model's file")
    os.symlink(tmp_path / "target", tmp_path / "link")
    assert run_script(convert_hf.main, ["export", world["ck"], str(tmp_path / "link"), "--overwrite"]) == 0
    assert os.path.islink(tmp_path / "link") and os.path.realpath(tmp_path / "link") == str(tmp_path / "target")
    assert sorted(os.listdir(tmp_path / "target")) == ["config.json", "meta.json", "model.safetensors"]  # meta: the char table
    assert sorted(os.listdir(tmp_path)) == ["link", "target"]  # no .link.old-PID left behind


def test_export_in_bfloat16_verifies_and_a_failed_verify_leaves_nothing(world, tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    dst = tmp_path / "hf"
    assert run_script(convert_hf.main, ["export", world["ck"], str(dst), "--dtype=bfloat16", "--verify"]) == 0
    assert "verified" in capsys.readouterr().out
    assert json.load(open(dst / "config.json"))["dtype"] == "bfloat16"
    # --overwrite replaces the directory whole: no file of before stays
    (dst / "pytorch_model.bin").write_bytes(b"stale weights a loader might prefer")
    assert run_script(convert_hf.main, ["export", world["ck"], str(dst), "--overwrite"]) == 0
    assert sorted(os.listdir(dst)) == ["config.json", "meta.json", "model.safetensors"]  # meta.json: the char table
    # a config that transformers reads differently from us: verification fails and nothing is left
    real = convert_hf.hf_config_from_llama
    monkeypatch.setattr(convert_hf, "hf_config_from_llama", lambda *a, **k: {**real(*a, **k), "rms_norm_eps": 0.5})
    rc = run_script(convert_hf.main, ["export", world["ck"], str(tmp_path / "new" / "hf"), "--verify"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "verification failed" in err, err
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # neither new/ nor a temp directory


# -----------------------------------------------------------------------------
# the DDP command of docs/training.md


@pytest.mark.parametrize("given, world_size, want", [(1, 2, 2), (3, 2, 4), (4, 2, 4), (1, 1, 1), (5, 8, 8)])
def test_gradient_accumulation_is_rounded_up_to_the_world_size_unless_given(given, world_size, want):
    s, explicit = train.configure(train.DEFAULTS, [], "", train.CHOICES)
    s.gradient_accumulation_steps = given
    note = guards.accumulation_for_world(s, explicit, world_size)
    assert s.gradient_accumulation_steps == want and (note is None) == (given == want)
    s, explicit = train.configure(train.DEFAULTS, [f"--gradient_accumulation_steps={given}"], "", train.CHOICES)
    assert guards.accumulation_for_world(s, explicit, world_size) is None and s.gradient_accumulation_steps == given


# -----------------------------------------------------------------------------
# checkpoint integrity: the tensors as torch read them, not only the container


def tiny_training_checkpoint():
    """A checkpoint with every part train.py writes (weights, AdamW state, RNG, sampler), kept small so that
    every byte of its central directory can be flipped in turn."""
    from model import Llama, LlamaConfig
    torch.manual_seed(0)
    cfg = LlamaConfig(n_layer=1, n_head=2, n_kv_head=1, n_embd=8, intermediate_size=8, vocab_size=8, block_size=4)
    model = Llama(cfg)
    opt = torch.optim.AdamW([model.norm.weight], lr=1e-3)  # its state's structure; one parameter keeps it small
    model(torch.randint(0, 8, (1, 4)), torch.randint(0, 8, (1, 4)))[1].backward()
    opt.step()
    rng = {"torch": torch.get_rng_state(), "python": [3, [1, 2], None], "numpy": ["MT19937", [1, 2], 0, 0, 0.0],
           "cuda": []}  # the shape of checkpoint.rng_state(), without its 1,250 numbers that take long to unpickle
    return {"model": model.state_dict(), "model_config": cfg.to_dict(), "optimizer": opt.state_dict(),
            "iter_num": 5, "best_val_loss": 1.5, "rng": rng, "sampler": {"seed": 1}}


def identical(a, b):
    """Same structure, same values, tensors byte for byte (a NaN equals itself)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            a.contiguous().view(-1).view(torch.uint8).tolist() == b.contiguous().view(-1).view(torch.uint8).tolist()
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    return a == b


def central_directory(data):
    """(offset of the central directory, [offset of each entry's external attributes])."""
    eocd = data.rfind(b"PK\x05\x06")
    start = int.from_bytes(data[eocd + 16: eocd + 20], "little")
    attrs, p = [], start
    while data[p:p + 4] == b"PK\x01\x02":
        name, extra, comment = (int.from_bytes(data[p + k: p + k + 2], "little") for k in (28, 30, 32))
        attrs.append(p + 38)
        p += 46 + name + extra + comment
    return start, attrs


@pytest.mark.parametrize("with_digests", [True, False], ids=["digests", "older checkpoint: crc only"])
def test_every_flip_of_the_zip_structure_is_refused_in_one_line_or_loads_identical_data(tmp_path, with_digests):
    """Each damaged copy either loads exactly what was saved or is refused with a CheckpointError of one
    line; nothing loads different data and nothing else escapes (zipfile.BadZipFile, a RuntimeError)."""
    good = str(tmp_path / "good.pt")
    ck = tiny_training_checkpoint()
    if with_digests:
        checkpoint.save_checkpoint(ck, good)
    else:
        torch.save(ck, good)  # as written before the digests
    data = open(good, "rb").read()
    reference = load_checkpoint(good)
    start, attrs = central_directory(data)
    assert len(attrs) == len(zipfile.ZipFile(good).infolist()) > 10
    flips = [(a + byte, 1 << bit) for a in attrs for byte in range(4) for bit in range(8)]  # external attributes
    if with_digests:  # the container is read alike either way: its every byte once is enough
        flips += [(i, 0xFF) for i in range(start, len(data))]  # every byte of the central directory and end records
        flips += [(i, 0x10) for i in np.random.default_rng(0).choice(start, 300, replace=False)]  # headers and data
    bad = (tmp_path / "bad.pt")
    outcomes = {"refused": 0, "identical": 0}
    for offset, mask in flips:
        damaged = bytearray(data)
        damaged[offset] ^= mask
        bad.write_bytes(bytes(damaged))
        try:
            loaded = load_checkpoint(str(bad))
        except checkpoint.CheckpointError as e:
            assert "\n" not in str(e) and "bad.pt" in str(e), (offset, mask, str(e))
            outcomes["refused"] += 1
            continue
        assert identical(reference, loaded), f"byte {offset} ^ {mask:#x} loads different data"
        outcomes["identical"] += 1
    # the directory bit of every entry is among the refusals: it once made torch read uninitialised memory
    assert outcomes["refused"] >= len(attrs) and outcomes["identical"] > 0, outcomes


def test_a_tensor_that_differs_from_its_digest_is_named(tmp_path):
    ck = tiny_training_checkpoint()
    path = str(tmp_path / "c.pt")
    checkpoint.save_checkpoint(ck, path)
    raw = torch.load(path, weights_only=True)
    kept = raw["optimizer"]["state"][0]["exp_avg"].clone()
    raw["optimizer"]["state"][0]["exp_avg"].view(-1)[0] += 1  # torch.save keeps the digests of before
    torch.save(raw, path)
    with pytest.raises(checkpoint.CheckpointError, match=r"c.pt is corrupt: tensor optimizer.state.0.exp_avg does "
                                                         r"not match its digest; restore a good copy"):
        load_checkpoint(path)
    raw["optimizer"]["state"][0]["exp_avg"] = kept
    del raw["model"]["norm.weight"]
    torch.save(raw, path)
    with pytest.raises(checkpoint.CheckpointError, match="tensor model.norm.weight is missing"):
        load_checkpoint(path)


# -----------------------------------------------------------------------------
# every ending that can be caught: a checkpoint at the current step, and a resume that is exact


def train_until(argv, out_dir, line="iter 3: loss", env=None):
    """train.py in a process of its own, its stdout read up to `line`; (process, the lines read)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")] + argv + [f"--out_dir={out_dir}"],
                            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for text in proc.stdout:
        seen.append(text)
        if text.startswith(line):
            break
    return proc, seen


def resumes_exactly(argv, stopped_dir, fresh_dir, stopped):
    """Resumed from where it stopped, the run ends with the weights of a run straight through."""
    short = ["--max_iters=" + str(stopped + 2), f"--eval_interval={stopped + 2}"]
    train.main(argv + short + [f"--out_dir={stopped_dir}", "--init_from=resume"])
    train.main(argv + short + [f"--out_dir={fresh_dir}"])
    a, b = load_checkpoint(str(stopped_dir)), load_checkpoint(str(fresh_dir))
    return all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT], ids=["SIGHUP", "SIGQUIT"])
def test_a_closed_terminal_or_sigquit_checkpoints_the_current_step_and_resumes_exactly(data_dir, tmp_path, signum):
    argv = TINY + [f"--dataset={data_dir}", "--max_iters=100000", "--eval_interval=100000"]
    proc, _ = train_until(argv, tmp_path / "a")
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    stopped = load_checkpoint(str(tmp_path / "a"))["iter_num"]
    assert f"stopped by {signal.Signals(signum).name} at iter {stopped}; " in out and "Traceback" not in err, err
    done = [json.loads(r) for r in open(tmp_path / "a" / "log.jsonl")][-1]
    assert done["kind"] == "done" and done["stopped"] == signum and done["iters"] == stopped
    assert resumes_exactly(argv, tmp_path / "a", tmp_path / "b", stopped)


def test_a_closed_stdout_does_not_stop_training(data_dir, tmp_path):
    """`train.py | head`: the reader goes away; the run trains to the end and logs to log.jsonl."""
    argv = TINY + [f"--dataset={data_dir}", "--max_iters=20", "--eval_interval=10"]
    proc, _ = train_until(argv, tmp_path / "a", line="iter 1: loss")
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err
    assert err.count("\n") == 1 and "stdout is closed" in err and "Traceback" not in err, err
    records = [json.loads(r) for r in open(tmp_path / "a" / "log.jsonl")]
    assert records[-1]["kind"] == "done" and records[-1]["iters"] == 20 and not records[-1]["stopped"]
    assert load_checkpoint(str(tmp_path / "a"))["iter_num"] == 20


def test_a_non_ascii_out_dir_under_an_ascii_terminal_trains(data_dir, tmp_path):
    out_dir = tmp_path / "r\u00e9sum\u00e9-\u8dd1"
    proc, _ = train_until(TINY + [f"--dataset={data_dir}"], out_dir, line="\0",
                          env={"LANG": "C", "LC_ALL": "C", "PYTHONIOENCODING": "ascii"})
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err, err
    assert load_checkpoint(str(out_dir))["iter_num"] == 2


class FillsUp:
    """log.jsonl on a disk that fills up at the n-th append: that write stops halfway with ENOSPC."""

    def __init__(self, n):
        self.n, self.real = n, open

    def __call__(self, path, mode="r", *a, **k):
        f = self.real(path, mode, *a, **k)
        if str(path).endswith("log.jsonl") and "a" in mode:
            self.n -= 1
            if self.n <= 0:
                real_write = f.write

                def write(data):
                    real_write(data[: len(data) // 2])
                    f.flush()
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                f.write = write
        return f


def test_a_disk_that_fills_while_logging_stops_with_a_checkpoint_and_no_torn_line(data_dir, tmp_path, monkeypatch,
                                                                                  capsys):
    import monitor
    argv = TINY + [f"--dataset={data_dir}", "--max_iters=50", "--eval_interval=50"]
    monkeypatch.setattr(monitor, "open", FillsUp(8), raising=False)  # start, eval, iter 0-4, then the 8th
    rc = run_script(train.main, argv + [f"--out_dir={tmp_path / 'a'}"])
    monkeypatch.undo()
    out, err = capsys.readouterr()
    assert rc == 1 and "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 2 and "cannot append to" in lines[0] and "No space left" in lines[0], err
    stopped = load_checkpoint(str(tmp_path / "a"))["iter_num"]
    assert lines[1].startswith("error: no space left on the device") and f"ckpt.pt holds iter {stopped}" in lines[1]
    assert stopped == 6  # the step the full disk was found at: nothing trained was lost
    for line in open(tmp_path / "a" / "log.jsonl"):  # every line whole
        json.loads(line)
    assert resumes_exactly(argv, tmp_path / "a", tmp_path / "b", stopped)


def test_readers_of_a_log_skip_a_torn_last_line_naming_the_file_and_a_stopped_run_is_not_finished(tmp_path, capsys):
    import importlib.util
    from monitor import read_log
    spec = importlib.util.spec_from_file_location("_echo", os.path.join(ROOT, "experiments", "echo.py"))
    echo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(echo)
    log = tmp_path / "log.jsonl"
    config = {"max_iters": 10}
    records = [{"kind": "start", "config": config}, {"kind": "done", "iters": 10, "stopped": 0}]
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "tra')
    assert read_log(str(log)) == records
    assert f"{log}: skipped its last line" in capsys.readouterr().err
    assert echo.finished_records(str(tmp_path), ["--max_iters=10"]) is not None
    records[-1]["stopped"] = signal.SIGTERM
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert echo.finished_records(str(tmp_path), ["--max_iters=10"]) is None  # run again, not reused
    log.write_text('{"kind": "st\n' + json.dumps(records[0]) + "\n")
    with pytest.raises(ValueError, match=r"log.jsonl line 1 is not a log record"):
        read_log(str(log))


# -----------------------------------------------------------------------------
# imported configs: checked by type and range, one line naming the field

HF_FIELDS = [  # (change to config.json, what the line must name); each must be refused
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings='yes'"), ({"tie_word_embeddings": None}, "tie_word_embeddings"),
    ({"tie_word_embeddings": 1.5}, "tie_word_embeddings"), ({"rope_theta": 0}, "rope_theta=0"),
    ({"rope_theta": -10000.0}, "rope_theta=-10000.0"), ({"rope_theta": float("nan")}, "rope_theta=nan"),
    ({"rope_theta": "1e4"}, "rope_theta='1e4'"), ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
    ({"num_attention_heads": 4.7}, "num_attention_heads=4.7"), ({"num_key_value_heads": 0}, "num_key_value_heads"),
    ({"hidden_size": None}, "hidden_size is missing"), ({"hidden_size": [32]}, "hidden_size=[32]"),
    ({"vocab_size": True}, "vocab_size=True"), ({"num_hidden_layers": -2}, "num_hidden_layers=-2"),
    ({"max_position_embeddings": "long"}, "max_position_embeddings"), ({"attention_bias": "false "}, None),
    ({"rope_scaling": {"rope_type": "llama3", "factor": float("inf")}}, "rope_scaling.factor=inf"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1}}, "rope_parameters.rope_theta=-1"),
    ({"deep": "NEST"}, "nested"),
]


def nested(depth):
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("change, names", HF_FIELDS, ids=[str(c)[:40] for c, _ in HF_FIELDS])
def test_an_hf_config_field_of_the_wrong_type_or_range_is_refused_in_one_line(world, tmp_path, capsys, change,
                                                                              names):
    shutil.copytree(world["hf"], tmp_path / "hf")
    config = json.load(open(tmp_path / "hf" / "config.json")) | change
    text = json.dumps(config).replace('"NEST"', nested(200_000))
    (tmp_path / "hf" / "config.json").write_text(text)
    rc = run_script(convert_hf.main, ["import", str(tmp_path / "hf"), str(tmp_path / "out.pt")])
    err = capsys.readouterr().err
    if names is None:  # a boolean spelled as text reads as that boolean, "false" as false
        assert rc == 0, err
        return
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1 and names in err, err
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("text, tied", [("false", False), ("False", False), ("true", True)])
def test_tie_word_embeddings_written_as_text_is_read_as_the_boolean_it_spells(world, tmp_path, text, tied):
    shutil.copytree(world["hf"], tmp_path / "hf")
    config = json.load(open(tmp_path / "hf" / "config.json"))
    config["tie_word_embeddings"] = text
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    hf = convert_hf.checked_hf_fields(config)
    assert hf["tie_word_embeddings"] is tied
    if not tied:
        assert run_script(convert_hf.main, ["import", str(tmp_path / "hf"), str(tmp_path / "o.pt")]) == 0
        assert load_checkpoint(str(tmp_path / "o.pt"))["model_config"]["tie_embeddings"] is False


GGUF_FIELDS = [  # (GGUF metadata changes, what the line must name)
    ({"llama.attention.head_count": 4.7}, "llama.attention.head_count=4.7"),
    ({"llama.rope.freq_base": float("nan")}, "llama.rope.freq_base=nan"),
    ({"llama.rope.freq_base": 0.0}, "llama.rope.freq_base=0.0"),
    ({"llama.block_count": "2"}, "llama.block_count='2'"), ({"llama.block_count": [2]}, "llama.block_count=[2]"),
    ({"llama.embedding_length": None}, "llama.embedding_length=None"),
    ({"llama.attention.layer_norm_rms_epsilon": -1e-5}, "layer_norm_rms_epsilon"),
    ({"llama.expert_count": 1.5}, "llama.expert_count=1.5"),
]


@pytest.mark.parametrize("change, names", GGUF_FIELDS, ids=[str(c)[:40] for c, _ in GGUF_FIELDS])
def test_gguf_metadata_of_the_wrong_type_or_range_is_refused_naming_it(change, names):
    import gguf_import
    meta = {"general.architecture": "llama", "llama.embedding_length": 32, "llama.attention.head_count": 2,
            "llama.block_count": 2, "llama.feed_forward_length": 64, "llama.attention.head_count_kv": 1}
    gguf_import.llama_config_from_gguf(meta, 16, False)  # the unchanged metadata converts
    with pytest.raises(checkpoint.ConversionError, match="^[^\n]*$") as e:
        gguf_import.llama_config_from_gguf(meta | change, 16, False)
    assert names in str(e.value)


def test_gguf_merges_outside_the_vocabulary_are_refused():
    pytest.importorskip("tokenizers")
    import gguf_import
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
    if "default" not in gguf_import._GGUF_PRE_SPLIT:
        meta["tokenizer.ggml.pre"] = sorted(k for k in gguf_import._GGUF_PRE_SPLIT if k)[0]
    gguf_import.gguf_tokenizer(meta)
    with pytest.raises(checkpoint.ConversionError, match=r"merges entry 0 \('a' 'c'\) names a token outside"):
        gguf_import.gguf_tokenizer(meta | {"tokenizer.ggml.merges": ["a c"]})
    with pytest.raises(checkpoint.ConversionError, match="tokenizer.ggml.tokens must be a list of strings"):
        gguf_import.gguf_tokenizer(meta | {"tokenizer.ggml.tokens": ["a", 7]})


def test_non_finite_logits_past_position_0_are_found(world):
    model, _ = checkpoint.load_model(world["ck"])
    convert_hf.check_finite(model, "ok")
    token_at_position_1 = 7919 % model.config.vocab_size
    with torch.no_grad():
        model.embed_tokens.weight[token_at_position_1] = float("nan")
    logits, _ = model(torch.zeros(1, 1, dtype=torch.long))
    assert torch.isfinite(logits).all()  # what the check at position 0 alone saw
    with pytest.raises(checkpoint.ConversionError, match=r"non-finite logits \(first at position \d+ of 16\)"):
        convert_hf.check_finite(model, "broken")


# -----------------------------------------------------------------------------
# datasets checked against their meta.json before any work

META_CHANGES = [  # (change to meta.json, or "ids" to write an id past the vocabulary; what the line must name)
    (lambda m: m.pop("chars"), "a char tokenizer needs 'chars'"),
    (lambda m: m["chars"].pop(), "'chars' has"),
    (lambda m: m.update(tokenizer="bpe"), "unknown tokenizer 'bpe'"),
    (lambda m: m.update(tokenizer="gpt2"), "smaller than the gpt2 tokenizer's"),
    (lambda m: m.update(vocab_size=100_000), "dtype uint16 cannot hold the token ids of a vocabulary of 100000"),
    (lambda m: m.update(eot_token=10 ** 6), "eot_token 1000000"),
    (lambda m: m.update(chars=["a"] * len(m["chars"])), "lists a character twice"),
    (lambda m: m.update(tokenizer="hf", tokenizer_file="gone.json"), "its tokenizer file"),
    ("ids", "holds token id"),
]


@pytest.mark.parametrize("change, names", META_CHANGES, ids=[n for _, n in META_CHANGES])
def test_a_dataset_that_contradicts_its_meta_json_is_refused_before_work(data_dir, tmp_path, capsys, change, names):
    shutil.copytree(data_dir, tmp_path / "d")
    meta = json.load(open(tmp_path / "d" / "meta.json"))
    if change == "ids":
        ids = np.fromfile(tmp_path / "d" / "val.bin", dtype=np.uint16)
        ids[-1] = meta["vocab_size"] + 3
        ids.tofile(tmp_path / "d" / "val.bin")
    else:
        change(meta)
        (tmp_path / "d" / "meta.json").write_text(json.dumps(meta))
    rc = run_script(train.main, TINY + [f"--dataset={tmp_path / 'd'}", f"--out_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1 and names in err, err
    assert not (tmp_path / "out").exists()
