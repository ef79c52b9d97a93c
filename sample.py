"""
Sample from a trained or converted model, through the owners-only KV cache of model.Llama.

    python sample.py --init_from=out/ckpt.pt --start="ROMEO:" --max_new_tokens=200
    python sample.py --init_from=path/to/hf_llama --start=FILE:prompt.txt --temperature=0 --show_speed=True
    python sample.py --init_from=out/llama.pt --compile=True --num_samples=3 --top_k=50

init_from: a checkpoint file (from train.py or convert_hf.py import), a training out_dir holding
ckpt.pt, or a Hugging Face Llama directory (converted on the fly; --kv_source/--kv_init apply).
Tokenizer, first match wins: --tokenizer (gpt2, a tokenizer.json, a meta.json or a directory holding
one of them); the HF directory's tokenizer.json; the tokenizer.json a converted checkpoint carries;
data/<dataset>/meta.json for a checkpoint from train.py (char table, or GPT-2 BPE).
"""

import argparse
import base64
import hashlib
import json
import os
import sys

import torch

from convert_hf import ConversionError, load_checkpoint_model, load_hf_llama, DTYPES

ROOT = os.path.dirname(os.path.abspath(__file__))
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class SampleError(Exception):
    """Bad input to sample.py; main() prints the message and exits nonzero."""


# -----------------------------------------------------------------------------
# tokenizers


class CharTokenizer:
    def __init__(self, itos: dict):
        self.name = "char"
        self.itos = itos
        self.stoi = {c: i for i, c in itos.items()}

    def encode(self, text):
        unknown = sorted({c for c in text if c not in self.stoi})
        if unknown:
            raise SampleError(f"the prompt has characters outside the model's character table: {unknown[:10]!r}")
        return [self.stoi[c] for c in text]

    def decode(self, ids):
        return "".join(self.itos.get(i, "\ufffd") for i in ids)


class TiktokenTokenizer:
    def __init__(self, enc):
        self.name, self.enc = enc.name, enc

    def encode(self, text):
        return self.enc.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids):
        return self.enc.decode(ids)


class HFTokenizer:
    def __init__(self, tok, source):
        self.name, self.tok = f"tokenizer.json ({source})", tok

    def encode(self, text):
        return self.tok.encode(text).ids  # adds BOS where the tokenizer's post-processor does, as HF does

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)


def gpt2_tokenizer(search_dirs=()):
    """GPT-2 BPE (= r50k_base) built offline from gpt2.tiktoken (data/ or the dataset's directory);
    tiktoken's own cache or download is the last resort."""
    import tiktoken
    for d in list(search_dirs) + [os.path.join(ROOT, "data")]:
        path = os.path.join(d, "gpt2.tiktoken")
        if os.path.isfile(path):
            with open(path, "rb") as f:
                data = f.read()
            if hashlib.sha256(data).hexdigest() != GPT2_TIKTOKEN_SHA256:
                raise SampleError(f"{path} is not the GPT-2 BPE file (sha256 mismatch)")
            ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in data.splitlines() if line)}
            return TiktokenTokenizer(tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                                       special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257))
    try:
        return TiktokenTokenizer(tiktoken.get_encoding("gpt2"))
    except Exception as e:
        raise SampleError(f"GPT-2 tokenizer unavailable: no gpt2.tiktoken in data/ and tiktoken could not fetch "
                          f"it ({type(e).__name__}); copy gpt2.tiktoken into data/") from None


def tokenizer_from_meta(path, meta=None):
    """Tolerant reader of data/<dataset>/meta.json (or the same dict carried in a checkpoint as 'meta'):
    {"tokenizer": "gpt2"} or a char table under "chars" (list or string), "itos" (list, or dict of
    index -> char) or "stoi" (char -> index)."""
    if meta is None:
        try:
            with open(path, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise SampleError(f"cannot read {path}: {e}") from None
    name = next((meta[k] for k in ("tokenizer", "encoding", "tokenizer_name") if isinstance(meta.get(k), str)), None)
    if name is not None and name.lower() in ("gpt2", "r50k_base", "gpt-2"):
        return gpt2_tokenizer([os.path.dirname(path)] if os.path.isfile(path) else [])
    if name is not None and name.lower() not in ("char", "chars", "character"):
        raise SampleError(f"{path}: unknown tokenizer {name!r} (known: gpt2, char)")
    table = next((meta[k] for k in ("chars", "itos", "vocab") if k in meta), None)
    if isinstance(table, (list, str)):
        return CharTokenizer(dict(enumerate(table)))
    if isinstance(table, dict):  # index -> char, or char -> index
        if all(isinstance(k, str) and k.isdigit() and isinstance(v, str) for k, v in table.items()):
            return CharTokenizer({int(k): v for k, v in table.items()})
        if all(isinstance(v, int) for v in table.values()):
            return CharTokenizer({v: k for k, v in table.items()})
    if isinstance(meta.get("stoi"), dict):
        return CharTokenizer({int(v): k for k, v in meta["stoi"].items()})
    raise SampleError(f"{path}: unknown tokenizer: no 'tokenizer' name (gpt2) and no character table "
                      "('chars', 'itos' or 'stoi')")


def tokenizer_from_spec(spec, data_dir):
    """--tokenizer: gpt2, a tokenizer.json, a meta.json, or a directory holding one of them."""
    if spec.lower() in ("gpt2", "r50k_base"):
        return gpt2_tokenizer([data_dir] if data_dir else [])
    if os.path.isdir(spec):
        for name in ("tokenizer.json", "meta.json"):
            if os.path.isfile(os.path.join(spec, name)):
                return tokenizer_from_spec(os.path.join(spec, name), data_dir)
        raise SampleError(f"--tokenizer={spec}: no tokenizer.json or meta.json in that directory")
    if not os.path.isfile(spec):
        raise SampleError(f"unknown tokenizer {spec!r}: use gpt2, a tokenizer.json, a meta.json or a directory "
                          "holding one")
    if os.path.basename(spec) == "meta.json":
        return tokenizer_from_meta(spec)
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
        return tokenizer_from_spec(args.tokenizer, args.data_dir)
    if hf_dir is not None:
        path = os.path.join(hf_dir, "tokenizer.json")
        if os.path.isfile(path):
            return hf_tokenizer(path)
        raise SampleError(f"no tokenizer.json in {hf_dir}: pass --tokenizer=...")
    if ckpt.get("tokenizer_json"):
        return hf_tokenizer(json_text=ckpt["tokenizer_json"])
    if isinstance(ckpt.get("meta"), dict):
        return tokenizer_from_meta("the checkpoint's 'meta'", ckpt["meta"])
    dataset = (ckpt.get("config") or {}).get("dataset") if isinstance(ckpt.get("config"), dict) else None
    if dataset:
        roots = [args.data_dir] if args.data_dir else [os.path.join(ROOT, "data"), "data"]
        if os.path.isfile(os.path.join(str(dataset), "meta.json")):  # a path rather than a name
            return tokenizer_from_meta(os.path.join(str(dataset), "meta.json"))
        for root in roots:
            path = os.path.join(root, str(dataset), "meta.json")
            if os.path.isfile(path):
                return tokenizer_from_meta(path)
        raise SampleError(f"unknown tokenizer: the checkpoint was trained on dataset {dataset!r} but "
                          f"{os.path.join(roots[0], str(dataset), 'meta.json')} does not exist; prepare the "
                          "dataset or pass --tokenizer=...")
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
    p.add_argument("--data_dir", default=None, help="where data/<dataset>/meta.json is looked up (default: data/)")
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
        if args.show_speed:
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
