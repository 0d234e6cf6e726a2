"""Kill a run at any moment and nothing is lost; anything wrong is said at once, in one line.

Real ``dinolab train`` processes (tests/crash_child.py) are SIGKILLed from outside at steps seen
in metrics.jsonl, and from inside in the middle of a checkpoint write; SIGTERM asks for a save.
The same command on the same run folder then finishes the run, which must end with the student,
teacher and center of a run never interrupted, bit for bit (CPU, deterministic by default).
The runs use 2 blocks with drop path, so the global RNG in the checkpoint matters, and
``run.checkpoint_every_minutes`` of a few milliseconds, so mid-epoch checkpoints are written and
resumed from. In-process tests cover NaN, a full disk and a damaged newest checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import global_torch_state_kept, make_fashion_mnist, tiny_overrides
from equivalence import assert_same_networks

from dinolab.cli import EXIT_NON_FINITE, EXIT_SAVE_FAILED, EXIT_STOPPED, main
from dinolab.training.checkpoint import LATEST, step_files

CHILD = Path(__file__).with_name("crash_child.py")
STEPS = 2 * (96 // 16)  # 2 epochs of the 96 fake images in batches of 16
TIMEOUT_S = 120


def child_arguments(data_root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*tiny_overrides(data_root, run_dir), "train.device=cpu",
            "model.drop_path_rate=0.1", "model.backbone_kwargs={depth: 2, embed_dim: 32, "
            "num_heads: 2}", "run.log_every_steps=1", *extra]


def start(plan: str, arguments: list[str], new_session: bool = False) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, str(CHILD), plan, *arguments], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=new_session)


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=TIMEOUT_S)
    return process.returncode, out, err


def logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()
             if line.startswith('{"kind": "train"') and line.endswith("}")]
    return max(steps, default=0)


def kill_at_step(process: subprocess.Popen[str], run_dir: Path, step: int,
                 how: int = signal.SIGKILL) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while logged_step(run_dir) < step:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(how)


def final_state(run_dir: Path) -> dict[str, Any]:
    return torch.load(run_dir / LATEST, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fashion_mnist(tmp_path_factory.mktemp("fashion"))


def epoch_losses(run_dir: Path) -> list[float]:
    """The mean loss of each epoch, as metrics.jsonl records it."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if record["kind"] == "epoch"]


@pytest.fixture(scope="module")
def reference_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run, in a child process like the others -> its run folder."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    status, _, err = finish(start("plain", child_arguments(data_root, run_dir)))
    assert status == 0, err[-2000:]
    return run_dir


@pytest.fixture(scope="module")
def reference(reference_run: Path) -> dict[str, Any]:
    state = final_state(reference_run)
    assert state["step"] == STEPS
    return state


def resume_to_the_end(arguments: list[str]) -> str:
    status, out, err = finish(start("plain", arguments))
    assert status == 0, err[-2000:]
    assert "resuming" in out, out
    return out


KILLS: dict[str, list[Callable[[Path, list[str]], int]]] = {}


def _external(step: int) -> Callable[[Path, list[str]], int]:
    def kill(run_dir: Path, arguments: list[str]) -> int:
        process = start("slow", arguments)
        kill_at_step(process, run_dir, step)
        return finish(process)[0]
    return kill


def _internal(plan: str) -> Callable[[Path, list[str]], int]:
    def kill(run_dir: Path, arguments: list[str]) -> int:
        return finish(start(plan, arguments))[0]
    return kill


@pytest.mark.slow
@pytest.mark.parametrize("kills", [
    # from outside: mid-epoch in epoch 1 (only timer checkpoints exist), then in epoch 2
    [_external(4), _external(9)],
    # from inside: half-way through the 3rd checkpoint file, then between the 2nd complete step
    # file and checkpoint.pt
    [_internal("kill-in-write:3"), _internal("kill-before-latest:2")],
], ids=["sigkill-at-steps", "sigkill-inside-checkpoint-writes"])
def test_killed_run_resumes_to_the_uninterrupted_result(
        data_root: Path, reference: dict[str, Any], tmp_path: Path,
        kills: list[Callable[[Path, list[str]], int]]) -> None:
    run_dir = tmp_path / "run"
    arguments = child_arguments(data_root, run_dir, "run.checkpoint_every_minutes=0.0001")
    for kill in kills:
        assert kill(run_dir, arguments) == -signal.SIGKILL
        saved = final_state(run_dir)  # what the killed run left loads
        assert 0 < saved["step"] < STEPS
    out = resume_to_the_end(arguments)
    assert_same_networks(final_state(run_dir), reference)
    assert len(step_files(run_dir)) == 2, "run.keep_last_checkpoints=2"
    assert not list(run_dir.glob(".*.tmp")), "temporary files of the killed writes are removed"
    assert "cannot be read" not in out  # the killed writes never damaged a visible checkpoint


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_resumes(data_root: Path, reference: dict[str, Any],
                                                    reference_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    arguments = child_arguments(data_root, run_dir, "run.checkpoint_every_minutes=0")
    process = start("slow", arguments)
    kill_at_step(process, run_dir, 3, signal.SIGTERM)
    status, _, err = finish(process)
    assert status == EXIT_STOPPED, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("dinolab: stopped by SIGTERM after step ")
    assert "run the same command again to resume" in lines[0]
    stopped = final_state(run_dir)
    assert f"after step {stopped['step']};" in lines[0]
    assert 3 <= stopped["step"] < 6 and stopped["samples_into_epoch"] == 16 * stopped["step"], \
        "a mid-epoch checkpoint of the step in progress (epoch checkpoints are at 6 and 12)"
    resume_to_the_end(arguments)
    assert_same_networks(final_state(run_dir), reference)
    # The stopped epoch's loss is the mean of all of its steps, not of those after the resume.
    expected = epoch_losses(reference_run)
    assert len(expected) == 2
    assert epoch_losses(run_dir) == pytest.approx(expected, rel=1e-6, abs=0)


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_whole_job_with_loader_workers_saves_and_resumes(
        data_root: Path, reference: dict[str, Any], tmp_path: Path, stop: signal.Signals) -> None:
    """Ctrl-C in a terminal and Slurm's SIGTERM reach every process of the job, the loader's
    workers too: they must leave the stop to the main process (SIGTERM used to kill them and
    break the loop with a traceback before the save)."""
    run_dir = tmp_path / "run"
    arguments = child_arguments(data_root, run_dir, "run.checkpoint_every_minutes=0",
                                "data.num_workers=1")
    process = start("slow", arguments, new_session=True)
    deadline = time.monotonic() + TIMEOUT_S
    while logged_step(run_dir) < 3:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(process.pid, stop)
    status, _, err = finish(process)
    assert status == EXIT_STOPPED, err[-2000:]
    assert err.strip().startswith(f"dinolab: stopped by {stop.name} after step "), err[-2000:]
    resume_to_the_end(arguments)
    assert_same_networks(final_state(run_dir), reference)


@pytest.mark.slow
def test_a_bug_in_training_exits_with_its_traceback_not_a_hang(data_root: Path,
                                                                tmp_path: Path) -> None:
    """An unexpected error with loader workers running: the traceback, a failing status, and
    the process ends. The traceback used to keep the loader alive into the interpreter's exit,
    which then waited forever for workers that ignore SIGTERM."""
    arguments = child_arguments(data_root, tmp_path / "run", "data.num_workers=1")
    process = start("raise:2", arguments)
    try:
        _, err = process.communicate(timeout=60)  # it used to wait for ever
    finally:
        process.kill()
    assert process.returncode == 1, err[-2000:]
    assert err.rstrip().endswith("RuntimeError: a bug in the step"), err[-2000:]


@pytest.fixture
def run_main(capsys: pytest.CaptureFixture[str]):
    """dinolab.cli.main in this process -> (status, stdout, stderr); torch's global state kept."""
    def run(arguments: list[str]) -> tuple[int, str, str]:
        capsys.readouterr()
        status = main(["train", *arguments])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    with global_torch_state_kept():
        yield run


def in_process_arguments(data_root: Path, run_dir: Path, *extra: str) -> list[str]:
    """2 epochs of 3 steps: checkpoints at steps 3 and 6."""
    return [*tiny_overrides(data_root, run_dir), "train.device=cpu",
            "train.limit_steps_per_epoch=3", "run.checkpoint_every_minutes=0", *extra]


@pytest.mark.slow
def test_nan_loss_stops_with_the_message_and_keeps_the_last_good_checkpoint(
        data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_main) -> None:
    """The loss turns NaN at step 5, between log steps (4 and 8): found anyway."""
    from dinolab.losses.dino import DINOLoss

    loss = DINOLoss._loss
    calls = {"n": 0}

    def poisoned_from_step_5(self: DINOLoss, *arguments: Any) -> torch.Tensor:
        calls["n"] += 1
        value = loss(self, *arguments)
        return value * float("nan") if calls["n"] >= 5 else value

    monkeypatch.setattr(DINOLoss, "_loss", poisoned_from_step_5)
    run_dir = tmp_path / "run"
    status, _, err = run_main(in_process_arguments(data_root, run_dir, "run.log_every_steps=4"))
    assert status == EXIT_NON_FINITE
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"dinolab: error: loss is nan at step 5; last good checkpoint: "
                               f"{run_dir / LATEST}; levers: train.precision")
    assert "optim.lr" in lines[0] and "loss.teacher_temp" in lines[0]
    kept = final_state(run_dir)
    assert kept["step"] == 3, "the epoch-1 checkpoint; nothing was saved after the NaN"
    assert all(torch.isfinite(value).all() for value in kept["student"].values())
    assert [path.name for path in step_files(run_dir)] == ["checkpoint_step_00000003.pt"]


@pytest.mark.slow
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(
        data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_main) -> None:
    save = torch.save
    calls = {"n": 0}

    def full_disk_on_second_save(state: Any, path: Any, *arguments: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        save(state, path, *arguments)

    run_dir = tmp_path / "run"
    monkeypatch.setattr(torch, "save", full_disk_on_second_save)
    status, _, err = run_main(in_process_arguments(data_root, run_dir))
    assert status == EXIT_SAVE_FAILED
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "No space left on device" in lines[0]
    assert f"the last complete checkpoint is {run_dir / LATEST}" in lines[0]
    assert final_state(run_dir)["step"] == 3
    assert not list(run_dir.glob(".*.tmp"))
    monkeypatch.setattr(torch, "save", save)
    status, out, _ = run_main(in_process_arguments(data_root, run_dir))
    assert status == 0 and "resuming" in out and final_state(run_dir)["step"] == 6


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(
        data_root: Path, tmp_path: Path, run_main) -> None:
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    assert run_main(in_process_arguments(data_root, reference_dir))[0] == 0
    assert run_main(in_process_arguments(data_root, run_dir))[0] == 0
    newest = run_dir / LATEST
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated in place (and its step file)
    status, out, _ = run_main(in_process_arguments(data_root, run_dir, "train.epochs=2"))
    assert status == 0
    warnings = [line for line in out.splitlines() if "cannot be read" in line]
    assert len(warnings) == 1 and "truncated or corrupt" in warnings[0], out
    assert "resuming from checkpoint_step_00000003.pt instead of the damaged checkpoint.pt" in out
    assert_same_networks(final_state(run_dir), final_state(reference_dir))
