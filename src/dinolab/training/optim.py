"""AdamW with DINO's parameter groups, per-tensor gradient clipping and the frozen last layer.

Biases and all 1-D parameters (norm weights, the prototype layer's weight-norm magnitude) and
whatever the backbone lists in ``no_weight_decay()`` (position embedding, [CLS] token) get no
weight decay; the other group follows the weight-decay schedule.
"""

from __future__ import annotations

import torch
from torch import nn

from dinolab.distributed.fsdp import combine_shard_norms, local_tensor


def parameter_groups(model: nn.Module, last_layer_apart: bool = False,
                     lr_scales: dict[str, float] | None = None) -> list[dict]:
    """[decay, no decay]; ``last_layer_apart`` (optim.freeze_last_layer_by=lr) adds the
    prototype layers' parameters as groups of their own, whose learning rate the freeze sets
    to 0 (DINOv2's way; DINO drops their gradients instead). ``lr_scales`` (an objective's
    ``lr_scales()``: parameter-name prefix -> multiplier) puts the parameters under a prefix in
    groups of their own, after the others, whose learning rate is the schedule's times the
    multiplier (BYOL's predictor)."""
    skip: set[str] = set()
    backbone = getattr(model, "backbone", None)
    if backbone is not None and hasattr(backbone, "no_weight_decay"):
        skip = {f"backbone.{name}" for name in backbone.no_weight_decay()}
    scales = {prefix: scale for prefix, scale in (lr_scales or {}).items() if scale != 1.0}
    groups: dict[tuple[bool, bool, float], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        decays = not (parameter.ndim <= 1 or name.endswith(".bias") or name in skip)
        last_layer = last_layer_apart and "last_layer" in name
        scale = next((scales[prefix] for prefix in scales if name.startswith(prefix)), 1.0)
        groups.setdefault((decays, last_layer, scale), []).append(parameter)
    keys = [(decays, last_layer, 1.0) for last_layer in (False, True) for decays in (True, False)
            if not last_layer or (decays, last_layer, 1.0) in groups]
    keys += sorted(key for key in groups if key[2] != 1.0)
    return [{"params": groups.get(key, []), "apply_weight_decay": key[0], "last_layer": key[1],
             **({} if key[2] == 1.0 else {"lr_scale": key[2]}),
             **({} if key[0] else {"weight_decay": 0.0})} for key in keys]


def build_optimizer(model: nn.Module, betas: tuple[float, float], device: torch.device,
                    last_layer_apart: bool = False,
                    lr_scales: dict[str, float] | None = None) -> torch.optim.AdamW:
    """Fused AdamW on CUDA, the foreach implementation elsewhere (both avoid a per-tensor loop)."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(parameter_groups(model, last_layer_apart, lr_scales), lr=0.0,
                             betas=betas, fused=fused, foreach=None if fused else True)


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float,
                        freeze_last_layer: bool = False) -> None:
    """``freeze_last_layer`` sets the prototype layers' groups (if apart) to a learning rate 0;
    a group with an ``lr_scale`` gets ``lr`` times it."""
    for group in optimizer.param_groups:
        frozen = freeze_last_layer and group.get("last_layer")
        group["lr"] = 0.0 if frozen else lr * group.get("lr_scale", 1.0)
        if group["apply_weight_decay"]:
            group["weight_decay"] = weight_decay


def _gradients(parameters: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each parameter's gradient, or this process's shard of it when sharded (FSDP)."""
    return [local_tensor(p.grad) for p in parameters if p.grad is not None]


@torch.no_grad()
def gradient_norms(parameters: list[torch.Tensor], sharded: bool = False) -> list[torch.Tensor]:
    """The norm of each gradient tensor (foreach kernels on the device: no host sync). Sharded:
    the full tensors' norms, from one all-reduce of the shards' (a collective)."""
    grads = _gradients(parameters)
    norms = list(torch._foreach_norm(grads)) if grads else []
    return combine_shard_norms(norms) if sharded else norms


@torch.no_grad()
def clip_gradients_per_tensor(parameters: list[torch.Tensor], max_norm: float,
                              sharded: bool = False) -> list[torch.Tensor]:
    """Scale each gradient tensor whose norm exceeds ``max_norm`` (the reference's clipping)
    -> the norms before clipping, which the step also checks for NaN and inf.

    Done with foreach kernels on the device: no host sync. Sharded (FSDP), each process scales
    its shards by the full tensor's norm.
    """
    grads = _gradients(parameters)
    norms = gradient_norms(parameters, sharded)
    if grads:  # the scales of all tensors at once: 3 kernels, not 3 per tensor
        scales = (max_norm / (torch.stack(norms) + 1e-6)).clamp_(max=1.0)
        torch._foreach_mul_(grads, scales.unbind())
    return norms


def all_finite(norms: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Whether every norm is finite: a device bool (reading it is a host sync)."""
    if not norms:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.isfinite(torch.stack(norms)).all()


def drop_last_layer_gradients(model: nn.Module) -> None:
    """Freeze the prototype layer: dropping its gradients leaves AdamW's state untouched too."""
    for name, parameter in model.named_parameters():
        if "last_layer" in name:
            parameter.grad = None
