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

Two ways to apply them, with the same results: eagerly, each operation on only the rows that
need it (fewer operations, the default); or, with train.compile, every operation on every row
selected by ``where`` (``augment_all_rows``: fixed shapes that ``torch.compile`` fuses into a few
kernels, for GPUs, where the eager path's cost is likely the launch of its ~190 kernels per
resolution group; not yet measured there).

Shapes: B images, C channels (1 or 3), V views, N = V_group * B rows of one resolution group.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torchvision.ops import roi_align

from dinolab.config import DataConfig
from dinolab.data.batched_operations import (
    SOLARIZE_THRESHOLD,
    adjust_hue,
    blend_rows,
    blur_radius,
    blur_with_kernels,
    gaussian_kernels,
    grayscale,
)
from dinolab.data.transforms import view_specs


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

    def __init__(self, config: DataConfig, compile: bool = False) -> None:
        """``compile``: run ``augment_all_rows`` through ``torch.compile`` (train.compile)
        instead of the eager path that touches only the rows each operation needs."""
        self.config = config
        self.compiled = torch.compile(augment_all_rows, dynamic=False) if compile else None
        self.views = view_specs(config)
        std = torch.tensor(config.std).view(1, 3, 1, 1)
        # normalised = view * scale + shift, per device (copied there once)
        self._normalisation = {torch.device("cpu"): (1 / std, -torch.tensor(config.mean).view(
            1, 3, 1, 1) / std)}

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
        images = images / 255  # uint8 -> float32 in [0, 1]
        scale, shift = self._normalisation_on(device)
        views: list[torch.Tensor] = []
        start = 0
        for size, count in _resolution_runs([spec.size for spec in self.views]):
            rows = parameters.rows(start * batch, (start + count) * batch)
            group = self.apply(images, rows, size)
            channels = group.shape[1]
            group = torch.addcmul(shift[:, :channels], group, scale[:, :channels])
            views += list(group.expand(-1, 3, -1, -1).contiguous().chunk(count))
            start += count
        return views

    def _normalisation_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._normalisation:
            scale, shift = self._normalisation[torch.device("cpu")]
            self._normalisation[device] = (scale.to(device), shift.to(device))
        return self._normalisation[device]

    def apply(self, images: torch.Tensor, parameters: ViewParameters, size: int) -> torch.Tensor:
        """images [B, C, H, W] float in [0, 1] -> N = V * B augmented views [N, C, size, size].

        ``parameters`` stay on the CPU. Everything the device needs (boxes, the rows each
        operation touches, per-row factors and blur kernels) is worked out there and sent in
        one copy per dtype, so applying them launches a short, fixed list of kernels and needs
        no host sync.
        """
        make_plan = _plan if self.compiled is None else _plan_all_rows
        plan = make_plan(parameters, images.shape[0], images.shape[1],
                         blur_radius(size, max(self.config.blur_sigma)))
        on = _to_device(plan, images.device)
        # Eager: the canvas's size changes from batch to batch, the views' does not.
        views = roi_align(images, on["boxes"], (size, size), sampling_ratio=0, aligned=True)
        if self.compiled is not None:
            return self.compiled(views, on["flags"], on["blend"], on["hue"], on["blur_kernels"])
        views = _update_rows(views, on.get("flip_rows"), lambda x: x.flip(-1))
        for position in range(4):  # colour jitter: each row's own order of the four operations
            if f"blend_{position}" in on:
                views = blend_rows(views, on[f"blend_{position}"])
            if f"hue_rows_{position}" in on:
                views = _update_rows(views, on[f"hue_rows_{position}"],
                                     partial(adjust_hue, shift=on[f"hue_shift_{position}"]))
        views = _update_rows(views, on.get("grayscale_rows"),
                             lambda x: grayscale(x).expand_as(x))
        views = _update_rows(views, on.get("blur_rows"),
                             lambda x: blur_with_kernels(x, on["blur_kernels"]))
        return _update_rows(views, on.get("solarize_rows"), lambda x: torch.where(
            x >= SOLARIZE_THRESHOLD, 1 - x, x))


def _boxes(parameters: ViewParameters, batch: int) -> torch.Tensor:
    """[N, 5] roi_align boxes: (image index, x1, y1, x2, y2)."""
    top, left, height, width = parameters.boxes.unbind(1)
    image_index = torch.arange(top.shape[0]).remainder(batch).float()
    return torch.stack([image_index, left, top, left + width, top + height], dim=1)


def _jitter_tables(parameters: ViewParameters, colour: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per jitter position: blend [4, N, 3] and hue [4, N, 2].

    Brightness, contrast and saturation are one blend each, ``lerp(other, x, factor)`` with
    ``other`` = 0, the mean luma or the luma: a position applies all three at once with
    per-row (factor, luma weight, mean-luma weight), and factor 1 (an exact identity for
    ``lerp``) on the other rows. Hue is (1 where this position rotates the hue, the shift).
    Saturation and hue are identities on one-channel images (``colour`` false).
    """
    count = parameters.flip.shape[0]
    blend, hue = torch.zeros(4, count, 3), torch.zeros(4, count, 2)
    blend[..., 0] = 1.0
    for position in range(4):
        operation = torch.where(parameters.jitter, parameters.order[:, position], -1)
        for index in (0, 1, 2) if colour else (0, 1):
            chosen = operation == index
            blend[position, chosen, 0] = parameters.factors[chosen, index]
            if index > 0:  # contrast blends with the mean luma, saturation with the luma
                blend[position, chosen, 3 - index] = 1.0
        if colour:
            chosen = operation == 3
            hue[position, chosen, 0] = 1.0
            hue[position, chosen, 1] = parameters.factors[chosen, 3]
    return blend, hue


def _plan(parameters: ViewParameters, batch: int, channels: int,
          blur_radius: int) -> dict[str, torch.Tensor]:
    """The CPU-side work of ``apply``: per operation, the rows it touches and their numbers;
    a key is left out when no row needs the operation."""
    plan = {"boxes": _boxes(parameters, batch)}
    colour = channels == 3  # grayscale, saturation and hue are identities on one channel

    def rows(name: str, mask: torch.Tensor) -> torch.Tensor:
        index = mask.nonzero()[:, 0]
        if index.numel():
            plan[name] = index
        return index

    rows("flip_rows", parameters.flip)
    blend, hue = _jitter_tables(parameters, colour)
    for position in range(4):
        if (blend[position, :, 0] != 1).any():
            plan[f"blend_{position}"] = blend[position]
        hue_rows = rows(f"hue_rows_{position}", hue[position, :, 0] > 0)
        if hue_rows.numel():
            plan[f"hue_shift_{position}"] = hue[position, hue_rows, 1]
    if colour:
        rows("grayscale_rows", parameters.grayscale)
    blurred = rows("blur_rows", parameters.blur)
    if blurred.numel():
        plan["blur_kernels"] = gaussian_kernels(parameters.sigma[blurred], blur_radius)
    rows("solarize_rows", parameters.solarize)
    return plan


def _plan_all_rows(parameters: ViewParameters, batch: int, channels: int,
                   blur_radius: int) -> dict[str, torch.Tensor]:
    """``_plan`` with every operation on every row: tensors of fixed shapes, where a row that
    skips an operation gets its identity (a flag 0, a blur kernel that is 1 at its centre)."""
    blend, hue = _jitter_tables(parameters, channels == 3)
    kernels = gaussian_kernels(parameters.sigma, blur_radius)
    identity = torch.zeros_like(kernels)
    identity[:, blur_radius] = 1.0
    flags = torch.stack([parameters.flip, parameters.grayscale, parameters.solarize], dim=1)
    return {"boxes": _boxes(parameters, batch), "flags": flags.float(), "blend": blend,
            "hue": hue, "blur_kernels": torch.where(parameters.blur[:, None], kernels, identity)}


def _to_device(plan: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Send ``plan`` to ``device`` in one copy per dtype (pinned and asynchronous on CUDA)."""
    if device.type == "cpu":
        return plan
    placed: dict[str, torch.Tensor] = {}
    for dtype in {tensor.dtype for tensor in plan.values()}:
        names = [name for name, tensor in plan.items() if tensor.dtype == dtype]
        flat = torch.cat([plan[name].reshape(-1) for name in names])
        if device.type == "cuda":
            flat = flat.pin_memory()
        pieces = flat.to(device, non_blocking=True).split([plan[name].numel() for name in names])
        placed.update({name: piece.view(plan[name].shape)
                       for name, piece in zip(names, pieces, strict=True)})
    return placed


def augment_all_rows(views: torch.Tensor, flags: torch.Tensor, blend: torch.Tensor,
                     hue: torch.Tensor, blur_kernels: torch.Tensor) -> torch.Tensor:
    """``apply``'s operations on every row of [N, C, S, S] ``views`` (``_plan_all_rows``'s
    tensors; ``flags`` [N, 3]: flip, grayscale, solarize), selecting with ``where``.

    More arithmetic than the row-selecting path, but fixed shapes and no indexing: under
    ``torch.compile`` it can become a handful of fused kernels, where the eager path launches
    about 190 per resolution group.
    """
    def chosen(column: torch.Tensor) -> torch.Tensor:
        return column[:, None, None, None] > 0

    views = torch.where(chosen(flags[:, 0]), views.flip(-1), views)
    colour = views.shape[1] == 3
    for position in range(4):
        views = blend_rows(views, blend[position])
        if colour:
            views = torch.where(chosen(hue[position, :, 0]),
                                adjust_hue(views, hue[position, :, 1]), views)
    if colour:
        views = torch.where(chosen(flags[:, 1]), grayscale(views).expand_as(views), views)
    views = blur_with_kernels(views, blur_kernels)
    return torch.where(chosen(flags[:, 2]) & (views >= SOLARIZE_THRESHOLD), 1 - views, views)


def _update_rows(views: torch.Tensor, rows: torch.Tensor | None,
                 operation: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply ``operation`` to the ``rows`` of ``views`` in place (a working buffer this module
    owns); ``None``: no row needs it."""
    if rows is None:
        return views
    return views.index_copy_(0, rows, operation(views.index_select(0, rows)))


def _resolution_runs(sizes: list[int]) -> list[tuple[int, int]]:
    """[224, 224, 96, 96, 96] -> [(224, 2), (96, 3)]: consecutive views of one size."""
    runs: list[tuple[int, int]] = []
    for size in sizes:
        if runs and runs[-1][0] == size:
            runs[-1] = (size, runs[-1][1] + 1)
        else:
            runs.append((size, 1))
    return runs
