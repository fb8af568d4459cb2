"""Experiment tracking through wandb, offline by default.

The mode is ``WANDB_MODE`` from the environment if set, else the preset's ``tracking.wandb_mode``
(``offline`` unless the user asks for ``online``). Offline runs live under the trainer's run
directory (``<run_dir>/wandb/offline-run-*``) and upload later with ``wandb sync <that dir>``.
The project is ``WANDB_PROJECT`` if set, else ``tracking.project``; the entity is ``WANDB_ENTITY`` if set,
else wandb's default (the logged-in user). A run's config is the resolved settings of its stage as a nested
dict (:func:`stage_config`), so runs filter and group by any setting (``ar.train.lr``, ``dmd.lora.rank``).
A resumed training run continues the same wandb run: its id is kept in the training checkpoint.
``disabled`` (or :class:`NullTracker`) logs nothing and starts no wandb process.

Tracking only reads what the stage computed: it draws no random numbers (wandb's run ids come from
``secrets``) and runs no model, so a tracked run's numbers are those of an untracked one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from longlive.config import Preset, TrackingConfig

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "longlive"


class Tracker(Protocol):
    run_id: str | None

    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def finish(self, summary: dict[str, Any] | None = None) -> None: ...


class NullTracker:
    run_id = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        pass


class WandbTracker:
    def __init__(self, run: Any) -> None:
        self.run = run
        self.run_id = run.id

    def log(self, metrics: dict[str, Any], step: int) -> None:
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


def wandb_target(cfg: TrackingConfig | None) -> tuple[str, str | None]:
    """``(project, entity)``: wandb's own ``WANDB_PROJECT`` / ``WANDB_ENTITY`` first (an explicit ``project=``
    to ``wandb.init`` would silently beat the variable), then ``tracking.project`` and wandb's default entity."""
    project = os.environ.get("WANDB_PROJECT") or (cfg.project if cfg else DEFAULT_PROJECT)
    return project, os.environ.get("WANDB_ENTITY") or None


def import_wandb():
    """wandb, or one line saying how to get it or do without it (it comes with the ``pipeline`` extra)."""
    try:
        import wandb
    except ImportError as e:
        raise RuntimeError(f"wandb is not importable ({e}): install it (pip install '.[pipeline]') or turn tracking "
                           "off with WANDB_MODE=disabled") from None
    return wandb


def _plain(value: Any) -> Any:
    """Settings as JSON values: pydantic models as nested dicts, tuples as lists."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def stage_config(preset: Preset, stage: str, sections: Iterable[str] = (), **extra: Any) -> dict[str, Any]:
    """What one stage run used, for a run's config: the preset's name, seed and device, the ``sections`` of the
    preset the stage reads (``ar``, ``dit``, ...; as nested dicts, not strings), then ``extra`` (the stage's own
    resolved values: a variant's name, a section as the stage actually ran it). ``stage`` is the DVC stage
    (it becomes the run's job type)."""
    out: dict[str, Any] = {"preset": preset.name, "stage": stage, "seed": preset.seed, "device": preset.device,
                           "cpu_threads": preset.cpu_threads}
    for name in sections:
        out[name] = _plain(getattr(preset, "validate_" if name == "validate" else name))
    out.update({k: _plain(v) for k, v in extra.items()})
    return out


def start_tracking(
    name: str,
    run_dir: str | os.PathLike,
    config: dict[str, Any],
    cfg: TrackingConfig | None = None,
    *,
    run_id: str | None = None,
    group: str | None = None,
    job_type: str | None = None,
) -> Tracker:
    """A tracker for one run; ``run_id`` resumes an earlier wandb run (after a restart). ``job_type`` defaults to
    ``config["stage"]`` (see :func:`stage_config`)."""
    mode = wandb_mode(cfg)
    if mode == "disabled":
        return NullTracker()
    wandb = import_wandb()  # imported here: a disabled tracker costs nothing

    project, entity = wandb_target(cfg)
    # Absolute: the wandb-core service keeps the working directory of the process's first run and would
    # resolve a relative one against it (a later run after a chdir would write its log somewhere else)
    wandb_dir = Path(run_dir).resolve()
    wandb_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=project,
        entity=entity,
        name=name,
        group=group,
        job_type=job_type or config.get("stage"),
        dir=str(wandb_dir),
        mode=mode,
        config=_plain(config),
        id=run_id,
        resume="allow" if run_id else None,
        settings=wandb.Settings(console="off", silent=True),
    )
    log.info("%s: wandb %s run %s (project %s) under %s", name, mode, run.id, project, wandb_dir / "wandb")
    return WandbTracker(run)
