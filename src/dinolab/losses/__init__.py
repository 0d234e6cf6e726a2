"""The DINO loss and its centering."""

from dinolab.losses.dino import DINOLoss, batch_center

__all__ = ["DINOLoss", "batch_center"]
