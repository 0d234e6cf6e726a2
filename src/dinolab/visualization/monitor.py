"""Attention maps in TensorBoard and W&B while a run trains.

At each k-NN evaluation the teacher's last-block attention on a few fixed images is logged, so
the emergence of object masks (Caron et al., 2021, Fig. 1) can be watched epoch by epoch. The
images are a fixed random few of the k-NN test split (the training images when the data has no
labels), always the same ones. It costs one forward pass of a handful of images, on the main
process only, and nothing when TensorBoard and W&B are off or the backbone has no [CLS]
attention.
"""

from __future__ import annotations

import torch
from torch import nn

from dinolab.config import ConfigError
from dinolab.data.datasets import Sources
from dinolab.data.transforms import EvalTransform
from dinolab.evaluation.features import fixed_subset
from dinolab.training.monitor import Metrics
from dinolab.visualization import images as inputs
from dinolab.visualization.attention import (
    DEFAULT_THRESHOLD,
    check_attention_backbone,
    cls_attention,
    map_pictures,
    summary_row,
)
from dinolab.visualization.rendering import grid

MONITOR_IMAGES = 4
TAG = "attention"


def monitor_images(sources: Sources, count: int = MONITOR_IMAGES) -> list:
    """The same few PIL images every time: a fixed subset of the k-NN test (or train) images."""
    dataset = sources.knn_test if sources.knn_test is not None else sources.train
    subset = fixed_subset(dataset, count)
    return [subset[index][0] for index in range(min(count, len(subset)))]  # type: ignore[arg-type]


@torch.no_grad()
def log_attention_maps(metrics: Metrics, backbone: nn.Module, sources: Sources,
                       transform: EvalTransform, step: int) -> None:
    """Image ``attention`` in TensorBoard and W&B: one row per image (input, mean map, mean
    overlay with the 60% mask, each head's map); a no-op when neither is on or without [CLS]
    attention."""
    if not metrics.takes_images:
        return
    try:
        check_attention_backbone(backbone)
    except ConfigError:  # a CNN: there is no [CLS] attention to show
        return
    device = next(backbone.parameters()).device
    batch = inputs.prepare(monitor_images(sources), transform)
    was_training = backbone.training
    maps = cls_attention(backbone.eval(), batch.to(device)).cpu()
    backbone.train(was_training)
    rows = []
    for image, image_maps in zip(batch, maps, strict=True):
        picture = inputs.to_picture(image, transform)
        rows.append(summary_row(picture, map_pictures(picture, image_maps, DEFAULT_THRESHOLD)))
    metrics.log_images(TAG, step, grid(rows)[None])
