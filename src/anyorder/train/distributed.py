"""torchrun helpers. Every function is a no-op in a single process, so the trainer has one code path.

Launch multi-process training with ``torchrun --nproc_per_node=N script.py``; torchrun sets
RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT for the rendezvous).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None = None  # None when not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def init_distributed() -> DistInfo:
    """Read the torchrun environment; initialise the process group when WORLD_SIZE > 1.

    Idempotent: calling it again (e.g. from the script and then the Trainer) returns the same info.
    Backend: NCCL when CUDA is available (GPU collectives), else gloo (CPU).
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()

    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        # NCCL (and all_gather_object) use the *current* device; without this every rank
        # would talk through cuda:0.
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    backend = None
    if world_size > 1:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        backend = dist.get_backend()
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def reduce_device() -> torch.device:
    # NCCL only reduces CUDA tensors; gloo reduces CPU tensors (and CUDA ones, via a copy)
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_mean(value: Union[float, int, torch.Tensor]) -> Union[float, torch.Tensor]:
    """Mean over ranks. Numbers come back as floats; tensors as a new floating tensor on their device."""
    if not torch.is_tensor(value):
        if not is_distributed():
            return float(value)
        t = torch.tensor(float(value), dtype=torch.float64, device=reduce_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return (t / dist.get_world_size()).item()
    t = value.detach()
    if not t.is_floating_point():
        t = t.double()  # an integer mean would truncate
    if not is_distributed():
        return t.clone()
    out_device = t.device
    t = t.to(reduce_device(), copy=True)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / dist.get_world_size()).to(out_device)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, as a new tensor on the input's device."""
    if not is_distributed():
        return value.detach().clone()
    out_device = value.device
    t = value.detach().to(reduce_device(), copy=True)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.to(out_device)


def unwrap(model: nn.Module) -> nn.Module:
    """The raw module under DistributedDataParallel / DataParallel (whose keys carry 'module.')."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


class LossStep(nn.Module):
    """One micro-step's loss as a module: ``forward(step, micro, rank, world)`` runs
    ``loss_fn(model, ...)``. DDP wraps this, not the model, so a loss that calls sub-modules or
    several passes (e.g. LoMDM's heads) still goes through the forward DDP instruments."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Any]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, step: int, micro: int, rank: int, world_size: int):
        return self.loss_fn(self.model, step, micro, rank, world_size)


__all__ = ["LossStep", "DistInfo", "init_distributed", "is_distributed", "barrier", "cleanup", "all_reduce_mean", "all_reduce_sum",
           "unwrap"]
