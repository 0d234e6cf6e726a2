"""One optimisation step over an accumulated batch, for any objective (dinolab/methods).

For each micro-batch: the objective's forward (teacher without grad, student, loss) -> backward;
then clip -> optimizer step -> EMA -> the objective's update (DINO's center), once. Mixed
precision and the gradient sync of DDP or FSDP are the only extras. The returned loss stays on
the device: reading it is a host sync, which the loop does only at log steps.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

from dinolab.distributed import rank, world_size
from dinolab.distributed.fsdp import set_gradient_sync
from dinolab.methods import StepValues, batch_position
from dinolab.models.teacher import ema_update
from dinolab.training.optim import (
    all_finite,
    clip_gradients_per_tensor,
    drop_last_layer_gradients,
    gradient_norms,
    set_hyperparameters,
)
from dinolab.training.state import TrainingState

__all__ = ["StepValues", "train_step"]


def _grad_sync(state: TrainingState, enabled: bool) -> contextlib.AbstractContextManager:
    """Average the gradients over processes only after the last micro-batch."""
    set_gradient_sync(state.student, enabled)  # FSDP; a no-op otherwise
    if enabled or not isinstance(state.student, DistributedDataParallel):
        return contextlib.nullcontext()
    return state.student.no_sync()


def train_step(state: TrainingState, micro_batches: list[list[torch.Tensor]],
               values: StepValues) -> torch.Tensor:
    """micro_batches: A lists of V views [b, C, H, W] (2 global first) -> mean loss (device).

    The mean of each loss term is left in ``state.terms``."""
    student, teacher, objective = state.student, state.teacher, state.objective
    optimizer, scaler = state.optimizer, state.scaler
    freeze_by_lr = state.config.optim.freeze_last_layer_by == "lr"
    set_hyperparameters(optimizer, values.lr, values.weight_decay,
                        values.freeze_last_layer and freeze_by_lr)
    num_micro = len(micro_batches)
    autocast = torch.autocast(state.device.type, dtype=state.autocast_dtype or torch.float32,
                              enabled=state.autocast_dtype is not None)
    total_loss = torch.zeros((), device=state.device)
    sums: dict[str, torch.Tensor] = {}  # the terms' and the statistics' sums over micro-batches
    for index, views in enumerate(micro_batches):
        views = [view.to(state.device, non_blocking=True) for view in views]
        position = batch_position(state.step, state.config.train.batch_size, len(views[0]),
                                  index, rank(), world_size())
        with _grad_sync(state, index == num_micro - 1), autocast:
            output = objective.forward(student, teacher, views, position, values)
            scaled = output.loss / num_micro
            (scaler.scale(scaled) if scaler else scaled).backward()
        for name, value in (output.statistics | output.terms).items():
            sums[name] = sums.get(name, torch.zeros((), device=state.device)) + value
        total_loss += output.loss.detach()

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
    if values.freeze_last_layer and not freeze_by_lr:
        drop_last_layer_gradients(state.student_module)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema_update(state.teacher_shards, state.ema_student_shards, values.teacher_momentum)
    means = {name: value / num_micro for name, value in sums.items()}
    objective.update({name: means[name] for name in output.statistics})  # may be a collective
    state.terms = {name: means[name] for name in output.terms}
    state.step += 1
    return total_loss / num_micro
