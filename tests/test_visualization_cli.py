"""``dinolab attention|features|plot`` on tiny real runs: files a user can open, one-line errors
with exit status 2, and attention images in TensorBoard from the training loop itself."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import global_torch_state_kept, make_fashion_mnist, tiny_overrides
from PIL import Image

from dinolab.cli import main
from dinolab.config import load_config

CNN_ONLY = ("model.backbone_kwargs", "model.patch_size")  # ViT keywords a CNN does not take


def _train(data_root: Path, run_dir: Path, extra: list[str], cnn: bool = False) -> Path:
    from dinolab.training.loop import train

    overrides = [item for item in tiny_overrides(data_root, run_dir)
                 if not (cnn and item.startswith(CNN_ONLY))]
    train(load_config(None, overrides + ["train.epochs=1", "train.limit_steps_per_epoch=2",
                                         *extra]))
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A one-block ViT run (TensorBoard on) and a CNN run, two steps each (about a second)."""
    folder = tmp_path_factory.mktemp("runs")
    data_root = make_fashion_mnist(folder / "fashion")
    with global_torch_state_kept():
        return {
            "vit": _train(data_root, folder / "vit", ["run.tensorboard=true"]),
            "cnn": _train(data_root, folder / "cnn", ["model.backbone=test_resnet"], cnn=True),
        }


@pytest.fixture
def images(tmp_path: Path) -> list[str]:
    """A grayscale 28 px image like the training data, and a larger colour photo-like one."""
    rng = np.random.default_rng(0)
    gray, colour = tmp_path / "shoe.png", tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(gray)
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(colour)
    return [str(gray), str(colour)]


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as picture:
        picture.load()  # decodes the whole file
        return picture.size


def _one_error_line(capsys: pytest.CaptureFixture[str], status: int, *words: str) -> None:
    lines = capsys.readouterr().err.splitlines()
    assert status == 2
    assert len(lines) == 1 and lines[0].startswith("dinolab: error:"), lines
    for word in words:
        assert word in lines[0]


def test_attention_command(runs: dict[str, Path], images: list[str], tmp_path: Path) -> None:
    out = tmp_path / "attention"
    assert main(["attention", str(runs["vit"]), *images, "--out", str(out)]) == 0
    for stem in ("shoe", "photo"):  # 2 heads: mean, head0, head1, each with an overlay
        for name in ("mean", "head0", "head1", "mean_overlay", "head1_overlay"):
            assert _size(out / f"{stem}_attention_{name}.png") == (224, 224)  # 28 px, 8x
    assert _size(out / "attention_grid.png") == (5 * 224 + 4 * 2, 2 * 224 + 2)
    # Another resolution (the run's ViT has dynamic_img_size) and threshold.
    assert main(["attention", str(runs["vit"]), images[1], "--out", str(out), "--size", "280",
                 "--threshold", "0.9"]) == 0
    assert _size(out / "photo_attention_mean_overlay.png") == (280, 280)  # not enlarged


def test_features_command(runs: dict[str, Path], images: list[str], tmp_path: Path) -> None:
    for backbone in ("vit", "cnn"):
        out = tmp_path / backbone
        assert main(["features", str(runs[backbone]), *images, "--out", str(out),
                     "--size", "56"]) == 0
        assert _size(out / "shoe_features.png") == (224, 224)  # 56 px, 4x
        assert _size(out / "features_grid.png") == (3 * 224 + 2 * 2, 2 * 224 + 2)


def test_attention_of_a_cnn_is_one_line_and_exit_2(runs: dict[str, Path], images: list[str],
                                                   tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["attention", str(runs["cnn"]), *images, "--out", str(tmp_path / "out")])
    _one_error_line(capsys, status, "[CLS]", "ResNet")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("arguments", "words"), [
    (["--size", "30"], ["--size 30", "patch size 7"]),
    (["--threshold", "0"], ["--threshold"]),
])
def test_attention_option_mistakes(runs: dict[str, Path], images: list[str], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str], arguments: list[str],
                                   words: list[str]) -> None:
    status = main(["attention", str(runs["vit"]), *images, "--out", str(tmp_path), *arguments])
    _one_error_line(capsys, status, *words)


def test_missing_image_is_one_line(runs: dict[str, Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["features", str(runs["vit"]), str(tmp_path / "nowhere.png"), "--out",
                   str(tmp_path)])
    _one_error_line(capsys, status, "nowhere.png")


def test_plot_of_a_real_run(runs: dict[str, Path]) -> None:
    assert main(["plot", str(runs["vit"])]) == 0
    width, height = _size(runs["vit"] / "curves.png")
    assert width > 500 and height > 300


def test_plot_of_written_metrics(tmp_path: Path) -> None:
    records = [{"kind": "knn", "step": 0, "epoch": 0, "knn_top1": 40.0}]
    for step in range(10, 110, 10):
        records.append({"kind": "train", "step": step, "loss": 5 - step / 50, "lr": step * 1e-5,
                        "teacher_entropy": 3.0, "kl_teacher_student": 1.0})
    records.append({"kind": "epoch", "step": 100, "epoch": 1, "loss": 4.0, "knn_top1": 55.0})
    lines = [json.dumps(record) for record in records] + ['{"kind": "train", "st']  # half line
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    out = tmp_path / "plots" / "mine.png"
    assert main(["plot", str(tmp_path), "--out", str(out)]) == 0
    assert _size(out) == (1100, 700)


def test_plot_without_metrics_is_one_line(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    _one_error_line(capsys, main(["plot", str(tmp_path)]), "metrics.jsonl")


def test_plot_without_matplotlib_says_what_to_install(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1.0}\n')
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    _one_error_line(capsys, main(["plot", str(tmp_path)]), "pip install dinolab[viz]")


def test_training_logs_attention_to_tensorboard(runs: dict[str, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs["vit"] / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    # At initialisation and after the (only) epoch of 2 steps: 4 test images x 5 tiles.
    logged = events.Images("attention")
    assert [event.step for event in logged] == [0, 2]
    assert (logged[0].width, logged[0].height) == (5 * 224 + 4 * 2, 4 * 224 + 3 * 2)
