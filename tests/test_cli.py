"""The ``dinolab`` command in a subprocess: configuration mistakes are one clean line and exit
status 2 before any work starts; a tiny real run writes everything a user is promised."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from dinolab.cli import main
from dinolab.config import load_config

CONSOLE_SCRIPT = Path(sys.executable).with_name("dinolab")
KNN_LINE = re.compile(r"k-NN top-1 \(k=20\): (\d+\.\d)%")


def _run(arguments: list[str], cwd: Path, console_script: bool = False,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    command = ([str(CONSOLE_SCRIPT)] if console_script
               else [sys.executable, "-m", "dinolab.cli"])
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command + ["train", *arguments], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _assert_clean_config_error(result: subprocess.CompletedProcess[str], key: str,
                               run_dir: Path) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dinolab: error:")
    assert key in lines[0]
    assert not run_dir.exists(), "a configuration mistake must not create the run folder"


# (arguments before run.dir, the key or name the one-line message must contain)
MISTAKES: list[tuple[list[str], str]] = [
    (["train.epochz=3"], "train.epochz"),
    (["train.epochs=abc"], "train.epochs"),
    (["train.epochs=0"], "train.epochs"),
    (["loss.teacher_temp=-0.04"], "loss.teacher_temp"),
    (["data.local_crop_size=300"], "data.local_crop_size"),
    (["data.global_crop_scale=[0.4,1.2]"], "data.global_crop_scale"),
    (["train.batch_size=10", "train.accumulation_steps=4"], "train.batch_size"),
    (["data.source=imagenet"], "data.source"),
    (["model.head.norm=group"], "model.head.norm"),
    (["optim.lr=inf"], "optim.lr"),
    (["train.precision=fp8"], "train.precision"),
    (["no_such_preset"], "no_such_preset"),
    ([str(Path("missing") / "recipe.yaml")], "recipe.yaml"),
    (["demo", "train.epochs"], "train.epochs"),  # not key=value
]


@pytest.mark.parametrize(("arguments", "key"), MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
def test_config_mistake_exits_2_with_one_line(tmp_path: Path, arguments: list[str],
                                              key: str) -> None:
    run_dir = tmp_path / "run"
    result = _run([*arguments, f"run.dir={run_dir}"], cwd=tmp_path)
    _assert_clean_config_error(result, key, run_dir)


def test_console_script_reports_mistakes_the_same_way(tmp_path: Path) -> None:
    assert CONSOLE_SCRIPT.is_file()
    run_dir = tmp_path / "run"
    result = _run(["train.epochs=-1", f"run.dir={run_dir}"], cwd=tmp_path, console_script=True)
    _assert_clean_config_error(result, "train.epochs", run_dir)


@pytest.fixture
def run_main(capsys: pytest.CaptureFixture[str]):
    """``dinolab.cli.main`` in this process (a subprocess would spend seconds importing torch):
    for mistakes found inside ``train``. Restores the global torch state that train() sets."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    rng = torch.get_rng_state()

    def run(arguments: list[str]) -> subprocess.CompletedProcess[str]:
        capsys.readouterr()
        status = main(["train", *arguments])
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(arguments, status, captured.out, captured.err)

    yield run
    torch.use_deterministic_algorithms(deterministic)
    torch.set_rng_state(rng)


@pytest.mark.parametrize(("argument", "key"), [
    ("train.batch_size=128", "train.batch_size"),  # larger than the 96 images
    ("data.root={tmp}/nowhere", "data.root"),
])
def test_data_mistakes_fail_before_the_run_folder(tmp_path: Path, fashion_root: Path, run_main,
                                                  argument: str, key: str) -> None:
    """Mistakes only the data can reveal (its size, its folder) are found before any write."""
    run_dir = tmp_path / "run"
    result = run_main([*tiny_overrides(fashion_root, run_dir), argument.format(tmp=tmp_path)])
    _assert_clean_config_error(result, key, run_dir)


@pytest.mark.parametrize(("argument", "key"), [
    ("model.backbone=vit_tinny_patch16_224", "model.backbone"),
    ("model.backbone_kwargs={no_such_argument: 1}", "model.backbone_kwargs"),
])
def test_backbone_mistake_fails_before_the_run_folder(tmp_path: Path, fashion_root: Path, run_main,
                                                      argument: str, key: str) -> None:
    run_dir = tmp_path / "run"
    result = run_main([*tiny_overrides(fashion_root, run_dir), argument])
    _assert_clean_config_error(result, key, run_dir)


def test_wrong_length_crop_scale_is_a_clean_error(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = _run(["data.global_crop_scale=[0.5]", f"run.dir={run_dir}"], cwd=tmp_path)
    _assert_clean_config_error(result, "data.global_crop_scale", run_dir)


def _read_metrics(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    assert lines
    return [json.loads(line) for line in lines]


@pytest.mark.slow
def test_tiny_training_run(tmp_path: Path, fashion_root: Path) -> None:
    import timm
    from safetensors.torch import load_file

    from dinolab.models.backbone import backbone_kwargs

    run_dir = tmp_path / "run"
    overrides = tiny_overrides(fashion_root, run_dir) + ["train.epochs=1"]
    result = _run(overrides, cwd=tmp_path, console_script=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "teacher.safetensors"):
        assert (run_dir / name).is_file(), name

    # the saved configuration is the resolved one and loads back as is
    config = load_config(None, overrides)
    assert load_config(str(run_dir / "config.yaml")) == config

    # console: k-NN lines for the initial and the trained teacher
    knn_values = [float(value) for value in KNN_LINE.findall(result.stdout)]
    assert len(knn_values) >= 2, result.stdout
    assert all(0 <= value <= 100 for value in knn_values)

    records = _read_metrics(run_dir / "metrics.jsonl")
    kinds = {record["kind"] for record in records}
    assert {"train", "epoch", "knn"} <= kinds
    steps_per_epoch = 96 // 16  # make_fashion_mnist writes 96 training images
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == list(range(2, steps_per_epoch + 1, 2))
    assert all(math.isfinite(r["loss"]) and r["lr"] >= 0 for r in train_records)
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 1 and epochs[0]["epoch"] == 1 and epochs[0]["step"] == steps_per_epoch
    assert math.isfinite(epochs[0]["loss"])
    assert f"{epochs[0]['knn_top1']:.1f}" == f"{knn_values[-1]:.1f}"  # console = metrics
    assert [r["step"] for r in records if r["kind"] == "knn"] == [0]

    checkpoint = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["step"] == steps_per_epoch
    assert checkpoint["loss"]["center"].shape == (1, config.model.head.out_dim)
    assert torch.count_nonzero(checkpoint["loss"]["center"]) > 0  # the center was updated

    # teacher.safetensors: the teacher backbone under timm's own key names
    exported = load_file(str(run_dir / "teacher.safetensors"))
    kwargs = backbone_kwargs(config.model, config.data.global_crop_size, 0.0)
    model = timm.create_model(config.model.backbone, pretrained=False, **kwargs)
    model.load_state_dict(exported, strict=True)
    teacher = {key.removeprefix("backbone."): value for key, value in checkpoint["teacher"].items()
               if key.startswith("backbone.")}
    assert teacher.keys() == exported.keys()
    assert all(torch.equal(teacher[key], exported[key]) for key in exported)
    features = model.eval()(torch.randn(2, 3, 28, 28))
    assert features.shape == (2, model.num_features)
