"""BYOL (Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020): an online network predicts
the projection that an EMA target network gives another view of the same image.

Online network (the student): backbone -> projector -> predictor; target network (the teacher,
the online network's EMA): backbone -> projector, with the same parameter names, so that the
trainer's by-name EMA pairs them and leaves the predictor to the student alone. The projector
and the predictor are the paper's MLP (Sec. 3.3): Linear (no bias) -> BatchNorm -> ReLU ->
Linear, laid out as lightly's ``BYOLProjectionHead`` / ``BYOLPredictionHead``. The asymmetry
(a predictor on one side, no gradient through the target) is what keeps BYOL from collapsing
without negatives (Sec. 3.2 and 5).

Loss (the paper's Eq. 2 and its symmetrised form, up to the affine map 2 - 2 cos): minus the
mean cosine between the online prediction of one global view and the target projection of the
other, averaged over the 2 terms, as lightly's example 0.5 * (ncs(p0, z1) + ncs(p1, z0)).
The target sees the 2 global views only. With local views (data.num_local_crops > 0, not in
the paper), each local view's prediction is matched against both target projections, and the
loss is the mean over all (online view, other global target view) pairs, 2 + 2 L of them,
each pair weighted alike: DINO's normalisation of its view pairs (losses/dino.py).

BatchNorm makes a sample's output depend on the other samples it is normalised with. Each
view's batch is normalised on its own (the MLPs run once per view, as BYOL's reference and
lightly's and solo-learn's examples do), over the micro-batch of one process: gradient
accumulation (train.accumulation_steps) normalises over each micro-batch, so A micro-batches
of B / A are not one batch of B; several processes normalise over their own share of the batch
unless the networks use SyncBatchNorm, which build_state (training/state.py) converts them to
on CUDA with several processes (then the statistics span the processes' micro-batches; CPU
processes keep per-process statistics). The target network runs in train mode, so its
projections are normalised with batch statistics too, as in the reference; its BatchNorm
running statistics are buffers, which the EMA leaves alone, and nothing evaluates them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dinolab.config import Config, ConfigError
from dinolab.methods.base import BatchPosition, Objective, StepOutput, StepValues
from dinolab.methods.dino import build_backbone
from dinolab.models.backbone import feature_dim
from dinolab.models.multicrop import resolution_groups

__all__ = ["BYOL", "BYOLNetwork", "NegativeCosineLoss", "byol_mlp", "output_std"]


def byol_mlp(input_dim: int, hidden_dim: int, output_dim: int) -> nn.Sequential:
    """The projector's and the predictor's MLP (Grill et al., 2020, Sec. 3.3): [N, input_dim]
    -> [N, output_dim]. The first linear layer has no bias, which the BatchNorm after it would
    cancel; the layers sit at lightly's indices (0: Linear, 1: BatchNorm1d, 2: ReLU, 3: Linear)
    so that the parameters compare one to one."""
    return nn.Sequential(
        nn.Linear(input_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, output_dim),
    )


class BYOLNetwork(nn.Module):
    """Backbone, projector and (the online network only) predictor over a list of views.

    forward: V views [b, C, H_v, W_v] -> [V * b, out_dim], view-major: the predictions
    (online network) or the projections (target network). Views of one size go through the
    backbone together (models/multicrop.py); the MLPs run once per view, so that BatchNorm
    normalises each view's batch on its own.
    """

    def __init__(self, backbone: nn.Module, projector: nn.Module,
                 predictor: nn.Module | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.predictor = predictor

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        features = torch.cat([self.backbone(torch.cat(group))
                              for group in resolution_groups(views)])  # [V * b, D]
        outputs = []
        for view_features in features.chunk(len(views)):
            projection = self.projector(view_features)
            outputs.append(projection if self.predictor is None else self.predictor(projection))
        return torch.cat(outputs)


class NegativeCosineLoss(nn.Module):
    """Minus the mean cosine of each online view's prediction with the target projection of
    every global view other than itself (module docstring). It has no state: a checkpoint
    keeps its empty state_dict under "loss"."""

    def forward(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """predictions: [V * b, K] online predictions of the V views (the 2 global first),
        view-major; targets: [2 * b, K] target projections of the 2 global views -> scalar in
        [-1, 1]. In fp32 with autocast off: the cosines of bf16 vectors lose digits."""
        num_views = len(predictions) // (len(targets) // 2)
        with torch.autocast(predictions.device.type, enabled=False):
            online = F.normalize(predictions.float(), dim=-1).unflatten(0, (num_views, -1))
            target = F.normalize(targets.float(), dim=-1).unflatten(0, (2, -1))
            cosines = torch.einsum("vbk,tbk->vt", online, target) / online.shape[1]  # [V, 2]
            # Pairs of different views: not a global view with itself (a mask, not indexing,
            # which would be a host sync)
            pairs = 1 - torch.eye(num_views, 2, device=cosines.device)
            return -(cosines * pairs).sum() / (2 * num_views - 2)


@torch.no_grad()
def output_std(projections: torch.Tensor, num_views: int = 2) -> torch.Tensor:
    """projections: [num_views * b, K], view-major -> the standard deviation over each view's
    batch of the L2-normalised projections, averaged over dimensions and views: 0 when the
    outputs have collapsed to one point, about 1 / sqrt(K) when they spread over the sphere
    (the collapse indicator of SimSiam, Chen and He, 2021, Sec. 4.1). A device scalar."""
    with torch.autocast(projections.device.type, enabled=False):
        normalised = F.normalize(projections.float(), dim=-1).unflatten(0, (num_views, -1))
        return normalised.std(dim=1).mean()


class BYOL(Objective):
    name = "byol"
    loss: NegativeCosineLoss

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.loss = NegativeCosineLoss()
        # The last micro-batch's target output_std, on the device until a log step reads it
        self._output_std: torch.Tensor | None = None

    def build_network(self, drop_path_rate: float, student: bool) -> nn.Module:
        backbone = build_backbone(self.config, drop_path_rate)
        widths = self.config.model.byol
        projector = byol_mlp(feature_dim(backbone), widths.hidden_dim, widths.out_dim)
        predictor = byol_mlp(widths.out_dim, widths.hidden_dim, widths.out_dim) if student \
            else None
        return BYOLNetwork(backbone, projector, predictor)

    def check(self, network: nn.Module, micro_batch: int) -> None:
        if micro_batch < 2:
            raise ConfigError(f"invalid value for train.batch_size: BYOL's MLPs normalise over "
                              f"the batch (BatchNorm), which needs at least 2 images per "
                              f"micro-batch and process, and there is {micro_batch} "
                              "(train.batch_size / processes / train.accumulation_steps)")

    def lr_scales(self) -> dict[str, float]:
        return {"predictor.": self.config.model.byol.predictor_lr_scale}

    def forward(self, student: nn.Module, teacher: nn.Module, views: list[torch.Tensor],
                batch: BatchPosition, values: StepValues) -> StepOutput:
        with torch.no_grad():
            targets = teacher(views[:2])  # [2b, K]
        predictions = student(views)  # [V b, K]
        self._output_std = output_std(targets)
        return StepOutput(self.loss(predictions, targets))

    def monitor(self, loss: float, terms: dict[str, float]) -> dict[str, float]:
        if self._output_std is None:
            return {}
        return {"output_std": self._output_std.item()}  # host sync
