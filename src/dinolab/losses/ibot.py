"""The iBOT masked-patch loss: the student predicts the teacher's output at the patches it missed.

iBOT (Zhou et al., 2022) as DINOv2 uses it (Oquab et al., 2023; ``iBOTPatchLoss.forward_masked``
in dinov2/loss/ibot_patch_loss.py): for every masked patch token m of a student global view, the
cross-entropy between the teacher's probabilities at that (visible, for the teacher) patch and the
student's softmax(s_m / tau_s). Each token is weighted by 1 / (masked tokens of its view), so every
masked view contributes the mean over its tokens, and the sum is divided by the number of student
global views (2B), the unmasked ones included:

    L = 1 / (2B) * sum_m w_m * H(p_t[m], softmax(s[m] / tau_s)),   w_m = 1 / n_masked(view(m)).

With half of the views masked the loss is therefore about half the per-masked-view mean. The
teacher probabilities come in finished (centred and sharpened, or from Sinkhorn-Knopp), so this
module holds no state.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def ibot_patch_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                    weights: torch.Tensor, num_images: int, student_temp: float) -> torch.Tensor:
    """student_logits: [M, K], teacher_probs: [M, K], weights: [M] -> scalar.

    M counts the masked patch tokens of all masked views in this micro-batch, in the order of
    ``masked_weights``; ``num_images`` is the number of student global views (2B), masked or not,
    as DINOv2 divides by the mask's rows. The teacher probabilities are detached. In fp32 with
    autocast off, as the DINO loss: a log-softmax over K prototypes in bf16 loses too much.
    """
    with torch.autocast(student_logits.device.type, enabled=False):
        student_log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)
        cross_entropy = -(teacher_probs.detach().float() * student_log_probs).sum(dim=-1)  # [M]
        return (cross_entropy * weights.float()).sum() / num_images


def masked_weights(masks: torch.Tensor) -> torch.Tensor:
    """masks: [N, H, W] or [N, L] bool -> [M] float weights of the masked tokens, row-major.

    The token of view n gets 1 / (masked tokens of view n): the order is that of
    ``tokens[masks]`` for tokens [N, H, W, ...] or [N, L, ...], so it lines up with the masked
    tokens as they are selected from the backbone's output.
    """
    flat = masks.flatten(start_dim=1)  # [N, L]
    per_view = flat.sum(dim=1, keepdim=True).clamp(min=1).float()  # [N, 1]
    return (1.0 / per_view).expand(flat.shape)[flat]
