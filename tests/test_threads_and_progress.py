"""The threads setting, progress lines, honest speed lines and logs (issue 25): threads are honoured
inside train.py and sample.py runs, a resumed run keeps compile, sample.py streams the text it
prints and leaves compilation out of its speed, distillation's loss is labelled and its end logged,
and --help says what each setting means."""

import re
import time

import pytest
import torch

import sample
import train
from checkpoint import load_model
from configurator import ConfigError, apply_threads, run_script
from model import Llama
from progress import Heartbeat
from test_sample import CHARS, char_tokenizer_json, save_train_style_checkpoint
from test_train import TINY, records


@pytest.fixture
def restore_threads(monkeypatch):
    """The test changes torch's thread count and OMP_NUM_THREADS: put both back afterwards."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # else 0 means "what OMP_NUM_THREADS says"
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def threads_inside(monkeypatch):
    """A list that gets torch.get_num_threads() at every forward pass of a Llama (inside the run)."""
    seen, forward = [], Llama.forward

    def counting(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(Llama, "forward", counting)
    return seen


@pytest.mark.parametrize("given, expected", [([], 1), (["--threads=2"], 2)])
def test_train_runs_on_the_threads_it_is_given(data_dir, tmp_path, monkeypatch, restore_threads, given, expected):
    torch.set_num_threads(3)  # not what either run should end up with
    seen = threads_inside(monkeypatch)
    train.main(TINY + [f"--dataset={data_dir}", f"--out_dir={tmp_path}"] + given)
    assert seen and set(seen) == {expected}
    assert records(tmp_path, "start")[0]["threads"] == expected


@pytest.mark.parametrize("given, expected", [([], 1), (["--threads=2"], 2)])
def test_sample_runs_on_the_threads_it_is_given(tmp_path, monkeypatch, capsys, restore_threads, given, expected):
    path = char_checkpoint(tmp_path)
    torch.set_num_threads(3)
    seen = threads_inside(monkeypatch)
    rc = run_script(sample.main, [f"--init_from={path}", "--start=abc", "--max_new_tokens=4", "--device=cpu"] + given)
    assert rc == 0, capsys.readouterr().err
    assert seen and set(seen) == {expected}


def test_threads_default_defers_to_omp_num_threads_and_rejects_negatives(monkeypatch, restore_threads):
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's (or torchrun's) choice stands
    assert apply_threads(0, "cpu") == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert apply_threads(0, "cpu") == 1
    with pytest.raises(ConfigError, match="threads=-1"):
        apply_threads(-1)


# ---- train.py: resume keeps compile; distillation's loss labelled and its end logged; the start line


def test_resume_keeps_compile(data_dir, tmp_path, monkeypatch):
    compiled = []  # torch.compile stood in for: the test is about the setting, not the compiler
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(model) or model)
    tiny = [a for a in TINY if not a.startswith("--compile")]  # the resumed runs are not told
    common = tiny + [f"--dataset={data_dir}", f"--out_dir={tmp_path}", "--eval_interval=2"]
    train.main(common + ["--compile=True"])
    assert len(compiled) == 1
    train.main(common + ["--init_from=resume", "--max_iters=4"])  # compile not given: the run's True
    assert len(compiled) == 2 and records(tmp_path, "start")[-1]["compile"] is True
    train.main(common + ["--init_from=resume", "--max_iters=6", "--compile=False"])  # told otherwise
    assert len(compiled) == 2 and records(tmp_path, "start")[-1]["compile"] is False


def test_distillation_loss_is_labelled_and_its_end_logged(data_dir, tmp_path, capsys):
    dense = TINY + [f"--dataset={data_dir}", "--kv_source=dense"]
    train.main(dense + [f"--out_dir={tmp_path / 'dense'}"])
    teacher = str(tmp_path / "dense" / "ckpt.pt")
    capsys.readouterr()
    train.main(TINY + [f"--dataset={data_dir}", f"--out_dir={tmp_path / 'student'}", f"--init_from={teacher}",
                       "--adapt_target=upper:half", "--adapt_mode=abrupt", "--adapt_train_layers=upward",
                       "--distill_alpha=0.5", "--distill_iters=2", "--max_iters=4", "--lr_decay_iters=4"])
    out = capsys.readouterr().out
    losses = {int(m[1]): m[2] for m in re.finditer(r"^iter (\d+): loss [\d.]+( \(distill mix\))?", out, re.M)}
    assert losses == {0: " (distill mix)", 1: " (distill mix)", 2: None, 3: None}, out
    assert "iter 2: distillation ends (distill_iters=2), plain cross-entropy from here" in out
    kinds = [r["loss_kind"] for r in records(tmp_path / "student", "train")]
    assert kinds == ["distill mix", "distill mix", "cross-entropy", "cross-entropy"]
    # the start: the target and stages, the frozen layer, the teacher and the loss it mixes
    assert "adaptation: to kv_source [0, 0], abrupt: layers [1] at iter 0" in out
    assert "frozen layers [0] (no gradients); training [1]" in out
    assert f"distillation: teacher {teacher}; loss = 0.5 CE(data) + 0.5 T^2 KL(teacher || student) at T=1" in out
    assert records(tmp_path / "student", "start")[0]["frozen_layers"] == [0]


def test_help_says_what_each_setting_means(capsys):
    assert run_script(train.main, ["--help"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  --")}
    assert "evaluate (and checkpoint) every this many iterations" in lines["--eval_interval=100"]
    assert "[one of: 'auto', True, False]" in lines["--compile='auto'"]
    assert "1 on a CPU" in lines["--threads=0"]
    assert "soft logits" in lines["--distill_alpha=0.0"]  # a setting train.py takes from adapt.py
    assert all(len(line.split(None, 1)) == 2 for line in lines.values() if len(line.split()[0]) < 32), \
        [line for line in lines.values() if len(line.split()) == 1]  # every setting has its meaning


# ---- sample.py: streaming, the speed line, max_new_tokens=0


def char_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_train_style_checkpoint(str(path), len(CHARS), "none")
    ckpt = torch.load(path, weights_only=False)
    ckpt["tokenizer_json"] = char_tokenizer_json().to_str()
    torch.save(ckpt, path)
    return path


def test_show_speed_leaves_compilation_out(tmp_path, monkeypatch, capsys):
    """A compile that takes 1.5 s (simulated: the first call of the compiled step sleeps) is reported
    apart, and the speed line's time and tokens/s are those of generation alone."""
    def slow_first_call(fn, **kw):
        calls = []

        def step(*args):
            if not calls:
                time.sleep(1.5)
            calls.append(1)
            return fn(*args)
        return step
    monkeypatch.setattr(torch, "compile", slow_first_call)
    path = char_checkpoint(tmp_path)
    rc = run_script(sample.main, [f"--init_from={path}", "--start=abc", "--max_new_tokens=20", "--device=cpu",
                                  "--compile=True", "--show_speed=True", "--temperature=0"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    m = re.search(r"\[speed\] 20 new tokens after a 3-token prompt in ([\d.]+) s: prefill and first token ([\d.]+) s, "
                  r"then 19 tokens in ([\d.]+) s: ([\d.]+) tokens/s .*compiling took ([\d.]+) s before, not counted", out)
    assert m, out
    total, first, decode, rate, compile_s = map(float, m.groups())
    assert compile_s >= 1.5 and total < 1.5 and decode <= total
    # tokens/s of the decode steps only: the printed seconds are rounded to 0.01, so the rate lies between
    # what the rounded time's bounds give
    assert 19 / (decode + 0.005) - 0.1 <= rate <= 19 / max(decode - 0.005, 1e-9) + 0.1
    assert "compiling the decode step" in err and "compiled in" in err


class ByteTokenizer:
    """ids are bytes; decoding a cut multi-byte character gives U+FFFD, as byte-level BPE does."""
    name = "bytes"

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_prints_the_final_text_in_pieces(capsys):
    text = "naïve café: 3 € \n\n and  spaces  "
    ids = list(text.encode())
    stream = sample.TextStream(ByteTokenizer(), ids[:2])
    pieces = [capsys.readouterr().out]
    for i in ids[2:]:
        stream.add(torch.tensor([i]))
        pieces.append(capsys.readouterr().out)
    stream.finish(ids)
    pieces.append(capsys.readouterr().out)
    assert "".join(pieces) == text + "\n"  # collected: exactly what one print of the whole text gives
    assert sum(1 for p in pieces[:-1] if p) > 10  # and most of it came before the end
    assert all("\ufffd" not in p for p in pieces)


def test_sampled_text_is_the_same_streamed(tmp_path, capsys):
    path = char_checkpoint(tmp_path)
    argv = [f"--init_from={path}", "--start=the ", "--max_new_tokens=30", "--num_samples=2", "--device=cpu"]
    assert run_script(sample.main, argv) == 0
    out = capsys.readouterr().out
    model, _ = load_model(str(path))
    tok = sample.model_tokenizer(json_text=char_tokenizer_json().to_str())
    torch.manual_seed(1337)
    x = torch.tensor([tok.encode("the ")])
    want = [tok.decode(model.generate(x, 30, temperature=0.8, top_k=200)[0].tolist()) for _ in range(2)]
    assert out == "".join(f"{w}\n---------------\n" for w in want)


def test_max_new_tokens_zero_says_how_many(tmp_path, capsys, monkeypatch):
    path = char_checkpoint(tmp_path)  # block_size 32
    asked, generate = [], Llama.generate
    monkeypatch.setattr(Llama, "generate", lambda self, x, n, **kw: asked.append(n) or generate(self, x, n, **kw))
    assert run_script(sample.main, [f"--init_from={path}", "--start=abc", "--device=cpu"]) == 0
    out, err = capsys.readouterr()
    assert "up to 29 new tokens (max_new_tokens=0: what fits the 32-token context after the prompt, at most 500" in err
    assert asked == [29]


# ---- progress lines


def test_heartbeat_is_silent_for_short_work_and_counts_long_work(capsys):
    with Heartbeat("quick", total=3, after=0.5) as beat:
        for _ in beat.iter(range(3)):
            pass
    assert capsys.readouterr().out == ""
    with Heartbeat("evaluating 2 batches x 2 splits", total=4, after=0.05, every=0.1) as beat:
        beat.tick()
        time.sleep(0.3)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 2 and all(re.fullmatch(r"evaluating 2 batches x 2 splits: 1/4 after \d+ s", s) for s in lines)


def test_a_long_evaluation_says_so(data_dir, tmp_path, monkeypatch, capsys):
    import monitor

    class LongFromTheStart(Heartbeat):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "after": 0.0, "every": 60.0})
    monkeypatch.setattr(monitor, "Heartbeat", LongFromTheStart)
    train.main(TINY + [f"--dataset={data_dir}", f"--out_dir={tmp_path}", "--eval_iters=3"])
    out = capsys.readouterr().out
    assert re.search(r"^iter 0: evaluating 3 batches x 2 splits: \d/6 after \d+ s$", out, re.M), out
    assert re.search(r"^iter 2: evaluating 3 batches x 2 splits", out, re.M), out


def test_step_times_leave_the_first_step_out():
    """A first step that compiles (here: sleeps 0.4 s) is reported apart, never averaged into ms/iter."""
    from types import SimpleNamespace

    from monitor import StepTimer
    notes = []
    timer = StepTimer(SimpleNamespace(device="cpu", device_type="cpu"), note=notes.append)
    time.sleep(0.4)
    timer.step_done()
    for _ in range(3):
        time.sleep(0.01)
        timer.step_done()
    per_step = timer.per_step()
    assert 0.01 <= per_step < 0.2 and timer.tokens_per_s(100) == pytest.approx(100 / per_step)
    assert len(notes) == 1 and re.fullmatch(r"compile: the first step took 0\.[4-9] s, compilation included", notes[0])


def test_sample_says_when_the_step_needs_no_compile(tmp_path, capsys):
    """In bf16 every projection lies in blocks where the CPU multiplies bf16 (AVX-512 BF16), and one row's steps take the
    layers in one call (speed.LayersInOneCall): sample.py says nothing was compiled. Where the kernel lacks those loops
    it compiles as before and says so."""
    import speed
    path = char_checkpoint(tmp_path)
    rc = run_script(sample.main, [f"--init_from={path}", "--start=abc", "--max_new_tokens=12", "--device=cpu",
                                  "--dtype=bf16", "--compile=True", "--temperature=0"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    one_call = speed.kernel_built() and torch.ops.speed.multiplies_layers() and torch.ops.speed.multiplies_bf16()
    assert ("nothing compiled" in err) == one_call and ("compiled in" in err) == (not one_call)
    assert out.strip()
