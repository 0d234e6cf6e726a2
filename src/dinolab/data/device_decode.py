"""data.decode=device: JPEG files decoded in the main process, in one batched call on the
training device, instead of one by one in the loader's workers.

With the batched augmentation the workers do nothing but decode, and on an H100 their CPU JPEG
decoders (1,750 images/s from 14 workers) barely outrun the ViT-S step (1,505 images/s).
``torchvision.io.decode_jpeg`` decodes a list of files with nvJPEG on a CUDA device; on the CPU
it runs libjpeg-turbo, which gives the same pixels as PIL (the CPU is where this path is
tested; it only pays off on CUDA).

In a worker, ``read_jpeg_or_image`` reads a JPEG file's bytes and only its header: the EXIF
orientation and the upright size (PIL parses the header at ``Image.open``). Everything else is
decoded in the worker as with data.decode=workers: other formats, JPEGs PIL would not read as
plain "L" or "RGB" (CMYK, multi-picture), files that do not end in the end-of-image marker
(cut short, or with trailing data), and data sets that are not files. In the main process
``JpegDecoder`` decodes the batch's JPEGs, turns them upright, and pads them into the canvas
``pad_collate`` would have made, so ``BatchedMultiCrop`` sees the same batch either way.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import ExifTags, Image
from torch.utils.data import Dataset
from torchvision.transforms import functional as F

from dinolab.data.images import DECODE_ERRORS, ImageFiles
from dinolab.data.skipping import Skip, read_one, read_or_replace

_START_OF_IMAGE, _END_OF_IMAGE = b"\xff\xd8", b"\xff\xd9"


class EncodedJpeg(NamedTuple):
    """One JPEG file as a worker hands it over: bytes and header, not yet decoded."""

    data: torch.Tensor  # uint8 [file size]: the whole file
    height: int  # upright, after the EXIF orientation
    width: int
    channels: int  # 1 grayscale, 3 colour (as decode_image would give)
    orientation: int  # the EXIF Orientation tag, 1 (upright) to 8
    file_index: int  # the data set's index of this file
    seed: int = 0  # the sample's seed, and the candidates its worker tried before this file
    tries: int = 0  # (data/skipping.py): where replacements go on if it does not decode


def read_image_tensor(images: Dataset, index: int) -> torch.Tensor:
    """Item ``index`` decoded -> uint8 [C, H, W], as data.decode=workers reads it."""
    return F.pil_to_tensor(read_one(images, index))


def read_jpeg(path: Path, index: int) -> EncodedJpeg | None:
    """A JPEG file's bytes and header, or None where the worker should decode the file itself
    (not a JPEG, another mode, unreadable, or no end-of-image marker at the end). None is never
    wrong: decode_image then decodes the file, or reports why it cannot, as it always does."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not (data.startswith(_START_OF_IMAGE) and data.endswith(_END_OF_IMAGE)):
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG" or image.mode not in ("L", "RGB"):
                return None
            # getexif as ImageOps.exif_transpose reads it (with XMP's orientation as fallback)
            tag = image.getexif().get(ExifTags.Base.Orientation, 1)
            width, height = image.size
            channels = 1 if image.mode == "L" else 3
    except DECODE_ERRORS:
        return None
    orientation = int(tag) if tag in range(2, 9) else 1  # exif_transpose ignores other tags
    if orientation >= 5:  # a quarter turn or a transpose: the stored width is the height
        height, width = width, height
    return EncodedJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), height, width,
                       channels, orientation, index)


def read_jpeg_or_image(images: Dataset, index: int) -> EncodedJpeg | torch.Tensor:
    """What a worker hands over with data.decode=device: an EncodedJpeg, or the decoded image
    [C, H, W]. Raises UnreadableImage as ``read_one`` does."""
    if isinstance(images, ImageFiles):
        jpeg = read_jpeg(images.paths[index], index)
        if jpeg is not None:
            return jpeg
    return read_image_tensor(images, index)


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """[C, H, W] as stored -> upright, as ``ImageOps.exif_transpose`` turns a PIL image (EXIF
    orientations 2 to 8: the mirror images and quarter turns a camera records)."""
    if orientation == 2:  # FLIP_LEFT_RIGHT
        return image.flip(-1)
    if orientation == 3:  # ROTATE_180
        return image.flip(-2, -1)
    if orientation == 4:  # FLIP_TOP_BOTTOM
        return image.flip(-2)
    if orientation == 5:  # TRANSPOSE
        return image.transpose(-2, -1)
    if orientation == 6:  # ROTATE_270: a quarter turn clockwise
        return image.rot90(-1, (-2, -1))
    if orientation == 7:  # TRANSVERSE
        return image.flip(-2, -1).transpose(-2, -1)
    if orientation == 8:  # ROTATE_90: a quarter turn anticlockwise
        return image.rot90(1, (-2, -1))
    return image


def _decode_on_device(jpegs: list[EncodedJpeg], device: torch.device,
                      ) -> list[torch.Tensor | None]:
    """-> each JPEG upright [channels, height, width] on ``device``, None where it failed.

    One batched call; when it raises, one call per file, so one bad file costs only itself."""
    if not jpegs:
        return []
    # Imported here: torchvision 0.29 deprecates its decoders in favour of TorchCodec, and a
    # torchvision without them must break only data.decode=device, not every import.
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [jpeg.data for jpeg in jpegs]
    try:
        decoded: list[torch.Tensor | None] = list(
            decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        decoded = [_decode_one(one, device) for one in data]
    return [None if image is None else _as_read(image, jpeg)
            for image, jpeg in zip(decoded, jpegs, strict=True)]


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)  # type: ignore[return-value]
    except RuntimeError:
        return None


def _as_read(image: torch.Tensor, jpeg: EncodedJpeg) -> torch.Tensor | None:
    """RGB-decoded [3, h, w] -> what decode_image gives: upright, one channel for grayscale
    (the RGB mode copies the gray value into all three). None when the decoder's size is not
    the header's: the crop boxes are drawn from the header's, and must not cut elsewhere."""
    image = upright(image[: jpeg.channels], jpeg.orientation)
    return image if tuple(image.shape[1:]) == (jpeg.height, jpeg.width) else None


def pad_on_device(images: list[torch.Tensor], device: torch.device,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """B images [C_i, H_i, W_i] on ``device`` -> (uint8 [B, C, H_max, W_max] on ``device``,
    sizes [B, 2] on the CPU): ``pad_collate``'s canvas (top-left corner, last row and column
    repeated, grayscale broadcast to 3 channels in a mixed batch), with the padding filled by
    two gathers over the batch instead of three copies per image."""
    channels = max(image.shape[0] for image in images)
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    sizes = torch.tensor([image.shape[1:] for image in images])
    canvas = torch.empty((len(images), channels, height, width), dtype=torch.uint8,
                         device=device)
    for slot, image in zip(canvas, images, strict=True):
        slot[:, : image.shape[1], : image.shape[2]] = image
    # the row (column) each canvas row (column) copies: itself inside the image, else the last
    rows = torch.arange(height).minimum(sizes[:, :1] - 1)  # [B, H]
    columns = torch.arange(width).minimum(sizes[:, 1:] - 1)  # [B, W]
    indices = torch.cat([rows, columns], dim=1)
    if device.type == "cuda":
        indices = indices.pin_memory()  # an asynchronous copy: no host sync
    rows, columns = indices.to(device, non_blocking=True).split([height, width], dim=1)
    shape = canvas.shape
    canvas = canvas.gather(2, rows[:, None, :, None].expand(shape))
    return canvas.gather(3, columns[:, None, None, :].expand(shape)), sizes


class JpegDecoder:
    """The main process's half of data.decode=device: a batch of worker items (EncodedJpeg or
    decoded [C, H, W]) -> the padded canvas and sizes on the training device, and the skips.

    A JPEG that fails on the device, in the batched call and alone, is decoded with PIL here
    (``decode_image``: a file nvJPEG does not support still trains). When PIL fails too, the
    file is skipped and replaced exactly as a worker would have done: by the next candidate of
    the sample's own seeded sequence (``read_or_replace`` from the candidates its worker
    already tried), read here. The replacement then depends on (seed, epoch, index) only, so a
    resumed run reads the same one, and the batch equals data.decode=workers' batch.
    """

    def __init__(self, images: Dataset) -> None:
        self.images = images

    def __call__(self, items: list[EncodedJpeg | torch.Tensor], device: torch.device,
                 ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, list[Skip]]:
        jpegs = [item for item in items if isinstance(item, EncodedJpeg)]
        decoded = iter(_decode_on_device(jpegs, device))
        images: list[torch.Tensor] = []
        skipped: list[Skip] = []
        for item in items:
            image = next(decoded) if isinstance(item, EncodedJpeg) else item
            if image is None and isinstance(item, EncodedJpeg):  # the device could not decode it
                # position ``tries`` of the sample's candidates is this file itself
                image, skips = read_or_replace(self.images, item.file_index, item.seed,
                                               read_image_tensor, start=item.tries)
                skipped += skips
            if image is None:
                return None, skipped
            images.append(image.to(device, non_blocking=True))
        return pad_on_device(images, device), skipped
