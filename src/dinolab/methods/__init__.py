"""Objectives, one file each, chosen by the config's ``method`` (docs/methods.md)."""

from __future__ import annotations

from dinolab.config import Config, require_resolved
from dinolab.methods.base import (
    BatchPosition,
    Objective,
    StepOutput,
    StepValues,
    backbone_of,
    batch_position,
)
from dinolab.methods.byol import BYOL
from dinolab.methods.dino import DINO
from dinolab.methods.dinov2 import DINOv2

OBJECTIVES: dict[str, type[Objective]] = {"dino": DINO, "dinov2": DINOv2, "byol": BYOL}


def build_objective(config: Config) -> Objective:
    """The configured objective; ``config`` must have its auto keys resolved (dinolab/auto.py:
    training resolves them from the data set's size before it builds anything)."""
    require_resolved(config, ("model.head.out_dim",))  # the head's shape
    return OBJECTIVES[config.method](config)


__all__ = ["OBJECTIVES", "BatchPosition", "Objective", "StepOutput", "StepValues",
           "backbone_of", "batch_position", "build_objective"]
