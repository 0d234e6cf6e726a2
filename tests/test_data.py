"""Data sources, the multi-crop transform and the resumable sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_fashion_mnist, write_idx
from PIL import Image

from dinolab.config import ConfigError, DataConfig
from dinolab.data import images as images_module
from dinolab.data import transforms
from dinolab.data.datasets import build_sources, read_idx
from dinolab.data.images import DataError, rgb_or_gray
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
    (views, skipped), (again, _) = dataset[(4, 0)], dataset[(4, 0)]
    other_epoch, _ = dataset[(4, 1)]
    assert skipped == [] and torch.equal(views[0], again[0])
    assert not torch.equal(views[0], other_epoch[0])


def _save_in_every_format_and_mode(root: Path) -> dict[str, str]:
    """One file per suffix and per mode PIL writes -> {relative path: expected mode}."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (12, 16, 3), np.uint8))
    files = {
        "a.jpg": (rgb, "RGB"), "b.jpeg": (rgb, "RGB"), "c.png": (rgb, "RGB"),
        "d.webp": (rgb, "RGB"), "e.bmp": (rgb, "RGB"), "f.tif": (rgb, "RGB"),
        "deep/er/g.TIFF": (rgb, "RGB"),
        "gray.png": (rgb.convert("L"), "L"),
        "palette.gif": (rgb.convert("P"), "RGB"),
        "rgba.png": (rgb.convert("RGBA"), "RGB"),
        "cmyk.jpg": (rgb.convert("CMYK"), "RGB"),
        "sixteen.png": (Image.fromarray((np.arange(192).reshape(12, 16) * 300).astype(np.uint16)),
                        "L"),
    }
    for name, (image, _) in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / name)
    return {name: mode for name, (_, mode) in files.items()}


def test_folder_reads_every_format_and_mode_at_any_depth(tmp_path: Path) -> None:
    expected = _save_in_every_format_and_mode(tmp_path)
    for hidden in (".hidden.png", ".cache/x.png", "sub/._y.jpg"):
        (tmp_path / hidden).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / hidden, format="PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub" / "data.npy").write_bytes(b"\0" * 8)
    sources = build_sources(DataConfig(source="folder", root=str(tmp_path)))
    found = {str(path.relative_to(tmp_path)): index
             for index, path in enumerate(sources.train.paths)}  # type: ignore[attr-defined]
    assert set(found) == set(expected)
    for name, mode in expected.items():
        image, label = sources.train[found[name]]
        assert (image.mode, image.size, label) == (mode, (16, 12), -1), name
    sixteen = np.asarray(sources.train[found["sixteen.png"]][0])
    assert sixteen.max() == (191 * 300) // 257  # scaled to 8 bits, not clipped at 255
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert rgb_or_gray(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white


def test_gif_reads_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    image, _ = build_sources(DataConfig(source="folder", root=str(tmp_path))).train[0]
    assert image.getpixel((0, 0)) == (255, 0, 0)


def _write_sideways_photo(path: Path) -> Path:
    """A phone's portrait photo as stored: the sensor's 32x16 (W x H) pixels, dark on the left,
    and EXIF Orientation 6 (rotate 90 degrees clockwise to view: 16x32, dark on top)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((16, 32, 3), 230, np.uint8)
    pixels[:, :16] = 20
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    return path


def test_photos_are_decoded_upright_on_every_path(tmp_path: Path) -> None:
    """Training (pil and batched views both read through read_or_replace), evaluation (the
    Dataset's items) and the attention and feature maps (read_images) see the photo upright."""
    from dinolab.data.loader import DecodedImages
    from dinolab.data.skipping import read_or_replace
    from dinolab.visualization.images import read_images

    path = _write_sideways_photo(tmp_path / "photos" / "portrait.jpg")
    files = build_sources(DataConfig(source="folder", root=str(tmp_path / "photos"))).train
    training, _ = read_or_replace(files, 0, seed=0)
    evaluation, _ = files[0]
    batched, _ = DecodedImages(files)[(0, 0)]
    assert training is not None and batched is not None
    for image in (training, evaluation, read_images([path])[0]):
        assert image.size == (16, 32)
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
        assert pixels[:16].mean() < 40 and pixels[16:].mean() > 210  # the dark half on top
    assert batched.shape == (3, 32, 16)


def test_a_users_dataset_of_opened_photos_is_turned_upright(tmp_path: Path) -> None:
    """train(dataset=...) items are opened by the user, EXIF tag and all: the training reader and
    both transforms see them upright, and the user's image object is left as it was."""
    from dinolab.data.skipping import read_or_replace
    from dinolab.data.transforms import EvalTransform, MultiCropTransform

    photo = Image.open(_write_sideways_photo(tmp_path / "portrait.jpg"))
    image, _ = read_or_replace([(photo, 0)], 0, seed=0)  # type: ignore[arg-type]
    assert image is not None and image.size == (16, 32)
    pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels[:16].mean() < 40 and pixels[16:].mean() > 210  # the dark half on top
    config = DataConfig(global_crop_size=32, local_crop_size=16, num_local_crops=0,
                        global_crop_scale=(1.0, 1.0), eval_resize_ratio=1.0, flip_prob=0.0,
                        color_jitter_prob=0.0, grayscale_prob=0.0, blur_probs=(0.0, 0.0, 0.0),
                        solarize_prob=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    for view in (EvalTransform(config)(photo),
                 MultiCropTransform(config)(photo, torch.Generator().manual_seed(0))[0]):
        gray = view.mean(dim=0)  # [32, 32]: the 16x32 upright photo stretched to a square
        assert gray[:12].mean() < 0.2 and gray[20:].mean() > 0.8, "not upright"
    assert photo.size == (32, 16)  # the user's object: still as stored


@pytest.mark.parametrize("make", ["missing", "empty", "only_other_files", "none_decodes"])
def test_unusable_folders_stop_with_one_line(tmp_path: Path, make: str) -> None:
    root = tmp_path / "photos"
    if make != "missing":
        root.mkdir()
    if make == "only_other_files":
        (root / "readme.txt").write_text("hello")
    if make == "none_decodes":
        (root / "a.jpg").write_bytes(b"")
        (root / "b.png").write_text("not a png")
    expected = {"missing": "folder not found", "empty": "no images in",
                "only_other_files": "no images in", "none_decodes": "no file in .* decodes"}[make]
    with pytest.raises(DataError, match=expected) as error:
        build_sources(DataConfig(source="folder", root=str(root)))
    assert "\n" not in str(error.value)


def test_the_start_probe_decodes_a_sample_never_the_whole_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[Path] = []
    original = images_module.decode_image
    monkeypatch.setattr(images_module, "decode_image",
                        lambda path: decoded.append(path) or original(path))
    broken, healthy = tmp_path / "broken", tmp_path / "healthy"
    broken.mkdir(), healthy.mkdir()
    for index in range(200):
        (broken / f"{index:03d}.png").write_bytes(b"broken" if index % 2 else b"")
        Image.new("L", (4, 4)).save(healthy / f"{index:03d}.png")
    with pytest.raises(DataError, match="none of 32 files sampled from .*broken"):
        build_sources(DataConfig(source="folder", root=str(broken)))
    assert len(decoded) == 32
    decoded.clear()
    build_sources(DataConfig(source="folder", root=str(healthy)))
    assert len(decoded) == 1  # healthy data: one file decoded at start


def test_pil_path_keeps_grayscale_single_channel_to_the_end(monkeypatch: pytest.MonkeyPatch):
    """One channel through crop, jitter, blur and solarize; three only after normalisation."""
    modes: list[str] = []
    original = transforms.F.pil_to_tensor
    monkeypatch.setattr(transforms.F, "pil_to_tensor",
                        lambda image: modes.append(image.mode) or original(image))
    config = DataConfig(global_crop_size=28, local_crop_size=14, num_local_crops=2)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), np.uint8), "L")
    views = MultiCropTransform(config)(image, torch.Generator().manual_seed(0))
    assert modes == ["L"] * 4 and all(view.shape[0] == 3 for view in views)
