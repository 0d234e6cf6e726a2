"""Data sources, the multi-crop transform and the resumable sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_fashion_mnist, write_idx
from PIL import Image

from dinolab.config import ConfigError, DataConfig
from dinolab.data.datasets import build_sources, read_idx
from dinolab.data.loader import EpochSampler, MultiCropDataset
from dinolab.data.transforms import MultiCropTransform, random_resized_crop_box


def test_read_idx_round_trip(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", array)
    assert np.array_equal(read_idx(tmp_path / "x.gz"), array)


@pytest.mark.parametrize("layout", ["", "FashionMNIST/raw"])
def test_fashion_mnist_found_in_root_and_torchvision_layout(tmp_path: Path, layout: str) -> None:
    make_fashion_mnist(tmp_path / layout, num_train=20, num_test=8)
    sources = build_sources(DataConfig(source="fashion-mnist", root=str(tmp_path)))
    assert len(sources.train) == 20 and len(sources.knn_test) == 8  # type: ignore[arg-type]
    image, label = sources.train[3]
    assert image.size == (28, 28) and image.mode == "L" and 0 <= label < 4


def test_fashion_mnist_missing_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.root"):
        build_sources(DataConfig(source="fashion-mnist", root=str(tmp_path / "absent")))
    with pytest.raises(ConfigError, match="no Fashion-MNIST"):
        build_sources(DataConfig(source="fashion-mnist", root=str(tmp_path)))


def test_folder_labels_inferred_from_class_folders(tmp_path: Path) -> None:
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for index in range(5):
            Image.new("RGB", (20, 16), (index * 40, 0, 0)).save(tmp_path / name / f"{index}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    sources = build_sources(DataConfig(source="folder", root=str(tmp_path)))
    assert len(sources.train) == 10  # type: ignore[arg-type]
    labels = {sources.train[i][1] for i in range(10)}
    assert labels == {0, 1}
    assert sources.knn_train is not None and sources.knn_test is not None
    assert len(sources.knn_train) + len(sources.knn_test) == 10  # type: ignore[arg-type]


def test_folder_without_classes_is_unlabelled(tmp_path: Path) -> None:
    for index in range(3):
        Image.new("RGB", (20, 16)).save(tmp_path / f"{index}.jpg")
    sources = build_sources(DataConfig(source="folder", root=str(tmp_path)))
    assert sources.knn_train is None and sources.train[0][1] == -1


def test_multicrop_views_sizes_and_determinism() -> None:
    config = DataConfig(global_crop_size=32, local_crop_size=16, num_local_crops=3)
    transform = MultiCropTransform(config)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), np.uint8))
    views = transform(image, torch.Generator().manual_seed(1))
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    again = transform(image, torch.Generator().manual_seed(1))
    other = transform(image, torch.Generator().manual_seed(2))
    assert all(torch.equal(a, b) for a, b in zip(views, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(views, other, strict=True))


def test_grayscale_image_gives_three_equal_channels_before_normalisation() -> None:
    config = DataConfig(global_crop_size=28, local_crop_size=14, num_local_crops=1,
                        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), np.uint8), "L")
    for view in MultiCropTransform(config)(image, torch.Generator().manual_seed(0)):
        assert torch.equal(view[0], view[1]) and torch.equal(view[1], view[2])


def test_crop_box_within_image_and_scale() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, height, width = random_resized_crop_box(50, 40, (0.2, 0.5), generator)
        assert 0 <= top and top + height <= 40 and 0 <= left and left + width <= 50
        assert 0.15 <= height * width / 2000 <= 0.55  # rounding widens the range slightly


def test_sampler_shards_are_disjoint_and_resume_continues() -> None:
    shards = [list(EpochSampler(103, 8, seed=3, rank=r, world_size=2)) for r in range(2)]
    indices = [index for shard in shards for index, _ in shard]
    assert len(shards[0]) == len(shards[1]) == 48  # 103 // 16 batches of 8 per process
    assert len(set(indices)) == len(indices)
    sampler = EpochSampler(103, 8, seed=3, rank=0, world_size=2)
    sampler.set_position(epoch=0, start=16)
    assert list(sampler) == shards[0][16:]
    sampler.set_position(epoch=1)
    assert [i for i, _ in sampler] != [i for i, _ in shards[0]]


def test_multicrop_dataset_views_depend_on_epoch_only_through_the_key(tmp_path: Path) -> None:
    make_fashion_mnist(tmp_path, num_train=10, num_test=4)
    sources = build_sources(DataConfig(source="fashion-mnist", root=str(tmp_path)))
    config = DataConfig(global_crop_size=28, local_crop_size=14, num_local_crops=1)
    dataset = MultiCropDataset(sources.train, MultiCropTransform(config), seed=0)
    assert torch.equal(dataset[(4, 0)][0], dataset[(4, 0)][0])
    assert not torch.equal(dataset[(4, 0)][0], dataset[(4, 1)][0])
