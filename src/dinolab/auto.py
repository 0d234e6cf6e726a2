"""Dataset-size-aware defaults: what ``auto`` means for the keys that depend on the data.

DINO's reference values (K = 65,536, a teacher momentum of 0.996, 10 epochs of warm-up, a
frozen prototype layer for the first epoch, 100 epochs) were chosen for 1.28M images and 125k
optimizer steps. On a folder of 2,000 images they give a run of a few dozen steps that spends
them warming up and ends below its own initialisation (docs/LOG.md, 2026-12-07). The keys below
accept ``auto``, their default: each is resolved once, at the start of a run, from the number of
training images, the batch and the run's length, by ``resolve``, a pure function. The resolved
values are printed in one line and saved in the run folder's config.yaml, and a resumed run
takes them from there, so that it keeps the values it started with even if the data set has
changed size. A value set in a preset, a YAML file or on the command line always wins.

The table (each row a recipe measured in docs/LOG.md; README's "Dataset-size-aware defaults"
shows it with the evidence):

| training images | batch                        | epochs: images seen x c | K      | teacher temp |
| --------------- | ---------------------------- | ----------------------- | ------ | ------------ |
| < 1,000,000     | 2^k near N / 400, [32, 1024] | 3N, within [20k, 180k]  | 1,024  | 0.02         |
| >= 1,000,000    | 1,024                        | 100 epochs              | 65,536 | 0.04         |

The images seen are counted at a fixed compute: c = 3.5 / v, where v is what an image's views
cost in global crops (2 global crops, and each local crop by its area against theirs) and 3.5
that of the recipe the row was measured with (6 local crops of a quarter of the area). The
default, 2 global crops alone, sees 1.75x the images: the demo 5 epochs, a folder of 2,000
images 18.

| training images | lr warm-up                 | prototype freeze          |
| --------------- | -------------------------- | ------------------------- |
| < 1,000,000     | 7.5% of the run            | none                      |
| >= 1,000,000    | 10% of the run, <= 10 ep.  | 1% of the run, <= 1 epoch |

The first row is the demo's recipe (Fashion-MNIST's 60,000 images: batch 128, 5 epochs without
local crops), which smaller sets keep with a smaller batch and more epochs: a folder of 2,000
images gets batch 32 and 18 epochs (1,116 steps), where batch 128 and 2 epochs with 6 local
crops gave 30 steps and ended below the network's initialisation. The second row is the
reference (ImageNet-1k). For every size the teacher momentum starts at 1 - 10 / steps, within
[0.99, 0.996] (the EMA's horizon of 1 / (1 - m) steps a tenth of a short run; the reference's
0.996 from 2,500 steps on), and the teacher temperature does not warm up (as the reference's
default).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

AUTO = "auto"
# The keys that accept auto, in the order they are resolved and printed.
AUTO_KEYS = ("train.batch_size", "train.epochs", "model.head.out_dim", "loss.teacher_temp",
             "loss.warmup_teacher_temp", "loss.warmup_teacher_temp_epochs",
             "optim.teacher_momentum", "optim.warmup_epochs", "optim.freeze_last_layer_epochs")


@dataclass(frozen=True)
class Row:
    """The recipe for data sets of at least ``min_images`` training images."""

    min_images: int
    out_dim: int
    teacher_temp: float
    warmup_fraction: float  # of the run's steps, at most MAX_WARMUP_EPOCHS epochs
    freeze_fraction: float  # of the run's steps, at most MAX_FREEZE_EPOCHS epochs
    reference: bool  # batch REFERENCE_BATCH and REFERENCE_EPOCHS; else scaled by the size


ROWS = (
    Row(0, 1024, 0.02, 0.075, 0.0, reference=False),
    Row(1_000_000, 65536, 0.04, 0.10, 0.01, reference=True),
)
REFERENCE_BATCH, REFERENCE_EPOCHS = 1024, 100
IMAGES_PER_STEP = 400  # the batch is about N / 400 (the demo's 468 steps an epoch) ...
BATCH_RANGE = (32, 1024)  # ... a power of 2 in this range
IMAGES_SEEN = (20_000, 180_000)  # epochs that see about 3N images, within this range
# ... with views that cost as many global views as the recipe that range was measured with: 2
# global crops and 6 local crops of a quarter of their area (docs/LOG.md, 2026-11-27)
REFERENCE_VIEWS = 3.5
MAX_WARMUP_EPOCHS = 10.0
MAX_FREEZE_EPOCHS = 1.0
MOMENTUM_RANGE = (0.99, 0.996)
MOMENTUM_HORIZON = 10  # the EMA averages over about steps / MOMENTUM_HORIZON steps


def row_for(num_images: int) -> Row:
    return [row for row in ROWS if num_images >= row.min_images][-1]


def steps_per_epoch(num_images: int, batch_size: int, limit: int = 0) -> int:
    """As the sampler counts them: whole global batches only, capped by a step limit."""
    steps = num_images // batch_size
    return min(steps, limit) if limit else steps


def auto_batch(num_images: int, processes: int = 1, accumulation_steps: int = 1) -> int:
    """A power of 2 near N / 400 within BATCH_RANGE (1024 from 1M images on), made a multiple of
    what the processes and accumulation steps split it into."""
    if row_for(num_images).reference:
        batch = REFERENCE_BATCH
    else:
        low, high = BATCH_RANGE
        power = 2 ** math.floor(math.log2(max(num_images, 1) / IMAGES_PER_STEP))
        batch = min(high, max(low, power))
    split = processes * accumulation_steps
    return math.ceil(batch / split) * split


def views_per_image(data: Any) -> float:
    """What one training image costs, in global views: its 2 global crops, and each local crop
    by its area against a global crop's (a ViT's tokens, a CNN's pixels)."""
    return 2 + data.num_local_crops * (data.local_crop_size / data.global_crop_size) ** 2


def auto_epochs(num_images: int, views: float = REFERENCE_VIEWS) -> int:
    """Epochs that see about 3N images (within IMAGES_SEEN) at the cost of REFERENCE_VIEWS
    views an image: cheaper views buy more epochs in the same compute."""
    if row_for(num_images).reference:
        return REFERENCE_EPOCHS
    low, high = IMAGES_SEEN
    seen = min(high, max(low, 3 * num_images)) * REFERENCE_VIEWS / views
    return max(1, math.floor(seen / num_images + 0.5))  # halves round up


def auto_values(num_images: int, batch_size: int | str = AUTO, epochs: int | str = AUTO,
                limit_steps_per_epoch: int = 0, processes: int = 1,
                accumulation_steps: int = 1, views: float = REFERENCE_VIEWS) -> dict[str, Any]:
    """The value of every key in AUTO_KEYS for a data set of ``num_images`` images.

    ``batch_size`` and ``epochs`` are the user's (ints) or auto; the run's length in steps,
    which the momentum and the warm-ups follow, comes from them. ``views``: what an image
    costs (``views_per_image``), which auto epochs follow.
    """
    row = row_for(num_images)
    batch = (auto_batch(num_images, processes, accumulation_steps) if batch_size == AUTO
             else batch_size)
    epochs = auto_epochs(num_images, views) if epochs == AUTO else epochs
    assert isinstance(batch, int) and isinstance(epochs, int)
    per_epoch = max(steps_per_epoch(num_images, batch, limit_steps_per_epoch), 1)
    total_steps = per_epoch * epochs
    low, high = MOMENTUM_RANGE
    return {
        "train.batch_size": batch,
        "train.epochs": epochs,
        "model.head.out_dim": row.out_dim,
        "loss.teacher_temp": row.teacher_temp,
        "loss.warmup_teacher_temp": row.teacher_temp,
        "loss.warmup_teacher_temp_epochs": 0,
        "optim.teacher_momentum": min(high, max(low, 1 - MOMENTUM_HORIZON / total_steps)),
        "optim.warmup_epochs": min(MAX_WARMUP_EPOCHS, row.warmup_fraction * epochs),
        "optim.freeze_last_layer_epochs": min(MAX_FREEZE_EPOCHS, row.freeze_fraction * epochs),
    }


def get(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = getattr(config, part)
    return config


def set_value(config: Any, key: str, value: Any) -> None:
    *path, last = key.split(".")
    for part in path:
        config = getattr(config, part)
    setattr(config, last, value)


def unresolved(config: Any) -> list[str]:
    """The keys of ``config`` still at auto."""
    return [key for key in AUTO_KEYS if get(config, key) == AUTO]


def resolve(config: Any, num_images: int, kept: dict[str, Any] | None = None,
            processes: int = 1) -> tuple[Any, dict[str, Any]]:
    """(a copy of ``config`` with no auto left, {key: value} of the keys that were auto).

    ``kept`` holds the values a run folder's config.yaml saved for these keys: a resumed run
    takes them instead of resolving again. Keys the user set are never touched.
    """
    keys = unresolved(config)
    resolved = copy.deepcopy(config)
    if not keys:
        return resolved, {}
    kept = kept or {}
    train = config.train
    values = auto_values(num_images, kept.get("train.batch_size", train.batch_size),
                         kept.get("train.epochs", train.epochs), train.limit_steps_per_epoch,
                         processes, train.accumulation_steps, views_per_image(config.data))
    chosen = {key: kept.get(key, values[key]) for key in keys}
    for key, value in chosen.items():
        set_value(resolved, key, value)
    return resolved, chosen


def describe(chosen: dict[str, Any], num_images: int, from_run_folder: bool = False) -> str:
    """One line: what auto became for this run, and from what."""
    items = ", ".join(f"{key}={_short(value)}" for key, value in chosen.items())
    source = "as the run folder saved them" if from_run_folder else f"for {num_images} images"
    return f"auto values ({source}): {items}"


def _short(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


# The data set a preset is written for: its auto keys are resolved for this size where no data
# is read (the speed and memory benchmarks build a preset's networks on synthetic inputs).
PRESET_IMAGES = {"demo": 60_000}  # Fashion-MNIST; every other preset: ImageNet-1k


def resolve_for_preset(config: Any, preset: str | None) -> Any:
    """``config`` resolved as on the data set its preset (None: the demo) is written for."""
    return resolve(config, PRESET_IMAGES.get(preset or "demo", 1_281_167))[0]
