"""The peer of the throughput benchmark: a DINO step built from lightly's public pieces.

Built the way lightly's DINO example shows it: backbone + ``DINOProjectionHead`` for student
and teacher, ``update_momentum`` before the step, one forward per view, ``DINOLoss`` over the
lists of outputs, ``cancel_last_layer_gradients``, then the optimizer. The data side is
lightly's ``DINOTransform`` applied per image in the loader's workers (images converted to RGB,
as its normalisation needs three channels). Same backbone, crops, batch and precision as the
dinolab step it is compared with; AdamW as the optimizer (lightly's example uses Adam).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms import DINOTransform
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dinolab.config import Config
from dinolab.models.backbone import create_backbone, feature_dim


class PeerDINO(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        head = config.model.head
        self.student_backbone = create_backbone(config.model, config.data.global_crop_size,
                                                config.model.drop_path_rate)
        def make_head() -> DINOProjectionHead:
            return DINOProjectionHead(
                feature_dim(self.student_backbone), head.hidden_dim, head.bottleneck_dim,
                head.out_dim, batch_norm=head.norm == "batch",
                norm_last_layer=head.norm_last_layer, freeze_last_layer=1,
            )

        self.student_head = make_head()
        self.teacher_backbone = copy.deepcopy(self.student_backbone)
        self.teacher_head = make_head()  # weight-normed heads do not deepcopy
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)

    def forward(self, view: torch.Tensor) -> torch.Tensor:
        return self.student_head(self.student_backbone(view).flatten(start_dim=1))

    def forward_teacher(self, view: torch.Tensor) -> torch.Tensor:
        return self.teacher_head(self.teacher_backbone(view).flatten(start_dim=1))


class PeerStep:
    """One training step of the peer on a list of views (2 global first)."""

    def __init__(self, config: Config, device: torch.device,
                 autocast_dtype: torch.dtype | None) -> None:
        self.model = PeerDINO(config).to(device)
        self.criterion = DINOLoss(config.model.head.out_dim,
                                  warmup_teacher_temp=config.loss.warmup_teacher_temp,
                                  teacher_temp=config.loss.teacher_temp,
                                  student_temp=config.loss.student_temp,
                                  center_momentum=config.loss.center_momentum).to(device)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.scaler = torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 else None

    def __call__(self, views: list[torch.Tensor]) -> torch.Tensor:
        model = self.model
        update_momentum(model.student_backbone, model.teacher_backbone, m=0.996)
        update_momentum(model.student_head, model.teacher_head, m=0.996)
        views = [view.to(self.device, non_blocking=True) for view in views]
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            teacher_out = [model.forward_teacher(view) for view in views[:2]]
            student_out = [model.forward(view) for view in views]
            loss = self.criterion(teacher_out, student_out, epoch=1)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        model.student_head.cancel_last_layer_gradients(current_epoch=1)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.detach()


class _PeerViews(Dataset):
    def __init__(self, images: Dataset, transform: DINOTransform) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        image, _ = self.images[index]
        return self.transform(image.convert("RGB"))


def peer_loader(config: Config, images: Dataset, batch: int, num_workers: int,
                pin_memory: bool) -> DataLoader:
    data = config.data
    transform = DINOTransform(
        global_crop_size=data.global_crop_size, global_crop_scale=data.global_crop_scale,
        local_crop_size=data.local_crop_size, local_crop_scale=data.local_crop_scale,
        n_local_views=data.num_local_crops, hf_prob=data.flip_prob, cj_prob=data.color_jitter_prob,
        cj_strength=1.0, cj_bright=data.brightness, cj_contrast=data.contrast,
        cj_sat=data.saturation, cj_hue=data.hue, random_gray_scale=data.grayscale_prob,
        gaussian_blur=data.blur_probs, sigmas=data.blur_sigma,
        solarization_prob=data.solarize_prob,
        normalize={"mean": list(data.mean), "std": list(data.std)},
    )
    options: dict[str, Any] = {}
    if num_workers > 0:
        options = {"persistent_workers": True, "prefetch_factor": 4}
    return DataLoader(_PeerViews(images, transform), batch_size=batch, shuffle=True,
                      drop_last=True, num_workers=num_workers, pin_memory=pin_memory, **options)
