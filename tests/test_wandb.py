"""Weights & Biases logging (training/wandb_logging.py): offline runs read back from their
.wandb files, resume into the same W&B run, the missing-package error, the sweep example."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import global_torch_state_kept, make_fashion_mnist, tiny_overrides

from dinolab.cli import EXIT_CONFIG_ERROR, main
from dinolab.config import ConfigError, load_config
from dinolab.training import loop

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
STEPS_PER_EPOCH = 2


@dataclass
class OfflineRun:
    run_id: str
    config: dict[str, Any]
    history: dict[int, dict[str, Any]] = field(default_factory=dict)  # step -> key -> value


def read_offline_run(path: Path) -> OfflineRun:
    """An offline run's .wandb file: W&B's records (protobuf) in the LevelDB log format
    (32 KiB blocks of chunks, each with a 7-byte header: CRC, length, type), after a 7-byte
    file header (':W&B', magic, version)."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, payload = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    run: OfflineRun | None = None
    history: dict[int, dict[str, Any]] = {}
    while position + 7 <= len(data):
        if block - position % block < 7:  # the block's padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        payload += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind not in (1, 4):  # a record's first or middle chunk
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        payload = b""
        if record.HasField("run"):
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
            run = OfflineRun(record.run.run_id, config)
        elif record.HasField("history"):
            values = {"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                      for item in record.history.item}
            history.setdefault(record.history.step.num, {}).update(values)
    assert run is not None, f"no run record in {path}"
    run.history = history
    return run


def offline_runs(wandb_dir: Path) -> list[OfflineRun]:
    """The offline runs under WANDB_DIR, oldest first (their folders start with the time)."""
    files = sorted(wandb_dir.glob("wandb/offline-run-*/*.wandb"))
    return [read_offline_run(path) for path in files]


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def interrupted_and_resumed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny run with W&B offline, stopped by an error at the start of its second epoch, then
    resumed to its end in the same folder -> (the run folder, WANDB_DIR)."""
    wandb = pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("wandb_run")
    run_dir, wandb_dir = root / "run", root / "wandb_files"
    config = load_config(None, [
        *tiny_overrides(make_fashion_mnist(root / "fashion"), run_dir),
        f"train.limit_steps_per_epoch={STEPS_PER_EPOCH}", "run.log_every_steps=2",
        "eval.knn_every_epochs=1", "eval.knn_train_limit=32", "eval.knn_test_limit=16",
        "eval.knn_k=5", "run.wandb=true", "run.wandb_tags=[test,tiny]",
    ])
    run_epoch = loop.run_epoch

    def stop_at_second_epoch(state: Any, *args: Any) -> loop.EpochResult:
        if state.epoch == 1:
            raise Interrupted
        return run_epoch(state, *args)

    with pytest.MonkeyPatch.context() as patch, global_torch_state_kept():
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_DIR", str(wandb_dir))
        patch.delenv("WANDB_RUN_ID", raising=False)
        patch.delenv("WANDB_SWEEP_ID", raising=False)
        patch.setattr(loop, "run_epoch", stop_at_second_epoch)
        try:
            with pytest.raises(Interrupted):
                loop.train(config)
            patch.setattr(loop, "run_epoch", run_epoch)
            assert loop.train(config).epochs_done == 2
        finally:
            wandb.teardown()  # the next tests find no W&B state
    return run_dir, wandb_dir


def test_offline_run_holds_the_tensorboard_scalars_at_their_steps(
        interrupted_and_resumed: tuple[Path, Path]) -> None:
    run_dir, wandb_dir = interrupted_and_resumed
    first, resumed = offline_runs(wandb_dir)
    expected: dict[int, dict[str, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        expected.setdefault(record["step"], {}).update({
            f"{record['kind']}/{key}": value for key, value in record.items()
            if key not in ("kind", "step", "time", "epoch")})
    logged = {**first.history, **resumed.history}
    assert sorted(logged) == sorted(expected) == [0, STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    for step, values in expected.items():
        assert {key: logged[step][key] for key in values} == pytest.approx(values), step
    for key in ("train/loss", "epoch/loss", "epoch/knn_top1"):
        assert key in logged[STEPS_PER_EPOCH] and key in logged[2 * STEPS_PER_EPOCH], key
    assert "knn/knn_top1" in logged[0]  # the teacher at initialisation
    assert logged[STEPS_PER_EPOCH]["attention/_type"] == "images/separated"  # the ViT's maps
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())  # auto keys resolved
    assert {key: first.config[key] for key in saved} == saved
    assert first.config["train"]["epochs"] == 2 and first.config["run"]["wandb_tags"] == ["test",
                                                                                          "tiny"]


def test_resumed_run_continues_the_same_wandb_run(
        interrupted_and_resumed: tuple[Path, Path]) -> None:
    run_dir, wandb_dir = interrupted_and_resumed
    runs = offline_runs(wandb_dir)
    assert len(runs) == 2
    run_id = (run_dir / "wandb_id").read_text().strip()
    assert [run.run_id for run in runs] == [run_id, run_id]
    first, resumed = runs
    assert max(first.history) == STEPS_PER_EPOCH  # the first epoch; the second was interrupted
    assert sorted(resumed.history) == [2 * STEPS_PER_EPOCH]  # the steps go on


def test_wandb_without_the_package_is_one_line_and_status_2(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    run_dir = tmp_path / "run"
    status = main(["train", *tiny_overrides(tmp_path / "no_data_needed", run_dir),
                   "run.wandb=true"])
    error = capsys.readouterr().err
    assert status == EXIT_CONFIG_ERROR
    assert error == "dinolab: error: run.wandb=true needs the wandb package: pip install " \
                    "'dinolab[wandb]'\n"
    assert not run_dir.exists()  # before any work


def test_wandb_keys_are_checked() -> None:
    config = load_config(None, ["run.wandb=true", "run.wandb_project=dino-sweeps",
                                "run.wandb_entity=lab", "run.wandb_name=first",
                                "run.wandb_tags=[vit,cpu]"])
    assert (config.run.wandb, config.run.wandb_project, config.run.wandb_tags) == (
        True, "dino-sweeps", ["vit", "cpu"])
    with pytest.raises(ConfigError, match="run.wandb_project"):
        load_config(None, ["run.wandb_project="])
    with pytest.raises(ConfigError, match="run.wandb_tags"):
        load_config(None, [f"run.wandb_tags=[{'x' * 65}]"])


def test_sweep_example_gives_dinolab_train_valid_overrides(tmp_path: Path) -> None:
    """What `wandb agent` runs for a trial of examples/wandb_sweep.yaml: its command with the
    sweep's key=value choices, in a run folder named by the trial's W&B run id."""
    pytest.importorskip("wandb")
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    sweep = yaml.safe_load((EXAMPLES / "wandb_sweep.yaml").read_text())
    choices = {}
    for key, space in sweep["parameters"].items():
        for value in space.get("values", [space.get("value"), space.get("min"), space.get("max")]):
            if value is not None:
                load_config(None, [f"{key}={value}"])  # a valid key and value
                choices[key] = value
    arguments = create_sweep_command_args({"args": {key: {"value": value}
                                                    for key, value in choices.items()}})
    command = []
    for part in sweep["command"]:  # as the agent expands its macros
        command += {"${env}": ["/usr/bin/env"],
                    "${args_no_hyphens}": arguments["args_no_hyphens"]}.get(part, [part])
    assert shutil.which("dinolab", path=str(Path(sys.executable).parent))
    environment = {**os.environ, "WANDB_RUN_ID": "abc123",
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    shown = subprocess.run([*command, "--show-config"], env=environment, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    config = yaml.safe_load(shown.stdout)
    assert config["run"]["dir"] == "runs/sweep/abc123" and config["run"]["wandb"] is True
    for key, value in choices.items():
        section, name = key.split(".")
        assert config[section][name] == pytest.approx(value), key
