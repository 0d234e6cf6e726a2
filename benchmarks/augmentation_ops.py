"""Cost of the batched augmentation per batch: time, and the kernels it runs on image data.

On a GPU the augmentation's cost is mostly kernel launches, so the number of operations on
image tensors (4-D views and canvases; the CPU-side parameter draws are not counted) is a
figure that any machine can measure. Three workloads:
  fashion   128 Fashion-MNIST-sized images (1 x 28 x 28), the demo's crops (2 x 28 + 6 x 14)
  rgb32     128 RGB 32 x 32 images, the demo's crops
  imagenet  32 RGB images of 256-400 px, the reference crops (2 x 224 + 8 x 96)
``--all-rows`` adds the all-rows formulation (eager, and compiled as train.compile runs it on
GPUs); ``--compare-with FILE`` loads another version of data/batched_augment.py (for example
``git show REV:src/dinolab/data/batched_augment.py > old.py``). Variants run interleaved; the
last column compares each with the default eager path.

  python benchmarks/augmentation_ops.py
  python benchmarks/augmentation_ops.py --all-rows --compare-with old.py --device cuda
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dinolab.config import DataConfig, load_config
from dinolab.data import batched_augment

WORKLOADS = ("fashion", "rgb32", "imagenet")


class KernelCount(TorchDispatchMode):
    """Counts the operations that read a tensor of 3 or more dimensions, views excepted."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        if not func.is_view and any(isinstance(value, torch.Tensor) and value.dim() >= 3
                                    for value in (*args, *kwargs.values())):
            self.count += 1
        return func(*args, **kwargs)


def workload(name: str, device: torch.device) -> tuple[DataConfig, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    if name == "imagenet":
        config = load_config("imagenet_vit_small", []).data
        images = torch.randint(0, 256, (32, 3, 400, 400), dtype=torch.uint8, generator=generator)
        sizes = torch.randint(256, 401, (32, 2), generator=generator)
    else:
        config = load_config("demo", []).data
        side, channels = (28, 1) if name == "fashion" else (32, 3)
        images = torch.randint(0, 256, (128, channels, side, side), dtype=torch.uint8,
                               generator=generator)
        sizes = torch.full((128, 2), side)
    return config, images.to(device), sizes


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("other_batched_augment", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seconds_per_batch(augment: Any, images: torch.Tensor, sizes: torch.Tensor,
                      repeat: int) -> float:
    best = float("inf")
    for seed in range(repeat):
        if images.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        augment(images, sizes, torch.Generator().manual_seed(seed))
        if images.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def variants(config: DataConfig, args: argparse.Namespace) -> dict[str, Any]:
    augments: dict[str, Any] = {"rows": batched_augment.BatchedMultiCrop(config)}
    if args.all_rows:
        eager = batched_augment.BatchedMultiCrop(config)
        eager.compiled = batched_augment.augment_all_rows  # the formulation, uncompiled
        augments["all-rows"] = eager
        augments["all-rows compiled"] = batched_augment.BatchedMultiCrop(config, compile=True)
    if args.compare_with:
        augments["other"] = load_module(args.compare_with).BatchedMultiCrop(config)
    return augments


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls; the best is shown")
    parser.add_argument("--all-rows", action="store_true", help="also the all-rows paths")
    parser.add_argument("--compare-with", type=Path, help="another batched_augment.py")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'workload':9s} {'variant':18s} {'ms/batch':>9s} {'kernels':>8s}   time vs rows  "
          "largest difference")
    for name in args.workloads.split(","):
        config, images, sizes = workload(name, device)
        augments = variants(config, args)
        kernels, outputs = {}, {}
        for key, augment in augments.items():
            outputs[key] = augment(images, sizes, torch.Generator().manual_seed(0))  # warm-up
            with KernelCount() as counter:  # compiled code runs no operations to count
                augment(images, sizes, torch.Generator().manual_seed(1))
            kernels[key] = "-" if key.endswith("compiled") else str(counter.count)
        times: dict[str, list[float]] = collections.defaultdict(list)
        for _ in range(args.repeat):  # interleaved, so that all see the same machine load
            for key, augment in augments.items():
                times[key].append(seconds_per_batch(augment, images, sizes, 1))
        for key in augments:
            difference = max((a - b).abs().max().item()
                             for a, b in zip(outputs[key], outputs["rows"], strict=True))
            print(f"{name:9s} {key:18s} {min(times[key]) * 1000:9.1f} {kernels[key]:>8s}  "
                  f"{min(times[key]) / min(times['rows']):11.2f}x  {difference:.1e}", flush=True)


if __name__ == "__main__":
    main()
