"""The images a user asks to look at: read, sized for the backbone, and shown back as pictures.

Preprocessing is the evaluation protocol of the run (resize, center crop, the run's mean and
std: ``EvalTransform``), so the network sees what the k-NN monitor saw. The picture drawn under
a map is the crop the network saw, recovered from the normalised tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from dinolab.config import Config, ConfigError, DataConfig
from dinolab.data.images import UnreadableImage, decode_image
from dinolab.data.transforms import EvalTransform

DISPLAY_SIDE = 224  # pictures are enlarged towards this side for viewing


def patch_size(backbone: nn.Module) -> int | None:
    """The ViT's patch side in pixels; None for backbones without a patch embedding."""
    embedding = getattr(backbone, "patch_embed", None)
    size = getattr(embedding, "patch_size", None)
    return None if size is None else int(size[0])


def _default_size(backbone: nn.Module) -> int:
    """The size the backbone was built for (``img_size``), else timm's default input size."""
    image_size = getattr(getattr(backbone, "patch_embed", None), "img_size", None)
    if image_size is not None:
        return int(image_size[0])
    return int(backbone.pretrained_cfg["input_size"][-1])  # type: ignore[index, operator]


def input_transform(backbone: nn.Module, config: Config | None, size: int | None,
                    ) -> EvalTransform:
    """The run's evaluation transform at ``size`` (default: the run's global crop size).

    Without a saved config (an exported backbone) the size is the one the model was built for,
    with ImageNet's mean and std. A ViT takes any multiple of its patch size when it was built
    with ``dynamic_img_size`` (dinolab's backbones are); other sizes are refused here rather
    than failing inside timm.
    """
    if config is not None:
        data = config.data
    else:
        data = DataConfig(global_crop_size=_default_size(backbone))
    if size is not None:
        if size <= 0:
            raise ConfigError(f"--size must be positive, not {size}")
        data = dataclasses.replace(data, global_crop_size=size)
    patch = patch_size(backbone)
    crop = data.global_crop_size
    if patch is not None and crop % patch:
        raise ConfigError(f"--size {crop} is not a multiple of the patch size {patch}")
    if patch is not None and not getattr(backbone, "dynamic_img_size", False):
        if crop != _default_size(backbone):
            raise ConfigError(f"--size {crop}: this ViT takes only {_default_size(backbone)} px "
                              "(it was built without dynamic_img_size)")
    return EvalTransform(data)


def read_images(paths: Sequence[str | Path]) -> list[Image.Image]:
    """Decode every image file as training and evaluation do (upright, by its EXIF
    orientation), or fail with one line naming the first that is not one."""
    images = []
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"{path}: no such image file")
        try:
            images.append(decode_image(Path(path)).convert("RGB"))
        except UnreadableImage as error:
            raise ConfigError(f"{path}: not an image ({error.reason})") from None
    return images


def prepare(images: Sequence[Image.Image], transform: EvalTransform) -> torch.Tensor:
    """-> a batch [B, 3, S, S] normalised as in evaluation."""
    return torch.stack([transform(image) for image in images])


def to_picture(tensor: torch.Tensor, transform: EvalTransform) -> np.ndarray:
    """Undo the normalisation: tensor [3, S_h, S_w] -> uint8 picture [k S_h, k S_w, 3].

    Small inputs are enlarged by the integer factor k = DISPLAY_SIDE // max(S_h, S_w) (nearest
    neighbour, so no detail is invented): a 28 px crop would be a thumbnail nobody can read.
    Maps drawn on the picture are upsampled to its size.
    """
    pixels = tensor.detach().float().cpu() * transform.std + transform.mean
    picture = (pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    factor = max(1, DISPLAY_SIDE // max(picture.shape[:2]))
    return picture.repeat(factor, axis=0).repeat(factor, axis=1)


def output_names(paths: Sequence[str | Path]) -> list[str]:
    """File stems for the outputs; a stem seen before gets its position appended (a/1.jpg and
    b/1.jpg would otherwise overwrite each other)."""
    names: list[str] = []
    for index, path in enumerate(paths):
        stem = Path(path).stem
        names.append(f"{stem}_{index}" if stem in names else stem)
    return names
