"""Image sources by name (data.source). Each yields (PIL image, label) with label UNLABELLED
(-1) where none is known.

Labels are used only by the k-NN monitor and the evaluations, never by training. A user's own
Dataset bypasses this table: ``train(config, dataset=...)``.
"""

from __future__ import annotations

from collections.abc import Callable

from dinolab.config import DataConfig
from dinolab.data.folders import file_list, image_folder, imagenet
from dinolab.data.hugging_face import hugging_face
from dinolab.data.images import (  # noqa: F401 (the names other modules import from here)
    UNLABELLED,
    ArrayImages,
    DataError,
    ImageFiles,
    Sources,
)
from dinolab.data.named_sets import (  # noqa: F401
    cifar10,
    cifar100,
    fashion_mnist,
    mnist,
    read_idx,
    stl10,
)

SOURCES: dict[str, Callable[[DataConfig], Sources]] = {
    "folder": image_folder,
    "filelist": file_list,
    "imagenet": imagenet,
    "stl10": stl10,
    "cifar10": cifar10,
    "cifar100": cifar100,
    "mnist": mnist,
    "fashion-mnist": fashion_mnist,
    "hf": hugging_face,
}


def build_sources(config: DataConfig) -> Sources:
    """The training images and the k-NN splits of data.source, or a one-line DataError."""
    return SOURCES[config.source](config)
