"""Weights out and in: ``dinolab export`` gives a file timm loads by itself with the teacher's
exact features; ``load_backbone`` reads run folders, checkpoints and exports; ``model.weights``
reads the authors' DINO checkpoints (full and backbone-only); every mistake is one line."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import timm
import torch
from conftest import global_torch_state_kept, make_fashion_mnist, tiny_overrides, train_tiny_run
from safetensors.torch import save_file

import dinolab
from dinolab.cli import main
from dinolab.config import ConfigError, load_config
from dinolab.models.backbone import create_backbone
from dinolab.training.state import build_network

IMAGES = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run of 4 steps (a few seconds), so that teacher and student differ."""
    return train_tiny_run(tmp_path_factory.mktemp("export"))


def _network_features(run_dir: Path, which: str) -> torch.Tensor:
    """Features of the checkpoint's network, rebuilt as training builds it (independent of
    load_backbone)."""
    checkpoint = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    config = load_config(str(run_dir / "config.yaml"))
    network = build_network(config, 0.0)
    network.load_state_dict(checkpoint[which])
    with torch.no_grad():
        return network.backbone.eval()(IMAGES)


@torch.no_grad()
def test_export_loads_in_timm_with_the_teachers_features(run_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         ) -> None:
    out = tmp_path / "exported" / "backbone.safetensors"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    description = json.loads(out.with_suffix(".json").read_text())
    assert description["model_name"] == "vit_tiny_patch16_224"
    assert description["model_kwargs"]["drop_path_rate"] == 0.0
    assert "num_classes" not in description["model_kwargs"]
    # The call the README and export.py document, offline: timm reads the local file.
    model = timm.create_model(description["model_name"], pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=str(out), custom_load=False),
                              **description["model_kwargs"]).eval()
    teacher = _network_features(run_dir, "teacher")
    assert torch.equal(model(IMAGES), teacher)
    for source in (out, run_dir, run_dir / "checkpoint.pt"):
        backbone, info = dinolab.load_backbone(source)
        assert not backbone.training
        assert torch.equal(backbone(IMAGES), teacher), source
    assert info.config is not None and info.step == 4


def test_exports_and_checkpoints_are_readable_like_any_new_file(run_dir: Path,
                                                                tmp_path: Path) -> None:
    """safetensors writes owner-only files (0600); dinolab gives its files the permissions any
    new file gets (0666 less the umask), so a shared cluster's users can read an export."""
    out = tmp_path / "exported" / "backbone.safetensors"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    for path in (out, out.with_suffix(".json"), run_dir / "teacher.safetensors",
                 run_dir / "checkpoint.pt"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


@torch.no_grad()
def test_student_weights_are_the_students(run_dir: Path, tmp_path: Path) -> None:
    student = _network_features(run_dir, "student")
    assert not torch.allclose(student, _network_features(run_dir, "teacher"))
    backbone, info = dinolab.load_backbone(run_dir, weights="student")
    assert info.weights == "student" and torch.equal(backbone(IMAGES), student)
    out = tmp_path / "student.safetensors"
    assert main(["export", str(run_dir), "--out", str(out), "--weights", "student"]) == 0
    assert torch.equal(dinolab.load_backbone(out)[0](IMAGES), student)


@torch.no_grad()
def test_training_writes_the_sidecar_of_its_teacher(run_dir: Path) -> None:
    description = json.loads((run_dir / "teacher.json").read_text())
    weights = str(run_dir / "teacher.safetensors")
    model = timm.create_model(description["model_name"], pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=weights, custom_load=False),
                              **description["model_kwargs"]).eval()
    assert torch.equal(model(IMAGES), _network_features(run_dir, "teacher"))


def _one_line_error(error: pytest.ExceptionInfo[ConfigError], path: Path) -> None:
    message = str(error.value)
    assert "\n" not in message and str(path) in message, message


def test_loading_mistakes_are_one_line_naming_the_path(run_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    lonely = tmp_path / "lonely.safetensors"
    save_file({"weight": torch.zeros(2)}, str(lonely))
    for path, words in [(tmp_path / "missing", "no such file"), (empty, "no checkpoint.pt"),
                        (garbage, "not a weights file"), (plain, "not a dinolab checkpoint"),
                        (lonely, "no sidecar")]:
        with pytest.raises(ConfigError, match=words) as error:
            dinolab.load_backbone(path)
        _one_line_error(error, path)


def test_export_mistakes_exit_2(run_dir: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    for arguments in ([str(run_dir), "--out", str(tmp_path / "x.pt")],
                      [str(tmp_path / "missing"), "--out", str(tmp_path / "x.safetensors")]):
        capsys.readouterr()
        assert main(["export", *arguments]) == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("dinolab: error:"), lines
    with pytest.raises(SystemExit) as exit_status:
        main(["export", str(run_dir), "--weights", "ema", "--out", str(tmp_path / "x.safetensors")])
    assert exit_status.value.code == 2


# model.weights: the layouts of the authors' repository, built here from the run's networks.

def _authors_full_checkpoint(run_dir: Path) -> dict:
    """main_dino.py's checkpoint: the student under DDP (``module.``), the teacher not, both a
    MultiCropWrapper (``backbone.``, ``head.``), with optimizer state and the epoch."""
    checkpoint = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    return {
        "student": {f"module.{key}": value for key, value in checkpoint["student"].items()},
        "teacher": dict(checkpoint["teacher"]),
        "optimizer": checkpoint["optimizer"], "epoch": 2, "args": None,
        "dino_loss": {"center": torch.zeros(1, 64)},
    }


@torch.no_grad()
@pytest.mark.parametrize("layout", ["full", "backbone-only"])
def test_authors_checkpoints_load_through_model_weights(run_dir: Path, tmp_path: Path,
                                                        layout: str) -> None:
    full = _authors_full_checkpoint(run_dir)
    assert any(key.startswith("module.head.") for key in full["student"])
    if layout == "full":
        state = full
    else:  # dino_deitsmall16_pretrain.pth: the teacher backbone, no prefixes, no head
        state = {key.removeprefix("backbone."): value for key, value in full["teacher"].items()
                 if key.startswith("backbone.")}
    path = tmp_path / "dino.pth"
    torch.save(state, path)
    config = load_config(str(run_dir / "config.yaml"), [f"model.weights={path}"])
    backbone = create_backbone(config.model, config.data.global_crop_size, 0.0).eval()
    assert torch.equal(backbone(IMAGES), _network_features(run_dir, "teacher"))


@torch.no_grad()
def test_timm_classifier_weights_load_without_their_classifier(run_dir: Path,
                                                               tmp_path: Path) -> None:
    config = load_config(str(run_dir / "config.yaml"))
    classifier = timm.create_model(config.model.backbone, num_classes=10, img_size=28,
                                   patch_size=7, dynamic_img_size=True,
                                   **config.model.backbone_kwargs).eval()
    path = tmp_path / "timm.safetensors"
    save_file({key: value.contiguous() for key, value in classifier.state_dict().items()},
              str(path))
    config.model.weights = str(path)
    backbone = create_backbone(config.model, 28, 0.0).eval()
    expected = classifier.forward_head(classifier.forward_features(IMAGES), pre_logits=True)
    assert torch.equal(backbone(IMAGES), expected)


def test_authors_checkpoint_of_another_architecture_exits_2(run_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str],
                                                            ) -> None:
    path = tmp_path / "dino.pth"
    torch.save(_authors_full_checkpoint(run_dir), path)
    overrides = [*tiny_overrides(tmp_path / "fashion", tmp_path / "run"),
                 "model.backbone_kwargs={depth: 2, embed_dim: 32, num_heads: 2}",
                 f"model.weights={path}"]
    make_fashion_mnist(tmp_path / "fashion")
    with global_torch_state_kept():
        status = main(["train", *overrides])
    lines = capsys.readouterr().err.splitlines()
    assert status == 2
    assert len(lines) == 1 and "model.weights" in lines[0] and "does not fit" in lines[0], lines
