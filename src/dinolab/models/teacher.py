"""The EMA teacher (Caron et al., 2021, Sec. 3.1).

The teacher has the student's architecture without stochastic depth, starts from the student's
weights, never receives gradients, and after every optimizer step moves towards the student:
teacher <- m * teacher + (1 - m) * student, over parameters only (buffers are not averaged).
"""

from __future__ import annotations

import torch
from torch import nn


def copy_student_into_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """The teacher's parameters and buffers from the student's of the same names (a student may
    have parts the teacher lacks: BYOL's predictor, DINOv2's mask token)."""
    weights = student.state_dict()
    teacher.load_state_dict({name: weights[name] for name in teacher.state_dict()})
    for parameter in teacher.parameters():
        parameter.requires_grad = False


@torch.no_grad()
def ema_update(teacher_params: list[torch.Tensor], student_params: list[torch.Tensor],
               momentum: float) -> None:
    """One EMA step as two foreach kernels (no Python loop over tensors, no host sync)."""
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)
