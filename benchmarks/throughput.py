"""Images per second of a complete DINO training step: dinolab, its fast-path switches, and a peer.

One step = teacher forward, student forward, loss, backward, clip, optimizer step, EMA, center.
Modes:
  model  the views are random tensors already on the device: the step alone;
  e2e    the views come from the real data pipeline (decode, multi-crop, collate, copy);
  data   the data pipeline alone, without the model.
The peer is the same step built from lightly's public pieces (benchmarks/lightly_peer.py).
Every figure of one table is measured in one process, one after the other: compare ratios.

Examples (docs/benchmarks.md has the recorded results):
  python benchmarks/throughput.py                                   # demo recipe, this machine
  python benchmarks/throughput.py --switches                        # each fast-path piece off
  python benchmarks/throughput.py --preset imagenet_vit_small --set data.num_local_crops=10 \
      --batch 128 --data jpeg --workers 14 --flops --json out.json  # ViT-S/16 on a GPU
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import itertools
import json
import platform
import resource
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dinolab import auto
from dinolab.config import Config, load_config
from dinolab.data.datasets import ArrayImages, build_sources
from dinolab.training import step as step_module
from dinolab.training.loop import seed_everything
from dinolab.training.optim import parameter_groups
from dinolab.training.pipeline import TrainingData, build_training_data
from dinolab.training.state import (
    TrainingState,
    build_state,
    resolve_precision,
    set_fused_attention,
    use_fused_attention,
)
from dinolab.training.step import StepValues, train_step

VALUES = StepValues(lr=1e-4, weight_decay=0.04, teacher_momentum=0.996, teacher_temp=0.04,
                    freeze_last_layer=False)
# Dense bf16/fp16 tensor-core peaks from the vendors' datasheets, TFLOP/s (for MFU).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


@dataclass
class Row:
    name: str
    mode: str
    batch: int
    images_per_second: float
    ms_per_step: float
    peak_memory_mb: float
    tflops: float | None = None
    mfu: float | None = None
    host_syncs_per_step: float | None = None
    device_busy: float | None = None  # --profile, CUDA: kernel time / wall time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="demo", help="preset name or YAML (default demo)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, repeatable (e.g. data.num_local_crops=10)")
    parser.add_argument("--batch", type=int, nargs="+", default=[128])
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    parser.add_argument("--compile-modes", default="default",
                        help="model mode with --compile: torch.compile modes, comma-separated "
                             "(default, reduce-overhead, max-autotune-no-cudagraphs, ...)")
    parser.add_argument("--modes", default="model,e2e", help="model, e2e, data (comma-separated)")
    parser.add_argument("--augmentation", default="pil,batched",
                        help="e2e and data: pil, batched, batched+prefetch, batched+decode, ...")
    parser.add_argument("--workers", type=int, default=1, help="loader workers (e2e)")
    parser.add_argument("--data", default="fashion-mnist", choices=["fashion-mnist", "jpeg"])
    parser.add_argument("--images", type=int, default=2048, help="generated JPEGs (--data jpeg)")
    parser.add_argument("--jpeg-dir", type=Path,
                        help="--data jpeg: keep the generated JPEGs here, for the next call")
    parser.add_argument("--no-peer", action="store_true", help="skip the lightly peer")
    parser.add_argument("--switches", action="store_true", help="model mode: each piece off")
    parser.add_argument("--flops", action="store_true", help="count FLOPs, report MFU")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per figure")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--sync-debug", action="store_true",
                        help="CUDA: count the host syncs torch reports in the timed steps")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after each figure, profile this many steps: the top operations, "
                             "and on CUDA how busy the device was")
    parser.add_argument("--json", type=Path, help="also write the table here")
    return parser.parse_args(argv)


def make_config(args: argparse.Namespace, batch: int, *extra: str) -> Config:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = load_config(args.preset, [*args.set, f"train.batch_size={batch}",
                                       f"train.precision={args.precision}",
                                       f"train.device={device}",
                                       f"data.num_workers={args.workers}", *extra])
    return auto.resolve_for_preset(config, args.preset)


# ---------------------------------------------------------------------------------- data


def write_jpegs(folder: Path, count: int, seed: int = 0) -> None:
    """ImageNet-like files: 256-500 px per side, smooth colour fields with noise, quality 90."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        height, width = (int(v) for v in rng.integers(256, 501, size=2))
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        image = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
        image = image + rng.integers(-20, 21, image.shape)
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f"{index:05d}.jpg",
                                                                 quality=90)


def training_images(args: argparse.Namespace, config: Config, scratch: Path) -> Dataset:
    if args.data == "jpeg":
        folder = args.jpeg_dir or scratch / "jpeg"
        if len(list(folder.glob("*.jpg"))) != args.images:
            write_jpegs(folder, args.images)
        return build_sources(load_config(args.preset, [f"data.root={folder}",
                                                       "data.source=folder"]).data).train
    try:
        return build_sources(config.data).train
    except Exception:  # no Fashion-MNIST here: random 28 px images of the same shape
        rng = np.random.default_rng(0)
        return ArrayImages(rng.integers(0, 256, (args.images, 28, 28), dtype=np.uint8),
                           np.zeros(args.images, dtype=np.int64))


def random_views(config: Config, batch: int, device: torch.device) -> list[torch.Tensor]:
    data = config.data
    sizes = [data.global_crop_size] * 2 + [data.local_crop_size] * data.num_local_crops
    return [torch.randn(batch, 3, size, size, device=device) for size in sizes]


def forever(loader: Any) -> Iterator[Any]:
    for _ in itertools.count():
        yield from loader


def pipeline_views(data: TrainingData, device: torch.device) -> Iterator[list[torch.Tensor]]:
    """The views the training loop receives, epoch after epoch (TrainingData.epoch_views)."""
    for epoch in itertools.count():
        data.sampler.set_position(epoch, 0)
        yield from data.epoch_views(device, epoch, 0, len(data.loader))


def augmentation_overrides(name: str) -> list[str]:
    """``pil`` or ``batched``, with ``+prefetch`` and/or ``+decode`` (data.decode=device) in
    any order, e.g. ``batched+prefetch+decode`` -> config overrides."""
    augmentation, *variants = name.split("+")
    if not set(variants) <= {"prefetch", "decode"} or len(set(variants)) < len(variants):
        raise SystemExit(f"--augmentation: unknown variant {name!r}")
    return [f"data.augmentation={augmentation}",
            f"data.prefetch_views={'prefetch' in variants}",
            f"data.decode={'device' if 'decode' in variants else 'workers'}"]


# ---------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS


def measure(name: str, mode: str, step: Callable[[Any], Any], batches: Iterator[Any], batch: int,
            args: argparse.Namespace, device: torch.device, flops: float | None = None) -> Row:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step(next(batches))
    synchronize(device)
    with counting_host_syncs(args.sync_debug and device.type == "cuda") as syncs:
        start = time.perf_counter()
        for _ in range(args.steps):
            step(next(batches))
        synchronize(device)
        seconds = (time.perf_counter() - start) / args.steps
    row = Row(name, mode, batch, batch / seconds, seconds * 1000, peak_memory_mb(device))
    if syncs:
        row.host_syncs_per_step = (len(syncs) - 1) / args.steps  # less the final synchronize
        for where, count in collections.Counter(syncs).most_common(3):
            print(f"    host sync x{count}: {where}")
    if flops is not None:
        row.tflops = flops / seconds / 1e12
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name(device)),
                    None) if device.type == "cuda" else None
        row.mfu = row.tflops / peak if peak else None
    print(format_row(row), flush=True)
    if args.profile:
        row.device_busy = profile_steps(step, batches, args.profile, device)
    return row


def profile_steps(step: Callable[[Any], Any], batches: Iterator[Any], steps: int,
                  device: torch.device) -> float | None:
    """Profile ``steps`` more steps: print the operations that take the most time, and on CUDA
    -> the fraction of the wall time that kernels kept the device busy (low: the step waits on
    the host, on launches, data or syncs)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    synchronize(device)
    with profile(activities=activities) as profiler:
        start = time.perf_counter()
        for _ in range(steps):
            step(next(batches))
        synchronize(device)
        wall = time.perf_counter() - start
    events = profiler.key_averages()
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=sort_by, row_limit=15, max_name_column_width=60))
    if device.type != "cuda":
        return None
    busy = sum(event.self_device_time_total for event in events) / 1e6 / wall
    print(f"    device busy {busy:.0%} of {wall / steps * 1000:.1f} ms per profiled step")
    return busy


@contextlib.contextmanager
def counting_host_syncs(enabled: bool) -> Iterator[list[str]]:
    """The host syncs that torch reports (``set_sync_debug_mode``), each as its warning's text;
    an empty list when not ``enabled`` (CUDA only)."""
    syncs: list[str] = []
    if not enabled:
        yield syncs
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield syncs
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs += [str(warning.message).splitlines()[0][:120] for warning in caught]


def count_flops(step: Callable[[Any], Any], views: Any) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(views)
    return float(counter.get_total_flops())


# ------------------------------------------------------------------ dinolab and its switches


def dinolab_step(state: TrainingState) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    return lambda views: train_step(state, [views], VALUES)


@contextlib.contextmanager
def patched(module: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


@torch.no_grad()
def ema_per_tensor(teacher: list[torch.Tensor], student: list[torch.Tensor], m: float) -> None:
    for t, s in zip(teacher, student, strict=True):
        t.mul_(m).add_(s, alpha=1 - m)


@torch.no_grad()
def clip_with_sync(parameters: list[torch.Tensor], max_norm: float, sharded: bool = False) -> None:
    """The reference script's clipping: a norm read back to the host per tensor (the benchmark
    runs one process, so ``sharded`` is always False)."""
    for parameter in parameters:
        if parameter.grad is not None:
            scale = max_norm / (parameter.grad.norm().item() + 1e-6)
            if scale < 1:
                parameter.grad.mul_(scale)


def per_view_forward(self: Any, views: list[torch.Tensor]) -> torch.Tensor:
    return self.head(torch.cat([self.backbone(view) for view in views]))


def switch_variants() -> list[tuple[str, Callable[[], contextlib.AbstractContextManager],
                                    Callable[[TrainingState], None]]]:
    """(name, context, state edit): each turns one fast-path piece off."""
    from dinolab.models.multicrop import MultiCropNetwork

    def other_attention(state: TrainingState) -> None:
        fused = use_fused_attention(state.config.model.attention, state.device)
        for network in (state.student_module, state.teacher):
            set_fused_attention(network, not fused)

    def loop_optimizer(state: TrainingState) -> None:
        state.optimizer = torch.optim.AdamW(parameter_groups(state.student_module), lr=0.0,
                                            foreach=False, fused=False)

    nothing = contextlib.nullcontext
    return [
        ("off: per-view forward", lambda: patched(MultiCropNetwork, "forward", per_view_forward),
         lambda state: None),
        ("swap: fused/eager attention", nothing, other_attention),
        ("off: for-loop AdamW", nothing, loop_optimizer),
        ("off: per-tensor EMA", lambda: patched(step_module, "ema_update", ema_per_tensor),
         lambda state: None),
        ("off: clip with host syncs", lambda: patched(step_module, "clip_gradients_per_tensor",
                                                      clip_with_sync), lambda state: None),
    ]


def model_rows(args: argparse.Namespace, batch: int) -> list[Row]:
    config = make_config(args, batch)
    seed_everything(config)
    state = build_state(config)
    device = state.device
    views = random_views(config, batch, device)
    step = dinolab_step(state)
    flops = count_flops(step, views) if args.flops else None
    for _ in range(args.warmup):  # the process's first steps also pay one-off costs
        step(views)
    rows = [measure("dinolab", "model", step, itertools.repeat(views), batch, args, device, flops)]
    for mode in args.compile_modes.split(",") if args.compile else []:
        # train.compile's in-place Module.compile, with torch.compile's ``mode`` (CUDA graphs:
        # reduce-overhead; autotuned kernels: max-autotune-no-cudagraphs)
        compile_with_mode = functools.partialmethod(torch.nn.Module.compile, mode=mode)
        with patched(torch.nn.Module, "compile", compile_with_mode):
            compiled = build_state(make_config(args, batch, "train.compile=true"))
        name = "dinolab compiled" + ("" if mode == "default" else f" ({mode})")
        rows.append(measure(name, "model", dinolab_step(compiled), itertools.repeat(views),
                            batch, args, device, flops))
        del compiled
    if args.switches:
        syncing = dinolab_step(state)
        rows.append(measure("off: host sync every step", "model",
                            lambda v: syncing(v).item(), itertools.repeat(views), batch, args,
                            device, flops))
        torch.use_deterministic_algorithms(False)
        rows.append(measure("on: nondeterministic algos", "model", dinolab_step(state),
                            itertools.repeat(views), batch, args, device, flops))
        seed_everything(config)
        fp32 = build_state(make_config(args, batch, "train.precision=fp32"))
        rows.append(measure("off: fp32 (no autocast)", "model", dinolab_step(fp32),
                            itertools.repeat(views), batch, args, device, flops))
        del fp32
        for name, context, edit in switch_variants():
            variant = build_state(config)
            edit(variant)
            with context():
                rows.append(measure(name, "model", dinolab_step(variant), itertools.repeat(views),
                                    batch, args, device, flops))
    if not args.no_peer:
        from lightly_peer import PeerStep

        peer = PeerStep(config, device, state.autocast_dtype)
        rows.append(measure("peer (lightly)", "model", peer, itertools.repeat(views), batch,
                            args, device, flops))
    return rows


def e2e_rows(args: argparse.Namespace, batch: int, scratch: Path) -> list[Row]:
    rows = []
    base = make_config(args, batch)
    images = training_images(args, base, scratch)
    compiled = ["train.compile=true"] if args.compile else []
    for augmentation, compile_options in itertools.product(
            args.augmentation.split(","), [[], compiled] if compiled else [[]]):
        config = make_config(args, batch, *augmentation_overrides(augmentation),
                             *compile_options)
        seed_everything(config)
        state = build_state(config)
        data = build_training_data(config, images, state.device)
        name = f"dinolab ({augmentation}{', compiled' if compile_options else ''})"
        rows.append(measure(name, "e2e", dinolab_step(state), pipeline_views(data, state.device),
                            batch, args, state.device))
        del data, state
    if not args.no_peer:
        from lightly_peer import PeerStep, peer_loader

        device = torch.device(base.train.device)
        peer = PeerStep(base, device, resolve_precision(args.precision, device))
        loader = peer_loader(base, images, batch, args.workers, device.type == "cuda")
        rows.append(measure("peer (lightly)", "e2e", peer, forever(loader), batch, args, device))
    return rows


def data_rows(args: argparse.Namespace, batch: int, scratch: Path) -> list[Row]:
    """The data pipeline alone (views made and on the device, no model), and for ``batched``
    the augmentation alone on one decoded batch already on the device."""
    rows = []
    base = make_config(args, batch)
    images = training_images(args, base, scratch)
    device = torch.device(base.train.device)
    for augmentation in args.augmentation.split(","):
        config = make_config(args, batch, *augmentation_overrides(augmentation))
        data = build_training_data(config, images, device)
        batches = pipeline_views(data, device)
        rows.append(measure(f"pipeline ({augmentation})", "data", lambda views: None, batches,
                            batch, args, device))
        if data.augment is not None:
            samples, _ = next(iter(data.loader))  # (batch, skipped files)
            if data.decode is not None:  # data.decode=device: JPEGs still undecoded
                samples, _ = data.decode(samples, device)
            decoded, sizes = samples
            decoded = decoded.to(device)
            generator = torch.Generator().manual_seed(0)
            augment_once = functools.partial(data.augment, decoded, sizes, generator)
            rows.append(measure("augmentation alone", "data", lambda _, run=augment_once: run(),
                                itertools.repeat(None), batch, args, device))
        del data, batches
    return rows


# ---------------------------------------------------------------------------------- report


def format_row(row: Row) -> str:
    extra = ""
    if row.tflops is not None:
        extra = f"  {row.tflops:7.1f}"
        extra += f"  {row.mfu:5.1%}" if row.mfu is not None else "      -"
    return (f"{row.name:28s} {row.mode:5s} {row.images_per_second:9.1f} {row.ms_per_step:9.1f} "
            f"{row.peak_memory_mb:9.0f}{extra}")


def print_ratios(rows: list[Row]) -> None:
    """dinolab / peer for each mode and batch size (rows of the same mode and batch)."""
    for peer in (row for row in rows if row.name.startswith("peer")):
        for row in rows:
            if (row.mode, row.batch) == (peer.mode, peer.batch) and row.name.startswith("dinolab"):
                ratio = row.images_per_second / peer.images_per_second
                print(f"{row.mode:5s} batch {row.batch}: {row.name} / peer: {ratio:.2f}x")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))  # lightly_peer
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    print(f"device: {name}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"preset {args.preset} {' '.join(args.set)}; precision {args.precision}")
    print(f"{'variant':28s} {'mode':5s} {'images/s':>9s} {'ms/step':>9s} {'peak MB':>9s}"
          + ("  TFLOP/s    MFU" if args.flops else ""))
    rows: list[Row] = []
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory() as scratch:
        for batch in args.batch:
            print(f"-- batch {batch}")
            if "model" in modes:
                rows += model_rows(args, batch)
            if "e2e" in modes:
                rows += e2e_rows(args, batch, Path(scratch))
            if "data" in modes:
                rows += data_rows(args, batch, Path(scratch))
    print_ratios(rows)
    if args.json:
        args.json.write_text(json.dumps({
            "device": name, "torch": torch.__version__, "argv": sys.argv[1:],
            "date": time.strftime("%Y-%m-%d"), "rows": [asdict(row) for row in rows],
        }, indent=1))


if __name__ == "__main__":
    main()
