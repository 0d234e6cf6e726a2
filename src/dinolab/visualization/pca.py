"""Patch features as colours: the PCA picture of the DINOv2 paper (Oquab et al., 2023, Fig. 1).

The patch features of all given images are pooled and a first PCA is fitted on them; its first
component separates the object from the background. The patches on the foreground side get a
second PCA, and its first three components, min-max scaled over all images together, become
red, green and blue: parts that the network sees as alike get the same colour across images.

The sign of a principal component is arbitrary; the paper picks the foreground side by hand.
Here the side holding the image border is taken as background (objects tend to sit inside the
frame, and the border is mostly background): scores are oriented so that border patches score
below the mean, and a patch is foreground when its score is above ``threshold`` (0, the mean).

Patch features come from timm's ``forward_intermediates`` (the last block, final-normed for
ViTs; the last stage's map for CNNs), so every backbone with that API works.

Shapes: B images, h x w patch grid (or feature map), D feature width.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from dinolab.config import Config, ConfigError
from dinolab.evaluation.embedding import principal_components
from dinolab.visualization import images as inputs
from dinolab.visualization.rendering import grid, overlay, save_png, upsample


@torch.no_grad()
def patch_features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """images [B, 3, S_h, S_w] -> the last block's (or stage's) features [B, h, w, D]."""
    forward_intermediates = getattr(backbone, "forward_intermediates", None)
    if forward_intermediates is None:
        raise ConfigError(f"{type(backbone).__name__} has no forward_intermediates in timm: its "
                          "patch features cannot be read")
    maps = forward_intermediates(images, indices=1, norm=True, output_fmt="NCHW",
                                 intermediates_only=True)
    return maps[-1].float().permute(0, 2, 3, 1)


def _border(height: int, width: int) -> torch.Tensor:
    """bool [h, w]: the outermost ring of patches (every patch when the grid is 2 wide or less)."""
    border = torch.ones(height, width, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    return border


def foreground_mask(features: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """features [B, h, w, D] -> bool [B, h, w]: the patches off the border's side of the first
    principal component (fitted on all images together)."""
    scores = principal_components(features.flatten(0, 2), 1).reshape(features.shape[:3])
    # scores [B, h, w] have mean 0 over all patches
    if scores[:, _border(*scores.shape[1:])].mean() > 0:
        scores = -scores
    return scores > threshold


def pca_colours(features: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """features [B, h, w, D], foreground bool [B, h, w] -> RGB in [0, 1] [B, h, w, 3].

    The second PCA sees foreground patches only; background patches are black. Each component
    is min-max scaled over all images together, so colours compare across images.
    """
    colours = torch.zeros(*features.shape[:3], 3)
    selected = features[foreground]  # [F, D]
    if len(selected) == 0:
        return colours
    projected = principal_components(selected, 3)  # [F, 3]
    low, high = projected.min(dim=0).values, projected.max(dim=0).values
    scaled = (projected - low) / (high - low).clamp_min(1e-12)
    colours[foreground] = torch.nn.functional.pad(scaled, (0, 3 - scaled.shape[1]))
    return colours


def write_feature_maps(backbone: nn.Module, config: Config | None, paths: Sequence[str | Path],
                       out_dir: Path, size: int | None = None,
                       remove_background: bool = True) -> list[Path]:
    """The ``dinolab features`` command: NAME_features.png per image and features_grid.png (one
    row per image: input, PCA colours, the foreground mask). -> the files written."""
    transform = inputs.input_transform(backbone, config, size)
    batch = inputs.prepare(inputs.read_images(paths), transform)
    features = patch_features(backbone.eval(), batch)
    foreground = (foreground_mask(features) if remove_background
                  else torch.ones(features.shape[:3], dtype=torch.bool))
    colours = pca_colours(features, foreground)
    written, rows = [], []
    for name, image, image_colours, image_foreground in zip(
            inputs.output_names(paths), batch, colours, foreground, strict=True):
        picture = inputs.to_picture(image, transform)
        height, width = picture.shape[:2]
        rgb = upsample(image_colours.permute(2, 0, 1), height, width).permute(1, 2, 0)
        coloured = (rgb * 255).round().byte().numpy()
        mask = upsample(image_foreground, height, width).bool().numpy()
        written.append(save_png(coloured, out_dir / f"{name}_features.png"))
        rows.append([picture, coloured, overlay(picture, picture, mask)])
    written.append(save_png(grid(rows), out_dir / "features_grid.png"))
    return written
