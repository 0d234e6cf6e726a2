"""Views per second of the CPU multi-crop pipeline, with 1..N loader workers.

What the training loop receives, measured without a model: the real pipeline
(training/pipeline.py) from files to normalised views in the main process. Two workloads:
  jpeg     ImageNet-like JPEGs (256-500 px, benchmarks/throughput.py's generator) with the
           reference crops: 2 x 224 + 8 x 96 (preset imagenet_vit_small);
  fashion  Fashion-MNIST (28 px) with the demo preset's crops: 2 x 28 + 6 x 14.
Two paths: pil (each worker makes the views of its images with PIL) and batched (workers only
decode; ``BatchedMultiCrop`` makes the views of each batch in the main process, here on the
CPU, where it competes with the workers for the same cores).

Examples (docs/benchmarks.md, "Data pipeline on the CPU", has the recorded results):
  python benchmarks/data_throughput.py                         # both workloads, 1 and 2 workers
  python benchmarks/data_throughput.py --workloads jpeg --workers 1,2,4,8 --batches 20
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).parent))
from throughput import pipeline_views, write_jpegs  # noqa: E402

from dinolab.config import Config, load_config  # noqa: E402
from dinolab.data.datasets import ArrayImages, build_sources  # noqa: E402
from dinolab.training.pipeline import build_training_data  # noqa: E402

CPU = torch.device("cpu")
PRESETS = {"jpeg": "imagenet_vit_small", "fashion": "demo"}
BATCHES = {"jpeg": 32, "fashion": 128}  # images per batch: the demo's own batch for fashion


@dataclass
class Row:
    workload: str
    path: str
    batch: int
    workers: int
    views_per_second: float
    views_per_second_per_worker: float
    images_per_second: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="jpeg,fashion", help="jpeg and/or fashion")
    parser.add_argument("--paths", default="pil,batched", help="pil and/or batched")
    parser.add_argument("--workers", default="1,2", help="loader worker counts, e.g. 1,2,4")
    parser.add_argument("--batch", type=int, help="images per batch (default: jpeg 32, "
                        "fashion 128)")
    parser.add_argument("--batches", type=int, default=8, help="timed batches per figure")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    parser.add_argument("--images", type=int, default=512, help="generated JPEGs")
    parser.add_argument("--fashion-root", default="", help="Fashion-MNIST folder (default: "
                        "the usual places; random 28 px images where there is none)")
    parser.add_argument("--json", type=Path, help="also write the table here")
    return parser.parse_args(argv)


def workload_images(name: str, args: argparse.Namespace, scratch: Path,
                    ) -> tuple[Dataset, list[str]]:
    """-> (the training images, the data.root override for the config, if any)."""
    if name == "jpeg":
        folder = scratch / "jpeg"
        write_jpegs(folder, args.images)
        root = [f"data.root={folder}"]
        return build_sources(load_config(PRESETS[name], root).data).train, root
    root = [f"data.root={args.fashion_root}"] if args.fashion_root else []
    try:
        return build_sources(load_config(PRESETS[name], root).data).train, root
    except Exception:  # no Fashion-MNIST here: random images of the same shape
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (args.images, 28, 28), dtype=np.uint8)
        return ArrayImages(images, np.zeros(args.images, dtype=np.int64)), root


def views_per_second(config: Config, images: Dataset, args: argparse.Namespace) -> float:
    """Time ``args.batches`` batches from the loader to views in the main process."""
    data = build_training_data(config, images, CPU)
    batches = pipeline_views(data, CPU)
    for _ in range(args.warmup):  # includes starting the workers
        next(batches)
    start = time.perf_counter()
    views = sum(len(view) for _ in range(args.batches) for view in next(batches))
    seconds = time.perf_counter() - start
    del data, batches
    return views / seconds


def measure(workload: str, args: argparse.Namespace, scratch: Path) -> list[Row]:
    images, root = workload_images(workload, args, scratch)
    batch = args.batch or BATCHES[workload]
    rows = []
    for path, workers in itertools.product(args.paths.split(","),
                                           (int(n) for n in args.workers.split(","))):
        config = load_config(PRESETS[workload], [
            *root, f"data.augmentation={path}", f"data.num_workers={workers}",
            f"train.batch_size={batch}", f"run.dir={scratch / 'run'}"])
        rate = views_per_second(config, images, args)
        per_image = 2 + config.data.num_local_crops
        row = Row(workload, path, batch, workers, rate, rate / max(workers, 1), rate / per_image)
        print(f"{row.workload:8s} {row.path:8s} {batch:5d} {row.workers:7d} "
              f"{row.views_per_second:10.0f} "
              f"{row.views_per_second_per_worker:11.0f} {row.images_per_second:9.0f}", flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    print(f"cpu: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads in the main process")
    print(f"{'workload':8s} {'path':8s} {'batch':>5s} {'workers':>7s} {'views/s':>10s} "
          f"{'per worker':>11s} {'images/s':>9s}")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as scratch:
        for workload in args.workloads.split(","):
            rows += measure(workload, args, Path(scratch))
    if args.json:
        args.json.write_text(json.dumps({
            "argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "rows": [asdict(row) for row in rows]}, indent=1))
    return rows


if __name__ == "__main__":
    main()
