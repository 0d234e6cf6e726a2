"""The multi-crop augmentation of DINO (Caron et al., 2021; DINO_SPEC.md, "Augmentation").

Every view: RandomResizedCrop (bicubic, aspect 3/4..4/3), horizontal flip, colour jitter with
probability 0.8 (brightness, contrast, saturation, hue in random order), grayscale, Gaussian
blur, then normalisation. Global view 1 is always blurred; global view 2 is blurred with p 0.1
and solarized with p 0.2; each local view is blurred with p 0.5.

All randomness comes from a ``torch.Generator`` passed in by the caller, so the views of image i
in epoch e are a pure function of (seed, e, i): the same for any number of workers or processes
and after a resume. Single-channel images stay single-channel until the end (saturation, hue and
grayscale are identities on them) and are broadcast to three channels after normalisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from dinolab.config import DataConfig
from dinolab.data.images import rgb_or_gray


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _chance(generator: torch.Generator, probability: float) -> bool:
    return float(torch.rand((), generator=generator)) < probability


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], generator: torch.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a crop covering ``scale`` of the area (torchvision's rule)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, (), generator=generator))
            left = int(torch.randint(0, width - crop_w + 1, (), generator=generator))
            return top, left, crop_h, crop_w
    # Fallback: the largest centred crop within the ratio range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        crop_w, crop_h = round(height * ratio[1]), height
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


@dataclass(frozen=True)
class ViewSpec:
    size: int
    scale: tuple[float, float]
    blur_prob: float
    solarize_prob: float


def view_specs(config: DataConfig) -> list[ViewSpec]:
    """The views of one image: global 1 (always blurred), global 2 (solarized), the locals."""
    blur_global_1, blur_global_2, blur_local = config.blur_probs
    return [
        ViewSpec(config.global_crop_size, config.global_crop_scale, blur_global_1, 0.0),
        ViewSpec(config.global_crop_size, config.global_crop_scale, blur_global_2,
                 config.solarize_prob),
    ] + [
        ViewSpec(config.local_crop_size, config.local_crop_scale, blur_local, 0.0)
    ] * config.num_local_crops


class MultiCropTransform:
    """PIL image -> list of normalised views [C=3, S, S]: 2 global views, then the local views."""

    def __init__(self, config: DataConfig) -> None:
        self.config = config
        self.views = view_specs(config)
        self.mean = torch.tensor(config.mean).view(3, 1, 1)
        self.std = torch.tensor(config.std).view(3, 1, 1)

    def __call__(self, image: Image.Image, generator: torch.Generator) -> list[torch.Tensor]:
        image = rgb_or_gray(image)
        return [self.view(image, spec, generator) for spec in self.views]

    def view(self, image: Image.Image, spec: ViewSpec, generator: torch.Generator) -> torch.Tensor:
        config = self.config
        top, left, height, width = random_resized_crop_box(*image.size, spec.scale, generator)
        view = F.resized_crop(image, top, left, height, width, [spec.size, spec.size],
                              InterpolationMode.BICUBIC)
        if _chance(generator, config.flip_prob):
            view = F.hflip(view)
        if _chance(generator, config.color_jitter_prob):
            view = self.color_jitter(view, generator)
        if view.mode == "RGB" and _chance(generator, config.grayscale_prob):
            view = F.to_grayscale(view, num_output_channels=3)
        if _chance(generator, spec.blur_prob):
            view = view.filter(ImageFilter.GaussianBlur(_uniform(generator, *config.blur_sigma)))
        if _chance(generator, spec.solarize_prob):
            view = ImageOps.solarize(view, threshold=128)
        tensor = F.pil_to_tensor(view).float().div_(255)
        return ((tensor - self.mean) / self.std).expand(3, -1, -1).contiguous()

    def color_jitter(self, view: Image.Image, generator: torch.Generator) -> Image.Image:
        config = self.config
        order = torch.randperm(4, generator=generator).tolist()
        factors = [
            _uniform(generator, max(0.0, 1 - config.brightness), 1 + config.brightness),
            _uniform(generator, max(0.0, 1 - config.contrast), 1 + config.contrast),
            _uniform(generator, max(0.0, 1 - config.saturation), 1 + config.saturation),
            _uniform(generator, -config.hue, config.hue),
        ]
        for index in order:
            if index == 0:
                view = F.adjust_brightness(view, factors[0])
            elif index == 1:
                view = F.adjust_contrast(view, factors[1])
            elif view.mode == "RGB" and index == 2:
                view = F.adjust_saturation(view, factors[2])
            elif view.mode == "RGB" and index == 3:
                view = F.adjust_hue(view, factors[3])
        return view


class EvalTransform:
    """Resize to size * ratio, center crop to size, normalise (the k-NN / linear protocol)."""

    def __init__(self, config: DataConfig) -> None:
        self.size = config.global_crop_size
        self.resize = round(config.global_crop_size * config.eval_resize_ratio)
        self.mean = torch.tensor(config.mean).view(3, 1, 1)
        self.std = torch.tensor(config.std).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = rgb_or_gray(image)
        image = F.resize(image, self.resize, InterpolationMode.BICUBIC)
        image = F.center_crop(image, [self.size, self.size])
        tensor = F.pil_to_tensor(image).float().div_(255)
        return ((tensor - self.mean) / self.std).expand(3, -1, -1).contiguous()
