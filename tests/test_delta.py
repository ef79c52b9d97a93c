"""delta.py: an adapted model shipped as the tensors it changed (or as LoRA adapters) and applied to its
base. Base + float32 delta is the adapted model exactly; a bfloat16 delta is it with exactly the stored
tensors rounded; a LoRA adapters file is the LoRA run's merged model; a delta on another base is refused
naming both digests; sample.py, train.py and export with --delta give what the adapted checkpoint gives.
Tiny models on the character data: the adaptations are the project's own (train.py's gradual adaptation
with only the upward layers training, a LoRA run on the consumer, adapt.py's conversion)."""

import json
import os

import pytest
import torch

import adapt
import convert_hf
import delta
import lora
import sample
import train
from checkpoint import (build_on_meta, load_checkpoint, load_model, model_weights, save_checkpoint, save_safetensors,
                        weights_sha256)
from model import LlamaConfig

TRAIN_TINY = ["--n_layer=2", "--n_head=2", "--n_kv_head=1", "--n_embd=32", "--intermediate_size=64",
              "--block_size=16", "--batch_size=4", "--eval_iters=2", "--log_interval=1", "--compile=False",
              "--learning_rate=1e-2", "--warmup_iters=2", "--min_lr=1e-3", "--dtype=float32", "--device=cpu"]
ADAPT_TO_0_0 = ["--adapt_target=0,0", "--adapt_stage_iters=2", "--max_iters=6", "--eval_interval=6"]


def train_run(data_dir, out_dir, *args):
    return train.main(TRAIN_TINY + [f"--dataset={data_dir}", f"--out_dir={out_dir}"] + list(args))


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """A dense base; its adaptation to kv_source 0,0 (upward layers train); a LoRA run doing the same with
    adapters on the consumer's q and o, and that run merged and as an adapters file."""
    root = tmp_path_factory.mktemp("delta")
    train_run(data_dir, root / "base", "--kv_source=dense", "--max_iters=6", "--eval_interval=6")
    base = root / "base" / "ckpt.pt"
    train_run(data_dir, root / "adapted", f"--init_from={base}", *ADAPT_TO_0_0, "--adapt_train_layers=upward")
    train_run(data_dir, root / "lora", f"--init_from={base}", *ADAPT_TO_0_0, "--lora_targets=q,o", "--lora_layers=1",
              "--lora_rank=4")
    lora.main([f"--init_from={root / 'lora'}", f"--out={root / 'merged.pt'}",
               f"--adapters={root / 'adapters.safetensors'}"])
    paths = {"root": root, "base": base, "adapted": root / "adapted" / "ckpt.pt", "merged": root / "merged.pt",
             "adapters": root / "adapters.safetensors", "f32": root / "f32.safetensors",
             "bf16": root / "bf16.safetensors"}
    for name, dtype in (("f32", "float32"), ("bf16", "bfloat16")):
        delta.main([f"--init_from={root / 'adapted'}", f"--base={base}", f"--out={paths[name]}", f"--dtype={dtype}"])
    return paths


def tokens(vocab, seed=3):
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))


def logits(model, X):
    with torch.no_grad():
        return model.eval()(X)[0]


def test_adapted_run_is_what_the_delta_tests_need(runs):
    ckpt = load_checkpoint(runs["adapted"])
    assert ckpt["model_config"]["kv_source"] == [0, 0] and not ckpt.get("kv_blend")  # adapted, stage finished


def test_float32_delta_gives_the_adapted_model_exactly(runs):
    kind, tensors, meta = delta.read_delta(runs["f32"])
    # upward training from layer 1: layer 0 and the embedding are frozen; the consumer's K/V are gone
    assert kind == "tensors" and "layers.1.mlp.up_proj.weight" in tensors and "norm.weight" in tensors
    assert not any(k.startswith(("layers.0.", "embed_tokens")) for k in tensors), sorted(tensors)
    assert "layers.1.self_attn.k_proj.weight" not in tensors
    assert json.loads(meta["kv_source"]) == [0, 0] and json.loads(meta["attn_source"]) == [0, 1]
    assert meta["base_sha256"] == weights_sha256(load_checkpoint(runs["base"]))
    model, ckpt = delta.load_with_delta(runs["base"], runs["f32"])
    adapted, _ = load_model(runs["adapted"])
    X = tokens(model.config.vocab_size)
    assert model.config == adapted.config and torch.equal(logits(model, X), logits(adapted, X))
    assert ckpt["meta"] == load_checkpoint(runs["base"])["meta"]  # the base's tokenizer comes along


def test_bfloat16_delta_is_the_adapted_model_with_those_tensors_rounded(runs):
    _, tensors, _ = delta.read_delta(runs["bf16"])
    assert tensors and all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert set(tensors) == set(delta.read_delta(runs["f32"])[1])
    adapted = load_checkpoint(runs["adapted"])
    rounded = {k: t.to(torch.bfloat16).to(t.dtype) if k in tensors else t for k, t in model_weights(adapted).items()}
    expected = build_on_meta(LlamaConfig(**adapted["model_config"]), rounded)
    model, _ = delta.load_with_delta(runs["base"], runs["bf16"])
    X = tokens(model.config.vocab_size)
    assert torch.equal(logits(model, X), logits(expected, X))
    assert not torch.equal(logits(model, X), logits(load_model(runs["adapted"])[0], X))  # the rounding shows
    f32 = delta.read_delta(runs["f32"])[1]
    assert sum(t.nbytes for t in tensors.values()) * 2 == sum(t.nbytes for t in f32.values())


def test_lora_adapters_file_is_a_delta_giving_the_merged_model(runs):
    kind, tensors, meta = delta.read_delta(runs["adapters"])
    assert kind == "lora" and sorted(tensors) == ["layers.1.self_attn.o_proj.lora_A", "layers.1.self_attn.o_proj.lora_B",
                                                  "layers.1.self_attn.q_proj.lora_A", "layers.1.self_attn.q_proj.lora_B"]
    assert meta["base_sha256"] == weights_sha256(load_checkpoint(runs["base"])) == lora.sha256_of(runs["base"])
    model, _ = delta.load_with_delta(runs["base"], runs["adapters"])
    merged, _ = load_model(runs["merged"])
    X = tokens(model.config.vocab_size)
    assert not lora.lora_adapters(model) and model.config.kv_source == (0, 0)
    assert torch.equal(logits(model, X), logits(merged, X))
    unmerged, _ = delta.adapted_model(load_checkpoint(runs["base"]), runs["adapters"], merge=False)
    assert len(lora.lora_adapters(unmerged)) == 2
    torch.testing.assert_close(logits(unmerged, X), logits(merged, X), rtol=1e-5, atol=1e-5)


def metadata_keys_as_written(path):
    """The metadata's keys in the order the file's JSON header lists them."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0  # the header padded so that the data starts 8-aligned
    return list(json.loads(raw[8:8 + n])["__metadata__"])


def test_one_delta_is_one_file_byte_for_byte(runs, tmp_path):
    """safetensors writes its metadata map in hash order, which changes between calls; save_safetensors sorts
    the keys, so a rerun that makes the same adapters makes the same file (one sha256 to compare)."""
    kind, tensors, meta = delta.read_delta(runs["adapters"])
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_safetensors(tensors, meta, a)
    save_safetensors(tensors, dict(reversed(meta.items())), b)
    assert a.read_bytes() == b.read_bytes() == open(runs["adapters"], "rb").read()  # lora.py's file too
    assert metadata_keys_as_written(a) == sorted(meta) and len(meta) > 5
    kind_read, tensors_read, meta_read = delta.read_delta(a)
    assert kind_read == kind and meta_read == meta
    assert all(torch.equal(tensors[k], tensors_read[k]) and tensors[k].dtype == tensors_read[k].dtype for k in tensors)


def test_maps_alone_and_mean_initialised_owners(runs, tmp_path):
    """adapt.py's conversions: attention sharing changes no weight (an empty delta that records the map);
    K/V sharing with kv_init=mean changes the owner's K/V, which the delta carries."""
    for name, args in (("attn", ["--attn_to=0,0"]), ("kv", ["--convert_to=0,0", "--kv_init=mean"])):
        adapt.main([f"--init_from={runs['base']}", *args, f"--out={tmp_path / name}.pt"])
        delta.main([f"--init_from={tmp_path / name}.pt", f"--base={runs['base']}", f"--out={tmp_path / name}.st",
                    "--dtype=float32"])
        kind, tensors, meta = delta.read_delta(tmp_path / f"{name}.st")
        assert sorted(tensors) == ([] if name == "attn" else
                                   ["layers.0.self_attn.k_proj.weight", "layers.0.self_attn.v_proj.weight"])
        model, _ = delta.load_with_delta(runs["base"], tmp_path / f"{name}.st")
        converted, _ = load_model(tmp_path / f"{name}.pt")
        X = tokens(model.config.vocab_size)
        assert model.config == converted.config and torch.equal(logits(model, X), logits(converted, X))


def test_a_delta_on_another_base_is_refused_naming_both_digests(runs, tmp_path):
    other = load_checkpoint(runs["base"])
    other["model"] = {k: t + 1e-3 if k == "norm.weight" else t for k, t in other["model"].items()}
    save_checkpoint(other, tmp_path / "other.pt")
    want, have = weights_sha256(load_checkpoint(runs["base"])), weights_sha256(other)
    for path in (runs["f32"], runs["adapters"]):
        with pytest.raises(delta.DeltaError) as e:
            delta.load_with_delta(tmp_path / "other.pt", path)
        assert str(e.value).startswith(f"delta {path} was made for base sha256 {want}; {tmp_path / 'other.pt'} "
                                       f"has {have}:") and "\n" not in str(e.value)


def test_the_base_digest_is_of_the_weights_not_the_file(runs, tmp_path):
    """Importing the base again keeps the digest: what else the checkpoint carries, a wrapper prefix, and a
    tied head listed or not leave it; any weight's bytes, dtype or name change it."""
    ckpt = load_checkpoint(runs["base"])
    digest = weights_sha256(ckpt)
    save_checkpoint(ckpt | {"chat_template": "{{ messages }}", "converted_from": {"gguf": "x"}}, tmp_path / "more.pt")
    assert weights_sha256(load_checkpoint(tmp_path / "more.pt")) == digest
    assert weights_sha256(ckpt | {"model": {f"_orig_mod.{k}": t for k, t in ckpt["model"].items()}}) == digest
    tied = {"model_config": {**ckpt["model_config"], "tie_embeddings": True}}
    tied_model = {k: t for k, t in ckpt["model"].items() if k != "lm_head.weight"}
    assert weights_sha256(ckpt | tied | {"model": tied_model}) == weights_sha256(
        ckpt | tied | {"model": tied_model | {"lm_head.weight": tied_model["embed_tokens.weight"]}})
    changed = [{"norm.weight": ckpt["model"]["norm.weight"].clone().index_fill_(0, torch.tensor([0]), 0.5)},
               {"norm.weight": ckpt["model"]["norm.weight"].double()}]
    for change in changed:
        assert weights_sha256(ckpt | {"model": ckpt["model"] | change}) != digest
    renamed = {("final_norm.weight" if k == "norm.weight" else k): t for k, t in ckpt["model"].items()}
    assert weights_sha256(ckpt | {"model": renamed}) != digest


def test_sample_with_delta_generates_what_the_adapted_checkpoint_does(runs, capsys):
    common = ["--start=the ", "--temperature=0", "--max_new_tokens=24", "--device=cpu", "--dtype=float32"]
    outputs = []
    for argv in ([f"--init_from={runs['base']}", f"--delta={runs['f32']}"], [f"--init_from={runs['adapted']}"],
                 [f"--init_from={runs['base']}", f"--delta={runs['adapters']}"], [f"--init_from={runs['merged']}"]):
        assert sample.main(argv + common) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[2] == outputs[3] and outputs[0].startswith("the ")


def test_train_with_delta_starts_from_the_adapted_model(runs, data_dir, tmp_path):
    """An evaluation at iteration 0 sees the same model; a run from base + delta trains like one from the
    adapted checkpoint, step for step."""
    run = ["--max_iters=2", "--eval_interval=2", "--lr_decay_iters=2"]
    from_delta = train_run(data_dir, tmp_path / "d", f"--init_from={runs['base']}", f"--delta={runs['f32']}", *run)
    from_ckpt = train_run(data_dir, tmp_path / "c", f"--init_from={runs['adapted']}", *run)
    assert from_delta["val_loss"] == from_ckpt["val_loss"]
    a, b = load_checkpoint(tmp_path / "d"), load_checkpoint(tmp_path / "c")
    assert a["model_config"]["kv_source"] == [0, 0] and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["meta"] == b["meta"]


def test_export_with_delta_writes_the_adapted_model(runs, tmp_path):
    from safetensors.torch import load_file
    assert convert_hf.main(["export", str(runs["base"]), str(tmp_path / "d"), f"--delta={runs['f32']}"]) == 0
    assert convert_hf.main(["export", str(runs["adapted"]), str(tmp_path / "c")]) == 0
    a, b = load_file(tmp_path / "d" / "model.safetensors"), load_file(tmp_path / "c" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "model.layers.1.self_attn.k_proj.weight" not in a  # the shared model, as the adapted one exports
    with open(tmp_path / "d" / "config.json") as f, open(tmp_path / "c" / "config.json") as g:
        assert json.load(f) == json.load(g)


def test_make_delta_refuses_a_model_not_adapted_from_the_base(runs, tmp_path):
    adapted = load_checkpoint(runs["adapted"])
    wider = adapted | {"model": adapted["model"] | {"norm.weight": torch.ones(64)}}
    with pytest.raises(delta.DeltaError, match="has norm.weight of shape .64,., the base .32,. .on kv_source .0, 0.*it was not adapted"):
        delta.make_delta(wider, load_checkpoint(runs["base"]))
    lacking = adapted | {"model": {k: t for k, t in adapted["model"].items() if k != "layers.0.mlp.up_proj.weight"}}
    with pytest.raises(delta.DeltaError, match="lacks layers.0.mlp.up_proj.weight, which the base has"):
        delta.make_delta(lacking, load_checkpoint(runs["base"]))
    with pytest.raises(delta.DeltaError, match="LoRA run's checkpoint: its adapters are its delta"):
        delta.main([f"--init_from={runs['root'] / 'lora'}", f"--base={runs['base']}", f"--out={tmp_path / 'x.st'}"])
    assert not os.path.exists(tmp_path / "x.st")


def test_a_model_halfway_through_an_adaptation_stage(runs, data_dir, tmp_path):
    """train.py's checkpoint in the middle of a stage: layer 1 still blends its own K/V with layer 0's; the
    delta records the blend and base + delta is that model exactly."""
    train_run(data_dir, tmp_path / "mid", f"--init_from={runs['base']}", "--adapt_target=0,0", "--adapt_stage_iters=4",
              "--max_iters=2", "--eval_interval=2")
    ckpt = load_checkpoint(tmp_path / "mid")
    assert list(ckpt["kv_blend"]) == [1] and 0 < ckpt["kv_blend"][1][1] < 1
    delta.main([f"--init_from={tmp_path / 'mid'}", f"--base={runs['base']}", f"--out={tmp_path / 'mid.st'}",
                "--dtype=float32"])
    model, _ = delta.load_with_delta(runs["base"], tmp_path / "mid.st")
    mid, _ = load_model(tmp_path / "mid")
    X = tokens(model.config.vocab_size)
    assert model.kv_blend.keys() == mid.kv_blend.keys() and torch.equal(logits(model, X), logits(mid, X))
    with pytest.raises(delta.DeltaError, match="halfway through an adaptation stage"):
        delta.main([f"--init_from={runs['base']}", f"--base={tmp_path / 'mid'}", f"--out={tmp_path / 'x.st'}"])


def test_lora_file_over_an_nf4_base_gives_that_runs_merged_model(runs, data_dir, tmp_path):
    """A QLoRA run's adapters: the base goes on the maps, into NF4 as the run froze it, then the adapters."""
    train_run(data_dir, tmp_path / "q", f"--init_from={runs['base']}", *ADAPT_TO_0_0, "--lora_targets=q,o",
              "--lora_layers=1", "--lora_rank=4", "--base_quant=nf4")
    lora.main([f"--init_from={tmp_path / 'q'}", f"--out={tmp_path / 'merged.pt'}",
               f"--adapters={tmp_path / 'a.safetensors'}"])
    assert delta.read_delta(tmp_path / "a.safetensors")[2]["base_quant"] == "nf4"
    model, _ = delta.load_with_delta(runs["base"], tmp_path / "a.safetensors")
    merged, _ = load_model(tmp_path / "merged.pt")
    X = tokens(model.config.vocab_size)
    assert torch.equal(logits(model, X), logits(merged, X))
    # the same adapters over the float base are another model: the NF4 rounding the run trained over shows
    _, tensors, meta = delta.read_delta(tmp_path / "a.safetensors")
    config = LlamaConfig(**json.loads(meta["model_config"]))
    plain = build_on_meta(config, delta.on_maps(model_weights(load_checkpoint(runs["base"])), config.kv_source,
                                                config.attn_source))
    assert not torch.equal(logits(model, X), logits(delta.with_lora(plain, tensors, meta | {"base_quant": "none"}), X))


def test_a_lora_run_that_recorded_its_base_files_sha256_still_saves_a_delta(runs, tmp_path):
    """LoRA runs started before the digest was of the weights recorded the base file's sha256: lora.py
    --adapters writes the weights' digest instead while the base file is still the one the run read."""
    from dataset import sha256_file
    old = load_checkpoint(runs["root"] / "lora")
    old["lora"] = old["lora"] | {"base_sha256": sha256_file(runs["base"]), "base_path": str(runs["base"])}
    save_checkpoint(old, tmp_path / "old.pt")
    lora.main([f"--init_from={tmp_path / 'old.pt'}", f"--adapters={tmp_path / 'a.safetensors'}"])
    assert delta.read_delta(tmp_path / "a.safetensors")[2]["base_sha256"] == weights_sha256(load_checkpoint(runs["base"]))
    model, _ = delta.load_with_delta(runs["base"], tmp_path / "a.safetensors")
    X = tokens(model.config.vocab_size)
    assert torch.equal(logits(model, X), logits(load_model(runs["merged"])[0], X))


def test_a_delta_from_a_run_with_a_shorter_context_reads_as_far_as_its_base(runs, data_dir, tmp_path):
    """train.py crops the context to its block_size; base + delta keeps the base's (RoPE reads on), with the
    trained model's logits where both reach."""
    train_run(data_dir, tmp_path / "crop", f"--init_from={runs['base']}", *ADAPT_TO_0_0, "--adapt_train_layers=upward",
              "--block_size=8")
    cropped, _ = load_model(tmp_path / "crop")
    assert cropped.config.block_size == 8
    delta.main([f"--init_from={tmp_path / 'crop'}", f"--base={runs['base']}", f"--out={tmp_path / 'd.safetensors'}",
                "--dtype=float32"])
    model, _ = delta.load_with_delta(runs["base"], tmp_path / "d.safetensors")
    assert model.config.block_size == load_model(runs["base"])[0].config.block_size == 16
    X = tokens(model.config.vocab_size)
    assert torch.equal(logits(model, X[:, :8]), logits(cropped, X[:, :8]))
    assert logits(model, X).shape[1] == 16  # the full base context


def test_an_attention_sharing_lora_run_ships_adapters_over_the_dense_base(runs, data_dir, tmp_path):
    """train.py --adapt_attn_target (EchoAtt's switch before step 0) with adapters on every linear: the
    sharer has no q/k_proj to adapt, the file records attn_source and the dense base's digest, and base +
    adapters is the run's merged model exactly."""
    train_run(data_dir, tmp_path / "att", f"--init_from={runs['base']}", "--adapt_attn_target=0,0", "--max_iters=4",
              "--eval_interval=4", "--lora_targets=q,k,v,o,gate,up,down", "--lora_rank=4")
    lora.main([f"--init_from={tmp_path / 'att'}", f"--out={tmp_path / 'merged.pt'}", f"--adapters={tmp_path / 'a.safetensors'}"])
    kind, tensors, meta = delta.read_delta(tmp_path / "a.safetensors")
    assert kind == "lora" and json.loads(meta["attn_source"]) == [0, 0] and json.loads(meta["kv_source"]) == [0, 1]
    assert meta["base_sha256"] == weights_sha256(load_checkpoint(runs["base"]))
    assert "layers.0.self_attn.k_proj.lora_A" in tensors and "layers.1.self_attn.v_proj.lora_A" in tensors
    assert not any(k.startswith(("layers.1.self_attn.q_proj", "layers.1.self_attn.k_proj")) for k in tensors)
    model, _ = delta.load_with_delta(runs["base"], tmp_path / "a.safetensors")
    merged, _ = load_model(tmp_path / "merged.pt")
    X = tokens(model.config.vocab_size)
    assert model.config.attn_source == (0, 0) and torch.equal(logits(model, X), logits(merged, X))
    dense, _ = load_model(runs["base"])
    assert (logits(model, X) - logits(dense, X)).abs().max() > 1e-4  # switched and trained: not the base
    with pytest.raises(ValueError, match="adapt one sharing at a time"):
        train_run(data_dir, tmp_path / "both", f"--init_from={runs['base']}", "--adapt_attn_target=0,0",
                  "--adapt_target=0,0", "--max_iters=2")


def test_committed_deltas_are_whole_small_and_of_one_base():
    """The shipped deltas (results/smollm2-adapted/*.safetensors) read back whole (every tensor's CRC-32), stay
    within the 25 MB a delta may take, and were made on one base: SmolLM2-135M's 30 layers, its sha256 recorded.
    Their headers are in save_safetensors' order, so the command that made one makes the same bytes."""
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "smollm2-adapted")
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))
    assert 1 <= len(paths) <= 2  # at most two committed
    bases = set()
    for path in paths:
        kind, tensors, meta = delta.read_delta(path)
        assert kind == "lora" and tensors and os.path.getsize(path) <= 25e6, path
        assert len(json.loads(meta["kv_source"])) == 30 and len(meta["base_sha256"]) == 64, path
        assert metadata_keys_as_written(path) == sorted(meta), path  # as lora.py writes it now: a rerun's sha256 matches
        bases.add(meta["base_sha256"])
    assert len(bases) == 1
