"""The training data pipeline: sampler, loader, and where the multi-crop views are made.

``data.augmentation=auto`` is ``batched`` on GPUs, where per-image PIL views cannot keep up
with the model (22% of the step's speed on an H100, against 58% batched), and ``pil``
elsewhere. With ``pil`` the loader's workers return the views of each image, made with
PIL (``MultiCropTransform``), seeded per image by (seed, epoch, index). With ``batched`` the
workers only decode; the padded uint8 batch travels to the training device (pinned, non-blocking
on CUDA) and ``BatchedMultiCrop`` makes every view there, seeded per micro-batch by
(seed, epoch, micro-batch position, rank), so a resumed run still draws the same views.
Either way each batch also carries the files its workers had to skip; ``views`` hands them to
the ``SkipLog``, which reports them and stops the run when they are too many.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from dinolab.config import Config
from dinolab.data.batched_augment import BatchedMultiCrop
from dinolab.data.images import ImageFiles
from dinolab.data.loader import (
    DecodedImages,
    EpochSampler,
    MultiCropDataset,
    sample_seed,
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

    def views(self, batch: Any, device: torch.device, epoch: int,
              micro_batch: int) -> list[torch.Tensor]:
        """The loader's batch -> V views [b, 3, S, S] on ``device``; ``micro_batch`` is the
        position of this micro-batch in this process's epoch. Raises DataError when too many
        samples failed to decode."""
        samples, skipped = batch
        filled = samples is not None
        self.skips.record(len(samples[0]) if filled else 0, skipped, filled)
        if self.augment is None:
            return [view.to(device, non_blocking=True) for view in samples]
        images, sizes = samples
        position = micro_batch * world_size() + rank()
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, position))
        return self.augment(images.to(device, non_blocking=True), sizes, generator)

    def progress(self) -> dict[str, int]:
        """Extra progress-bar fields: the skipped samples, once there are any."""
        return {"skipped": self.skips.failed} if self.skips.failed else {}


def resolve_augmentation(name: str, device: torch.device) -> str:
    """``auto`` -> ``batched`` on CUDA devices, ``pil`` elsewhere; other names unchanged."""
    if name == "auto":
        return "batched" if device.type == "cuda" else "pil"
    return name


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
    dataset: Dataset
    if resolve_augmentation(config.data.augmentation, device) == "batched":
        dataset = DecodedImages(images, config.train.seed)
        augment = BatchedMultiCrop(config.data)
    else:
        dataset = MultiCropDataset(images, MultiCropTransform(config.data), config.train.seed)
    loader = training_loader(dataset, sampler, micro_batch, config.data.num_workers,
                             pin_memory=device.type == "cuda")
    length = RunLength(steps_per_epoch, config.train.epochs)
    where = config.data.root if isinstance(images, ImageFiles) else "the training data set"
    skips = SkipLog(Path(config.run.dir), where, config.data.max_bad_fraction,
                    sampler.samples_per_process, warn=say, collective=processes > 1)
    return TrainingData(loader, sampler, length, augment, config.train.seed, skips)
