"""Named data sets: STL-10, CIFAR-10/100 and MNIST through torchvision's own classes (so their
on-disk formats and checksums are torchvision's), Fashion-MNIST from its IDX files wherever
they are (Debian's package folder included).

data.root is the folder torchvision downloads into and reads from (default ./data);
data.download=true lets torchvision fetch the files on first use. Without a network the files
must already be there; a missing or corrupt set stops with one line (DataError).
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from dinolab.config import DataConfig
from dinolab.data.images import UNLABELLED, ArrayImages, DataError, Sources

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_DOWNLOAD_ROOT = "data"


class LabelledImages(Dataset):
    """A torchvision data set -> (PIL image, int label); UNLABELLED where it has no label
    (STL-10's unlabeled images come with None or -1)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image, label = self.dataset[index]
        return image, UNLABELLED if label is None or label < 0 else int(label)


def _root(config: DataConfig) -> str:
    root = config.root or DEFAULT_DOWNLOAD_ROOT
    if not config.download and not Path(root).is_dir():
        raise DataError(f"invalid value for data.root: folder not found: {root} (set "
                        "data.download=true to fetch the data set there)")
    return root


def _open(factory: Callable[..., Dataset], name: str, config: DataConfig,
          **arguments: Any) -> LabelledImages:
    """torchvision's class with our one-line errors: missing or corrupt files, failed download."""
    root = _root(config)
    try:
        return LabelledImages(factory(root, download=config.download, **arguments))
    except (RuntimeError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        hint = "" if config.download else "; set data.download=true to fetch it"
        raise DataError(f"cannot read {name} in {root}: {reason}{hint}") from None


def stl10(config: DataConfig) -> Sources:
    """Trains on data.split (default train+unlabeled: 105,000 images); k-NN from the 5,000
    labelled train images against the 8,000 test images."""
    from torchvision.datasets import STL10

    split = config.split or "train+unlabeled"
    opened: dict[str, LabelledImages] = {}
    for name in dict.fromkeys((split, "train", "test")):
        opened[name] = _open(STL10, "STL-10", config, split=name)
    return Sources(train=opened[split], knn_train=opened["train"], knn_test=opened["test"])


def _train_test(factory: Callable[..., Dataset], name: str, config: DataConfig) -> Sources:
    """Sets with a train and a test split: train on data.split (default train), k-NN from
    train against test."""
    train = _open(factory, name, config, train=True)
    test = _open(factory, name, config, train=False)
    return Sources(train=test if config.split == "test" else train, knn_train=train,
                   knn_test=test)


def cifar10(config: DataConfig) -> Sources:
    from torchvision.datasets import CIFAR10

    return _train_test(CIFAR10, "CIFAR-10", config)


def cifar100(config: DataConfig) -> Sources:
    from torchvision.datasets import CIFAR100

    return _train_test(CIFAR100, "CIFAR-100", config)


def mnist(config: DataConfig) -> Sources:
    from torchvision.datasets import MNIST

    return _train_test(MNIST, "MNIST", config)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes")
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
        raise DataError(f"invalid value for data.root: folder not found: {config.root}")
    folder = fashion_mnist_folder(config.root)
    if folder is None and config.download:
        from torchvision.datasets import FashionMNIST

        for is_train in (True, False):
            _open(FashionMNIST, "Fashion-MNIST", config, train=is_train)
        folder = fashion_mnist_folder(config.root)
    if folder is None:
        where = f"data.root={config.root}" if config.root else f"./data or {SYSTEM_FASHION_MNIST}"
        raise DataError(
            f"invalid value for data.root: no Fashion-MNIST IDX files in {where}; install the "
            "Debian package dataset-fashion-mnist or set data.download=true"
        )

    def split(prefix: str) -> ArrayImages:
        images = read_idx(_find_idx(folder, f"{prefix}-images-idx3-ubyte"))  # type: ignore[arg-type]
        labels = read_idx(_find_idx(folder, f"{prefix}-labels-idx1-ubyte"))  # type: ignore[arg-type]
        return ArrayImages(images, labels.astype(np.int64))

    train, test = split("train"), split("t10k")
    return Sources(train=test if config.split == "test" else train, knn_train=train,
                   knn_test=test)
