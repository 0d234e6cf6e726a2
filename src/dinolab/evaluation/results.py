"""A run folder's own figures: ``evaluation.json``, written by ``dinolab knn|linear``, shown by
``dinolab compare`` and in the model card of ``dinolab export --hub``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = "evaluation.json"  # a run folder's full-split figures


def record_result(path: str, weights: str, data_path: str | None, overrides: Sequence[str],
                  values: dict[str, Any]) -> None:
    """Keep a run folder's own figures (its teacher on its own data) in ``evaluation.json``;
    figures on other data, of the student, or of a file are only printed."""
    folder = Path(path)
    if not folder.is_dir() or weights != "teacher" or data_path or overrides:
        return
    (folder / RESULTS).write_text(json.dumps(read_results(folder) | values, indent=1) + "\n")


def read_results(folder: Path) -> dict[str, Any]:
    """The figures recorded in ``folder``; {} where none are."""
    file = folder / RESULTS
    return json.loads(file.read_text()) if file.is_file() else {}
