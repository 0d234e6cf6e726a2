"""The prototype layer's freeze, both ways: DINO drops its gradients (AdamW's moments never see
them), DINOv2 gives it a learning rate of 0 (the moments keep accumulating). Either way the layer
does not move while frozen, and moves once it is not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from dinolab.config import load_config
from dinolab.training.state import build_state
from dinolab.training.step import StepValues, train_step


def _last_layer(state: object) -> dict[str, torch.Tensor]:
    module = state.student_module  # type: ignore[attr-defined]
    return {name: parameter.detach().clone() for name, parameter in module.named_parameters()
            if "last_layer" in name and parameter.requires_grad}


@pytest.mark.parametrize("how", ["gradients", "lr"])
def test_frozen_last_layer_stays_and_then_trains(tmp_path: Path, how: str) -> None:
    config = load_config(None, tiny_overrides(tmp_path / "none", tmp_path) + [
        "train.device=cpu", "model.head.norm_last_layer=false", "model.drop_path_rate=0",
        f"optim.freeze_last_layer_by={how}"])
    torch.manual_seed(0)
    state = build_state(config)
    generator = torch.Generator().manual_seed(1)
    views = [torch.randn(8, 3, size, size, generator=generator) for size in (28, 28, 14, 14)]
    before = _last_layer(state)
    assert before  # the prototype weights and their trainable magnitude

    def step(frozen: bool) -> None:
        train_step(state, [views], StepValues(1e-3, 0.04, 0.9, 0.04, freeze_last_layer=frozen))

    step(frozen=True)
    for name, value in _last_layer(state).items():
        assert torch.equal(value, before[name]), name
    moments = [state.optimizer.state.get(parameter, {}).get("exp_avg")
               for name, parameter in state.student_module.named_parameters()
               if "last_layer" in name and parameter.requires_grad]
    if how == "lr":  # the moments saw the gradients
        assert all(moment is not None and moment.abs().sum() > 0 for moment in moments)
    else:  # no gradient reached AdamW
        assert all(moment is None for moment in moments)
    step(frozen=False)
    assert any(not torch.equal(value, before[name])
               for name, value in _last_layer(state).items())
