"""
FSDP2 for train.py (`--fsdp=True` under torchrun): parameters, gradients and AdamW state sharded over
the ranks with `torch.distributed.fsdp.fully_shard`, one call per block and one for the root (the
embedding, the final norm and the head), and the way back to full tensors for checkpoints.

- Mixed precision: with dtype=bfloat16 the blocks compute in bf16 (FSDP casts the gathered parameters),
  the sharded parameters and the optimizer stay fp32 and gradients are reduced in fp32.
- Checkpoints stay the usual single file: `gather_state` all-gathers every parameter and optimizer
  moment, one tensor at a time, onto the CPU, in the layout of an unsharded model and optimizer
  (optimizer state keyed by parameter index), so a checkpoint written under FSDP resumes under FSDP
  with any number of ranks, under DDP or in one process, and sample.py and convert_hf.py read it.
- A stage switch of adaptation (adapt.py drops a layer's K/V weights) cannot change a sharded model in
  place: `unshard` rebuilds the plain model and optimizer from the gathered state, adaptation drops
  what it drops, and `shard` shards what remains.

`ParallelModel` is what train.py trains: the plain model and the views its loop runs (torch.compile,
DDP or FSDP), rebuilt after a stage switch; `rank_max` is how the ranks agree (to stop, on an error).
Parallelism stays outside model.py.
"""

import torch
import torch.distributed as dist

from checkpoint import build_on_meta


def mesh_for(device_type):
    """The 1-D mesh over all ranks on this run's device type (FSDP's default would pick a GPU mesh on a
    GPU machine even for a CPU run)."""
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device_type, (dist.get_world_size(),))


def shard(model, optimizer, device_type, compute_dtype=None, broadcast=True):
    """Shard model in place (each block, then the root) and return a new AdamW over the sharded
    parameters holding optimizer's state, sharded the same way. broadcast: first give every rank rank
    0's weights (a model initialised from scratch differs by rank: each rank has its own seed)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    full_state = optimizer.state_dict()
    if broadcast:
        for t in model.state_dict().values():
            dist.broadcast(t, 0)
    # cast_forward_inputs=False: a block's input is the residual stream, already in the compute dtype;
    # RoPE tables and the hand-over object stay as they are
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    mesh = mesh_for(device_type)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    group = optimizer.param_groups[0]
    sharded = model.configure_optimizers(group["weight_decay"], group["lr"], group["betas"], device_type)
    load_full_optimizer_state(sharded, full_state)
    return sharded


def _shard_like(value, param):
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(param, DTensor) and torch.is_tensor(value) and value.shape == param.shape:
        # every rank holds the full tensor: each keeps its own shard, no communication
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return value


def load_full_optimizer_state(optimizer, full_state):
    """Load an unsharded optimizer's state_dict (parameter index -> full tensors) into an optimizer over
    sharded parameters, listed in the same order."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    n_full = sum(len(g["params"]) for g in full_state["param_groups"])
    if n_full != len(params):
        raise ValueError(f"the optimizer state holds {n_full} parameters but the sharded model has {len(params)}")
    state = {i: {k: _shard_like(v, params[i]) for k, v in s.items()} for i, s in full_state["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": full_state["param_groups"]})


def _gatherer():
    """full(t): a DTensor gathered onto the CPU (a collective: every rank calls it in the same order),
    anything else as it is; a tensor seen twice (a tied head) is gathered once and stays shared."""
    from torch.distributed.tensor import DTensor
    seen = {}

    def full(t):
        if not isinstance(t, DTensor):
            return t
        if id(t) not in seen:
            seen[id(t)] = t.full_tensor().cpu()
        return seen[id(t)]
    return full


def gather_state(model, optimizer):
    """(model state_dict, optimizer state_dict) with full tensors on the CPU, on every rank, in the layout
    of the unsharded model and optimizer: what checkpoint.save_checkpoint writes. Every rank must call it."""
    full = _gatherer()
    model_state = {k: full(v) for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    opt["state"] = {i: {k: full(v) for k, v in s.items()} for i, s in opt["state"].items()}
    return model_state, opt


def unshard(model, optimizer, device, device_type):
    """(plain Llama on device, plain AdamW with the full state) from a sharded model and its optimizer:
    the same weights, kv_blend, frozen layers and optimizer state, for a change of its parameters."""
    model_state, opt_state = gather_state(model, optimizer)
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    plain = build_on_meta(model.config, model_state).to(device)
    plain.kv_blend = {layer: (source, w.detach().clone()) for layer, (source, w) in model.kv_blend.items()}
    for n, p in plain.named_parameters():
        p.requires_grad_(trainable[n])
    group = optimizer.param_groups[0]
    plain_opt = plain.configure_optimizers(group["weight_decay"], group["lr"], group["betas"], device_type)
    plain_opt.load_state_dict(opt_state)
    return plain, plain_opt


# -----------------------------------------------------------------------------
# the model train.py trains, under compile, DDP or FSDP


def rank_max(rt, value):
    """The largest of an int over all ranks (itself without DDP): how the ranks agree to stop. Under DDP
    every rank must call it at the same point."""
    if not rt.ddp:
        return int(value)
    t = torch.tensor([int(value)], device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def use_compile(setting, device_type):
    """'auto': compile on CUDA, not on CPU. Measured for the default model on the idle 2-core CPU
    (fp32): a cold torch.compile took ~22 s, then trained ~19% faster (~20,000 vs ~16,800 tokens/s).
    That pays back after ~2.3 M tokens; the default run is 0.6 M tokens, so compiling would make it
    slower. Use --compile=True for longer CPU runs. Under FSDP the blocks are compiled one by one (compile_blocks)."""
    return device_type == "cuda" if setting == "auto" else bool(setting)


def compile_blocks(model):
    """torch.compile each block's forward of an FSDP2-sharded model, in place: FSDP2's hooks (gather the
    block's weights before its forward, free and reduce-scatter after) run around the call, outside the
    graphs, and a whole-model compile would stop at them anyway. Every block shares one code object, and
    each takes its own graph (its layer index, its K/V role and the hand-over's contents so far differ),
    twice (training and evaluation): dynamo's limit of graphs a code object is raised to that, or the
    blocks past it would run eagerly without a word. Identical graphs reuse inductor's compiled code."""
    limit = 2 * len(model.layers) + 2
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    for block in model.layers:  # from the class's forward: compiling a compiled one again would nest
        block.forward = torch.compile(type(block).forward.__get__(block))


class ParallelModel:
    """The model being trained and the views the training loop runs: `raw` (the plain Llama: its config,
    its parameters for clipping), `model` (compiled and DDP-wrapped, or FSDP-sharded: the training
    forward) and `eval_model` (no DDP: evaluation needs no gradient sync), with the `optimizer` over them.
    Sharding and a stage switch replace the optimizer, so it lives here too."""

    def __init__(self, raw, optimizer, rt, compile_model, fsdp=False):
        self.raw, self.optimizer, self.rt, self.compile_model, self.fsdp = raw, optimizer, rt, compile_model, fsdp
        if fsdp:
            self.shard(broadcast=True)
        self.wrap()

    def shard(self, broadcast=False):
        """Shard the plain raw model and move the optimizer's state onto the shards."""
        compute = torch.bfloat16 if self.rt.dtype == "bfloat16" else None
        self.optimizer = shard(self.raw, self.optimizer, self.rt.device_type, compute, broadcast)

    def wrap(self):
        """(Re)build the compiled and DDP views: needed again after a stage switch removed parameters.
        Under FSDP the sharded model is its own view."""
        from torch.nn.parallel import DistributedDataParallel as DDP
        if self.compile_model:  # forget graphs of the model's earlier shapes: each stage would count
            torch._dynamo.reset()  # against dynamo's recompile limit and end in silent eager mode
        if self.fsdp:  # the sharded model is its own view; compiled block by block, as torchtitan does
            if self.compile_model:
                compile_blocks(self.raw)
            self.model = self.eval_model = self.raw
            return
        self.model = self.eval_model = torch.compile(self.raw) if self.compile_model else self.raw
        if self.rt.ddp:
            cuda = self.rt.device_type == "cuda"
            self.model = DDP(self.model, device_ids=[torch.device(self.rt.device).index] if cuda else None)

    def adapt(self, adaptation, iter_num):
        """Bring the model to where the adaptation schedule (adapt.Adaptation) says; True if it dropped
        parameters. Under FSDP a switch gathers the model, lets adaptation drop K/V weights and shards what
        remains: `raw` is then a new module."""
        if not (self.fsdp and adaptation.drops(self.raw.config.kv_source, iter_num)):
            changed = adaptation.apply(self.raw, self.optimizer, iter_num)
        else:
            self.raw, self.optimizer = unshard(self.raw, self.optimizer, self.rt.device, self.rt.device_type)
            changed = adaptation.apply(self.raw, self.optimizer, iter_num)
            self.shard()
        if changed:
            self.wrap()  # parameters were removed: DDP and compile must see it
        return changed

    def full_state(self):
        """(model state_dict, optimizer state_dict) as an unsharded run has them; under FSDP gathered onto
        the CPU of every rank (a collective)."""
        if self.fsdp:
            return gather_state(self.raw, self.optimizer)
        return self.raw.state_dict(), self.optimizer.state_dict()

    def release(self):
        """Let go of the model, its views and the optimizer, then wait for every rank: gloo is not torn down
        while a DDP/FSDP wrapper holds its work (FSDP: 1 abort in 6 runs), and no rank tears it down while
        another still talks (torch 2.13 then aborts a rank at exit, "terminate called without an active
        exception", 4 in 20 runs without the barrier)."""
        import gc
        self.raw = self.model = self.eval_model = self.optimizer = None
        gc.collect()
        dist.barrier()
