"""Bad files: skipped, replaced so the batch stays full, reported, fatal only when too many.

The folders hold the kinds of damage met in practice: random bytes under an image suffix, a
JPEG cut in half, an empty file, a text file named .png.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import global_torch_state_kept, tiny_overrides
from PIL import Image

from dinolab.cli import main
from dinolab.config import DataConfig, load_config
from dinolab.data.datasets import build_sources
from dinolab.data.images import DataError, ImageFiles, UnreadableImage
from dinolab.data.skipping import SKIPPED_FILES, SkipLog, read_or_replace
from dinolab.training.loop import train
from dinolab.training.pipeline import build_training_data


def _write_bad_files(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "whole.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 40, 3), np.uint8)).save(good)
    bad = {
        "random.jpg": np.random.default_rng(2).bytes(300),
        "truncated.jpg": good.read_bytes()[: len(good.read_bytes()) // 2],
        "empty.png": b"",
        "text.png": b"just some notes, not a picture\n",
    }
    for name, content in bad.items():
        (folder / name).write_bytes(content)
    good.unlink()
    return sorted(folder / name for name in bad)


def _bad_folder(root: Path, good_per_class: int = 14) -> list[Path]:
    """Two class folders of small images, four broken files among them -> the broken paths."""
    rng = np.random.default_rng(0)
    for name in ("circles", "squares"):
        (root / name).mkdir(parents=True)
        for index in range(good_per_class):
            pixels = rng.integers(0, 255, (32, 32, 3), np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index:02d}.png")
    return _write_bad_files(root / "circles")


def test_an_unreadable_sample_is_replaced_the_same_way_every_time(tmp_path: Path) -> None:
    bad = _bad_folder(tmp_path)
    files = build_sources(DataConfig(source="folder", root=str(tmp_path))).train
    index = files.paths.index(bad[0])  # type: ignore[attr-defined]
    image, skipped = read_or_replace(files, index, seed=123)
    again, _ = read_or_replace(files, index, seed=123)
    assert image is not None and again is not None
    assert skipped[0][0] == str(bad[0]) and "cannot identify" in skipped[0][1]
    assert np.array_equal(np.asarray(image), np.asarray(again))
    everything_bad = ImageFiles(bad, [-1] * len(bad))
    nothing, attempts = read_or_replace(everything_bad, 0, seed=0)
    assert nothing is None and len(attempts) == 101  # the sample and 100 replacements


def _training_config(data_root: Path, run_dir: Path, *extra: str):  # type: ignore[no-untyped-def]
    overrides = [item for item in tiny_overrides(data_root, run_dir)
                 if not item.startswith("data.source")]
    return load_config(None, [*overrides, "data.source=folder", *extra])


@pytest.mark.parametrize(("augmentation", "workers"), [("pil", 0), ("batched", 2)])
def test_batches_stay_full_and_the_skips_reach_the_main_process(
        tmp_path: Path, augmentation: str, workers: int, capsys: pytest.CaptureFixture[str]):
    bad = _bad_folder(tmp_path / "data")
    config = _training_config(tmp_path / "data", tmp_path / "run", "train.batch_size=8",
                              f"data.augmentation={augmentation}", f"data.num_workers={workers}",
                              "data.max_bad_fraction=0.5")
    (tmp_path / "run").mkdir()
    images = build_sources(config.data).train
    data = build_training_data(config, images, torch.device("cpu"))
    data.sampler.set_position(0)
    sizes = [len(data.views(batch, torch.device("cpu"), 0, position)[0])
             for position, batch in enumerate(data.loader)]
    assert sizes == [8] * 4  # 32 files // 8, every batch full
    listed = sorted(Path(line) for line in
                    (tmp_path / "run" / SKIPPED_FILES).read_text().splitlines())
    assert listed == bad  # each bad file is in this epoch's permutation exactly once
    assert data.skips.failed >= 4
    output = capsys.readouterr().out
    assert all(f"warning: skipped {path}" in output for path in bad)


def test_too_many_bad_samples_stop_with_one_line_naming_folder_and_examples(tmp_path: Path):
    log = SkipLog(tmp_path, "/data/photos", max_bad_fraction=0.01, epoch_size=1000,
                  warn=lambda line: None)
    log.record(64, [("/data/photos/a.jpg", "truncated")] * 3)
    log.record(64, [("/data/photos/b.jpg", "cannot identify image file")] * 7)  # 10: 1% of 1000
    with pytest.raises(DataError) as error:
        log.record(64, [("/data/photos/c.jpg", "broken")])
    message = str(error.value)
    assert "\n" not in message and "/data/photos" in message and "a.jpg (truncated)" in message
    assert "11 of 203 samples" in message and SKIPPED_FILES in message
    assert (tmp_path / SKIPPED_FILES).read_text().splitlines() == [
        "/data/photos/a.jpg", "/data/photos/b.jpg", "/data/photos/c.jpg"]


def test_a_folder_with_bad_files_trains_to_completion(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]):
    bad = _bad_folder(tmp_path / "data")
    config = _training_config(tmp_path / "data", tmp_path / "run", "data.max_bad_fraction=0.3")
    result = train(config)
    assert result.epochs_done == 2 and result.knn_end is not None  # k-NN read the folder too
    listed = sorted(Path(line) for line in
                    (tmp_path / "run" / SKIPPED_FILES).read_text().splitlines())
    assert listed == bad
    output = capsys.readouterr().out
    assert "warning: skipped" in output and "skipped so far" in output
    # metrics.jsonl counts the skips so far: at each epoch's end, and at the log steps (2 and 4,
    # the last step of each epoch) once there are any
    records = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, second = (r["skipped"] for r in records if r["kind"] == "epoch")
    assert {r["step"]: r["skipped"] for r in records if r["kind"] == "train"} == {2: first,
                                                                                   4: second}
    assert first >= len(bad) and second >= first + len(bad)  # every epoch reads each bad file
    assert second == output.count("warning: skipped ")  # one warning per skip, up to 10


def test_the_skip_count_goes_on_after_a_resume(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint keeps the totals: a run stopped after epoch 1 and resumed records the same
    counts as one run in one go (before, the resumed run counted afresh)."""
    from dinolab.training import loop

    _bad_folder(tmp_path / "data")

    def epoch_counts(run_dir: Path) -> list[int]:
        records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        return [record["skipped"] for record in records if record["kind"] == "epoch"]

    extra = "data.max_bad_fraction=0.3"
    train(_training_config(tmp_path / "data", tmp_path / "whole", extra))
    run_epoch = loop.run_epoch

    def stop_at_second_epoch(state: Any, *args: Any) -> loop.EpochResult:
        if state.epoch == 1:  # the epoch-1 checkpoint is written
            raise KeyboardInterrupt
        return run_epoch(state, *args)

    monkeypatch.setattr(loop, "run_epoch", stop_at_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(_training_config(tmp_path / "data", tmp_path / "resumed", extra))
    monkeypatch.setattr(loop, "run_epoch", run_epoch)
    assert train(_training_config(tmp_path / "data", tmp_path / "resumed", extra)).epochs_done == 2
    whole = epoch_counts(tmp_path / "whole")
    assert len(whole) == 2 and whole[1] > whole[0] > 0
    assert epoch_counts(tmp_path / "resumed") == whole


def test_a_folder_of_only_bad_files_stops_with_exit_status_2(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]):
    _write_bad_files(tmp_path / "data")
    overrides = [item for item in tiny_overrides(tmp_path / "data", tmp_path / "run")
                 if not item.startswith("data.source")]
    with global_torch_state_kept():
        status = main(["train", *overrides, "data.source=folder", "train.batch_size=2"])
    error = capsys.readouterr().err
    assert status == 2
    assert error.count("\n") == 1 and "no file in" in error and "decodes as an image" in error
    assert "Traceback" not in error


def test_evaluation_reads_a_broken_file_as_gray_with_its_label(tmp_path: Path) -> None:
    """Features stay aligned with the file list: one gray image, never an exception."""
    bad = _bad_folder(tmp_path)
    sources = build_sources(DataConfig(source="folder", root=str(tmp_path)))
    index = sources.train.paths.index(bad[1])  # type: ignore[attr-defined]
    image, label = sources.train[index]
    assert label == 0 and image.mode == "L" and image.getextrema() == (128, 128)
    with pytest.raises(UnreadableImage, match="cannot identify"):
        sources.train.read(index)  # type: ignore[attr-defined]


def test_the_pipeline_stops_when_the_bad_fraction_is_exceeded(tmp_path: Path) -> None:
    _bad_folder(tmp_path / "data")  # 4 bad of 32 files: 12% > the default 1%
    config = _training_config(tmp_path / "data", tmp_path / "run", "train.batch_size=8")
    (tmp_path / "run").mkdir()
    data = build_training_data(config, build_sources(config.data).train, torch.device("cpu"))
    data.sampler.set_position(0)
    with pytest.raises(DataError, match=f"max_bad_fraction=0.01\\) in {tmp_path / 'data'}; e.g."):
        for position, batch in enumerate(data.loader):
            data.views(batch, torch.device("cpu"), 0, position)
