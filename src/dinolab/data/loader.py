"""Sampling and loading: every process sees its own shard of a per-epoch permutation.

``EpochSampler`` yields (index, epoch) pairs. The epoch travels with the index to the worker
process, where it seeds the augmentation of that image, so persistent workers need no
notification when an epoch starts and the views depend on (seed, epoch, index) only. The
sampler's position (epoch, samples already consumed by this process) is training state: a
resumed run continues mid-epoch without replaying or skipping images.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from dinolab.data.device_decode import EncodedJpeg, read_image_tensor, read_jpeg_or_image
from dinolab.data.skipping import CollateWithSkips, Skip, read_or_replace
from dinolab.data.transforms import MultiCropTransform

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant to spread (seed, epoch, index) over 64 bits


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * _MIX + epoch * 1_000_003 + index * 7_919 + 12345) % (2**63 - 1)


class EpochSampler(Sampler[tuple[int, int]]):
    """A shuffled, rank-sharded, resumable sampler (DistributedSampler semantics, drop_last)."""

    def __init__(self, dataset_size: int, batch_per_process: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        self.dataset_size = dataset_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        global_batch = batch_per_process * world_size
        self.batches_per_epoch = dataset_size // global_batch
        self.samples_per_process = self.batches_per_epoch * batch_per_process
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Start ``epoch`` after the first ``start`` samples of this process's shard."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.samples_per_process - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.dataset_size, generator=generator)
        used = order[: self.samples_per_process * self.world_size]
        shard = used[self.rank :: self.world_size][self.start :]
        for index in shard.tolist():
            yield index, self.epoch


class MultiCropDataset(Dataset):
    """(index, epoch) -> (the list of views of that image, the skips it took).

    An unreadable image is replaced by another one (data/skipping.py); the views are still
    seeded by the sampled index, so they do not depend on how the replacement came about.
    Views are None when no replacement could be read either.
    """

    def __init__(self, images: Dataset, transform: MultiCropTransform, seed: int) -> None:
        self.images = images
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[list[torch.Tensor] | None, list[Skip]]:
        index, epoch = key
        seed = sample_seed(self.seed, epoch, index)
        image, skipped = read_or_replace(self.images, index, seed)
        if image is None:
            return None, skipped
        return self.transform(image, torch.Generator().manual_seed(seed)), skipped


class DecodedImages(Dataset):
    """(index, epoch) -> (the image as uint8 [C, H, W] (C = 1 for grayscale, else 3), the
    skips it took): the whole work of a loader worker when ``BatchedMultiCrop`` makes the
    views. Unreadable images are replaced as in ``MultiCropDataset``.

    ``encoded_jpegs`` (data.decode=device): a JPEG file comes back undecoded instead, as an
    ``EncodedJpeg`` that the main process decodes on the training device (data/device_decode.py).
    """

    def __init__(self, images: Dataset, seed: int = 0, encoded_jpegs: bool = False) -> None:
        self.images = images
        self.seed = seed
        self.encoded_jpegs = encoded_jpegs

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor | EncodedJpeg | None,
                                                         list[Skip]]:
        index, epoch = key
        seed = sample_seed(self.seed, epoch, index)
        read = read_jpeg_or_image if self.encoded_jpegs else read_image_tensor
        image, skipped = read_or_replace(self.images, index, seed, read)
        if isinstance(image, EncodedJpeg):  # where the main process goes on if it fails there
            image = image._replace(seed=seed, tries=len(skipped))
        return image, skipped


def pad_collate(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """B images [C_i, H_i, W_i] -> (uint8 [B, C, H_max, W_max], sizes [B, 2] as (H_i, W_i)).

    Each image sits in the top-left corner; its last row and column are repeated into the
    padding, so that interpolation at a crop's border never reads a black pixel. Grayscale
    images are broadcast to three channels only when the batch mixes both kinds.
    """
    channels = max(image.shape[0] for image in images)
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    batch = torch.empty((len(images), channels, height, width), dtype=torch.uint8)
    sizes = torch.tensor([image.shape[1:] for image in images])
    for canvas, image in zip(batch, images, strict=True):
        h, w = image.shape[1:]
        canvas[:, :h, :w] = image
        canvas[:, :h, w:] = canvas[:, :h, w - 1: w]
        canvas[:, h:] = canvas[:, h - 1: h]
    return batch, sizes


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGINT and SIGTERM to the main process. Ctrl-C in a terminal, and
    Slurm's warning signal, reach every process of the job. A worker that died of it would
    break the loop before the main process saves the step in progress."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def stop_workers(loader: DataLoader) -> None:
    """End the loader's worker processes now (a no-op without any).

    A persistent loader keeps its workers until it is freed, and they ignore SIGTERM
    (``ignore_stop_signals``). When training raises, the traceback keeps the loader alive into
    the interpreter's exit, where multiprocessing ends daemon children with SIGTERM and then
    waits for them: a crashed run would hang there instead of exiting. DataLoader has no public
    close; its iterator's own shutdown (what its finaliser calls) ends the workers.
    """
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None  # a later epoch would start new workers


def training_loader(dataset: Dataset, sampler: EpochSampler, batch_per_process: int,
                    num_workers: int, pin_memory: bool) -> DataLoader:
    """The loader of ``MultiCropDataset`` or ``DecodedImages``: batches of (lists of views, a
    padded batch and its sizes, or a list of encoded and decoded images; the skipped samples'
    (path, reason) pairs)."""
    collate = CollateWithSkips(default_collate)
    if isinstance(dataset, DecodedImages):  # encoded JPEGs: a list, padded once decoded
        collate = CollateWithSkips(list if dataset.encoded_jpegs else pad_collate)
    # The loader's own generator: a DataLoader otherwise draws worker seeds from the global RNG
    # at every new iterator, which would shift the model's drop-path masks with num_workers.
    return DataLoader(
        dataset, batch_size=batch_per_process, sampler=sampler, drop_last=True,
        num_workers=num_workers, pin_memory=pin_memory, generator=torch.Generator(),
        persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
        collate_fn=collate, worker_init_fn=ignore_stop_signals,
    )
