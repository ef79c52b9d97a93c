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
