"""A stopped and restarted run ends exactly where an uninterrupted run ends (CPU, deterministic).

DESIGN.md (principle 9): every piece of training state is in the checkpoint (student, teacher,
center, optimizer, step, sampler position, RNG), so a resumed run continues exactly. The run
folder holds one configuration: a restart with another one is refused, except for the keys
that only say where the run happens and how it reports (loop.RESUMABLE_CHANGES), such as
data.num_workers, which cannot change the result: each image's views are seeded by
(seed, epoch, index), not by the worker that builds them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_fashion_mnist, tiny_overrides

from dinolab.config import ConfigError, load_config
from dinolab.training import loop
from dinolab.training.checkpoint import LATEST

STEPS_PER_EPOCH = 96 // 16  # make_fashion_mnist's 96 train images, the tiny config's batch of 16


class Interrupted(Exception):
    """Stands for a killed run (the process stops between two epochs)."""


def config_for(data_root: Path, run_dir: Path, *extra: str):
    return load_config(None, tiny_overrides(data_root, run_dir) + ["train.device=cpu", *extra])


def checkpoint(run_dir: Path) -> dict[str, Any]:
    return torch.load(run_dir / LATEST, weights_only=True)


def assert_same_training_state(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    """Bit-for-bit: student, teacher, center, optimizer state and the position."""
    for part in ("student", "teacher", "loss"):
        assert actual[part].keys() == expected[part].keys(), part
        different = [key for key in expected[part]
                     if not torch.equal(actual[part][key], expected[part][key])]
        assert not different, f"{part} differs: {different}"
    actual_optimizer, expected_optimizer = actual["optimizer"]["state"], expected["optimizer"]["state"]
    assert actual_optimizer.keys() == expected_optimizer.keys()
    for index, moments in expected_optimizer.items():
        for name, value in moments.items():
            assert torch.equal(actual_optimizer[index][name], value), f"optimizer {index} {name}"
    for key in ("epoch", "step", "samples_into_epoch"):
        assert actual[key] == expected[key], key


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fashion_mnist(tmp_path_factory.mktemp("fashion"))


@pytest.fixture(scope="module")
def uninterrupted(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: 2 epochs in one go (data.num_workers=0)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = loop.train(config_for(data_root, run_dir))
    assert result.epochs_done == 2
    return run_dir


def test_resumed_run_equals_uninterrupted_run(data_root: Path, uninterrupted: Path,
                                              tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    config = config_for(data_root, run_dir)
    run_epoch = loop.run_epoch
    epochs_run: list[int] = []

    def stop_at_second_epoch(state: Any, *args: Any) -> float:
        if state.epoch == 1:  # the epoch-1 checkpoint is written; the process "dies" here
            raise Interrupted
        epochs_run.append(state.epoch)
        return run_epoch(state, *args)

    monkeypatch.setattr(loop, "run_epoch", stop_at_second_epoch)
    with pytest.raises(Interrupted):
        loop.train(config)
    stopped = checkpoint(run_dir)
    assert (stopped["epoch"], stopped["step"]) == (1, STEPS_PER_EPOCH)
    # Not vacuous: the second epoch moves the state, so a resume that skipped it would fail.
    with pytest.raises(AssertionError):
        assert_same_training_state(stopped, checkpoint(uninterrupted))

    def record(state: Any, *args: Any) -> float:
        epochs_run.append(state.epoch)
        return run_epoch(state, *args)

    monkeypatch.setattr(loop, "run_epoch", record)
    result = loop.train(config)  # the same folder: resumes from checkpoint.pt
    assert result.epochs_done == 2
    assert epochs_run == [0, 1]  # epoch 0 once, before the stop; epoch 1 once, after it
    assert_same_training_state(checkpoint(run_dir), checkpoint(uninterrupted))


@pytest.mark.parametrize("change", ["model.head.out_dim=128", "train.epochs=3", "optim.lr=0.001"])
def test_run_folder_refuses_another_configuration(data_root: Path, uninterrupted: Path,
                                                  change: str) -> None:
    saved_config = (uninterrupted / "config.yaml").read_text()
    saved_checkpoint = (uninterrupted / LATEST).read_bytes()
    key = change.split("=")[0]
    with pytest.raises(ConfigError, match=rf"another configuration: {key} \(") as error:
        loop.train(config_for(data_root, uninterrupted, change))
    assert "new run.dir" in str(error.value)
    assert (uninterrupted / "config.yaml").read_text() == saved_config
    assert (uninterrupted / LATEST).read_bytes() == saved_checkpoint


def test_run_folder_accepts_where_and_how_changes(data_root: Path, uninterrupted: Path) -> None:
    """num_workers and logging may change on restart; a finished run has nothing left to do."""
    saved_checkpoint = (uninterrupted / LATEST).read_bytes()
    result = loop.train(config_for(data_root, uninterrupted, "data.num_workers=1",
                                   "run.log_every_steps=3", "eval.knn_k=5"))
    assert result.epochs_done == 2
    assert (uninterrupted / LATEST).read_bytes() == saved_checkpoint


@pytest.mark.slow
def test_worker_processes_do_not_change_the_result(data_root: Path, uninterrupted: Path,
                                                   tmp_path: Path) -> None:
    """data.num_workers=2 (persistent workers, prefetch) trains exactly like num_workers=0."""
    run_dir = tmp_path / "run"
    loop.train(config_for(data_root, run_dir, "data.num_workers=2"))
    assert_same_training_state(checkpoint(run_dir), checkpoint(uninterrupted))
