"""One DINO optimisation step over an accumulated batch.

teacher forward (no grad) -> student forward -> loss -> backward, for each micro-batch; then
clip -> optimizer step -> EMA -> center update, once. Mixed precision and the gradient sync of
DDP or FSDP are the only extras. The returned loss stays on the device: reading it is a host
sync, which the loop does only at log steps.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

from dinolab.distributed.fsdp import set_gradient_sync
from dinolab.losses import batch_center
from dinolab.models.teacher import ema_update
from dinolab.training.optim import (
    all_finite,
    clip_gradients_per_tensor,
    drop_last_layer_gradients,
    gradient_norms,
    set_hyperparameters,
)
from dinolab.training.state import TrainingState


@dataclass(frozen=True)
class StepValues:
    """The scheduled values for one step (pure functions of the step; see schedules.py)."""

    lr: float
    weight_decay: float
    teacher_momentum: float
    teacher_temp: float
    freeze_last_layer: bool


def _grad_sync(state: TrainingState, enabled: bool) -> contextlib.AbstractContextManager:
    """Average the gradients over processes only after the last micro-batch."""
    set_gradient_sync(state.student, enabled)  # FSDP; a no-op otherwise
    if enabled or not isinstance(state.student, DistributedDataParallel):
        return contextlib.nullcontext()
    return state.student.no_sync()


def train_step(state: TrainingState, micro_batches: list[list[torch.Tensor]],
               values: StepValues) -> torch.Tensor:
    """micro_batches: A lists of V views [b, C, H, W] (2 global first) -> mean loss (device)."""
    student, teacher = state.student, state.teacher
    optimizer, scaler = state.optimizer, state.scaler
    set_hyperparameters(optimizer, values.lr, values.weight_decay)
    num_micro = len(micro_batches)
    autocast = torch.autocast(state.device.type, dtype=state.autocast_dtype or torch.float32,
                              enabled=state.autocast_dtype is not None)
    total_loss = torch.zeros((), device=state.device)
    center_sum = torch.zeros((), device=state.device)
    for index, views in enumerate(micro_batches):
        views = [view.to(state.device, non_blocking=True) for view in views]
        with _grad_sync(state, index == num_micro - 1), autocast:
            with torch.no_grad():
                teacher_logits = teacher(views[:2])
            student_logits = student(views)
            loss = state.loss(student_logits, teacher_logits, values.teacher_temp)
            scaled = loss / num_micro
            (scaler.scale(scaled) if scaler else scaled).backward()
        center_sum = center_sum + batch_center(teacher_logits)
        total_loss += loss.detach()

    if scaler:
        scaler.unscale_(optimizer)
    norms = None
    if state.config.optim.clip_grad > 0:
        norms = clip_gradients_per_tensor(state.student_parameters, state.config.optim.clip_grad,
                                          state.sharded)
    if scaler:  # fp16: an overflowing step is the scaler's to skip, not an error
        state.gradients_finite = None
    else:  # on the device; the loop reads it at log steps (training/nonfinite.py)
        state.gradients_finite = all_finite(
            norms if norms is not None else gradient_norms(state.student_parameters,
                                                           state.sharded),
            state.device)
    if values.freeze_last_layer:
        drop_last_layer_gradients(state.student_module)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema_update(state.teacher_shards, state.student_shards, values.teacher_momentum)
    state.loss.update_center(center_sum / num_micro)  # collective: all-reduce over processes
    state.step += 1
    return total_loss / num_micro
