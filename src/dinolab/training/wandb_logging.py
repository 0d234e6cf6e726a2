"""Weights & Biases beside TensorBoard: one W&B run per run folder, written by the main process.

The W&B run's id is kept in the run folder (``wandb_id``), and a resumed dinolab run opens its
W&B run again with ``resume="allow"``, so its curves continue where they stopped. W&B's own
settings apply as usual: ``WANDB_MODE=offline`` writes the run locally (``wandb sync`` uploads it
later), ``WANDB_DIR`` moves W&B's files (by default into the run folder), and under ``wandb
agent`` the sweep chooses the project, entity and run id.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dinolab.config import Config, ConfigError, to_dict
from dinolab.distributed import is_main_process

ID_FILE = "wandb_id"


def require_wandb(config: Config) -> None:
    """A ConfigError before any work when run.wandb=true and the package is missing."""
    if not config.run.wandb:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError("run.wandb=true needs the wandb package: "
                          "pip install 'dinolab[wandb]'") from None


def start_wandb(config: Config, run_dir: Path) -> Any | None:
    """The W&B run that ``config`` (resolved: the run folder's config.yaml) is logged to; None
    when run.wandb is off and on every process but the main one."""
    if not (config.run.wandb and is_main_process()):
        return None
    import wandb

    settings, id_file = config.run, run_dir / ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    run = wandb.init(
        project=settings.wandb_project, entity=settings.wandb_entity or None,
        name=settings.wandb_name or None, tags=list(settings.wandb_tags) or None,
        id=run_id, resume="allow", config=to_dict(config),
        dir=os.environ.get("WANDB_DIR") or str(run_dir),
    )
    if run.id != run_id:  # a new run, or a sweep's run id
        id_file.write_text(f"{run.id}\n")
    return run
