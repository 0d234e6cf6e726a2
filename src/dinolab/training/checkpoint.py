"""Checkpoints: written atomically, loaded weights-only.

``checkpoint.pt`` in the run folder is the latest state; ``checkpoint_EEEE.pt`` copies are kept
every ``run.keep_every_epochs``; ``teacher.safetensors`` holds the teacher backbone alone (timm's
key names), rewritten at every checkpoint. A file is written to a temporary name in the same
folder, flushed, fsynced and renamed, so a crash never leaves a half-written checkpoint in place
of a good one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

LATEST = "checkpoint.pt"
TEACHER_EXPORT = "teacher.safetensors"


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def save_checkpoint(run_dir: Path, state: dict[str, Any], teacher_backbone: dict[str, torch.Tensor],
                    keep_copy: bool) -> None:
    atomic_write(run_dir / LATEST, lambda path: torch.save(state, path))
    if keep_copy:  # a byte copy of the file just written: no second serialisation
        name = f"checkpoint_{state['epoch']:04d}.pt"
        atomic_write(run_dir / name, lambda path: shutil.copyfile(run_dir / LATEST, path))
    tensors = {key: value.detach().cpu().contiguous() for key, value in teacher_backbone.items()}
    atomic_write(run_dir / TEACHER_EXPORT, lambda path: save_file(tensors, str(path)))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """weights_only: a checkpoint is data; a pickle that would run code is refused by torch."""
    return torch.load(path, map_location="cpu", weights_only=True)
