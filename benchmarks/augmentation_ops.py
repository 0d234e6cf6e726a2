"""Cost of the batched augmentation per batch: time, and the kernels it runs on image data.

On a GPU the augmentation's cost is mostly kernel launches, so the number of operations on
image tensors (4-D views and canvases; the CPU-side parameter draws are not counted) is a
figure that any machine can measure. Three workloads:
  fashion   128 Fashion-MNIST-sized images (1 x 28 x 28), the demo's crops (2 x 28 + 6 x 14)
  rgb32     128 RGB 32 x 32 images, the demo's crops
  imagenet  32 RGB images of 256-400 px, the reference crops (2 x 224 + 8 x 96)
``--compare-with FILE`` loads another version of data/batched_augment.py (for example
``git show REV:src/dinolab/data/batched_augment.py > old.py``) and measures both, interleaved.

  python benchmarks/augmentation_ops.py
  python benchmarks/augmentation_ops.py --compare-with old.py --device cuda
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls; the best is shown")
    parser.add_argument("--compare-with", type=Path, help="another batched_augment.py")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    versions: dict[str, ModuleType] = {"this": batched_augment}
    if args.compare_with:
        versions["other"] = load_module(args.compare_with)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.workloads.split(","):
        config, images, sizes = workload(name, device)
        augments = {key: module.BatchedMultiCrop(config) for key, module in versions.items()}
        kernels, outputs = {}, {}
        for key, augment in augments.items():
            outputs[key] = augment(images, sizes, torch.Generator().manual_seed(0))  # warm-up
            with KernelCount() as counter:
                augment(images, sizes, torch.Generator().manual_seed(1))
            kernels[key] = counter.count
        times: dict[str, list[float]] = collections.defaultdict(list)
        for _ in range(args.repeat):  # interleaved, so that both see the same machine load
            for key, augment in augments.items():
                times[key].append(seconds_per_batch(augment, images, sizes, 1))
        line = [f"{name:9s}"]
        for key in augments:
            line.append(f"{key}: {min(times[key]) * 1000:8.1f} ms/batch, {kernels[key]:4d} "
                        "kernels on image data")
        if "other" in augments:
            difference = max((a - b).abs().max().item()
                             for a, b in zip(outputs["this"], outputs["other"], strict=True))
            line.append(f"other/this time {min(times['other']) / min(times['this']):.2f}x, "
                        f"largest difference {difference:.1e}")
        print("  ".join(line), flush=True)


if __name__ == "__main__":
    main()
