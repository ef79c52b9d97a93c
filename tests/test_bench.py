"""bench.py: a smoke run of the tiny preset on CPU (the JSON it writes has every field, including the
bound each number is measured against), and every kind of bad setting refused before any work. No
timing thresholds: the numbers are only checked to be positive, ordered and consistent."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import bench
import benchmarking
import model as M
import speed
from configurator import ConfigError, run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ("model", "mode", "device", "dtype", "tokens_per_s", "tokens_per_s_min", "tokens_per_s_max", "mfu",
          "flops_per_token", "peak_mem_bytes", "kv_cache_bytes", "n_params", "bound", "bound_kind",
          "fraction_of_bound")
TINY = ["--preset", "tiny", "--device", "cpu"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    threads = torch.get_num_threads()
    returned = bench.main(TINY + ["--models", "dense;upper:half", "--reference", "hf", "--repeats", "2",
                                 "--quantize", "int8", "--skip", "refmem", "--out", str(out)])
    assert torch.get_num_threads() == threads  # the tiny preset's 1 thread does not leak into other tests
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(returned))  # the file holds what main() returned
    return written


def test_every_measurement_has_the_fields(rows):
    cfg = bench.PRESETS["tiny"]["model"]
    assert {(r["model"], r["mode"]) for r in rows} == {
        (m, mode) for m in ("dense", "upper:half", "hf") for mode in ("train", "decode")} | {
        ("dense+int8", "decode"), ("upper:half+int8", "decode")}  # int8 weights only decode
    assert len([r for r in rows if r["mode"] == "decode"]) == 5 * 2  # batch 1 and the larger batch
    for r in rows:
        for f in FIELDS:
            assert f in r, (f, r["model"], r["mode"])
        assert r["device"].startswith("cpu") and r["dtype"] == "float32" and r["vocab_size"] == cfg["vocab_size"]
        assert r["tokens_per_s"] > 0 and math.isfinite(r["tokens_per_s"])
        assert 0 < r["tokens_per_s_min"] <= r["tokens_per_s"] <= r["tokens_per_s_max"]
        assert r["mfu"] is None  # no datasheet peak on a CPU
        assert r["n_params"] > 0
        assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] > 0
        if r["mode"] == "decode":
            assert r["prefill_tokens_per_s"] > 0 and r["kv_cache_bytes"] > 0
        else:
            assert r["kv_cache_bytes"] is None
            assert 0 < r["util_vs_matmul"] and r["matmul_flops_measured"] > 0
    # peak RSS of a child holding only that model, for each of ours (the reference's is skipped: speed)
    ours = [r for r in rows if r["model"] in ("dense", "upper:half")]
    assert all(r["peak_mem_bytes"] > r["mem_baseline_bytes"] > 0 for r in ours)
    assert all(r["peak_mem_bytes"] is None for r in rows if r["model"] == "hf")


def test_every_row_is_a_fraction_of_its_measured_bound(rows):
    for r in rows:
        assert r["bound"] > 0 and r["fraction_of_bound"] > 0
        if r["mode"] == "train":  # FLOP/s over the measured matmul rate
            assert r["bound_kind"] == "matmul_flops_measured" and r["bound"] == r["matmul_flops_measured"]
            assert r["fraction_of_bound"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / r["bound"])
            assert r["fraction_of_bound"] == r["util_vs_matmul"]
        else:  # bytes/s over the measured read bandwidth; one step makes batch_size tokens
            # the better of the 1 GiB read and a read of the step's own size (what the caches can hold of it)
            assert r["bound_kind"] == "memory_read_bandwidth_measured" and r["bandwidth_at_step_bytes"] > 0
            assert r["bound"] == max(r["bandwidth_measured"], r["bandwidth_at_step_bytes"])
            assert r["bytes_per_step"] == r["weight_bytes_per_step"] + r["kv_bytes_per_step"]
            achieved = r["bytes_per_step"] * r["tokens_per_s"] / r["batch_size"]
            assert r["achieved_bytes_per_s"] == pytest.approx(achieved)
            assert r["fraction_of_bound"] == pytest.approx(achieved / r["bound"])


def test_the_decode_bound_is_also_read_at_the_steps_own_size(monkeypatch, tmp_path):
    """Besides the preset's big buffer read each round, each decode row reads a buffer of its step's own bytes
    (weights and K/V), re-read as steps re-read them, and its bound is the better of the two reads: where the caches
    hold much of a model (the AMX Xeon's 480 MiB L3) a step can read faster than the big buffer allows."""
    asked, big = [], bench.PRESETS["tiny"]["bandwidth_mib"] * 2 ** 20

    def read(nbytes, device, reps=3):
        asked.append(nbytes)
        return 2e9 if nbytes == big else 5e9

    monkeypatch.setattr(benchmarking, "memory_bandwidth", read)
    rows = bench.main(TINY + ["--skip", "train,mem", "--repeats", "2", "--out", str(tmp_path / "bench.json")])
    decode = [r for r in rows if r["mode"] == "decode"]
    assert decode and sorted(asked) == sorted([big] * 2 * len({r["batch_size"] for r in decode}) +
                                              [int(r["bytes_per_step"]) for r in decode])
    for r in decode:
        assert r["bandwidth_measured"] == 2e9 and r["bandwidth_at_step_bytes"] == 5e9 and r["bound"] == 5e9
        assert r["fraction_of_bound"] == pytest.approx(r["achieved_bytes_per_s"] / 5e9)


def test_decode_bytes_per_step_come_from_the_model(rows):
    p = bench.PRESETS["tiny"]
    cfg, T, N = p["model"], p["prompt_len"], p["new_tokens"]
    for r in (r for r in rows if r["mode"] == "decode"):
        spec = r["model"].removesuffix("+int8")
        m = M.Llama(M.LlamaConfig(**cfg, kv_source="dense" if spec == "hf" else spec))
        B, emb = r["batch_size"], cfg["vocab_size"] * cfg["n_embd"]
        # fp32 weights, all read but the embedding table, of which only B rows are looked up
        linear = [mod.weight for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
        if r["model"].endswith("+int8"):  # the linear layers' weights in one byte each, plus an fp32 scale per row
            small = m.num_params() - emb - sum(w.numel() for w in linear)
            assert r["weight_bytes_per_step"] == sum(w.numel() + 4 * w.shape[0] for w in linear) + 4 * (
                small + B * cfg["n_embd"])
            continue
        assert r["weight_bytes_per_step"] == 4 * (m.num_params() - emb + B * cfg["n_embd"])
        # every layer (consumers too) reads K and V at the mean position T + (N + 1) / 2
        head_dim = cfg["n_embd"] // cfg["n_head"]
        assert r["kv_bytes_per_step"] == 4 * cfg["n_layer"] * 2 * B * cfg["n_kv_head"] * head_dim * (T + (N + 1) / 2)


@pytest.mark.parametrize("tie", [False, True])
def test_decode_bytes_per_step_count_weights_in_blocks(monkeypatch, tie):
    """bf16 weights in blocks (speed.BlockedLinear holds them as a buffer, not a Parameter) are read as much as
    row-major ones, and an untied head in blocks, which has no .weight, is still told apart from the embedding."""
    cfg = M.LlamaConfig(**{**bench.PRESETS["tiny"]["model"], "tie_embeddings": tie})
    m = M.Llama(cfg).to(torch.bfloat16)
    row_major = benchmarking.decode_bytes_per_step(m, cfg, 2, 10)
    monkeypatch.setattr(speed, "blocks_apply", lambda dtype=None: True)  # lay them out on any CPU: only bytes are counted
    speed.block_weights(m)
    assert sum(isinstance(x, speed.BlockedLinear) for x in m.modules()) == 7 * cfg.n_layer + (not tie)
    assert benchmarking.decode_bytes_per_step(m, cfg, 2, 10) == row_major


def test_decode_bytes_and_the_profile_count_4bit_weights_in_blocks_as_row_major(monkeypatch):
    """A 4-bit model (quantize_int4) reads as many bytes a step after block_weights as before, and the profile's
    op_bytes of a matvec_blocked_q4 call (its input shapes: the scales inline) is that product's read_bytes."""
    from types import SimpleNamespace
    from quantize import quantize_int4
    cfg = M.LlamaConfig(**bench.PRESETS["tiny"]["model"])
    m = quantize_int4(M.Llama(cfg).to(torch.bfloat16))
    row_major = benchmarking.decode_bytes_per_step(m, cfg, 2, 10)
    monkeypatch.setattr(speed, "blocks_apply", lambda dtype=None: True)  # lay them out on any CPU: only bytes are counted
    speed.block_weights(m)
    blocked = [x for x in m.modules() if isinstance(x, speed.BlockedLinear) and x.group_size > 0]
    assert len(blocked) == 7 * cfg.n_layer and benchmarking.decode_bytes_per_step(m, cfg, 2, 10) == row_major
    lin = blocked[0]
    call = SimpleNamespace(key="speed::matvec_blocked_q4", input_shapes=[[1, 1, lin.in_features], list(lin.blocks.shape),
                                                                         [], []])
    assert benchmarking.op_bytes(call, 2) == lin.read_bytes()


def test_flops_and_params_match_model_py(rows):
    cfg = bench.PRESETS["tiny"]["model"]
    seq = bench.PRESETS["tiny"]["seq_len"]
    models = {spec: M.Llama(M.LlamaConfig(**cfg, kv_source=spec)) for spec in ("dense", "upper:half")}
    models["hf"] = models["dense"]  # the reference is dense: same FLOPs and parameters
    for r in (r for r in rows if r["mode"] == "train"):
        m = models[r["model"]]
        assert r["flops_per_token"] == m.flops_per_token(seq)["train"]
        assert r["n_params"] == m.num_params()
        if r["model"] not in ("dense", "hf"):
            assert r["vs_dense_ratio_predicted"] == pytest.approx(
                models["dense"].flops_per_token(seq)["train"] / m.flops_per_token(seq)["train"])
            assert r["vs_dense_ratio_predicted"] > 1  # sharing drops K/V projections


def test_kv_cache_bytes_ratio_is_exactly_owners_over_layers(rows):
    cfg = bench.PRESETS["tiny"]["model"]
    for B in (1, bench.PRESETS["tiny"]["decode_batch"]):
        dec = {r["model"]: r for r in rows if r["mode"] == "decode" and r["batch_size"] == B}
        assert dec["hf"]["kv_cache_bytes"] == dec["dense"]["kv_cache_bytes"]
        for spec in ("upper:half",):
            owners = len(M.LlamaConfig(**cfg, kv_source=spec).owners)
            assert dec[spec]["kv_cache_bytes"] * cfg["n_layer"] == dec["dense"]["kv_cache_bytes"] * owners
            assert dec[spec]["kv_cache_ratio"] == owners / cfg["n_layer"]


def test_int8_rows_are_paired_with_their_float_model(rows):
    for B in (1, bench.PRESETS["tiny"]["decode_batch"]):
        dec = {r["model"]: r for r in rows if r["mode"] == "decode" and r["batch_size"] == B}
        for spec in ("dense", "upper:half"):
            q = dec[spec + "+int8"]
            assert q["kv_cache_bytes"] == dec[spec]["kv_cache_bytes"] and q["n_params"] == dec[spec]["n_params"]
            assert q["weight_bytes_per_step"] < 0.5 * dec[spec]["weight_bytes_per_step"]
            assert "vs_dense_ratio" in q


def test_decode_profile_prints_ops_and_matmul_bandwidth(capsys, monkeypatch):
    """The profile's matmul line sets the products' read rate against the big buffer's read and against the better
    of it and a read of the products' own bytes a token (as the decode table's bound)."""
    big = bench.PRESETS["tiny"]["bandwidth_mib"] * 2 ** 20
    monkeypatch.setattr(benchmarking, "memory_bandwidth", lambda nbytes, device, reps=3: 1e9 if nbytes == big else 4e9)
    bench.main(TINY + ["--models", "dense", "--skip", "train,decode,mem", "--profile"])
    out = capsys.readouterr().out
    assert "== decode profile: dense, batch 1" in out
    assert "aten::mm" in out and "matmuls:" in out and "GB/s" in out
    rate, of_big, of_better = re.search(r"read at ([\d.]+) GB/s, (\d+)% of the measured bandwidth, (\d+)% of the "
                                        r"better of it and a read of those bytes \(4\.0 GB/s\)", out).groups()
    assert int(of_big) == pytest.approx(4 * int(of_better), abs=4)  # the two bounds: 1 and 4 GB/s (rates rounded)
    assert int(of_better) == pytest.approx(float(rate) / 4.0 * 100, abs=2.5)


def test_train_profile_prints_ops_and_the_matmul_time_the_flops_need(capsys):
    bench.main(TINY + ["--models", "dense", "--skip", "decode,mem", "--profile", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "== train profile: dense, one step of 64 tokens" in out
    assert "aten::mm" in out and "matmuls:" in out and "the step's FLOPs would take" in out


def test_smollm2_preset_has_the_real_models_shape():
    cfg = bench.PRESETS["smollm2"]["model"]
    with torch.device("meta"):
        m = M.Llama(M.LlamaConfig(**cfg, kv_source="dense"))
    assert m.num_params() == 134_515_008  # SmolLM2-135M's parameter count (tied embeddings)
    assert (m.config.rope_theta, m.config.n_head, m.config.n_kv_head) == (1e5, 9, 3)


# -----------------------------------------------------------------------------
# settings: the README's commands parse, and every bad one is refused before any work


@pytest.mark.parametrize("argv", [
    "--preset cpu --dtype bf16 --reference hf --out {d}/x.json",
    "--preset cpu --dtype fp32 --compile --reference hf --out {d}/x.json",
    "--preset cpu --models dense;cla:2;0,0,2,2,4,4,6,6",
    "--preset tinyllama --dtype bf16 --compile --reference hf --device=cpu",
    "--preset smollm2 --reference hf --repeats=2",
])
def test_readme_commands_parse(argv, tmp_path):
    s = bench.parse_settings(argv.format(d=tmp_path).split())
    assert s.device == "cpu" and s.repeats > 0 and s.models
    assert s.dtype in ("float32", "bfloat16")


def test_model_flag_parsing():
    assert bench.parse_settings(["--preset", "tiny", "--models", "dense;0,0,2,2;upper:1"]).models == [
        "dense", "0,0,2,2", "upper:1"]
    assert bench.parse_settings(["--preset", "tiny"]).models == ["dense", "upper:half"]


@pytest.mark.parametrize("argv, words", [
    (["--bogus=1"], "unknown setting 'bogus'"),                          # unknown key
    (["--repeats=many"], "repeats"),                                     # wrongly typed value
    (["--compile=maybe"], "compile"),
    (["--repeats=0"], "--repeats must be a positive integer"),           # zero
    (["--batch_size=-2"], "--batch_size must be a positive integer"),    # negative
    (["--threads=0"], "--threads must be a positive integer"),
    (["--skip=train,warmup"], "--skip: unknown part warmup"),            # unknown skip part
    (["--models=;"], "--models is empty"),
    (["--models=dense", "--models=cla:2"], "more than once"),
    (["--models=dense;0,1,5,3"], "kv_source[2] = 5"),
    (["--preset=huge"], "preset"),
    (["--dtype=fp16"], "dtype"),
    (["--device=tpu"], "device='tpu'"),
    (["--out=/dev/null/x.json"], "cannot create the directory /dev/null"),
    ([f"--out={ROOT}/docs/bench_results/cpu_bf16.json"], "would overwrite docs/bench_results/cpu_bf16.json, which "
                                                         "the repository tracks"),
])
def test_bad_settings_are_refused(argv, words):
    with pytest.raises(ConfigError) as e:
        bench.parse_settings(TINY[:2] + argv)
    assert words in str(e.value)


def test_a_committed_result_is_replaced_only_when_asked(tmp_path):
    committed = os.path.join(ROOT, "docs", "bench_results", "cpu_bf16.json")
    before = open(committed, "rb").read()
    assert bench.parse_settings(TINY[:2] + [f"--out={committed}", "--replace_tracked=True"]).out == committed
    assert open(committed, "rb").read() == before  # checking the path wrote nothing
    s = bench.parse_settings(TINY[:2] + [f"--out={tmp_path}/new/dir/x.json"])  # folders are made, as out_dir's
    assert os.path.isdir(tmp_path / "new" / "dir") and s.replace_tracked is False


def test_out_is_checked_first(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        bench.parse_settings(["--repeats=0", f"--out={tmp_path}"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_presets_need_a_gpu_or_an_explicit_cpu():
    for preset in ("tinyllama", "gpu-small"):
        with pytest.raises(ConfigError, match="--device=cpu"):
            bench.parse_settings([f"--preset={preset}"])
        with pytest.raises(ConfigError, match="CUDA"):
            bench.parse_settings([f"--preset={preset}", "--device=cuda"])
        assert bench.parse_settings([f"--preset={preset}", "--device=cpu"]).device == "cpu"


def test_command_line_error_is_one_line_and_exit_1():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--preset", "tiny", "--repeats=0"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.strip().splitlines() == ["error: --repeats must be a positive integer, got 0"]


def test_models_spec_takes_an_attention_map_after_an_at_sign():
    assert benchmarking.model_maps("dense@upper:half", 4) == ((0, 1, 2, 3), (0, 1, 1, 1))
    assert benchmarking.model_maps("cla:2", 4) == ((0, 0, 2, 2), (0, 1, 2, 3))
    with pytest.raises(ValueError, match="layer 1: kv_source"):
        benchmarking.parse_models("cla:2@cla:2", 4)


def test_attention_reuse_rows_and_its_bad_input():
    rows = bench.main(["--preset", "tiny", "--attn_reuse=16,32"])
    assert [r["seq_len"] for r in rows] == [16, 32]
    for r in rows:
        assert r["probs_bytes"] == 2 * 4 * r["seq_len"] ** 2 * 4  # batch 2 x 4 heads x T x T fp32
        assert r["sharer_recompute_s"] > 0 and r["sharer_reuse_s"] > 0
    with pytest.raises(ValueError, match="attn_reuse"):
        bench.main(["--preset", "tiny", "--attn_reuse=big"])


def test_quantized_experiment_names_a_bad_variant_in_one_line(capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("_exp_quantized", os.path.join(ROOT, "experiments", "quantized.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert run_script(module.main, ["--variants=fp32,fp16+int4"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--variants='fp32,fp16+int4'" in err[0] and "bf16+int4" in err[0]


@pytest.mark.parametrize("script, out", [("experiments/quantized.py", "results/smollm2"),
                                         ("experiments/smollm2.py", "results/smollm2"),
                                         ("experiments/echo.py", "results/echo")])
def test_experiments_refuse_to_overwrite_committed_results(script, out, tmp_path):
    import importlib.util
    import guards
    spec = importlib.util.spec_from_file_location("_exp_" + os.path.basename(script)[:-3], os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = {f: os.path.getmtime(os.path.join(ROOT, f)) for f in guards.tracked_files(os.path.join(ROOT, out))}
    assert committed and module.DEFAULTS["out"].startswith("out-")  # the default is git-ignored
    with pytest.raises(ConfigError, match=rf"--out={ROOT}/{out} would overwrite {out}/\S+ and \d+ more, which the "
                                          r"repository tracks: .* --replace_tracked=True"):
        module.main([f"--out={ROOT}/{out}", f"--runs={tmp_path}"] if "quantized" not in script else [f"--out={ROOT}/{out}"])
    assert {f: os.path.getmtime(os.path.join(ROOT, f)) for f in committed} == committed
    assert guards.tracked_files(tmp_path) == [] and guards.tracked_files(os.path.join(ROOT, "out-nothing")) == []


def test_the_bandwidth_bound_reads_a_buffer_on_huge_pages_too(monkeypatch):
    """On CPU the bound is the best read of a plain buffer and of one on 2 MiB pages (speed.pack_weights lays a
    decoding model's weights on those): the huge-page buffer is made, of the size asked, and where it reads faster
    (a clock that says so) its read is the bound."""
    made = []

    def spy(n):
        made.append(n)
        return speed.huge_page_bytes(n)

    monkeypatch.setattr(benchmarking, "huge_page_bytes", spy)
    nbytes = 8 << 20
    assert benchmarking.memory_bandwidth(nbytes, "cpu", reps=2) > 0 and made == [nbytes]
    clock = iter([0.0, 1.0, 1.0, 2.0,   # the plain buffer: two reads of 1 s
                  2.0, 2.5, 2.5, 3.0])  # the one on huge pages: two of 0.5 s
    monkeypatch.setattr(benchmarking.time, "perf_counter", lambda: next(clock))
    assert benchmarking.memory_bandwidth(nbytes, "cpu", reps=2) == pytest.approx(nbytes / 0.5)


def test_the_bandwidth_bound_refuses_a_buffer_without_one_float():
    """Under 4 bytes the buffer is empty and its sum takes no time: refused, not a division by zero."""
    with pytest.raises(ValueError, match="nbytes=3"):
        benchmarking.memory_bandwidth(3, "cpu")
