"""Shared fixtures: small data written by the tests, and a tiny configuration that trains fast."""

from __future__ import annotations

import contextlib
import gzip
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write uint8 ``array`` in the IDX format (gzip-compressed), as Fashion-MNIST ships."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def make_fashion_mnist(root: Path, num_train: int = 96, num_test: int = 32, seed: int = 0) -> Path:
    """Fake Fashion-MNIST: 4 classes of 28x28 images (a bright square in one quadrant + noise)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", num_train), ("t10k", num_test)):
        labels = rng.integers(0, 4, size=count)
        images = rng.integers(0, 60, size=(count, 28, 28))
        for image, label in zip(images, labels, strict=True):
            top, left = (label // 2) * 14, (label % 2) * 14
            image[top + 2 : top + 12, left + 2 : left + 12] += 180
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture
def fashion_root(tmp_path: Path) -> Path:
    return make_fashion_mnist(tmp_path / "fashion")


def tiny_overrides(data_root: Path, run_dir: Path) -> list[str]:
    """A ViT of one block on 28 px crops: a few steps take well under a second each."""
    return [
        "method=dino",  # the schema's objective (the demo preset's is dinov2)
        "data.source=fashion-mnist", f"data.root={data_root}", "data.num_workers=0",
        "data.global_crop_size=28", "data.local_crop_size=14", "data.num_local_crops=2",
        "model.backbone=vit_tiny_patch16_224", "model.patch_size=7",
        "model.backbone_kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
        "model.head.out_dim=64", "model.head.hidden_dim=32", "model.head.bottleneck_dim=16",
        "train.epochs=2", "train.batch_size=16", "optim.warmup_epochs=1", "train.precision=fp32",
        # the demo's values of the other auto keys, set: tests that build a state themselves
        # need no data set size (tests/test_auto.py covers the resolution)
        "loss.teacher_temp=0.02", "loss.warmup_teacher_temp=0.02",
        "loss.warmup_teacher_temp_epochs=0", "optim.teacher_momentum=0.99",
        "optim.freeze_last_layer_epochs=0",
        "eval.knn_every_epochs=0", "eval.batch_size=64",
        "run.progress_bar=false", "run.tensorboard=false", "run.log_every_steps=2",
        f"run.dir={run_dir}",
    ]


def wait_all(processes: list[subprocess.Popen], timeout: float) -> list[int]:
    """Each process's exit status, waiting up to ``timeout`` seconds for each; a process still
    running after that (a hang), or when the wait raises, is killed."""
    try:
        return [process.wait(timeout=timeout) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


@contextlib.contextmanager
def global_torch_state_kept() -> Iterator[None]:
    """Put back what train() changes globally: the deterministic-algorithms switches and the
    RNG, so that a test training in-process leaves the next tests as it found them."""
    deterministic, rng = torch.are_deterministic_algorithms_enabled(), torch.get_rng_state()
    fill = torch.utils.deterministic.fill_uninitialized_memory  # type: ignore[attr-defined]
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill  # type: ignore[attr-defined]
        torch.set_rng_state(rng)


def train_tiny_run(root: Path, *extra: str) -> Path:
    """Train the tiny config for 2 steps an epoch under ``root`` -> the run folder."""
    from dinolab.config import load_config
    from dinolab.training.loop import train

    overrides = tiny_overrides(make_fashion_mnist(root / "fashion"), root / "run")
    with global_torch_state_kept():
        train(load_config(None, [*overrides, "train.limit_steps_per_epoch=2", *extra]))
    return root / "run"
