"""DINOv2 (Oquab et al., 2024): DINO's [CLS] loss plus KoLeo and the iBOT masked-patch loss.

Per micro-batch (OBJECTIVES_SPEC.md 1.1, the authors' ``SSLMetaArch.forward_backward``):
- block masks for the student's global views only (losses/masking.py), drawn for the step's
  whole global batch from (seed, step), so that they do not depend on how the batch is split
  over processes and micro-batches;
- the teacher sees the unmasked global views: its [CLS] logits are DINO's targets, its patch
  logits at the masked positions the iBOT targets; the student sees the masked global views
  (a learned mask token replaces the masked patch embeddings before the position embedding)
  and the local views;
- loss = DINO [CLS] loss (every student view against each other teacher view, losses/dino.py)
  + koleo_weight * sum over the 2 global views of KoLeo on the student's [CLS] features (after
  the final norm, before the head; losses/koleo.py)
  + ibot_weight * iBOT patch loss (losses/ibot.py), with its own centre.
- centering: DINO's EMA centre (``mean``) or Sinkhorn-Knopp (``sinkhorn``), for both targets.

Register tokens (``model.num_registers``) are prefix tokens: the patch loss starts after them.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

from dinolab.config import Config, ConfigError
from dinolab.distributed import all_reduce_mean
from dinolab.losses import DINOLoss, batch_center
from dinolab.losses.ibot import ibot_patch_loss, masked_weights
from dinolab.losses.koleo import koleo_loss
from dinolab.losses.masking import block_masks
from dinolab.methods.base import BatchPosition, Objective, StepOutput, StepValues, backbone_of
from dinolab.methods.dino import build_backbone, teacher_entropy_values
from dinolab.models.backbone import feature_dim
from dinolab.models.head import DINOHead
from dinolab.models.multicrop import resolution_groups

DEFAULT_KOLEO_WEIGHT = 0.1  # DINOv2's dino.koleo_loss_weight
DEFAULT_IBOT_WEIGHT = 1.0  # DINOv2's ibot.loss_weight


def term_weights(config: Config) -> tuple[float, float]:
    """(KoLeo, iBOT) weights: the configured ones, or DINOv2's where blank (a blank iBOT weight
    becomes 0 on a backbone without patch tokens: DINOv2.build_network)."""
    koleo, ibot = config.loss.koleo_weight, config.loss.ibot_weight
    return (DEFAULT_KOLEO_WEIGHT if koleo is None else koleo,
            DEFAULT_IBOT_WEIGHT if ibot is None else ibot)


def has_patch_tokens(backbone: nn.Module) -> bool:
    """A timm ViT: a patch embedding to put mask tokens in, and prefix tokens to skip."""
    return hasattr(backbone, "patch_embed") and hasattr(backbone, "num_prefix_tokens")


class DINOv2Network(nn.Module):
    """Backbone, DINO head, an optional separate iBOT head and (student) a mask token.

    forward -> (logits [V * b, K] of every view's [CLS], view-major; logits [M, K] of the M
    masked patch tokens of the global views, or None; [CLS] features [2 * b, D] of the global
    views). A tuple, so that DDP finds the tensors.
    """

    def __init__(self, backbone: nn.Module, head: DINOHead, patch_head: DINOHead | None,
                 mask_token: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.patch_head = patch_head
        self.mask_token = nn.Parameter(torch.zeros(feature_dim(backbone))) if mask_token else None
        self._input_masks: torch.Tensor | None = None
        if mask_token and hasattr(backbone, "patch_embed"):  # after timm's patch embedding
            patch_embed: Any = backbone.patch_embed
            patch_embed.register_forward_hook(self._mask_patches)

    def _mask_patches(self, module: nn.Module, inputs: tuple,
                      patches: torch.Tensor) -> torch.Tensor:
        """patches [N, h, w, D] (or [N, L, D]) -> the mask token where ``_input_masks`` is set."""
        if self._input_masks is None or self.mask_token is None:
            return patches
        mask = self._input_masks.reshape(*patches.shape[:-1], 1)
        return torch.where(mask, self.mask_token.to(patches.dtype), patches)

    def forward(self, views: list[torch.Tensor], masks: torch.Tensor | None = None,
                mask_input: bool = False) -> tuple[torch.Tensor, torch.Tensor | None,
                                                   torch.Tensor]:
        """views: the 2 global views [b, C, H, W] first; masks: [2 * b, h, w] bool or None;
        mask_input: replace the masked patches (the student) or only select them (teacher)."""
        backbone: Any = self.backbone
        self._input_masks = masks if mask_input else None
        try:
            tokens = backbone.forward_features(torch.cat(views[:2]))  # [2b, P + L, D]
        finally:
            self._input_masks = None
        global_features = backbone.forward_head(tokens, pre_logits=True)  # [2b, D]
        local_features = [backbone(torch.cat(group)) for group in resolution_groups(views[2:])]
        features = torch.cat([global_features, *local_features])
        if masks is None:
            return self.head(features), None, global_features
        patches = tokens[:, backbone.num_prefix_tokens:][masks.flatten(1)]  # [M, D]
        if self.patch_head is not None:
            return self.head(features), self.patch_head(patches), global_features
        logits = self.head(torch.cat([features, patches]))  # one call, as DINOv2's shared head
        return logits[: len(features)], logits[len(features):], global_features


class DINOv2Loss(nn.Module):
    """The loss state: DINO's [CLS] loss with its centre, and the patch targets' centre."""

    patch_center: torch.Tensor

    def __init__(self, config: Config) -> None:
        super().__init__()
        loss = config.loss
        self.cls = DINOLoss(config.model.head.out_dim, loss.student_temp, loss.center_momentum,
                            loss.centering)
        self.register_buffer("patch_center", torch.zeros(1, config.model.head.out_dim))

    def patch_targets(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """[M, K] -> [M, K]: the same centring and sharpening as the [CLS] targets, with the
        patches' own centre (the ``cls`` loss's rule, another buffer)."""
        return self.cls.teacher_probabilities(teacher_logits.float(), teacher_temp,
                                              self.patch_center)

    @torch.no_grad()
    def update_patch_center(self, logit_sum: torch.Tensor, count: torch.Tensor) -> None:
        """The mean raw teacher logit over every masked patch of all processes (a collective)."""
        if self.cls.centering == "sinkhorn":
            return
        total = torch.cat([logit_sum.flatten(), count.flatten()])
        all_reduce_mean(total)  # sums over processes / world: their ratio is the global mean
        mean = total[:-1].view_as(self.patch_center) / total[-1].clamp(min=1e-12)
        momentum = self.cls.center_momentum
        self.patch_center.mul_(momentum).add_(mean, alpha=1 - momentum)


class DINOv2(Objective):
    name = "dinov2"
    loss: DINOv2Loss

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.koleo_weight, self.ibot_weight = term_weights(config)
        self.loss = DINOv2Loss(config)
        self._masks: tuple[int, torch.Tensor] | None = None  # (step, the global batch's masks)

    def build_network(self, drop_path_rate: float, student: bool) -> nn.Module:
        config = self.config
        backbone = build_backbone(config, drop_path_rate)
        if config.loss.ibot_weight is None and not has_patch_tokens(backbone):
            self.ibot_weight = 0.0  # blank: iBOT where there are patch tokens to mask, else none
        width = feature_dim(backbone)
        patch_head = (DINOHead(width, config.model.head)
                      if self.ibot_weight and config.model.ibot_separate_head else None)
        return DINOv2Network(backbone, DINOHead(width, config.model.head), patch_head,
                             mask_token=student and bool(self.ibot_weight))

    def check(self, network: nn.Module, micro_batch: int) -> None:
        backbone = backbone_of(network)
        if self.ibot_weight and not has_patch_tokens(backbone):
            raise ConfigError(f"invalid value for loss.ibot_weight: the iBOT patch loss needs a "
                              f"vision transformer, and {self.config.model.backbone} is not one; "
                              "set loss.ibot_weight=0")
        if self.koleo_weight and micro_batch < 2:
            raise ConfigError(f"invalid value for loss.koleo_weight: KoLeo needs at least 2 "
                              f"images per micro-batch and process, and there is {micro_batch} "
                              "(train.batch_size / processes / train.accumulation_steps); a "
                              "larger batch, or loss.koleo_weight=0")

    def masks(self, batch: BatchPosition, global_view: torch.Tensor, patch: int) -> torch.Tensor:
        """This micro-batch's masks [2 * b, h, w] (view-major, as its global views), cut from
        the masks of the step's global batch (drawn once a step, from the seed and the step)."""
        if self._masks is None or self._masks[0] != batch.step:
            data = self.config.data
            grid = (global_view.shape[-2] // patch, global_view.shape[-1] // patch)
            rng = random.Random(f"{self.config.train.seed}:{batch.step}")
            drawn = block_masks(2 * batch.global_batch, grid, rng, data.mask_probability,
                                tuple(data.mask_ratio))  # type: ignore[arg-type]
            self._masks = (batch.step, drawn)
        drawn = self._masks[1]
        rows = torch.cat([batch.rows, batch.rows + batch.global_batch])
        return drawn[rows].to(global_view.device, non_blocking=True)

    def forward(self, student: nn.Module, teacher: nn.Module, views: list[torch.Tensor],
                batch: BatchPosition, values: StepValues) -> StepOutput:
        masks = None
        if self.ibot_weight:  # a ViT (check): the masks' grid is its patch grid
            patch_embed: Any = backbone_of(teacher).patch_embed
            masks = self.masks(batch, views[0], int(patch_embed.patch_size[0]))
        with torch.no_grad():
            teacher_cls, teacher_patches, _ = teacher(views[:2], masks)
        student_cls, student_patches, student_features = student(views, masks, mask_input=True)
        dino = self.loss.cls(student_cls, teacher_cls, values.teacher_temp)
        total, terms = dino, {"dino_loss": dino.detach()}
        with torch.autocast(teacher_cls.device.type, enabled=False):
            statistics = {"center": batch_center(teacher_cls)}
        if self.koleo_weight:
            koleo = sum(koleo_loss(crop) for crop in student_features.chunk(2))
            total = total + self.koleo_weight * koleo
            terms["koleo_loss"] = koleo.detach()  # type: ignore[union-attr]
        if masks is not None and teacher_patches is not None and student_patches is not None:
            targets = self.loss.patch_targets(teacher_patches, values.teacher_temp)
            ibot = ibot_patch_loss(student_patches, targets, masked_weights(masks), len(masks),
                                   self.config.loss.student_temp)
            total = total + self.ibot_weight * ibot
            terms["ibot_loss"] = ibot.detach()
            statistics["patch_logit_sum"] = teacher_patches.float().sum(0, keepdim=True)
            statistics["patch_count"] = masks.sum().float()
        return StepOutput(total, terms, statistics)

    def update(self, statistics: dict[str, torch.Tensor]) -> None:
        self.loss.cls.update_center(statistics["center"])  # collective
        if "patch_count" in statistics:
            self.loss.update_patch_center(statistics["patch_logit_sum"],
                                          statistics["patch_count"])  # collective

    def monitor(self, loss: float, terms: dict[str, float]) -> dict[str, float]:
        return teacher_entropy_values(terms["dino_loss"], self.loss.cls.teacher_entropy.item())

    def collapse_signal(self, loss: float, terms: dict[str, float],
                        monitored: dict[str, float]) -> tuple[float, float] | None:
        return terms["dino_loss"], monitored["teacher_entropy"]

    @property
    def num_prototypes(self) -> int | None:
        return self.config.model.head.out_dim
