"""Image sources. Each yields (PIL image, label) with label -1 where none is known.

Labels are used only by the k-NN monitor and the evaluations, never by training.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dinolab.config import ConfigError, DataConfig

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_DOWNLOAD_ROOT = "data"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
UNLABELLED = -1


class ArrayImages(Dataset):
    """uint8 images [N, H, W] (grayscale) with int labels [N]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index], mode="L"), int(self.labels[index])


class ImageFiles(Dataset):
    """A list of image files with labels (or UNLABELLED)."""

    def __init__(self, paths: list[Path], labels: list[int]) -> None:
        self.paths = paths
        self.labels = labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        with Image.open(self.paths[index]) as image:
            return image.convert("RGB"), self.labels[index]


@dataclass
class Sources:
    """What a data source provides: training images, and labelled splits for k-NN if any."""

    train: Dataset
    knn_train: Dataset | None = None
    knn_test: Dataset | None = None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ConfigError(f"{path}: not an IDX file of unsigned bytes")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def fashion_mnist_folder(root: str) -> Path | None:
    """The folder holding the IDX files: data.root itself or torchvision's layout under it; with
    no data.root, ./data (where a download goes) and then Debian's package folder."""
    base = Path(root or DEFAULT_DOWNLOAD_ROOT)
    candidates = [base, base / "FashionMNIST" / "raw", base / "fashion-mnist"]
    if not root:
        candidates.append(SYSTEM_FASHION_MNIST)
    for folder in candidates:
        names = ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")
        if all(_find_idx(folder, name) for name in names):
            return folder
    return None


def fashion_mnist(config: DataConfig) -> Sources:
    if config.root and not Path(config.root).is_dir() and not config.download:
        raise ConfigError(f"invalid value for data.root: folder not found: {config.root}")
    folder = fashion_mnist_folder(config.root)
    if folder is None and config.download:
        from torchvision.datasets import FashionMNIST

        for is_train in (True, False):
            FashionMNIST(config.root or DEFAULT_DOWNLOAD_ROOT, train=is_train, download=True)
        folder = fashion_mnist_folder(config.root)
    if folder is None:
        where = f"data.root={config.root}" if config.root else f"./data or {SYSTEM_FASHION_MNIST}"
        raise ConfigError(
            f"invalid value for data.root: no Fashion-MNIST IDX files in {where}; install the "
            "Debian package dataset-fashion-mnist or set data.download=true"
        )

    def split(prefix: str) -> ArrayImages:
        images = read_idx(_find_idx(folder, f"{prefix}-images-idx3-ubyte"))  # type: ignore[arg-type]
        labels = read_idx(_find_idx(folder, f"{prefix}-labels-idx1-ubyte"))  # type: ignore[arg-type]
        return ArrayImages(images, labels.astype(np.int64))

    train_split = split("train")
    return Sources(train=train_split, knn_train=train_split, knn_test=split("t10k"))


def image_folder(config: DataConfig, holdout_fraction: float = 0.1) -> Sources:
    """Every image under data.root, recursively. When all images sit in first-level class
    folders (at least two), those names are the labels and a fixed 10% is held out for k-NN."""
    if not config.root:
        raise ConfigError("invalid value for data.root: data.source=folder needs data.root")
    root = Path(config.root)
    if not root.is_dir():
        raise ConfigError(f"invalid value for data.root: folder not found: {config.root}")
    paths = sorted(
        p for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not paths:
        raise ConfigError(f"invalid value for data.root: no images found in {config.root}")
    classes = sorted({p.relative_to(root).parts[0] for p in paths})
    labelled = len(classes) >= 2 and all(len(p.relative_to(root).parts) >= 2 for p in paths)
    if not labelled:
        return Sources(train=ImageFiles(paths, [UNLABELLED] * len(paths)))
    class_index = {name: index for index, name in enumerate(classes)}
    labels = [class_index[p.relative_to(root).parts[0]] for p in paths]
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(0)).tolist()
    num_test = max(1, int(len(paths) * holdout_fraction))
    test, train = order[:num_test], order[num_test:]
    return Sources(
        train=ImageFiles(paths, labels),
        knn_train=ImageFiles([paths[i] for i in train], [labels[i] for i in train]),
        knn_test=ImageFiles([paths[i] for i in test], [labels[i] for i in test]),
    )


def build_sources(config: DataConfig) -> Sources:
    if config.source == "fashion-mnist":
        return fashion_mnist(config)
    return image_folder(config)
