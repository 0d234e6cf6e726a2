"""The DINO loss: cross-entropy between sharpened, centred teacher outputs and student outputs.

Caron et al. (2021), Eq. 1-4: for every teacher global view i and every student view v != i,
H(P_t(i), P_s(v)) averaged over the batch; the total is divided by the number of pairs
(2 * V - 2 for V student views). The teacher probabilities are
softmax((t - center) / tau_t) and carry no gradient; the student's are softmax(s / tau_s).

The center is an EMA over raw teacher logits of the batch mean over both global views and all
processes. It is training state (a buffer, so it is checkpointed) and is updated after the loss,
by ``update_center``, once per optimizer step: with gradient accumulation the batch mean is
taken over the whole accumulated batch, so k micro-batches of B equal one batch of k * B.

``centering="sinkhorn"`` replaces the centred softmax by Sinkhorn-Knopp over the global batch
(DINOv2 Sec. 4, losses/sinkhorn.py); the center is then neither read nor updated.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dinolab.distributed import all_reduce_mean
from dinolab.losses.sinkhorn import sinkhorn_knopp


class DINOLoss(nn.Module):
    center: torch.Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "mean"):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.register_buffer("center", torch.zeros(1, out_dim))
        # Mean entropy of the teacher's distribution in the last forward (device tensor, for the
        # collapse monitor: near 0 = one prototype dominates, near ln K = uniform output).
        self.teacher_entropy = torch.zeros(())

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                teacher_temp: float) -> torch.Tensor:
        """student_logits: [V * B, K]; teacher_logits: [2 * B, K], both view-major -> scalar.

        Computed in fp32 even under autocast: the softmaxes and the pair reduction over K
        classes lose too much in bf16 (the loss itself would be rounded to 8 mantissa bits).
        """
        with torch.autocast(student_logits.device.type, enabled=False):
            return self._loss(student_logits.float(), teacher_logits.float(), teacher_temp)

    def _loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              teacher_temp: float) -> torch.Tensor:
        num_teacher_views = 2
        batch = teacher_logits.shape[0] // num_teacher_views
        num_student_views = student_logits.shape[0] // batch
        student_log_probs = F.log_softmax(student_logits / self.student_temp, dim=-1)
        teacher_probs = self.teacher_probabilities(teacher_logits, teacher_temp)
        student_log_probs = student_log_probs.view(num_student_views, batch, -1)
        teacher_probs = teacher_probs.detach().view(num_teacher_views, batch, -1)
        self.teacher_entropy = torch.special.entr(teacher_probs).sum(-1).mean()
        # cross[i, v] = mean over the batch of H(P_t(i), P_s(v)); one [T, V] matmul-like reduction
        cross = -torch.einsum("tbk,vbk->tv", teacher_probs, student_log_probs) / batch
        same_view = torch.eye(num_teacher_views, num_student_views, dtype=torch.bool,
                              device=cross.device)
        num_pairs = num_teacher_views * num_student_views - num_teacher_views
        return cross.masked_fill(same_view, 0.0).sum() / num_pairs

    def teacher_probabilities(self, teacher_logits: torch.Tensor, teacher_temp: float,
                              center: torch.Tensor | None = None) -> torch.Tensor:
        """[N, K] raw teacher logits -> the teacher's targets [N, K] (centred and sharpened);
        ``center``: another centre than this loss's own (DINOv2's patch targets)."""
        if self.centering == "sinkhorn":
            return sinkhorn_knopp(teacher_logits, teacher_temp)  # collectives: sums over all
        center = self.center if center is None else center
        return F.softmax((teacher_logits - center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, batch_center: torch.Tensor) -> None:
        """batch_center: [1, K], the mean raw teacher logit of this process's batch.

        Collective: all-reduces over processes, so every rank calls it at the same step.
        """
        if self.centering == "sinkhorn":
            return
        all_reduce_mean(batch_center)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


def batch_center(teacher_logits: torch.Tensor) -> torch.Tensor:
    """[2 * B, K] -> [1, K]: the mean over both global views and the batch."""
    return teacher_logits.float().mean(dim=0, keepdim=True)
