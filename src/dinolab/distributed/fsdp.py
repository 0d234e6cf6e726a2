"""Fully sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``) for DINO.

With ``train.parallel=fsdp`` each process keeps 1/P of the student's parameters, gradients and
AdamW state, and 1/P of the teacher's, instead of full copies: the memory that lets a ViT-L or
larger train where DDP runs out. Each transformer block (or CNN stage), the head and the whole
network are sharded as units; a unit's parameters are all-gathered for its forward and backward
and resharded after, and gradients are reduce-scattered (averaged over processes, as DDP does).

DINO's extras work on the shards because the student and the teacher are sharded the same way:
- the EMA update is elementwise, so each process updates its teacher shard from its student
  shard (``local_tensor``);
- per-tensor gradient clipping needs each tensor's full norm: each process takes the norms of its
  shards and one all-reduce of their squares gives the full norms (``combine_shard_norms``);
- checkpoints hold full tensors (``gather``; the main process writes them), in the same format
  as a one-process or DDP run, so any run resumes under any of the three (``load_full_state``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


def shard_units(network: nn.Module) -> list[nn.Module]:
    """The modules sharded on their own, inner first: each block of a ViT (timm's ``blocks``)
    or each stage of a CNN (``stages``, or ResNet's ``layer1``-``layer4``), then each of the
    network's other parts (DINO's head; BYOL's projector and predictor). The network itself,
    sharded last, holds what is left (embeddings, final norm, stem, a mask token)."""
    backbone, units = network.backbone, []
    for name in ("blocks", "stages", "layers"):
        if isinstance(getattr(backbone, name, None), nn.Sequential | nn.ModuleList):
            units += list(getattr(backbone, name))
            break
    else:
        units += [getattr(backbone, f"layer{index}") for index in range(1, 5)
                  if hasattr(backbone, f"layer{index}")]
    units += [part for name, part in network.named_children() if name != "backbone"]
    return [unit for unit in units if any(True for _ in unit.parameters())]


def shard(network: nn.Module, trains: bool) -> None:
    """Shard ``network`` (an objective's student or teacher) in place over all processes. Call
    it on the student and on the teacher alike, so that their shards line up tensor for tensor.

    ``trains``: the student, whose root unit may keep its parameters gathered from its forward
    to its backward (one all-gather fewer per step). The teacher has no backward to reshard it,
    so its root reshards after the forward: a gathered copy kept would miss the EMA updates.
    """
    for unit in shard_units(network):
        fully_shard(unit)
    fully_shard(network, reshard_after_forward=not trains)


def broadcast_from_main(network: nn.Module) -> None:
    """Give every process the main process's parameters and buffers (what DDP does when it
    wraps a module): each process seeded its own initialisation (train.seed + rank)."""
    for tensor in network.state_dict().values():
        dist.broadcast(tensor, src=0)  # a collective


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def set_gradient_sync(module: nn.Module, enabled: bool) -> None:
    """FSDP's counterpart of DDP's no_sync: with accumulation, reduce-scatter the gradients only
    after the last micro-batch."""
    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(enabled)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor (a view: in-place updates reach the parameter);
    any other tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def combine_shard_norms(norms: list[torch.Tensor]) -> list[torch.Tensor]:
    """The norms of P shards of each tensor -> each tensor's full norm: sqrt of the sum of
    squares, in one all-reduce (a collective, no host sync)."""
    if not norms:
        return norms
    squares = torch.stack(norms).float().square()
    dist.all_reduce(squares)
    return list(squares.sqrt().unbind())


def gather(value: Any, keep: bool) -> Any:
    """A state dict (nested dicts and lists) with every sharded tensor made full, on the CPU.

    A collective: every process calls it with the same structure. Only processes with ``keep``
    hold on to the full tensors (the others get None in their place), so that P processes do not
    all hold a full copy of a model that needed sharding.
    """
    if isinstance(value, dict):
        return {key: gather(item, keep) for key, item in value.items()}
    if isinstance(value, list):
        return [gather(item, keep) for item in value]
    if isinstance(value, DTensor):
        full = value.full_tensor()  # all-gather
        return full.cpu() if keep else None
    if isinstance(value, torch.Tensor) and keep:
        return value.detach().cpu()
    return value if keep else None


def _sharded_like(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """A full tensor, sharded as ``reference`` is (a collective: a scatter from the main process,
    which holds the same checkpoint as every other)."""
    if not isinstance(reference, DTensor):
        return value
    full = value.to(device=reference.device, dtype=reference.dtype)
    return distribute_tensor(full, reference.device_mesh, reference.placements)


def load_full_state(module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (as ``gather`` makes) into a sharded module."""
    live = module.state_dict()
    module.load_state_dict({key: _sharded_like(value, live[key]) if key in live else value
                            for key, value in saved.items()})


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load a full optimizer state dict (``torch.optim`` layout: state keyed by the parameter's
    position over all groups) into an optimizer over sharded parameters: each state tensor with
    its parameter's shape (AdamW's moments) is sharded like the parameter."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    state = {
        index: {name: _sharded_like(value, parameters[index])
                if isinstance(value, torch.Tensor) and value.shape == parameters[index].shape
                else value for name, value in entries.items()}
        for index, entries in saved["state"].items()
    }
    optimizer.load_state_dict({**saved, "state": state})
