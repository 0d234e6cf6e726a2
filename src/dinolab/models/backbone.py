"""Backbones from timm, used only through its public API.

Any timm model name works. Vision transformers are built with ``dynamic_img_size=True`` so that
the same network takes global and local crops of any size (the position embedding is
interpolated), with ``img_size`` set to the global crop and an optional patch size. The
classifier is removed (``num_classes=0``): the backbone returns the final-normed [CLS] token
(ViT) or the pooled feature (CNN), which is what DINO's head and the evaluations use.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from dinolab.config import ConfigError, ModelConfig
from dinolab.models.weights import backbone_state, load_backbone_state, read_state_dict


def _is_vision_transformer(name: str) -> bool:
    """True when the timm model takes the ViT keywords (img_size, patch_size, dynamic_img_size)."""
    entry = timm.models.model_entrypoint(name)
    module = entry.__module__.rsplit(".", 1)[-1]
    return module in {
        "vision_transformer", "deit", "eva", "vision_transformer_hybrid", "vision_transformer_sam",
        "vision_transformer_relpos", "cait", "xcit",
    }


@functools.cache
def _takes_drop_path(name: str) -> bool:
    """Whether the timm model has stochastic depth (a ``drop_path_rate`` keyword). Most do; VGG,
    DenseNet, DLA, Inception, HRNet, DPN and GhostNet do not. Asked by building the model on
    the meta device (no memory, no initialisation); any other failure is left to the real build
    to report."""
    if _is_vision_transformer(name):
        return True
    try:
        with torch.device("meta"):
            timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=0.0)
    except TypeError as error:
        return "drop_path_rate" not in str(error)
    except Exception:  # the real build, with the user's keywords, reports it
        return True
    return True


def backbone_kwargs(config: ModelConfig, img_size: int, drop_path_rate: float) -> dict[str, Any]:
    """The keyword arguments given to ``timm.create_model`` (saved with exports). The rate is
    given even when 0 (the teacher's): a few timm models default to a non-zero one."""
    kwargs: dict[str, Any] = {"num_classes": 0}
    if _takes_drop_path(config.backbone):
        kwargs["drop_path_rate"] = drop_path_rate
    elif drop_path_rate > 0:
        raise ConfigError(f"invalid value for model.drop_path_rate: timm's {config.backbone} has "
                          "no stochastic depth (drop path); set model.drop_path_rate=0")
    if _is_vision_transformer(config.backbone):
        kwargs.update(img_size=img_size, dynamic_img_size=True)
        if config.patch_size is not None:
            kwargs["patch_size"] = config.patch_size
        if config.num_registers:
            kwargs["reg_tokens"] = config.num_registers
    elif config.num_registers:
        raise ConfigError(f"invalid value for model.num_registers: register tokens need a "
                          f"vision transformer, and timm's {config.backbone} is not one")
    kwargs.update(config.backbone_kwargs)
    return kwargs


def create_backbone(config: ModelConfig, img_size: int, drop_path_rate: float) -> nn.Module:
    """Build the backbone; ``drop_path_rate`` differs between student and teacher."""
    if not timm.is_model(config.backbone):
        raise ConfigError(
            f"invalid value for model.backbone: {config.backbone!r} is not a timm model"
        )
    kwargs = backbone_kwargs(config, img_size, drop_path_rate)
    if config.pretrained:
        _check_released_weights(config.backbone)
    try:
        model = timm.create_model(config.backbone, pretrained=config.pretrained, **kwargs)
    except TypeError as error:
        raise ConfigError(f"invalid value for model.backbone_kwargs: {error}") from None
    except Exception as error:
        if not config.pretrained:
            raise
        # The download (no network, no such file on the hub) or weights that do not fit.
        raise ConfigError(f"invalid value for model.pretrained: timm could not load the "
                          f"released weights of {config.backbone} ({_first_line(error)}); "
                          "without network "
                          "access, model.weights=FILE loads a local file") from None
    if config.weights:
        load_weights(model, config.weights)
    return model


def _check_released_weights(name: str) -> None:
    """timm initialises a model it has no weights for at random, with only a log warning: a
    run asked for released weights would quietly train from scratch."""
    source = timm.models.get_pretrained_cfg(name)
    if source is None or not (source.hf_hub_id or source.url or source.file):
        raise ConfigError(f"invalid value for model.pretrained: timm has no released weights "
                          f"for {name} (model.weights=FILE loads a local file)")


def _on_meta_device(config: ModelConfig, img_size: int) -> nn.Module:
    """The backbone without memory or initialisation, for tracing shapes."""
    with torch.device("meta"):
        return timm.create_model(config.backbone, pretrained=False,
                                 **backbone_kwargs(config, img_size, 0.0)).eval()


def trace_crop_sizes(config: ModelConfig, global_size: int, local_size: int | None) -> list[str]:
    """Run the backbone at each crop size on the meta device (no memory, no compute, well under
    a second) -> its dense strided convolutions (kernel > 1) that get a 1x1 map, as
    "layer4.0.conv1 at 14 px": what a CNN reducing 32x does on small crops, and what CPU bf16
    gets wrong (``training_precision``).

    DINO gives the backbone every crop size. ViTs (built for any size) and CNNs take them;
    Swin, MaxViT, CoaT, PiT, LeViT or Hiera are built for one size and would fail on the other
    at the first step, with a shape error: a ConfigError here. A model the trace cannot run even
    at its own size is left to the real run (-> [])."""
    found: list[str] = []
    try:
        model = _on_meta_device(config, global_size)
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d) and module.groups == 1 and \
                    max(module.stride) > 1 and max(module.kernel_size) > 1:
                module.register_forward_pre_hook(
                    lambda module, inputs, name=name: found.append(name)
                    if inputs[0].shape[-2:] == (1, 1) else None)
        _run_at(model, global_size, found)
    except Exception:
        return []
    if local_size is not None:
        try:
            _run_at(model, local_size, found)
        except Exception as error:
            raise ConfigError(f"invalid value for data.local_crop_size: timm's {config.backbone} "
                              f"does not take {local_size} px crops after {global_size} px "
                              f"ones ({_first_line(error)}); a ViT or a CNN takes every "
                              "size") from None
    return found


def _run_at(model: nn.Module, size: int, found: list[str]) -> None:
    """One meta forward at ``size``; the names its hooks add to ``found`` get the size."""
    before = len(found)
    model(torch.empty(2, 3, size, size, device="meta"))
    found[before:] = [f"{name} at {size} px" for name in found[before:]]


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def enable_grad_checkpointing(backbone: nn.Module, name: str) -> None:
    """Recompute the backbone's block activations in the backward (timm's non-reentrant
    checkpointing) instead of keeping them: the activation memory of one block instead of all.
    The recomputed forward replays the same random draws (drop path), so the gradients are
    those of the plain backward."""
    try:
        backbone.set_grad_checkpointing(True)  # type: ignore[operator]
    except (AttributeError, AssertionError, NotImplementedError):
        raise ConfigError(f"invalid value for model.grad_checkpointing: timm's {name} has no "
                          "gradient checkpointing") from None


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
    """The width of what the backbone returns (num_classes=0): timm's ``head_hidden_size``, which
    differs from ``num_features`` where a pre-logits layer follows the pooling (MobileNetV3 and
    V4, GhostNet, LCNet, EfficientViT: 1280 after 960, say)."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)  # type: ignore[arg-type]
