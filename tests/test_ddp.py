"""Two processes (gloo on the CPU) train exactly like one process on the whole batch.

DINO_SPEC.md: the student's gradients are averaged over processes (DDP) and the center is the
mean over ALL processes (an all-reduce), so 2 processes each on half of a global batch give the
student, teacher, center and (averaged) loss of 1 process on the whole batch.

This file is also the worker: the tests run ``python tests/test_ddp.py MODE OUT [DATA]`` once per
rank, with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set as torchrun would, and
compare what the ranks save in OUT with a single process run here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_fashion_mnist, tiny_overrides, wait_all
from equivalence import assert_networks_close

from dinolab.config import Config, load_config
from dinolab.training.state import TrainingState

WORLD = 2
BATCH = 8  # global batch: 4 images per process
STEPS = 3
ACCUMULATIONS = (1, 2)  # 2: each process accumulates 2 micro-batches of 2 (DDP's no_sync path)
# The runs each rank makes: one per accumulation, and one recomputing the student's activations
# in the backward (model.grad_checkpointing), whose steps must be the plain ones.
VARIANTS = tuple(f"accumulation_{k}" for k in ACCUMULATIONS) + ("checkpointed",)
CHECKPOINTED = "model.grad_checkpointing=true"
LR = 1e-3
TIMEOUT_S = 240
# Tolerances: the processes compute the same sums in another order (and with 1 thread instead of
# 2), so results differ by fp32 rounding only (observed: ~1e-7). Loss and center: rtol 1e-4 /
# atol 1e-6; parameters after 3 AdamW steps at lr 1e-3: atol 1e-6. The attention's key bias is
# the exception: its gradient is zero in exact arithmetic (softmax ignores a shift shared by all
# keys), so it is rounding noise that Adam normalises to an update of up to lr per step; it is
# compared at atol lr * steps (see test_accumulation.py).
TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}
KEY_BIAS_TOLERANCE = {"rtol": 0.0, "atol": LR * STEPS}


# --- shared by the worker and the tests -----------------------------------------------------


def step_config(run_dir: Path, *extra: str) -> Config:
    """The tiny model in fp32 on the CPU, without drop path (so no random numbers are drawn)."""
    overrides = tiny_overrides(run_dir / "no-data", run_dir) + [
        "train.device=cpu", "train.precision=fp32", "model.drop_path_rate=0.0",
        "model.head.norm=none", *extra,
    ]
    return load_config(None, overrides)


def global_batches() -> list[list[torch.Tensor]]:
    """STEPS global batches of views (2 global [B, 3, 28, 28], 2 local [B, 3, 14, 14])."""
    generator = torch.Generator().manual_seed(1)
    return [[torch.randn(BATCH, 3, size, size, generator=generator) for size in (28, 28, 14, 14)]
            for _ in range(STEPS)]


def step_on_slices(state: TrainingState, batches: list[list[torch.Tensor]], rank: int, world: int,
                   accumulation: int, first_step: int = 0) -> list[float]:
    """One train_step per global batch, on this rank's slice of it -> the losses."""
    from dinolab.training.step import StepValues, train_step

    losses = []
    for step, views in enumerate(batches, start=first_step):
        share = BATCH // world
        mine = [view[rank * share : (rank + 1) * share] for view in views]
        micro = share // accumulation
        micro_batches = [[view[i * micro : (i + 1) * micro] for view in mine]
                         for i in range(accumulation)]
        values = StepValues(lr=LR, weight_decay=0.04, teacher_momentum=0.9, teacher_temp=0.04,
                            freeze_last_layer=step == 0)
        losses.append(train_step(state, micro_batches, values).item())
    return losses


def snapshot(state: TrainingState, losses: list[float]) -> dict[str, Any]:
    """The losses and full weights (a collective when sharded; then rank 0 alone holds them)."""
    saved = state.state_dict()
    return {"losses": torch.tensor(losses), "student": saved["student"],
            "teacher": saved["teacher"], "center": saved["loss"]["center"]}


def run_steps(config: Config, rank: int, world: int, accumulation: int) -> dict[str, Any]:
    """Build the state from seed 0 and run STEPS train_steps on this rank's slice of each batch."""
    from dinolab.training.state import build_state

    torch.manual_seed(0)
    state = build_state(config)
    return snapshot(state, step_on_slices(state, global_batches(), rank, world, accumulation))


def skipped_on_all_processes(run_dir: Path, skipped_here: int) -> int:
    """What metrics.jsonl records when this process skipped ``skipped_here`` samples."""
    from dinolab.data.skipping import SkipLog

    run_dir.mkdir()
    log = SkipLog(run_dir, "photos", 1.0, 1, warn=lambda line: None, collective=True)
    log.record(8, [("photos/broken.jpg", "truncated")] * skipped_here)
    return log.check(torch.device("cpu"))


PROC_NAMES_THREADS = Path("/proc/self/task").is_dir()  # Linux


def group_threads() -> list[str]:
    """The names of this process's threads that belong to a process group: gloo's transport
    and run loops, the TCP store's server (read from /proc; [] where there is none)."""
    tasks = Path("/proc/self/task")
    names = [(task / "comm").read_text().strip() for task in tasks.iterdir()] \
        if PROC_NAMES_THREADS else []
    return sorted(name for name in names if name.startswith(("gloo", "pt_gloo", "pt_tcpstore")))


def record_group_threads(loop: Any) -> list[str]:
    """-> a list that gets group_threads() as they are once train has made its group."""
    seen: list[str] = []
    train_in_group = loop._train

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen[:] = group_threads()
        return train_in_group(*args, **kwargs)

    loop._train = recording
    return seen


# --- the worker (one process of a 2-process group) ------------------------------------------


def worker(mode: str, out_dir: Path, data_root: Path | None) -> None:
    import torch.distributed as dist

    from dinolab.distributed import init_distributed, shutdown, world_size

    torch.set_num_threads(1)  # 2 processes on 2 cores
    me = int(os.environ["RANK"])
    if mode != "train-creates-group":  # the caller (this worker) makes the group
        assert init_distributed(torch.device("cpu"))
        assert world_size() == WORLD
    if mode == "steps":
        from dinolab.training.state import build_state

        config = step_config(out_dir / "unused")
        result: dict[str, Any] = {f"accumulation_{k}": run_steps(config, me, WORLD, k)
                                  for k in ACCUMULATIONS}
        result["checkpointed"] = run_steps(step_config(out_dir / "unused", CHECKPOINTED), me,
                                           WORLD, 1)
        # What train() does: seed + rank, then build the state (DDP broadcasts rank 0's student).
        torch.manual_seed(config.train.seed + me)
        state = build_state(config)
        result["rank_seeded"] = {"student": state.student_module.state_dict(),
                                 "teacher": state.teacher.state_dict()}
        result["skipped_total"] = skipped_on_all_processes(out_dir / f"skips{me}", me + 1)
        torch.save(result, out_dir / f"rank{me}.pt")
    elif mode == "train":
        from dinolab.training import loop

        saved_by_me = []
        save_checkpoint = loop.save_checkpoint

        def recording_save(*args: Any, **kwargs: Any) -> None:
            saved_by_me.append(args[1]["epoch"])
            save_checkpoint(*args, **kwargs)

        loop.save_checkpoint = recording_save  # type: ignore[assignment]
        assert data_root is not None
        result = loop.train(load_config(None, train_overrides(data_root, out_dir / "run")))
        total = torch.ones(())
        if dist.is_initialized():  # train left the worker's group alive: it still works
            dist.all_reduce(total)
        torch.save({"saves": saved_by_me, "epochs_done": result.epochs_done,
                    "group_kept": dist.is_initialized(), "all_reduce": total},
                   out_dir / f"rank{me}.pt")
    elif mode == "train-creates-group":
        from dinolab.training import loop

        assert data_root is not None and not dist.is_initialized()
        overrides = train_overrides(data_root, out_dir / "run") + ["train.limit_steps_per_epoch=2"]
        threads_during = record_group_threads(loop)
        result = loop.train(load_config(None, overrides))
        torch.save({"epochs_done": result.epochs_done, "group_kept": dist.is_initialized(),
                    "threads_during": threads_during, "threads_after": group_threads()},
                   out_dir / f"rank{me}.pt")
    elif mode == "bad-files":
        from dinolab.data import skipping
        from dinolab.data.images import DataError
        from dinolab.training import loop

        if me == 1:  # only rank 0 finds too many bad files
            original = skipping.SkipLog.__init__

            def tolerant(self: Any, run_dir: Path, where: str, fraction: float, *args: Any,
                         **kwargs: Any) -> None:
                original(self, run_dir, where, 1.0, *args, **kwargs)

            skipping.SkipLog.__init__ = tolerant  # type: ignore[method-assign]
        assert data_root is not None
        overrides = train_overrides(data_root, out_dir / "run") + [
            "data.source=folder", f"data.root={data_root}", "run.log_every_steps=2"]
        try:
            loop.train(load_config(None, overrides))
            outcome = "finished"
        except DataError as error:
            outcome = str(error)
        torch.save({"outcome": outcome}, out_dir / f"rank{me}.pt")
    shutdown()  # after a barrier: see its docstring (a no-op where train destroyed the group)


# --- the tests ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(mode: str, out_dir: Path, data_root: Path | None = None,
           worker_file: str = __file__) -> list[dict[str, Any]]:
    """Run WORLD worker processes of ``worker_file`` (this one, or another test file that has a
    worker of its own); -> what each rank saved."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    processes, logs = [], []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        log = open(out_dir / f"rank{rank}.log", "w")  # closed below
        arguments = [sys.executable, worker_file, mode, str(out_dir)]
        arguments += [str(data_root)] if data_root else []
        processes.append(subprocess.Popen(arguments, env=env, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    try:
        codes = wait_all(processes, TIMEOUT_S)
    finally:
        for log in logs:
            log.close()
    for rank, code in enumerate(codes):
        text = (out_dir / f"rank{rank}.log").read_text()
        assert code == 0, f"rank {rank} exited with {code}:\n{text[-3000:]}"
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


def assert_bitwise_equal(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor],
                         what: str) -> None:
    assert first.keys() == second.keys(), what
    different = [key for key in first if not torch.equal(first[key], second[key])]
    assert not different, f"{what}: these tensors differ: {different}"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch("steps", tmp_path_factory.mktemp("ddp_steps"))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_steps(step_config(tmp_path_factory.mktemp("one")), rank=0, world=1, accumulation=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_two_processes_equal_one_process(ranks: list[dict[str, Any]],
                                         one_process: dict[str, Any], name: str) -> None:
    mean_loss = torch.stack([rank[name]["losses"] for rank in ranks]).mean(dim=0)
    torch.testing.assert_close(mean_loss, one_process["losses"], **TOLERANCE)
    for rank in ranks:
        for part in ("student", "teacher"):
            assert_networks_close(rank[name][part], one_process[part], part, TOLERANCE,
                                  KEY_BIAS_TOLERANCE)
        torch.testing.assert_close(rank[name]["center"], one_process["center"], **TOLERANCE)
    # Not vacuous: the halves differ, so the per-rank losses differ, and the center moved.
    assert not torch.allclose(ranks[0][name]["losses"], ranks[1][name]["losses"])
    assert one_process["center"].abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", ACCUMULATIONS)
def test_ranks_hold_identical_state(ranks: list[dict[str, Any]], accumulation: int) -> None:
    """Averaged gradients and an all-reduced center leave every rank with the same bits."""
    first, second = (rank[f"accumulation_{accumulation}"] for rank in ranks)
    assert_bitwise_equal(first["student"], second["student"], "student")
    assert_bitwise_equal(first["teacher"], second["teacher"], "teacher")
    assert torch.equal(first["center"], second["center"])


@pytest.mark.slow
def test_teacher_starts_as_the_student_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    """As train() builds it (seed + rank): one student and one identical teacher on all ranks."""
    first, second = (rank["rank_seeded"] for rank in ranks)
    assert_bitwise_equal(first["student"], second["student"], "student")  # DDP's broadcast
    for rank in (first, second):
        assert_bitwise_equal(rank["teacher"], rank["student"], "teacher vs student")
    assert_bitwise_equal(first["teacher"], second["teacher"], "teacher")


@pytest.mark.slow
def test_the_skip_count_is_summed_over_processes(ranks: list[dict[str, Any]]) -> None:
    """Each process counts its own skipped samples; the run's count is their sum (1 + 2)."""
    assert [rank["skipped_total"] for rank in ranks] == [3, 3]


# --- a full run under 2 processes -----------------------------------------------------------


def train_overrides(data_root: Path, run_dir: Path) -> list[str]:
    # No BatchNorm in the head: on CPU (gloo) its statistics are per process (SyncBatchNorm,
    # which dinolab uses on GPUs, needs CUDA), so 2 x B/2 would differ from 1 x B by design.
    return tiny_overrides(data_root, run_dir) + ["train.epochs=1", "train.device=cpu",
                                                 "model.drop_path_rate=0.0", "model.head.norm=none"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    base = tmp_path_factory.mktemp("ddp_train")
    data_root = make_fashion_mnist(base / "fashion")
    return base, launch("train", base / "two", data_root)


@pytest.mark.slow
def test_train_under_two_processes_writes_one_checkpoint(
        two_process_run: tuple[Path, list[dict[str, Any]]]) -> None:
    base, ranks = two_process_run
    assert [rank["epochs_done"] for rank in ranks] == [1, 1]
    assert ranks[0]["saves"] == [1] and ranks[1]["saves"] == []  # rank 0 alone writes
    checkpoint = torch.load(base / "two" / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert checkpoint["step"] == 96 // 16  # 96 images, global batch 16
    assert checkpoint["samples_into_epoch"] == 0


@pytest.mark.slow
def test_train_under_two_processes_equals_one_process(
        two_process_run: tuple[Path, list[dict[str, Any]]]) -> None:
    from dinolab.training.loop import train

    base, _ = two_process_run
    train(load_config(None, train_overrides(base / "fashion", base / "one" / "run")))
    two = torch.load(base / "two" / "run" / "checkpoint.pt", weights_only=True)
    one = torch.load(base / "one" / "run" / "checkpoint.pt", weights_only=True)
    assert two["step"] == one["step"]
    # The recorded epoch loss is the mean over processes, not the main process's half batch.
    epoch_loss = [[record["loss"] for record in map(json.loads, (
        base / runs / "run" / "metrics.jsonl").read_text().splitlines())
        if record.get("kind") == "epoch"] for runs in ("two", "one")]
    assert len(epoch_loss[0]) == 1
    assert epoch_loss[0] == pytest.approx(epoch_loss[1], rel=1e-4)
    # 6 steps at the tiny config's peak lr (5e-4 * 16 / 256 = 3.1e-5): key-bias bound lr * steps.
    key_bias = {"rtol": 0.0, "atol": 6 * 3.2e-5}
    assert_networks_close(two["student"], one["student"], "student", TOLERANCE, key_bias)
    assert_networks_close(two["teacher"], one["teacher"], "teacher", TOLERANCE, key_bias)
    torch.testing.assert_close(two["loss"]["center"], one["loss"]["center"], **TOLERANCE)


@pytest.mark.slow
def test_train_leaves_a_process_group_it_did_not_create(
        two_process_run: tuple[Path, list[dict[str, Any]]]) -> None:
    """A user who calls dist.init_process_group before dinolab.train still owns the group."""
    _, ranks = two_process_run
    assert [rank["group_kept"] for rank in ranks] == [True, True]
    assert [rank["all_reduce"].item() for rank in ranks] == [WORLD, WORLD]


@pytest.mark.slow
def test_train_destroys_the_process_group_it_created(tmp_path: Path) -> None:
    """Under torchrun with no group made before, train makes one and destroys it before it
    returns, so that no process exits with a live group (gloo and NCCL may abort then)."""
    out_dir = tmp_path / "out"
    ranks = launch("train-creates-group", out_dir, make_fashion_mnist(tmp_path / "fashion"))
    assert [rank["epochs_done"] for rank in ranks] == [1, 1]
    assert f"{WORLD} process(es)" in (out_dir / "rank0.log").read_text()  # trained as a group
    assert [rank["group_kept"] for rank in ranks] == [False, False]
    # Freed with its threads before train returns, not in the interpreter's teardown.
    if PROC_NAMES_THREADS:
        assert all(rank["threads_during"] for rank in ranks)
        assert [rank["threads_after"] for rank in ranks] == [[], []]


@pytest.mark.slow
def test_a_data_stop_on_one_process_stops_every_process(tmp_path: Path) -> None:
    """Too many bad files on rank 0 alone: both ranks stop at the same log step with the data
    error, instead of rank 1 waiting in its next all-reduce for a process that has left."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(40):
        Image.new("L", (28, 28), 10 + 5 * index).save(folder / f"{index:02d}.png")
    for index in range(8):
        (folder / f"broken{index}.png").write_bytes(b"")
    ranks = launch("bad-files", tmp_path / "out", folder)
    assert "failed to decode" in ranks[0]["outcome"] and "broken" in ranks[0]["outcome"]
    assert ranks[1]["outcome"].startswith("another process stopped the run")


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)
    # The results are saved and the group is gone: leave without the interpreter's teardown, in
    # which gloo's threads have aborted a rank once in a few dozen runs ("terminate called
    # without an active exception", exit -6) after everything had passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
