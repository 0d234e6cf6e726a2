"""The KoLeo regulariser: spread one group of features by pushing each from its nearest neighbour.

Sablayrolles et al. (2019), "Spreading vectors for similarity search", used by DINOv2 (Oquab et
al., 2023, Section 4) on the student's CLS token after the final norm, one group per global crop:

    L = -1/n * sum_i log(d_i + eps),   d_i = || x_i - x_j(i) + eps ||,
    j(i) = argmax_{j != i} <x_i, x_j>  over L2-normalised features,

with eps = 1e-8 and ``d_i`` computed as ``nn.PairwiseDistance(2, eps=1e-8)`` does (the eps is
added to the difference). The neighbour index is not differentiated; the distance is.

Where this departs from DINOv2: DINOv2 searches neighbours among the samples of one GPU, so its
loss depends on how the batch is split (and a GPU with one sample has no neighbour at all). Here,
as in DINOv3's ``KoLeoLossDistributed`` (with its default group of the whole global batch), the
normalised features are all-gathered and every sample's neighbour is searched among all samples
of all processes. The gather is autograd-aware, so a neighbour's gradient flows back to the
process that owns it; with DDP's gradient averaging, W processes of n / W samples then give
exactly the loss (averaged over processes) and the gradients of one process of n samples.
"""

from __future__ import annotations

import torch
import torch.distributed.nn.functional as distributed_autograd
from torch.nn import functional as F

from dinolab.distributed import rank, world_size

EPSILON = 1e-8


def koleo_loss(features: torch.Tensor) -> torch.Tensor:
    """features: [n, D], one group on this process (every process holds the same n) -> scalar.

    The mean over this process's n samples of -log(distance to the nearest neighbour among all
    processes' samples). Computed in fp32 with autocast off: DINOv2 only disables autocast, which
    leaves fp16 features in fp16, where eps = 1e-8 rounds to 0 and a duplicate gives log 0 = -inf
    (dinov2 issues #143, #492). Collective under torch.distributed (an all-gather in the forward,
    an all-to-all in the backward): every process calls it at the same step.

    Raises ValueError when the group (over all processes) holds fewer than 2 samples: a sample's
    only candidate would be itself, a constant loss of -log(eps * (sqrt(D) + 1)) with no gradient.
    """
    processes = world_size()
    local_count = features.shape[0]
    if local_count * processes < 2:
        raise ValueError(f"KoLeo needs at least 2 samples in the group, got "
                         f"{local_count * processes}")
    with torch.autocast(features.device.type, enabled=False):
        normalised = F.normalize(features.float(), p=2.0, dim=-1, eps=EPSILON)
        if processes > 1:
            # Collective: the backward sums each rank's gradient into the owner's slice.
            candidates = torch.cat(distributed_autograd.all_gather(normalised), dim=0)
        else:
            candidates = normalised
        own_rows = rank() * local_count + torch.arange(local_count, device=features.device)
        with torch.no_grad():
            similarity = normalised @ candidates.T  # [n, W * n]
            similarity[torch.arange(local_count, device=features.device), own_rows] = -torch.inf
            neighbour = similarity.argmax(dim=1)  # [n]
        distance = F.pairwise_distance(normalised, candidates[neighbour], p=2.0, eps=EPSILON)
        return -torch.log(distance + EPSILON).mean()
