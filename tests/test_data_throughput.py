"""Smoke test of benchmarks/data_throughput.py at a tiny size: every workload, path and worker
count gives a positive figure. Speed itself is never asserted in tests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import data_throughput  # noqa: E402


def test_data_throughput_benchmark_runs(fashion_root: Path, tmp_path: Path) -> None:
    output = tmp_path / "table.json"
    rows = data_throughput.main([
        "--images", "8", "--batch", "2", "--batches", "1", "--warmup", "1", "--workers", "0",
        "--fashion-root", str(fashion_root), "--json", str(output)])
    assert [(row.workload, row.path) for row in rows] == [
        ("jpeg", "pil"), ("jpeg", "batched"), ("fashion", "pil"), ("fashion", "batched")]
    assert all(row.views_per_second > 0 for row in rows)
    assert len(json.loads(output.read_text())["rows"]) == 4
