"""Backbones from timm, used only through its public API.

Any timm model name works. Vision transformers are built with ``dynamic_img_size=True`` so that
the same network takes global and local crops of any size (the position embedding is
interpolated), with ``img_size`` set to the global crop and an optional patch size. The
classifier is removed (``num_classes=0``): the backbone returns the final-normed [CLS] token
(ViT) or the pooled feature (CNN), which is what DINO's head and the evaluations use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
from torch import nn

from dinolab.config import ConfigError, ModelConfig
from dinolab.models.weights import backbone_state, load_backbone_state, read_state_dict


def _is_vision_transformer(name: str) -> bool:
    """True when the timm model takes the ViT keywords (img_size, patch_size, dynamic_img_size)."""
    entry = timm.models.model_entrypoint(name)
    module = entry.__module__.rsplit(".", 1)[-1]
    return module in {
        "vision_transformer", "deit", "eva", "vision_transformer_hybrid", "vision_transformer_sam",
        "beit", "vision_transformer_relpos", "cait", "xcit",
    }


def backbone_kwargs(config: ModelConfig, img_size: int, drop_path_rate: float) -> dict[str, Any]:
    """The keyword arguments given to ``timm.create_model`` (saved with exports)."""
    kwargs: dict[str, Any] = {"num_classes": 0, "drop_path_rate": drop_path_rate}
    if _is_vision_transformer(config.backbone):
        kwargs.update(img_size=img_size, dynamic_img_size=True)
        if config.patch_size is not None:
            kwargs["patch_size"] = config.patch_size
    kwargs.update(config.backbone_kwargs)
    return kwargs


def create_backbone(config: ModelConfig, img_size: int, drop_path_rate: float) -> nn.Module:
    """Build the backbone; ``drop_path_rate`` differs between student and teacher."""
    if not timm.is_model(config.backbone):
        raise ConfigError(
            f"invalid value for model.backbone: {config.backbone!r} is not a timm model"
        )
    kwargs = backbone_kwargs(config, img_size, drop_path_rate)
    try:
        model = timm.create_model(config.backbone, pretrained=config.pretrained, **kwargs)
    except TypeError as error:
        raise ConfigError(f"invalid value for model.backbone_kwargs: {error}") from None
    if config.weights:
        load_weights(model, config.weights)
    return model


def load_weights(model: nn.Module, path: str) -> None:
    """Load a local backbone file: timm weights, a dinolab checkpoint or export, or a checkpoint
    of the authors' DINO repository (teacher preferred); see ``models/weights.py``."""
    file = Path(path)
    what = "invalid value for model.weights"
    if not file.is_file():
        raise ConfigError(f"{what}: file not found: {path}")
    tensors = backbone_state(read_state_dict(file, what))
    load_backbone_state(model, tensors, what, file)


def feature_dim(model: nn.Module) -> int:
    return int(model.num_features)  # type: ignore[arg-type]
