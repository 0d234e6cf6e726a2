"""The training loop: data, epochs, logging, k-NN monitor, checkpoints, resume."""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import Dataset, Subset

from dinolab import auto
from dinolab.config import Config, ConfigError, from_dict, to_dict, to_yaml, validate
from dinolab.data.datasets import UNLABELLED, Sources, build_sources
from dinolab.data.skipping import SkipLog
from dinolab.data.transforms import EvalTransform
from dinolab.distributed import (
    all_reduce_mean,
    any_process,
    barrier,
    init_distributed,
    is_main_process,
    rank,
    shutdown,
    world_size,
)
from dinolab.training import schedules
from dinolab.training.checkpoint import (
    LATEST,
    CheckpointWriteError,
    load_latest,
    save_checkpoint,
    step_file,
)
from dinolab.training.collapse import CollapseDetector
from dinolab.training.monitor import Metrics, last_knn, progress_bar, say
from dinolab.training.nonfinite import LEVERS, FiniteWatch, NonFiniteLoss, state_is_finite
from dinolab.training.pipeline import TrainingData, build_training_data, check_for_device
from dinolab.training.preemption import RunStopped, StopControl
from dinolab.training.state import TrainingState, build_state, resolve_device
from dinolab.training.step import StepValues, train_step
from dinolab.training.teacher_monitor import look_at_teacher
from dinolab.training.wandb_logging import require_wandb, start_wandb

# Keys that may differ when a run folder is resumed: where it runs and how it reports.
RESUMABLE_CHANGES = ("run.", "data.num_workers", "data.root", "data.download",
                     "data.max_bad_fraction", "data.prefetch_views", "data.decode", "eval.",
                     "train.device", "train.compile", "train.parallel",
                     "model.grad_checkpointing")


__all__ = ["CheckpointWriteError", "NonFiniteLoss", "RunStopped", "TrainResult", "train"]


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    knn_start: float | None
    knn_end: float | None
    seconds: float


def step_values(config: Config, length: schedules.RunLength, step: int, epoch: int) -> StepValues:
    return StepValues(
        lr=schedules.learning_rate(config, length, step),
        weight_decay=schedules.weight_decay(config, length, step),
        teacher_momentum=schedules.teacher_momentum(config, length, step),
        teacher_temp=schedules.teacher_temperature(config, epoch),
        freeze_last_layer=schedules.last_layer_frozen(config, length, step),
    )


def seed_everything(config: Config) -> None:
    seed = config.train.seed + rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if config.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode also fills every new tensor (a guard against reading memory never
        # written): 3.5% of the demo's CPU step, and nothing that equal results depend on.
        torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
        torch.backends.cudnn.benchmark = False


class _AsPairs(Dataset):
    """A user's Dataset returning an image or (image, label) -> (image, label)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        item = self.dataset[index]
        return (item[0], int(item[1])) if isinstance(item, (tuple, list)) else (item, UNLABELLED)


def _changed_keys(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += _changed_keys(old, new, f"{name}.")
        elif old != new and not name.startswith(RESUMABLE_CHANGES):
            changed.append(f"{name} ({old!r} -> {new!r})")
    return changed


def prepare_run_dir(config: Config) -> Path:
    """Create the run folder, or check that an existing one holds this same configuration."""
    run_dir = Path(config.run.dir)
    saved_config = run_dir / "config.yaml"
    if saved_config.is_file():
        saved = to_dict(from_dict(OmegaConf.to_container(OmegaConf.load(saved_config))))  # type: ignore[arg-type]
        changed = _changed_keys(saved, to_dict(config))
        if changed:
            raise ConfigError(
                f"run folder {run_dir} holds a run with another configuration: "
                f"{', '.join(changed[:3])}; use a new run.dir"
            )
    if is_main_process():
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not saved_config.is_file():
                saved_config.write_text(to_yaml(config))
        except OSError as error:
            raise ConfigError(f"invalid value for run.dir: cannot write {run_dir}: "
                              f"{error.strerror}") from None
    barrier()
    return run_dir


@dataclass
class RunContext:
    """What the loop reports to and guards with, besides the training state."""

    run_dir: Path
    metrics: Metrics
    watch: FiniteWatch  # NaN/inf of any step, read at log steps and before saves
    control: StopControl  # stop signals and the wall-clock checkpoint timer
    collapse: CollapseDetector | None  # None: the objective has no teacher distribution
    skips: SkipLog  # the data's skipped samples, whose totals a checkpoint keeps

    def last_good(self) -> Path | None:
        return self.run_dir / LATEST if (self.run_dir / LATEST).is_file() else None


def save(state: TrainingState, run: RunContext, keep_epoch_copy: bool) -> Path:
    """Checkpoint the current step (the main process writes; every process calls this).

    Never from a non-finite state: the watch is read (a host sync) and the parameters scanned
    first. A failed write on the main process stops every process with CheckpointWriteError.
    """
    run.watch.check(run.last_good())
    tensors = state.student_shards + state.teacher_shards + list(state.loss.buffers())
    (not_finite,) = any_process([not state_is_finite(tensors)], state.device)  # shards differ
    if not_finite:
        raise NonFiniteLoss(f"the parameters are not finite after step {state.step}; last good "
                            f"checkpoint: {run.last_good() or 'none yet'}; {LEVERS}")
    # The epoch's running loss, averaged over processes (a collective), so that a resume, which
    # gives every process the main one's, continues the same mean.
    all_reduce_mean(state.epoch_loss_sum)
    path, error = step_file(run.run_dir, state.step), None
    checkpoint = state.state_dict()  # a collective when sharded: the main process gets it all
    checkpoint["skips"] = run.skips.totals(state.device)  # a collective
    if is_main_process():
        teacher_backbone = {key.removeprefix("backbone."): value
                            for key, value in checkpoint["teacher"].items()
                            if key.startswith("backbone.")}
        try:
            save_checkpoint(run.run_dir, checkpoint, teacher_backbone,
                            state.config.run.keep_last_checkpoints, keep_epoch_copy)
        except CheckpointWriteError as failure:
            error = failure
    (failed,) = any_process([error is not None], state.device)  # also the barrier
    if failed:
        raise error or CheckpointWriteError("the main process could not write the checkpoint")
    run.control.saved()
    return path


def _log_step(state: TrainingState, run: RunContext, loss: torch.Tensor, values: StepValues,
              images_per_second: float, skipped: int) -> tuple[float, dict[str, float]]:
    """Metrics of a log step -> the loss and its terms (host syncs: the finite check, the
    loss, its terms, the objective's monitored values such as DINO's teacher entropy).

    ``skipped``: the samples skipped so far, recorded once there are any."""
    run.watch.check(run.last_good())
    loss_value = loss.item()
    terms = {name: value.item() for name, value in state.terms.items()}
    monitored = state.objective.monitor(loss_value, terms)
    run.metrics.log("train", state.step, {
        "epoch": state.epoch, "loss": loss_value, **terms, "lr": values.lr,
        "weight_decay": values.weight_decay, "teacher_momentum": values.teacher_momentum,
        "teacher_temp": values.teacher_temp, "images_per_second": images_per_second,
        **monitored, **({"skipped": skipped} if skipped else {}),
    })
    signal = state.objective.collapse_signal(loss_value, terms, monitored)
    warning = run.collapse.observe(state.step, *signal) if signal and run.collapse else None
    if warning:
        say(warning)
    return loss_value, terms


@dataclass(frozen=True)
class EpochResult:
    mean_loss: float
    skipped: int  # samples skipped so far by all processes


def run_epoch(state: TrainingState, data: TrainingData, run: RunContext) -> EpochResult:
    """Train one epoch (or its remainder after a resume) -> its mean loss and the skip count.

    Mid-epoch checkpoints (the timer, a stop signal) hold the sampler position and the epoch's
    running loss, so a resume from one continues with the next batch and the mean covers the
    whole epoch; a stop signal raises RunStopped after its save.
    """
    config, epoch, length = state.config, state.epoch, data.length
    accumulation = config.train.accumulation_steps
    batch_per_process = config.train.batch_size // world_size()
    done = state.samples_into_epoch // batch_per_process
    data.sampler.set_position(epoch, state.samples_into_epoch)
    bar = progress_bar(length.steps_per_epoch, done, epoch, length.epochs, config.run.progress_bar)
    steps, tick = 0, time.perf_counter()  # steps: in this call (a resume continues at ``done``)
    micro_batches: list[list[torch.Tensor]] = []
    remaining = (length.steps_per_epoch - done) * accumulation  # micro-batches
    for views in data.epoch_views(state.device, epoch, done * accumulation, remaining):
        micro_batches.append(views)
        if len(micro_batches) < accumulation:
            continue
        values = step_values(config, length, state.step, epoch)
        loss = train_step(state, micro_batches, values)
        run.watch.observe(state.step, loss, state.gradients_finite)
        micro_batches = []
        state.epoch_loss_sum += loss  # on the device: no host sync
        state.epoch_steps += 1
        steps += 1
        state.samples_into_epoch += batch_per_process
        bar.update()
        log_step = state.step % config.run.log_every_steps == 0
        if log_step:
            skipped = data.skips.check(state.device)  # agree on a data stop (a collective)
            elapsed, tick = time.perf_counter() - tick, time.perf_counter()
            images_per_second = config.run.log_every_steps * config.train.batch_size / elapsed
            loss_value, terms = _log_step(state, run, loss, values, images_per_second, skipped)
            bar.set_postfix(loss=f"{loss_value:.4f}",
                            **{name.removesuffix("_loss"): f"{value:.3f}"
                               for name, value in terms.items()},
                            lr=f"{values.lr:.2e}",
                            img_s=f"{images_per_second:.0f}",
                            **({"skipped": skipped} if skipped else {}))  # all processes
        if done + steps >= length.steps_per_epoch:
            break  # the epoch's end saves, and stops there if asked to
        decision = run.control.poll(sync_point=log_step)
        if decision.save:
            path = save(state, run, keep_epoch_copy=False)
            if decision.stop:
                bar.close()
                raise RunStopped(_stopped_message(run, state.step, path))
    bar.close()
    skipped = data.skips.check(state.device)
    run.watch.check(run.last_good())
    all_reduce_mean(state.epoch_loss_sum)  # the mean over processes (a collective)
    mean_loss = state.epoch_loss_sum.item() / max(state.epoch_steps, 1)  # host sync, once an epoch
    return EpochResult(mean_loss, skipped)


def _stopped_message(run: RunContext, step: int, path: Path) -> str:
    return (f"stopped by {run.control.describe()} after step {step}; checkpoint saved: {path}; "
            "run the same command again to resume")


def _training_sources(config: Config, dataset: Dataset | None,
                      holdout_fraction: float = 0.1) -> Sources:
    """data.source's images, or the user's Dataset. A Dataset of (image, label) pairs (judged by
    its first item) also feeds the k-NN monitor: a fixed random 10% is its test split, the
    rest its train split, as for a folder of class folders; training uses every image."""
    if dataset is None:
        return build_sources(config.data)
    pairs = _AsPairs(dataset)
    first, first_label = pairs[0] if len(pairs) else (None, UNLABELLED)  # read once
    if not isinstance(first, Image.Image):  # a tensor after ToTensor, a path, an array
        kind = f"{type(first).__module__}.{type(first).__qualname__}".removeprefix("builtins.")
        raise ConfigError(f"the Dataset's item 0 holds a {kind}, not a PIL image: dinolab makes "
                          "its views from PIL images, so return the image before any ToTensor "
                          "(torchvision.transforms.functional.to_pil_image converts a tensor)")
    if len(pairs) < 2 or first_label == UNLABELLED:
        return Sources(train=pairs)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0)).tolist()
    num_test = max(1, int(len(pairs) * holdout_fraction))
    return Sources(train=pairs, knn_train=Subset(pairs, sorted(order[num_test:])),
                   knn_test=Subset(pairs, sorted(order[:num_test])))


def _check_batch(config: Config, num_images: int) -> None:
    processes, accumulation = world_size(), config.train.accumulation_steps
    if config.train.batch_size % (processes * accumulation):
        raise ConfigError(
            f"invalid value for train.batch_size: {config.train.batch_size} is not divisible by "
            f"{processes} processes x {accumulation} accumulation steps"
        )
    if num_images < config.train.batch_size:
        raise ConfigError(f"invalid value for train.batch_size: {config.train.batch_size} is "
                          f"larger than the data set ({num_images} images)")


def resolve_auto(config: Config, num_images: int) -> Config:
    """``config`` with its auto keys resolved (dinolab/auto.py), said in one line. A run folder
    that holds a config.yaml gives back the values it started with, whatever the data's size."""
    saved_file = Path(config.run.dir) / "config.yaml"
    kept = {}
    if saved_file.is_file():
        saved = OmegaConf.load(saved_file)
        kept = {key: OmegaConf.select(saved, key) for key in auto.unresolved(config)}
        kept = {key: value for key, value in kept.items() if value not in (None, auto.AUTO)}
    resolved, chosen = auto.resolve(config, num_images, kept, world_size())
    if chosen:
        say(auto.describe(chosen, num_images, from_run_folder=bool(kept)))
        validate(resolved)
    return resolved


def _resume(state: TrainingState, run_dir: Path) -> dict[str, Any] | None:
    """Load the run folder's latest checkpoint into ``state`` -> the checkpoint, or None."""
    saved = load_latest(run_dir, say)
    if saved is None:
        return None
    state.load_state_dict(saved)
    if state.epoch >= state.config.train.epochs:
        knn = last_knn(run_dir / "metrics.jsonl")
        knn_text = f"; its k-NN top-1 (k={state.config.eval.knn_k}): {knn:.1f}%" if knn else ""
        say(f"{run_dir} holds a finished run ({state.epoch} epochs){knn_text}; "
            "use another run.dir to train again")
    else:
        say(f"resuming {run_dir} at epoch {state.epoch + 1}, step {state.step}")
    return saved


def train(config: Config, dataset: Dataset | None = None) -> TrainResult:
    """Run (or resume) DINO pre-training as configured; ``dataset`` replaces data.source.

    ``dataset`` may return a PIL image or (PIL image, label); labels are never used in training.
    Under torchrun the process group is created here unless the caller made one; a group made
    here is destroyed before train returns or raises, and a caller's is left to the caller.
    """
    started = time.perf_counter()
    require_wandb(config)
    created_group = init_distributed(resolve_device(config.train.device))
    every_process_ends_here = False
    try:
        result = _train(config, dataset, started)
        every_process_ends_here = True
        return result
    except RunStopped:
        every_process_ends_here = True  # the processes agreed on the stop (preemption.py)
        raise
    finally:
        if created_group:  # no barrier after an error: the other processes may not come
            shutdown(wait_for_others=every_process_ends_here)


def _train(config: Config, dataset: Dataset | None, started: float) -> TrainResult:
    """train() once the process group (if any) is up."""
    seed_everything(config)
    sources = _training_sources(config, dataset)
    num_images = len(sources.train)  # type: ignore[arg-type]
    config = resolve_auto(config, num_images)
    _check_batch(config, num_images)
    state = build_state(config)  # before the run folder: a bad backbone leaves nothing behind
    check_for_device(config, state.device)
    run_dir = prepare_run_dir(config)
    saved = _resume(state, run_dir)
    skip_totals = saved.get("skips") if saved else None  # older checkpoints have none
    del saved  # its tensors are loaded: not held for the whole run
    data = build_training_data(config, sources.train, state.device)
    data.skips.resume(skip_totals)
    length = data.length
    metrics = Metrics(run_dir, config.run.tensorboard, start_wandb(config, run_dir))
    run = RunContext(run_dir, metrics, FiniteWatch(state.device),
                     StopControl(config.run.checkpoint_every_minutes, state.device),
                     _collapse_detector(state), data.skips)
    eval_transform = EvalTransform(config.data)
    knn_label = f"k-NN top-1 (k={config.eval.knn_k})"

    knn_start = None
    if state.step == 0:
        knn_start = look_at_teacher(state, sources, eval_transform, metrics)
        if knn_start is not None:
            say(f"{knn_label}: {knn_start:.1f}% (teacher at initialisation)")
            metrics.log("knn", 0, {"epoch": 0, "knn_top1": knn_start})
    if state.epoch < config.train.epochs:  # a finished run has said so (_resume)
        say(f"training {config.model.backbone} on {num_images} images: {length.epochs} epochs "
            f"of {length.steps_per_epoch} steps, batch {config.train.batch_size}, "
            f"{world_size()} process(es){' (FSDP)' if state.sharded else ''}, "
            f"{state.device.type}")

    failed = True
    try:
        with run.control:
            knn_end = _train_epochs(state, data, run, sources, eval_transform)
        failed = False
    finally:
        metrics.close(failed)
        data.close()
    seconds = time.perf_counter() - started
    if knn_end is not None:
        say(f"{knn_label}: {knn_end:.1f}% (trained teacher, {seconds / 60:.1f} min)")
    return TrainResult(run_dir, state.epoch, knn_start, knn_end, seconds)


def _train_epochs(state: TrainingState, data: TrainingData, run: RunContext, sources: Sources,
                  eval_transform: EvalTransform) -> float | None:
    """The remaining epochs, a checkpoint after each -> the last k-NN top-1 (or None).

    A stop signal during the epoch's last step stops after its checkpoint, before the k-NN.
    """
    config, knn_end = state.config, None
    knn_label = f"k-NN top-1 (k={config.eval.knn_k})"
    for epoch in range(state.epoch, config.train.epochs):
        state.epoch = epoch
        result = run_epoch(state, data, run)
        state.begin_next_epoch()
        keep = _due(epoch + 1, config.run.keep_every_epochs, None)
        if run.control.poll(sync_point=True).stop:
            path = save(state, run, keep)
            raise RunStopped(_stopped_message(run, state.step, path))
        epoch_values: dict[str, Any] = {"epoch": epoch + 1, "loss": result.mean_loss,
                                        "skipped": result.skipped}
        if _due(epoch + 1, config.eval.knn_every_epochs, config.train.epochs):
            knn_end = look_at_teacher(state, sources, eval_transform, run.metrics)
            if knn_end is not None:
                epoch_values["knn_top1"] = knn_end
        run.metrics.log("epoch", state.step, epoch_values)
        knn_text = f", {knn_label}: {knn_end:.1f}%" if "knn_top1" in epoch_values else ""
        say(f"epoch {epoch + 1}/{config.train.epochs}: loss {result.mean_loss:.4f}{knn_text}")
        save(state, run, keep)
    return knn_end


def _collapse_detector(state: TrainingState) -> CollapseDetector | None:
    prototypes = state.objective.num_prototypes
    if prototypes is None:
        say(f"collapse monitor: not for method={state.config.method} (no teacher distribution "
            "over prototypes); watch the logged output_std, which falls to 0 in a collapse")
        return None
    return CollapseDetector(prototypes)


def _due(epoch: int, every: int, last: int | None) -> bool:
    """True at every ``every``-th epoch (never when 0) and at the ``last`` one."""
    return epoch == last or (every > 0 and epoch % every == 0)
