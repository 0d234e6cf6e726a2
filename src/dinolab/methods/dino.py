"""DINO (Caron et al., 2021): self-distillation of a multi-crop student into an EMA teacher.

The teacher sees the 2 global views, the student all of them; the loss is the cross-entropy of
every student view against each teacher view it is not (losses/dino.py), with the teacher
centred by an EMA of its batch means and sharpened by a low temperature. Student and teacher
are the same ``MultiCropNetwork`` (backbone + DINO head), so the EMA pairs every parameter.
"""

from __future__ import annotations

import torch
from torch import nn

from dinolab.config import Config, ConfigError
from dinolab.losses import DINOLoss, batch_center
from dinolab.methods.base import BatchPosition, Objective, StepOutput, StepValues
from dinolab.models.backbone import create_backbone, feature_dim
from dinolab.models.head import DINOHead
from dinolab.models.multicrop import MultiCropNetwork


def build_backbone(config: Config, drop_path_rate: float) -> nn.Module:
    """The configured timm backbone, with the crop sizes checked against its patch size."""
    backbone = create_backbone(config.model, config.data.global_crop_size, drop_path_rate)
    patch_embed = getattr(backbone, "patch_embed", None)
    if patch_embed is not None and not getattr(patch_embed, "dynamic_img_pad", True):
        patch = patch_embed.patch_size[0]
        for key in ("global_crop_size", "local_crop_size"):
            size = getattr(config.data, key)
            if size % patch:
                raise ConfigError(f"invalid value for data.{key}: {size} is not a multiple of "
                                  f"the backbone's patch size {patch}")
    return backbone


def teacher_entropy_values(loss: float, entropy: float) -> dict[str, float]:
    """The collapse monitor's numbers: the teacher's mean entropy and KL(teacher || student),
    which is the distillation loss less that entropy (training/collapse.py)."""
    return {"teacher_entropy": entropy, "kl_teacher_student": loss - entropy}


class DINO(Objective):
    name = "dino"
    loss: DINOLoss

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.loss = DINOLoss(config.model.head.out_dim, config.loss.student_temp,
                             config.loss.center_momentum, config.loss.centering)

    def build_network(self, drop_path_rate: float, student: bool) -> nn.Module:
        backbone = build_backbone(self.config, drop_path_rate)
        return MultiCropNetwork(backbone, DINOHead(feature_dim(backbone), self.config.model.head))

    def forward(self, student: nn.Module, teacher: nn.Module, views: list[torch.Tensor],
                batch: BatchPosition, values: StepValues) -> StepOutput:
        with torch.no_grad():
            teacher_logits = teacher(views[:2])
        student_logits = student(views)
        loss = self.loss(student_logits, teacher_logits, values.teacher_temp)
        with torch.autocast(teacher_logits.device.type, enabled=False):
            center = batch_center(teacher_logits)
        return StepOutput(loss, statistics={"center": center})

    def update(self, statistics: dict[str, torch.Tensor]) -> None:
        self.loss.update_center(statistics["center"])  # collective: all-reduce over processes

    def monitor(self, loss: float, terms: dict[str, float]) -> dict[str, float]:
        return teacher_entropy_values(loss, self.loss.teacher_entropy.item())  # host sync

    def collapse_signal(self, loss: float, terms: dict[str, float],
                        monitored: dict[str, float]) -> tuple[float, float] | None:
        return loss, monitored["teacher_entropy"]

    @property
    def num_prototypes(self) -> int | None:
        return self.config.model.head.out_dim
