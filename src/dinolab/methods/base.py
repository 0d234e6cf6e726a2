"""What an objective is, for the trainer: the parts a method owns, and nothing else.

An objective (DINO, DINOv2, BYOL, a user's own) owns its networks' heads, its loss terms and
their state (centres), its forward over the views and what it logs. The trainer owns the rest:
data and views, the optimizer and the schedules, clipping, precision, gradient accumulation,
DDP and FSDP, the EMA (teacher parameters <- student parameters of the same name, once per
optimizer step), checkpoints, resume, the monitors, evaluation and export (docs/methods.md).

One optimizer step of the trainer, for micro-batches 1..A:

    output = objective.forward(student, teacher, views, batch, values)  # each micro-batch
    (output.loss / A).backward()
    ... clip, optimizer step, EMA ...
    objective.update(mean over micro-batches of output.statistics)     # once, a collective
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from dinolab.config import Config


@dataclass(frozen=True)
class StepValues:
    """The scheduled values for one step (pure functions of the step; training/schedules.py)."""

    lr: float
    weight_decay: float
    teacher_momentum: float
    teacher_temp: float
    freeze_last_layer: bool


@dataclass(frozen=True)
class BatchPosition:
    """Where a micro-batch sits in the step's global batch (all processes, all micro-batches):
    ``rows`` are the global positions of its samples, in the order of its views' rows, so that
    anything drawn per sample of the global batch (iBOT's masks) is the same however the batch
    is split over processes and micro-batches."""

    step: int
    rows: torch.Tensor  # [b] int64, on the CPU
    global_batch: int


def batch_position(step: int, global_batch: int, micro_batch: int, micro_index: int,
                   rank: int, world: int) -> BatchPosition:
    """The rows of this process's ``micro_index``-th micro-batch. The sampler deals the global
    batch out to the processes in turn (data/loader.py: sample k of process r is global sample
    k * world + r), and each process cuts its share into consecutive micro-batches."""
    local = torch.arange(micro_index * micro_batch, (micro_index + 1) * micro_batch)
    return BatchPosition(step, local * world + rank, global_batch)


@dataclass
class StepOutput:
    """What an objective's forward over one micro-batch gives the trainer.

    loss: the scalar to minimise (with its graph).
    terms: each named loss term (detached scalars), logged under its own name; averaged over
        the micro-batches of the step like the loss.
    statistics: tensors averaged over the micro-batches and handed to ``update`` once per
        optimizer step (the batch statistics of a centre, say).
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    statistics: dict[str, torch.Tensor] = field(default_factory=dict)


def backbone_of(network: nn.Module) -> nn.Module:
    """An objective network's ``.backbone`` (every one has it: base.Objective.build_network)."""
    backbone = network.backbone
    assert isinstance(backbone, nn.Module)
    return backbone


class Objective(ABC):
    """One self-supervised objective. Subclasses set ``name`` and build ``self.loss`` (an
    nn.Module holding the loss state that a checkpoint keeps under "loss": centres; it may be
    empty) in ``__init__``; the trainer moves it to the device."""

    name: ClassVar[str]
    loss: nn.Module

    def __init__(self, config: Config) -> None:
        self.config = config

    @abstractmethod
    def build_network(self, drop_path_rate: float, student: bool) -> nn.Module:
        """The student (trained) or the teacher (its EMA). Both have ``.backbone``: the
        teacher's is what is evaluated and exported. Every teacher parameter needs a student
        parameter of the same name and shape (the EMA pairs them by name); the student may have
        more (a predictor, a mask token)."""

    def check(self, network: nn.Module, micro_batch: int) -> None:  # noqa: B027 (optional hook)
        """Raise ConfigError for what this objective cannot train, before anything is written.
        ``micro_batch``: the images of one micro-batch on one process."""

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers by parameter-name prefix of the student network (their
        parameters get optimizer groups of their own): {} by default."""
        return {}

    @abstractmethod
    def forward(self, student: nn.Module, teacher: nn.Module, views: list[torch.Tensor],
                batch: BatchPosition, values: StepValues) -> StepOutput:
        """views: V tensors [b, C, H, W], the 2 global views first. Call ``student`` (the
        wrapped module under DDP or FSDP) for the student's outputs and ``teacher`` under
        ``torch.no_grad``."""

    def update(self, statistics: dict[str, torch.Tensor]) -> None:  # noqa: B027 (optional hook)
        """After the optimizer step, with ``statistics`` averaged over the micro-batches; a
        collective where it all-reduces (every process calls it at the same step)."""

    def monitor(self, loss: float, terms: dict[str, float]) -> dict[str, float]:
        """Extra values for a log step (read after the step's host sync): {} by default."""
        return {}

    def collapse_signal(self, loss: float, terms: dict[str, float],
                        monitored: dict[str, float]) -> tuple[float, float] | None:
        """(the distillation loss, the teacher's entropy) for the collapse detector
        (training/collapse.py), or None where DINO's collapse signature does not apply;
        ``monitored``: what ``monitor`` returned for this log step."""
        return None

    @property
    def num_prototypes(self) -> int | None:
        """K, for the collapse detector's ln K; None without prototypes."""
        return None
