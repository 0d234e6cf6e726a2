"""Bad files never kill a run: skip, replace, report, and stop only when they are too many.

In a loader worker, ``read_or_replace`` reads one sample; when it does not decode, it draws a
replacement index from a generator seeded by (seed, epoch, index), so the batch stays full and a
resumed or repeated run reads the same replacements. The paths that failed travel back with the
batch (``CollateWithSkips``); in the main process ``SkipLog`` warns, writes them to the run
folder's skipped_files.txt, and raises DataError when more than data.max_bad_fraction of the
samples read failed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from dinolab.data.images import (
    DECODE_ERRORS,
    DataError,
    DatasetRows,
    ImageFiles,
    UnreadableImage,
    rgb_or_gray,
)
from dinolab.distributed import is_main_process, sum_over_processes

SKIPPED_FILES = "skipped_files.txt"
MAX_TRIES = 100  # replacements per sample before its batch is given up (DataError)
Skip = tuple[str, str]  # (path or item, reason)


def read_one(images: Dataset, index: int) -> Image.Image:
    """Item ``index`` as an "L" or "RGB" image, or UnreadableImage. A user's Dataset may hand
    over a lazily opened file: decoding it here puts its errors in the same place."""
    if isinstance(images, (ImageFiles, DatasetRows)):
        return images.read(index)[0]
    try:
        return rgb_or_gray(images[index][0])
    except DECODE_ERRORS as error:
        raise UnreadableImage(f"item {index}", str(error).splitlines()[0] if str(error)
                              else type(error).__name__) from None


def candidates(size: int, index: int, seed: int) -> Iterator[int]:
    """``index``, then up to MAX_TRIES replacement indices drawn from ``seed`` (the sample's own
    seed: it already mixes run seed, epoch and index). The same sequence wherever it is read,
    so the main process can go on where a worker stopped (data/device_decode.py)."""
    yield index
    generator = torch.Generator().manual_seed(seed ^ 0x5EED)
    for _ in range(MAX_TRIES):
        yield int(torch.randint(size, (), generator=generator))


def read_or_replace(images: Dataset, index: int, seed: int,
                    read: Callable[[Dataset, int], Any] = read_one,
                    start: int = 0) -> tuple[Any, list[Skip]]:
    """-> (``read(images, candidate)`` of the first candidate that reads, the skips it took);
    None when MAX_TRIES replacements failed too. ``start``: the candidates already tried."""
    skipped: list[Skip] = []
    size = len(images)  # type: ignore[arg-type]
    for candidate in itertools.islice(candidates(size, index, seed), start, None):
        try:
            return read(images, candidate), skipped
        except UnreadableImage as error:
            skipped.append((error.where, error.reason))
    return None, skipped


class CollateWithSkips:
    """A collate of (sample, skips) items -> (collated samples, all skips); the samples are
    None when one of them could not be filled (the main process then stops the run). A class,
    not a closure, so that it pickles for workers started with spawn."""

    def __init__(self, collate: Callable[[list[Any]], Any] = default_collate) -> None:
        self.collate = collate

    def __call__(self, items: list[tuple[Any, list[Skip]]]) -> tuple[Any, list[Skip]]:
        skipped = [skip for _, skips in items for skip in skips]
        if any(sample is None for sample, _ in items):
            return None, skipped
        return self.collate([sample for sample, _ in items]), skipped


class SkipLog:
    """The main process's account of skipped samples.

    The bad fraction is failures / samples read, judged over at least ``epoch_size`` samples:
    a few bad files early in a run can then not stop it, while a folder that is mostly broken
    stops within its first epoch. Each process counts its own samples; a checkpoint keeps the
    totals over processes (``totals``), and a resumed run's main process continues from them.
    """

    def __init__(self, run_dir: Path, where: str, max_bad_fraction: float, epoch_size: int,
                 warn: Callable[[str], None], warnings_in_full: int = 10,
                 collective: bool = False) -> None:
        # collective (several processes): too many failures are held in ``error`` until
        # ``check``, which every process calls at the same step, so that all stop together
        # instead of the others waiting in their next collective for the one that left.
        self.collective = collective
        self.error: DataError | None = None
        self.path = run_dir / SKIPPED_FILES
        self.where = where
        self.max_bad_fraction = max_bad_fraction
        self.epoch_size = epoch_size
        self.warn = warn
        self.warnings_in_full = warnings_in_full
        self.read = 0
        self.failed = 0
        self.examples: list[Skip] = []
        self.listed = set(self.path.read_text().splitlines()) if self.path.is_file() else set()

    def record(self, batch_size: int, skipped: list[Skip], filled: bool = True) -> None:
        """Account for one batch of ``batch_size`` samples and the skips it took."""
        self.read += batch_size + len(skipped)
        for where, reason in skipped:
            self.failed += 1
            self._list(where, reason)
        if not filled:
            raise DataError(f"{MAX_TRIES} files in a row failed to decode in {self.where}; "
                            f"{self._summary()}")
        if self.failed > self.max_bad_fraction * max(self.read, self.epoch_size):
            self.error = self.error or DataError(
                f"{self.failed} of {self.read} samples read failed to decode (more than "
                f"data.max_bad_fraction={self.max_bad_fraction:g}) in {self.where}; "
                f"{self._summary()}")
            if not self.collective:
                raise self.error

    def check(self, device: torch.device) -> int:
        """Raise the DataError of any process, on every process; -> the samples skipped so far
        by all processes together (what metrics.jsonl records). A collective when there are
        several: call it at the same step everywhere."""
        if not self.collective:
            return self.failed
        errors, failed = sum_over_processes([float(self.error is not None), float(self.failed)],
                                            device)
        if errors:
            raise self.error or DataError(
                f"another process stopped the run: too many samples failed to decode in "
                f"{self.where}; its warnings name them, and they are listed in {self.path}")
        return int(failed)

    def totals(self, device: torch.device) -> dict[str, int]:
        """The samples read and skipped so far by all processes, for a checkpoint. A collective
        when there are several: call it at the same step everywhere."""
        read, failed = sum_over_processes([float(self.read), float(self.failed)], device)
        return {"read": int(read), "failed": int(failed)}

    def resume(self, totals: dict[str, int] | None) -> None:
        """Continue a checkpoint's counts: the main process takes the totals over (``check``
        sums over processes), so the run's count and bad fraction go on where they were."""
        if totals is not None and is_main_process():
            self.read, self.failed = totals["read"], totals["failed"]

    def _list(self, where: str, reason: str) -> None:
        if len(self.examples) < 3 and where not in (known for known, _ in self.examples):
            self.examples.append((where, reason))
        if where not in self.listed:
            self.listed.add(where)
            with open(self.path, "a") as handle:
                handle.write(where + "\n")
        if self.failed <= self.warnings_in_full:
            self.warn(f"warning: skipped {where} ({reason}); {self.failed} skipped so far, "
                      f"listed in {self.path}")
        elif self.failed & (self.failed - 1) == 0:  # then at 16, 32, 64, ... skips
            self.warn(f"warning: {self.failed} samples skipped so far, listed in {self.path}")

    def _summary(self) -> str:
        examples = ", ".join(f"{Path(where).name} ({reason})" for where, reason in self.examples)
        return f"e.g. {examples}; all are listed in {self.path}"
