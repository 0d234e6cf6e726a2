"""Image operations on batches of views [N, C, H, W] in [0, 1], with one factor per row.

The tensor formulas of torchvision's functional transforms (brightness, contrast and saturation
as one blend, hue, grayscale, Gaussian blur, solarize), written so that every row of a batch
can carry its own factor: what ``BatchedMultiCrop`` (batched_augment.py) applies. Each is
tested against torchvision image by image.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision and PIL
SOLARIZE_THRESHOLD = 128 / 255  # PIL's ImageOps.solarize(threshold=128) on 8-bit values


def blend_rows(views: torch.Tensor, blend: torch.Tensor) -> torch.Tensor:
    """One jitter position's brightness, contrast and saturation: ``blend`` [N, 3] holds each
    row's (factor, luma weight, mean-luma weight); torchvision's ``_blend`` formula."""
    factor, luma_weight, mean_weight = (column[:, None, None, None] for column in blend.unbind(1))
    luma = grayscale(views) if views.shape[1] == 3 else views
    other = torch.addcmul(mean_weight * luma.mean(dim=(1, 2, 3), keepdim=True), luma_weight, luma)
    return torch.lerp(other, views, factor).clamp_(0, 1)


def grayscale(views: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> [N, 1, H, W] luma."""
    red, green, blue = views.unbind(1)
    weights = _GRAY_WEIGHTS
    return (weights[0] * red + weights[1] * green + weights[2] * blue).unsqueeze(1)


def adjust_hue(views: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of [N, 3, H, W] by ``shift`` [N] turns: RGB -> HSV -> RGB as torchvision,
    with the closed form of the way back (channel = V - V S clamp(min(k, 4 - k), 0, 1) with
    k = (5, 3 or 1 for R, G, B) + 6 H, mod 6): a few whole-tensor kernels, no gather over six
    cases.
    """
    value, brightest = views.max(dim=1, keepdim=True)
    chroma = value - views.amin(dim=1, keepdim=True)
    gray = chroma == 0
    # Hue in sixths: for the brightest channel c, 2c + (next channel - the one after) / chroma.
    # On ties the first brightest channel is taken; the formulas agree there.
    difference = views.roll(-1, dims=1) - views.roll(-2, dims=1)
    sixths = difference.gather(1, brightest) / torch.where(gray, 1.0, chroma) + 2 * brightest
    hue = torch.where(gray, 0.0, sixths / 6).add_(1).remainder_(1)
    hue = hue.add_(shift[:, None, None, None]).remainder_(1)
    sectors = torch.arange(5, 0, -2, device=views.device, dtype=views.dtype)  # 5, 3, 1
    k = torch.add(sectors[None, :, None, None], hue, alpha=6).remainder_(6)
    ramp = torch.minimum(k, 4 - k).clamp_(0, 1)
    return torch.addcmul(value, chroma, ramp, value=-1).clamp_(0, 1)  # chroma = S * V


def gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """[N] sigmas -> [N, 2 * radius + 1] normalised 1-D Gaussian kernels."""
    offsets = torch.arange(-radius, radius + 1, dtype=sigma.dtype)
    kernel = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
    return kernel / kernel.sum(dim=1, keepdim=True)


def blur_radius(size: int, max_sigma: float) -> int:
    """3 sigma of the largest configured sigma, kept below the view's size (reflect padding)."""
    return max(1, min(math.ceil(3 * max_sigma), size - 1))


def blur_with_kernels(views: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] blurred along both axes with ``kernels`` [N, k], one per row (reflect
    padding).

    One kernel per row rules out a plain convolution. On CUDA it is a depthwise convolution
    with N * C groups (two kernels per axis); on CPUs, where such a convolution is slow, a
    weighted sum of shifted copies (one fused multiply-add per tap).
    """
    if views.is_cuda:
        return blur_depthwise(views, kernels)
    radius = kernels.shape[1] // 2
    weights = kernels[:, :, None, None, None]  # [N, k, 1, 1, 1]
    height, width = views.shape[-2:]
    padded = F.pad(views, (0, 0, radius, radius), mode="reflect")
    views = weights[:, 0] * padded[:, :, :height]
    for j in range(1, 2 * radius + 1):
        views.addcmul_(weights[:, j], padded[:, :, j: j + height])
    padded = F.pad(views, (radius, radius, 0, 0), mode="reflect")
    views = weights[:, 0] * padded[..., :width]
    for j in range(1, 2 * radius + 1):
        views.addcmul_(weights[:, j], padded[..., j: j + width])
    return views


def blur_depthwise(views: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """``blur_with_kernels`` as two depthwise convolutions over [1, N * C, H, W]."""
    count, channels, height, width = views.shape
    radius = kernels.shape[1] // 2
    weights = kernels.repeat_interleave(channels, dim=0)  # [N * C, k]: a row's kernel per channel
    flat = views.reshape(1, count * channels, height, width)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"),
                    weights[:, None, :, None], groups=count * channels)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"),
                    weights[:, None, None, :], groups=count * channels)
    return flat.view(count, channels, height, width)
