"""A trained backbone, ready for evaluation, from whatever a run left behind.

``load_backbone`` takes a run folder (its ``checkpoint.pt``), a dinolab checkpoint, or an
exported ``FILE.safetensors`` with its ``FILE.json`` sidecar, and returns the backbone in eval
mode with the facts an evaluation needs: the saved configuration (its data section gives the
evaluation transform and the data set), the position in training, and how to rebuild the model
with timm. Checkpoints are read weights-only. The teacher is the default: the paper evaluates
and releases the teacher (DINO_SPEC.md, "Evaluation protocols").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from dinolab.config import Config, ConfigError, from_dict
from dinolab.models.weights import (
    TRAINING_CHECKPOINT_KEYS,
    backbone_state,
    load_backbone_state,
    read_sidecar,
    read_state_dict,
)
from dinolab.training.checkpoint import LATEST as LATEST_CHECKPOINT


@dataclass(frozen=True)
class BackboneInfo:
    """What was loaded, and from where."""

    file: Path  # the file the weights came from
    weights: str  # teacher | student (an export holds one network: reported as given)
    model_name: str
    model_kwargs: dict[str, Any]  # timm.create_model keywords besides num_classes=0
    config: Config | None  # the run's configuration (checkpoints only)
    epoch: int | None = None
    step: int | None = None


def resolve_weights_file(path: str | Path) -> Path:
    """A run folder means its latest checkpoint; a file means itself."""
    location = Path(path).expanduser()
    if location.is_dir():
        checkpoint = location / LATEST_CHECKPOINT
        if not checkpoint.is_file():
            raise ConfigError(f"{location}: no {LATEST_CHECKPOINT} in this folder (a run folder "
                              "has one after its first epoch)")
        return checkpoint
    if not location.is_file():
        raise ConfigError(f"{location}: no such file or folder")
    return location


def load_backbone(path: str | Path, weights: str = "teacher") -> tuple[nn.Module, BackboneInfo]:
    """-> (backbone in eval mode on the CPU, info). ``weights``: teacher or student."""
    if weights not in TRAINING_CHECKPOINT_KEYS:
        raise ConfigError(f"weights must be teacher or student, not {weights!r}")
    file = resolve_weights_file(path)
    if file.suffix == ".safetensors":
        model, info = _from_export(file, weights)
    else:
        model, info = _from_checkpoint(file, weights)
    return model.eval(), info


def _from_checkpoint(file: Path, weights: str) -> tuple[nn.Module, BackboneInfo]:
    from dinolab.models.backbone import backbone_kwargs, create_backbone

    state = read_state_dict(file, "checkpoint")
    if not isinstance(state.get(weights), dict) or not isinstance(state.get("config"), dict):
        raise ConfigError(f"{file}: not a dinolab checkpoint (no {weights!r} and 'config'); "
                          "other weights files train through model.weights=PATH")
    try:
        config = from_dict(state["config"])
    except Exception as error:  # OmegaConf's errors: a checkpoint of another dinolab version
        raise ConfigError(f"{file}: its saved config does not load ({error})") from None
    # The saved weights replace any initial weights: do not fetch or read those again.
    model_config = dataclasses.replace(config.model, pretrained=False, weights=None)
    image_size = config.data.global_crop_size
    model = create_backbone(model_config, image_size, drop_path_rate=0.0)
    load_backbone_state(model, backbone_state(state, weights), "checkpoint", file)
    info = BackboneInfo(
        file=file, weights=weights, model_name=model_config.backbone,
        model_kwargs={key: value for key, value
                      in backbone_kwargs(model_config, image_size, drop_path_rate=0.0).items()
                      if key != "num_classes"},
        config=config, epoch=state.get("epoch"), step=state.get("step"),
    )
    return model, info


def _from_export(file: Path, weights: str) -> tuple[nn.Module, BackboneInfo]:
    import timm

    model_name, model_kwargs = read_sidecar(file)
    if not timm.is_model(model_name):
        raise ConfigError(f"{file}: its sidecar names {model_name!r}, not a timm model")
    try:
        model = timm.create_model(model_name, pretrained=False, **{**model_kwargs,
                                                                   "num_classes": 0})
    except TypeError as error:
        raise ConfigError(f"{file}: its sidecar's model_kwargs do not fit ({error})") from None
    load_backbone_state(model, backbone_state(read_state_dict(file, "export")), "export", file)
    return model, BackboneInfo(file=file, weights=weights, model_name=model_name,
                               model_kwargs=model_kwargs, config=None)
