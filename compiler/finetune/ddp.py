"""Data-parallel fine-tuning under ``torchrun``, with nothing home-made: torch.distributed, DDP, DistributedSampler.

One process is the default. With ``FinetuneConfig(ddp=True)`` and the environment ``torchrun`` sets up
(``WORLD_SIZE`` > 1, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) the driver joins the process
group (gloo on the CPU, nccl on CUDA), wraps the model in ``DistributedDataParallel`` and shards every epoch
with ``DistributedSampler``. Each rank reads ``batch_size / world_size`` samples per step; DDP averages the
gradients, so a step sees the same global batch as one process reading ``batch_size`` samples (the sampler
hands rank r the r-th of every ``world_size`` consecutive indices of the same seeded permutation).
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    """Where this process stands: rank, world size, its device, and whether it created the process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but CUDA is not available")
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def init_distributed(enabled: bool, device: str = "auto") -> DistContext:
    """Join (or reuse) the process group when ``enabled`` and launched with WORLD_SIZE > 1; else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not enabled or world <= 1:
        if enabled:
            log.info("ddp requested but WORLD_SIZE is %d: running as one process", world)
        return DistContext(device=_device(device, 0))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _device(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
        owns = True
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev,
                       backend=dist.get_backend(), owns_group=owns)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group if this run created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """``DistributedDataParallel`` over ``module`` when distributed, the module itself otherwise.

    Buffers are synced from rank 0 once, at construction, and not at every step: the quantizers' buffers
    (bit-widths, calibration samples) do not change while training and the noise counters advance alike on
    every rank (each rank draws its own noise stream through ``LayerNoise.stream``); the batch-statistics
    running means and variances do change, and :func:`average_running_stats` joins them after each epoch.
    """
    if not ctx.distributed:
        return module
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    ddp_cls = torch.nn.parallel.DistributedDataParallel
    # torch >= 2.14 renames broadcast_buffers; both still sync buffers once at construction
    quiet = "forward_sync_buffers" in inspect.signature(ddp_cls.__init__).parameters
    kw = {"forward_sync_buffers": False} if quiet else {"broadcast_buffers": False}
    return ddp_cls(module, device_ids=ids, **kw)


def local_batch_size(batch_size: int, ctx: DistContext) -> int:
    """The per-rank batch for a global ``batch_size``; it must divide evenly."""
    if batch_size % ctx.world_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {ctx.world_size} processes")
    return batch_size // ctx.world_size


def train_loader(ds: Dataset, batch_size: int, ctx: DistContext, seed: int):
    """A shuffled loader over this rank's shard; call ``sampler.set_epoch(e)`` before each epoch.

    The sampler is used in one process too (``num_replicas=1``): the order of epoch e is a function of
    (seed, e) only, which makes a resumed run replay exactly the epochs it lost. A tensor data set is batched
    by :class:`~mpqc.compiler.data.TensorBatches`, copied once to a CUDA device when training runs there.
    """
    from mpqc.compiler.data import TensorBatches

    sampler = DistributedSampler(ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed,
                                 drop_last=True)
    local = local_batch_size(batch_size, ctx)
    if isinstance(ds, TensorDataset):
        device = ctx.device if torch.device(ctx.device).type == "cuda" else None
        return TensorBatches(ds, local, sampler=sampler, drop_last=True, device=device), sampler
    return DataLoader(ds, batch_size=local, sampler=sampler, drop_last=True), sampler


def shard_loader(ds: Dataset, batch_size: int, ctx: DistContext) -> DataLoader:
    """An unshuffled loader over this rank's shard (for statistics reduced with :func:`all_reduce_sum`)."""
    if not ctx.distributed:
        return DataLoader(ds, batch_size=batch_size, shuffle=False)
    sampler = DistributedSampler(ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=False, drop_last=False)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler)


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a tensor over all ranks (identity in one process)."""
    if ctx.distributed:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def average_running_stats(module: torch.nn.Module, ctx: DistContext) -> None:
    """Average every ``running_mean``/``running_var`` buffer under ``module`` over the ranks (no-op in one process).

    Each rank's batch-statistics modules (the fine-tuning's BatchRenorm) track their own shard's statistics, and
    buffers are not synced per step (:func:`wrap`): without this the ranks evaluate, checkpoint and fold
    different models (98.05 % vs 96.94 % on two ranks of the digits CNN)."""
    if not ctx.distributed:
        return
    for name, buf in module.named_buffers():
        if name.rsplit(".", 1)[-1] in ("running_mean", "running_var") and buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(ctx.world_size)


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op in one process)."""
    if ctx.distributed:
        dist.barrier()


__all__ = ["DistContext", "all_reduce_sum", "average_running_stats", "barrier", "init_distributed",
           "local_batch_size", "shard_loader", "shutdown", "train_loader", "wrap"]
