"""What each process holds under DDP and under FSDP (train.parallel), and the step time of each.

Launches P processes of itself (torchrun's variables; gloo on CPUs, NCCL on GPUs), builds the
training state of a recipe in each, runs a few DINO steps on random views and reports, per
process: the bytes of the student's and the teacher's parameters and of AdamW's state that this
process holds (shards under FSDP), the peak CUDA memory where there is a GPU, and the mean step
time. Both strategies run in the same call: compare them, not the absolute figures.

  python benchmarks/sharding.py                                  # ViT-S/16, 2 processes, CPU
  python benchmarks/sharding.py --processes 8 --device cuda \
      --set model.backbone=vit_large_patch16_224
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dinolab import auto
from dinolab.config import load_config
from dinolab.distributed import fsdp
from dinolab.training.step import StepValues, train_step

VALUES = StepValues(lr=1e-4, weight_decay=0.04, teacher_momentum=0.996, teacher_temp=0.04,
                    freeze_last_layer=False)
MIB = 2**20


def overrides(arguments: argparse.Namespace, parallel: str) -> list[str]:
    return [f"train.parallel={parallel}", f"train.device={arguments.device}",
            f"train.batch_size={arguments.batch}", "train.deterministic=false",
            f"data.global_crop_size={arguments.global_crop}",
            f"data.local_crop_size={arguments.local_crop}",
            f"data.num_local_crops={arguments.local_crops}", *arguments.set]


def held_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(fsdp.local_tensor(t).numel() * t.element_size() for t in tensors)


def measure(arguments: argparse.Namespace, parallel: str) -> dict[str, Any]:
    """One process's figures for one strategy (every process runs this together)."""
    from dinolab.training.state import build_state

    config = load_config(arguments.preset, overrides(arguments, parallel))
    config = auto.resolve_for_preset(config, arguments.preset)
    state = build_state(config)
    per_process = config.train.batch_size // int(os.environ["WORLD_SIZE"])
    sizes = [config.data.global_crop_size] * 2 + [config.data.local_crop_size] * \
        config.data.num_local_crops
    views = [torch.randn(per_process, 3, size, size, device=state.device) for size in sizes]
    if state.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(arguments.warmup + arguments.steps):
        start = time.perf_counter()
        train_step(state, [views], VALUES).item()  # a host sync: the step is done
        times.append(time.perf_counter() - start)
    moments = [value for entries in state.optimizer.state.values() for value in entries.values()
               if isinstance(value, torch.Tensor) and value.ndim > 0]
    return {
        "parallel": parallel,
        "student_mib": held_bytes(state.student_parameters) / MIB,
        "teacher_mib": held_bytes(state.teacher_parameters) / MIB,
        "adamw_mib": held_bytes(moments) / MIB,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / MIB
        if state.device.type == "cuda" else None,
        "step_s": sum(times[arguments.warmup:]) / arguments.steps,
    }


def worker(arguments: argparse.Namespace) -> None:
    from dinolab.distributed import init_distributed, is_main_process, shutdown
    from dinolab.training.state import resolve_device

    init_distributed(resolve_device(arguments.device))
    rows = [measure(arguments, parallel) for parallel in ("ddp", "fsdp")]
    if is_main_process():
        Path(arguments.out).write_text(json.dumps(rows))
    shutdown()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(arguments: argparse.Namespace, argv: list[str]) -> list[dict[str, Any]]:
    """Run ``arguments.processes`` copies of this script as one process group."""
    out = Path(arguments.out)
    port, processes = str(free_port()), []
    threads = max(1, (os.cpu_count() or 1) // arguments.processes)
    for rank in range(arguments.processes):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(arguments.processes), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "OMP_NUM_THREADS": str(threads)}
        processes.append(subprocess.Popen([sys.executable, __file__, *argv, "--worker"], env=env))
    codes = [process.wait() for process in processes]
    if any(codes):
        raise SystemExit(f"a process failed: exit codes {codes}")
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="imagenet_vit_small")
    parser.add_argument("--set", action="append", default=[], help="a config override")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=4, help="global batch (over processes)")
    parser.add_argument("--global-crop", type=int, default=224)
    parser.add_argument("--local-crop", type=int, default=96)
    parser.add_argument("--local-crops", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default="sharding.json", help="where the JSON rows go")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    arguments = parser.parse_args(argv)
    if arguments.worker:
        worker(arguments)
        return []
    rows = launch(arguments, argv)
    print(f"{arguments.processes} processes, {arguments.device}, per process:")
    print(f"{'parallel':8} {'student MiB':>11} {'teacher MiB':>11} {'AdamW MiB':>9} "
          f"{'total MiB':>9} {'peak CUDA MiB':>13} {'step s':>7}")
    for row in rows:
        total = row["student_mib"] + row["teacher_mib"] + row["adamw_mib"]
        peak = f"{row['peak_cuda_mib']:.0f}" if row["peak_cuda_mib"] is not None else "-"
        print(f"{row['parallel']:8} {row['student_mib']:11.1f} {row['teacher_mib']:11.1f} "
              f"{row['adamw_mib']:9.1f} {total:9.1f} {peak:>13} {row['step_s']:7.3f}")
    return rows


if __name__ == "__main__":
    main()
