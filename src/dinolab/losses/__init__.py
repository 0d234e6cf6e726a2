"""The loss terms of the objectives: DINO's, and DINOv2's KoLeo, iBOT patch loss, block masks and
Sinkhorn-Knopp."""

from dinolab.losses.dino import DINOLoss, batch_center
from dinolab.losses.ibot import ibot_patch_loss, masked_weights
from dinolab.losses.koleo import koleo_loss
from dinolab.losses.masking import block_masks
from dinolab.losses.sinkhorn import sinkhorn_knopp

__all__ = ["DINOLoss", "batch_center", "block_masks", "ibot_patch_loss", "koleo_loss",
           "masked_weights", "sinkhorn_knopp"]
