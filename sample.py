"""
Sample from a trained or converted model, through the owners-only KV cache of model.Llama.

    .venv/bin/python sample.py --init_from=out-shakespeare-char --start="ROMEO:" --max_new_tokens=200
    .venv/bin/python sample.py --init_from=path/to/hf_llama --start=FILE:prompt.txt --temperature=0 --show_speed
    .venv/bin/python sample.py --init_from=data/smollm2/smollm2-135m-instruct.pt --chat --start="What is the capital of France?" --temperature=0

init_from: a checkpoint file (from train.py or convert_hf.py import), a training out_dir holding
ckpt.pt, or a Hugging Face Llama directory (converted on the fly; --kv_source/--kv_init apply only there).
Tokenizer, first match wins: --tokenizer (gpt2, a tokenizer.json, a meta.json or a directory holding
one of them); the HF directory's tokenizer.json (or meta.json: a char or GPT-2 model's export); the
tokenizer.json a converted checkpoint carries; the dataset's meta.json (dataset.py; char table, GPT-2
BPE or tokenizer.json) for a checkpoint from train.py.
Generation stops at the model's end-of-sequence token when it has one; past the context it goes on
over the most recent tokens (model.generate).
"""

import json
import os
import stat
import sys
import time

import torch

from checkpoint import load_model, special_ids
from configurator import DTYPES, apply_threads, configure, resolve_device, resolve_dtype, run_script, settings_from
from convert_hf import load_hf_llama, read_chat_template
from dataset import dataset_dir, load_meta
from delta import load_with_delta
from guards import available_memory
from quantize import QUANTIZERS
from selfgen import render_chat
from speed import block_weights, compile_decode_step, fuse_projections, pack_weights, use_decode_paths
from tokenizer import GPT2_VOCAB_SIZE, HFTokenizer, from_meta

# -----------------------------------------------------------------------------
init_from = "out-shakespeare-char"  # checkpoint file, training out_dir (train.py's default), or HF Llama directory
delta = ""                   # a delta file (delta.py, lora.py --adapters) to apply to the init_from checkpoint
start = "\n"                 # the prompt, or FILE:path to read it from a file
chat = False                 # wrap the prompt in the model's chat template as one user turn
num_samples = 1              # samples to draw, one after another
max_new_tokens = 0           # 0: what fits the context after the prompt, at most 500 (a line on stderr says how many)
temperature = 0.8            # 0 is greedy
top_k = 200                  # 0: no top-k
seed = 1337                  # RNG seed of the sampling
device = "auto"              # auto (cuda if present), cpu, cuda, cuda:N
threads = 0                  # torch CPU threads: 0 = 1 on a CPU (shared machines: configurator.apply_threads)
dtype = "auto"               # auto (bfloat16 on a GPU that has it, else float32), float32, bfloat16, float16
compile = False              # torch.compile the decode step (on CPU 3-4x faster decoding at batch 1: docs/bench.md)
quantize = ""                # 'int8' or 'int4': weight-only quantized linear layers for decoding (quantize.py)
show_speed = False           # print generation tokens/s
tokenizer = ""               # gpt2, a tokenizer.json, a meta.json or a directory holding one
data_dir = ""                # where <dataset>/meta.json is looked up ('' = where train.py finds the dataset)
kv_source = ""               # Hugging Face directories only: share K/V at load (e.g. upper:half)
kv_init = "own"              # Hugging Face directories only: own or mean
block_size = 0               # Hugging Face directories only: context to build for (0 = max_position_embeddings)
# -----------------------------------------------------------------------------
DEFAULTS = settings_from(globals())
CHOICES = {"dtype": ("auto", *DTYPES), "kv_init": ("own", "mean"), "quantize": ("", "int8", "int4")}


class SampleError(ValueError):
    """Bad input to sample.py; main() prints the message and exits nonzero."""


# -----------------------------------------------------------------------------
# which tokenizer: tokenizer.py has the three kinds (char table, GPT-2 BPE, tokenizer.json)


def meta_tokenizer(meta, where):
    """The tokenizer a dataset's meta names, with sample.py's error."""
    try:
        return from_meta(meta, where)
    except ValueError as e:  # names `where`: a missing key, an unknown tokenizer, a missing file
        raise SampleError(str(e)) from None


def dataset_tokenizer(data_dir):
    """The tokenizer of a prepared dataset directory, from its meta.json."""
    path = os.path.join(data_dir, "meta.json")
    try:
        meta = load_meta(data_dir)
    except (OSError, json.JSONDecodeError) as e:
        raise SampleError(f"cannot read {path}: {e}") from None
    except ValueError as e:  # load_meta's own message names the file
        raise SampleError(str(e)) from None
    return meta_tokenizer(meta, path)


def tokenizer_from_spec(spec):
    """--tokenizer: gpt2, a tokenizer.json, a meta.json, or a directory holding one of them."""
    if spec.lower() in ("gpt2", "r50k_base"):
        return meta_tokenizer({"tokenizer": "gpt2", "vocab_size": GPT2_VOCAB_SIZE}, "--tokenizer")
    if os.path.isdir(spec):
        for name in ("tokenizer.json", "meta.json"):
            if os.path.isfile(os.path.join(spec, name)):
                return tokenizer_from_spec(os.path.join(spec, name))
        raise SampleError(f"--tokenizer={spec}: no tokenizer.json or meta.json in that directory")
    if not os.path.isfile(spec):
        looks_like_a_path = os.sep in spec or spec.endswith(".json")
        raise SampleError(f"--tokenizer={spec}: no such file" if looks_like_a_path and not os.path.exists(spec) else
                          f"unknown tokenizer {spec!r}: use gpt2, a tokenizer.json, a meta.json or a directory "
                          "holding one")
    if os.path.basename(spec) == "meta.json":
        return dataset_tokenizer(os.path.dirname(spec))
    try:
        return model_tokenizer(spec)
    except SampleError:
        raise
    except Exception as e:
        raise SampleError(f"--tokenizer={spec}: not a tokenizer.json the tokenizers library can read ({e})") from None


def model_tokenizer(path=None, json_text=None):
    """The tokenizer.json a model comes with (a file, or the text a converted checkpoint carries)."""
    try:
        return HFTokenizer.load(path, json_text, name=f"tokenizer.json ({path or 'carried by the checkpoint'})")
    except ImportError as e:  # the tokenizers package is missing: say which to install
        raise SampleError(str(e)) from None


def find_tokenizer(spec, data_dir, ckpt, hf_dir):
    """The tokenizer to use, first match wins: --tokenizer, the HF directory's, the one a converted
    checkpoint carries, the dataset's meta.json (carried or on disk) for a checkpoint from train.py."""
    if spec:
        return tokenizer_from_spec(spec)
    if hf_dir is not None:
        path = os.path.join(hf_dir, "tokenizer.json")
        if os.path.isfile(path):
            return model_tokenizer(path)
        if os.path.isfile(os.path.join(hf_dir, "meta.json")):  # convert_hf.py export of a char or GPT-2 model
            return dataset_tokenizer(hf_dir)
        raise SampleError(f"no tokenizer.json or meta.json in {hf_dir}: pass the tokenizer the model was trained "
                          "with, e.g. --tokenizer=data/shakespeare_char/meta.json (a char dataset's), --tokenizer=gpt2 "
                          "or --tokenizer=path/to/tokenizer.json")
    if ckpt.get("tokenizer_json"):
        return model_tokenizer(json_text=ckpt["tokenizer_json"])
    if isinstance(ckpt.get("meta"), dict):
        return meta_tokenizer(ckpt["meta"], "the checkpoint's 'meta'")
    dataset = (ckpt.get("config") or {}).get("dataset") if isinstance(ckpt.get("config"), dict) else None
    if dataset:  # where train.py found it, or under --data_dir
        d = os.path.join(data_dir, str(dataset)) if data_dir else dataset_dir(str(dataset))
        if os.path.isfile(os.path.join(d, "meta.json")):
            tok = dataset_tokenizer(d)
            tok.from_data_dir = bool(data_dir)
            return tok
        raise SampleError(f"unknown tokenizer: the checkpoint was trained on dataset {dataset!r} but "
                          f"{os.path.join(d, 'meta.json')} does not exist; prepare the dataset or pass --tokenizer=...")
    raise SampleError("unknown tokenizer: the checkpoint names no dataset and carries no tokenizer; pass "
                      "--tokenizer=gpt2, a tokenizer.json or a meta.json")


# -----------------------------------------------------------------------------
# model, prompt and generation


HF_ONLY = ("kv_source", "kv_init", "block_size")  # settings that apply to a Hugging Face directory only


def load_for_sampling(path, s, explicit):
    """(model, checkpoint dict, hf_dir or None) for --init_from. A setting given for the other kind of
    model is an error rather than silently ignored."""
    is_hf = os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))
    given = [f"--{k}" for k in HF_ONLY if k in explicit]
    if not is_hf and given:
        raise SampleError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} only to a Hugging Face "
                          f"directory: {path} is a checkpoint, which has its own (convert it anew to change them)")
    if is_hf and "kv_init" in explicit and not s.kv_source:
        raise SampleError("--kv_init applies only with --kv_source (it sets the K/V of the layers that will share)")
    if is_hf and "data_dir" in explicit:
        raise SampleError(f"--data_dir applies only to a checkpoint from train.py: {path} is a Hugging Face "
                          "directory (its tokenizer is its tokenizer.json, or --tokenizer)")
    if is_hf and s.delta:
        raise SampleError(f"--delta applies to a checkpoint, the base it was made from: {path} is a Hugging Face "
                          "directory (import it with convert_hf.py first)")
    if is_hf:
        model = load_hf_llama(path, kv_source=s.kv_source or None, kv_init=s.kv_init, block_size=s.block_size or None)
        return model, {}, path
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "ckpt.pt")):
        raise SampleError(f"--init_from={path}: a directory with neither config.json (Hugging Face) nor ckpt.pt")
    model, ckpt = load_with_delta(path, s.delta) if s.delta else load_model(path)
    return model, ckpt, None


PROMPT_FILE_LIMIT = 64 << 20  # bytes: far beyond any context; a bigger file is not a prompt


def read_prompt(start):
    if start.startswith("FILE:"):
        path = start[len("FILE:"):]
        try:  # a FIFO or a device (/dev/urandom, /dev/zero) would block or never end: regular files only
            info = os.stat(path)
        except OSError as e:
            raise SampleError(f"cannot read the prompt file {path}: {e.strerror or e}") from None
        if not stat.S_ISREG(info.st_mode):
            raise SampleError(f"the prompt file {path} is not a regular file (a directory, FIFO or device): give a "
                              "text file")
        if info.st_size > PROMPT_FILE_LIMIT:
            raise SampleError(f"the prompt file {path} has {info.st_size:,} bytes, more than {PROMPT_FILE_LIMIT >> 20} "
                              "MiB: not a prompt (the model sees its last block_size tokens at most)")
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise SampleError(f"cannot read the prompt file {path}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise SampleError(f"the prompt file {path} is not UTF-8 text") from None
    return start


def chat_template(ckpt, hf_dir):
    return read_chat_template(hf_dir) if hf_dir is not None else ckpt.get("chat_template")


def wrap_in_chat(template, text, bos_token="", eos_token=""):
    """The prompt as one user turn of the model's (Jinja) chat template, ready for the reply."""
    if not template:
        raise SampleError("--chat: this model carries no chat template (not an instruction-tuned model, or a "
                          "checkpoint converted without one); leave --chat out")
    try:
        return render_chat(template, [{"role": "user", "content": text}], bos_token, eos_token)
    except ValueError as e:
        raise SampleError(f"--chat: {e}") from None


MIN_TEMPERATURE = 1e-4
DECODE_STEP_FLOOR_S = 10e-6  # no decoding step of any model takes less (a kernel launch per layer, at the least)


def check_sampling_fits(model, s, prompt_tokens, max_new, device):
    """Before generating: weights that are all finite (NaN weights would end in torch.multinomial as a
    traceback), and a length that fits in memory (the output holds 8 bytes a token) and in a day."""
    broken = next((name for name, t in model.state_dict().items() if not torch.isfinite(t).all()), None)
    if broken is not None:
        raise SampleError(f"the model's weight {broken} is not finite (NaN or inf): {s.init_from} is broken; "
                          "sample from a good checkpoint")
    tokens = prompt_tokens + max_new  # one sample at a time
    free = available_memory(device)
    if free is not None and 8 * tokens > free:
        raise SampleError(f"--max_new_tokens={s.max_new_tokens} cannot fit: its token ids alone need "
                          f"{8 * tokens / (1 << 30):,.1f} GiB, {device} has {free / (1 << 30):,.1f} GiB available")
    seconds = s.num_samples * max_new * model.config.n_layer * DECODE_STEP_FLOOR_S
    if seconds > 86400:
        raise SampleError(f"--num_samples={s.num_samples} of {max_new} new tokens would take at least "
                          f"{seconds / 3600:,.0f} hours "
                          f"({model.config.n_layer} layers a token, >= {DECODE_STEP_FLOOR_S * 1e6:.0f} us each): "
                          "ask for fewer tokens")


def check_settings(s):
    if s.num_samples < 1:
        raise SampleError(f"--num_samples must be at least 1, got {s.num_samples}")
    if not (s.temperature >= 0 and s.temperature != float("inf")):
        raise SampleError(f"--temperature must be a finite number >= 0 (0 is greedy), got {s.temperature}")
    if 0 < s.temperature < MIN_TEMPERATURE:  # logits / temperature overflow to inf, and softmax to NaN
        raise SampleError(f"--temperature={s.temperature} is below {MIN_TEMPERATURE}: that is greedy decoding but for "
                          "overflow; use --temperature=0")
    if s.top_k < 0:
        raise SampleError(f"--top_k must be at least 1 (0: no top-k), got {s.top_k}")
    if s.max_new_tokens < 0:
        raise SampleError(f"--max_new_tokens must be at least 1 (0: as many as fit the context), got {s.max_new_tokens}")


def encode_prompt(tok, prompt, vocab_size, chat=False):
    try:
        ids = tok.encode_chat(prompt) if chat else tok.encode(prompt)
    except ValueError as e:  # characters outside a char dataset's table
        raise SampleError(f"the prompt cannot be encoded by the {tok.name} tokenizer: {e}") from None
    if not ids:
        raise SampleError("the prompt encodes to no tokens: give a non-empty --start")
    if max(ids) >= vocab_size:
        raise SampleError(f"the tokenizer ({tok.name}) gives token id {max(ids)} but the model's vocabulary "
                          f"has {vocab_size} entries: wrong tokenizer for this checkpoint")
    return ids


def main(argv):
    s, explicit = configure(DEFAULTS, argv, __doc__, CHOICES)
    check_settings(s)
    dev = resolve_device(s.device)
    dtype = DTYPES[resolve_dtype(s.dtype, "cuda" if dev.startswith("cuda") else dev)]
    threads = apply_threads(s.threads, "cuda" if dev.startswith("cuda") else dev)
    if s.quantize and dev == "cpu" and dtype != torch.bfloat16:
        raise SampleError(f"--quantize={s.quantize} on a CPU needs --dtype=bfloat16: with {dtype} activations torch's "
                          f"{s.quantize} kernel decodes more slowly than the float model (docs/bench.md)")
    prompt = read_prompt(s.start)  # before the (possibly slow) model load
    model, ckpt, hf_dir = load_for_sampling(s.init_from, s, explicit)
    tok = find_tokenizer(s.tokenizer, s.data_dir, ckpt, hf_dir)
    if "data_dir" in explicit and not getattr(tok, "from_data_dir", False):
        raise SampleError(f"--data_dir applies only when the tokenizer is the dataset's meta.json; here it is "
                          f"{tok.name} (--tokenizer, or carried by the checkpoint)")
    bos, eos = special_ids(ckpt, hf_dir)
    if s.chat:
        prompt = wrap_in_chat(chat_template(ckpt, hf_dir), prompt, tok.token_text(bos), tok.token_text(eos))
    model.to(device=dev, dtype=dtype)
    if s.quantize:
        QUANTIZERS[s.quantize](model)
    ids = encode_prompt(tok, prompt, model.config.vocab_size, s.chat)
    max_new = s.max_new_tokens or min(500, max(1, model.config.block_size - len(ids)))
    check_sampling_fits(model, s, len(ids), max_new, dev)  # before any work or notice
    if not s.max_new_tokens:
        print(f"up to {max_new} new tokens (max_new_tokens=0: what fits the {model.config.block_size}-token context "
              "after the prompt, at most 500; --max_new_tokens=N for another number)", file=sys.stderr, flush=True)
    ckpt.pop("model", None)  # the model holds its weights: the dict's would keep a second copy once they are packed
    pack_weights(block_weights(fuse_projections(use_decode_paths(model))))  # speed.py's decoding paths: faster on a
    # CPU, same sums (weights in blocks add them in another order: docs/bench.md, "Weights in blocks of 16 rows")
    x = torch.tensor(ids, dtype=torch.long, device=dev)[None]
    step, compile_s = compiled_step(model, x, max_new) if s.compile else (None, 0.0)
    torch.manual_seed(s.seed)
    for k in range(s.num_samples):
        stream = TextStream(tok, [] if s.chat else ids)  # the text as it is generated
        t0 = time.perf_counter()
        try:
            y = model.generate(x, max_new, temperature=s.temperature, top_k=s.top_k or None, eos_id=eos,
                               decode_step=step, on_token=stream.add)
        except RuntimeError as e:
            if "probability tensor contains" not in str(e):
                raise
            raise SampleError(f"the model gave non-finite logits while sampling ({str(dtype).replace('torch.', '')}): "
                              "its activations overflow; try --dtype=float32 or --temperature=0") from None
        seconds = time.perf_counter() - t0
        stream.finish(y[0, len(ids) if s.chat else 0:].tolist())
        if s.show_speed:
            print(speed_line(y.shape[1] - len(ids), len(ids), seconds, stream.first_at - t0, dev, dtype, threads,
                             compile_s if k == 0 else None))
        print("---------------")
    return 0


class TextStream:
    """Prints the text of a growing list of ids as the tokens come (model.generate's on_token), so that
    what is printed, once finished, is exactly the text of the final ids. A piece is held back while it
    ends in U+FFFD (a character whose bytes are not all there yet) or whitespace (a tokenizer may tidy
    it), or does not extend what was printed; `finish` prints the rest."""

    def __init__(self, tok, ids):
        self.tok, self.ids, self.shown, self.first_at = tok, list(ids), "", None
        self.show()

    def add(self, token):
        self.first_at = self.first_at or time.perf_counter()  # prefill and the first token done
        self.ids.append(int(token[0]))
        self.show()

    def show(self):
        text = self.tok.decode(self.ids).rstrip("\ufffd")
        text = text[:len(text.rstrip())]
        if len(text) > len(self.shown) and text.startswith(self.shown):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text

    def finish(self, ids):
        text = self.tok.decode(ids)
        print(text[len(self.shown):] if text.startswith(self.shown) else "\n" + text, flush=True)


def compiled_step(model, x, max_new):
    """(torch.compile of model.decode_step, seconds it took), compiled here, before generation: a timed
    generation then measures decoding only. Says when compiling starts and ends (on stderr)."""
    print("compiling the decode step (torch.compile: minutes on a CPU the first time, less from its cache) ...",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    step = compile_decode_step(model)
    with torch.no_grad():  # one step into a scratch cache of generate's shape: the graph generate will run
        cache = model.new_cache(x.shape[0], model.cache_length(x.shape[1], max_new))  # shapes and strides as generate's
        step(x.new_zeros(x.shape[0], 1), x.new_zeros(1), cache)
    seconds = time.perf_counter() - t0
    one_call = getattr(step, "one_call_steps", 0) > 0  # speed.LayersInOneCall took the step: the graph waits for more rows
    print(f"ready in {seconds:.1f} s: one row's layers run in one call (speed::decode_layers), nothing compiled" if one_call
          else f"compiled in {seconds:.1f} s", file=sys.stderr, flush=True)
    return step, seconds


def speed_line(new, prompt_len, seconds, first_s, dev, dtype, threads, compile_s=None):
    """The [speed] line: tokens/s of the decode steps alone (after the first token), the prefill apart,
    and compilation (done before generation) named but never counted."""
    steps, decode_s = new - 1, seconds - first_s
    rate = f"then {steps} tokens in {decode_s:.2f} s: {steps / decode_s:.1f} tokens/s" if steps and decode_s > 0 else \
        "no decode step"
    threads_text = f", {threads} thread{'s' if threads > 1 else ''}" if dev == "cpu" else ""
    where = f"{dev}{threads_text}, {str(dtype).replace('torch.', '')}"
    compiled = f"; compiling took {compile_s:.1f} s before, not counted" if compile_s else ""
    return (f"[speed] {new} new tokens after a {prompt_len}-token prompt in {seconds:.2f} s: prefill and first token "
            f"{first_s:.2f} s, {rate} [{where}]{compiled}")


if __name__ == "__main__":
    sys.exit(run_script(main))
