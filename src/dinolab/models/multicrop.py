"""Backbone + head over a list of views, one backbone call per resolution.

DINO's efficient forward (Caron et al., 2021, Algorithm 1 and the reference script): consecutive
views of the same size are concatenated on the batch axis and go through the backbone together
(the 2 global views, then all local views), and the head runs once on every feature. The output
is view-major: rows [view 0 of the batch; view 1 of the batch; ...].
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from dinolab.models.head import DINOHead


def resolution_groups(views: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Split views into runs of consecutive views with the same spatial size."""
    return [list(group) for _, group in itertools.groupby(views, key=lambda v: v.shape[-2:])]


class MultiCropNetwork(nn.Module):
    def __init__(self, backbone: nn.Module, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        """views: V tensors [B, C, H_v, W_v] -> logits [V * B, K], view-major."""
        features = [self.backbone(torch.cat(group)) for group in resolution_groups(views)]
        return self.head(torch.cat(features))
