"""
What watches a training run while train.py's loop runs it: the log (`Log`, and the start, progress and
summary lines), the checkpoint at each evaluation (`Saver`), a stop request (`StopSignal`: SIGTERM or
Ctrl-C), a non-finite loss (`LossWatch`) and the time of the steps (`StepTimer`).

The loop reads nothing back from the device at every step: the loss, the non-finite watch, the stop
request under DDP and the step times are read at log steps and evaluations, where it waits for the
device anyway.
"""

import errno
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager

import torch

from checkpoint import CKPT_NAME, make_checkpoint, save_checkpoint
from configurator import peak_flops_for
from progress import Heartbeat
from sharding import rank_max


class Log:
    """Prints a line and appends a JSON record to out_dir/log.jsonl; silent on the other DDP ranks.

    Logging never ends a run. A record is appended whole or not at all: a failed write (a full disk) is
    cut back to the last whole line, said once on stderr, and, for a full disk, asks the run to stop
    with a checkpoint (`on_disk_full`, set by train.py to its StopSignal's request). A closed stdout
    (`train.py | head`, a closed terminal) sends the rest of the printing to /dev/null and training goes
    on, logging to log.jsonl."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled = path, enabled
        self.on_disk_full, self.write_failed, self.stdout_closed, self.tail_checked = None, False, False, False

    def __call__(self, text=None, **record):
        if not self.enabled:
            return
        if text:
            self.print(text)
        if self.path and record:
            self.append(json.dumps(record) + "\n")

    def print(self, text):
        if self.stdout_closed:
            return
        try:
            print(text, flush=True)
        except (BrokenPipeError, OSError) as e:  # EPIPE from `| head`, EIO from a closed terminal
            self.stdout_closed = True
            stdout_to_devnull()
            warn(f"note: stdout is closed ({e.strerror or e}): training goes on, logging to {self.path} only")

    def append(self, line):
        data = line.encode()
        try:
            with open(self.path, "ab") as f:
                size = f.tell()
                if not self.tail_checked and size:
                    size = whole_lines_size(self.path, size)  # a line left torn by a run killed mid-write
                    f.truncate(size)
                self.tail_checked = True
                try:
                    f.write(data)
                    f.flush()
                except OSError:
                    f.truncate(size)  # no torn line for a reader to trip on
                    raise
        except OSError as e:
            if not self.write_failed:
                warn(f"warning: cannot append to {self.path} ({e.strerror or e})" +
                     (": stopping with a checkpoint" if e.errno == errno.ENOSPC and self.on_disk_full else
                      ": training goes on without it"))
            self.write_failed = True
            if e.errno == errno.ENOSPC and self.on_disk_full:
                self.on_disk_full()


def whole_lines_size(path, size):
    """The size of the file at path up to and including its last newline."""
    with open(path, "rb") as f:
        f.seek(max(0, size - (1 << 16)))
        tail = f.read()
    cut = tail.rfind(b"\n")
    return size - len(tail) + cut + 1 if cut >= 0 or size <= (1 << 16) else size


def warn(line):
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def stdout_to_devnull():
    """Point stdout at /dev/null, so that later prints, and the flush at exit, do not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        sys.stdout = open(os.devnull, "w")


def read_log(path):
    """The records of a log.jsonl. A last line cut short (a run killed, or a full disk, mid-write) is
    skipped with a note naming the file; damage anywhere else is a ValueError naming the file and line."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            if number == len(lines):  # the last line, with no newline after it: torn
                warn(f"note: {path}: skipped its last line, cut short ({len(line)} bytes)")
                break
            raise ValueError(f"{path} line {number} is not a log record ({str(e)[:80]}): damaged; move it "
                             "away to start that run anew") from None
        records.append(record)
    return records


def open_log(s, rt, notes):
    """The run's Log (out_dir/log.jsonl), after the notes. A new run starts a new log: it describes this
    run only, as its checkpoint will."""
    path = os.path.join(s.out_dir, "log.jsonl")
    if rt.master and s.init_from != "resume" and not s.eval_only and os.path.exists(path):
        os.remove(path)
    log = Log(path, enabled=rt.master)
    for note in notes:
        if note:
            log(note)
    return log


def log_start(log, s, pm, iter_num, tokens_per_iter, adaptation=None, distill=None):
    """The start line (and record): the model, its maps, the runtime; then what adapts it, if anything."""
    c, rt = pm.raw.config, pm.rt
    n_params = pm.raw.num_params()
    shared_attn = any(j != i for i, j in enumerate(c.attn_source))
    frozen = [i for i, layer in enumerate(pm.raw.layers) if not any(p.requires_grad for p in layer.parameters())]
    log(f"model: {n_params / 1e6:.2f}M parameters, {c.n_layer} layers, kv_source {list(c.kv_source)} "
        f"({len(c.owners)} K/V owners)" + (f", attn_source {list(c.attn_source)}" if shared_attn else "") +
        f"; device {rt.device}{threads_note(rt)}, dtype {rt.dtype}, "
        f"compile {pm.compile_model}, ranks {rt.world_size}{' (FSDP)' if pm.fsdp else ''}; "
        f"{tokens_per_iter:,} tokens per iteration; starting at iter {iter_num}",
        kind="start", iter=iter_num, params=n_params, kv_source=list(c.kv_source), attn_source=list(c.attn_source),
        device=rt.device, threads=rt.threads, dtype=rt.dtype, compile=pm.compile_model, world_size=rt.world_size,
        fsdp=pm.fsdp, tokens_per_iter=tokens_per_iter, frozen_layers=frozen, config=vars(s))
    for line in adaptation_lines(s, adaptation, distill, frozen, c.n_layer):
        log(line)
    if pm.compile_model:
        log("compile: torch.compile runs at the first evaluation and again at the first step (a minute or more "
            "on a CPU, longer for big models); the line after the first step says how long it took")


def threads_note(rt):
    return f" ({rt.threads} thread{'s' if rt.threads > 1 else ''})" if rt.device_type == "cpu" else ""


def adaptation_lines(s, adaptation, distill, frozen, n_layer):
    """What the start line leaves out: the adaptation's target and stages, the teacher, the frozen layers."""
    lines = []
    if adaptation is not None:
        stages = "; ".join(f"layers {stage} at iter {k * adaptation.stage_iters}" if adaptation.mode == "gradual"
                           else f"layers {stage} at iter 0" for k, stage in enumerate(adaptation.stages))
        lines.append(f"adaptation: to kv_source {list(adaptation.target)}, {adaptation.mode}" +
                     (f", stages of {adaptation.stage_iters} iterations" if adaptation.mode == "gradual" else "") +
                     f": {stages or 'nothing to switch'}")
    if frozen:
        lines.append(f"frozen layers {frozen} (no gradients); training {[i for i in range(n_layer) if i not in frozen]}")
    if distill is not None:
        weights = [(1 - distill.kl - distill.argmax - distill.hidden, "CE(data)"),
                   (distill.kl * (1 - distill.reverse), f"T^2 KL(teacher || student) at T={distill.temperature:g}"),
                   (distill.kl * distill.reverse, f"T^2 KL(student || teacher) at T={distill.temperature:g}"),
                   (distill.argmax, "CE(teacher's argmax)"), (distill.hidden, f"MSE(hidden at layers {list(distill.layers)})")]
        mix = " + ".join(f"{w:g} {name}" for w, name in weights if w)
        until = f"until iter {distill.iters}, then plain CE" if distill.iters else "for the whole run"
        teacher = s.distill_teacher or s.init_from
        if s.distill_cache:  # adapt.TeacherTopK
            teacher += f" (its top {s.distill_cache_topk} tokens from {s.distill_cache}; the rest one bucket)"
        ends = (f"; the positions where the teacher's argmax is token {distill.end[0]} (its eos) count {distill.end[1]:g} "
                f"times" if distill.end else "")
        lines.append(f"distillation: teacher {teacher}; loss = {mix}, {until}{ends} (the printed loss is this mix)")
    return lines


def device_peak_flops(setting, rt):
    """Per-device peak FLOP/s for MFU: the setting, else the GPU's datasheet value; None on CPU."""
    if setting > 0:
        return setting
    if rt.device_type == "cuda":
        try:
            return peak_flops_for(torch.cuda.get_device_name(rt.device))
        except ValueError:
            return None
    return None


def log_progress(log, pm, iter_num, loss, lr, s_per_iter, tokens_per_iter, block_size, peak, distilling=False):
    """The loss line of a log step; while a teacher teaches, the loss is the distillation mix, and says so."""
    tps = tokens_per_iter / s_per_iter
    mfu = pm.raw.estimate_mfu(tps / pm.rt.world_size, block_size, peak_flops=peak) if peak else None
    log(f"iter {iter_num}: loss {loss:.4f}{' (distill mix)' if distilling else ''}, lr {lr:.2e}, "
        f"{1000 * s_per_iter:.1f} ms/iter, {tps:,.0f} tokens/s" + (f", MFU {100 * mfu:.1f}%" if mfu is not None else ""),
        kind="train", iter=iter_num, loss=loss, loss_kind="distill mix" if distilling else "cross-entropy", lr=lr,
        ms_per_iter=1000 * s_per_iter, tokens_per_s=tps, mfu=mfu)


def evaluation_beat(s, rt, iter_num):
    """A progress line when an evaluation runs more than a few seconds (a big model's: minutes)."""
    mine = 2 * -(-s.eval_iters // rt.world_size)  # the forward passes of this rank
    return Heartbeat(f"iter {iter_num}: evaluating {s.eval_iters} batches x 2 splits" +
                     (" (rank 0's share)" if rt.ddp else ""), total=mine, enabled=rt.master)


def log_stage_change(log, distill, iter_num):
    """The line where distillation's stage 1 ends: the loss printed from here on is plain cross-entropy."""
    if distill is not None and distill.iters and iter_num == distill.iters:
        log(f"iter {iter_num}: distillation ends (distill_iters={distill.iters}), plain cross-entropy from here",
            kind="stage", iter=iter_num, stage="cross-entropy")


def weights_digest(state_dict):
    h = hashlib.sha256()
    for k, t in state_dict.items():
        h.update(k.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def summarise(summary, pm, log, eval_only):
    """Under DDP first whether every rank ends with the same weights; then the 'done' line and record."""
    rt = pm.rt
    if rt.ddp:
        import torch.distributed as dist
        digests = [None] * rt.world_size
        dist.all_gather_object(digests, weights_digest(pm.full_state()[0]))
        summary["ddp_weights_identical"] = len(set(digests)) == 1
        mode = "fsdp: gathered weights" if pm.fsdp else "ddp: weights"
        log(f"{mode} on all {rt.world_size} ranks are {'identical' if len(set(digests)) == 1 else 'DIFFERENT'} "
            f"(sha256 {digests[0][:16]})")
    if not eval_only:
        tps, val_loss = summary["tokens_per_s"], summary["val_loss"]
        vl = f"{val_loss:.4f}" if val_loss is not None else "not evaluated"
        log(f"done: {summary['iters']} iters, val loss {vl}, best {summary['best_val_loss']:.4f}" +
            (f", {tps:,.0f} tokens/s on average (first step and evaluations excluded)" if tps else ""),
            kind="done", **summary)
    return summary


# -----------------------------------------------------------------------------
# stopping: a non-finite loss, a full disk, a signal


class TrainingDiverged(ValueError):
    """A non-finite loss. A ValueError like other bad input: the fix is a setting (learning rate, warm-up)."""


class CheckpointWriteError(ValueError):
    """A checkpoint that could not be written (a full disk); the message says which one was kept."""


def stop_message(what, value, iter_num, kept):
    return f"{what} is {value} at iter {iter_num}: training stopped and nothing after it saved; {kept}"


class LossWatch:
    """Finds a non-finite training loss without reading the loss back at every step: each step records,
    on the device, the first iteration whose loss was not finite (`update`); `check` reads that back, at
    log steps and before every checkpoint, and stops the run on every rank. Steps after a bad one are
    never saved: the checkpoint on disk stays the last good one."""

    def __init__(self, device):
        self.bad_iter = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_loss = torch.zeros((), dtype=torch.float32, device=device)

    def update(self, loss, iter_num):
        first = ~torch.isfinite(loss) & (self.bad_iter < 0)
        self.bad_iter = torch.where(first, iter_num, self.bad_iter)
        self.bad_loss = torch.where(first, loss, self.bad_loss)

    def check(self, rt, log, kept):
        """Raise TrainingDiverged if a step so far had a non-finite loss (on any rank: a collective)."""
        never = torch.iinfo(torch.int64).max
        first = torch.where(self.bad_iter < 0, never, self.bad_iter)
        if rt.ddp:
            import torch.distributed as dist
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        first = int(first)
        if first == never:
            return
        value = float(self.bad_loss) if int(self.bad_iter) == first else "not finite on another rank"
        log(kind="diverged", iter=first, loss=str(value))
        raise TrainingDiverged(stop_message("training loss", value, first, kept) +
                               ". Lower learning_rate or raise warmup_iters.")


class Saver:
    """Writes out_dir/ckpt.pt (on rank 0) and remembers the last iteration saved, for the messages that
    say what was kept. A failed write (a full disk) stops every rank with one line; so does a
    non-finite loss since the start (the LossWatch), checked before anything is written."""

    def __init__(self, s, pm, scaler, sampler, carried, log, watch, last_saved):
        self.s, self.pm, self.scaler, self.sampler, self.carried = s, pm, scaler, sampler, carried
        self.log, self.watch, self.last = log, watch, last_saved
        self.path = os.path.join(s.out_dir, CKPT_NAME)

    def kept(self):
        return (f"the last good checkpoint {self.path} (iter {self.last}) was kept" if self.last is not None
                else "no checkpoint was written")

    def save(self, iter_num, best_val_loss):
        self.watch.check(self.pm.rt, self.log, self.kept())
        pm, error = self.pm, None
        states = pm.full_state()  # under FSDP a collective: every rank gathers, rank 0 writes
        if pm.rt.master:
            try:
                save_checkpoint(make_checkpoint(pm.raw, states, self.scaler, iter_num, best_val_loss, self.sampler,
                                                vars(self.s), self.carried), self.path)
            except OSError as e:  # save_checkpoint removed its temp file; the previous checkpoint is intact
                error = e
        if rank_max(pm.rt, error is not None):
            if error is None:
                raise CheckpointWriteError(f"rank 0 could not write the checkpoint of iter {iter_num}")
            if error.errno == errno.ENOSPC:
                raise CheckpointWriteError(f"no space left on the device of {self.s.out_dir} for the checkpoint of "
                                           f"iter {iter_num}: {self.kept()}; free space and resume")
            raise CheckpointWriteError(f"cannot write the checkpoint of iter {iter_num} to {self.path} "
                                       f"({error.strerror or error}): {self.kept()}")
        self.log(f"saved {self.path} (iter {iter_num})")
        self.last = iter_num

    def stop(self, iter_num, start_iter, best_val_loss, signum):
        """A stop signal: checkpoint what was trained since the last save, and say how to go on."""
        if iter_num > start_iter and self.last != iter_num:
            self.save(iter_num, best_val_loss)
        where = (f"{self.path} holds iter {self.last}: continue with --init_from=resume" if self.last is not None
                 else "nothing was trained, nothing saved")
        if signum == DISK_FULL:
            raise DiskFull(f"no space left on the device of {self.s.out_dir} for log.jsonl: training stopped at iter "
                           f"{iter_num}; {where} once space is freed")
        name = signal.Signals(signum).name
        self.log(f"stopped by {name} at iter {iter_num}; {where}", kind="stopped", iter=iter_num, signal=name)


# a stop that is no signal: the disk filled up while logging (Log.on_disk_full); above every signal number
DISK_FULL = 1000
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT") if hasattr(signal, name))


class DiskFull(ValueError):
    """The disk filled up while logging: the run stopped after a checkpoint; the message says where."""


class StopSignal:
    """SIGTERM (a scheduler preempting the job), SIGHUP (a closed terminal or ssh session), SIGQUIT or
    Ctrl-C asks the loop to finish its step, write a checkpoint and return, instead of losing the
    iterations since the last evaluation; so does a full disk (DISK_FULL, from the log). A second Ctrl-C
    quits at once (the atomic write keeps the previous checkpoint). One that comes within a second of
    the first is the same request: torchrun passes the terminal's SIGINT on to processes that already
    got it. Installed only in the main thread, where Python runs signal handlers."""

    def __init__(self):
        self.signum, self.since, self.previous = 0, 0.0, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT and time.monotonic() - self.since > 1.0:
            raise KeyboardInterrupt
        if not self.signum:
            self.signum, self.since = signum, time.monotonic()

    def request_disk_full(self):
        self.handle(DISK_FULL, None)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def agreed(self, rt, log_step):
        """The signal every rank stops for (0: none). One process looks at every step; under DDP the
        ranks agree on it at log steps only, as that is a collective the host waits for."""
        return rank_max(rt, self.signum) if log_step or not rt.ddp else 0


class StepTimer:
    """Seconds per training step without waiting for the device at every step: the steps of a log
    window are timed together, up to the log step, where the loop has just read the loss back. What is
    no step is left out: evaluations (`paused`) and the first step (compilation, allocator warm-up),
    timed apart (the timer waits for the device once, after it) and reported only when a log window
    holds nothing else (log_interval=1)."""

    def __init__(self, rt, note=None):
        self.sync = (lambda: torch.cuda.synchronize(rt.device)) if rt.device_type == "cuda" else (lambda: None)
        self.note = note  # told how long the first step took (a compiled run: compilation included)
        self.start, self.window, self.steps, self.first = time.perf_counter(), 0.0, 0, None
        self.total, self.total_steps = 0.0, 0  # over the windows read so far

    @contextmanager
    def paused(self):
        if self.steps:  # else nothing since the last read was a step
            self.sync()
            self.window += time.perf_counter() - self.start
        yield
        self.start = time.perf_counter()

    def step_done(self):
        self.steps += 1
        if self.first is None:
            self.sync()
            now = time.perf_counter()
            self.first, self.start, self.window, self.steps = self.window + now - self.start, now, 0.0, 0
            if self.note is not None:
                self.note(f"compile: the first step took {self.first:.1f} s, compilation included")

    def per_step(self):
        """Mean seconds per step since the last call (call it right after the loss was read back)."""
        self.sync()
        now = time.perf_counter()
        if not self.steps:  # the window held the first step only
            self.start, self.window = now, 0.0
            return self.first
        seconds = (self.window + now - self.start) / self.steps
        self.total, self.total_steps = self.total + self.window + now - self.start, self.total_steps + self.steps
        self.start, self.window, self.steps = now, 0.0, 0
        return seconds

    def seconds(self):
        """Time of the steps so far, the first excluded."""
        return self.total + self.window

    def tokens_per_s(self, tokens_per_iter):
        """The run's average over the windows read, first step excluded (None when nothing else was timed)."""
        steps, seconds = self.total_steps, self.total
        return tokens_per_iter * steps / seconds if steps > 0 and seconds > 0 else None
