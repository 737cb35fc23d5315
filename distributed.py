"""
Devices and processes: the process group torchrun starts, FSDP2 sharding over the processes (or,
on one device, fp32 master weights under autocast), sums of host numbers across processes, and
how a distributed process ends. train.py calls these; nothing here knows about LIVR.
"""
import contextlib
import math
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist


DEFAULT_TIMEOUT_S = 1800        # torch's own default: a save of a 3B full fine-tune fits in it


def setup_distributed(timeout_s=None):
    """(rank, world, device); under torchrun the process group, whose collectives give up after
    `timeout_s` seconds (train.py's --collective-timeout; default and any unusable value:
    DEFAULT_TIMEOUT_S) with an error faults.report names, instead of waiting on forever for a
    stalled process. (Under NCCL the watchdog ends the process itself after that time.)"""
    if "RANK" not in os.environ:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, dev
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":     # before the process group, so NCCL binds each rank to its own GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    ok = isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s if ok else DEFAULT_TIMEOUT_S))
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        return rank, world, torch.device("cuda", torch.cuda.current_device())
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return rank, world, torch.device("cpu")


def all_sum(*xs):
    """Sum Python numbers over all processes. NCCL reduces only CUDA tensors, gloo CPU ones."""
    if not dist.is_initialized():
        return list(map(float, xs))
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(xs, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.tolist()


def shard_model(m, compute_dtype, device, per_block=None, shard_size=None):
    """FSDP2 per block: on a GPU each vision block and decoder block is its own unit,
    then the root (embeddings, tied head, latents, merger); a block's parameters are gathered for
    its forward, freed, and gathered again for its backward, so memory holds about one block's.
    CPU processes (gloo) shard the model as one unit: there every collective is a round trip
    between processes that costs more than a tiny demo block's compute (BENCH.md). per_block
    overrides the choice (tests shard per block over gloo). Parameters stay fp32 masters;
    compute runs in `compute_dtype` and gradients reduce in fp32. shard_size (HSDP): shard within
    each group of that many consecutive ranks (a node's GPUs) and replicate across the groups."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    mesh = hsdp_mesh(device, shard_size)
    if per_block is None:
        per_block = device.type == "cuda"
    if per_block:
        for block in [*m.visual.blocks, *m.model.layers]:
            fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(m, mesh=mesh, mp_policy=mp)
    return m


def hsdp_mesh(device, shard_size=None):
    """FSDP's device mesh: 1-D over all ranks, or with shard_size the 2-D (replicate, shard) mesh
    of HSDP, whose rows are groups of consecutive ranks (torchrun numbers a node's ranks so)."""
    world = dist.get_world_size()
    if not shard_size or shard_size == world:
        return dist.device_mesh.init_device_mesh(device.type, (world,))
    return dist.device_mesh.init_device_mesh(device.type, (world // shard_size, shard_size),
                                             mesh_dim_names=("replicate", "shard"))


def mesh_note(params):
    """' | mesh replicate R x shard S' (HSDP) or ' | mesh shard W' (FSDP), read from the sharded
    parameters themselves; '' on one process."""
    mesh = getattr(params[0], "device_mesh", None) if params else None
    if mesh is None:
        return ""
    names = mesh.mesh_dim_names or ("shard",)
    return " | mesh " + " x ".join(f"{n} {k}" for n, k in zip(names, mesh.shape))


def mixed_precision(m, compute_dtype, device):
    """One device, as FSDP's MixedPrecisionPolicy does over several: trainable parameters (and
    so AdamW's state) stay fp32 masters, frozen weights are stored in the compute dtype, and the
    forward runs in it under autocast. Stepping bf16 weights directly would lose every update
    smaller than half a bf16 ulp (lr 1e-4 on a weight of 0.02 is one ulp), so late in the
    cosine schedule training would silently stop. Returns a context-manager factory for the
    forward passes."""
    if compute_dtype == torch.float32:
        return contextlib.nullcontext
    for p in m.parameters():
        if not p.requires_grad:
            p.data = p.data.to(compute_dtype)
    return lambda: torch.autocast(device.type, dtype=compute_dtype)


def leave(code):
    """End a distributed process without tearing its process group down: under gloo (torch
    2.13) the teardown aborts a process now and then after everything is written (BENCH.md,
    "Known issues"). Nothing is lost: checkpoints and metrics are closed files by then, and
    DataLoader workers exit when their parent does."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
