"""examples/slurm/: each sbatch script's torchrun line trains with 2 CPU processes, and a job that
loses a process, or gets Slurm's time-limit signal, ends with the same student, teacher and
center as a job never interrupted.

The scripts run as sbatch would run them, under bash with the job's SLURM_* variables, with
stand-ins for the three Slurm commands they call (srun runs its command, scontrol names this
host and records a requeue, scancel signals every process of the job step as slurmstepd does).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_fashion_mnist, tiny_overrides
from equivalence import assert_same_networks
from test_ddp import free_port

from dinolab.training.checkpoint import LATEST, step_files

SCRIPTS = Path(__file__).resolve().parent.parent / "examples" / "slurm"
TIMEOUT_S = 240
JOB_ID = "4242"
STEPS_PER_EPOCH = 12  # 384 images, batch 32: the issue's run, at the tests' tiny model

FAKE_COMMANDS = {
    "srun": """#!/bin/bash
# this node's task in the foreground; its process tree is the job step that scancel signals
while [[ $1 == -* ]]; do shift; done
echo $$ > "$FAKE_SLURM/step.pid"
exec "$@"
""",
    "scontrol": """#!/bin/bash
case $1 in
    show) echo 127.0.0.1 ;;
    requeue) echo "requeue $2" >> "$FAKE_SLURM/requeued" ;;
esac
""",
    "scancel": """#!/bin/bash
# scancel --signal=SIG JOB: SIG to every process of the job step, as slurmstepd sends it
tree() { echo "$1"; for child in $(cat /proc/$1/task/*/children); do tree "$child"; done; }
kill -s "${1#--signal=}" $(tree "$(cat "$FAKE_SLURM/step.pid")")
""",
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fashion_mnist(tmp_path_factory.mktemp("fashion"), num_train=32 * STEPS_PER_EPOCH)


def fake_slurm(folder: Path) -> Path:
    folder.mkdir()
    for name, text in FAKE_COMMANDS.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def start_job(script: str, data_root: Path, job_dir: Path) -> subprocess.Popen[bytes]:
    """``sbatch examples/slurm/SCRIPT PRESET OVERRIDES`` on one node of 2 CPU "GPUs"."""
    run_dir = job_dir / "run"
    slurm = job_dir / "slurm" if (job_dir / "slurm").is_dir() else fake_slurm(job_dir / "slurm")
    env = {**os.environ, "PATH": f"{slurm}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "FAKE_SLURM": str(slurm), "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NAME": "dinolab",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "localhost", "GPUS_PER_NODE": "2",
           "RUN_DIR": str(run_dir), "RDZV_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    arguments = [*tiny_overrides(data_root, run_dir), "train.batch_size=32", "train.device=cpu",
                 "model.drop_path_rate=0.0", "model.head.norm=none"]
    log = open(job_dir / "job.log", "ab")  # --open-mode=append: every attempt's output
    try:
        return subprocess.Popen(["bash", str(SCRIPTS / script), *arguments], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def finish(job: subprocess.Popen[bytes], job_dir: Path) -> str:
    try:
        job.wait(timeout=TIMEOUT_S)
    finally:
        if job.poll() is None:
            _kill_tree(job.pid)
            job.wait()
    output = (job_dir / "job.log").read_text()
    assert job.returncode == 0, output[-4000:]
    return output


def _descendants(pid: int) -> list[int]:
    try:
        children = [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
                    for child in (task / "children").read_text().split()]
    except OSError:
        return []
    return children + [grandchild for child in children for grandchild in _descendants(child)]


def _kill_tree(pid: int) -> None:
    for process in [pid, *_descendants(pid)]:
        try:
            os.kill(process, signal.SIGKILL)
        except ProcessLookupError:
            pass


def training_process(job: subprocess.Popen[bytes], rank: int) -> int:
    """The pid of the training process of ``rank`` (torchrun's child with RANK=rank)."""
    for pid in _descendants(job.pid):
        try:
            environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environment:
            return pid
    raise AssertionError(f"no training process of rank {rank}")


def wait_for(job: subprocess.Popen[bytes], ready: Any) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not ready():
        assert job.poll() is None, "the job ended before the moment to interrupt it"
        assert time.monotonic() < deadline
        time.sleep(0.01)


def final_state(job_dir: Path) -> dict[str, Any]:
    return torch.load(job_dir / "run" / LATEST, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The several-node script on one node: torchrun's c10d rendezvous, 2 processes."""
    job_dir = tmp_path_factory.mktemp("several_nodes")
    output = finish(start_job("several_nodes.sbatch", data_root, job_dir), job_dir)
    assert output.count("2 process(es), cpu") == 1
    state = final_state(job_dir)
    assert (state["epoch"], state["step"]) == (2, 2 * STEPS_PER_EPOCH)
    return state


@pytest.mark.slow
def test_a_killed_process_is_restarted_and_the_run_ends_as_uninterrupted(
        data_root: Path, uninterrupted: dict[str, Any], tmp_path: Path) -> None:
    """The one-node script (torchrun --standalone --max-restarts): one of the 2 processes is
    SIGKILLed after the first checkpoint; torchrun restarts both, and they resume from it. A
    restarted group used to hang now and then in init_process_group (distributed/rendezvous.py)."""
    job = start_job("one_node.sbatch", data_root, tmp_path)
    wait_for(job, lambda: step_files(tmp_path / "run"))
    os.kill(training_process(job, 1), signal.SIGKILL)
    output = finish(job, tmp_path)
    assert output.count(f"resuming {tmp_path / 'run'} at epoch 2, step {STEPS_PER_EPOCH}") == 1
    assert_same_networks(final_state(tmp_path), uninterrupted)


@pytest.mark.slow
def test_the_time_limit_signal_saves_requeues_and_the_next_attempt_resumes(
        data_root: Path, uninterrupted: dict[str, Any], tmp_path: Path) -> None:
    """--signal=B:TERM@120: the script passes SIGTERM to the job step (each process then gets it
    from Slurm and again from torchrun), the processes save the current step and exit, and the
    script requeues the job; the requeued job resumes from that step."""
    job = start_job("one_node.sbatch", data_root, tmp_path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    wait_for(job, lambda: metrics.is_file() and '"train"' in metrics.read_text())
    os.kill(job.pid, signal.SIGTERM)  # Slurm's warning, to the batch shell
    output = finish(job, tmp_path)
    assert (tmp_path / "slurm" / "requeued").read_text() == f"requeue {JOB_ID}\n"
    assert output.count("dinolab: stopped by ") == 2 and "by SIGTERM" in output  # each process
    stopped = final_state(tmp_path)
    assert 2 <= stopped["step"] < STEPS_PER_EPOCH and stopped["epoch"] == 0
    output = finish(start_job("one_node.sbatch", data_root, tmp_path), tmp_path)  # requeued
    assert f"at epoch 1, step {stopped['step']}" in output
    assert_same_networks(final_state(tmp_path), uninterrupted)


def test_a_second_sigterm_changes_nothing_and_a_second_ctrl_c_stops_at_once() -> None:
    """Under Slurm a training process gets the warning SIGTERM from Slurm and again from
    torchrun, a few milliseconds apart: the second must not end it before it saves
    (preemption.py). Whether the first one's handler has run by then is a race; here it has."""
    from dinolab.training.preemption import StopControl

    outer: list[int] = []  # what reaches the handler StopControl replaced
    previous = signal.signal(signal.SIGTERM, lambda number, frame: outer.append(number))
    # Python's own SIGINT handler, whatever an earlier test in this process left there (the
    # second Ctrl-C goes back to it)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with StopControl(0, torch.device("cpu")) as control:
            for _ in range(2):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler runs in between
            assert control.signal_name == "SIGTERM" and outer == []
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
            assert control.signal_name == "SIGTERM"  # the first signal names the stop
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
