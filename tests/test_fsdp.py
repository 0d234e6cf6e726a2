"""FSDP (train.parallel=fsdp): two processes holding half of every tensor train exactly like one.

With the student and the teacher sharded alike, each process updates its teacher shard from its
student shard, clips with full-tensor norms (one all-reduce of the shards' norms) and saves full
tensors, so 2 processes on half a batch each give the losses, weights, center and checkpoints of
1 process on the whole batch, in the same checkpoint layout, which either kind of run resumes.

This file is also the worker (``python tests/test_fsdp.py MODE OUT [DATA]``, launched per rank
by test_ddp.launch with torchrun's variables).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_fashion_mnist
from equivalence import assert_networks_close, assert_tensors_close
from test_ddp import (
    ACCUMULATIONS,
    CHECKPOINTED,
    KEY_BIAS_TOLERANCE,
    PROC_NAMES_THREADS,
    STEPS,
    TIMEOUT_S,
    TOLERANCE,
    VARIANTS,
    WORLD,
    global_batches,
    group_threads,
    launch,
    record_group_threads,
    run_steps,
    snapshot,
    step_config,
    step_on_slices,
    train_overrides,
)

from dinolab.config import load_config

SHARDED = "train.parallel=fsdp"


# --- the worker (one process of a 2-process group) ------------------------------------------


def worker(mode: str, out_dir: Path, data_root: Path | None) -> None:
    from dinolab.distributed import barrier, init_distributed, shutdown
    from dinolab.training.state import build_state

    torch.set_num_threads(1)  # 2 processes on 2 cores
    me = int(os.environ["RANK"])
    if mode == "train":  # as `torchrun ... train train.parallel=fsdp`: train makes the group
        from dinolab.training import loop

        assert data_root is not None
        threads_during = record_group_threads(loop)
        result = loop.train(
            load_config(None, train_overrides(data_root, out_dir / "run") + [SHARDED]))
        torch.save({"epochs_done": result.epochs_done, "threads_during": threads_during,
                    "threads_after": group_threads()}, out_dir / f"rank{me}.pt")
        return
    assert init_distributed(torch.device("cpu"))
    config = step_config(out_dir / "unused", SHARDED)
    saved: dict[str, Any] = {f"accumulation_{k}": run_steps(config, me, WORLD, k)
                             for k in ACCUMULATIONS}
    saved["checkpointed"] = run_steps(step_config(out_dir / "unused", SHARDED, CHECKPOINTED),
                                      me, WORLD, 1)
    # A checkpoint after STEPS steps, loaded by freshly built sharded states, which go on.
    torch.manual_seed(0)
    state = build_state(config)
    step_on_slices(state, global_batches(), me, WORLD, accumulation=1)
    checkpoint = state.state_dict()
    if me == 0:
        torch.save(checkpoint, out_dir / "checkpoint.pt")
    barrier()
    resumed = build_state(config)
    resumed.load_state_dict(torch.load(out_dir / "checkpoint.pt", weights_only=True))
    losses = step_on_slices(resumed, global_batches()[:1], me, WORLD, 1, first_step=STEPS)
    saved["resumed"] = snapshot(resumed, losses)
    # As train() builds it, seeded with seed + rank: every shard comes from rank 0's weights.
    torch.manual_seed(config.train.seed + me)
    seeded = build_state(config)
    full = seeded.state_dict()
    saved["rank_seeded"] = {"student": full["student"], "teacher": full["teacher"]}
    saved["numel_here"] = sum(shard.numel() for shard in seeded.student_shards)
    saved["numel_full"] = sum(parameter.numel() for parameter in seeded.student_parameters)
    torch.save(saved, out_dir / f"rank{me}.pt")
    shutdown()


# --- the tests ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out_dir = tmp_path_factory.mktemp("fsdp_steps")
    return out_dir, launch("steps", out_dir, worker_file=__file__)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_steps(step_config(tmp_path_factory.mktemp("one")), rank=0, world=1, accumulation=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_two_sharded_processes_equal_one_process(ranks: tuple[Path, list[dict[str, Any]]],
                                                 one_process: dict[str, Any], name: str) -> None:
    """Also with the blocks recomputed in the backward: each recomputed unit all-gathers its
    shards again, and the steps stay those of one plain process."""
    _, (main, other) = ranks
    mean_loss = (main[name]["losses"] + other[name]["losses"]) / 2
    torch.testing.assert_close(mean_loss, one_process["losses"], **TOLERANCE)
    for part in ("student", "teacher"):
        assert_networks_close(main[name][part], one_process[part], part, TOLERANCE,
                              KEY_BIAS_TOLERANCE)
    torch.testing.assert_close(main[name]["center"], one_process["center"], **TOLERANCE)
    assert not torch.allclose(main[name]["losses"], other[name]["losses"])  # halves differ
    # Full tensors only where they are written: the other process holds none of them.
    assert set(other[name]["student"].values()) == {None}


@pytest.mark.slow
def test_each_process_holds_a_shard(ranks: tuple[Path, list[dict[str, Any]]]) -> None:
    _, both = ranks
    full = both[0]["numel_full"]
    assert [rank["numel_full"] for rank in both] == [full, full]
    assert all(rank["numel_here"] < 0.6 * full for rank in both)
    assert sum(rank["numel_here"] for rank in both) == full


@pytest.mark.slow
def test_sharded_processes_start_from_the_main_process_weights(
        ranks: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    """Seeded with seed + rank as train() does, yet the network is rank 0's initialisation, and
    the teacher starts as the student."""
    from dinolab.training.state import build_state

    _, (main, _other) = ranks
    torch.manual_seed(0)  # train.seed + rank 0
    alone = build_state(step_config(tmp_path)).state_dict()
    for part in ("student", "teacher"):
        assert_tensors_close(main["rank_seeded"][part], alone[part], part, {"rtol": 0, "atol": 0})


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_in_one_process_and_in_two(
        ranks: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    """The checkpoint has the one-process layout (so the optimizer state loads as it is there),
    and one more step after loading it is the same step in 1 process and in 2 sharded ones."""
    from dinolab.training.state import build_state

    out_dir, (main, other) = ranks
    checkpoint = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    alone = build_state(step_config(tmp_path))
    layout = alone.state_dict()
    assert [group["params"] for group in checkpoint["optimizer"]["param_groups"]] == \
        [group["params"] for group in layout["optimizer"]["param_groups"]]
    alone.load_state_dict(checkpoint)
    moments = alone.optimizer.state_dict()["state"]
    assert moments.keys() == checkpoint["optimizer"]["state"].keys()
    groups = layout["optimizer"]["param_groups"]
    assert len(moments) == sum(len(group["params"]) for group in groups)
    for index, entries in checkpoint["optimizer"]["state"].items():
        assert_tensors_close(moments[index], entries, f"AdamW state {index}",
                             {"rtol": 0, "atol": 0})
    losses = step_on_slices(alone, global_batches()[:1], 0, 1, 1, first_step=STEPS)
    expected = snapshot(alone, losses)
    mean_loss = (main["resumed"]["losses"] + other["resumed"]["losses"]) / 2
    torch.testing.assert_close(mean_loss, expected["losses"], **TOLERANCE)
    for part in ("student", "teacher"):
        assert_networks_close(main["resumed"][part], expected[part], part, TOLERANCE,
                              KEY_BIAS_TOLERANCE)


@pytest.mark.slow
def test_train_sharded_equals_one_process(tmp_path: Path) -> None:
    """`dinolab train ... train.parallel=fsdp` under 2 processes: the checkpoint, the teacher
    export, the epoch loss and the k-NN monitor (on the gathered teacher) match 1 process."""
    from safetensors.torch import load_file

    from dinolab.training.loop import train

    data_root = make_fashion_mnist(tmp_path / "fashion")
    ranks = launch("train", tmp_path / "two", data_root, worker_file=__file__)
    assert [rank["epochs_done"] for rank in ranks] == [1, 1]
    # The sharded networks' meshes keep the group: train frees it, threads and all, before it
    # returns; left to the interpreter's teardown, it made a gloo rank abort now and then.
    if PROC_NAMES_THREADS:
        assert all(rank["threads_during"] for rank in ranks)
        assert [rank["threads_after"] for rank in ranks] == [[], []]
    assert "2 process(es) (FSDP), cpu" in (tmp_path / "two" / "rank0.log").read_text()
    train(load_config(None, train_overrides(data_root, tmp_path / "one" / "run")))
    runs = {name: tmp_path / name / "run" for name in ("two", "one")}
    two, one = (torch.load(runs[name] / "checkpoint.pt", weights_only=True) for name in runs)
    assert two["step"] == one["step"] == 96 // 16
    # 6 steps at the tiny config's peak lr (3.1e-5): key-bias bound lr * steps, as test_ddp.
    key_bias = {"rtol": 0.0, "atol": 6 * 3.2e-5}
    assert_networks_close(two["student"], one["student"], "student", TOLERANCE, key_bias)
    assert_networks_close(two["teacher"], one["teacher"], "teacher", TOLERANCE, key_bias)
    torch.testing.assert_close(two["loss"]["center"], one["loss"]["center"], **TOLERANCE)
    export = load_file(runs["two"] / "teacher.safetensors")
    assert export.keys() == {key.removeprefix("backbone.") for key in two["teacher"]
                             if key.startswith("backbone.")}
    for key, value in export.items():
        assert torch.equal(value, two["teacher"][f"backbone.{key}"]), key
    records = {name: [json.loads(line) for line in (runs[name] / "metrics.jsonl").open()]
               for name in runs}
    for kind, field in (("epoch", "loss"), ("knn", "knn_top1"), ("epoch", "knn_top1")):
        values = {name: [record[field] for record in records[name]
                         if record.get("kind") == kind and field in record] for name in runs}
        assert values["two"], (kind, field)
        assert values["two"] == pytest.approx(values["one"], rel=1e-4, abs=1e-6), (kind, field)


@pytest.mark.slow
def test_torchrun_runs_the_documented_sharded_command(tmp_path: Path) -> None:
    """README's command as users type it, through torchrun's elastic agent (its own store and
    environment, unlike the launch above): every process exits 0, so torchrun does too, and
    the run is one sharded run with one checkpoint."""
    data_root = make_fashion_mnist(tmp_path / "fashion")
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={WORLD}", "-m", "dinolab.cli", "train",
               *train_overrides(data_root, run_dir), SHARDED, "run.progress_bar=false"]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.count(f"{WORLD} process(es) (FSDP), cpu") == 1  # the main process speaks
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 96 // 16 and checkpoint["epoch"] == 1


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)
    sys.stdout.flush()  # and leave without the interpreter's teardown: see test_ddp.py's end
    sys.stderr.flush()
    os._exit(0)
