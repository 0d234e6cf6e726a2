"""Images as the rest of dinolab sees them: decoded, in RGB or 8-bit grayscale, with a label.

Every source yields (PIL image, label), label UNLABELLED where none is known. Files of any
common format and mode are decoded upright (their EXIF orientation applied) to one of two
modes: "L" stays single-channel (the multi-crop transform broadcasts it to three channels only
at the end), everything else becomes "RGB". A file that cannot be decoded raises
``UnreadableImage``, which training catches and replaces (data/skipping.py); a whole source
that cannot feed a run raises ``DataError``.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torch.utils.data import Dataset

from dinolab.config import ConfigError

UNLABELLED = -1
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
# What PIL raises on a file it cannot decode: not an image (UnidentifiedImageError is an
# OSError), truncated data, broken chunks (SyntaxError, struct.error), absurd sizes.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error,
                 Image.DecompressionBombError)
_ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels become white, as viewers show them


class DataError(ConfigError):
    """The data cannot feed a run: missing, empty, undecodable, or too many bad files. A
    ConfigError, so the CLI prints it as one line and exits with status 2."""


class UnreadableImage(Exception):
    """One item that could not be decoded; ``where`` names it (a path, or the item's index)."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


@dataclass
class Sources:
    """What a data source provides: training images, and labelled splits for k-NN if any."""

    train: Dataset
    knn_train: Dataset | None = None
    knn_test: Dataset | None = None


def rgb_or_gray(image: Image.Image) -> Image.Image:
    """Any PIL image -> upright, "L" or "RGB" (the first frame of an animation, as opened).

    Upright: an image that carries an EXIF Orientation tag (a file ``decode_image`` opened, or a
    photo a user's Dataset hands over) is turned into a copy, leaving the user's object alone.
    16-bit grayscale keeps its range (scaled to 8 bits, not clipped); transparency is composited
    over white instead of exposing whatever colour hides under alpha 0; palette, CMYK, YCbCr,
    bilevel and the rest are converted by PIL.
    """
    if image.getexif().get(ExifTags.Base.Orientation, 1) in range(2, 9):
        image = ImageOps.exif_transpose(image)
    if image.mode in ("L", "RGB"):
        return image
    if image.mode.startswith("I"):  # I;16, I;16B, I (16-bit PNG and TIFF)
        values = np.asarray(image, dtype=np.int64).clip(0, 65535)
        return Image.fromarray((values // 257).astype(np.uint8), mode="L")
    if image.mode in ("1", "F"):
        return image.convert("L")
    if image.mode == "P" and "transparency" not in image.info:
        return image.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "P", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_ALPHA_BACKGROUND, 255))
        flat = Image.alpha_composite(background, rgba).convert("RGB")
        return flat.convert("L") if image.mode in ("LA", "La") else flat
    return image.convert("RGB")


def decode_image(path: Path | IO[bytes], where: str = "") -> Image.Image:
    """Read and fully decode one file (or an open file of its bytes, named ``where`` in an
    UnreadableImage) -> an upright "L" or "RGB" image, or raise UnreadableImage.

    Upright: the EXIF Orientation tag is applied (by ``rgb_or_gray``), as image viewers do.
    Phone cameras store the sensor's pixels and record the rotation in the tag, so without it
    their portrait photos reach training and evaluation lying on their side.
    """
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not in a worker's crop
            return rgb_or_gray(image)
    except DECODE_ERRORS as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if not isinstance(path, Path):  # PIL names an open file by its repr: an address
            reason = reason.replace(f" {path!r}", "")
        raise UnreadableImage(where or str(path), reason) from None


class ImageFiles(Dataset):
    """A list of image files with labels (or UNLABELLED).

    ``read`` raises UnreadableImage for a file that does not decode; training uses it and
    replaces the sample. Indexing (what evaluation uses) gives a mid-gray image instead, so a
    broken file costs one meaningless feature and never a whole evaluation.
    """

    def __init__(self, paths: list[Path], labels: list[int]) -> None:
        self.paths = paths
        self.labels = labels

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> tuple[Image.Image, int]:
        return decode_image(self.paths[index]), self.labels[index]

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        try:
            return self.read(index)
        except UnreadableImage:
            return Image.new("L", (32, 32), 128), self.labels[index]


class DatasetRows(Dataset):
    """The image column of one split of a Hugging Face dataset, with labels (or UNLABELLED).

    ``rows`` is a ``datasets.Dataset`` whose ``column`` holds the encoded images as
    ``{"bytes", "path"}`` dicts (datasets' Image feature with decode=False): they are decoded
    here, so that a row that does not decode is skipped and counted as a broken file is
    (``read`` raises UnreadableImage) and is a mid-gray image to evaluation, as in ImageFiles.
    """

    def __init__(self, rows: Any, column: str, labels: np.ndarray, name: str) -> None:
        self.rows = rows
        self.column = column
        self.labels = labels  # int64 [N]
        self.name = name  # data.root[split], what the skipped rows are listed as

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, index: int) -> tuple[Image.Image, int]:
        where = f"{self.name} row {index}"
        encoded = self.rows[index][self.column] or {}
        if encoded.get("bytes") is not None:
            return decode_image(io.BytesIO(encoded["bytes"]), where), int(self.labels[index])
        if encoded.get("path"):
            return decode_image(Path(encoded["path"]), where), int(self.labels[index])
        raise UnreadableImage(where, "no image bytes or path")

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        try:
            return self.read(index)
        except UnreadableImage:
            return Image.new("L", (32, 32), 128), int(self.labels[index])


class ArrayImages(Dataset):
    """uint8 images [N, H, W] (grayscale) with int labels [N]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index], mode="L"), int(self.labels[index])


def probe_decodable(files: ImageFiles | DatasetRows, where: str, tries: int = 32) -> None:
    """Raise DataError unless one of up to ``tries`` files or rows (a fixed random sample)
    decodes.

    Catches a folder or list in which nothing is an image before any work, at the cost of
    decoding one file when the data is healthy; a large folder is never scanned whole.
    """
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))
    failures: list[UnreadableImage] = []
    for index in order[:tries].tolist():
        try:
            files.read(index)
            return
        except UnreadableImage as error:
            failures.append(error)
    examples = "; ".join(f"{Path(e.where).name} ({e.reason})" for e in failures[:3])
    if len(failures) == len(files):
        raise DataError(f"no file in {where} decodes as an image ({len(files)} tried; e.g. "
                        f"{examples})")
    raise DataError(f"none of {len(failures)} files sampled from {where} decodes as an image "
                    f"(e.g. {examples})")


def holdout_sources(files: ImageFiles, holdout_fraction: float = 0.1) -> Sources:
    """Labelled files -> all for training, and a fixed random split for the k-NN monitor."""
    paths, labels = files.paths, files.labels
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(0)).tolist()
    num_test = max(1, int(len(paths) * holdout_fraction))
    test, train = order[:num_test], order[num_test:]
    return Sources(
        train=files,
        knn_train=ImageFiles([paths[i] for i in train], [labels[i] for i in train]),
        knn_test=ImageFiles([paths[i] for i in test], [labels[i] for i in test]),
    )
