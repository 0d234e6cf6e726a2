"""``dinolab compare`` on two tiny real runs (DINO and DINOv2, two learning rates): the table
names the keys that differ and only those, the PNG opens, a run still writing its metrics is
read as it is, and a folder that is not a run is one line with exit status 2."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import train_tiny_run
from PIL import Image

from dinolab.cli import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two runs on the same images that differ in method and optim.lr (two steps an epoch):
    the second keeps DINOv2's blank KoLeo weight and the EMA centre, where the demo preset
    under the tiny config would bring its own and make them differ too."""
    folder = tmp_path_factory.mktemp("compare")
    first = train_tiny_run(folder / "first", "optim.lr=0.001")
    second = train_tiny_run(folder / "second", "method=dinov2", "optim.lr=0.002",
                            "loss.koleo_weight=null", "loss.centering=mean",
                            f"data.root={folder / 'first' / 'fashion'}")
    return [first, second]


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as picture:
        picture.load()  # decodes the whole file
        return picture.size


def _rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()]


def test_table_names_the_keys_that_differ(runs: list[Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "figures" / "ablation.png"
    assert main(["compare", *map(str, runs), "--out", str(out)]) == 0
    header, first, second, written = _rows(capsys.readouterr().out)
    assert header == ["run", "method", "optim.lr", "loss", "k-NN", "top-1", "epochs", "steps",
                      "full", "k-NN", "linear"]
    # Both folders are called "run": the rows name them by their paths.
    assert first[:3] == [str(runs[0]), "dino", "0.001"] and first[5:] == ["2/2", "4"]
    assert second[:3] == [str(runs[1]), "dinov2", "0.002"] and second[5:] == ["2/2", "4"]
    assert all(float(row[3]) > 0 and 0 <= float(row[4]) <= 100 for row in (first, second))
    assert written[-1] == str(out)
    assert _size(out) == (1600, 480)


def test_full_split_figures_of_dinolab_knn_are_shown(
        runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``dinolab knn RUN`` keeps its figures in the run folder; compare shows k = 20's."""
    run = tmp_path / "evaluated"
    shutil.copytree(runs[0], run)
    assert main(["knn", str(run), "--k", "20"]) == 0
    knn_printed = capsys.readouterr().out.splitlines()[-1].split()  # "20  top-1%  top-5%"
    assert main(["compare", str(run), "--out", str(tmp_path / "c.png")]) == 0
    header, row, _ = _rows(capsys.readouterr().out)
    assert header[-3:] == ["full", "k-NN", "linear"]
    assert row[-1] == knn_printed[1].rstrip("%")  # the linear column is blank: not computed


def test_one_run_default_output_and_a_half_written_line(
        runs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A run still training: its metrics.jsonl ends in a line cut mid-write."""
    live = tmp_path / "live"
    live.mkdir()
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copy(runs[0] / name, live / name)
    with open(live / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "train", "step": 6, "time": 17965')
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "live"]) == 0
    header, row, _ = _rows(capsys.readouterr().out)
    assert header == ["run", "loss", "k-NN", "top-1", "epochs", "steps", "full", "k-NN",
                      "linear"]  # nothing differs
    assert row[0] == "live" and row[3:] == ["2/2", "4"]
    assert _size(tmp_path / "compare.png") == (1600, 480)


def test_a_panel_without_data_says_so(runs: list[Path], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A run with only its loss so far (no k-NN, no entropy): every panel is still drawn."""
    from matplotlib.figure import Figure

    early = tmp_path / "early"
    early.mkdir()
    shutil.copy(runs[0] / "config.yaml", early / "config.yaml")
    (early / "metrics.jsonl").write_text('{"kind": "train", "step": 2, "loss": 4.1}\n')
    titles: list[str] = []
    savefig = Figure.savefig

    def record_titles(figure: Any, *arguments: Any, **keywords: Any) -> None:
        titles.extend(axes.get_title() for axes in figure.axes)
        savefig(figure, *arguments, **keywords)

    monkeypatch.setattr(Figure, "savefig", record_titles)
    assert main(["compare", str(early), "--out", str(tmp_path / "early.png")]) == 0
    assert titles == ["train loss", "k-NN top-1 (%, monitor): recorded by no run",
                      "teacher entropy (nats): recorded by no run"]


@pytest.mark.parametrize("content", ["missing", "empty", "config only", "foreign config"])
def test_not_a_run_is_one_line_and_exit_2(runs: list[Path], tmp_path: Path, content: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "other"
    if content != "missing":
        folder.mkdir()
    if content == "config only":
        shutil.copy(runs[0] / "config.yaml", folder / "config.yaml")
    if content == "foreign config":
        (folder / "config.yaml").write_text("learning_rate: 0.1\n")
        shutil.copy(runs[0] / "metrics.jsonl", folder / "metrics.jsonl")
    status = main(["compare", str(runs[0]), str(folder), "--out", str(tmp_path / "c.png")])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert status == 2 and captured.out == "" and not (tmp_path / "c.png").exists()
    assert len(lines) == 1 and lines[0].startswith("dinolab: error:") and str(folder) in lines[0]


def test_no_run_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["compare"])
    assert stopped.value.code == 2 and len(capsys.readouterr().err.splitlines()) == 1
