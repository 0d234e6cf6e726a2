"""torchrun environment: process group set-up, rank queries and the collectives DINO needs.

Under ``torchrun`` the variables RANK, WORLD_SIZE and LOCAL_RANK are set and a process group is
created (NCCL on CUDA, gloo on CPU); multi-node runs use torchrun's rendezvous and need nothing
more here. In a plain ``python`` process every helper is a no-op.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed(device: torch.device) -> None:
    if "RANK" not in os.environ or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over all processes in place (a collective: every rank must call it)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
        tensor.div_(dist.get_world_size())
    return tensor


def any_process(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag, true when it is true on at least one process: how ranks agree to stop or save
    at the same step. One all-reduce of len(flags) numbers and a host sync; a no-op alone."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(flags)
    values = torch.tensor([float(flag) for flag in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(value) for value in values.tolist()]
