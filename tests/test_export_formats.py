"""``dinolab export --hub`` and ``--onnx``: a Hub folder that timm alone loads with dinolab's
exact features (a ViT with registers and a CNN) and whose model card holds the run's figures;
an upload that fails in one line after writing the folder; an ONNX graph whose onnxruntime
outputs equal PyTorch's at two batch sizes; one-line mistakes with exit status 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from conftest import global_torch_state_kept, make_fashion_mnist, tiny_overrides, train_tiny_run

import dinolab
from dinolab import __version__
from dinolab.cli import main

IMAGES = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
ONNX_TOLERANCE = 1e-4  # absolute, on features of magnitude ~1 (measured: ~5e-7)
VIT_ONLY = ("model.backbone=", "model.backbone_kwargs=", "model.patch_size=")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny runs of 4 steps: a one-block ViT with 2 registers, and timm's test ResNet."""
    from dinolab.config import load_config
    from dinolab.training.loop import train

    folder = tmp_path_factory.mktemp("formats")
    cnn_overrides = [item for item in tiny_overrides(make_fashion_mnist(folder / "fashion"),
                                                     folder / "cnn")
                     if not item.startswith(VIT_ONLY)]
    with global_torch_state_kept():
        train(load_config(None, [*cnn_overrides, "model.backbone=test_resnet",
                                 "train.limit_steps_per_epoch=2"]))
    return {"vit": train_tiny_run(folder / "vit", "model.num_registers=2"),
            "cnn": folder / "cnn"}


def _one_error_line(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dinolab: error:"), lines
    assert all(word in lines[0] for word in words), lines[0]
    return lines[0]


@torch.no_grad()
@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_hub_folder_loads_in_timm_with_dinolabs_features(runs: dict[str, Path], tmp_path: Path,
                                                         kind: str) -> None:
    run_dir, hub = runs[kind], tmp_path / "hub"
    out = tmp_path / "backbone.safetensors"
    assert main(["export", str(run_dir), "--hub", str(hub), "--out", str(out)]) == 0
    assert sorted(path.name for path in hub.iterdir()) == \
        ["README.md", "config.json", "model.safetensors"]
    assert out.read_bytes() == (hub / "model.safetensors").read_bytes()
    description = json.loads((hub / "config.json").read_text())
    backbone, info = dinolab.load_backbone(run_dir)
    assert description["model_args"] == info.model_kwargs and description["num_classes"] == 0
    # What a user types, offline: timm reads config.json and model.safetensors.
    model = timm.create_model(f"local-dir:{hub}", pretrained=True).eval()
    expected = backbone(IMAGES)
    difference = (model(IMAGES) - expected).abs().max().item()
    assert difference == 0, f"{kind}: max abs difference {difference:.3g} from load_backbone"
    assert model(IMAGES).shape == expected.shape
    if kind == "vit":
        assert model.num_prefix_tokens == 3  # [CLS] and 2 registers
    # timm's data config is the run's evaluation transform: 28 px, the run's mean and std.
    data = timm.data.resolve_data_config({}, model=model)
    assert info.config is not None
    assert tuple(data["input_size"]) == (3, 28, 28)
    assert tuple(data["mean"]) == tuple(info.config.data.mean)
    assert tuple(data["std"]) == tuple(info.config.data.std)
    assert data["interpolation"] == "bicubic"


def _card_rows(hub: Path) -> dict[str, str]:
    """The model card's figures table: {evaluation: result}."""
    rows = [line.strip("|").split("|") for line in (hub / "README.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| evaluation")]
    return {what.strip(): value.strip() for what, value in rows}


def test_model_card_holds_the_runs_figures(runs: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = runs["vit"]
    assert main(["export", str(run_dir), "--hub", str(tmp_path / "before")]) == 0
    before = _card_rows(tmp_path / "before")
    knn_row = "k-NN top-1, full splits (`dinolab knn`)"
    assert before[knn_row] == "not measured"
    # The real path: `dinolab knn` records its figures in the run folder's evaluation.json.
    assert main(["knn", str(run_dir), "--k", "5,10"]) == 0
    recorded = json.loads((run_dir / "evaluation.json").read_text())
    assert main(["export", str(run_dir), "--hub", str(tmp_path / "hub")]) == 0
    rows = _card_rows(tmp_path / "hub")
    assert rows[knn_row] == \
        f"k=5: {recorded['knn_top1_k5']:.1f}%, k=10: {recorded['knn_top1_k10']:.1f}%"
    assert rows["linear probe top-1 (`dinolab linear`)"] == "not measured"
    monitor = [json.loads(line).get("knn_top1")
               for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [value for value in monitor if value is not None][-1]
    assert rows["k-NN top-1 monitor, last value in `metrics.jsonl` (k=20)"] == f"{last:.1f}%"
    card = (tmp_path / "hub" / "README.md").read_text()
    config = (run_dir / "config.yaml").read_text()
    for words in ("library_name: timm", "`method=dino`", "fashion-mnist",
                  "64 images seen (4 steps of 16)", f"dinolab {__version__}",
                  "`dinolab train config.yaml`", config.strip(),
                  f'timm.create_model("local-dir:{(tmp_path / "hub").resolve()}"'):
        assert words in card, words


def test_push_without_network_fails_in_one_line_after_writing_the_folder(
        runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # No network: the Hub's address is a closed local port (refused at once).
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    hub = tmp_path / "hub"
    assert main(["export", str(runs["cnn"]), "--hub", str(hub), "--push", "someone/dino"]) == 2
    _one_error_line(capsys, "--push someone/dino", "upload failed", str(hub))
    assert (hub / "model.safetensors").is_file() and (hub / "config.json").is_file()
    assert 'timm.create_model("hf-hub:someone/dino"' in (hub / "README.md").read_text()


@torch.no_grad()
def test_onnx_outputs_equal_pytorchs_at_two_batch_sizes(runs: dict[str, Path],
                                                         tmp_path: Path) -> None:
    import onnxruntime

    out = tmp_path / "backbone.onnx"
    assert main(["export", str(runs["vit"]), "--onnx", str(out)]) == 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [item.name for item in session.get_inputs()] == ["images"]
    assert [item.name for item in session.get_outputs()] == ["features"]
    backbone, _ = dinolab.load_backbone(runs["vit"])
    for batch in (1, 3):
        images = IMAGES[:batch]
        (features,) = session.run(None, {"images": images.numpy()})
        difference = (torch.from_numpy(features) - backbone(images)).abs().max().item()
        assert difference <= ONNX_TOLERANCE, f"batch {batch}: max abs difference {difference:.3g}"


def test_onnx_without_its_extra_is_one_line_before_any_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript fails
    out = tmp_path / "backbone.onnx"
    # A run folder that does not exist: the extra is checked before anything is read.
    assert main(["export", str(tmp_path / "missing"), "--onnx", str(out)]) == 2
    _one_error_line(capsys, "--onnx needs onnxscript", "pip install 'dinolab[onnx]'")
    assert not out.exists()


def test_export_mistakes_are_one_line_with_status_2(runs: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, exported = runs["cnn"], tmp_path / "backbone.safetensors"
    assert main(["export", str(run_dir), "--out", str(exported)]) == 0
    capsys.readouterr()
    for arguments, words in [
        ([str(run_dir)], ("--out", "--hub", "--onnx")),
        ([str(run_dir), "--out", str(tmp_path / "x.safetensors"), "--push", "a/b"],
         ("--push a/b", "--hub DIR")),
        ([str(run_dir), "--onnx", str(tmp_path / "x.pt")], ("a .onnx file",)),
        ([str(exported), "--hub", str(tmp_path / "hub"), "--out", str(tmp_path / "x.safetensors")],
         ("an export", "run folder")),
        ([str(run_dir), "--hub", str(exported)], ("a file is in the way",)),
    ]:
        assert main(["export", *arguments]) == 2, arguments
        _one_error_line(capsys, *words)
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "hub").exists()
