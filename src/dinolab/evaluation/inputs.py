"""What every evaluation command starts from: a backbone, the data config, a device.

The data comes from the run's own configuration (saved in its checkpoint), so ``dinolab knn
runs/demo`` evaluates on the data the run trained on, with the evaluation transform of that run
(resize to crop * ``data.eval_resize_ratio``, center crop, the run's mean and std). ``--data
PATH`` points at another image folder (``data.source=folder``, ``data.root=PATH``), and
``data.*`` overrides change anything else; an export, which saves no configuration, starts from
the schema defaults with its own image size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn
from torch.utils.data import Dataset

from dinolab.config import Config, ConfigError, from_dict, to_dict, validate
from dinolab.data.datasets import build_sources
from dinolab.evaluation.loading import BackboneInfo, load_backbone

OVERRIDABLE = ("eval.batch_size", "train.device", "train.precision")  # besides data.*


@dataclass
class EvaluationInputs:
    backbone: nn.Module  # eval mode, on ``device``
    info: BackboneInfo
    config: Config  # the run's (or the defaults), with the command line's data overrides
    device: torch.device
    autocast_dtype: torch.dtype | None


def evaluation_config(base: Config, data_path: str | None, overrides: list[str]) -> Config:
    """``base`` <- ``--data PATH`` <- ``key=value`` overrides, validated; only data.* and
    OVERRIDABLE keys: the rest of a run's configuration describes training."""
    if data_path is not None:
        overrides = ["data.source=folder", f"data.root={data_path}", *overrides]
    for item in overrides:
        key = item.split("=", 1)[0]
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        if not (key.startswith("data.") or key in OVERRIDABLE):
            raise ConfigError(f"{key} cannot be overridden for evaluation (only data.* and "
                              f"{', '.join(OVERRIDABLE)})")
    try:
        merged = OmegaConf.merge(OmegaConf.create(to_dict(base)),
                                 OmegaConf.from_dotlist(overrides))
        config = from_dict(OmegaConf.to_container(merged))  # type: ignore[arg-type]
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        raise ConfigError(f"invalid value for {key}: {str(error).splitlines()[0]}") from None
    validate(config)
    return config


def default_config(info: BackboneInfo) -> Config:
    """An export's starting point: the schema defaults at the export's image size (the local
    crop only has to stay valid: evaluation never makes one)."""
    config = Config()
    image_size = info.model_kwargs.get("img_size")
    if isinstance(image_size, int):
        config.data.global_crop_size = image_size
        config.data.local_crop_size = min(config.data.local_crop_size, image_size)
    return config


def prepare_inputs(path: str | Path, weights: str, data_path: str | None,
                   overrides: list[str]) -> EvaluationInputs:
    """Load the backbone and the configuration; nothing is read from the data yet."""
    from dinolab.training.state import resolve_device, resolve_precision

    backbone, info = load_backbone(path, weights)
    config = evaluation_config(info.config or default_config(info), data_path, overrides)
    device = resolve_device(config.train.device)
    return EvaluationInputs(backbone.to(device), info, config, device,
                            resolve_precision(config.train.precision, device))


def labelled_splits(config: Config) -> tuple[Dataset, Dataset]:
    """(train, test) with labels, or a ConfigError saying where labels come from."""
    sources = build_sources(config.data)
    if sources.knn_train is None or sources.knn_test is None:
        raise ConfigError(
            f"{config.data.root or config.data.source} has no labels: k-NN and the linear probe "
            "need class sub-folders (at least two) under data.root, or a labelled data set"
        )
    return sources.knn_train, sources.knn_test


def all_images(config: Config, split: str) -> tuple[str, Dataset]:
    """(cache name, images). ``train``: every training image, labelled or not; ``test``: the
    labelled test split. Named as k-NN names them where they are the same images, so that the
    commands share one cache."""
    sources = build_sources(config.data)
    if split == "train":
        return ("knn-train" if sources.train is sources.knn_train else "all-train"), sources.train
    if sources.knn_test is None:
        raise ConfigError(f"{config.data.root or config.data.source} has no labelled test split")
    return "knn-test", sources.knn_test
