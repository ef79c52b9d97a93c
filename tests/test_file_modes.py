"""Every file the project writes gets the mode a plain open() gives under the current umask (0644 under
022, 0600 under 077), including those written through a private temp file (checkpoints via mkstemp,
safetensors' save_file): never 0600 for one file beside 0644 for the rest."""

import json
import os
import stat

import pytest
import torch

from benchmarking import write_json
from checkpoint import hf_config_from_llama, save_checkpoint
from convert_hf import checkpoint_dict
from convert_hf import main as convert_main
from dataset import TokenWriter, write_meta, write_tokens
from lora import apply_lora, save_lora
from model import Llama, LlamaConfig


@pytest.fixture(params=[(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)], ids=["umask022", "umask077"])
def umask(request):
    mask, file_mode, dir_mode = request.param
    old = os.umask(mask)
    yield file_mode, dir_mode
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def tiny_model(kv_source=None):
    torch.manual_seed(0)
    return Llama(LlamaConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=16, intermediate_size=32, vocab_size=40,
                             block_size=16, kv_source=kv_source))


def test_checkpoint_results_and_dataset_files(tmp_path, umask):
    file_mode, _ = umask
    save_checkpoint({"a": 1}, str(tmp_path / "ckpt.pt"))
    write_json([{"x": 1}], str(tmp_path / "results.json"))
    write_meta(str(tmp_path), 40, "char", chars=[chr(65 + i) for i in range(40)])
    write_tokens(str(tmp_path / "train.bin"), [1, 2, 3], 40)
    writer = TokenWriter(str(tmp_path / "val.bin"), 40)
    writer.write([4, 5])
    writer.close()
    written = sorted(os.listdir(tmp_path))
    assert written == ["ckpt.pt", "meta.json", "results.json", "train.bin", "val.bin"]
    assert {name: mode(tmp_path / name) for name in written} == {name: file_mode for name in written}


@pytest.mark.parametrize("kv_source", [None, "0,0"])
def test_every_exported_file_and_the_directory(tmp_path, umask, kv_source):
    file_mode, dir_mode = umask
    from tokenizers import Tokenizer, models
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(40)}, unk_token="w0"))
    model = tiny_model(kv_source)
    hf = hf_config_from_llama(model.config, extra={"bos_token_id": 1, "eos_token_id": 2})
    save_checkpoint(checkpoint_dict(model, hf, tok.to_str(), chat_template="{{ messages }}"), str(tmp_path / "c.pt"))
    assert convert_main(["export", str(tmp_path / "c.pt"), str(tmp_path / "out" / "hf")]) == 0
    files = sorted(os.listdir(tmp_path / "out" / "hf"))
    assert "model.safetensors" in files and "generation_config.json" in files
    assert ("modeling_echo_llama.py" in files) == (kv_source is not None)
    assert {name: mode(tmp_path / "out" / "hf" / name) for name in files} == {name: file_mode for name in files}
    assert mode(tmp_path / "out" / "hf") == dir_mode and mode(tmp_path / "out") == dir_mode
    assert json.loads((tmp_path / "out" / "hf" / "generation_config.json").read_text())["eos_token_id"] == 2


def test_lora_adapter_file(tmp_path, umask):
    file_mode, _ = umask
    model = tiny_model()
    apply_lora(model, rank=2)
    save_lora(model, tmp_path / "adapters.safetensors")
    assert mode(tmp_path / "adapters.safetensors") == file_mode


def test_delta_file(tmp_path, umask):
    from delta import main as delta_main
    file_mode, dir_mode = umask
    base = tiny_model()
    save_checkpoint({"model": base.state_dict(), "model_config": base.config.to_dict()}, str(tmp_path / "base.pt"))
    with torch.no_grad():
        base.norm.weight.add_(1.0)
    save_checkpoint({"model": base.state_dict(), "model_config": base.config.to_dict()}, str(tmp_path / "tuned.pt"))
    assert delta_main([f"--init_from={tmp_path / 'tuned.pt'}", f"--base={tmp_path / 'base.pt'}",
                       f"--out={tmp_path / 'new' / 'delta.safetensors'}"]) == 0
    assert mode(tmp_path / "new" / "delta.safetensors") == file_mode and mode(tmp_path / "new") == dir_mode
