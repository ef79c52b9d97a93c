"""train.py: the configurator, training, exact resume, checkpoints, DDP, and each bad input."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import train
from checkpoint import load_checkpoint, save_checkpoint
from configurator import ConfigError, HelpRequested, configure
from model import Llama, LlamaConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=2", "--n_head=2", "--n_kv_head=1", "--n_embd=32", "--intermediate_size=64",
        "--block_size=16", "--batch_size=4", "--eval_iters=2", "--log_interval=1", "--compile=False",
        "--learning_rate=1e-2", "--warmup_iters=2", "--min_lr=1e-3", "--dtype=float32", "--max_iters=2",
        "--lr_decay_iters=2"]


def run(data_dir, out_dir, *args):
    return train.main(TINY + [f"--dataset={data_dir}", f"--out_dir={out_dir}"] + list(args))


def records(out_dir, kind):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("kind") == kind]


def parse_args(argv):
    s, explicit = configure(train.DEFAULTS, argv, train.__doc__, train.CHOICES)
    return vars(s), explicit


def train_losses(out_dir):
    return {r["iter"]: r["loss"] for r in records(out_dir, "train")}


# ---- configurator


def test_config_file_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("import math\nn_layer = 6\nkv_source = [0, 0, 2, 2, 4, 4]\nlearning_rate = 1\n")
    cfg, explicit = parse_args([str(cfg_file), "--n_layer=8", "--compile=false", "--decay_lr=False",
                                      "--kv_source=cla:2", "--min_lr=3e-5", "--out_dir='x y'"])
    assert cfg["n_layer"] == 8 and cfg["kv_source"] == "cla:2" and cfg["compile"] is False
    assert cfg["learning_rate"] == 1.0 and isinstance(cfg["learning_rate"], float)
    assert cfg["decay_lr"] is False and cfg["min_lr"] == 3e-5 and cfg["out_dir"] == "x y"
    assert {"n_layer", "kv_source", "learning_rate", "compile"} <= explicit and "batch_size" not in explicit
    cfg, _ = parse_args(["--kv_source=0,0,2,2"])
    assert cfg["kv_source"] == "0,0,2,2"


@pytest.mark.parametrize("argv, match", [
    (["--n_layerz=3"], "unknown setting 'n_layerz'.*allowed: .*batch_size"),
    (["--batch_size=big"], "batch_size .* must be int"),
    (["--batch_size=2.5"], "batch_size .* must be int"),
    (["--decay_lr=maybe"], "decay_lr .* must be bool"),
    (["--learning_rate=fast"], "learning_rate .* must be float"),
    (["--dtype=fp8"], "dtype .* must be 'auto' or 'float32' or 'bfloat16' or 'float16'"),
    (["--compile=sometimes"], "compile .* must be 'auto' or True or False"),
    (["--max_iters"], "--max_iters needs a value"),
    (["no/such/config.py"], "config file .* not found"),
])
def test_config_errors(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_args(argv)


def test_help_lists_settings(capsys):
    with pytest.raises(HelpRequested, match="--kv_source='upper:half'"):
        parse_args(["--help"])
    rc = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert rc.returncode == 0 and "--kv_source='upper:half'" in rc.stdout


def test_config_file_errors(tmp_path):
    (tmp_path / "a.py").write_text("n_layers = 3\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'n_layers' \(in .*a.py\); allowed"):
        parse_args([str(tmp_path / "a.py")])
    (tmp_path / "b.py").write_text("batch_size = '8'\n")
    with pytest.raises(ConfigError, match="batch_size .* must be int"):
        parse_args([str(tmp_path / "b.py")])


def test_shipped_configs_are_valid():
    for name in sorted(os.listdir(os.path.join(ROOT, "config"))):
        cfg, _ = parse_args([os.path.join(ROOT, "config", name)])
        mc = {k: cfg[k] for k in train.MODEL_KEYS}
        mc["vocab_size"] = mc["vocab_size"] or 84
        LlamaConfig(**mc)  # validates kv_source and shapes without building the weights
    cfg, _ = parse_args([os.path.join(ROOT, "config", "train_tinyllama_shared.py")])
    assert (cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["n_kv_head"], cfg["intermediate_size"],
            cfg["vocab_size"], cfg["block_size"]) == (22, 2048, 32, 4, 5632, 0, 2048)  # vocab: the dataset's
    assert parse_args([os.path.join(ROOT, "config", "train_shakespeare_char.py")])[0] == train.DEFAULTS


# ---- training


@pytest.mark.parametrize("kv", ["dense", "upper:half"])
def test_tiny_run_lowers_loss(data_dir, tmp_path, kv):
    summary = run(data_dir, tmp_path, f"--kv_source={kv}", "--max_iters=25", "--eval_interval=25",
                  "--lr_decay_iters=25")
    evals = records(tmp_path, "eval")
    assert evals[0]["iter"] == 0 and evals[-1]["iter"] == 25
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.8, evals
    assert summary["val_loss"] == evals[-1]["val_loss"] and summary["tokens_per_s"] > 0
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert {"model", "optimizer", "model_config", "iter_num", "best_val_loss", "rng", "sampler",
            "config"} <= set(ckpt)
    assert ckpt["iter_num"] == 25 and ckpt["config"]["kv_source"] == kv
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    model = Llama(LlamaConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    assert (len(model.config.owners) == 2) == (kv == "dense")


def test_exact_resume(data_dir, tmp_path):
    common = ["--max_iters=8", "--lr_decay_iters=8", "--eval_interval=4", "--gradient_accumulation_steps=2"]
    run(data_dir, tmp_path / "a", *common)
    straight = train_losses(tmp_path / "a")
    run(data_dir, tmp_path / "b", *common, "--max_iters=4")
    run(data_dir, tmp_path / "b", *common, "--init_from=resume")
    resumed = train_losses(tmp_path / "b")
    assert sorted(straight) == sorted(resumed) == list(range(8))
    assert straight == resumed  # bit for bit
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_weights_only_file(data_dir, tmp_path):
    """convert_hf.py writes {'model', 'model_config'}: init_from=<file> starts a new run from it."""
    config = LlamaConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, intermediate_size=64, vocab_size=20,
                         block_size=32, kv_source="dense")
    torch.save({"model": Llama(config).state_dict(), "model_config": config.to_dict()}, tmp_path / "conv.pt")
    summary = run(data_dir, tmp_path / "out", f"--init_from={tmp_path / 'conv.pt'}", "--kv_source=dense",
                  "--max_iters=2", "--eval_interval=2")
    assert summary["iters"] == 2
    ck = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ck["model_config"]["block_size"] == 16  # the command line's context length
    assert ck["model_config"]["vocab_size"] == 20


# ---- checkpoints, failures, bad inputs


def test_failed_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    mc = {"n_layer": 1, "n_head": 1, "n_kv_head": 1, "n_embd": 2, "intermediate_size": 2, "vocab_size": 2,
          "block_size": 2, "kv_source": [0]}  # load_checkpoint checks the structure: a model_config it could build
    save_checkpoint({"model": {"w": torch.ones(3)}, "model_config": mc, "iter_num": 1}, str(path))

    def broken_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "model_config": mc, "iter_num": 2}, str(path))
    monkeypatch.undo()
    ck = load_checkpoint(str(path))
    assert ck["iter_num"] == 1 and torch.equal(ck["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind


def test_killed_write_leftover_is_ignored(data_dir, tmp_path):
    """A process killed mid-write leaves only a hidden temp file; ckpt.pt and resume are unaffected."""
    run(data_dir, tmp_path, "--max_iters=2", "--eval_interval=2")
    (tmp_path / ".ckpt.pt.abc123.tmp").write_bytes(b"PK\x03\x04 cut short")
    assert run(data_dir, tmp_path, "--init_from=resume", "--max_iters=3", "--eval_interval=3")["iters"] == 3


def poison_training_forward(monkeypatch, nth):
    """The nth forward pass of training (evaluation runs without gradients and is not counted) returns a
    NaN loss, as a diverging run would."""
    real, calls = Llama.forward, {"train": 0}

    def poisoned(self, *args, **kw):
        logits, loss = real(self, *args, **kw)
        if torch.is_grad_enabled():
            calls["train"] += 1
            if calls["train"] == nth:
                return logits, loss * float("nan")
        return logits, loss

    monkeypatch.setattr(Llama, "forward", poisoned)


def test_nan_loss_stops_and_keeps_checkpoint(data_dir, tmp_path, monkeypatch):
    poison_training_forward(monkeypatch, 4)  # iter 3
    with pytest.raises(ValueError, match=r"training loss is nan at iter 3.*checkpoint .*ckpt.pt \(iter 2\) was kept"):
        run(data_dir, tmp_path, "--max_iters=6", "--eval_interval=2")
    ck = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ck["iter_num"] == 2
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_nan_loss_between_log_steps_is_caught_before_the_next_checkpoint(data_dir, tmp_path, monkeypatch):
    """The loss is read back at log steps only; a NaN at an iteration that logs nothing still stops the run
    at the next evaluation, naming its iteration, and the checkpoint before it stays byte for byte."""
    run(data_dir, tmp_path, "--max_iters=2", "--eval_interval=2")
    before = (tmp_path / "ckpt.pt").read_bytes()
    poison_training_forward(monkeypatch, 2)  # the resumed run's second step: iter 3
    with pytest.raises(ValueError, match=r"training loss is nan at iter 3: .*ckpt.pt \(iter 2\) was kept\. Lower"):
        run(data_dir, tmp_path, "--init_from=resume", "--max_iters=8", "--eval_interval=4", "--log_interval=5")
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert records(tmp_path, "diverged")[-1]["iter"] == 3
    assert [r["iter"] for r in records(tmp_path, "eval")] == [0, 2]  # the first run's: iter 4 was not evaluated


def test_corrupt_checkpoint(data_dir, tmp_path):
    run(data_dir, tmp_path, "--max_iters=2", "--eval_interval=2")
    path = tmp_path / "ckpt.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt, truncated"):
        run(data_dir, tmp_path, "--max_iters=4", "--init_from=resume")
    assert path.read_bytes() == data[: len(data) // 2]  # left as it was
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="corrupt, truncated"):
        run(data_dir, tmp_path, "--init_from=resume")
    torch.save({"weights": 1}, path)
    with pytest.raises(ValueError, match="needs 'model' and 'model_config'"):
        run(data_dir, tmp_path, "--init_from=resume")
    with pytest.raises(ValueError, match="does not exist"):
        run(data_dir, tmp_path / "empty", "--init_from=resume")
    with pytest.raises(ValueError, match="no such file"):
        run(data_dir, tmp_path, f"--init_from={tmp_path / 'nope.pt'}")


def test_checkpoint_conflicts_with_command_line(data_dir, tmp_path):
    run(data_dir, tmp_path, "--max_iters=2", "--eval_interval=2", "--kv_source=upper:half")
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(ValueError, match=r"conflict with checkpoint .*n_layer=3 \(checkpoint: 2\).*kv_source='dense'"):
        run(data_dir, tmp_path, "--init_from=resume", "--n_layer=3", "--kv_source=dense", "--max_iters=4")
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    # the same values spelled differently are no conflict, and training continues from iter 2
    summary = run(data_dir, tmp_path, "--init_from=resume", "--kv_source=0,0", "--max_iters=3", "--eval_interval=3")
    assert summary["iters"] == 3


def test_block_size_longer_than_data(tmp_path):
    import numpy as np
    from dataset import write_meta, write_tokens
    write_tokens(str(tmp_path / "train.bin"), np.arange(100) % 5, 5)
    write_tokens(str(tmp_path / "val.bin"), np.arange(10) % 5, 5)
    write_meta(str(tmp_path), 5, "char", chars=list("abcde"))
    with pytest.raises(ValueError, match=r"block_size=16 is longer than the data: .*val.bin has 10 tokens"):
        run(str(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_missing_data(tmp_path):
    with pytest.raises(ValueError, match=r"train.bin.*missing"):
        run(str(tmp_path / "nothing"), tmp_path / "out")
    if not os.path.exists(os.path.join(ROOT, "data", "tinystories", "train.bin")):
        with pytest.raises(ValueError, match=r"run `.venv/bin/python data/tinystories/prepare.py` first"):
            train.main(TINY + ["--dataset=tinystories", f"--out_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"no_such_set.*datasets with a prepare script: .*shakespeare_char"):
        train.main(TINY + ["--dataset=no_such_set", f"--out_dir={tmp_path}"])


def test_batch_must_divide_over_ranks(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="gradient_accumulation_steps=3 does not divide over 2 ranks"):
        run(data_dir, tmp_path, "--gradient_accumulation_steps=3")


def test_bad_model_settings(data_dir, tmp_path):
    with pytest.raises(ValueError, match="kv_source.*points forward"):
        run(data_dir, tmp_path, "--kv_source=0,2,2,2", "--n_layer=4")
    with pytest.raises(ValueError, match="bad model settings: n_embd=30 is not divisible"):
        run(data_dir, tmp_path, "--n_embd=30", "--n_head=4")


# ---- DDP


def test_torchrun_two_ranks_gloo(data_dir, tmp_path):
    """docs/training.md's `torchrun --standalone --nproc_per_node=2 train.py --device=cpu`, as written: no
    gradient_accumulation_steps given, so it becomes 2 (the default 1 does not divide over 2 ranks)."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")  # installed with torch
    cmd = [torchrun, "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py")] + TINY + [
        f"--dataset={data_dir}", f"--out_dir={tmp_path}", "--max_iters=4", "--eval_interval=4", "--device=cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "gradient_accumulation_steps=2 (not 1)" in r.stdout
    assert "weights on all 2 ranks are identical" in r.stdout
    assert r.stdout.count("saved ") == 1  # only rank 0 writes
    done = records(tmp_path, "done")[-1]
    assert done["ddp_weights_identical"] and math.isfinite(done["val_loss"])
    # the ranks drew the micro-steps a single process draws: the same losses up to float reduction order
    single = tmp_path / "single"
    run(data_dir, single, "--max_iters=4", "--eval_interval=4", "--gradient_accumulation_steps=2")
    ddp_losses, single_losses = train_losses(tmp_path), train_losses(single)
    assert ddp_losses.keys() == single_losses.keys()
    assert all(abs(ddp_losses[i] - single_losses[i]) < 1e-4 for i in ddp_losses)


def test_checkpoint_gets_the_usual_file_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    save_checkpoint({"a": 1}, str(tmp_path / "c.pt"))
    assert os.stat(tmp_path / "c.pt").st_mode & 0o777 == 0o666 & ~umask


# ---- runs that must not clobber or mislead


def test_lr_schedule_follows_max_iters(data_dir, tmp_path):
    # lr_decay_iters=0 (the default) ends the decay at max_iters: halfway down the cosine at iter 3 of 4
    run(data_dir, tmp_path, "--max_iters=4", "--lr_decay_iters=0", "--eval_interval=4")
    lr = {r["iter"]: r["lr"] for r in records(tmp_path, "train")}
    assert lr[3] == pytest.approx(1e-3 + 0.5 * (1e-2 - 1e-3))
    assert parse_args([])[0]["lr_decay_iters"] == 0


def test_resume_of_a_finished_run_says_so(data_dir, tmp_path, capsys):
    run(data_dir, tmp_path, "--max_iters=2", "--eval_interval=2")
    capsys.readouterr()
    # no --max_iters: the run's own (2) applies, not train.py's default
    train.main(TINY[:-2] + [f"--dataset={data_dir}", f"--out_dir={tmp_path}", "--init_from=resume"])
    out = capsys.readouterr().out
    assert "already reached max_iters=2" in out and "--max_iters=4" in out and "done:" not in out
    assert len(records(tmp_path, "start")) == 1  # nothing appended to the log


def test_new_run_refuses_to_replace_another_models_checkpoint(data_dir, tmp_path, capsys):
    run(data_dir, tmp_path, "--max_iters=2", "--eval_interval=2", "--kv_source=upper:half")
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(ValueError, match=r"another model \(kv_source \[0, 0\] there, \[0, 1\] here\).*"
                                         r"--out_dir=.*-dense.*--overwrite=True"):
        run(data_dir, tmp_path, "--max_iters=2", "--kv_source=dense")
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    # the same model again is a re-run: it replaces the checkpoint, and the log holds the new run only
    run(data_dir, tmp_path, "--max_iters=2", "--eval_interval=2", "--kv_source=upper:half")
    assert "this new run replaces" in capsys.readouterr().out and len(records(tmp_path, "start")) == 1
    run(data_dir, tmp_path, "--max_iters=2", "--eval_interval=2", "--kv_source=dense", "--overwrite")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["model_config"]["kv_source"] == [0, 1]


def test_training_on_another_tokenizer_is_refused(data_dir, tmp_path):
    config = LlamaConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, intermediate_size=64, vocab_size=40,
                         block_size=32, kv_source="dense")
    converted = {"model": Llama(config).state_dict(), "model_config": config.to_dict(),
                 "tokenizer_json": '{"model": {"type": "BPE"}}', "hf_config": {"model_type": "llama"}}
    torch.save(converted, tmp_path / "conv.pt")
    with pytest.raises(ValueError, match="tokenizer mismatch: .*conv.pt was trained with the Hugging Face "
                                         "tokenizer.json.*char.*--allow_tokenizer_mismatch=True"):
        run(data_dir, tmp_path / "a", f"--init_from={tmp_path / 'conv.pt'}")
    assert run(data_dir, tmp_path / "a", f"--init_from={tmp_path / 'conv.pt'}", "--allow_tokenizer_mismatch",
               "--eval_interval=2")["iters"] == 2
    # a char model of another text: the same vocabulary size, another character table
    ckpt = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    ckpt["meta"] = dict(ckpt["meta"], chars=list(reversed(ckpt["meta"]["chars"])))
    torch.save(ckpt, tmp_path / "other_text.pt")
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        run(data_dir, tmp_path / "b", f"--init_from={tmp_path / 'other_text.pt'}")


def test_a_tokenizer_json_dataset_matches_the_checkpoint_that_carries_it(tmp_path):
    """A converted model (it carries its tokenizer.json) trains on data tokenized with that tokenizer.json
    however it was formatted, and is refused on data of another tokenizer.json."""
    import json as json_
    import numpy as np
    from dataset import write_meta, write_tokens
    tokenizer = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}, "added_tokens": []}
    d = tmp_path / "data"
    d.mkdir()
    (d / "tokenizer.json").write_text(json_.dumps(tokenizer, indent=2))
    for split in ("train", "val"):
        write_tokens(str(d / f"{split}.bin"), np.arange(400) % 40, 40)
    write_meta(str(d), 40, "hf", tokenizer_file="tokenizer.json")
    config = LlamaConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, intermediate_size=64, vocab_size=40,
                         block_size=32, kv_source="dense")
    ckpt = {"model": Llama(config).state_dict(), "model_config": config.to_dict(),
            "tokenizer_json": json_.dumps(tokenizer)}  # the same tokenizer, not pretty-printed
    torch.save(ckpt, tmp_path / "conv.pt")
    assert run(str(d), tmp_path / "a", f"--init_from={tmp_path / 'conv.pt'}", "--eval_interval=2")["iters"] == 2
    tokenizer["model"]["vocab"] = {"b": 0, "a": 1}
    torch.save(ckpt | {"tokenizer_json": json_.dumps(tokenizer)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        run(str(d), tmp_path / "b", f"--init_from={tmp_path / 'other.pt'}")
