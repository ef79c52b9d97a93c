"""convert_hf.py export of KV-sharing (kv_source) and attention-sharing (attn_source) models, checked against
transformers itself: AutoModelForCausalLM with trust_remote_code loads modeling_echo_llama.py, its logits equal
ours, greedy generate with transformers' DynamicCache equals use_cache=False (the Gemma 3n/4 failure) and our own
generation token for token, and save_pretrained / from_pretrained keeps it all."""

import json
import os

import pytest
import torch
import transformers

import convert_hf
from convert_hf import export_hf
from model import Llama, LlamaConfig

VOCAB = 64
MAPS = {  # name: (kv_source, attn_source)
    "cla2": ("0,0,2,2", None),
    "upper3": ("0,1,1,1", None),
    "echoatt": (None, "0,0,2,2"),
    "both": ("0,0,2,3", "0,1,2,2"),
}


def shared_model(kv, attn, tie=False, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(n_layer=4, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64, vocab_size=VOCAB,
                         block_size=64, rope_theta=2e4, norm_eps=1e-5, tie_embeddings=tie, kv_source=kv,
                         attn_source=attn)
    model = Llama(config).eval()
    with torch.no_grad():  # large weights: sharpened logits, so a wrong K/V changes the greedy tokens
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()


def greedy(hf, prompt, n, use_cache, logits=False):
    out = hf.generate(prompt, max_new_tokens=n, do_sample=False, use_cache=use_cache, pad_token_id=0,
                      return_dict_in_generate=True, output_logits=True)
    return (out.sequences, torch.stack(out.logits)) if logits else out.sequences


@pytest.mark.parametrize("name", list(MAPS))
def test_shared_export_loads_and_generates_in_transformers(tmp_path, name):
    ours = shared_model(*MAPS[name], tie=name == "upper3")
    export_hf(ours, tmp_path / "hf", verify=True)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["EchoLlamaForCausalLM"] and cfg["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_echo_llama.EchoLlamaForCausalLM"
    assert cfg["kv_source"] == list(ours.config.kv_source) and cfg["attn_source"] == list(ours.config.attn_source)
    hf = load(tmp_path / "hf")
    assert type(hf).__name__ == "EchoLlamaForCausalLM"
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)[0]).abs().max() < 1e-5
    prompt = x[:1, :8]
    (cached, cached_logits), (uncached, uncached_logits) = greedy(hf, prompt, 30, True, True), \
        greedy(hf, prompt, 30, False, True)
    mine = ours.generate(prompt, 30, temperature=0)
    assert torch.equal(cached, uncached) and torch.equal(cached, mine)
    # not only the argmax: every decoding step's logits through the cache are the full forward's
    assert (cached_logits - uncached_logits).abs().max() < 1e-4
    assert len(set(cached[0, 8:].tolist())) > 1
    # the consumers own no cache entry: transformers' cache holds K/V of the owners only
    out = hf(prompt, use_cache=True)
    kinds = [type(layer).__name__ for layer in out.cache.layers]
    assert [k == "DummyLayer" for k in kinds] == [j != i for i, j in enumerate(ours.config.kv_source)]
    # save_pretrained writes the modeling file too; the reloaded model is the same model
    hf.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "modeling_echo_llama.py").is_file()
    again = load(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(again(x).logits, hf(x).logits)
    assert torch.equal(greedy(again, prompt, 30, True), cached)


def test_consumers_have_no_kv_weights_in_the_export(tmp_path):
    ours = shared_model("0,0,2,2", None)
    export_hf(ours, tmp_path / "hf")
    from safetensors.torch import load_file
    keys = load_file(tmp_path / "hf" / "model.safetensors").keys()
    assert "model.layers.1.self_attn.k_proj.weight" not in keys and "model.layers.2.self_attn.k_proj.weight" in keys


def test_dense_export_stays_plain_llama(tmp_path):
    export_hf(shared_model(None, None), tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in cfg and "kv_source" not in cfg
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]


def test_a_hand_edited_map_is_refused_on_load(tmp_path):
    export_hf(shared_model("0,0,2,2", None), tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"kv_source": [0, 0, 1, 2]}))
    with pytest.raises(ValueError, match="kv_source=\\[0, 0, 1, 2\\] must give each of the 4 layers"):
        load(tmp_path / "hf")


def test_export_cli_of_the_shared_default_model(tmp_path, capsys):
    ours = shared_model("0,1,1,1", None)
    from checkpoint import save_checkpoint
    save_checkpoint({"model": ours.state_dict(), "model_config": ours.config.to_dict()}, str(tmp_path / "c.pt"))
    assert convert_hf.main(["export", str(tmp_path / "c.pt"), str(tmp_path / "hf"), "--verify"]) == 0
    assert "modeling_echo_llama.py (load with trust_remote_code=True)" in capsys.readouterr().out
