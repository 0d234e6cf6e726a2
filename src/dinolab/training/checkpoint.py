"""Checkpoints: written atomically, loaded weights-only.

``checkpoint.pt`` in the run folder is the latest state; ``checkpoint_EEEE.pt`` copies are kept
every ``run.keep_every_epochs``; ``teacher.safetensors`` holds the teacher backbone alone (timm's
key names), rewritten at every checkpoint, with ``teacher.json`` beside it (``model_name`` and
``model_kwargs`` for ``timm.create_model``, as ``dinolab export`` writes them). A file is
written to a temporary name in the same folder, flushed, fsynced and renamed, so a crash never
leaves a half-written checkpoint in place of a good one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dinolab.config import from_dict
from dinolab.models.backbone import backbone_kwargs
from dinolab.models.weights import sidecar_text

LATEST = "checkpoint.pt"
TEACHER_EXPORT = "teacher.safetensors"
TEACHER_SIDECAR = "teacher.json"


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
    description = _teacher_description(state["config"])
    atomic_write(run_dir / TEACHER_SIDECAR, lambda path: path.write_text(description))


def _teacher_description(config_values: dict[str, Any]) -> str:
    """The export sidecar of the teacher: how timm rebuilds it (drop path 0, no classifier)."""
    config = from_dict(config_values)
    kwargs = backbone_kwargs(config.model, config.data.global_crop_size, drop_path_rate=0.0)
    return sidecar_text(config.model.backbone, kwargs)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """weights_only: a checkpoint is data; a pickle that would run code is refused by torch."""
    return torch.load(path, map_location="cpu", weights_only=True)
