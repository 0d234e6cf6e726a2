"""data.decode=device on the CPU: the same batches, skips and runs as data.decode=workers.

torchvision's ``decode_jpeg`` on the CPU and PIL both decode with libjpeg-turbo's defaults
(islow IDCT, fancy upsampling), so the canvases are compared bit for bit: any difference is a
placement, orientation, channel or padding mistake, never rounding. (On CUDA nvJPEG's IDCT may
differ by a few levels: test_cuda.py.)

The folder holds what a photo folder holds: JPEGs of different sizes, some turned by their
EXIF orientation, some grayscale, a PNG, and three broken files: one cut short (no end marker:
the worker decodes it and fails), one that is not an image, and one whose header is whole but
whose data is not (only the decoder finds out: the main process skips it).
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.io
from conftest import global_torch_state_kept, tiny_overrides
from PIL import Image
from test_resume import assert_same_training_state

from dinolab.config import Config, ConfigError, load_config
from dinolab.data.datasets import build_sources
from dinolab.data.device_decode import EncodedJpeg, JpegDecoder, read_jpeg
from dinolab.data.images import ImageFiles, decode_image
from dinolab.data.skipping import SKIPPED_FILES, candidates
from dinolab.training import loop
from dinolab.training.checkpoint import LATEST
from dinolab.training.pipeline import TrainingData, build_training_data

CPU = torch.device("cpu")
BATCH = 4


def _photo(rng: np.random.Generator, height: int, width: int, gray: bool) -> Image.Image:
    """Smooth colour (or gray) fields with some texture: what a JPEG usually holds."""
    coarse = rng.integers(0, 256, (4, 4) if gray else (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    noise = rng.integers(-20, 21, np.asarray(image).shape)
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def _save_jpeg(image: Image.Image, path: Path, orientation: int = 1) -> Path:
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    image.save(path, "JPEG", quality=90, exif=exif)
    return path


def _broken_inside(jpeg: bytes) -> bytes:
    """A JPEG whose header parses (PIL opens it) but whose Huffman table is zeros: no decoder
    gets through its data. It still ends in the end-of-image marker."""
    table = jpeg.index(b"\xff\xc4")
    return jpeg[: table + 4] + bytes(30) + jpeg[table + 34:]


def _photo_folder(root: Path) -> list[Path]:
    """16 files: 12 JPEGs (orientations 3, 6 and 8 among them; 3 grayscale), a PNG and three
    broken files -> the broken ones."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shapes = [(30, 44), (52, 36), (40, 40), (28, 60), (64, 48), (33, 47), (45, 29), (38, 56),
              (50, 50)]
    orientations = [1, 6, 1, 8, 1, 3, 6, 1, 1]
    for number, ((height, width), turn) in enumerate(zip(shapes, orientations, strict=True)):
        _save_jpeg(_photo(rng, height, width, False), root / f"colour_{number}.jpg", turn)
    for number, ((height, width), turn) in enumerate([((36, 52), 1), ((48, 30), 8),
                                                      ((41, 41), 1)]):
        _save_jpeg(_photo(rng, height, width, True), root / f"gray_{number}.jpg", turn)
    _photo(rng, 34, 46, False).save(root / "drawing.png")
    whole = io.BytesIO()
    _photo(rng, 40, 40, False).save(whole, "JPEG", quality=90)
    broken = {"cut_short.jpg": whole.getvalue()[: len(whole.getvalue()) // 2],
              "notes.jpg": b"not a picture, just notes\n",
              "broken_inside.jpg": _broken_inside(whole.getvalue())}
    for name, content in broken.items():
        (root / name).write_bytes(content)
    return sorted(root / name for name in broken)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("photos") / "photos"
    return root, _photo_folder(root)


def _config(photos: Path, run_dir: Path, decode: str, *extra: str) -> Config:
    overrides = [item for item in tiny_overrides(photos, run_dir)
                 if not item.startswith("data.source")]
    return load_config(None, [*overrides, "data.source=folder", "data.augmentation=batched",
                              f"data.decode={decode}", f"train.batch_size={BATCH}",
                              "data.max_bad_fraction=0.5", "train.device=cpu", *extra])


def _pipeline(config: Config) -> TrainingData:
    Path(config.run.dir).mkdir(parents=True, exist_ok=True)
    data = build_training_data(config, build_sources(config.data).train, CPU)
    data.sampler.set_position(1)
    return data


@pytest.mark.parametrize("orientation", range(1, 9))
def test_each_exif_orientation_comes_out_as_decode_image_turns_it(tmp_path: Path,
                                                                  orientation: int) -> None:
    rng = np.random.default_rng(orientation)
    for gray in (False, True):
        path = _save_jpeg(_photo(rng, 24, 40, gray), tmp_path / f"{gray}.jpg", orientation)
        jpeg = read_jpeg(path, 0)
        assert jpeg is not None and jpeg.orientation == orientation
        expected = torch.from_numpy(np.array(decode_image(path))).reshape(
            jpeg.height, jpeg.width, -1).permute(2, 0, 1)
        (canvas, sizes), skipped = JpegDecoder(ImageFiles([path], [-1]))([jpeg], CPU)
        assert skipped == [] and sizes.tolist() == [list(expected.shape[1:])]
        assert torch.equal(canvas[0], expected)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_same_canvases_views_and_skips_as_the_workers_decode(
        photos: tuple[Path, list[Path]], tmp_path: Path, workers: int,
        capsys: pytest.CaptureFixture[str]) -> None:
    root, broken = photos
    on_workers = _pipeline(_config(root, tmp_path / "workers", "workers",
                                   f"data.num_workers={workers}"))
    on_device = _pipeline(_config(root, tmp_path / "device", "device",
                                  f"data.num_workers={workers}"))
    assert on_device.decode is not None
    encoded, skipped_in_main = 0, []
    for position, (theirs, ours) in enumerate(zip(on_workers.loader, on_device.loader,
                                                  strict=True)):
        (images, sizes), skipped = theirs
        items, worker_skips = ours
        encoded += sum(isinstance(item, EncodedJpeg) for item in items)
        (our_images, our_sizes), decode_skips = on_device.decode(items, CPU)
        assert torch.equal(our_images, images) and torch.equal(our_sizes, sizes)
        assert worker_skips + decode_skips == skipped  # the same files, reasons and order
        skipped_in_main += [where for where, _ in decode_skips]
        their_views = on_workers.views(theirs, CPU, 1, position)
        our_views = on_device.views(ours, CPU, 1, position)
        assert all(torch.equal(a, b) for a, b in zip(their_views, our_views, strict=True))
    assert encoded >= 10  # most JPEGs did travel undecoded (not a test of the worker path)
    assert set(skipped_in_main) == {str(root / "broken_inside.jpg")}  # found by the decoder
    assert on_device.skips.failed == on_workers.skips.failed >= len(broken)
    for run in ("workers", "device"):
        listed = sorted(Path(line) for line in
                        (tmp_path / run / SKIPPED_FILES).read_text().splitlines())
        assert listed == broken
    assert f"warning: skipped {root / 'broken_inside.jpg'}" in capsys.readouterr().out


def test_a_file_the_device_cannot_decode_is_decoded_with_pil_or_skipped(
        photos: tuple[Path, list[Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The batched call raises -> one call per file; a file that fails alone is decoded with
    PIL; one PIL cannot read either is replaced by the next file of its sample's sequence."""
    root, _ = photos
    files = build_sources(_config(root, root / "unused", "device").data).train
    assert isinstance(files, ImageFiles)
    chosen = [files.paths.index(root / name) for name in
              ("colour_1.jpg", "gray_1.jpg", "broken_inside.jpg", "colour_2.jpg")]
    jpegs = [read_jpeg(files.paths[index], index) for index in chosen]
    assert all(jpeg is not None for jpeg in jpegs)
    unsupported = jpegs[1].data  # type: ignore[union-attr]
    real_decode = torchvision.io.decode_jpeg

    def no_batches_and_not_that_file(data, **options):  # type: ignore[no-untyped-def]
        if isinstance(data, list) or data is unsupported:
            raise RuntimeError("the device cannot")
        return real_decode(data, **options)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", no_batches_and_not_that_file)
    broken = chosen[2]
    seed = next(seed for seed in range(100)  # a seed whose first replacement is a whole file
                if _first_replacement(files, broken, seed).stem.startswith(("colour", "gray")))
    items = [jpeg._replace(seed=seed) for jpeg in jpegs]  # type: ignore[union-attr]
    decoded, skipped = JpegDecoder(files)(items, CPU)  # type: ignore[arg-type]
    assert decoded is not None
    canvas, sizes = decoded
    assert [where for where, _ in skipped] == [str(files.paths[broken])]
    assert "broken data stream" in skipped[0][1]  # PIL's reason, as a worker reports it
    expected_files = [files.paths[index] for index in chosen]
    expected_files[2] = _first_replacement(files, broken, seed)
    for slot, path in enumerate(expected_files):
        expected = torch.from_numpy(np.array(decode_image(path).convert("RGB"))).permute(2, 0, 1)
        height, width = expected.shape[1:]
        assert sizes[slot].tolist() == [height, width]
        assert torch.equal(canvas[slot, :, :height, :width], expected)


def _first_replacement(files: ImageFiles, index: int, seed: int) -> Path:
    return files.paths[list(itertools.islice(candidates(len(files), index, seed), 2))[1]]


def test_a_resumed_run_equals_an_uninterrupted_one_and_the_workers_run(
        photos: tuple[Path, list[Path]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU the canvases are the same bit for bit, so the whole run is too; stopped after
    epoch 1 and resumed, it ends where the uninterrupted run ends."""
    root, _ = photos
    with global_torch_state_kept():
        loop.train(_config(root, tmp_path / "workers", "workers"))
        loop.train(_config(root, tmp_path / "device", "device"))
        run_epoch = loop.run_epoch

        def stop_at_second_epoch(state, *arguments):  # type: ignore[no-untyped-def]
            if state.epoch == 1:
                raise KeyboardInterrupt
            return run_epoch(state, *arguments)

        monkeypatch.setattr(loop, "run_epoch", stop_at_second_epoch)
        resumed = _config(root, tmp_path / "resumed", "device")
        with pytest.raises(KeyboardInterrupt):
            loop.train(resumed)
        monkeypatch.setattr(loop, "run_epoch", run_epoch)
        assert loop.train(resumed).epochs_done == 2
    load = lambda run: torch.load(tmp_path / run / LATEST, weights_only=True)  # noqa: E731
    assert load("resumed")["step"] == 2 * (16 // BATCH)
    assert_same_training_state(load("resumed"), load("device"))
    assert_same_training_state(load("device"), load("workers"))


def test_device_decode_needs_the_batched_augmentation(photos: tuple[Path, list[Path]],
                                                      tmp_path: Path) -> None:
    """auto is pil on a CPU: a run on train.device=auto finds out once the device is known,
    before it writes anything (a corrected rerun must not meet a saved config)."""
    root, _ = photos
    config = _config(root, tmp_path / "run", "device", "data.augmentation=auto",
                     "train.device=auto")
    with pytest.raises(ConfigError, match=r"^invalid value for data.decode: .*pil on cpu\)$"):
        build_training_data(config, build_sources(config.data).train, CPU)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^invalid value for data.decode"):
            loop.train(config)
        assert not (tmp_path / "run").exists()
