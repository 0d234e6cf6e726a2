"""DINO's multi-crop augmentation on whole batches of tensors, on any device.

The same views as ``MultiCropTransform`` (DINO_SPEC.md, "Augmentation"), with every random
parameter drawn per view and per image, but applied to a batch at once: the loader's workers
only decode, and the accelerator (or the CPU's vector units) does the rest. Per-image PIL
transforms cost a few hundred microseconds of Python per view; on a GPU they cannot keep up with
a ViT-S step, and on a small CPU they take cores away from the model.

Parameters are drawn on the CPU from a ``torch.Generator`` (the same draws for any device), then
applied on the images' device:

- crop and resize: ``torchvision.ops.roi_align`` over each image's own box, with adaptive
  sampling (it averages ceil(box / size) bilinear samples per output pixel, so downscaling is
  anti-aliased). Departure: the PIL path resizes with a bicubic filter;
- flip, colour jitter (brightness, contrast, saturation, hue in a random order per image),
  grayscale, Gaussian blur (separable, one kernel per image), solarize, normalise: the tensor
  formulas of torchvision's functional transforms, with one factor per image.

Shapes: B images, C channels (1 or 3), V views, N = V_group * B rows of one resolution group.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from torchvision.ops import roi_align

from dinolab.config import DataConfig
from dinolab.data.transforms import view_specs

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision and PIL
_SOLARIZE_THRESHOLD = 128 / 255  # PIL's ImageOps.solarize(threshold=128) on 8-bit values


@dataclass
class ViewParameters:
    """Random parameters of N = V * B views, view-major (rows [view 0 of all images; ...])."""

    boxes: torch.Tensor  # [N, 4] float: top, left, height, width in source pixels
    flip: torch.Tensor  # [N] bool
    jitter: torch.Tensor  # [N] bool: colour jitter applied
    factors: torch.Tensor  # [N, 4]: brightness, contrast, saturation, hue
    order: torch.Tensor  # [N, 4] long: a permutation of the four jitter operations
    grayscale: torch.Tensor  # [N] bool
    blur: torch.Tensor  # [N] bool
    sigma: torch.Tensor  # [N] float
    solarize: torch.Tensor  # [N] bool

    def rows(self, start: int, stop: int) -> ViewParameters:
        fields = self.__dataclass_fields__
        return ViewParameters(*(getattr(self, name)[start:stop] for name in fields))


def _uniform(low: float, high: float, shape: tuple[int, ...], generator: torch.Generator,
             ) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def sample_crop_boxes(heights: torch.Tensor, widths: torch.Tensor, scale: tuple[float, float],
                      generator: torch.Generator, ratio: tuple[float, float] = (3 / 4, 4 / 3),
                      attempts: int = 10) -> torch.Tensor:
    """[n] image sizes -> [n, 4] (top, left, height, width): torchvision's RandomResizedCrop rule
    (area fraction uniform in ``scale``, log aspect uniform, first of 10 tries that fits, else
    the largest centred crop within the ratio range), drawn for all images at once."""
    count = heights.numel()
    heights, widths = heights.double()[:, None], widths.double()[:, None]
    area = heights * widths * _uniform(*scale, (count, attempts), generator).double()
    aspect = torch.exp(_uniform(math.log(ratio[0]), math.log(ratio[1]), (count, attempts),
                                generator).double())
    crop_w = torch.round(torch.sqrt(area * aspect))
    crop_h = torch.round(torch.sqrt(area / aspect))
    fits = (crop_w > 0) & (crop_w <= widths) & (crop_h > 0) & (crop_h <= heights)
    first = fits.long().argmax(dim=1, keepdim=True)
    crop_w, crop_h = crop_w.gather(1, first)[:, 0], crop_h.gather(1, first)[:, 0]
    heights, widths = heights[:, 0], widths[:, 0]
    # Fallback where no try fits: the whole image, cut to the nearest aspect ratio in range.
    in_ratio = widths / heights
    fallback_w = torch.where(in_ratio > ratio[1], torch.round(heights * ratio[1]), widths)
    fallback_h = torch.where(in_ratio < ratio[0], torch.round(widths / ratio[0]), heights)
    found = fits.any(dim=1)
    crop_w = torch.where(found, crop_w, fallback_w)
    crop_h = torch.where(found, crop_h, fallback_h)
    position = torch.rand((count, 2), generator=generator, dtype=torch.float64)
    top = torch.where(found, torch.floor(position[:, 0] * (heights - crop_h + 1)),
                      torch.div(heights - crop_h, 2, rounding_mode="floor"))
    left = torch.where(found, torch.floor(position[:, 1] * (widths - crop_w + 1)),
                       torch.div(widths - crop_w, 2, rounding_mode="floor"))
    return torch.stack([top, left, crop_h, crop_w], dim=1).float()


class BatchedMultiCrop:
    """uint8 images [B, C, H, W] (each image in the top-left corner of its canvas, ``sizes``
    [B, 2] its true (height, width)) -> V views [B, 3, S, S], normalised, 2 global first."""

    def __init__(self, config: DataConfig) -> None:
        self.config = config
        self.views = view_specs(config)
        self.mean = torch.tensor(config.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(config.std).view(1, 3, 1, 1)

    def sample(self, sizes: torch.Tensor, generator: torch.Generator) -> ViewParameters:
        """Draw every view's parameters for images of ``sizes`` [B, 2] (on the CPU)."""
        config, batch = self.config, sizes.shape[0]
        count = batch * len(self.views)
        boxes = torch.cat([sample_crop_boxes(sizes[:, 0], sizes[:, 1], spec.scale, generator)
                           for spec in self.views])
        blur_prob = torch.tensor([spec.blur_prob for spec in self.views]).repeat_interleave(batch)
        solarize_prob = torch.tensor([spec.solarize_prob for spec in self.views])
        bounds = torch.tensor([
            [max(0.0, 1 - config.brightness), 1 + config.brightness],
            [max(0.0, 1 - config.contrast), 1 + config.contrast],
            [max(0.0, 1 - config.saturation), 1 + config.saturation],
            [-config.hue, config.hue],
        ])
        factors = bounds[:, 0] + (bounds[:, 1] - bounds[:, 0]) * torch.rand((count, 4),
                                                                            generator=generator)
        return ViewParameters(
            boxes=boxes,
            flip=torch.rand(count, generator=generator) < config.flip_prob,
            jitter=torch.rand(count, generator=generator) < config.color_jitter_prob,
            factors=factors,
            order=torch.rand((count, 4), generator=generator).argsort(dim=1),
            grayscale=torch.rand(count, generator=generator) < config.grayscale_prob,
            blur=torch.rand(count, generator=generator) < blur_prob,
            sigma=_uniform(*config.blur_sigma, (count,), generator),
            solarize=torch.rand(count, generator=generator)
            < solarize_prob.repeat_interleave(batch),
        )

    def __call__(self, images: torch.Tensor, sizes: torch.Tensor,
                 generator: torch.Generator) -> list[torch.Tensor]:
        batch, device = images.shape[0], images.device
        parameters = self.sample(sizes.cpu(), generator)
        images = images.float().div_(255)
        mean, std = self.mean.to(device), self.std.to(device)
        views: list[torch.Tensor] = []
        start = 0
        for size, count in _resolution_runs([spec.size for spec in self.views]):
            rows = parameters.rows(start * batch, (start + count) * batch)
            group = self.apply(images, rows, size)
            group = ((group - mean[:, : group.shape[1]]) / std[:, : group.shape[1]])
            views += list(group.expand(-1, 3, -1, -1).contiguous().chunk(count))
            start += count
        return views

    def apply(self, images: torch.Tensor, parameters: ViewParameters, size: int) -> torch.Tensor:
        """images [B, C, H, W] float in [0, 1] -> N = V * B augmented views [N, C, size, size].

        ``parameters`` stay on the CPU: the rows each operation touches are selected there, so
        applying them needs no host sync.
        """
        batch, device = images.shape[0], images.device
        count = parameters.flip.shape[0]
        # Only the numbers the kernels read go to the device; the masks stay on the CPU.
        crops, factors, sigma = (tensor.to(device, non_blocking=True) for tensor in (
            parameters.boxes, parameters.factors, parameters.sigma))
        top, left, height, width = crops.unbind(1)
        image_index = torch.arange(count, device=device).remainder(batch).float()
        boxes = torch.stack([image_index, left, top, left + width, top + height], dim=1)
        views = roi_align(images, boxes, (size, size), sampling_ratio=0, aligned=True)
        views = _masked(views, parameters.flip, lambda x, rows: x.flip(-1))
        views = color_jitter(views, parameters, factors)
        if views.shape[1] == 3:  # grayscale is the identity on one-channel images
            views = _masked(views, parameters.grayscale,
                            lambda x, rows: grayscale(x).expand_as(x))
        views = _masked(views, parameters.blur, lambda x, rows: gaussian_blur(
            x, sigma[rows], max(self.config.blur_sigma)))
        return _masked(views, parameters.solarize, lambda x, rows: torch.where(
            x >= _SOLARIZE_THRESHOLD, 1 - x, x))


def _resolution_runs(sizes: list[int]) -> list[tuple[int, int]]:
    """[224, 224, 96, 96, 96] -> [(224, 2), (96, 3)]: consecutive views of one size."""
    runs: list[tuple[int, int]] = []
    for size in sizes:
        if runs and runs[-1][0] == size:
            runs[-1] = (size, runs[-1][1] + 1)
        else:
            runs.append((size, 1))
    return runs


def _masked(views: torch.Tensor, mask: torch.Tensor,
            operation: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply ``operation(selected_rows, row_indices)`` in place where the CPU ``mask`` [N] is
    set (``views`` is a working buffer that this module owns)."""
    rows = mask.nonzero()[:, 0]
    if rows.numel() == 0:
        return views
    rows = rows.to(views.device, non_blocking=True)
    return views.index_copy_(0, rows, operation(views.index_select(0, rows), rows))


def grayscale(views: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> [N, 1, H, W] luma."""
    red, green, blue = views.unbind(1)
    weights = _GRAY_WEIGHTS
    return (weights[0] * red + weights[1] * green + weights[2] * blue).unsqueeze(1)


def _blend(views: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = factor[:, None, None, None]
    return (factor * views + (1 - factor) * other).clamp_(0, 1)


def adjust_brightness(views: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (views * factor[:, None, None, None]).clamp_(0, 1)


def adjust_contrast(views: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    luma = grayscale(views) if views.shape[1] == 3 else views
    return _blend(views, luma.mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(views: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(views, grayscale(views), factor)


def adjust_hue(views: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of [N, 3, H, W] by ``shift`` [N] turns (RGB -> HSV -> RGB)."""
    maximum, _ = views.max(dim=1)
    minimum, _ = views.min(dim=1)
    chroma = maximum - minimum
    safe_chroma = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    saturation = chroma / torch.where(maximum == 0, torch.ones_like(maximum), maximum)
    red, green, blue = views.unbind(1)
    hue_r = (maximum - red) / safe_chroma
    hue_g = (maximum - green) / safe_chroma
    hue_b = (maximum - blue) / safe_chroma
    hue = torch.where(maximum == red, hue_b - hue_g,
                      torch.where(maximum == green, 2.0 + hue_r - hue_b, 4.0 + hue_g - hue_r))
    hue = torch.where(chroma == 0, torch.zeros_like(hue), hue)
    hue = (hue / 6.0 + 1.0).remainder(1.0)
    hue = (hue + shift[:, None, None]).remainder(1.0)
    return _hsv_to_rgb(hue, saturation, maximum)


def _hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    sector = torch.floor(hue * 6.0)
    fraction = hue * 6.0 - sector
    sector = sector.long().remainder(6)
    p = (value * (1 - saturation)).clamp(0, 1)
    q = (value * (1 - saturation * fraction)).clamp(0, 1)
    t = (value * (1 - saturation * (1 - fraction))).clamp(0, 1)
    # Per sector 0..5: (r, g, b) = (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q)
    choices = torch.stack([value, q, p, p, t, value,
                           t, value, value, q, p, p,
                           p, p, t, value, value, q]).view(3, 6, *hue.shape)
    index = sector.unsqueeze(0).unsqueeze(0).expand(3, 1, *hue.shape)
    return choices.gather(1, index)[:, 0].permute(1, 0, 2, 3)


def color_jitter(views: torch.Tensor, parameters: ViewParameters,
                 factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation and hue in each row's own order, where ``jitter``;
    ``parameters`` on the CPU, their ``factors`` [N, 4] on the views' device."""
    operations: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = [
        adjust_brightness, adjust_contrast]
    if views.shape[1] == 3:  # saturation and hue are identities on one-channel images
        operations += [adjust_saturation, adjust_hue]
    for position in range(4):
        for operation_index, operation in enumerate(operations):
            mask = parameters.jitter & (parameters.order[:, position] == operation_index)
            views = _masked(views, mask, _with_factor(operation, factors[:, operation_index]))
    return views


def _with_factor(operation: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 factor: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda views, rows: operation(views, factor[rows])


def gaussian_blur(views: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [N, C, H, W] with one ``sigma`` [N] per row; the kernel spans
    3 sigma of the largest configured sigma, reflect padding (as torchvision's tensor blur).

    Written as a weighted sum of shifted copies: one kernel per row rules out a plain
    convolution, and a grouped one with N * C groups is slow on CPUs.
    """
    height, width = views.shape[-2:]
    radius = max(1, min(math.ceil(3 * max_sigma), height - 1, width - 1))
    offsets = torch.arange(-radius, radius + 1, device=views.device, dtype=views.dtype)
    kernel = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True))[:, :, None, None, None]  # [N, k, 1, 1, 1]
    padded = F.pad(views, (0, 0, radius, radius), mode="reflect")
    views = kernel[:, 0] * padded[:, :, :height]
    for j in range(1, 2 * radius + 1):
        views += kernel[:, j] * padded[:, :, j: j + height]
    padded = F.pad(views, (radius, radius, 0, 0), mode="reflect")
    views = kernel[:, 0] * padded[..., :width]
    for j in range(1, 2 * radius + 1):
        views += kernel[:, j] * padded[..., j: j + width]
    return views
