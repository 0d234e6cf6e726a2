"""Everything a run updates, built from the config, and its (de)serialisation.

The state is explicit so that a checkpoint holds all of it and a resumed run continues exactly:
student, teacher, the objective's loss state (centres), optimizer, grad scaler, position
(epoch, step), RNG, and the running loss of the epoch in progress (so that an epoch resumed
mid-way reports the mean of all of its steps). The objective (dinolab/methods) builds the
networks; everything else here is the same for every objective.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dinolab.config import Config, ConfigError, require_resolved
from dinolab.distributed import fsdp, is_main_process, world_size
from dinolab.methods import Objective, backbone_of, build_objective
from dinolab.models.backbone import (
    create_backbone,
    enable_grad_checkpointing,
    trace_crop_sizes,
)
from dinolab.models.teacher import copy_student_into_teacher
from dinolab.training.monitor import say
from dinolab.training.optim import build_optimizer


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        from dinolab.distributed.env import local_rank

        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively (CUDA, or a CPU with AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private: guard them
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. ``auto`` is bf16 where the hardware runs it natively
    (the demo model's step measured 1.9-2.2x faster than fp32 on an AVX512-BF16 CPU)."""
    if name == "auto":
        name = "bf16" if native_bf16(device) else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def training_precision(config: Config, device: torch.device,
                       one_pixel_convolutions: list[str]) -> torch.dtype | None:
    """``resolve_precision`` for training, less a PyTorch bug. On the CPU (oneDNN), bf16 gives
    a strided convolution of a 1x1 map wrong weight gradients (garbage in the kernel taps that
    see only padding; sometimes inf), which small crops cause in a CNN (docs/LOG.md).
    ``one_pixel_convolutions``: those of the backbone (``trace_crop_sizes``). ``auto`` then
    trains in fp32 and says why; an explicit ``bf16`` stops with one line."""
    dtype = resolve_precision(config.train.precision, device)
    hit = one_pixel_convolutions
    if dtype != torch.bfloat16 or device.type != "cpu" or not hit:
        return dtype
    problem = (f"bf16 on the CPU computes wrong gradients for {config.model.backbone}'s "
               f"{hit[0]} (a strided convolution of a 1x1 map: a PyTorch oneDNN bug)")
    if config.train.precision == "bf16":
        raise ConfigError(f"invalid value for train.precision: {problem}; use fp32, or crops "
                          "large enough to leave the last stage more than 1x1")
    say(f"precision: fp32, not bf16: {problem}")
    return None


def use_fused_attention(choice: str, device: torch.device) -> bool:
    """``auto``: fused on GPUs; eager on CPUs, where torch's fused kernel was 1.4x slower for
    the demo's short sequences (docs/LOG.md)."""
    return device.type == "cuda" if choice == "auto" else choice == "fused"


def set_fused_attention(network: nn.Module, fused: bool) -> None:
    """Choose timm's attention implementation (its modules' ``fused_attn`` attribute)."""
    for module in network.modules():
        if hasattr(module, "fused_attn"):
            setattr(module, "fused_attn", fused)  # noqa: B010 (an nn.Module attribute)


def build_network(config: Config, drop_path_rate: float, student: bool = True) -> nn.Module:
    """The configured objective's student (or teacher) network; it has ``.backbone``."""
    return build_objective(config).build_network(drop_path_rate, student)


@dataclass
class TrainingState:
    config: Config
    device: torch.device
    autocast_dtype: torch.dtype | None
    # The objective's student network; with several processes wrapped in DDP, or sharded in
    # place (FSDP)
    student: nn.Module
    teacher: nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    epoch: int = 0  # the epoch in progress (or the next one to run)
    step: int = 0  # optimizer steps done in total
    samples_into_epoch: int = 0  # this process's samples consumed in ``epoch``
    # Whether the last step's gradients were all finite: a device bool set by train_step, read
    # by the loop at log steps (not saved: a checkpoint is only written from a finite state)
    gradients_finite: torch.Tensor | None = None
    # The losses of ``epoch``'s steps so far, summed on the device (adding one is no host sync;
    # the loop reads the sum once, at the epoch's end), and how many there are
    epoch_loss_sum: torch.Tensor = field(init=False)
    epoch_steps: int = 0

    def __post_init__(self) -> None:
        # Listed once: the step clips and averages these every iteration.
        self.student_parameters: list[torch.Tensor] = list(self.student_module.parameters())
        self.teacher_parameters: list[torch.Tensor] = list(self.teacher.parameters())
        # This process's part of each parameter (all of it unless sharded): the EMA and the
        # finite checks work on these. Views, so an update reaches the parameter.
        self.student_shards = [fsdp.local_tensor(p) for p in self.student_parameters]
        self.teacher_shards = [fsdp.local_tensor(p) for p in self.teacher_parameters]
        # The EMA's pairs: each teacher parameter with the student's of the same name (the
        # student may have more: a predictor, a mask token)
        student_by_name = dict(self.student_module.named_parameters())
        self.ema_student_shards = [fsdp.local_tensor(student_by_name[name])
                                   for name, _ in self.teacher.named_parameters()]
        # The step's loss terms (device scalars, averaged over its micro-batches), read at log
        # steps
        self.terms: dict[str, torch.Tensor] = {}
        self.epoch_loss_sum = torch.zeros((), device=self.device)

    def begin_next_epoch(self) -> None:
        """Move to the start of the next epoch: none of its samples read, no loss summed."""
        self.epoch += 1
        self.samples_into_epoch = 0
        self.epoch_loss_sum.zero_()
        self.epoch_steps = 0

    @property
    def student_module(self) -> nn.Module:
        module = self.student
        return module.module if isinstance(module, DistributedDataParallel) else module

    @property
    def loss(self) -> nn.Module:
        """The objective's loss state (centres), which a checkpoint keeps under "loss"."""
        return self.objective.loss

    @property
    def sharded(self) -> bool:
        return fsdp.is_sharded(self.student)

    def state_dict(self) -> dict[str, Any]:
        """Everything a checkpoint holds, with full tensors. Sharded (FSDP), it is a collective
        that every process calls, and only the main process's copy holds the tensors (the
        others hold None): the layout stays that of a one-process run."""
        from dinolab.config import to_dict

        networks = {
            "student": self.student_module.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }
        if self.sharded:
            networks = fsdp.gather(networks, keep=is_main_process())
        return {
            **networks,
            "method": self.config.method,
            "loss": self.loss.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "epoch": self.epoch,
            "step": self.step,
            "samples_into_epoch": self.samples_into_epoch,
            "epoch_loss_sum": self.epoch_loss_sum.cpu(),
            "epoch_steps": self.epoch_steps,
            "config": to_dict(self.config),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a checkpoint of any run (one process, DDP or FSDP: they share a layout) of the
        same objective."""
        method = state.get("method", "dino")  # older checkpoints: DINO's
        if method != self.config.method:
            raise ConfigError(f"invalid value for method: the checkpoint was written by "
                              f"method={method}, not {self.config.method}; use a new run.dir")
        if self.sharded:  # each process keeps its slice of the full tensors (collectives)
            fsdp.load_full_state(self.student_module, state["student"])
            fsdp.load_full_state(self.teacher, state["teacher"])
            fsdp.load_full_optimizer_state(self.optimizer, state["optimizer"])
        else:
            self.student_module.load_state_dict(state["student"])
            self.teacher.load_state_dict(state["teacher"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.loss.load_state_dict(state["loss"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.samples_into_epoch = state["samples_into_epoch"]
        # Checkpoints of older versions have no running loss: the epoch's mean then covers the
        # steps after the resume only, as it did when they were written.
        self.epoch_loss_sum.copy_(state.get("epoch_loss_sum", torch.zeros(())))
        self.epoch_steps = state.get("epoch_steps", 0)
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def build_state(config: Config) -> TrainingState:
    require_resolved(config)  # the schedules need them all
    device = resolve_device(config.train.device)
    data = config.data
    one_pixel = trace_crop_sizes(config.model, data.global_crop_size,
                                 data.local_crop_size if data.num_local_crops else None)
    autocast_dtype = training_precision(config, device, one_pixel)
    objective = build_objective(config)
    student = objective.build_network(config.model.drop_path_rate, student=True).to(device)
    teacher = objective.build_network(0.0, student=False).to(device)
    objective.check(student, config.train.batch_size // world_size()
                    // config.train.accumulation_steps)
    fused = use_fused_attention(config.model.attention, device)
    for network in (student, teacher):
        set_fused_attention(network, fused)
    if config.model.grad_checkpointing:  # the teacher has no backward to save memory for
        enable_grad_checkpointing(backbone_of(student), config.model.backbone)
    if config.train.compile:  # in place: parameter names and checkpoints stay the same
        for network in (student, teacher):  # static shapes: one graph per crop size
            for part in network.children():  # the backbone, the heads
                part.compile(dynamic=False)
    wrapped: nn.Module = student
    sharded = world_size() > 1 and config.train.parallel == "fsdp"
    if world_size() > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        if device.type == "cuda":  # BatchNorm in the head: statistics over the global batch
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        if sharded:
            fsdp.broadcast_from_main(student)
            wrapped = student
        else:
            wrapped = DistributedDataParallel(student, device_ids=device_ids)  # broadcasts too
    copy_student_into_teacher(student, teacher)  # after the broadcast: the same on every rank
    if sharded:  # alike, so that the EMA pairs each teacher shard with its student shard
        fsdp.shard(student, trains=True)
        fsdp.shard(teacher, trains=False)
    optimizer = build_optimizer(student, tuple(config.optim.betas), device,  # type: ignore[arg-type]
                                config.optim.freeze_last_layer_by == "lr", objective.lr_scales())
    objective.loss.to(device)
    scaler = torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 else None
    return TrainingState(config, device, autocast_dtype, wrapped, teacher, objective, optimizer,
                         scaler)


def evaluation_backbone(state: TrainingState) -> nn.Module | None:
    """The teacher's backbone, whole, for the k-NN monitor and the attention maps, which run on
    the main process alone. Sharded (FSDP), a collective: every process calls it, and the main
    process gets an unsharded copy (the others get None)."""
    if not state.sharded:
        return backbone_of(state.teacher)
    weights = fsdp.gather(backbone_of(state.teacher).state_dict(), keep=is_main_process())
    if not is_main_process():
        return None
    config = state.config
    model = dataclasses.replace(config.model, pretrained=False, weights=None)  # weights: below
    backbone = create_backbone(model, config.data.global_crop_size, 0.0)
    backbone.load_state_dict(weights)
    set_fused_attention(backbone, use_fused_attention(config.model.attention, state.device))
    return backbone.to(state.device)
