"""data.source=hf: Hugging Face datasets saved with save_to_disk or written as parquet files.

The strongest check is an equivalence: the same images as a folder of class folders and as a
saved Dataset (rows in the folder's sorted order, the same corrupt file among them) train the
same run bit for bit, with the same skips counted, because both sources hand the loader the
same images under the same indices. The Hub itself is out of reach here: only its one-line
error without a network is tested.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
from conftest import global_torch_state_kept, tiny_overrides
from PIL import Image
from test_resume import WITH_DROP_PATH, assert_same_training_state, checkpoint

from dinolab.cli import main
from dinolab.config import ConfigError, DataConfig, load_config
from dinolab.data.datasets import build_sources
from dinolab.data.images import DataError, DatasetRows
from dinolab.data.skipping import SKIPPED_FILES
from dinolab.training import loop

CLASSES = ("a", "b")
PER_CLASS = 16  # 32 images: 2 steps of 16, every image read in every epoch
CORRUPT = 3  # the row (and the folder's sorted file) that is not an image
NOT_AN_IMAGE = b"just some notes, not a picture\n"


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_dataset converts parquet files into Arrow files in its cache: the test's own."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def png(label: int, seed: int) -> bytes:
    """A 28x28 grayscale image: noise with a bright square in the label's corner."""
    pixels = np.random.default_rng(seed).integers(0, 60, (28, 28))
    pixels[label * 14 + 2: label * 14 + 12, label * 14 + 2: label * 14 + 12] += 180
    encoded = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(encoded, "PNG")
    return encoded.getvalue()


def rows(count_per_class: int = PER_CLASS, seed: int = 0) -> dict[str, list[Any]]:
    """Rows sorted by class, as a folder of class folders lists them; row CORRUPT is broken."""
    labels = [label for label in range(len(CLASSES)) for _ in range(count_per_class)]
    images = [png(label, seed + index) for index, label in enumerate(labels)]
    images[CORRUPT] = NOT_AN_IMAGE
    return {"image": [{"bytes": image, "path": None} for image in images], "label": labels}


FEATURES = datasets.Features({"image": datasets.Image(),
                              "label": datasets.ClassLabel(names=list(CLASSES))})


def saved_dataset(root: Path) -> Path:
    datasets.Dataset.from_dict(rows(), features=FEATURES).save_to_disk(str(root))
    return root


def same_images_as_folder(root: Path) -> Path:
    for index, (image, label) in enumerate(zip(*rows().values(), strict=True)):
        (root / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        (root / CLASSES[label] / f"{index:02d}.png").write_bytes(image["bytes"])
    return root


def config_for(source: str, data_root: Path, run_dir: Path, *extra: str) -> Any:
    overrides = [item for item in tiny_overrides(data_root, run_dir)
                 if not item.startswith("data.source")]
    return load_config(None, [*overrides, f"data.source={source}", *WITH_DROP_PATH,
                              "data.max_bad_fraction=0.1", *extra])


def epoch_skips(run_dir: Path) -> list[int]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [record["skipped"] for record in records if record["kind"] == "epoch"]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the saved Dataset, the folder of a run on it done in one go)."""
    root = tmp_path_factory.mktemp("hf")
    data = saved_dataset(root / "saved")
    with global_torch_state_kept():
        result = loop.train(config_for("hf", data, root / "run"))
    assert result.epochs_done == 2 and result.knn_end is not None
    return data, root / "run"


def test_a_saved_dataset_trains_as_the_folder_of_its_images(
        saved_run: tuple[Path, Path], tmp_path: Path) -> None:
    data, run_dir = saved_run
    folder = same_images_as_folder(tmp_path / "folder")
    with global_torch_state_kept():
        loop.train(config_for("folder", folder, tmp_path / "run"))
    assert_same_training_state(checkpoint(run_dir), checkpoint(tmp_path / "run"))
    skips = epoch_skips(run_dir)
    assert skips == epoch_skips(tmp_path / "run") and skips[1] > skips[0] > 0
    assert (run_dir / SKIPPED_FILES).read_text().splitlines() == [f"{data} row {CORRUPT}"]


def test_an_interrupted_run_resumes_exactly(saved_run: tuple[Path, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    data, whole = saved_run
    run_epoch = loop.run_epoch

    def stop_at_second_epoch(state: Any, *args: Any) -> loop.EpochResult:
        if state.epoch == 1:  # the epoch-1 checkpoint is written; the process "dies" here
            raise KeyboardInterrupt
        return run_epoch(state, *args)

    config = config_for("hf", data, tmp_path / "run")
    monkeypatch.setattr(loop, "run_epoch", stop_at_second_epoch)
    with global_torch_state_kept(), pytest.raises(KeyboardInterrupt):
        loop.train(config)
    assert checkpoint(tmp_path / "run")["epoch"] == 1
    monkeypatch.setattr(loop, "run_epoch", run_epoch)
    with global_torch_state_kept():
        assert loop.train(config).epochs_done == 2
    assert_same_training_state(checkpoint(tmp_path / "run"), checkpoint(whole))
    assert epoch_skips(tmp_path / "run") == epoch_skips(whole)


def test_a_parquet_folder_trains_with_k_nn_from_train_against_test(tmp_path: Path) -> None:
    folder = tmp_path / "parquet"
    folder.mkdir()
    datasets.Dataset.from_dict(rows(), features=FEATURES).to_parquet(
        str(folder / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_dict(rows(4, seed=100), features=FEATURES).to_parquet(
        str(folder / "test-00000-of-00001.parquet"))
    sources = build_sources(DataConfig(source="hf", root=str(folder)))
    assert (len(sources.train), len(sources.knn_test)) == (32, 8)  # type: ignore[arg-type]
    assert sources.knn_train is sources.train
    with global_torch_state_kept():
        result = loop.train(config_for("hf", folder, tmp_path / "run"))
    assert result.epochs_done == 2 and result.knn_end is not None
    assert f"[train] row {CORRUPT}" in (tmp_path / "run" / SKIPPED_FILES).read_text()


def test_a_corrupt_row_is_read_as_gray_by_evaluation_and_skipped_by_training(
        tmp_path: Path) -> None:
    train = build_sources(DataConfig(source="hf", root=str(saved_dataset(tmp_path / "s")))).train
    assert isinstance(train, DatasetRows)
    image, label = train[CORRUPT]
    assert (image.mode, label, np.asarray(image).max()) == ("L", 0, 128)
    with pytest.raises(Exception, match=rf"row {CORRUPT}: cannot identify image file$"):
        train.read(CORRUPT)


def test_the_columns_are_found_and_named_by_the_keys(tmp_path: Path) -> None:
    """The first Image column and the ClassLabel column by themselves; data.image_column and
    data.label_column choose others; {bytes, path} structs (parquet written by another tool)
    and label names (indices in sorted order) work too."""
    count = 8
    images = [{"bytes": png(index % 2, index), "path": None} for index in range(count)]
    features = datasets.Features({
        "caption": datasets.Value("string"), "picture": datasets.Image(),
        "thumbnail": datasets.Image(), "kind": datasets.ClassLabel(names=["x", "y"]),
        "encoded": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
        "label": datasets.Value("string")})
    datasets.Dataset.from_dict({
        "caption": ["text"] * count, "picture": images, "thumbnail": images[::-1],
        "kind": [1 - index % 2 for index in range(count)], "encoded": images,
        "label": ["dog" if index % 2 else "cat" for index in range(count)],
    }, features=features).save_to_disk(str(tmp_path / "set"))

    def train(**keys: str) -> DatasetRows:
        found = build_sources(DataConfig(source="hf", root=str(tmp_path / "set"), **keys)).train
        assert isinstance(found, DatasetRows)
        return found

    found = train()
    assert (found.column, found.labels.tolist()) == ("picture", [1, 0] * 4)  # kind
    chosen = train(image_column="encoded", label_column="label")
    assert (chosen.column, chosen.labels.tolist()) == ("encoded", [0, 1] * 4)  # cat, dog
    assert np.array_equal(np.asarray(chosen.read(5)[0]), np.asarray(found.read(5)[0]))
    for key, value, message in [("image_column", "caption", "'caption' holds .*, not images"),
                                ("image_column", "photo", "has no column 'photo'"),
                                ("label_column", "encoded", "no column 'encoded' of one")]:
        with pytest.raises(DataError, match=f"data.{key}: .*{message}") as error:
            train(**{key: value})
        assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="data.image_column: only data.source=hf"):
        load_config(None, ["data.source=folder", "data.image_column=picture"])


def test_splits_choose_what_is_trained_on(tmp_path: Path) -> None:
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(rows(4), features=FEATURES),
        "unlabelled": datasets.Dataset.from_dict(
            {"image": rows(6)["image"], "label": [-1] * 12}, features=FEATURES),
        "validation": datasets.Dataset.from_dict(rows(2, seed=50), features=FEATURES),
    }).save_to_disk(str(tmp_path / "dict"))
    config = DataConfig(source="hf", root=str(tmp_path / "dict"), split="unlabelled")
    sources = build_sources(config)
    assert [len(part) for part in (sources.train, sources.knn_train, sources.knn_test)] == [
        12, 8, 4]  # type: ignore[arg-type]
    config.split = "test"
    with pytest.raises(DataError, match="data.split: .* no split 'test' .*train, unlabelled"):
        build_sources(config)


def test_the_hub_without_a_network_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="cannot load 'someone/some-images' from the Hugging "
                                        "Face Hub") as error:
        build_sources(DataConfig(source="hf", root="someone/some-images"))
    assert "\n" not in str(error.value)


def test_without_the_datasets_package_train_stops_in_one_line_before_any_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    overrides = [item for item in tiny_overrides(tmp_path / "data", tmp_path / "run")
                 if not item.startswith("data.source")]
    with global_torch_state_kept():
        status = main(["train", *overrides, "data.source=hf"])
    error = capsys.readouterr().err
    assert status == 2 and not (tmp_path / "run").exists()
    assert error.count("\n") == 1 and "pip install 'dinolab[hf]'" in error
