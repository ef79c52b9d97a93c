"""The commands in README.md and docs/*.md work as written.

Every shell command in the docs is found (lines of fenced code blocks and of indented blocks that start
with a command; a trailing backslash continues a line, `a && b` is two commands, `# ...` ends one) and
checked, in the order a reader meets them (README.md, then docs/*.md by name):

- statically, every command: it uses the one convention (.venv/bin/python, .venv/bin/torchrun,
  ./setup.sh); its script exists; its flags parse against the script's settings (the DEFAULTS of the
  script module, through configurator.configure; the first three words of convert_hf.py are the command
  and two paths; scripts still on argparse: their add_argument flags); and every path it reads is in
  the repository, made by an earlier documented command, or the reader's own file (`path/to/...`);
- for real, in a scratch directory, every command of train.py, sample.py, adapt.py, convert_hf.py and
  delta.py (torchrun included) with a tiny override appended: a tiny model on a tiny character dataset, two
  iterations, one evaluation batch, CPU, no compile. The reader's own files that the test can stand in
  for are made up: `path/to/hf_llama` (a random 4-layer Hugging Face Llama with a character
  tokenizer.json) and `path/to/prompt.txt`.

A command whose comment says `GPU` (or `GPUs`) or `long` is checked statically only, as are commands of
the other scripts: setup.sh installs, pytest is this suite, bench.py has its own smoke test
(tests/test_bench.py), experiments/echo.py and the big-model helpers under tests/ take minutes to
hours. A command added to the docs later is covered without touching this file.
"""

import ast
import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field

import pytest


from configurator import configure, run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHERS = (".venv/bin/python", ".venv/bin/torchrun", "./setup.sh")
BARE = ("python", "python3", "torchrun", "pip")  # the other convention: an error wherever it appears
RUNNABLE = ("train.py", "sample.py", "adapt.py", "convert_hf.py", "delta.py")
WRAPPERS = ("tests/peak_memory.py",)  # run another script's command: check that one
POSITIONAL_IO = {"convert_hf.py": ("command", "in", "out"), "tests/make_random_hf_llama.py": ("out",)}
OUTPUT_KEYS = ("out_dir", "out", "runs")
INPUT_KEYS = ("init_from", "adapt_similarity", "distill_teacher", "tokenizer", "data_dir", "archive", "dataset")
NOT_PATHS = ("", "scratch", "resume", "gpt2", "r50k_base", "None")
STAND_INS = ("path/to/hf_llama", "path/to/prompt.txt")
TINY_MODEL = ["--n_embd=32", "--n_head=2", "--n_kv_head=1", "--intermediate_size=64", "--block_size=32"]


@dataclass
class Command:
    where: str        # file:line
    words: list       # the command line, split as the shell would
    comment: str = ""
    script: str = ""  # the script it runs ('' for setup.sh and python -m)
    args: list = field(default_factory=list)

    @property
    def static_only(self):
        return bool(re.search(r"\bGPUs?\b|\blong\b", self.comment))

    def __str__(self):
        return f"{self.where}: {' '.join(self.words)}"


# -----------------------------------------------------------------------------
# finding the commands


def split_comment(line):
    """(code, comment) of a shell line: the comment starts at a '#' outside quotes after a space."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i + 1:].strip()
    return line, ""


def starts_a_command(text):
    first = text.split()[0] if text.split() else ""
    return first in LAUNCHERS + BARE or first.startswith("/usr/bin/time") or re.match(r"^[A-Z_]+=\S*$", first)


def shell_lines(markdown):
    """(line number, text) of the shell lines of a markdown text: fenced code blocks and indented
    lines that start with a command; continuation lines joined."""
    out, fenced, pending = [], False, None
    for n, line in enumerate(markdown.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        text = line.strip()
        if pending is not None:
            start, joined = pending
            text = joined + " " + text
        elif not (fenced or line.startswith("    ")) or not starts_a_command(text):
            continue
        else:
            start = n
        if text.endswith("\\"):
            pending = (start, text[:-1].rstrip())
            continue
        pending = None
        out.append((start, text))
    return out


def parse_command(where, text):
    """The Commands of one shell line (several when joined with &&)."""
    code, comment = split_comment(text)
    words = shlex.split(code)
    commands, current = [], []
    for w in words + ["&&"]:
        if w == "&&":
            if current:
                commands.append(Command(where, current, comment))
            current = []
        else:
            current.append(w)
    for c in commands:
        c.script, c.args = script_of(c.words)
    return commands


def script_of(words):
    """(script, its arguments) of a command line; ('', []) for setup.sh, python -m and the like."""
    words = [w for w in words if not re.match(r"^[A-Z_]+=", w)]  # environment assignments
    if words and words[0].startswith("/usr/bin/time"):  # a wrapper: drop it and its options
        words = words[1:]
        while words and words[0].startswith("-"):
            words = words[1:]
    script, args = "", []
    if len(words) > 1 and words[0] in (".venv/bin/python", "python", "python3") and words[1] != "-m":
        script, args = words[1], words[2:]
    elif words and words[0] in (".venv/bin/torchrun", "torchrun"):
        first = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
        script, args = (words[first], words[first + 1:]) if first is not None else ("", [])
    while script in WRAPPERS and args:
        script, args = args[0], args[1:]
    return script, args


def doc_files():
    docs = os.path.join(ROOT, "docs")
    return ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(docs) if f.endswith(".md"))


def all_commands():
    commands = []
    for name in doc_files():
        with open(os.path.join(ROOT, name)) as f:
            for n, text in shell_lines(f.read()):
                commands += parse_command(f"{name}:{n}", text)
    return commands


def test_the_finder_reads_markdown_as_meant():
    md = ("Some text with `.venv/bin/python inline.py` in it.\n\n"
          "    .venv/bin/python train.py --a=1 \\\n        --b='x # y'   # a comment, GPU\n"
          "    model: 0.78M parameters (printed output, not a command)\n"
          "```\n./setup.sh --dev && .venv/bin/python -m pytest -q\nOMP_NUM_THREADS=1 .venv/bin/torchrun "
          "--nproc_per_node=2 train.py --device=cpu\n```\n"
          "    /usr/bin/time -v .venv/bin/python tests/peak_memory.py convert_hf.py import a b.pt\n")
    found = [c for n, text in shell_lines(md) for c in parse_command(str(n), text)]
    assert [(c.where, c.script, c.args, c.static_only) for c in found] == [
        ("3", "train.py", ["--a=1", "--b=x # y"], True), ("7", "", [], False), ("7", "", [], False),
        ("8", "train.py", ["--device=cpu"], False), ("10", "convert_hf.py", ["import", "a", "b.pt"], False)]
    # and the docs hold the commands this test exists for
    scripts = {c.script for c in all_commands()}
    assert {"train.py", "sample.py", "adapt.py", "convert_hf.py", "bench.py", "experiments/echo.py"} <= scripts


# -----------------------------------------------------------------------------
# one convention


def test_docs_use_one_convention():
    bad = [str(c) for c in all_commands() if c.words[0] in BARE or
           (not re.match(r"^[A-Z_]+=", c.words[0]) and c.words[0] not in LAUNCHERS and
            not c.words[0].startswith("/usr/bin/time"))]
    bad += [str(c) for c in all_commands() if c.words[0].startswith("/usr/bin/time") and
            not any(w in LAUNCHERS for w in c.words)]
    for name in doc_files():  # inline code in the prose too: `python x.py` teaches the other convention
        with open(os.path.join(ROOT, name)) as f:
            for n, line in enumerate(f, 1):
                bad += [f"{name}:{n}: `{span}`" for span in re.findall(r"`([^`]+)`", line)
                        if span.split() and span.split()[0] in BARE and len(span.split()) > 1]
    assert not bad, "use .venv/bin/python and .venv/bin/torchrun:\n" + "\n".join(bad)


# -----------------------------------------------------------------------------
# static checks: scripts, flags, paths


def load_script(path):
    import importlib.util
    name = "_docs_" + re.sub(r"\W", "_", path)
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def argparse_flags(path):
    """The option strings a script still on argparse declares (add_argument('--x', ...))."""
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read())
    return {a.value for node in ast.walk(tree) if isinstance(node, ast.Call) and
            getattr(node.func, "attr", "") == "add_argument" for a in node.args
            if isinstance(a, ast.Constant) and str(a.value).startswith("-")}


def settings_of(c):
    """(all settings, explicit keys, positionals) of a command, parsed as its script parses them.
    Raises (ConfigError, ValueError) for an unknown flag or a bad value."""
    n = len(POSITIONAL_IO.get(c.script, ()))
    positional, args = list(c.args[:n]), list(c.args[n:])
    positional += [a for a in args if a.endswith(".py") and not a.startswith("-")]  # config files (train.py)
    module = load_script(c.script)
    if hasattr(module, "DEFAULTS"):
        s, explicit = configure(module.DEFAULTS, args, "", getattr(module, "CHOICES", None))
        return vars(s), explicit, positional
    known, values = argparse_flags(c.script), {}
    for i, a in enumerate(args):
        key, eq, value = a.partition("=")
        if a.startswith("-") and key not in known:
            raise ValueError(f"unknown option {key} (the script takes {', '.join(sorted(known))})")
        if a.startswith("-"):
            following = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("-") else True
            values[key.lstrip("-")] = value if eq else following
    return values, set(values), positional


def reads_and_writes(c, s, explicit, positional):
    """(paths the command reads, paths it creates) by what the settings and positionals mean."""
    reads, writes = [], []
    if re.fullmatch(r"data/\w+/prepare\.py", c.script):  # a prepare script makes its dataset's folder
        writes.append(os.path.dirname(c.script))
    for role, value in zip(POSITIONAL_IO.get(c.script, ()), positional):
        (reads if role == "in" else writes if role == "out" else []).append(value)
    if c.script == "train.py":
        reads += positional  # config files
        if s.get("init_from") == "resume":
            reads.append(os.path.join(s["out_dir"], "ckpt.pt"))
    for key, value in s.items():
        value = str(value)
        if key in OUTPUT_KEYS and value not in NOT_PATHS:
            writes.append(value)
        elif key == "dataset" and value not in NOT_PATHS and "/" not in value:
            reads.append(os.path.join("data", value))
        elif key == "start" and value.startswith("FILE:"):
            reads.append(value[len("FILE:"):])
        elif value not in NOT_PATHS and (key in INPUT_KEYS or (key in explicit and "/" in value)):
            # a list of files (keep_skills.py --beside) reads each; a list of names and files (--eval_sets) its files
            reads += [p for p in value.split(",") if p and (key in INPUT_KEYS or "/" in p)]
    return reads, writes


def tracked_paths():
    """Files the repository holds, and their folders (ignored files of this checkout do not count)."""
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    paths = set(files)
    for f in files:
        while "/" in f:
            f = f.rsplit("/", 1)[0]
            paths.add(f)
    return paths


def in_repository(path, tracked):
    return norm(path) in tracked if tracked is not None else os.path.exists(os.path.join(ROOT, path))


def norm(path):
    return os.path.normpath(path)


def made_by(path, made):
    p = norm(path)
    return any(p == m or p.startswith(m + os.sep) for m in made)


def check_without_script(c):
    """setup.sh's flags and `python -m`'s module."""
    if c.words[0] == "./setup.sh":
        with open(os.path.join(ROOT, "setup.sh")) as f:
            text = f.read()
        return [f"setup.sh takes no {w}" for w in c.words[1:] if f'"{w}"' not in text]
    if c.words[1:2] == ["-m"]:
        import importlib.util
        return [] if len(c.words) > 2 and importlib.util.find_spec(c.words[2]) else [f"no module {c.words[2:3]}"]
    return [f"no script found in {' '.join(c.words)}"] if c.words[0] in LAUNCHERS else []


def check_statically(c, made, tracked):
    """Problems of one command (empty: fine); adds what it creates to `made`."""
    if not c.script:
        return check_without_script(c)
    if not os.path.isfile(os.path.join(ROOT, c.script)):
        return [f"{c.script} does not exist"]
    try:
        s, explicit, positional = settings_of(c)
    except Exception as e:
        return [f"its settings do not parse: {type(e).__name__}: {e}"]
    reads, writes = reads_and_writes(c, s, explicit, positional)
    if c.script == "experiments/keep_skills.py":  # its generation phase makes --data before any phase reads it
        made.add(norm(str(s.get("data"))))
    problems = [f"reads {p}, which neither the repository holds nor an earlier documented command makes"
                for p in reads if not (p.startswith("path/to/") or made_by(p, made) or in_repository(p, tracked))]
    made.update(norm(w) for w in writes)
    return problems


def test_every_documented_command_is_valid(monkeypatch):
    monkeypatch.chdir(ROOT)  # config files are read relative to the repository, as the docs run them
    made, tracked, problems = set(), tracked_paths(), []
    for c in all_commands():
        problems += [f"{c}\n    -> {p}" for p in check_statically(c, made, tracked)]
    assert not problems, "\n".join(problems)


# settings that leave the default run's model what it is: a command with only these may train into the
# default out_dir (it is the README's first run, or its resume)
SAME_DEFAULT_RUN = {"init_from", "threads", "device", "compile"}


def test_documented_outputs_stay_out_of_the_repository(monkeypatch):
    """No documented command writes onto a file the repository tracks unless it says so
    (--replace_tracked=True), and only the default run itself trains into the default out_dir, so that a
    reader following the docs never replaces the committed results or the model of an earlier step."""
    monkeypatch.chdir(ROOT)
    tracked = tracked_paths()
    if tracked is None:
        pytest.skip("not a git checkout: no tracked files to protect")
    default_out_dir = load_script("train.py").DEFAULTS["out_dir"]
    problems = []
    for c in all_commands():
        if not c.script or not os.path.isfile(os.path.join(ROOT, c.script)):
            continue
        s, explicit, positional = settings_of(c)
        _, writes = reads_and_writes(c, s, explicit, positional)
        if str(s.get("replace_tracked")) != "True":
            problems += [f"{c}\n    -> writes {w}, which the repository tracks" for w in writes
                         if not re.fullmatch(r"data/\w+", norm(w)) and any(
                             t == norm(w) or t.startswith(norm(w) + "/") for t in tracked)]
        if c.script == "train.py" and norm(str(s["out_dir"])) == default_out_dir and \
                (explicit - SAME_DEFAULT_RUN or s["init_from"] not in ("scratch", "resume")):
            problems.append(f"{c}\n    -> trains into the default out_dir {default_out_dir}, replacing the "
                            "default model: give it its own --out_dir")
    assert not problems, "\n".join(problems)


# -----------------------------------------------------------------------------
# the cheap commands, for real


def tiny_overrides(c, s, dataset):
    if c.script == "train.py":
        extra = ["--max_iters=4" if s["init_from"] == "resume" else "--max_iters=2", "--eval_iters=1",
                 "--log_interval=1", "--batch_size=2", "--compile=False", "--device=cpu", "--dtype=float32",
                 f"--dataset={dataset}"]
        if s["init_from"] == "scratch":
            return extra + TINY_MODEL
        return extra + ([] if s["init_from"] == "resume" else ["--block_size=32"])  # the tiny model's context
    if c.script == "sample.py":
        return ["--device=cpu", "--compile=False", "--dtype=float32"]
    if c.script == "adapt.py":
        return ["--batches=1", "--batch_size=2"] + (["--local_iters=2"] if s["local_iters"] else [])
    return []


def make_stand_ins(workspace, prompts):
    """The reader's own files this test can stand in for: a random Hugging Face Llama, a prompt file."""
    import torch
    from tokenizers import Tokenizer, decoders, models

    from convert_hf import export_hf
    from model import Llama, LlamaConfig
    chars = ["<unk>"] + sorted(set(" \n.,:;!?'-" + "".join(map(chr, range(33, 127))) + "".join(prompts)))
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(chars)}, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    torch.manual_seed(0)
    model = Llama(LlamaConfig(n_layer=4, n_head=2, n_kv_head=1, n_embd=32, intermediate_size=64,
                              vocab_size=len(chars), block_size=64, kv_source="dense"))
    export_hf(model, os.path.join(workspace, "path/to/hf_llama"), tokenizer_json=tok.to_str())
    with open(os.path.join(workspace, "path/to/prompt.txt"), "w") as f:
        f.write("ROMEO:\n")


def make_dataset(path, prompts):
    """A tiny character dataset whose alphabet holds every prompt the docs sample with."""
    from dataset import write_meta, write_tokens
    text = ("ROMEO: But soft, what light through yonder window breaks?\nJULIET: O Romeo, Romeo!\n" * 40 +
            "".join(prompts) + "".join(map(chr, range(32, 127))))
    chars = sorted(set(text))
    ids = [chars.index(ch) for ch in text]
    os.makedirs(path, exist_ok=True)
    write_tokens(os.path.join(path, "train.bin"), ids, len(chars))
    write_tokens(os.path.join(path, "val.bin"), ids[: len(ids) // 4], len(chars))
    write_meta(path, len(chars), "char", chars=chars)
    return path


def workspace_for(tmp_path):
    """A scratch directory that looks like the repository to a command: the scripts, configs and data."""
    ws = tmp_path / "repo"
    ws.mkdir()
    for name in os.listdir(ROOT):
        if name.endswith(".py") or name in ("config", "data", "tests", "experiments"):
            os.symlink(os.path.join(ROOT, name), ws / name)
    return str(ws)


def run_for_real(c, s, dataset, workspace):
    """(exit status, output) of the command with its tiny override, in the workspace."""
    argv = c.args + tiny_overrides(c, s, dataset)
    if c.words[0].endswith("torchrun"):
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        launcher = c.words[1:c.words.index(c.script)]
        r = subprocess.run([torchrun, *launcher, c.script, *argv], cwd=workspace, capture_output=True, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
        return r.returncode, r.stdout + r.stderr
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = run_script(load_script(c.script).main, argv)
    return rc, out.getvalue()


def test_cheap_commands_run(tmp_path, monkeypatch):
    commands = all_commands()
    prompts = [s[len("--start="):] for c in commands for s in c.args if s.startswith("--start=")]
    workspace = workspace_for(tmp_path)
    make_stand_ins(workspace, prompts)
    dataset = make_dataset(str(tmp_path / "chars"), prompts)
    monkeypatch.chdir(workspace)
    made, ran, tracked = set(STAND_INS), [], tracked_paths()
    for c in commands:
        if not c.script:
            continue
        s, explicit, positional = settings_of(c)
        reads, writes = reads_and_writes(c, s, explicit, positional)
        runnable = c.script in RUNNABLE and not c.static_only
        if runnable and all(made_by(p, made) or in_repository(p, tracked) for p in reads):
            rc, output = run_for_real(c, s, dataset, workspace)
            shown = output if len(output) < 6000 else output[:3000] + "\n[...]\n" + output[-3000:]
            assert rc == 0, f"{c}\nwith {' '.join(tiny_overrides(c, s, dataset))} exited {rc}:\n{shown}"
            made.update(norm(w) for w in writes)
            ran.append(str(c))
        elif runnable:
            assert any(p.startswith("path/to/") for p in reads), f"{c} reads what no command ran to make: {reads}"
    assert len(ran) >= 10, ran  # most documented commands do run
