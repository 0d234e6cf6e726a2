"""Smoke tests of the benchmarks at a tiny size: throughput.py's every mode and the peer run, and
the table it writes holds one row per variant; augmentation_ops.py, sharding.py and
activation_memory.py run. Speed itself is never asserted in tests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import throughput  # noqa: E402


@pytest.mark.slow
def test_throughput_benchmark_runs_every_mode(fashion_root: Path, tmp_path: Path) -> None:
    output = tmp_path / "table.json"
    throughput.main([
        "--preset", "demo", "--set", f"data.root={fashion_root}",
        "--set", "model.backbone_kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
        "--set", "model.head.out_dim=64", "--set", "data.num_local_crops=2",
        "--batch", "8", "--precision", "fp32", "--workers", "0", "--modes", "model,e2e,data",
        "--augmentation", "pil,batched,batched+prefetch",
        "--switches", "--flops", "--steps", "1", "--warmup", "1", "--json", str(output),
    ])
    table = json.loads(output.read_text())
    names = [(row["mode"], row["name"]) for row in table["rows"]]
    assert ("model", "dinolab") in names and ("model", "peer (lightly)") in names
    assert ("e2e", "dinolab (batched)") in names and ("e2e", "peer (lightly)") in names
    assert ("e2e", "dinolab (batched+prefetch)") in names
    assert ("data", "augmentation alone") in names
    assert sum(name.startswith("off:") for _, name in names) == 6
    assert ("model", "swap: fused/eager attention") in names
    assert all(row["images_per_second"] > 0 for row in table["rows"])
    assert all(row["tflops"] > 0 for row in table["rows"] if row["mode"] == "model")


def test_throughput_benchmark_decodes_jpegs_on_the_device(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--data jpeg with +decode (data.decode=device; on the CPU here), both modes that read the
    pipeline, and a profile of each: a few seconds."""
    output = tmp_path / "table.json"
    throughput.main([
        "--preset", "demo", "--set", "model.head.out_dim=64",
        "--set", "model.backbone_kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
        "--set", "data.num_local_crops=2",
        "--data", "jpeg", "--images", "8", "--batch", "4", "--precision", "fp32",
        "--workers", "0", "--modes", "e2e,data", "--no-peer",
        "--augmentation", "batched+decode,batched+prefetch+decode",
        "--steps", "1", "--warmup", "1", "--profile", "1", "--jpeg-dir", str(tmp_path / "jpeg"),
        "--json", str(output),
    ])
    names = [(row["mode"], row["name"]) for row in json.loads(output.read_text())["rows"]]
    assert ("e2e", "dinolab (batched+decode)") in names
    assert len(list((tmp_path / "jpeg").glob("*.jpg"))) == 8  # kept for the next call
    assert "Self CPU time total" in capsys.readouterr().out  # --profile's table
    assert ("data", "pipeline (batched+prefetch+decode)") in names
    assert ("data", "augmentation alone") in names
    assert throughput.augmentation_overrides("batched+decode+prefetch") == [
        "data.augmentation=batched", "data.prefetch_views=True", "data.decode=device"]


def test_augmentation_ops_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """Smoke test: one workload, one call; the kernels on image data are counted."""
    import augmentation_ops

    augmentation_ops.main(["--workloads", "fashion", "--repeat", "1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith("fashion")]
    assert [row[1] for row in rows] == ["rows"]
    assert float(rows[0][2]) > 0 and int(rows[0][3]) > 0


@pytest.mark.slow
def test_sharding_benchmark_shows_fsdp_holding_half(tmp_path: Path) -> None:
    """Smoke test at a tiny size: 2 processes, both strategies; under FSDP each process holds
    about half of the student, the teacher and AdamW's state."""
    import sharding

    rows = sharding.main([
        "--preset", "demo", "--set", "model.head.out_dim=64",
        "--set", "model.backbone_kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
        "--global-crop", "28", "--local-crop", "14", "--batch", "4", "--steps", "1",
        "--warmup", "0", "--out", str(tmp_path / "sharding.json"),
    ])
    ddp, sharded = rows
    assert (ddp["parallel"], sharded["parallel"]) == ("ddp", "fsdp")
    for key in ("student_mib", "teacher_mib", "adamw_mib"):
        assert 0.4 * ddp[key] < sharded[key] < 0.6 * ddp[key], key


def test_activation_memory_benchmark_counts_less_with_checkpointing() -> None:
    """On the meta device at a tiny size: checkpointing keeps less, and the count grows with
    the batch (it counts activations, not parameters)."""
    import activation_memory

    rows = activation_memory.main([
        "--preset", "demo", "--backbone", "vit_tiny_patch16_224", "--batch", "2", "4",
        "--global-crop", "28", "--local-crop", "14", "--local-crops", "2",
        "--set", "model.patch_size=7", "--set", "model.head.out_dim=64",
        "--set", "model.head.hidden_dim=32", "--set", "model.head.bottleneck_dim=16",
        "--set", "model.backbone_kwargs={depth: 4, embed_dim: 32, num_heads: 2}",
    ])
    small, large = rows
    assert small["checkpointed_bytes"] < 0.5 * small["plain_bytes"]
    assert large["plain_bytes"] > 1.8 * small["plain_bytes"]
