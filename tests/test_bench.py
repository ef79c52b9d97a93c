"""Smoke test of bench.py on the tiny preset, on CPU: the JSON it writes has every field, and the
fields are sane. No timing thresholds: the numbers are only checked to be positive and ordered."""
import json
import math

import pytest
import torch

import bench
import model as M

FIELDS = ("model", "mode", "device", "dtype", "tokens_per_s", "tokens_per_s_min", "tokens_per_s_max", "mfu",
          "flops_per_token", "peak_mem_bytes", "kv_cache_bytes", "n_params")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    threads = torch.get_num_threads()
    returned = bench.run(["--preset", "tiny", "--device", "cpu", "--models", "dense;upper:half",
                          "--reference", "hf", "--repeats", "2", "--skip", "refmem", "--out", str(out)])
    assert torch.get_num_threads() == threads  # the tiny preset's 1 thread does not leak into other tests
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(returned))  # the file holds what run() returned
    return written


def test_every_measurement_has_the_fields(rows):
    cfg = bench.PRESETS["tiny"]["model"]
    assert {(r["model"], r["mode"]) for r in rows} == {
        (m, mode) for m in ("dense", "upper:half", "hf") for mode in ("train", "decode")}
    assert len([r for r in rows if r["mode"] == "decode"]) == 3 * 2  # batch 1 and the larger batch
    for r in rows:
        for f in FIELDS:
            assert f in r, (f, r["model"], r["mode"])
        assert r["device"].startswith("cpu") and r["dtype"] == "fp32" and r["vocab_size"] == cfg["vocab_size"]
        assert r["tokens_per_s"] > 0 and math.isfinite(r["tokens_per_s"])
        assert 0 < r["tokens_per_s_min"] <= r["tokens_per_s"] <= r["tokens_per_s_max"]
        assert r["mfu"] is None or 0 < r["mfu"] <= 1  # no datasheet peak on a CPU: None
        assert r["n_params"] > 0
        assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] > 0
        if r["mode"] == "decode":
            assert r["prefill_tokens_per_s"] > 0 and r["kv_cache_bytes"] > 0
        else:
            assert r["kv_cache_bytes"] is None
            assert 0 < r["util_vs_matmul"] and r["matmul_flops_measured"] > 0
    # peak RSS of a child holding only that model, for each of ours (the reference's is skipped: speed)
    assert all(r["peak_mem_bytes"] > r["mem_baseline_bytes"] > 0 for r in rows if r["model"] != "hf")
    assert all(r["peak_mem_bytes"] is None for r in rows if r["model"] == "hf")


def test_flops_and_params_match_model_py(rows):
    cfg = bench.PRESETS["tiny"]["model"]
    seq = bench.PRESETS["tiny"]["seq_len"]
    models = {spec: M.Llama(M.LlamaConfig(**cfg, kv_source=spec)) for spec in ("dense", "upper:half")}
    models["hf"] = models["dense"]  # the reference is dense: same FLOPs and parameters
    for r in (r for r in rows if r["mode"] == "train"):
        m = models[r["model"]]
        assert r["flops_per_token"] == m.flops_per_token(seq)["train"]
        assert r["n_params"] == m.num_params()
        assert r["util_vs_matmul"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / r["matmul_flops_measured"])
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


def test_model_flag_parsing():
    args = bench.parse_args(["--preset", "tiny", "--models", "dense;0,0,2,2", "--models", "upper:1"])
    assert args.models == ["dense", "0,0,2,2", "upper:1"]
    assert bench.parse_args(["--preset", "tiny"]).models == ["dense", "upper:half"]
