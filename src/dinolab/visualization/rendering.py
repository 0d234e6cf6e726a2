"""Turning maps into pictures with Pillow alone: a colour map, overlays, grids, PNG files.

Pictures here are uint8 numpy arrays [H, W, 3]. Matplotlib is deliberately not used, so the
attention and feature commands work with the package's own dependencies.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

# Five anchor colours of matplotlib's perceptually uniform "viridis" map (dark violet -> yellow);
# linear interpolation between them is close enough for a heat map.
VIRIDIS_ANCHORS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)


def colorize(values: torch.Tensor) -> np.ndarray:
    """values [H, W] (any range) -> viridis picture [H, W, 3], min-max scaled per map."""
    array = values.detach().float().cpu().numpy()
    low, high = float(array.min()), float(array.max())
    scaled = (array - low) / (high - low) if high > low else np.zeros_like(array)
    positions = np.linspace(0.0, 1.0, len(VIRIDIS_ANCHORS))
    channels = [np.interp(scaled, positions, VIRIDIS_ANCHORS[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def upsample(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """maps [..., h, w] on the patch grid -> [..., height, width], each patch a flat block.

    Nearest-neighbour keeps one value per patch, which is what the network computed; smoother
    interpolation would show detail the model does not have.
    """
    leading = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    return F.interpolate(flat, size=(height, width), mode="nearest").reshape(
        *leading, height, width)


def overlay(picture: np.ndarray, heat: np.ndarray, mask: np.ndarray | None = None,
            heat_weight: float = 0.5, kept: float = 0.3, grey: float = 96.0) -> np.ndarray:
    """Blend a heat map over a picture; outside ``mask`` (bool [H, W]) the picture fades to
    grey (not black, so the mask shows on dark backgrounds too)."""
    blended = (1 - heat_weight) * picture.astype(np.float64) + heat_weight * heat
    if mask is not None:
        faded = kept * picture.astype(np.float64) + (1 - kept) * grey
        blended = np.where(mask[..., None], blended, faded)
    return blended.round().clip(0, 255).astype(np.uint8)


def grid(rows: Sequence[Sequence[np.ndarray]], gap: int = 2) -> np.ndarray:
    """Tile pictures of one size into rows (short rows are padded); white gaps between tiles."""
    height, width = rows[0][0].shape[:2]
    columns = max(len(row) for row in rows)
    canvas = np.full((len(rows) * (height + gap) - gap, columns * (width + gap) - gap, 3), 255,
                     dtype=np.uint8)
    for row_index, row in enumerate(rows):
        for column_index, tile in enumerate(row):
            top, left = row_index * (height + gap), column_index * (width + gap)
            canvas[top : top + height, left : left + width] = tile
    return canvas


def save_png(picture: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path, format="PNG")
    return path
