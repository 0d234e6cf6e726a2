"""The trainer's guarantees hold for every objective: DINOv2 (and BYOL) under DDP, FSDP,
gradient accumulation, a SIGKILL and an export.

DINOv2 (methods/dinov2.py) adds to DINO's [CLS] loss KoLeo (neighbours searched over all
processes, losses/koleo.py) and iBOT (block masks drawn per step for the global batch from
(seed, step), cut per micro-batch by ``BatchPosition.rows``; patch centre: the mean over all
masked patches of the step). So 2 gloo processes of B/2 each equal 1 process of B: losses (each
term too), student, teacher and the loss state (the [CLS] centre and the patch centre), with
Sinkhorn-Knopp centering (global sums) and a separate iBOT head as well, and under FSDP.
The sampler deals the global batch to the processes in turn (methods/base.py,
``batch_position``): process r holds the global rows r, r + W, r + 2W, ..., so the processes
here get ``view[r::W]``, not contiguous halves (which would give an image another's mask; a
negative control shows that the comparison sees it).

Gradient accumulation (A micro-batches of B/A on one process: each micro-batch's loss / A is
back-propagated, then one optimizer step, one EMA update and one centre update from the
statistics of all micro-batches) equals one batch of B for everything computed per sample or
from step-wide statistics: the DINO loss with mean centering, iBOT and both centres. It does
not for what looks at the other samples of its micro-batch: KoLeo searches neighbours within
the micro-batch (over all processes' micro-batches, but not across micro-batches), and
Sinkhorn-Knopp sums over the micro-batch. Those terms are, exactly, the mean over the
micro-batches of the term computed on each micro-batch alone (as DINOv2's per-GPU KoLeo).

The model is the tiny ViT (patch 7 on 28 px crops: a 4 x 4 grid) in fp32 on the CPU, without
drop path and without BatchNorm in the head, so that samples do not interact except through
the terms above.

This file is also the worker of the 2-process runs (``python tests/test_objectives.py MODE
OUT``, launched per rank by test_ddp.launch with torchrun's variables).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from conftest import make_fashion_mnist, tiny_overrides, train_tiny_run
from equivalence import assert_tensors_close, prefixed
from test_crash_safety import (
    assert_same_networks,
    child_arguments,
    final_state,
    finish,
    kill_at_step,
    start,
)
from test_ddp import LR, TOLERANCE, WORLD, global_batches, launch, step_config

import dinolab
from dinolab import auto
from dinolab.config import Config, ConfigError, load_config
from dinolab.methods import batch_position
from dinolab.training.state import TrainingState, build_state
from dinolab.training.step import StepValues, train_step

BATCH = 8  # global batch (test_ddp.global_batches): 4 images per process
STEPS = 3
GRID_PATCH = 7  # the tiny ViT's patch: 28 px global crops are 4 x 4 patches
# KoLeo 0.1, iBOT 1.0 and the EMA centre (DINOv2's defaults, not the demo preset's KoLeo 0.3
# and Sinkhorn-Knopp) in every variant but "sinkhorn"
DINOV2 = ("method=dinov2", "loss.koleo_weight=0.1", "loss.centering=mean",
          f"train.batch_size={BATCH}")
VARIANTS: dict[str, tuple[str, ...]] = {
    "default": (),
    "sinkhorn": ("loss.centering=sinkhorn",),
    "separate_head": ("model.ibot_separate_head=true",),
    "fsdp": ("train.parallel=fsdp",),  # in one process, the plain run: "default"
}
ONE_PROCESS = {"default": "default", "sinkhorn": "sinkhorn", "separate_head": "separate_head",
               "fsdp": "default"}
BYOL = ("method=byol", f"train.batch_size={BATCH}", "model.byol.hidden_dim=32",
        "model.byol.out_dim=16")
BATCH_NORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
# BYOL's parameters whose exact gradient is 0: each adds a shift shared by the batch, which the
# BatchNorm after the next bias-free Linear removes (the backbone's final-norm bias before the
# projector, the projector's output bias before the predictor). AdamW turns their rounding noise
# into moves of up to lr a step, and the EMA hands these to the teacher, whose projector bias
# shifts the targets: two summation orders then give losses 1e-4 apart from the second step on
# (observed: 1 and 2 threads of one process). The BYOL comparison gives both runs their exact
# gradient, 0, instead (and checks that the plain run's are rounding noise).
BYOL_ZERO_GRADIENT = ("backbone.norm.bias", "projector.3.bias")
HAS_BYOL = (Path(dinolab.__file__).parent / "methods" / "byol.py").is_file()
# Tolerances (test_ddp's TOLERANCE): the runs sum the same numbers in other orders (over
# processes or micro-batches, 1 thread or 2), so they differ by fp32 rounding: losses, terms,
# centres and parameters after 3 AdamW steps at lr 1e-3 at rtol 1e-4 / atol 1e-6. Except where
# AdamW's update is ill-conditioned: it moves an element by about lr * g / (|g| + eps), eps 1e-8,
# so where |g| is, at some step, within 100 x eps, the rounding noise of g is no longer small
# against |g| + eps and the runs move the element by different amounts, up to lr a step. Such
# elements (the attention's key bias, whose exact gradient is 0, and the few that cross zero:
# 43 of the 20752 student elements here, 32 of them key bias) are compared at atol lr * steps.
# (Observed: a qkv weight with gradient -1.6e-8 at step 0 ended 4.6e-6 apart under DDP.)
ILL_CONDITIONED_GRADIENT = 1e-6  # 100 x AdamW's eps
ILL_CONDITIONED_TOLERANCE = {"rtol": 0.0, "atol": LR * STEPS}


# --- shared by the worker and the tests -----------------------------------------------------


def dinov2_config(run_dir: Path, *extra: str) -> Config:
    return step_config(run_dir, *DINOV2, *extra)


def step_values(step: int) -> StepValues:
    """test_ddp's values: a fast teacher (momentum 0.9), the last layer frozen at step 0."""
    return StepValues(lr=LR, weight_decay=0.04, teacher_momentum=0.9, teacher_temp=0.04,
                      freeze_last_layer=step == 0)


Deal = Callable[[list[torch.Tensor], int, int], list[torch.Tensor]]


def dealt_in_turn(views: list[torch.Tensor], rank: int, world: int) -> list[torch.Tensor]:
    """The sampler's share of process ``rank``: global rows rank, rank + world, ..."""
    return [view[rank::world] for view in views]


def contiguous_share(views: list[torch.Tensor], rank: int, world: int) -> list[torch.Tensor]:
    """A wrong share for DINOv2 (the negative control): the rank-th contiguous block."""
    share = len(views[0]) // world
    return [view[rank * share : (rank + 1) * share] for view in views]


def micro_batches(views: list[torch.Tensor], accumulation: int) -> list[list[torch.Tensor]]:
    """A process's share cut into consecutive micro-batches (as ``batch_position`` assumes)."""
    micro = len(views[0]) // accumulation
    return [[view[index * micro : (index + 1) * micro] for view in views]
            for index in range(accumulation)]


def run_steps(config: Config, rank: int, world: int, deal: Deal = dealt_in_turn,
              shares_as_micro_batches: int = 0, zero_gradient: tuple[str, ...] = (),
              ) -> dict[str, Any]:
    """Build the state from seed 0 and run STEPS train_steps on this rank's share of each
    global batch -> losses, each term, student, teacher and loss state (full tensors; on the
    main process only when sharded). ``shares_as_micro_batches``: one process that accumulates,
    as its micro-batches, the shares that so many processes would get. ``zero_gradient``: the
    student parameters whose gradient is set to 0 (BYOL_ZERO_GRADIENT)."""
    torch.manual_seed(0)
    state = build_state(config)
    for name, parameter in state.student_module.named_parameters():
        if name in zero_gradient:
            parameter.register_hook(torch.zeros_like)
    smallest, largest = gradient_sizes(state) if not state.sharded else ({}, {})
    losses, terms = [], []
    for step, views in enumerate(global_batches()):
        if shares_as_micro_batches:
            batches = [deal(views, part, shares_as_micro_batches)
                       for part in range(shares_as_micro_batches)]
        else:
            batches = [deal(views, rank, world)]
        losses.append(train_step(state, batches, step_values(step)).item())
        terms.append({name: value.item() for name, value in state.terms.items()})
    saved = state.state_dict()
    return {"losses": torch.tensor(losses),
            "terms": {name: torch.tensor([step[name] for step in terms]) for name in terms[0]},
            "student": saved["student"], "teacher": saved["teacher"], "loss": saved["loss"],
            "smallest_gradient": smallest, "largest_gradient": largest}


def gradient_sizes(state: TrainingState) -> tuple[dict[str, torch.Tensor],
                                                  dict[str, torch.Tensor]]:
    """-> ({parameter name: the smallest |gradient| of each element over the steps}, the same
    with the largest), filled in as the optimizer steps (the gradients it sees, after the
    accumulation and any all-reduce)."""
    smallest: dict[str, torch.Tensor] = {}
    largest: dict[str, torch.Tensor] = {}
    names = {id(p): name for name, p in state.student_module.named_parameters()}

    def record(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    name, size = names[id(parameter)], parameter.grad.abs()
                    smallest[name] = torch.minimum(smallest.get(name, size), size)
                    largest[name] = torch.maximum(largest.get(name, size), size)

    state.optimizer.register_step_pre_hook(record)
    return smallest, largest


def assert_trained_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                         smallest_gradient: dict[str, torch.Tensor], what: str) -> None:
    """Student or teacher weights at TOLERANCE, except the elements whose gradient came near
    AdamW's eps in the expected run (``smallest_gradient``), at ILL_CONDITIONED_TOLERANCE. The
    teacher's elements are the EMAs of the student's elements of the same name."""
    assert actual.keys() == expected.keys(), what
    loose = total = 0
    for key, value in expected.items():
        smallest = smallest_gradient.get(key)
        ill = (smallest < ILL_CONDITIONED_GRADIENT if smallest is not None
               else torch.zeros_like(value, dtype=torch.bool))
        torch.testing.assert_close(actual[key][~ill], value[~ill], **TOLERANCE,
                                   msg=prefixed(f"{what}: {key}"))
        torch.testing.assert_close(actual[key][ill], value[ill], **ILL_CONDITIONED_TOLERANCE,
                                   msg=prefixed(f"{what}: {key} (gradient near AdamW's eps)"))
        loose, total = loose + int(ill.sum()), total + value.numel()
    assert smallest_gradient and loose < 0.01 * total, f"{what}: {loose} of {total} loose"


# --- the worker (one process of a 2-process group) ------------------------------------------


def worker(mode: str, out_dir: Path) -> None:
    from dinolab.distributed import init_distributed, shutdown

    torch.set_num_threads(1)  # 2 processes on 2 cores
    me = int(os.environ["RANK"])
    assert init_distributed(torch.device("cpu"))
    unused = out_dir / "unused"
    if mode == "dinov2":
        result = {name: run_steps(dinov2_config(unused, *extra), me, WORLD)
                  for name, extra in VARIANTS.items()}
        result["contiguous"] = run_steps(dinov2_config(unused), me, WORLD, contiguous_share)
    elif mode == "byol":
        result = {"byol": run_steps(step_config(unused, *BYOL), me, WORLD,
                                    zero_gradient=BYOL_ZERO_GRADIENT)}
    else:
        raise SystemExit(f"unknown mode {mode}")
    torch.save(result, out_dir / f"rank{me}.pt")
    shutdown()


# --- 1. two processes equal one process -----------------------------------------------------


@pytest.fixture(scope="module")
def dinov2_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch("dinov2", tmp_path_factory.mktemp("dinov2_ranks"), worker_file=__file__)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    run_dir = tmp_path_factory.mktemp("one")
    return {name: run_steps(dinov2_config(run_dir, *VARIANTS[name]), rank=0, world=1)
            for name in ("default", "sinkhorn", "separate_head")}


def assert_loss_state_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                            what: str) -> None:
    """The checkpoint's "loss": DINOv2's cls.center and patch_center."""
    assert_tensors_close(actual, expected, f"{what}: loss state", TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_dinov2_on_two_processes_equals_one_process(dinov2_ranks: list[dict[str, Any]],
                                                    one_process: dict[str, dict[str, Any]],
                                                    name: str) -> None:
    """KoLeo 0.1 and iBOT 1.0 on; mean centering, Sinkhorn-Knopp, a separate iBOT head, and
    FSDP (2 sharded processes against the plain process). Every term's mean over the processes
    is the one-process term: KoLeo's neighbours are searched over both processes' samples, and
    each image has the mask it has in one process."""
    expected = one_process[ONE_PROCESS[name]]
    runs = [rank[name] for rank in dinov2_ranks]
    mean_loss = torch.stack([run["losses"] for run in runs]).mean(dim=0)
    torch.testing.assert_close(mean_loss, expected["losses"], **TOLERANCE)
    assert set(expected["terms"]) == {"dino_loss", "koleo_loss", "ibot_loss"}
    for term, values in expected["terms"].items():
        mean_term = torch.stack([run["terms"][term] for run in runs]).mean(dim=0)
        torch.testing.assert_close(mean_term, values, **TOLERANCE, msg=f"{name}: {term}")
    holders = runs[:1] if name == "fsdp" else runs  # sharded: the main process gathers them
    for run in holders:
        for part in ("student", "teacher"):
            assert_trained_close(run[part], expected[part], expected["smallest_gradient"],
                                 f"{name}: {part}")
        assert_loss_state_close(run["loss"], expected["loss"], name)
    if name == "fsdp":
        assert set(runs[1]["student"].values()) == {None}
    # Not vacuous: the shares differ, the student has a trained mask token, the centres moved
    # (Sinkhorn-Knopp reads and moves neither), and the separate head is in both networks.
    assert not torch.allclose(runs[0]["losses"], runs[1]["losses"])
    assert expected["student"]["mask_token"].abs().sum() > 0
    assert "mask_token" not in expected["teacher"]
    moved = [expected["loss"][key].abs().sum() > 0 for key in ("cls.center", "patch_center")]
    assert moved == ([False, False] if name == "sinkhorn" else [True, True])
    separate = [any(key.startswith("patch_head.") for key in expected[part])
                for part in ("student", "teacher")]
    assert separate == ([True, True] if name == "separate_head" else [False, False])


@pytest.mark.slow
def test_dinov2_shares_cut_contiguously_are_detected(dinov2_ranks: list[dict[str, Any]],
                                                     one_process: dict[str, dict[str, Any]],
                                                     ) -> None:
    """Negative control: processes that took contiguous halves would cut the masks of other
    images than their own (the masks follow the sampler's rows), and the comparison above
    rejects it from the first step on."""
    runs = [rank["contiguous"] for rank in dinov2_ranks]
    expected = one_process["default"]
    mean_ibot = torch.stack([run["terms"]["ibot_loss"] for run in runs]).mean(dim=0)
    assert not torch.allclose(mean_ibot[0], expected["terms"]["ibot_loss"][0], rtol=1e-3)
    with pytest.raises(AssertionError):
        assert_trained_close(runs[0]["student"], expected["student"],
                             expected["smallest_gradient"], "student")


# --- 2. gradient accumulation -----------------------------------------------------------------


def twin_states(run_dir: Path, *extra: str) -> tuple[TrainingState, TrainingState]:
    """Two identical DINOv2 states (seed 0, then the first's state dicts copied)."""
    config = dinov2_config(run_dir, *extra)
    torch.manual_seed(0)
    first, second = build_state(config), build_state(config)
    second.student_module.load_state_dict(first.student_module.state_dict())
    second.teacher.load_state_dict(first.teacher.state_dict())
    second.loss.load_state_dict(first.loss.state_dict())
    return first, second


def halves(views: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    return micro_batches(views, 2)


def assert_same_step(accumulated: TrainingState, single: TrainingState,
                     smallest_gradient: dict[str, torch.Tensor]) -> None:
    for part, network in (("student", lambda state: state.student_module),
                          ("teacher", lambda state: state.teacher)):
        assert_trained_close(network(accumulated).state_dict(), network(single).state_dict(),
                             smallest_gradient, part)
    assert_loss_state_close(accumulated.loss.state_dict(), single.loss.state_dict(), "1 x B")


def test_dinov2_accumulation_without_koleo_equals_one_batch(tmp_path: Path) -> None:
    """Mean centering and iBOT, KoLeo off: 2 micro-batches of B/2 give the loss, each term,
    the student, the teacher and both centres of 1 x B, step after step. Each micro-batch has
    its images' masks of the step's global batch; the patch centre is the mean over every
    masked patch of the step (the micro-batches' masked-patch counts differ)."""
    single, accumulated = twin_states(tmp_path, "loss.koleo_weight=0")
    smallest, _ = gradient_sizes(single)
    initial_mask_token = single.student_module.mask_token.detach().clone()
    counts = []
    for step, views in enumerate(global_batches()):
        counts.append([int(accumulated.objective.masks(
            batch_position(step, BATCH, BATCH // 2, index, 0, 1), views[0], GRID_PATCH).sum())
            for index in range(2)])
        single_loss = train_step(single, [views], step_values(step))
        accumulated_loss = train_step(accumulated, halves(views), step_values(step))
        torch.testing.assert_close(accumulated_loss, single_loss, **TOLERANCE)
        assert set(single.terms) == {"dino_loss", "ibot_loss"}
        for term, value in single.terms.items():
            torch.testing.assert_close(accumulated.terms[term], value, **TOLERANCE, msg=term)
        assert_same_step(accumulated, single, smallest)
    assert any(first != second for first, second in counts)  # a plain mean of means would fail
    assert single.loss.patch_center.abs().sum() > 0 and single.loss.cls.center.abs().sum() > 0
    assert not torch.equal(single.student_module.mask_token, initial_mask_token)


def koleo_term(state: TrainingState, views: list[torch.Tensor], position: Any) -> torch.Tensor:
    """KoLeo as DINOv2's forward computes it on these views alone: over the student's [CLS]
    features (after the final norm) of each masked global view, summed over the 2 views."""
    from dinolab.losses.koleo import koleo_loss

    masks = state.objective.masks(position, views[0], GRID_PATCH)
    _, _, features = state.student_module(views, masks, mask_input=True)
    return sum(koleo_loss(crop) for crop in features.chunk(2))  # type: ignore[return-value]


def sinkhorn_dino_term(state: TrainingState, views: list[torch.Tensor],
                       position: Any) -> torch.Tensor:
    """The [CLS] DINO loss on these views alone, with Sinkhorn-Knopp over them alone."""
    masks = state.objective.masks(position, views[0], GRID_PATCH)
    teacher_logits, _, _ = state.teacher(views[:2], masks)
    student_logits, _, _ = state.student_module(views, masks, mask_input=True)
    return state.loss.cls(student_logits, teacher_logits, step_values(0).teacher_temp)


@pytest.mark.parametrize(("term", "extra", "on_views"), [
    ("koleo_loss", (), koleo_term),
    ("dino_loss", ("loss.centering=sinkhorn", "loss.koleo_weight=0"), sinkhorn_dino_term),
], ids=["koleo", "sinkhorn"])
@torch.no_grad()
def test_dinov2_accumulation_computes_per_micro_batch_terms_per_micro_batch(
        tmp_path: Path, term: str, extra: tuple[str, ...],
        on_views: Callable[..., torch.Tensor]) -> None:
    """KoLeo searches each sample's neighbour within its micro-batch (of all processes), and
    Sinkhorn-Knopp balances the prototypes over its micro-batch: under accumulation the step's
    term is the mean over the micro-batches of the term computed on each one alone, which is
    not the term of 1 x B (so such a step does not equal 1 x B; 2 processes of B/2 do, above).
    The other terms still agree."""
    single, accumulated = twin_states(tmp_path, *extra)
    views = global_batches()[0]
    whole = on_views(single, views, batch_position(0, BATCH, BATCH, 0, 0, 1))
    per_half = torch.stack([
        on_views(accumulated, micro, batch_position(0, BATCH, BATCH // 2, index, 0, 1))
        for index, micro in enumerate(halves(views))]).mean()
    with torch.enable_grad():
        train_step(single, [views], step_values(0))
        train_step(accumulated, halves(views), step_values(0))
    torch.testing.assert_close(accumulated.terms[term], per_half, **TOLERANCE)
    torch.testing.assert_close(single.terms[term], whole, **TOLERANCE)
    assert not torch.allclose(per_half, whole, **TOLERANCE)  # what 1 x B would be held to
    others = ["dino_loss", "ibot_loss"] if term == "koleo_loss" else []
    for other in others:
        torch.testing.assert_close(accumulated.terms[other], single.terms[other], **TOLERANCE)


def step_without_masked_patches(state: TrainingState, views: list[torch.Tensor]) -> int:
    """The first step whose first micro-batch of one image (1 process) has no masked patch."""
    for step in range(100):
        position = batch_position(step, 2, 1, 0, 0, 1)
        if not state.objective.masks(position, views[0], GRID_PATCH).any():
            return step
    raise AssertionError("no such step in 100")


@pytest.mark.parametrize("centering", ["mean", "sinkhorn"])
def test_dinov2_micro_batch_without_masked_patches(tmp_path: Path, centering: str) -> None:
    """With small micro-batches a micro-batch may have no masked patch at all (here 1 image:
    2 global views, of which one draw in 4 leaves both unmasked): the iBOT term of 0 patches
    is 0 for that micro-batch, and its targets an empty softmax or Sinkhorn-Knopp."""
    config = step_config(tmp_path, "method=dinov2", "train.batch_size=2",
                         f"loss.centering={centering}", "loss.koleo_weight=0")
    torch.manual_seed(0)
    state = build_state(config)
    views = [view[:2] for view in global_batches()[0]]
    state.step = step_without_masked_patches(state, views)
    train_step(state, halves(views), step_values(1))
    assert torch.isfinite(state.terms["ibot_loss"]) and state.terms["ibot_loss"] > 0


# --- 3. a SIGKILLed run resumes bit for bit -------------------------------------------------


STEPS_PER_EPOCH = 3  # train.limit_steps_per_epoch: 2 epochs of 3 steps
KILL_AT_STEP = 2  # mid-epoch 1: the run resumes from a timer checkpoint


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fashion_mnist(tmp_path_factory.mktemp("fashion"))


def method_overrides(method: str) -> tuple[str, ...]:
    if method == "byol":
        return ("method=byol", "model.byol.hidden_dim=32", "model.byol.out_dim=16")
    return ("method=dinov2",)


@pytest.mark.slow
@pytest.mark.parametrize("method", [
    "dinov2",
    pytest.param("byol", marks=pytest.mark.skipif(not HAS_BYOL, reason="no methods/byol.py")),
])
def test_killed_run_resumes_bit_for_bit(data_root: Path, tmp_path: Path, method: str) -> None:
    """tests/crash_child.py as test_crash_safety runs it (2 blocks with drop path, so the RNG
    in the checkpoint matters; timer checkpoints every few milliseconds), SIGKILLed mid-epoch
    and run again: the final student, teacher and loss state (DINOv2's centres; BYOL has none)
    are those of a run never interrupted, bit for bit. The reference runs beside the killed
    run (one thread each)."""
    extra = (*method_overrides(method), "run.checkpoint_every_minutes=0.0001",
             f"train.limit_steps_per_epoch={STEPS_PER_EPOCH}")
    reference_dir, run_dir = tmp_path / "reference" / "run", tmp_path / "run"
    reference_process = start("plain", child_arguments(data_root, reference_dir, *extra))
    arguments = child_arguments(data_root, run_dir, *extra)
    killed = start("slow", arguments)
    kill_at_step(killed, run_dir, KILL_AT_STEP)
    assert finish(killed)[0] == -signal.SIGKILL
    status, _, err = finish(reference_process)
    assert status == 0, err[-2000:]
    reference = final_state(reference_dir)
    saved = final_state(run_dir)
    assert 0 < saved["step"] < reference["step"] == 2 * STEPS_PER_EPOCH
    with pytest.raises(AssertionError):  # not vacuous: the killed run is behind
        assert_same_networks(saved, reference)
    status, out, err = finish(start("plain", arguments))
    assert status == 0, err[-2000:]
    assert "resuming" in out, out
    assert_same_networks(final_state(run_dir), reference)
    assert set(reference["loss"]) == ({"cls.center", "patch_center"} if method == "dinov2"
                                      else set())


# --- 4. registers survive the export --------------------------------------------------------


IMAGES = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
def test_dinov2_registers_survive_export(tmp_path: Path) -> None:
    """method=dinov2 with 2 register tokens: `dinolab export` writes the teacher's backbone
    with its registers and without the student's mask token (which is not a timm parameter),
    and timm alone rebuilds it with the features of load_backbone(run)."""
    from safetensors.torch import load_file

    from dinolab.cli import main

    run_dir = train_tiny_run(tmp_path, "method=dinov2", "model.num_registers=2",
                             "train.device=cpu")
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["student"]["mask_token"].shape == (32,)
    assert "mask_token" not in checkpoint["teacher"]
    assert checkpoint["teacher"]["backbone.reg_token"].shape == (1, 2, 32)
    out = tmp_path / "exported" / "backbone.safetensors"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    tensors = load_file(out)
    assert "reg_token" in tensors and not any("mask_token" in key for key in tensors)
    assert torch.equal(tensors["reg_token"], checkpoint["teacher"]["backbone.reg_token"])
    description = json.loads(out.with_suffix(".json").read_text())
    assert description["model_kwargs"]["reg_tokens"] == 2
    model = timm.create_model(description["model_name"], pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=str(out), custom_load=False),
                              **description["model_kwargs"]).eval()
    assert model.num_prefix_tokens == 3  # [CLS] and 2 registers
    backbone, _ = dinolab.load_backbone(run_dir)
    with torch.no_grad():
        features = backbone(IMAGES)
        assert torch.equal(model(IMAGES), features)
        # The registers take part: other register values give other features (a random
        # change: the blocks' LayerNorm removes a shift of all of a token's channels).
        model.reg_token.add_(torch.randn(model.reg_token.shape,
                                         generator=torch.Generator().manual_seed(1)))
        assert not torch.allclose(model(IMAGES), features)


# --- 5. what DINOv2 cannot train is a config error ------------------------------------------


SMALL_HEAD = ("model.head.out_dim=64", "model.head.hidden_dim=32",
              "model.head.bottleneck_dim=16")


def test_ibot_on_a_cnn_is_a_config_error() -> None:
    overrides = ["method=dinov2", "model.backbone=resnet10t", "model.drop_path_rate=0",
                 "train.device=cpu", "train.precision=fp32", "data.global_crop_size=32",
                 "data.local_crop_size=16", *SMALL_HEAD]
    explicit = load_config(None, [*overrides, "loss.ibot_weight=1.0"])
    with pytest.raises(ConfigError, match=r"loss\.ibot_weight: the iBOT patch loss needs a "
                                          r"vision transformer, and resnet10t is not one"):
        build_state(auto.resolve_for_preset(explicit, None))
    torch.manual_seed(0)
    config = load_config(None, overrides)  # a blank iBOT weight: KoLeo alone on a CNN
    state = build_state(auto.resolve_for_preset(config, None))
    assert state.objective.ibot_weight == 0.0
    assert state.objective.koleo_weight == config.loss.koleo_weight > 0
    assert state.objective.name == "dinov2"
    generator = torch.Generator().manual_seed(1)
    views = [torch.randn(4, 3, size, size, generator=generator) for size in (32, 32, 16, 16)]
    loss = train_step(state, [views], StepValues(1e-3, 0.04, 0.9, 0.04, False))
    assert torch.isfinite(loss) and set(state.terms) == {"dino_loss", "koleo_loss"}


def test_koleo_with_one_image_per_micro_batch_is_a_config_error(tmp_path: Path) -> None:
    overrides = [*tiny_overrides(tmp_path, tmp_path / "run"), "method=dinov2",
                 "train.device=cpu", "train.batch_size=2", "train.accumulation_steps=2"]
    with pytest.raises(ConfigError, match=r"loss\.koleo_weight: KoLeo needs at least 2 images "
                                          r"per micro-batch and process, and there is 1"):
        build_state(load_config(None, overrides))
    torch.manual_seed(0)
    build_state(load_config(None, [*overrides, "loss.koleo_weight=0"]))


# --- BYOL -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def byol_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch("byol", tmp_path_factory.mktemp("byol_ranks"), worker_file=__file__)


def without_batch_norm_buffers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in state.items() if not key.endswith(BATCH_NORM_BUFFERS)}


@pytest.mark.slow
@pytest.mark.skipif(not HAS_BYOL, reason="no methods/byol.py")
def test_byol_on_two_processes_equals_one_process_accumulating_their_shares(
        byol_ranks: list[dict[str, Any]], tmp_path: Path) -> None:
    """BYOL's projector and predictor have BatchNorm, whose statistics on the CPU are each
    process's own (torch's SyncBatchNorm refuses CPU tensors, so dinolab converts only on
    CUDA): 2 processes of B/2 are then exactly 1 process accumulating the same 2 shares as
    micro-batches (each normalised on its own), not 1 x B. DDP's averaged gradients, the EMA
    and the loss are compared; the BatchNorm running statistics are not (DDP broadcasts the
    main process's buffers before each forward, while the accumulating process updates them
    once per micro-batch; nothing in training reads them). Both runs give the parameters of
    BYOL_ZERO_GRADIENT their exact gradient, 0."""
    config = step_config(tmp_path, *BYOL)
    expected = run_steps(config, 0, 1, shares_as_micro_batches=WORLD,
                         zero_gradient=BYOL_ZERO_GRADIENT)
    runs = [rank["byol"] for rank in byol_ranks]
    mean_loss = torch.stack([run["losses"] for run in runs]).mean(dim=0)
    torch.testing.assert_close(mean_loss, expected["losses"], **TOLERANCE)
    for run in runs:
        for part in ("student", "teacher"):
            assert_trained_close(without_batch_norm_buffers(run[part]),
                                 without_batch_norm_buffers(expected[part]),
                                 expected["smallest_gradient"], f"byol {part}")
    assert not torch.allclose(runs[0]["losses"], runs[1]["losses"])
    assert any(key.startswith("predictor.") for key in expected["student"])
    # The shares matter: the same steps on the whole batch (BatchNorm over B) are other steps.
    whole = run_steps(config, 0, 1)
    assert not torch.allclose(whole["losses"], expected["losses"], **TOLERANCE)
    # The gradients set to 0 are rounding noise where they are computed, which AdamW turned
    # into moves of the order of lr (here, as the whole-batch run's from the same start).
    for name in BYOL_ZERO_GRADIENT:
        assert whole["largest_gradient"][name].max() < ILL_CONDITIONED_GRADIENT / 10, name
        assert (whole["student"][name] - expected["student"][name]).abs().max() > 0.1 * LR


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
    sys.stdout.flush()  # and leave without the interpreter's teardown: see test_ddp.py's end
    sys.stderr.flush()
    os._exit(0)
