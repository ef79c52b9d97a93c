"""
Train a dense or KV-shared Llama (model.py) in the nanoGPT manner.

    .venv/bin/python train.py                                   # the default: a small KV-shared char model, CPU ok
    .venv/bin/python train.py config/train_shakespeare_char_dense.py          # its dense twin
    .venv/bin/python train.py config/train_shakespeare_char.py --kv_source=cla:2 --out_dir=out-cla2 --max_iters=500
    .venv/bin/python train.py --init_from=resume                # continue out_dir/ckpt.pt exactly
    .venv/bin/torchrun --standalone --nproc_per_node=8 train.py config/train_tinyllama_shared.py   # DDP

Every setting below is a plain global. Arguments apply in order (configurator.py): a path is a config
file (Python assigning some of these names), --key=value overrides one setting. Unknown names and
values of the wrong type are rejected with the list of what is allowed. Nothing imports this file:
tests call main(argv).

Read it top to bottom: the settings, then main(): the checks before any work (guards.py), the setup (the
data, the model, the optimizer, the resume state of checkpoint.py, the compile/DDP/FSDP views of
sharding.ParallelModel, the adaptation schedule and teacher of adapt.py), then the one training loop,
between TRAINING SECTION BEGIN and END. The loop reads nothing back from the device at every step: the
loss is read at log steps, and what watches the run (monitor.py: the log, the checkpoint at each
evaluation, a stop signal, a non-finite loss, the step timer) reads it there and at evaluations.
"""

import math
import os
import sys
from contextlib import ExitStack

import torch
import torch.distributed as dist

from adapt import TRAINING_SETTINGS, attention_switched, loss_with_teacher, setup_adaptation, setup_distillation
from checkpoint import (MODEL_KEYS, SAMPLING_KEYS, checkpoint_to_start_from, restore_training_state,
                        settings_from_checkpoint)
from configurator import ConfigError, close_runtime, configure, init_runtime, run_script, settings_from
from dataset import BatchSampler, ensure_dataset, load_meta, open_tokens
from delta import adapted_checkpoint, check_delta_run
from guards import (accumulation_for_world, adaptation_note, check_fits, check_out_dir_writable,
                    check_replaces_same_model, check_settings, check_tokenizer, claim_out_dir, finished_message,
                    model_settings_conflicts, world_size_from_env)
from lora import LORA_SETTINGS, check_lora_run, model_to_train, setup_lora
from model import Llama, LlamaConfig
from monitor import (LossWatch, Saver, StepTimer, StopSignal, TrainingDiverged, device_peak_flops, evaluation_beat,
                     log_progress, log_stage_change, log_start, open_log, stop_message, summarise)
from sharding import ParallelModel, use_compile

# -----------------------------------------------------------------------------
# settings (the embedded default run = config/train_shakespeare_char.py)
# I/O
out_dir = "out-shakespeare-char"  # where ckpt.pt and log.jsonl go
eval_interval = 100          # evaluate (and checkpoint) every this many iterations, and at the end
log_interval = 10            # print/log the training loss every this many iterations
eval_iters = 20              # batches per split for each evaluation
eval_only = False            # evaluate once and exit
always_save_checkpoint = True  # checkpoint at every evaluation, not only when val loss improves
init_from = "scratch"        # 'scratch', 'resume' (out_dir/ckpt.pt) or the path of a checkpoint file
delta = ""                   # a delta file (delta.py, lora.py --adapters) of init_from: start from base + delta
overwrite = False            # let a new run replace out_dir's checkpoint of another model (see check_out_dir)
allow_tokenizer_mismatch = False  # train a checkpoint on data of another tokenizer (see check_tokenizer)
# data
dataset = "shakespeare_char"  # a directory under data/ or a path to one (train.bin, val.bin, meta.json)
auto_prepare = True          # run the offline prepare.py of shakespeare_char / shakespeare if data is missing
batch_size = 16              # sequences per micro-step per process
block_size = 128             # sequence length
gradient_accumulation_steps = 1  # micro-steps per optimizer step, in total over all DDP ranks
# model
n_layer = 4                  # transformer blocks
n_head = 4                   # query heads
n_kv_head = 2                # K/V heads (grouped-query attention when fewer than n_head)
n_embd = 128                 # model width
intermediate_size = 384      # MLP hidden width (SwiGLU)
vocab_size = 0               # 0: the dataset's vocabulary (meta.json)
rope_theta = 10000.0         # RoPE base
norm_eps = 1e-5              # RMSNorm epsilon
tie_embeddings = False       # share the token embedding with the output head
kv_source = "upper:half"     # 'dense', 'cla:N', 'upper:K', 'upper:half' or a list like 0,0,2,2
# optimizer: AdamW, linear warmup then cosine decay to min_lr
learning_rate = 2e-3         # peak learning rate, reached after warmup_iters
max_iters = 300              # optimizer steps in all (a resumed run continues to its own max_iters)
weight_decay = 0.1           # AdamW weight decay of the matrices (norms get none)
beta1 = 0.9                  # AdamW beta1
beta2 = 0.99                 # AdamW beta2
grad_clip = 1.0              # 0: no clipping
decay_lr = True              # False: a constant learning_rate
warmup_iters = 30            # linear warm-up steps
lr_decay_iters = 0           # where the cosine decay reaches min_lr; 0: at max_iters (the schedule follows it)
min_lr = 2e-4                # learning rate at the end of the cosine decay
# system
device = "auto"              # 'auto' (cuda if present, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
threads = 0                  # torch CPU threads per rank: 0 = 1 on a CPU (see configurator.apply_threads)
dtype = "auto"               # 'auto', 'float32', 'bfloat16', 'float16' (see resolve_dtype for auto)
compile = "auto"             # True, False or 'auto' (on for CUDA, off on CPU: see sharding.use_compile)
backend = "auto"             # DDP backend: 'auto' (nccl on CUDA, gloo on CPU), 'nccl', 'gloo'
fsdp = False                 # under torchrun: shard weights, gradients and AdamW state with FSDP2 (sharding.py)
seed = 1337                  # RNG seed (each DDP rank adds its rank); also the data order
peak_flops = 0.0             # per-device peak FLOP/s for MFU; 0: the GPU's datasheet value (no MFU on CPU)
# the adapt_* and distill_* settings (adaptation into a KV-shared model, a teacher): see adapt.py; the lora_* and
# base_quant settings (LoRA / DyLoRA adapters over a frozen int8 or NF4 base, QDyLoRA): see lora.py
DEFAULTS = settings_from(globals()) | TRAINING_SETTINGS | LORA_SETTINGS
CHOICES = {"dtype": ("auto", "float32", "bfloat16", "float16"), "backend": ("auto", "nccl", "gloo"),
           "compile": ("auto", True, False)}


def get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr, decay_lr=True):
    """Linear warm-up, then cosine decay to min_lr at lr_decay_iters."""
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def open_splits(data_dir, meta, block_size):
    splits = [open_tokens(data_dir, split, meta) for split in ("train", "val")]
    for split, arr in zip(("train", "val"), splits):
        if len(arr) <= block_size + 1:
            raise ConfigError(f"block_size={block_size} is longer than the data: {data_dir}/{split}.bin has "
                              f"{len(arr)} tokens; use a smaller block_size or more data")
    return splits


def build_model(s, explicit, ckpt, path, data_vocab):
    """The model to train, on the CPU: from the settings, or with the checkpoint's architecture and
    weights (a model setting given explicitly that disagrees with it is an error)."""
    if ckpt is None:
        mc = {k: getattr(s, k) for k in MODEL_KEYS}
        mc["vocab_size"] = mc["vocab_size"] or data_vocab
        if mc["vocab_size"] < data_vocab:
            raise ConfigError(f"vocab_size={mc['vocab_size']} is smaller than the dataset's vocabulary ({data_vocab})")
        try:
            return Llama(LlamaConfig(**mc))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"bad model settings: {e}") from None
    conflicts = model_settings_conflicts(s, explicit, ckpt["model_config"], s.init_from == "resume")
    if conflicts:
        raise ConfigError(f"the settings conflict with checkpoint {path}: {'; '.join(conflicts)}. Drop them to use "
                          "the checkpoint's values, or start from scratch in another out_dir.")
    if ckpt["model_config"]["vocab_size"] < data_vocab:
        raise ConfigError(f"checkpoint {path} has vocab_size={ckpt['model_config']['vocab_size']}, smaller than the "
                          f"dataset's vocabulary ({data_vocab}): it was trained with another tokenizer")
    model = model_to_train(ckpt, s.init_from == "resume", **({"block_size": s.block_size} if "block_size" in explicit and
                                           s.init_from != "resume" else {}))
    if s.block_size > model.config.block_size:
        raise ConfigError(f"block_size={s.block_size} exceeds the model's block_size={model.config.block_size}")
    return model


@torch.no_grad()
def estimate_loss(pm, rt, samplers, eval_iters, fsdp, beat=None):
    """Mean cross-entropy on eval_iters fixed batches of each split, shared out over the ranks. Under FSDP
    every rank runs as many forward passes (each gathers weights with the others): a rank without a
    batch of its own repeats batch 0 and does not count it. beat: a progress.Heartbeat, told each batch."""
    out = {}
    pm.model.eval()
    for split, sampler in zip(("train", "val"), samplers):
        total = torch.zeros(2, dtype=torch.float64, device=rt.device)
        mine = range(rt.rank, rt.world_size * -(-eval_iters // rt.world_size), rt.world_size)  # a range, not a list
        for k in mine if fsdp else (k for k in mine if k < eval_iters):
            X, Y = sampler.get(f"eval_{split}", 0, k if k < eval_iters else 0)
            with rt.autocast():
                loss = pm.eval_model(X, Y)[1]
            if k < eval_iters:
                total[0] += loss.double()
                total[1] += 1
            if beat is not None:
                beat.tick()
        if rt.ddp:
            dist.all_reduce(total)
        out[split] = (total[0] / total[1]).item() if total[1] > 0 else float("nan")
    pm.model.train()
    return out


def main(argv):
    """The run's summary; after a stop signal 128 + its number, the exit status of a process it ended."""
    s, explicit = configure(DEFAULTS, argv, __doc__, CHOICES)
    world_size = world_size_from_env()
    note = accumulation_for_world(s, explicit, world_size)
    check_settings(s, explicit, world_size, torchrun="RANK" in os.environ and "WORLD_SIZE" in os.environ)
    check_lora_run(s, explicit)
    check_delta_run(s)
    check_out_dir_writable(s.out_dir)
    with ExitStack() as cleanup:  # undone in reverse order however the run ends: signals, out_dir's lock, processes
        rt = init_runtime(s.device, s.dtype, s.seed, s.backend, s.threads)
        cleanup.callback(close_runtime, rt)
        # the data, the model (from scratch, or from a checkpoint whose architecture wins), the optimizer
        data_dir = ensure_dataset(s.dataset, s.auto_prepare, rt.master, dist.barrier if rt.ddp else (lambda: None))
        meta = load_meta(data_dir)
        path, ckpt = checkpoint_to_start_from(s.init_from, s.out_dir)
        if s.delta:  # the adapted model that base + delta make, as a checkpoint of its own (delta.py)
            ckpt = adapted_checkpoint(ckpt, path, s.delta)[1]
        resume = s.init_from == "resume"
        if resume:
            settings_from_checkpoint(s, explicit, ckpt)
        splits = open_splits(data_dir, meta, s.block_size)
        check_fits(s, ckpt["model_config"] if ckpt else {k: getattr(s, k) for k in MODEL_KEYS} | {
            "vocab_size": s.vocab_size or meta["vocab_size"]}, rt.device, rt.world_size)
        raw_model = attention_switched(build_model(s, explicit, ckpt, path, meta["vocab_size"]), s.adapt_attn_target,
                                       s.adapt_target)  # EchoAtt's switch, before the adapters go on
        if ckpt is not None and not s.allow_tokenizer_mismatch:
            check_tokenizer(ckpt, path, meta, data_dir)
        raw_model.to(rt.device)
        adaptation = setup_adaptation(raw_model, s.adapt_target, s.adapt_mode, s.adapt_order, s.adapt_stage_iters,
                                      s.adapt_layers_per_stage, s.adapt_train_layers, s.adapt_similarity)
        check_replaces_same_model(s, raw_model.config, adaptation, rt.master)
        lora = setup_lora(s, explicit, raw_model, ckpt, path, resume)  # base -> quantize -> adapters (lora.py)
        optimizer = raw_model.configure_optimizers(s.weight_decay, s.learning_rate, (s.beta1, s.beta2), rt.device_type)
        scaler = torch.amp.GradScaler(rt.device_type, enabled=(rt.dtype == "float16"))
        iter_num, best_val_loss, data_seed = 0, float("inf"), s.seed
        if resume:
            iter_num, best_val_loss, data_seed = restore_training_state(ckpt, optimizer, scaler, s.seed, rt.master)
        samplers = [BatchSampler(d, s.block_size, s.batch_size, data_seed, rt.device) for d in splits]
        pm = ParallelModel(raw_model, optimizer, rt, use_compile(s.compile, rt.device_type), s.fsdp)
        teacher, distill, taps = setup_distillation(s, pm.raw, rt, samplers[0])
        # checkpoints carry the starting checkpoint's tokenizer and chat template, and the dataset's meta
        carried = {key: ckpt[key] for key in SAMPLING_KEYS if ckpt is not None and key in ckpt} | {"meta": meta}
        if lora is not None:  # a LoRA run's checkpoint: the whole model (packed base, adapters) + this entry
            carried["lora"] = lora.info
        if resume and iter_num >= s.max_iters and not s.eval_only:
            if rt.master:  # a finished run: say so, rather than print a "done" that did nothing
                print(finished_message(s, iter_num), flush=True)
            return {"iters": iter_num, "val_loss": None, "best_val_loss": best_val_loss, "tokens_per_s": None}
        removed_note = claim_out_dir(s.out_dir, rt, cleanup)  # from here on out_dir is this run's
        log = open_log(s, rt, notes=(note, removed_note, adaptation_note(adaptation, s.max_iters)))
        tokens_per_iter = s.batch_size * s.block_size * s.gradient_accumulation_steps
        local_steps = s.gradient_accumulation_steps // rt.world_size  # micro-steps of this rank per step
        log_start(log, s, pm, iter_num, tokens_per_iter, adaptation, distill)
        if lora is not None:
            log(lora.describe())
        watch, peak = LossWatch(rt.device), device_peak_flops(s.peak_flops, rt)
        timer = StepTimer(rt, note=log if pm.compile_model else None)  # says how long compiling took
        saver = Saver(s, pm, scaler, samplers[0], carried, log, watch, iter_num if resume else None)
        stop = cleanup.enter_context(StopSignal())
        log.on_disk_full = stop.request_disk_full
        start_iter, val_loss, stopped = iter_num, None, 0
        X, Y = samplers[0].get("train", iter_num, rt.rank * local_steps)  # then each next batch while the device works
        pm.model.train()
        # ------------------------------------------------------------------------- TRAINING SECTION BEGIN
        while True:
            if adaptation is not None and pm.adapt(adaptation, iter_num):  # a stage switch dropped K/V weights
                best_val_loss = float("inf")  # "best" compares models of the same kv_source only
                kv = list(pm.raw.config.kv_source)
                log(f"iter {iter_num}: kv_source is now {kv}" + (" (the next step compiles the new model)" if pm.compile_model
                    else ""), kind="adapt", iter=iter_num, kv_source=kv)
                if taps is not None:
                    taps[0].follow(pm.raw)  # under FSDP the student is a new module now
            lr = get_lr(iter_num, s.learning_rate, s.warmup_iters, s.lr_decay_iters or s.max_iters, s.min_lr, s.decay_lr)
            at_end = iter_num >= s.max_iters
            # evaluate, and checkpoint, every eval_interval iterations and at the end
            if s.eval_only or ((iter_num % s.eval_interval == 0 or at_end) and not (resume and iter_num == start_iter)):
                watch.check(rt, log, saver.kept())  # a non-finite training loss since the last log step
                with timer.paused(), evaluation_beat(s, rt, iter_num) as beat:  # a line if it runs long
                    estimate = lambda: estimate_loss(pm, rt, samplers, s.eval_iters, s.fsdp, beat)  # noqa: E731
                    losses = lora.evaluate(estimate, log, iter_num) if lora is not None else estimate()
                val_loss = losses["val"]
                log(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {val_loss:.4f}", kind="eval",
                    iter=iter_num, train_loss=losses["train"], val_loss=val_loss, lr=lr, time=timer.seconds())
                if not math.isfinite(val_loss):
                    raise TrainingDiverged(stop_message("val loss", val_loss, iter_num, saver.kept()))
                improved, best_val_loss = val_loss < best_val_loss, min(best_val_loss, val_loss)
                if (improved or s.always_save_checkpoint) and iter_num > start_iter and not s.eval_only:
                    saver.save(iter_num, best_val_loss)
            # SIGTERM or Ctrl-C: checkpoint where the run is and stop
            stopped = 0 if at_end or s.eval_only else stop.agreed(rt, log_step=iter_num % s.log_interval == 0)
            if stopped:
                saver.stop(iter_num, start_iter, best_val_loss, stopped)
            if at_end or s.eval_only or stopped:
                break
            # one optimizer step: local_steps micro-steps here, the gradients averaged over all ranks
            for group in pm.optimizer.param_groups:
                group["lr"] = lr
            teaching = teacher is not None and distill.active(iter_num)
            log_stage_change(log, distill, iter_num)  # the printed loss is the distillation mix until here
            if lora is not None:
                lora.draw()  # a dynamic rank: this step's, for all its micro-steps
            loss_sum = torch.zeros((), dtype=torch.float32, device=rt.device)
            for micro_step in range(local_steps):
                if rt.ddp and not s.fsdp:  # DDP syncs gradients at the last micro-step; FSDP reduce-scatters each
                    pm.model.require_backward_grad_sync = micro_step == local_steps - 1
                with rt.autocast():
                    loss = loss_with_teacher(pm.model, teacher, X, Y, distill, taps) if teaching else pm.model(X, Y)[1]
                loss_sum += loss.detach().float()
                # fetch the next batch while the device works (on CUDA pinned and copied without blocking)
                next_iter, next_micro = divmod(iter_num * local_steps + micro_step + 1, local_steps)
                X, Y = samplers[0].get("train", next_iter, rt.rank * local_steps + next_micro)
                scaler.scale(loss / local_steps).backward()
            if s.grad_clip > 0:
                scaler.unscale_(pm.optimizer)
                torch.nn.utils.clip_grad_norm_(pm.raw.parameters(), s.grad_clip)
            scaler.step(pm.optimizer)
            scaler.update()
            pm.optimizer.zero_grad(set_to_none=True)
            watch.update(loss_sum, iter_num)  # on the device: nothing is read back here
            timer.step_done()
            iter_num += 1
            # the loss is read back at log steps only: a host sync
            if iter_num % s.log_interval == 0 or iter_num == s.max_iters:
                watch.check(rt, log, saver.kept())
                if rt.ddp:
                    dist.all_reduce(loss_sum)
                loss_val = loss_sum.item() / s.gradient_accumulation_steps  # the mean over micro-steps and ranks
                log_progress(log, pm, iter_num - 1, loss_val, lr, timer.per_step(), tokens_per_iter, s.block_size, peak,
                             distilling=teaching)
        # ------------------------------------------------------------------------- TRAINING SECTION END
        summary = {"iters": iter_num, "val_loss": val_loss, "best_val_loss": best_val_loss,
                   "tokens_per_s": timer.tokens_per_s(tokens_per_iter), "stopped": stopped}
        summarise(summary, pm, log, s.eval_only)
        if rt.ddp:
            pm.release()
        return 128 + stopped if stopped else summary


if __name__ == "__main__":
    sys.exit(run_script(main))
