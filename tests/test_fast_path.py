"""Every fast-path piece computes the plain step: the same losses and weights, within tolerance.

The switches are those that benchmarks/throughput.py turns off one at a time (its
``switch_variants``): grouped forward, fused attention, foreach AdamW, foreach EMA, clipping
without host syncs; plus fused AdamW, torch.compile and gradient checkpointing. Each variant
runs three steps of the tiny fp32 configuration from the same initial weights on the same views;
the tolerance is float32 rounding (operations run in another order). bf16 and fp16 against
fp32: test_precision.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from dinolab.config import load_config
from dinolab.training.optim import parameter_groups
from dinolab.training.state import TrainingState, build_state
from dinolab.training.step import StepValues, train_step

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import throughput  # noqa: E402  (the benchmark's own switch definitions)

VALUES = StepValues(lr=1e-3, weight_decay=0.04, teacher_momentum=0.99, teacher_temp=0.04,
                    freeze_last_layer=False)
STEPS = 3


def _state(*extra: str, cnn: bool = False) -> TrainingState:
    """The tiny configuration's state; ``cnn`` drops its ViT keywords (a CNN does not take them)."""
    torch.manual_seed(0)
    overrides = [item for item in tiny_overrides(Path("unused"), Path("unused"))
                 if not (cnn and item.startswith(("model.backbone_kwargs", "model.patch_size")))]
    return build_state(load_config(None, overrides + ["optim.clip_grad=0.05", *extra]))


def _views() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return ([torch.randn(8, 3, 28, 28, generator=generator) for _ in range(2)]
            + [torch.randn(8, 3, 14, 14, generator=generator) for _ in range(2)])


def _train(state: TrainingState) -> tuple[list[float], list[torch.Tensor]]:
    views = _views()
    losses = [train_step(state, [views], VALUES).item() for _ in range(STEPS)]
    weights = [p.detach().clone() for p in [*state.student_parameters, *state.teacher_parameters]]
    return losses, weights


@pytest.fixture(scope="module")
def reference() -> tuple[list[float], list[torch.Tensor]]:
    return _train(_state())


def _assert_same(actual: tuple[list[float], list[torch.Tensor]],
                 expected: tuple[list[float], list[torch.Tensor]]) -> None:
    """Losses (which depend on the updated weights) to 1e-5. Weights: 99% of the elements to
    float32 rounding. The rest are weights whose gradient is float32 noise around zero (a few
    biases): AdamW divides each gradient by its own running magnitude, so noise moves such a
    weight by up to lr in either direction per step, whichever the order of the operations."""
    assert actual[0] == pytest.approx(expected[0], rel=1e-5)
    got = torch.cat([weight.flatten() for weight in actual[1]])
    want = torch.cat([weight.flatten() for weight in expected[1]])
    close = torch.isclose(got, want, rtol=1e-4, atol=1e-5)
    assert close.float().mean() >= 0.99, f"{(~close).sum()} of {close.numel()} weights differ"
    assert (got - want).abs().max() <= 2 * STEPS * VALUES.lr


@pytest.mark.parametrize("index", range(len(throughput.switch_variants())))
def test_switching_a_piece_off_gives_the_same_steps(index: int, reference) -> None:
    name, context, edit = throughput.switch_variants()[index]
    state = _state()
    edit(state)
    with context():
        _assert_same(_train(state), reference)


def test_the_steps_move_the_weights(reference) -> None:
    """Not vacuous: three steps change the loss and the weights."""
    initial = _state()
    first = [p.detach().clone() for p in initial.student_parameters]
    assert len(set(reference[0])) == STEPS
    assert not all(torch.equal(a, b) for a, b in zip(first, reference[1], strict=False))


def test_fused_adamw_gives_the_same_steps(reference) -> None:
    state = _state()
    state.optimizer = torch.optim.AdamW(parameter_groups(state.student_module), lr=0.0,
                                        fused=True)
    _assert_same(_train(state), reference)


@pytest.mark.slow
def test_compiled_networks_give_the_same_steps(reference) -> None:
    torch._dynamo.reset()
    _assert_same(_train(_state("train.compile=true")), reference)


def test_grad_checkpointing_gives_the_same_steps(reference) -> None:
    """The student's blocks recompute their activations in the backward, with the same random
    draws (drop path): the steps are the plain steps. The teacher, with no backward, keeps its
    plain forward."""
    state = _state("model.grad_checkpointing=true")
    assert state.student_module.backbone.grad_checkpointing
    assert not state.teacher.backbone.grad_checkpointing
    _assert_same(_train(state), reference)


@pytest.mark.parametrize("backbone", ["vit", "resnet"])
def test_grad_checkpointing_keeps_less_for_the_backward(backbone: str) -> None:
    """What autograd keeps from the student's forward for its backward, in bytes: with
    checkpointing, each block keeps only its input, not its inner activations."""
    cnn = backbone == "resnet"
    extra = ["model.backbone=test_resnet"] if cnn else \
        ["model.backbone_kwargs={depth: 4, embed_dim: 32, num_heads: 2}"]

    def kept_bytes(*switch: str) -> int:
        student, kept = _state(*extra, *switch, cnn=cnn).student_module, [0]

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            kept[0] += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            student(_views())
        return kept[0]

    plain, checkpointed = kept_bytes(), kept_bytes("model.grad_checkpointing=true")
    assert checkpointed < 0.5 * plain, (checkpointed, plain)


def test_clipping_without_host_syncs_equals_the_reference_clipping() -> None:
    """Gradients compared directly: AdamW is nearly blind to a gradient's scale."""
    from dinolab.training.optim import clip_gradients_per_tensor

    generator = torch.Generator().manual_seed(0)
    scales = [0.01, 0.5, 1.0, 3.0, 100.0]  # norms below and above the threshold of 1
    ours = [torch.nn.Parameter(torch.zeros(7)) for _ in scales]
    theirs = [torch.nn.Parameter(torch.zeros(7)) for _ in scales]
    for mine, other, scale in zip(ours, theirs, scales, strict=True):
        mine.grad = torch.randn(7, generator=generator) * scale
        other.grad = mine.grad.clone()
    clip_gradients_per_tensor(ours, 1.0)
    throughput.clip_with_sync(theirs, 1.0)
    for mine, other in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine.grad, other.grad)
    assert all(p.grad.norm() <= 1.0 + 1e-5 for p in ours)
    assert ours[0].grad.norm() < 0.1  # small gradients are left alone
