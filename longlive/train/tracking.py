"""Experiment tracking through wandb, offline by default.

The mode is ``WANDB_MODE`` from the environment if set, else the preset's ``tracking.wandb_mode``
(``offline`` unless the user asks for ``online``). Offline runs live under the trainer's run
directory (``<run_dir>/wandb/offline-run-*``) and upload later with ``wandb sync <that dir>``.
A resumed training run continues the same wandb run: its id is kept in the training checkpoint.
``disabled`` (or :class:`NullTracker`) logs nothing and starts no wandb process.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Protocol

from longlive.config import TrackingConfig

log = logging.getLogger(__name__)


class Tracker(Protocol):
    run_id: str | None

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def finish(self, summary: dict[str, Any] | None = None) -> None: ...


class NullTracker:
    run_id = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        pass


class WandbTracker:
    def __init__(self, run: Any) -> None:
        self.run = run
        self.run_id = run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        for k, v in (summary or {}).items():
            self.run.summary[k] = v
        self.run.finish()


def wandb_mode(cfg: TrackingConfig | None) -> str:
    mode = os.environ.get("WANDB_MODE") or (cfg.wandb_mode if cfg else "offline")
    if mode == "dryrun":  # wandb's old name for offline
        mode = "offline"
    if mode not in ("offline", "online", "disabled"):
        raise ValueError(f"WANDB_MODE / tracking.wandb_mode must be offline, online or disabled, got {mode!r}")
    return mode


def start_tracking(
    name: str,
    run_dir: str | os.PathLike,
    config: dict[str, Any],
    cfg: TrackingConfig | None = None,
    *,
    run_id: str | None = None,
    group: str | None = None,
) -> Tracker:
    """A tracker for one training run; ``run_id`` resumes an earlier wandb run (after a restart)."""
    mode = wandb_mode(cfg)
    if mode == "disabled":
        return NullTracker()
    import wandb  # imported here: a disabled tracker costs nothing

    wandb_dir = Path(run_dir)
    wandb_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=cfg.project if cfg else "longlive",
        name=name,
        group=group,
        dir=str(wandb_dir),
        mode=mode,
        config=config,
        id=run_id,
        resume="allow" if run_id else None,
        settings=wandb.Settings(console="off", silent=True),
    )
    log.info("%s: wandb %s run %s under %s", name, mode, run.id, wandb_dir / "wandb")
    return WandbTracker(run)
