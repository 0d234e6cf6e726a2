"""Schedules as pure functions of the global step (Caron et al., 2021, Sec. 5 / Appendix).

``RunLength`` holds the derived step counts; every other value is computed from a step, never
stored. The learning rate warms up linearly from 0 and then follows a cosine to min_lr; weight
decay follows a cosine from its start to its end value; the teacher momentum a cosine from
m_0 to 1; the teacher temperature warms up linearly per epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dinolab.config import Config


@dataclass(frozen=True)
class RunLength:
    steps_per_epoch: int
    epochs: int

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine from ``start`` (step 0) to exactly ``end`` (step total_steps - 1)."""
    if total_steps <= 1:
        return end
    progress = min(step, total_steps - 1) / (total_steps - 1)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak: float, end: float) -> float:
    """Linear 0 -> peak over ``warmup_steps``, then a cosine peak -> end over the rest."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak, end)


def peak_lr(config: Config) -> float:
    """The linear scaling rule: lr * total batch / 256."""
    return config.optim.lr * config.train.batch_size / 256


def learning_rate(config: Config, length: RunLength, step: int) -> float:
    warmup_steps = round(config.optim.warmup_epochs * length.steps_per_epoch)
    warmup_steps = min(warmup_steps, length.total_steps)
    return warmup_cosine(step, length.total_steps, warmup_steps, peak_lr(config),
                         config.optim.min_lr)


def weight_decay(config: Config, length: RunLength, step: int) -> float:
    optim = config.optim
    return cosine(step, length.total_steps, optim.weight_decay, optim.weight_decay_end)


def teacher_momentum(config: Config, length: RunLength, step: int) -> float:
    optim = config.optim
    return cosine(step, length.total_steps, optim.teacher_momentum, optim.teacher_momentum_end)


def teacher_temperature(config: Config, epoch: int) -> float:
    """Linear from warmup_teacher_temp (epoch 0) to teacher_temp (last warm-up epoch)."""
    loss = config.loss
    if epoch < loss.warmup_teacher_temp_epochs:
        fraction = epoch / max(loss.warmup_teacher_temp_epochs - 1, 1)
        return loss.warmup_teacher_temp + fraction * (loss.teacher_temp - loss.warmup_teacher_temp)
    return loss.teacher_temp


def last_layer_frozen(config: Config, length: RunLength, step: int) -> bool:
    return step < config.optim.freeze_last_layer_epochs * length.steps_per_epoch
