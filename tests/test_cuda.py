"""What only a GPU can show: the batched augmentation on CUDA, and prefetched views on a side
stream. Skipped where there is no CUDA device; benchmarks/gpu_suite.sh runs this file first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinolab.config import Config, load_config
from dinolab.data import batched_augment as batched
from dinolab.data.datasets import build_sources
from dinolab.training.pipeline import build_training_data

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def _rgb_images(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded uint8 canvases of smooth colour fields of different sizes, and their sizes."""
    rng = np.random.default_rng(seed)
    sizes = torch.tensor(rng.integers(48, 97, size=(count, 2)))
    canvas = torch.zeros(count, 3, 96, 96, dtype=torch.uint8)
    for image, (height, width) in zip(canvas, sizes.tolist(), strict=True):
        coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        pixels = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC))
        image[:, :height, :width] = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
    return canvas, sizes


def test_batched_augmentation_on_cuda_equals_the_cpu() -> None:
    config = load_config("imagenet_vit_small", ["data.global_crop_size=64",
                                                "data.local_crop_size=32"]).data
    images, sizes = _rgb_images(32)
    augment = batched.BatchedMultiCrop(config)
    on_cpu = augment(images, sizes, torch.Generator().manual_seed(0))
    on_cuda = augment(images.to(CUDA), sizes, torch.Generator().manual_seed(0))
    for cpu_view, cuda_view in zip(on_cpu, on_cuda, strict=True):
        torch.testing.assert_close(cuda_view.cpu(), cpu_view, rtol=1e-4, atol=1e-4)


def test_compiled_batched_augmentation_on_cuda_equals_the_eager_cpu() -> None:
    """train.compile on CUDA: the compiled all-rows augmentation gives the CPU's eager views."""
    config = load_config("imagenet_vit_small", ["data.global_crop_size=64",
                                                "data.local_crop_size=32"]).data
    images, sizes = _rgb_images(32)
    on_cpu = batched.BatchedMultiCrop(config)(images, sizes, torch.Generator().manual_seed(0))
    compiled = batched.BatchedMultiCrop(config, compile=True)
    compiled(images.to(CUDA), sizes, torch.Generator().manual_seed(1))  # compiles
    on_cuda = compiled(images.to(CUDA), sizes, torch.Generator().manual_seed(0))
    for cpu_view, cuda_view in zip(on_cpu, on_cuda, strict=True):
        torch.testing.assert_close(cuda_view.cpu(), cpu_view, rtol=1e-4, atol=1e-4)


def _photo_folder_config(tmp_path: Path, *extra: str) -> Config:
    """A folder of 64 images, 4 batches of 16: photo-like JPEGs (smooth colour fields with some
    noise, as photos are: nvJPEG's chroma upsampling differs from libjpeg's most on pure noise),
    some turned by their EXIF orientation (6, 8, 3), some grayscale, and a PNG."""
    folder = tmp_path / "photos"
    if not folder.is_dir():
        folder.mkdir()
        rng = np.random.default_rng(0)
        for index in range(63):
            height, width = (int(v) for v in rng.integers(64, 161, size=2))
            channels = () if index % 5 == 4 else (3,)  # every fifth file grayscale
            coarse = rng.integers(0, 256, (6, 6, *channels), dtype=np.uint8)
            smooth = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
            pixels = np.asarray(smooth, np.int16) + rng.integers(-20, 21, smooth.size[::-1]
                                                                 + channels)
            exif = Image.Exif()
            exif[0x0112] = (1, 6, 1, 8, 3, 1, 1)[index % 7]
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
                folder / f"{index:03d}.jpg", quality=90, exif=exif)
        Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(
            folder / "drawing.png")
    return load_config("imagenet_vit_small", [
        "data.source=folder", f"data.root={folder}", "data.num_workers=0",
        "data.global_crop_size=64", "data.local_crop_size=32", "data.num_local_crops=4",
        "data.augmentation=batched", "train.batch_size=16", f"run.dir={tmp_path / 'run'}",
        "train.device=cuda", *extra])


def _handed_over_checksums(config: Config) -> list[list[float]]:
    """Each micro-batch's views as the current stream sees them when handed over, reduced on
    that stream after a matmul big enough to keep the GPU busy: memory the allocator gave back
    to the side stream too early would show as changed sums."""
    images = build_sources(config.data).train
    data = build_training_data(config, images, CUDA)
    data.sampler.set_position(0, 0)
    busy = torch.randn(2048, 2048, device=CUDA)
    sums: list[list[float]] = []
    for views in data.epoch_views(CUDA, 0, 0, len(data.loader)):
        for _ in range(20):
            busy = busy @ busy / 2048  # time for the side stream to run ahead
        sums.append([view.double().sum().item() for view in views])
        del views
    return sums


def test_prefetched_views_equal_the_plain_ones_on_cuda(tmp_path: Path) -> None:
    plain = _handed_over_checksums(_photo_folder_config(tmp_path, "data.num_workers=2"))
    prefetched = _handed_over_checksums(_photo_folder_config(tmp_path, "data.num_workers=2",
                                                             "data.prefetch_views=true"))
    assert len(plain) == 4
    assert prefetched == plain


def test_device_decode_on_cuda_gives_the_canvases_of_the_cpu_workers(tmp_path: Path) -> None:
    """data.decode=device with nvJPEG -> the canvases of data.decode=workers (PIL on the CPU).
    Sizes, channels and padding are exact; pixel values may differ where nvJPEG's IDCT and
    chroma upsampling round otherwise than libjpeg-turbo's: within 2 levels on average per
    image, the bound torchvision's own tests set for nvJPEG against libjpeg. A placement or
    orientation mistake moves whole regions: tens of levels on average."""
    from dinolab.data.device_decode import EncodedJpeg

    on_workers = _photo_folder_config(tmp_path)
    on_device = _photo_folder_config(tmp_path, "data.decode=device")
    images = build_sources(on_workers.data).train
    cpu_data = build_training_data(on_workers, images, torch.device("cpu"))
    cuda_data = build_training_data(on_device, images, CUDA)
    assert cuda_data.decode is not None
    cpu_data.sampler.set_position(0, 0)
    cuda_data.sampler.set_position(0, 0)
    for theirs, ours in zip(cpu_data.loader, cuda_data.loader, strict=True):
        (expected, expected_sizes), _ = theirs
        items, _ = ours
        assert sum(isinstance(item, EncodedJpeg) for item in items) >= len(items) - 1
        decoded, skipped = cuda_data.decode(items, CUDA)
        assert decoded is not None and skipped == []
        canvas, sizes = decoded
        assert canvas.device.type == "cuda" and torch.equal(sizes, expected_sizes)
        assert canvas.shape == expected.shape
        difference = (canvas.cpu().float() - expected.float()).abs()
        for image, (height, width) in zip(difference, sizes.tolist(), strict=True):
            assert image[:, :height, :width].mean() < 2
