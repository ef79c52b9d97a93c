"""
One settings mechanism for every script, and the run setup they share (device, precision, seed, DDP,
the peak FLOP/s of a GPU for MFU).

A script declares its settings as plain globals with defaults, right at the top, and reads them with

    DEFAULTS = settings_from(globals())          # just below the settings block
    s, explicit = configure(DEFAULTS, argv, __doc__)

Arguments apply in order: a path is a config file (Python that assigns some of the settings),
`--key=value` or `--key value` sets one, and a bare `--key` sets a boolean to True. A value takes the
type of its default; booleans are true/false (also 1/0, yes/no, on/off); dtypes are float32, bfloat16
and float16 (fp32, bf16, fp16 are read as those). An unknown key or a value of the wrong type is a
`ConfigError` that lists what is allowed. `explicit` is the set of keys the user gave.
"""

import builtins
import os
import random
import re
import sys
import types
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from speed import cpu_multiplies_bf16

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class ConfigError(ValueError):
    """A bad setting; the message names it and says what is allowed."""


class HelpRequested(Exception):
    """--help: the message is the help text (a script's main prints it and exits 0)."""


def settings_from(namespace: dict) -> dict:
    """The plain settings of a module: lower-case names bound to bool, int, float or str."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and k.islower() and isinstance(v, (bool, int, float, str))}


def canonical_dtype(name: str) -> str:
    return DTYPE_ALIASES.get(name.lower(), name.lower())


def _is_dtype_key(key):
    return key == "dtype" or key.endswith("_dtype")


def check_value(defaults, choices, key, value, where):
    """value converted to the type of defaults[key], or ConfigError."""
    if key not in defaults:
        raise ConfigError(f"unknown setting {key!r} ({where}); allowed: {', '.join(sorted(defaults))}")
    default, allowed = defaults[key], choices.get(key)
    if isinstance(value, (list, tuple)) and isinstance(default, str) and all(isinstance(j, int) for j in value):
        value = ",".join(map(str, value))  # e.g. kv_source = [0, 0, 2, 2] in a config file
    if isinstance(value, str) and _is_dtype_key(key):
        value = canonical_dtype(value)
    if allowed is not None and any(isinstance(a, bool) for a in allowed) and isinstance(value, str):
        low = value.lower()
        value = True if low in TRUE else False if low in FALSE else value
    if allowed is not None and value in allowed and type(value) in {type(a) for a in allowed}:
        return value
    ok = _has_type(default, value)
    value = float(value) if ok and isinstance(default, float) else value
    if not ok or (allowed is not None and value not in allowed):
        want = " or ".join(map(repr, allowed)) if allowed else type(default).__name__
        raise ConfigError(f"setting {key} ({where}) must be {want}, got {value!r}")
    return value


def _has_type(default, value):
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)) and isinstance(value, bool):
        return False
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def parse_text(default, text):
    """A command-line string as the type of its default (left a string when it does not parse)."""
    low = text.strip().lower()
    if isinstance(default, bool):
        return True if low in TRUE else False if low in FALSE else text
    for kind in (int, float):
        if isinstance(default, kind):
            try:
                return kind(text)
            except ValueError:
                return text
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def read_config_file(path) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found (arguments are config files or --key=value)")
    ns = {"__file__": os.path.abspath(path)}
    with open(path) as f:
        source = f.read()
    try:
        exec(builtins.compile(source, path, "exec"), ns)
    except SystemExit as e:  # else the script would exit with the file's status, having done nothing
        raise ConfigError(f"config file {path} called sys.exit({e.code!r}): a config file only assigns settings") from None
    except Exception as e:
        raise ConfigError(f"config file {path} failed: {type(e).__name__}: {e}") from None
    return {k: v for k, v in ns.items()
            if not k.startswith("_") and not isinstance(v, types.ModuleType) and not callable(v)}


def configure(defaults: dict, argv, doc="", choices=None):
    """(settings as a namespace, set of keys given explicitly) from defaults and argv."""
    choices = choices or {}
    values, explicit = dict(defaults), set()
    argv = list(argv)
    if any(a in ("-h", "--help") for a in argv):
        source = sys._getframe(1).f_globals.get("__file__")  # the script: its settings' comments explain them
        raise HelpRequested(help_text(defaults, doc, choices, setting_comments(source)))
    while argv:
        arg = argv.pop(0)
        if not arg.startswith("--"):
            for key, value in read_config_file(arg).items():
                values[key] = check_value(defaults, choices, key, value, f"in {arg}")
                explicit.add(key)
            continue
        key, eq, text = arg[2:].partition("=")
        if key not in defaults:
            check_value(defaults, choices, key, None, "command line")  # raises: unknown key
        if not eq:
            is_flag = isinstance(defaults[key], bool) or any(isinstance(a, bool) for a in choices.get(key, ()))
            if is_flag and (not argv or argv[0].lower() not in TRUE + FALSE):
                text = "true"
            elif argv:
                text = argv.pop(0)
            else:
                raise ConfigError(f"--{key} needs a value: --{key}=VALUE")
        values[key] = check_value(defaults, choices, key, parse_text(defaults[key], text), "command line")
        explicit.add(key)
    return types.SimpleNamespace(**values), explicit


def _code_and_comment(line):
    """(code, comment) of a Python line: the comment starts at a '#' outside quotes ('' when none)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#":
            return line[:i], line[i + 1:].strip()
    return line, ""


def comments_in(path) -> dict:
    """{name: comment} of the settings a source file declares: `name = value  # comment` globals and
    `name=value,  # comment` entries of a settings dict, with the comment lines right below that continue
    it in the same column; a name declared without a comment maps to ''."""
    found, last, column = {}, None, -1
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except (OSError, TypeError):
        return found
    for line in lines:
        code, comment = _code_and_comment(line)
        if not code.strip() and comment and last and line.index("#") == column:
            found[last] += " " + comment  # the comment goes on below
            continue
        m = re.match(r"^(?:(\w+) = |    (\w+)=)\S", code)
        last = (m.group(1) or m.group(2)) if m else None
        if last and last.islower():
            found.setdefault(last, comment)
            column = line.index("#") if comment else -1
        else:
            last = None
    return found


def setting_comments(source) -> dict:
    """{name: comment} for --help: the script's own lines first, then, for the settings it takes from
    elsewhere (adapt.py's TRAINING_SETTINGS, this file's), those of the project's modules loaded."""
    comments = comments_in(source)
    here = os.path.dirname(os.path.abspath(__file__))
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None) or ""
        if os.path.dirname(os.path.abspath(path)) == here and path != source:
            for name, comment in comments_in(path).items():
                comments.setdefault(name, comment)
    return comments


def help_text(defaults, doc, choices, comments) -> str:
    """The script's docstring, then one line per setting: --name=default, what it means, what it allows."""
    lines = []
    for key, value in defaults.items():
        allowed = (choices or {}).get(key)
        meaning = comments.get(key, "") + (f" [one of: {', '.join(map(repr, allowed))}]" if allowed else "")
        flag = f"  --{key}={value!r}"
        lines.append(f"{flag:<34} {meaning}".rstrip() if len(flag) < 34 else f"{flag}\n{'':<34} {meaning}".rstrip())
    return (doc or "").strip() + "\n\nsettings (--name=value), their defaults and what they mean:\n" + "\n".join(lines)


# -----------------------------------------------------------------------------
# device, precision, seed and processes: the one place every script sets them up


def resolve_device(name: str, local_rank=None) -> str:
    """'auto' is cuda when torch sees a GPU, else cpu; under DDP plain 'cuda' becomes cuda:LOCAL_RANK."""
    dev = "cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={dev} but torch sees no CUDA GPU: use --device=cpu")
        if dev == "cuda" and local_rank is not None:
            dev = f"cuda:{local_rank}"
    elif dev == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("device=mps but MPS is not available: use --device=cpu")
    elif dev != "cpu":
        raise ConfigError(f"device={dev!r}: use auto, cpu, cuda, cuda:N or mps")
    try:
        torch.device(dev)
    except RuntimeError:
        raise ConfigError(f"device={dev!r}: use auto, cpu, cuda, cuda:N or mps") from None
    return dev


def apply_threads(threads: int, device_type: str = "cpu", children=False) -> int:
    """Set torch's intra-op (and, while it still can be, inter-op) threads; returns the number in use.
    children: the processes this one starts get as many (OMP_NUM_THREADS; the experiments' runs).

    0, every script's default, is 1 thread on a CPU (OMP_NUM_THREADS, when set, wins; torchrun sets it to
    1 per rank), torch's default beside a GPU. One thread because a shared machine is the common case:
    an op split over N threads waits for its slowest, and a thread whose core another job holds makes
    every op wait. On the project's 2-core machine, with other jobs running, 2 threads ran training 4-6x
    and decoding ~34x slower than 1 (issue 25); on a quiet machine N threads are faster (--threads=N).
    Results can differ in the last bits between thread counts (reductions split differently)."""
    if threads < 0:
        raise ConfigError(f"threads={threads}: use 0 (1 on a CPU) or a positive number of threads")
    if threads == 0:
        if device_type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()
        threads = 1
    torch.set_num_threads(threads)
    try:
        if torch.get_num_interop_threads() != threads:
            torch.set_num_interop_threads(threads)
    except RuntimeError:
        pass  # torch allows it only before the process's first inter-op work: a later call keeps what is set
    ranks, cores = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), os.cpu_count() or 1
    if threads * ranks > cores and os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"note: {ranks} process{'es' if ranks > 1 else ''} x {threads} threads on {cores} cores: oversubscribed, "
              f"every op waits; use --threads={max(1, cores // ranks)}", file=sys.stderr, flush=True)
    if children:
        os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    return torch.get_num_threads()


def resolve_dtype(name: str, device_type: str) -> str:
    """'auto': bfloat16 on GPUs that have it, float16 on older GPUs, float32 elsewhere.

    CPU stays float32 by default: at the default model's size (d=128) bf16 autocast measured within
    the round-to-round spread of fp32 on the project's 2-core AVX-512 machine, and fp32 keeps runs
    bit-exact (resume, comparisons across runs). Bigger models can gain from bfloat16."""
    dt = canonical_dtype(name)
    if dt == "auto":
        if device_type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    if dt not in DTYPES:
        raise ConfigError(f"dtype={name!r}: use auto, float32, bfloat16 or float16 (or fp32, bf16, fp16)")
    if dt == "float16" and device_type != "cuda":
        raise ConfigError("dtype=float16 needs a CUDA GPU (training it needs a GradScaler, and CPUs are slow at it); "
                          "on CPU use float32 or bfloat16")
    return dt


def warn_slow_bf16(dtype: str, device_type: str, setting: str = "dtype"):
    """One line before work starts where bf16 products would be emulated (cpu_multiplies_bf16)."""
    if dtype == "bfloat16" and device_type == "cpu" and not cpu_multiplies_bf16():
        print(f"warning: --{setting}=bfloat16 on a CPU without bf16 instructions (no avx512_bf16 or amx_bf16 in "
              f"/proc/cpuinfo): torch emulates bf16 products here, several times slower than float32; "
              f"--{setting}=float32 is faster", file=sys.stderr, flush=True)


def autocast(device_type: str, dtype: str):
    """Mixed precision for a forward pass: nothing for float32, torch.autocast otherwise."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=DTYPES[dtype])


# dense bf16 tensor-core peak FLOP/s per GPU, from the vendors' datasheets (no sparsity): the MFU denominator
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM and NVL
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "RTX 4090": 165e12,
}


def peak_flops_for(device_name=None) -> float:
    """The peak of a GPU named like torch.cuda.get_device_name() (this process's GPU when None)."""
    if device_name is None:
        if not torch.cuda.is_available():
            raise ValueError("no GPU: pass peak_flops explicitly (bench.py measures a CPU's matmul rate)")
        device_name = torch.cuda.get_device_name()
    for key, flops in PEAK_BF16_FLOPS.items():  # most specific names first
        if key.lower() in device_name.lower():
            return flops
    raise ValueError(f"no peak FLOP/s known for device {device_name!r}: pass peak_flops explicitly "
                     f"(known: {', '.join(PEAK_BF16_FLOPS)})")


@dataclass
class Runtime:
    device: str
    device_type: str
    dtype: str
    ddp: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    threads: int = 0  # torch's intra-op threads in this process (apply_threads)

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        return autocast(self.device_type, self.dtype)


def init_runtime(device="auto", dtype="auto", seed=1337, backend="auto", threads=0) -> Runtime:
    """Device, precision, CPU threads (apply_threads), seeds and (under torchrun) the process group, set up
    once per script. Call `close_runtime` at the end."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0)) if ddp else 0
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if ddp else 0
    dev = resolve_device(device, local_rank if ddp else None)
    device_type = "cuda" if dev.startswith("cuda") else dev
    rt = Runtime(dev, device_type, resolve_dtype(dtype, device_type), ddp, rank, local_rank,
                 int(os.environ["WORLD_SIZE"]) if ddp else 1)
    rt.threads = apply_threads(threads, device_type)
    if backend not in ("auto", "nccl", "gloo"):
        raise ConfigError(f"backend={backend!r}: use auto, nccl or gloo")
    if backend == "nccl" and device_type != "cuda":  # also without torchrun: it says a GPU run was meant
        raise ConfigError(f"backend=nccl needs CUDA GPUs, but the device is {dev}: use --backend=gloo (or auto) on CPU")
    if rank == 0:
        warn_slow_bf16(rt.dtype, device_type)
    if ddp:
        import torch.distributed as dist
        if device_type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=("nccl" if device_type == "cuda" else "gloo") if backend == "auto" else backend)
    seed_everything(seed + rank)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return rt


def close_runtime(rt: Runtime):
    if rt.ddp:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def seed_everything(seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class ClosedSafeStream:
    """stdout for a script: a reader that went away (`train.py | head`, a closed terminal) sends the rest
    of the output to /dev/null, with one note on stderr, instead of ending the work in a BrokenPipeError;
    a character the terminal's encoding lacks (a non-ASCII out_dir under LANG=C) is written escaped."""

    def __init__(self, stream):
        self.stream, self.closed_note = stream, False
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass

    def write(self, text):
        try:
            return self.stream.write(text)
        except (BrokenPipeError, OSError) as e:
            self.went_away(e)
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except (BrokenPipeError, OSError) as e:
            self.went_away(e)

    def went_away(self, e):
        import sys
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())  # the flush at exit then finds nothing to fail on
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass
        self.stream = open(os.devnull, "w")
        if not self.closed_note:
            self.closed_note = True
            try:
                print(f"note: stdout is closed ({getattr(e, 'strerror', None) or e}): the work goes on, its output "
                      "discarded (train.py still writes log.jsonl)", file=sys.stderr, flush=True)
            except (OSError, ValueError):
                pass

    def __getattr__(self, name):
        return getattr(self.stream, name)


def run_script(main, argv=None):
    """Run a script's main(argv): help to stdout and 0, a bad input as one line on stderr and 1. Run from
    the command line (argv None), its stdout survives a reader that goes away (ClosedSafeStream)."""
    import sys
    if argv is None and not isinstance(sys.stdout, ClosedSafeStream) and hasattr(sys.stdout, "reconfigure"):
        sys.stdout = ClosedSafeStream(sys.stdout)
        try:
            sys.stderr.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass
    try:
        result = main(sys.argv[1:] if argv is None else argv)
    except HelpRequested as h:
        print(h)
        return 0
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0
