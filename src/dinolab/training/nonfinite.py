"""NaN and inf: caught at whatever step they appear, without a host sync at every step.

The reference script reads the loss at every iteration and stops at the first non-finite value;
that read is a host sync that drains the GPU's queue each step. Here every step folds
``isfinite(loss)`` and the finiteness of the gradient norms (which per-tensor clipping computes
anyway) into device tensors that keep the first bad step and its loss. The host reads them at
log steps and before every checkpoint: the run stops at most ``run.log_every_steps`` steps after
the first bad value, with that step and value in the message, and no checkpoint is ever written
from a state that went through a non-finite step. A last scan of the parameters and the center
before each save covers a finite step that still overflowed them (an absurd learning rate).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from dinolab.distributed import any_process

LEVERS = ("levers: train.precision=fp32 or bf16 (fp16 overflows), a lower optim.lr, a lower "
          "loss.teacher_temp (or a longer loss.warmup_teacher_temp_epochs), optim.clip_grad")


class NonFiniteLoss(RuntimeError):
    """The loss or the gradients became NaN or infinite; the run stops without a checkpoint."""


class FiniteWatch:
    """The first step whose loss or gradients were not finite, kept on the device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.loss_at_bad_step = torch.zeros((), device=device)

    def observe(self, step: int, loss: torch.Tensor, gradients_finite: torch.Tensor | None,
                ) -> None:
        """After optimizer step ``step``: a few scalar kernels, no host sync.
        ``gradients_finite`` None: not judged (fp16, where the scaler skips overflows)."""
        finite = torch.isfinite(loss)
        if gradients_finite is not None:
            finite = finite & gradients_finite
        bad = ~finite & (self.first_bad_step < 0)
        self.first_bad_step.masked_fill_(bad, step)
        self.loss_at_bad_step = torch.where(bad, loss.detach().float(), self.loss_at_bad_step)

    def check(self, last_good: Path | None) -> None:
        """Raise NonFiniteLoss on every process when a step on any process was not finite.

        A host sync (and under DDP one all-reduce): call it at log steps and before saving.
        """
        step = int(self.first_bad_step.item())  # host sync
        (anywhere,) = any_process([step >= 0], self.device)
        if not anywhere:
            return
        loss = self.loss_at_bad_step.item()
        if step < 0:
            what = "a non-finite loss or gradient on another process"
        elif math.isfinite(loss):  # the loss was fine: the backward pass overflowed
            what = f"gradients are not finite at step {step} (loss {loss:.4g})"
        else:
            what = f"loss is {loss} at step {step}"
        raise NonFiniteLoss(f"{what}; last good checkpoint: {last_good or 'none yet'}; {LEVERS}")


def state_is_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor holds only finite numbers (one foreach norm, one host sync)."""
    floating = [tensor.detach() for tensor in tensors if tensor.is_floating_point()]
    if not floating:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(floating))).all())
