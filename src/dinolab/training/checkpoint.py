"""Checkpoints: written atomically, kept in a rotation, loaded weights-only, with a fallback.

Files in the run folder:

- ``checkpoint_step_SSSSSSSS.pt``: the state after optimizer step S. The last
  ``run.keep_last_checkpoints`` of them are kept, so a damaged newest file still leaves one to
  resume from.
- ``checkpoint.pt``: the latest of those (a hard link to it where the file system allows, else
  a byte copy), what ``dinolab knn RUN`` and a resume read first.
- ``checkpoint_EEEE.pt``: a copy kept for good every ``run.keep_every_epochs`` epochs.
- ``teacher.safetensors`` and ``teacher.json``: the teacher backbone alone under timm's key
  names and how timm rebuilds it (as ``dinolab export`` writes them), rewritten each time.

Every file is written to a temporary name in the same folder, flushed, fsynced and renamed, and
the folder is fsynced, so a crash at any instant leaves either the old file or the new one, never
a mix. The order matters: the step file is complete before ``checkpoint.pt`` points to it, and
older step files are removed only after that, so the previous good checkpoint is never removed
before the new one is complete. A kill between two of these writes only leaves a temporary file,
which the next save removes.

Loading is weights-only: a checkpoint is data, and a pickle that would import code is refused
(``UnsafeCheckpoint``) rather than skipped, since it was put there by someone. A file that does
not load for any other reason (truncated, corrupt, not a checkpoint) is reported in one line and
the next older one is used.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dinolab.config import ConfigError, from_dict
from dinolab.models.backbone import backbone_kwargs
from dinolab.models.weights import load_error_reason, refused_code, sidecar_text

LATEST = "checkpoint.pt"
STEP_PREFIX = "checkpoint_step_"
TEACHER_EXPORT = "teacher.safetensors"
TEACHER_SIDECAR = "teacher.json"
# Not required, so that checkpoints of older versions still load: "epoch_loss_sum" and
# "epoch_steps" (state.py reads their absence as an empty sum).
REQUIRED_KEYS = ("student", "teacher", "loss", "optimizer", "epoch", "step",
                 "samples_into_epoch", "config", "rng")


class UnsafeCheckpoint(ConfigError):
    """A checkpoint whose pickle would run code: refused, never skipped (exit status 2)."""


class CheckpointWriteError(RuntimeError):
    """An OSError (disk full, quota, I/O error) while saving; earlier checkpoints are intact."""


def step_file(run_dir: Path, step: int) -> Path:
    return run_dir / f"{STEP_PREFIX}{step:08d}.pt"


def step_files(run_dir: Path) -> list[Path]:
    """The step checkpoints of a run folder, newest first."""
    files = [path for path in run_dir.glob(f"{STEP_PREFIX}*.pt")
             if path.stem[len(STEP_PREFIX):].isdigit()]
    return sorted(files, key=lambda path: int(path.stem[len(STEP_PREFIX):]), reverse=True)


def _new_file_mode() -> int:
    """The permissions ``open`` gives a new file: 0o666 less the process's umask."""
    # Reading the umask means setting it: to a strict one for that instant (a file another
    # thread creates meanwhile gets fewer rights, never more), then straight back.
    umask = os.umask(0o077)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """``write(temporary)``, fsync, rename over ``path``, fsync the folder; no partial file.

    The file gets the permissions of any file the process creates: safetensors writes its files
    owner-only (0600), which would hide an exported teacher from the rest of a shared cluster.
    """
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.unlink(missing_ok=True)  # a leftover of a killed run, or a link target
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
            os.fchmod(handle.fileno(), _new_file_mode())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link costs no space and no time; a byte copy where links are not supported."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def save_checkpoint(run_dir: Path, state: dict[str, Any],
                    teacher_backbone: dict[str, torch.Tensor], keep_last: int,
                    keep_epoch_copy: bool) -> Path:
    """Write the state of step ``state['step']`` and the teacher export -> the step file.

    Raises CheckpointWriteError, naming the last complete checkpoint, on any OSError.
    """
    last_complete = run_dir / LATEST if (run_dir / LATEST).is_file() else None
    target = step_file(run_dir, state["step"])
    current = target
    try:
        atomic_write(target, lambda path: torch.save(state, path))
        current = run_dir / LATEST
        atomic_write(current, lambda path: _link_or_copy(target, path))
        last_complete = current
        if keep_epoch_copy:
            current = run_dir / f"checkpoint_{state['epoch']:04d}.pt"
            atomic_write(current, lambda path: _link_or_copy(target, path))
        tensors = {key: value.detach().cpu().contiguous()
                   for key, value in teacher_backbone.items()}
        current = run_dir / TEACHER_EXPORT
        atomic_write(current, lambda path: save_file(tensors, str(path)))
        description = _teacher_description(state["config"])
        current = run_dir / TEACHER_SIDECAR
        atomic_write(current, lambda path: path.write_text(description))
        _remove_old_step_files(run_dir, keep_last)
    except OSError as error:
        kept = f"the last complete checkpoint is {last_complete}" if last_complete else \
            "no checkpoint was complete yet"
        raise CheckpointWriteError(
            f"cannot write {current}: {error.strerror or error}; {kept}; free space (or fix the "
            "folder) and run the same command again to resume") from None
    return target


def _remove_old_step_files(run_dir: Path, keep_last: int) -> None:
    """Only once the new checkpoint is complete: older step files, and killed writes' leftovers."""
    for path in step_files(run_dir)[keep_last:]:
        path.unlink(missing_ok=True)
    for leftover in run_dir.glob(f".{STEP_PREFIX}*.pt.tmp"):
        leftover.unlink(missing_ok=True)


def _teacher_description(config_values: dict[str, Any]) -> str:
    """The export sidecar of the teacher: how timm rebuilds it (drop path 0, no classifier)."""
    config = from_dict(config_values)
    kwargs = backbone_kwargs(config.model, config.data.global_crop_size, drop_path_rate=0.0)
    return sidecar_text(config.model.backbone, kwargs)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """weights_only: a checkpoint is data; a pickle that would run code raises UnsafeCheckpoint.

    Other failures (truncated, corrupt, not a checkpoint) propagate as torch raises them.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        refused = refused_code(error)
        if refused:
            raise UnsafeCheckpoint(f"{path} holds a pickle that would import {refused}; "
                                   "refused: checkpoints are loaded as data only (weights-only); "
                                   "delete it or use another run.dir") from None
        raise


def _read_run_checkpoint(path: Path) -> dict[str, Any]:
    state = load_checkpoint(path)
    missing = [key for key in REQUIRED_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"not a dinolab checkpoint: no {', '.join(missing[:3])}")
    return state


def load_latest(run_dir: Path, report: Callable[[str], None]) -> dict[str, Any] | None:
    """The newest checkpoint of ``run_dir`` that loads, or None when there is none.

    ``checkpoint.pt`` first, then the step files newest first; each one that fails is reported
    in one line through ``report`` and the next is tried. A folder whose checkpoints all fail
    raises ConfigError: starting again from step 0 would silently throw the run away.
    """
    candidates = [run_dir / LATEST] if (run_dir / LATEST).is_file() else []
    failed: list[Path] = []
    for path in candidates + step_files(run_dir):
        if any(path.samefile(other) for other in failed):  # a link to a file that failed
            continue
        try:
            state = _read_run_checkpoint(path)
        except UnsafeCheckpoint:
            raise
        except Exception as error:  # torch, zip and pickle errors have no common base
            report(f"warning: checkpoint {path} cannot be read ({load_error_reason(error)}); "
                   "trying the one before it")
            failed.append(path)
            continue
        if failed:
            report(f"resuming from {path.name} instead of the damaged {failed[0].name}")
        return state
    if failed:
        raise ConfigError(f"no readable checkpoint in {run_dir} ({len(failed)} damaged); move "
                          "them away to start again, or use another run.dir")
    return None
