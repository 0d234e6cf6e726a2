"""Sinkhorn-Knopp teacher normalisation: DINOv2's alternative to centring the teacher.

DINOv2 (Oquab et al., 2023, Section 4), following Ruan et al. (2023), replaces the EMA centre by
the Sinkhorn-Knopp batch normalisation of SwAV (Caron et al., 2020) with 3 iterations. The
exponentiated logits Q = exp(T / tau_t), read as a [K, B] matrix, are scaled alternately so
that every prototype receives 1 / K of the batch's mass and every sample 1 / B; at the end each
sample's column is rescaled to sum to 1. That is ``sinkhorn_knopp_teacher`` in
dinov2/loss/dino_clstoken_loss.py (and lightly's ``swav_loss.sinkhorn`` with epsilon = tau_t).

Two departures, neither of which changes the exact result:
- The logits are shifted by their maximum over all processes before the exp. DINOv2 does not
  shift, and exp(T / tau_t) overflows fp32 once a logit exceeds 88 * tau_t (3.5 at tau_t = 0.04;
  DINOv2's head has a trainable weight-norm gain, so logits are not bounded by 1). The shift is
  a common factor of Q and cancels in the first normalisation. What remains is underflow: a
  sample or prototype whose logits all lie more than about 87 * tau_t below the maximum gets
  a zero column or row, as it would without the shift, and the result is NaN.
- The global batch B is all-reduced only where there is a process group; DINOv2's
  unconditional ``dist.all_reduce(B)`` fails in a single process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dinolab.distributed import world_size


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float,
                   iterations: int = 3) -> torch.Tensor:
    """teacher_logits: [B_local, K] -> teacher probabilities [B_local, K], rows summing to 1.

    The prototype balance is computed over the global batch: the total mass, the prototype sums
    and the batch size are summed over processes, so W processes of B / W samples give the rows
    of one process of B samples (Darcet, facebookresearch/capi#12: only the total batch size
    matters). Collective (3 + iterations all-reduces): every process calls it at the same step.
    In fp32 with autocast off; no gradient.
    """
    distributed = world_size() > 1
    with torch.autocast(teacher_logits.device.type, enabled=False):
        logits = teacher_logits.float()
        # a process may have no rows (no masked patch in its micro-batch): it still joins in
        maximum = logits.max() if logits.numel() else logits.new_full((), -torch.inf)
        if distributed:
            dist.all_reduce(maximum, op=dist.ReduceOp.MAX)  # collective
        masses = torch.exp((logits - maximum) / teacher_temp).T  # [K, B_local]
        num_prototypes = masses.shape[0]
        batch = torch.tensor(float(masses.shape[1]), device=masses.device)
        total = masses.sum()
        if distributed:
            dist.all_reduce(batch)  # collective
            dist.all_reduce(total)  # collective
        masses /= total
        for _ in range(iterations):
            prototype_mass = masses.sum(dim=1, keepdim=True)  # [K, 1]
            if distributed:
                dist.all_reduce(prototype_mass)  # collective
            masses /= prototype_mass
            masses /= num_prototypes
            masses /= masses.sum(dim=0, keepdim=True)  # each sample's column: local
            masses /= batch
        masses *= batch
        return masses.T
