"""The ``dinolab`` command in a subprocess: configuration mistakes are one clean line and exit
status 2 before any work starts; a tiny real run writes everything a user is promised."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from conftest import global_torch_state_kept, make_fashion_mnist, tiny_overrides

from dinolab import auto
from dinolab.cli import main
from dinolab.config import load_config, to_yaml

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


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in root.rglob("*")}


class Evil:
    """Unpickling this runs a shell command: what a crafted checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _write(relative: str, text: str) -> Callable[[Path, Path], None]:
    return lambda inputs, run_dir: (inputs / relative).write_text(text)


def _run_folder(*changes: str, checkpoint: str = "") -> Callable[[Path, Path], None]:
    """A run folder holding the tiny config (with ``changes``) and a checkpoint.pt kind."""
    def setup(inputs: Path, run_dir: Path) -> None:
        run_dir.mkdir()
        config = load_config(None, [*tiny_overrides(inputs.parent / "fashion", run_dir),
                                    *changes])
        resolved, _ = auto.resolve(config, 96)  # as a run saves it: auto resolved
        (run_dir / "config.yaml").write_text(to_yaml(resolved))
        if checkpoint == "evil":
            torch.save({"student": Evil(inputs / "MARKER")}, run_dir / "checkpoint.pt")
        elif checkpoint == "garbage":
            (run_dir / "checkpoint.pt").write_bytes(b"\x00not a checkpoint")
    return setup


def _weights(kind: str) -> Callable[[Path, Path], None]:
    def setup(inputs: Path, run_dir: Path) -> None:
        if kind == "evil":
            torch.save({"model": Evil(inputs / "MARKER")}, inputs / "weights.pt")
        elif kind == "text":
            (inputs / "weights.pt").write_text("these are my notes, not weights\n")
        else:  # another architecture: a wider ViT than the tiny config's
            from safetensors.torch import save_file

            other = timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=1,
                                      embed_dim=48, num_heads=2, patch_size=7, img_size=28)
            save_file(other.state_dict(), str(inputs / "weights.safetensors"))
    return setup


def _nothing(inputs: Path, run_dir: Path) -> None:
    return None


# (id, preset or YAML (None: the tiny config alone), overrides after the tiny config's, what
# the one line must contain, set-up of input files). {inputs}: a folder of the test's files.
MISTAKES: list[tuple[str, str | None, list[str], str, Callable[[Path, Path], None]]] = [
    ("unknown-key", None, ["train.epochz=3"], "unknown config key: train.epochz", _nothing),
    ("unknown-section", None, ["trian.epochs=3"], "trian", _nothing),
    ("text-for-int", None, ["train.epochs=abc"], "train.epochs", _nothing),
    ("float-for-int", None, ["train.batch_size=16.5"], "train.batch_size", _nothing),
    ("not-a-bool", None, ["run.tensorboard=maybe"], "run.tensorboard", _nothing),
    ("zero-epochs", None, ["train.epochs=0"], "train.epochs", _nothing),
    ("negative-temperature", None, ["loss.teacher_temp=-0.04"], "loss.teacher_temp", _nothing),
    ("local-crop-too-large", None, ["data.local_crop_size=56"], "data.local_crop_size",
     _nothing),
    ("crop-scale-above-1", None, ["data.global_crop_scale=[0.4,1.2]"],
     "data.global_crop_scale", _nothing),
    ("crop-scale-one-number", None, ["data.global_crop_scale=[0.5]"],
     "data.global_crop_scale", _nothing),
    ("batch-vs-accumulation", None, ["train.batch_size=10", "train.accumulation_steps=4"],
     "train.batch_size", _nothing),
    ("misspelt-source", None, ["data.source=fashion_mnist"], "data.source", _nothing),
    ("unknown-head-norm", None, ["model.head.norm=group"], "model.head.norm", _nothing),
    ("infinite-lr", None, ["optim.lr=inf"], "optim.lr", _nothing),
    ("min-lr-above-lr", None, ["optim.min_lr=1.0"], "optim.min_lr", _nothing),
    ("unknown-precision", None, ["train.precision=fp8"], "train.precision", _nothing),
    ("unknown-device", None, ["train.device=gpu"], "train.device", _nothing),
    ("drop-path-above-1", None, ["model.drop_path_rate=1.5"], "model.drop_path_rate", _nothing),
    ("negative-workers", None, ["data.num_workers=-1"], "data.num_workers", _nothing),
    ("device-decode-with-pil-views", None, ["data.augmentation=pil", "data.decode=device"],
     "data.decode", _nothing),
    ("log-every-0", None, ["run.log_every_steps=0"], "run.log_every_steps", _nothing),
    ("keep-no-checkpoint", None, ["run.keep_last_checkpoints=0"], "run.keep_last_checkpoints",
     _nothing),
    ("negative-checkpoint-minutes", None, ["run.checkpoint_every_minutes=-1"],
     "run.checkpoint_every_minutes", _nothing),
    ("empty-run-dir", None, ["run.dir="], "run.dir", _nothing),
    ("misspelt-preset", "demp", [], "unknown preset 'demp'", _nothing),
    ("missing-yaml", "recipes/mine.yaml", [], "config file not found: recipes/mine.yaml",
     _nothing),
    ("broken-yaml", "{inputs}/broken.yaml", [], "not valid YAML",
     _write("broken.yaml", "train: [epochs: 3\n")),
    ("yaml-of-a-list", "{inputs}/list.yaml", [], "expected a mapping",
     _write("list.yaml", "- train.epochs=3\n")),
    ("not-key-value", None, ["train.epochs"], "'train.epochs' is not key=value", _nothing),
    ("unknown-option", None, ["--epochs", "3"], "unrecognized arguments: --epochs", _nothing),
    ("batch-larger-than-data", None, ["train.batch_size=128"], "train.batch_size", _nothing),
    ("missing-data-folder", None, ["data.root={inputs}/nowhere"], "data.root", _nothing),
    ("data-root-is-a-file", None, ["data.source=folder", "data.root={inputs}/notes.txt"],
     "data.root", _write("notes.txt", "hello\n")),
    ("empty-data-folder", None, ["data.source=folder", "data.root={inputs}"],
     "no images", _nothing),
    ("folder-without-root", None, ["data.source=folder", "data.root="], "data.root", _nothing),
    ("misspelt-backbone", None, ["model.backbone=vit_tinny_patch16_224"], "model.backbone",
     _nothing),
    ("unknown-backbone-argument", None, ["model.backbone_kwargs={no_such_argument: 1}"],
     "model.backbone_kwargs", _nothing),
    ("crop-not-a-patch-multiple", None, ["data.global_crop_size=30"], "data.global_crop_size",
     _nothing),
    ("run-dir-under-a-file", None, ["run.dir={inputs}/notes.txt/run"], "run.dir",
     _write("notes.txt", "hello\n")),
    ("run-dir-of-another-config", None, [], "another configuration: model.head.out_dim",
     _run_folder("model.head.out_dim=128")),
    ("run-checkpoint-runs-code", None, [], "would import", _run_folder(checkpoint="evil")),
    ("run-checkpoint-unreadable", None, [], "no readable checkpoint",
     _run_folder(checkpoint="garbage")),
    ("weights-missing", None, ["model.weights={inputs}/weights.pt"], "file not found",
     _nothing),
    ("weights-not-a-checkpoint", None, ["model.weights={inputs}/weights.pt"],
     "is not a weights file", _weights("text")),
    ("weights-of-another-architecture", None, ["model.weights={inputs}/weights.safetensors"],
     "does not fit", _weights("other")),
    ("weights-run-code", None, ["model.weights={inputs}/weights.pt"], "would import posix.system",
     _weights("evil")),
]


@pytest.fixture
def run_main(capsys: pytest.CaptureFixture[str]):
    """``dinolab.cli.main`` in this process (a subprocess would spend seconds importing torch)
    -> CompletedProcess; argparse's exit is a status too. Restores the global torch state that
    train() sets."""
    def run(arguments: list[str]) -> subprocess.CompletedProcess[str]:
        capsys.readouterr()
        try:
            status = main(["train", *arguments])
        except SystemExit as stop:
            status = stop.code  # type: ignore[assignment]
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(arguments, status, captured.out, captured.err)

    with global_torch_state_kept():
        yield run


@pytest.mark.parametrize(("base", "overrides", "message", "setup"),
                         [case[1:] for case in MISTAKES], ids=[case[0] for case in MISTAKES])
def test_mistake_is_one_line_status_2_and_writes_nothing(
        tmp_path: Path, run_main, monkeypatch: pytest.MonkeyPatch, base: str | None,
        overrides: list[str], message: str, setup: Callable[[Path, Path], None]) -> None:
    """Each mistake a new user makes: one line naming it, exit status 2, no file written or
    changed anywhere (the run folder is not created), and no code run from a crafted pickle."""
    inputs, run_dir = tmp_path / "inputs", tmp_path / "run"
    inputs.mkdir()
    make_fashion_mnist(tmp_path / "fashion")
    setup(inputs, run_dir)
    monkeypatch.chdir(tmp_path)
    before = _files(tmp_path)
    arguments = [*([base.replace("{inputs}", str(inputs))] if base else []),
                 *tiny_overrides(tmp_path / "fashion", run_dir),
                 *[item.replace("{inputs}", str(inputs)) for item in overrides]]
    result = run_main(arguments)
    assert result.returncode == 2, (result.stdout[-1000:], result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dinolab: error:"), result.stderr
    assert message in lines[0]
    assert _files(tmp_path) == before, "a mistake must write nothing"
    assert not (inputs / "MARKER").exists(), "the crafted pickle ran its code"


def test_the_crafted_pickle_does_run_code_when_loaded_unsafely(tmp_path: Path) -> None:
    """The table's malicious files are real: an unrestricted torch.load runs their command."""
    torch.save({"model": Evil(tmp_path / "MARKER")}, tmp_path / "weights.pt")
    torch.load(tmp_path / "weights.pt", weights_only=False)
    assert (tmp_path / "MARKER").exists()


# A few mistakes again in a real process (python -m dinolab.cli): the same single line and
# status, from the command a user runs, before any work starts.
IN_A_PROCESS = [(["train.epochz=3"], "train.epochz"), (["no_such_preset"], "no_such_preset"),
                (["--epochs", "3"], "--epochs")]


@pytest.mark.parametrize(("arguments", "key"), IN_A_PROCESS,
                         ids=[" ".join(a) for a, _ in IN_A_PROCESS])
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
    assert load_config(str(run_dir / "config.yaml")) == auto.resolve(config, 96)[0]

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
    assert epochs[0]["skipped"] == 0 and not any("skipped" in r for r in train_records)
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


def test_show_config_prints_every_key_and_trains_nothing(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         ) -> None:
    """`dinolab train --show-config` prints the configuration that would train, the preset and
    overrides resolved (options and overrides in any order), and writes no run folder."""
    run_dir = tmp_path / "run"
    arguments = ["imagenet_vit_small", "train.parallel=fsdp", f"run.dir={run_dir}"]
    assert main(["train", "--show-config", *arguments]) == 0
    printed = capsys.readouterr().out
    assert printed == to_yaml(load_config("imagenet_vit_small",
                                          ["train.parallel=fsdp", f"run.dir={run_dir}"]))
    assert "parallel: fsdp" in printed and "epochs: 100" in printed  # override and preset
    assert "out_dim: auto" in printed  # resolved from the data's size when a run starts
    assert main(["train", "imagenet_vit_small", "--show-config", *arguments[1:]]) == 0
    assert capsys.readouterr().out == printed
    assert not run_dir.exists()
    assert main(["train", "--show-config", "train.parallel=zero"]) == 2  # still validated


def test_version_is_the_installed_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`dinolab --version` and the package metadata pip recorded come from one place."""
    from importlib.metadata import version

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.split() == ["dinolab", version("dinolab")]
