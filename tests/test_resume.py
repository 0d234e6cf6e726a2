"""A stopped and restarted run ends exactly where an uninterrupted run ends (CPU, deterministic).

DESIGN.md (principle 9): every piece of training state is in the checkpoint (student, teacher,
center, optimizer, step, sampler position, RNG), so a resumed run continues exactly. The run
folder holds one configuration: a restart with another one is refused, except for the keys
that only say where the run happens and how it reports (loop.RESUMABLE_CHANGES), such as
data.num_workers, which must not change the result: each image's views are seeded by
(seed, epoch, index), not by the worker that builds them (data/loader.py).

The runs use the tiny config with a 2-block ViT and drop path 0.1 (the reference default) so
that the student draws from the global RNG, which the checkpoint must restore. (With one block
timm's drop-path schedule gives the only block a rate of 0.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import global_torch_state_kept, make_fashion_mnist, tiny_overrides

from dinolab.config import Config, ConfigError, load_config
from dinolab.training import loop
from dinolab.training.checkpoint import LATEST, load_latest
from dinolab.training.state import build_state

STEPS_PER_EPOCH = 96 // 16  # make_fashion_mnist's 96 train images, the tiny config's batch of 16
WITH_DROP_PATH = ("train.device=cpu", "model.drop_path_rate=0.1",
                  "model.backbone_kwargs={depth: 2, embed_dim: 32, num_heads: 2}")


class Interrupted(Exception):
    """Stands for a killed run (the process stops between two epochs)."""


def config_for(data_root: Path, run_dir: Path, *extra: str) -> Config:
    return load_config(None, tiny_overrides(data_root, run_dir) + [*WITH_DROP_PATH, *extra])


def checkpoint(run_dir: Path) -> dict[str, Any]:
    return torch.load(run_dir / LATEST, weights_only=True)


def assert_same_training_state(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    """Bit for bit: student, teacher, center, optimizer state, position and RNG."""
    for part in ("student", "teacher", "loss"):
        assert actual[part].keys() == expected[part].keys(), part
        different = [key for key in expected[part]
                     if not torch.equal(actual[part][key], expected[part][key])]
        assert not different, f"{part} differs: {different}"
    actual_moments, expected_moments = actual["optimizer"]["state"], expected["optimizer"]["state"]
    assert actual_moments.keys() == expected_moments.keys()
    for index, moments in expected_moments.items():
        for name, value in moments.items():
            assert torch.equal(actual_moments[index][name], value), f"optimizer {index} {name}"
    for key in ("epoch", "step", "samples_into_epoch"):
        assert actual[key] == expected[key], key
    assert torch.equal(actual["rng"]["torch"], expected["rng"]["torch"]), "RNG state"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fashion_mnist(tmp_path_factory.mktemp("fashion"))


@pytest.fixture(scope="module")
def uninterrupted(data_root: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """uninterrupted(*overrides) -> the folder of a run done in one go (each run made once)."""
    runs: dict[tuple[str, ...], Path] = {}

    def run(*overrides: str) -> Path:
        if overrides not in runs:
            run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
            config = config_for(data_root, run_dir, *overrides)
            assert loop.train(config).epochs_done == config.train.epochs
            runs[overrides] = run_dir
        return runs[overrides]

    return run


def interrupted_then_resumed(config: Config, monkeypatch: pytest.MonkeyPatch,
                             ) -> tuple[list[int], dict[str, Any]]:
    """Train, stop at the start of epoch 2, train again in the same folder.

    -> (the epochs run_epoch was called for, the checkpoint the stopped run left)
    """
    run_epoch = loop.run_epoch
    epochs_run: list[int] = []

    def stop_at_second_epoch(state: Any, *args: Any) -> loop.EpochResult:
        if state.epoch == 1:  # the epoch-1 checkpoint is written; the process "dies" here
            raise Interrupted
        epochs_run.append(state.epoch)
        return run_epoch(state, *args)

    def record(state: Any, *args: Any) -> loop.EpochResult:
        epochs_run.append(state.epoch)
        return run_epoch(state, *args)

    monkeypatch.setattr(loop, "run_epoch", stop_at_second_epoch)
    with pytest.raises(Interrupted):
        loop.train(config)
    stopped = checkpoint(Path(config.run.dir))
    assert (stopped["epoch"], stopped["step"]) == (1, STEPS_PER_EPOCH)
    monkeypatch.setattr(loop, "run_epoch", record)
    assert loop.train(config).epochs_done == 2  # the same folder: resumes from checkpoint.pt
    monkeypatch.setattr(loop, "run_epoch", run_epoch)
    return epochs_run, stopped


def test_resumed_run_equals_uninterrupted_run(data_root: Path,
                                              uninterrupted: Callable[..., Path],
                                              tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    reference = checkpoint(uninterrupted())
    epochs_run, stopped = interrupted_then_resumed(config_for(data_root, tmp_path / "run"),
                                                   monkeypatch)
    assert epochs_run == [0, 1]  # epoch 0 once before the stop, epoch 1 once after it
    # Not vacuous: the second epoch changes the state (a resume that skipped it would fail).
    with pytest.raises(AssertionError):
        assert_same_training_state(stopped, reference)
    assert_same_training_state(checkpoint(tmp_path / "run"), reference)


@pytest.mark.parametrize("change", ["model.head.out_dim=128", "train.epochs=3", "optim.lr=0.001"])
def test_run_folder_refuses_another_configuration(data_root: Path,
                                                  uninterrupted: Callable[..., Path],
                                                  change: str) -> None:
    run_dir = uninterrupted()
    saved_config = (run_dir / "config.yaml").read_text()
    saved_checkpoint = (run_dir / LATEST).read_bytes()
    key = change.split("=")[0]
    with pytest.raises(ConfigError, match=rf"another configuration: {key} \(") as error:
        loop.train(config_for(data_root, run_dir, change))
    assert "new run.dir" in str(error.value)
    assert (run_dir / "config.yaml").read_text() == saved_config
    assert (run_dir / LATEST).read_bytes() == saved_checkpoint


def test_run_folder_accepts_where_and_how_changes(data_root: Path,
                                                  uninterrupted: Callable[..., Path]) -> None:
    """num_workers and logging may change on restart; a finished run has nothing left to do."""
    run_dir = uninterrupted()
    saved_checkpoint = (run_dir / LATEST).read_bytes()
    result = loop.train(config_for(data_root, run_dir, "data.num_workers=1",
                                   "run.log_every_steps=3", "eval.knn_k=5"))
    assert result.epochs_done == 2
    assert (run_dir / LATEST).read_bytes() == saved_checkpoint


@pytest.mark.slow
def test_worker_processes_give_the_same_first_epoch(uninterrupted: Callable[..., Path]) -> None:
    """data.num_workers=2 (persistent workers, prefetch) trains epoch 1 like num_workers=0."""
    in_process = checkpoint(uninterrupted("train.epochs=1"))
    with_workers = checkpoint(uninterrupted("train.epochs=1", "data.num_workers=2"))
    assert_same_training_state(with_workers, in_process)


@pytest.mark.slow
def test_worker_processes_give_the_same_run(uninterrupted: Callable[..., Path]) -> None:
    """Over 2 epochs (drop path on), num_workers=2 must train like num_workers=0."""
    assert_same_training_state(checkpoint(uninterrupted("data.num_workers=2")),
                               checkpoint(uninterrupted()))


@pytest.mark.slow
def test_resumed_run_with_workers_equals_uninterrupted_run(
        data_root: Path, uninterrupted: Callable[..., Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    reference = checkpoint(uninterrupted("data.num_workers=2"))
    config = config_for(data_root, tmp_path / "run", "data.num_workers=2")
    assert interrupted_then_resumed(config, monkeypatch)[0] == [0, 1]
    assert_same_training_state(checkpoint(tmp_path / "run"), reference)


def test_rerunning_a_finished_run_changes_nothing_and_reports_it(
        data_root: Path, uninterrupted: Callable[..., Path], capsys: pytest.CaptureFixture,
) -> None:
    run_dir = uninterrupted()
    before = checkpoint(run_dir)
    capsys.readouterr()  # what the run itself printed
    result = loop.train(config_for(data_root, run_dir))
    assert result.epochs_done == before["epoch"]
    assert_same_training_state(checkpoint(run_dir), before)
    out = capsys.readouterr().out
    assert "holds a finished run (2 epochs); its k-NN top-1 (k=20):" in out
    assert "training " not in out  # no start line for a run that does not start


def test_non_finite_loss_stops_without_a_checkpoint(
        data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dinolab.losses.dino import DINOLoss

    def poisoned(self: DINOLoss, student: torch.Tensor, *_: Any) -> torch.Tensor:
        return student.sum() * float("nan")

    monkeypatch.setattr(DINOLoss, "_loss", poisoned)
    with pytest.raises(loop.NonFiniteLoss,
                       match="loss is nan at step 1; last good checkpoint: none yet"):
        loop.train(config_for(data_root, tmp_path / "run"))
    assert not (tmp_path / "run" / LATEST).exists()


def test_batched_augmentation_resumes_exactly(data_root: Path, uninterrupted: Callable[..., Path],
                                              tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """data.augmentation=batched: the views of a micro-batch are seeded by its position."""
    reference = checkpoint(uninterrupted("data.augmentation=batched"))
    config = config_for(data_root, tmp_path / "run", "data.augmentation=batched")
    assert interrupted_then_resumed(config, monkeypatch)[0] == [0, 1]
    assert_same_training_state(checkpoint(tmp_path / "run"), reference)
    with pytest.raises(AssertionError):  # and it is another augmentation than the PIL path's
        assert_same_training_state(reference, checkpoint(uninterrupted()))


def test_prefetched_views_train_the_same_run(data_root: Path, uninterrupted: Callable[..., Path],
                                            tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """data.prefetch_views makes each micro-batch's views one step early (on CUDA on a side
    stream): the run, interrupted and resumed, is still the same bit for bit."""
    reference = checkpoint(uninterrupted("data.augmentation=batched"))
    config = config_for(data_root, tmp_path / "run", "data.augmentation=batched",
                        "data.prefetch_views=true")
    assert interrupted_then_resumed(config, monkeypatch)[0] == [0, 1]
    assert_same_training_state(checkpoint(tmp_path / "run"), reference)


@pytest.mark.slow
def test_batched_augmentation_is_independent_of_workers(uninterrupted: Callable[..., Path]) -> None:
    assert_same_training_state(
        checkpoint(uninterrupted("data.augmentation=batched", "data.num_workers=2")),
        checkpoint(uninterrupted("data.augmentation=batched")))


def test_the_epochs_running_loss_is_saved_and_older_checkpoints_resume_without_it(
        tmp_path: Path) -> None:
    """The sum and count of the epoch's losses so far travel in the checkpoint; a checkpoint
    of an older version, which has neither, loads as an empty sum."""
    config = config_for(tmp_path / "no-data", tmp_path / "run")
    with global_torch_state_kept():
        saved = build_state(config)
        saved.epoch_loss_sum += 7.25
        saved.epoch_steps = 3
        restored = build_state(config)
        restored.load_state_dict(saved.state_dict())
        assert (restored.epoch_loss_sum.item(), restored.epoch_steps) == (7.25, 3)

        older = {key: value for key, value in saved.state_dict().items()
                 if key not in ("epoch_loss_sum", "epoch_steps")}
        (tmp_path / "run").mkdir()
        torch.save(older, tmp_path / "run" / LATEST)
        loaded = load_latest(tmp_path / "run", report=print)
        assert loaded is not None
        restored.load_state_dict(loaded)
        assert (restored.epoch_loss_sum.item(), restored.epoch_steps) == (0.0, 0)
