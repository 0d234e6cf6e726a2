"""Block masks for iBOT: which patch tokens of the student's global views are hidden.

DINOv2's collate (dinov2/data/collate.py) and ``MaskingGenerator`` (dinov2/data/masking.py), after
BEiT (Bao et al., 2022): of the V student global views, int(V * mask_probability) are masked, with
target ratios stratified evenly over ``ratio_range`` (view i draws its ratio uniformly from the i-th
of n_masked equal slices), so one batch covers light and heavy masking alike; the other views are
left whole and the list is shuffled, so an image can have 0, 1 or 2 masked crops. A view's mask
is grown from rectangular blocks: each block draws an area in [min_patches, remaining patches],
a log-uniform aspect ratio and a position, and is kept only if it adds between 1 and the remaining
number of new patches; after ``max_attempts`` failed draws the view stops, so it can end below its
target, never above it.

The random draws are made in the order of DINOv2 (and of lightly's ``random_block_mask``), from a
``random.Random`` the caller owns, so masks are reproducible without touching the global
generator. The ratio slices are computed in float32, as lightly does; DINOv2's numpy linspace is
float64, so in rare cases a target can differ from DINOv2's by one patch. DINOv2 also caps a
block at half the grid (``max_num_patches``), which only matters for ratios above 0.5.
"""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import torch


def block_masks(num_views: int, grid: tuple[int, int], rng: random.Random,
                mask_probability: float = 0.5, ratio_range: tuple[float, float] = (0.1, 0.5),
                min_patches: int = 4, aspect_range: tuple[float, float] = (0.3, 1 / 0.3),
                max_attempts: int = 10) -> torch.Tensor:
    """-> bool [num_views, H, W], True where the student sees the mask token (grid = (H, W))."""
    height, width = grid
    num_masked = int(num_views * mask_probability)
    bounds = torch.linspace(ratio_range[0], ratio_range[1], num_masked + 1,
                            dtype=torch.float32).tolist()
    masks = []
    for low, high in itertools.pairwise(bounds):
        target = int(height * width * rng.uniform(low, high))
        masks.append(_view_mask(grid, target, rng, min_patches, aspect_range, max_attempts))
    masks += [np.zeros(grid, dtype=bool) for _ in range(num_views - num_masked)]
    rng.shuffle(masks)
    return torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, *grid, dtype=torch.bool)


def _view_mask(grid: tuple[int, int], target: int, rng: random.Random, min_patches: int,
               aspect_range: tuple[float, float], max_attempts: int) -> np.ndarray:
    """-> bool [H, W] holding at most ``target`` patches, grown block by block (numpy: the
    tiny slices cost a microsecond each, a fifth of torch's)."""
    mask = np.zeros(grid, dtype=bool)
    count = 0
    while count < target:
        added = _add_block(mask, target - count, rng, min_patches, aspect_range, max_attempts)
        if added == 0:
            break
        count += added
    return mask


def _add_block(mask: np.ndarray, remaining: int, rng: random.Random, min_patches: int,
               aspect_range: tuple[float, float], max_attempts: int) -> int:
    """Mask one rectangle in ``mask`` [H, W] in place -> how many patches it newly masked (0 when
    every attempt fell outside the grid or added nothing or too much)."""
    height, width = mask.shape
    log_aspect_low, log_aspect_high = math.log(aspect_range[0]), math.log(aspect_range[1])
    for _ in range(max_attempts):
        area = rng.uniform(min_patches, remaining)
        aspect = math.exp(rng.uniform(log_aspect_low, log_aspect_high))
        block_height = round(math.sqrt(area * aspect))
        block_width = round(math.sqrt(area / aspect))
        if block_height < height and block_width < width:
            top = rng.randint(0, height - block_height)
            left = rng.randint(0, width - block_width)
            block = mask[top : top + block_height, left : left + block_width]
            added = block_height * block_width - int(block.sum())
            if 0 < added <= remaining:
                block[...] = True
                return added
    return 0
