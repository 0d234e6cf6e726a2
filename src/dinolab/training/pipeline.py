"""The training data pipeline: sampler, loader, and where the multi-crop views are made.

``data.augmentation=auto`` is ``batched`` on GPUs, where per-image PIL views cannot keep up
with the model (22% of the step's speed on an H100, against 58% batched), and ``pil``
elsewhere. With ``pil`` the loader's workers return the views of each image, made with
PIL (``MultiCropTransform``), seeded per image by (seed, epoch, index). With ``batched`` the
workers only decode; the padded uint8 batch travels to the training device (pinned, non-blocking
on CUDA) and ``BatchedMultiCrop`` makes every view there, seeded per micro-batch by
(seed, epoch, micro-batch position, rank), so a resumed run still draws the same views.
With ``data.decode=device`` the workers hand JPEG files over undecoded, and ``views`` first
decodes them on the training device (data/device_decode.py) into the same padded batch.
Either way each batch also carries the files its workers had to skip; ``views`` hands them to
the ``SkipLog``, which reports them and stops the run when they are too many.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from dinolab.config import Config, ConfigError
from dinolab.data.batched_augment import BatchedMultiCrop
from dinolab.data.device_decode import JpegDecoder
from dinolab.data.images import DatasetRows, ImageFiles
from dinolab.data.loader import (
    DecodedImages,
    EpochSampler,
    MultiCropDataset,
    sample_seed,
    stop_workers,
    training_loader,
)
from dinolab.data.skipping import SkipLog
from dinolab.data.transforms import MultiCropTransform
from dinolab.distributed import rank, world_size
from dinolab.training.monitor import say
from dinolab.training.schedules import RunLength


@dataclass
class TrainingData:
    loader: DataLoader
    sampler: EpochSampler
    length: RunLength  # the run length in optimizer steps
    augment: BatchedMultiCrop | None  # None: the loader already returns views
    seed: int
    skips: SkipLog
    prefetch: bool = False  # data.prefetch_views
    decode: JpegDecoder | None = None  # data.decode=device: the batches hold undecoded JPEGs

    def close(self) -> None:
        """End the loader's workers, however training ended (see ``stop_workers``)."""
        stop_workers(self.loader)

    def views(self, batch: Any, device: torch.device, epoch: int,
              micro_batch: int) -> list[torch.Tensor]:
        """The loader's batch -> V views [b, 3, S, S] on ``device``; ``micro_batch`` is the
        position of this micro-batch in this process's epoch. Raises DataError when too many
        samples failed to decode."""
        samples, skipped = batch
        if self.decode is not None and samples is not None:  # data.decode=device
            samples, decode_skips = self.decode(samples, device)
            skipped = skipped + decode_skips
        filled = samples is not None
        self.skips.record(len(samples[0]) if filled else 0, skipped, filled)
        if self.augment is None:
            return [view.to(device, non_blocking=True) for view in samples]
        images, sizes = samples
        position = micro_batch * world_size() + rank()
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, position))
        return self.augment(images.to(device, non_blocking=True), sizes, generator)

    def epoch_views(self, device: torch.device, epoch: int, first_micro_batch: int,
                    count: int) -> Iterator[list[torch.Tensor]]:
        """The views of the loader's next ``count`` micro-batches, the first at position
        ``first_micro_batch`` of this process's epoch (the sampler is already positioned).

        With ``data.prefetch_views`` on CUDA, micro-batch i+1's views are launched on a side
        stream before micro-batch i is handed over, so the augmentation can overlap step i.
        """
        if count <= 0:
            return  # without starting the loader's workers
        prefetch = self.prefetch and self.augment is not None
        streams = _SideStream(device if prefetch else None)
        batches = itertools.islice(self.loader, count)
        launched = (streams.launch(self.views, batch, device, epoch, position)
                    for position, batch in enumerate(batches, first_micro_batch))
        for views in _one_ahead(launched) if prefetch else launched:
            yield streams.hand_over(views)


Launched = tuple[list[torch.Tensor], Any]  # views, and the event that marks them ready


class _SideStream:
    """Work launched on a side CUDA stream and handed to the current stream when consumed.

    Tensors made on the side stream are recorded as used by the current one, so the caching
    allocator cannot give their memory back to the side stream while a step still reads them.
    Elsewhere (or with ``device`` None) there are no streams: ``launch`` just runs and
    ``hand_over`` returns.
    """

    def __init__(self, device: torch.device | None) -> None:
        self.cuda = device is not None and device.type == "cuda"
        if self.cuda:
            self.main = torch.cuda.current_stream(device)
            self.side = torch.cuda.Stream(device)

    def launch(self, make: Callable[..., list[torch.Tensor]],
               *arguments: Any) -> Launched:
        if not self.cuda:
            return make(*arguments), None
        with torch.cuda.stream(self.side):
            tensors = make(*arguments)
        for tensor in tensors:
            tensor.record_stream(self.main)
        return tensors, self.side.record_event()

    def hand_over(self, launched: Launched) -> list[torch.Tensor]:
        tensors, ready = launched
        if ready is not None:
            self.main.wait_event(ready)  # a device-side wait: no host sync
        return tensors


def _one_ahead(items: Iterator[Launched]) -> Iterator[Launched]:
    """Each item, yielded once the one after it has been made (its work launched)."""
    ahead = next(items, None)
    while ahead is not None:
        following = next(items, None)
        yield ahead
        ahead = following


def resolve_augmentation(name: str, device: torch.device) -> str:
    """``auto`` -> ``batched`` on CUDA devices, ``pil`` elsewhere; other names unchanged."""
    if name == "auto":
        return "batched" if device.type == "cuda" else "pil"
    return name


def check_for_device(config: Config, device: torch.device) -> str:
    """The data settings that only the training device can judge -> the augmentation used.
    Raises ConfigError (train calls this before it writes anything)."""
    augmentation = resolve_augmentation(config.data.augmentation, device)
    if config.data.decode == "device" and augmentation != "batched":
        raise ConfigError(f"invalid value for data.decode: device needs the batched "
                          f"augmentation (data.augmentation={config.data.augmentation} is "
                          f"{augmentation} on {device.type})")
    return augmentation


def build_training_data(config: Config, images: Dataset, device: torch.device) -> TrainingData:
    processes = world_size()
    batch_per_process = config.train.batch_size // processes
    micro_batch = batch_per_process // config.train.accumulation_steps
    sampler = EpochSampler(len(images), batch_per_process, config.train.seed,  # type: ignore[arg-type]
                           rank(), processes)
    steps_per_epoch = sampler.batches_per_epoch
    if config.train.limit_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.train.limit_steps_per_epoch)
    augment = None
    decode = None
    dataset: Dataset
    augmentation = check_for_device(config, device)
    if augmentation == "batched":
        decode = JpegDecoder(images) if config.data.decode == "device" else None
        dataset = DecodedImages(images, config.train.seed, encoded_jpegs=decode is not None)
        augment = BatchedMultiCrop(  # compiled on GPUs only: on CPUs it is slower (LOG.md)
            config.data, compile=config.train.compile and device.type == "cuda")
    else:
        dataset = MultiCropDataset(images, MultiCropTransform(config.data), config.train.seed)
    loader = training_loader(dataset, sampler, micro_batch, config.data.num_workers,
                             pin_memory=device.type == "cuda")
    length = RunLength(steps_per_epoch, config.train.epochs)
    named = isinstance(images, (ImageFiles, DatasetRows))
    where = config.data.root if named else "the training data set"
    skips = SkipLog(Path(config.run.dir), where, config.data.max_bad_fraction,
                    sampler.samples_per_process, warn=say, collective=processes > 1)
    return TrainingData(loader, sampler, length, augment, config.train.seed, skips,
                        config.data.prefetch_views, decode)
