"""
Sample from a trained or converted model, through the owners-only KV cache of model.Llama.

    python sample.py --init_from=out/ckpt.pt --start="ROMEO:" --max_new_tokens=200
    python sample.py --init_from=path/to/hf_llama --start=FILE:prompt.txt --temperature=0 --show_speed=True
    python sample.py --init_from=out/llama.pt --compile=True --num_samples=3 --top_k=50

init_from: a checkpoint file (from train.py or convert_hf.py import), a training out_dir holding
ckpt.pt, or a Hugging Face Llama directory (converted on the fly; --kv_source/--kv_init apply).
Tokenizer, first match wins: --tokenizer (gpt2, a tokenizer.json, a meta.json or a directory holding
one of them); the HF directory's tokenizer.json; the tokenizer.json a converted checkpoint carries;
the dataset's meta.json (data/common.py: char table or GPT-2 BPE) for a checkpoint from train.py.
"""

import argparse
import json
import os
import sys

import torch

from convert_hf import ConversionError, load_checkpoint_model, load_hf_llama, DTYPES
from data.common import GPT2_EOT, get_codec, load_meta
from train import data_dir_for


class SampleError(Exception):
    """Bad input to sample.py; main() prints the message and exits nonzero."""


# -----------------------------------------------------------------------------
# tokenizers: data/common.py owns the dataset meta.json format and its codecs (char, GPT-2 BPE)


class DatasetTokenizer:
    """The codec of a dataset's meta (data.common.get_codec) with sample.py's errors."""

    def __init__(self, meta, where):
        self.name = f"{meta.get('tokenizer')} ({where})"
        try:
            self.vocab_size = meta["vocab_size"]
            self._encode, self._decode = get_codec(meta)
        except KeyError as e:
            raise SampleError(f"{where} lacks {e}: not a dataset meta.json (re-run the dataset's prepare.py)") from None
        except (ValueError, SystemExit) as e:  # unknown tokenizer; gpt2.tiktoken missing or corrupt
            raise SampleError(f"{where}: {e}") from None

    def encode(self, text):
        try:
            return self._encode(text)
        except ValueError as e:  # characters outside a char dataset's table
            raise SampleError(f"the prompt cannot be encoded by the {self.name} tokenizer: {e}") from None

    def decode(self, ids):
        # a model's vocabulary may be bigger than its dataset's (vocab_size padded up): such ids print as U+FFFD
        parts, run = [], []
        for i in ids:
            if i < self.vocab_size:
                run.append(i)
            else:
                parts += [self._decode(run), "\ufffd"]
                run = []
        return "".join(parts) + self._decode(run)


class HFTokenizer:
    def __init__(self, tok, source):
        self.name, self.tok = f"tokenizer.json ({source})", tok

    def encode(self, text):
        return self.tok.encode(text).ids  # adds BOS where the tokenizer's post-processor does, as HF does

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)


def dataset_tokenizer(data_dir):
    """The tokenizer of a prepared dataset directory, from its meta.json."""
    path = os.path.join(data_dir, "meta.json")
    try:
        meta = load_meta(data_dir)
    except (OSError, json.JSONDecodeError) as e:
        raise SampleError(f"cannot read {path}: {e}") from None
    except ValueError as e:  # load_meta's own message names the file
        raise SampleError(str(e)) from None
    return DatasetTokenizer(meta, path)


def tokenizer_from_spec(spec):
    """--tokenizer: gpt2, a tokenizer.json, a meta.json, or a directory holding one of them."""
    if spec.lower() in ("gpt2", "r50k_base"):
        return DatasetTokenizer({"tokenizer": "gpt2", "vocab_size": GPT2_EOT + 1}, "--tokenizer")
    if os.path.isdir(spec):
        for name in ("tokenizer.json", "meta.json"):
            if os.path.isfile(os.path.join(spec, name)):
                return tokenizer_from_spec(os.path.join(spec, name))
        raise SampleError(f"--tokenizer={spec}: no tokenizer.json or meta.json in that directory")
    if not os.path.isfile(spec):
        raise SampleError(f"unknown tokenizer {spec!r}: use gpt2, a tokenizer.json, a meta.json or a directory "
                          "holding one")
    if os.path.basename(spec) == "meta.json":
        return dataset_tokenizer(os.path.dirname(spec))
    try:
        return hf_tokenizer(spec)
    except SampleError:
        raise
    except Exception as e:
        raise SampleError(f"--tokenizer={spec}: not a tokenizer.json the tokenizers library can read ({e})") from None


def hf_tokenizer(path=None, json_text=None):
    """tokenizer.json through the tokenizers library, imported only here: sampling a checkpoint trained on
    a char or GPT-2 dataset needs neither it nor safetensors."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise SampleError("this model's tokenizer is a tokenizer.json, which needs the 'tokenizers' package: "
                          "pip install tokenizers") from None
    if json_text is not None:
        return HFTokenizer(Tokenizer.from_str(json_text), "carried by the checkpoint")
    return HFTokenizer(Tokenizer.from_file(path), path)


def find_tokenizer(args, ckpt, hf_dir):
    if args.tokenizer:
        return tokenizer_from_spec(args.tokenizer)
    if hf_dir is not None:
        path = os.path.join(hf_dir, "tokenizer.json")
        if os.path.isfile(path):
            return hf_tokenizer(path)
        raise SampleError(f"no tokenizer.json in {hf_dir}: pass --tokenizer=...")
    if ckpt.get("tokenizer_json"):
        return hf_tokenizer(json_text=ckpt["tokenizer_json"])
    if isinstance(ckpt.get("meta"), dict):
        return DatasetTokenizer(ckpt["meta"], "the checkpoint's 'meta'")
    dataset = (ckpt.get("config") or {}).get("dataset") if isinstance(ckpt.get("config"), dict) else None
    if dataset:  # where train.py found it, or under --data_dir
        d = os.path.join(args.data_dir, str(dataset)) if args.data_dir else data_dir_for(str(dataset))
        if os.path.isfile(os.path.join(d, "meta.json")):
            return dataset_tokenizer(d)
        raise SampleError(f"unknown tokenizer: the checkpoint was trained on dataset {dataset!r} but "
                          f"{os.path.join(d, 'meta.json')} does not exist; prepare the dataset or pass --tokenizer=...")
    raise SampleError("unknown tokenizer: the checkpoint names no dataset and carries no tokenizer; pass "
                      "--tokenizer=gpt2, a tokenizer.json or a meta.json")


# -----------------------------------------------------------------------------
# model


def load_model(args):
    """(model, checkpoint dict, hf_dir or None) for --init_from."""
    path = args.init_from
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        if os.path.isfile(os.path.join(path, "ckpt.pt")):  # a training out_dir
            path = os.path.join(path, "ckpt.pt")
        else:
            raise SampleError(f"--init_from={path}: a directory with neither config.json (Hugging Face) nor ckpt.pt")
    if os.path.isdir(path):
        model = load_hf_llama(path, kv_source=args.kv_source, kv_init=args.kv_init, block_size=args.block_size)
        return model, {}, path
    if not os.path.exists(path):
        raise SampleError(f"checkpoint not found: --init_from={path} does not exist")
    model, ckpt = load_checkpoint_model(path)
    return model, ckpt, None


def str2bool(s):
    if isinstance(s, bool):
        return s
    if s.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if s.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {s!r}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample text from an ECHO-LLaMA checkpoint or a Hugging Face Llama directory.")
    p.add_argument("--init_from", default="out/ckpt.pt", help="checkpoint file, training out_dir, or HF Llama directory")
    p.add_argument("--start", default="\n", help='prompt text, or FILE:path to read it from a file')
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=None, help="default: as many as fit the context, at most 500")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=200, help="0 or negative: no top-k")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto"] + sorted(DTYPES),
                   help="auto: bfloat16 on a GPU that supports it, else float32")
    p.add_argument("--compile", type=str2bool, nargs="?", const=True, default=False, help="compile the decode step")
    p.add_argument("--show_speed", type=str2bool, nargs="?", const=True, default=False,
                   help="print prefill and decode tokens/s")
    p.add_argument("--tokenizer", default=None, help="gpt2, a tokenizer.json, a meta.json or a directory holding one")
    p.add_argument("--data_dir", default=None,
                   help="where <dataset>/meta.json is looked up (default: where train.py finds the dataset)")
    p.add_argument("--kv_source", default=None, help="HF directories only: share K/V at load (e.g. upper:half)")
    p.add_argument("--kv_init", default="own", choices=["own", "mean"], help="HF directories only")
    p.add_argument("--block_size", type=int, default=None, help="HF directories only: context to build for")
    return p.parse_args(argv)


def read_prompt(start):
    if start.startswith("FILE:"):
        path = start[len("FILE:"):]
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise SampleError(f"cannot read the prompt file: {e}") from None
    return start


def run(args):
    if args.num_samples < 1:
        raise SampleError(f"--num_samples must be at least 1, got {args.num_samples}")
    if args.temperature < 0:
        raise SampleError(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise SampleError(f"unknown --device={args.device!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SampleError("--device=cuda but no GPU is available: use --device=cpu")
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dtype = DTYPES[args.dtype]
    prompt = read_prompt(args.start)  # before the (possibly slow) model load

    model, ckpt, hf_dir = load_model(args)
    tokenizer = find_tokenizer(args, ckpt, hf_dir)
    model.to(device=device, dtype=dtype)
    block_size, vocab_size = model.config.block_size, model.config.vocab_size

    ids = tokenizer.encode(prompt)
    if not ids:
        raise SampleError("the prompt encodes to no tokens: give a non-empty --start")
    if max(ids) >= vocab_size:
        raise SampleError(f"the tokenizer ({tokenizer.name}) gives token id {max(ids)} but the model's vocabulary "
                          f"has {vocab_size} entries: wrong tokenizer for this checkpoint")
    if len(ids) >= block_size:
        raise SampleError(f"the prompt is {len(ids)} tokens long but the model's context is block_size={block_size}: "
                          f"shorten it to at most {block_size - 1} tokens")
    room = block_size - len(ids)
    max_new = min(500, room) if args.max_new_tokens is None else args.max_new_tokens
    if max_new < 1:
        raise SampleError(f"--max_new_tokens must be at least 1, got {max_new}")
    if max_new > room:
        raise SampleError(f"prompt of {len(ids)} tokens + --max_new_tokens={max_new} exceeds the context of "
                          f"{block_size} tokens: ask for at most {room} new tokens")

    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    top_k = args.top_k if args.top_k and args.top_k > 0 else None
    x = torch.tensor(ids, dtype=torch.long, device=device)[None]
    for _ in range(args.num_samples):
        compiling = args.compile and not hasattr(model, "_compiled_decode_step")
        t = {} if args.show_speed else None
        y = model.generate(x, max_new, temperature=args.temperature, top_k=top_k, compile_decode=args.compile,
                           timings=t)
        print(tokenizer.decode(y[0].tolist()))
        if args.show_speed:
            decode = (f"decode {t['decode_steps'] / t['decode_s']:.1f} tok/s over {t['decode_steps']} steps"
                      if t["decode_steps"] and t["decode_s"] > 0 else "decode: too few steps to time")
            print(f"[speed] prefill {len(ids)} tokens in {t['prefill_s'] * 1e3:.1f} ms "
                  f"({len(ids) / t['prefill_s']:.1f} tok/s); first decode step {t['first_decode_s'] * 1e3:.1f} ms"
                  f"{' (includes compilation)' if compiling else ''}; {decode} "
                  f"[{device.type}, {str(dtype).replace('torch.', '')}]")
        print("---------------")


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (SampleError, ConversionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
