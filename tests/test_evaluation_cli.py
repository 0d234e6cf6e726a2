"""``dinolab knn|linear|embed`` on a tiny run made here: they exit 0, print their results (the
k-NN table equal to an independent computation), write their files, extract features once and
read them from the cache afterwards; mistakes exit 2."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_tiny_run
from PIL import Image

from dinolab.cli import main
from dinolab.config import load_config
from dinolab.data.datasets import build_sources
from dinolab.data.transforms import EvalTransform
from dinolab.evaluation.features import extract_features
from dinolab.evaluation.knn import knn_accuracy
from dinolab.training.state import build_network

TABLE_ROW = re.compile(r"^\s*(\d+)\s+(\d+\.\d)%\s+(\d+\.\d)%(?:\s+\(.*\))?$", re.MULTILINE)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("evaluation"))


@pytest.fixture
def dinolab(capsys: pytest.CaptureFixture[str]):
    """``dinolab ARGS`` in this process -> (exit status, stdout, stderr)."""
    def run(*arguments: str) -> tuple[int, str, str]:
        capsys.readouterr()
        status = main(list(arguments))
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


def _cache_files(run_dir: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in (run_dir / "features").glob("*.pt")}


@torch.no_grad()
def _expected_knn_top1(run_dir: Path, k: int) -> float:
    """The teacher's k-NN top-1, computed without the evaluation commands."""
    config = load_config(str(run_dir / "config.yaml"))
    network = build_network(config, 0.0)
    checkpoint = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    network.load_state_dict(checkpoint["teacher"])
    sources = build_sources(config.data)
    transform, device = EvalTransform(config.data), torch.device("cpu")
    train = extract_features(network.backbone, sources.knn_train, transform, device)
    test = extract_features(network.backbone, sources.knn_test, transform, device)
    return knn_accuracy(*train, *test, k=k)["top1"]


def test_knn_prints_the_table_and_caches_the_features(run_dir: Path, dinolab) -> None:
    status, out, err = dinolab("knn", str(run_dir))
    assert status == 0, err
    rows = {int(k): (float(top1), float(top5)) for k, top1, top5 in TABLE_ROW.findall(out)}
    assert sorted(rows) == [10, 20, 100, 200]
    assert f"{rows[20][0]:.1f}" == f"{_expected_knn_top1(run_dir, 20):.1f}"
    assert rows[100] == rows[200]  # both use all 96 train images, and say so
    assert re.findall(r"^\s*(\d+) .*\(k > 96: every train image votes\)$", out, re.M) == \
        ["100", "200"]
    assert out.count("extracted") == 2  # train and test
    cached = _cache_files(run_dir)
    assert len(cached) == 2

    status, again, _ = dinolab("knn", str(run_dir), "--k", "20,100", "--temperature", "0.07")
    assert status == 0
    assert "extracted" not in again and again.count("from the cache") == 2
    assert _cache_files(run_dir) == cached  # not rewritten
    assert {int(k): (float(a), float(b)) for k, a, b in TABLE_ROW.findall(again)} == {
        20: rows[20], 100: rows[100]}


def test_linear_probe_prints_the_chosen_rate(run_dir: Path, dinolab) -> None:
    status, out, err = dinolab("linear", str(run_dir), "--epochs", "3", "--lrs", "0.01,0.1")
    assert status == 0, err
    assert re.search(r"test \(32 images\): top-1 \d+\.\d%, top-5 \d+\.\d% \(lr (0\.01|0\.1)\)", out)
    assert "<- chosen" in out
    # one block and no patches: the k-NN features, from the same cache
    status, out, _ = dinolab("linear", str(run_dir), "--blocks", "1", "--epochs", "1")
    assert status == 0 and "extracted" not in out


def test_embed_writes_npz_and_a_map(run_dir: Path, tmp_path: Path, dinolab) -> None:
    out, picture = tmp_path / "embeddings.npz", tmp_path / "map.png"
    status, printed, err = dinolab("embed", str(run_dir), "--out", str(out), "--plot",
                                   str(picture))
    assert status == 0, err
    stored = np.load(out)
    assert stored["embeddings"].shape == (96, 32) and stored["embeddings"].dtype == np.float32
    labels = build_sources(load_config(str(run_dir / "config.yaml")).data).train.labels
    assert np.array_equal(stored["labels"], labels)
    assert "paths" not in stored  # Fashion-MNIST has no image files
    assert picture.stat().st_size > 1000
    assert "96 embeddings of width 32" in printed
    # Fashion-MNIST's train split is k-NN's train split: one cache for both
    assert [path.name.split("-output")[0] for path in (run_dir / "features").glob("*train*")] == [
        "knn-train"]


def test_embed_writes_parquet(run_dir: Path, tmp_path: Path, dinolab) -> None:
    parquet = pytest.importorskip("pyarrow.parquet")  # optional: not a dinolab dependency
    out = tmp_path / "embeddings.parquet"
    status, _, err = dinolab("embed", str(run_dir), "--out", str(out), "--split", "test")
    assert status == 0, err
    table = parquet.read_table(out).to_pydict()
    assert table["index"] == list(range(32)) and len(table["embedding"][0]) == 32
    labels = build_sources(load_config(str(run_dir / "config.yaml")).data).knn_test.labels
    assert table["label"] == labels.tolist()


def _image_folder(root: Path, per_class: int = 6) -> Path:
    generator = np.random.default_rng(0)
    for name, brightness in (("dark", 40), ("light", 200)):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = np.clip(brightness + generator.integers(-30, 30, (20, 20, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{index}.png")
    return root


def test_data_folder_gives_paths_and_labels(run_dir: Path, tmp_path: Path, dinolab) -> None:
    folder = _image_folder(tmp_path / "photos")
    out = tmp_path / "photos.npz"
    status, _, err = dinolab("embed", str(run_dir), "--data", str(folder), "--out", str(out),
                             "data.mean=[0.5,0.5,0.5]")
    assert status == 0, err
    stored = np.load(out)
    names = [Path(path).parent.name for path in stored["paths"]]
    assert names == ["dark"] * 6 + ["light"] * 6 and stored["labels"].tolist() == [0] * 6 + [1] * 6
    status, out_text, err = dinolab("knn", str(run_dir), "--data", str(folder), "--k", "3")
    assert status == 0, err
    assert "11 train, 1 test images" in out_text  # 10% held out, at least one


@pytest.mark.parametrize("arguments", [
    ["knn", "{run}", "train.epochs=3"],  # not an evaluation setting
    ["knn", "{run}", "data.no_such_key=1"],
    ["knn", "{run}", "--data", "{tmp}/nowhere"],
    ["knn", "{tmp}/no_run"],
    ["knn", "{run}", "--data", "{tmp}/unlabelled"],
    ["linear", "{run}", "--blocks", "2"],  # the tiny ViT has one block
    ["embed", "{run}", "--out", "{tmp}/embeddings.csv"],
])
def test_evaluation_mistakes_are_one_line_and_exit_2(run_dir: Path, tmp_path: Path, dinolab,
                                                      arguments: list[str]) -> None:
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    Image.new("RGB", (20, 20)).save(unlabelled / "only.png")
    status, out, err = dinolab(*[a.format(run=run_dir, tmp=tmp_path) for a in arguments])
    lines = err.splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("dinolab: error:"), err
    assert "extracted" not in out  # found before any work


@pytest.mark.parametrize("arguments", [["knn", "RUN", "--k", "0"], ["knn", "RUN", "--bogus"],
                                       ["linear", "RUN", "--lrs", "a,b"], ["embed", "RUN"]])
def test_malformed_arguments_exit_2(dinolab, arguments: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_status:
        dinolab(*arguments)
    assert exit_status.value.code == 2
