"""wandb record of an evaluation: every variant's metrics, the regression check and the sample videos.

Uses :func:`longlive.train.tracking.start_tracking`, so the mode is the same as training's: offline under
``run_dir`` unless ``WANDB_MODE`` or ``tracking.wandb_mode`` says ``online`` (``disabled`` logs nothing).
"""

from __future__ import annotations

import os
from pathlib import Path

from longlive.config import TrackingConfig

MAX_VIDEOS_PER_VARIANT = 8


def _numbers(metrics: dict, prefix: str) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            continue  # info: goes to the run's config
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}/{k}"] = float(v)
    return out


def log_evaluation(
    metrics: dict[str, dict], *, run_dir: str | os.PathLike, samples_dir: str | os.PathLike | None = None,
    comparison: dict | None = None, cfg: TrackingConfig | None = None, name: str = "evaluate",
    preset: str | None = None,
) -> str | None:
    """Log ``{variant: metrics}``, the regression ``comparison`` (``Comparison.to_dict()``) and up to
    :data:`MAX_VIDEOS_PER_VARIANT` sample mp4s per variant; returns the wandb run id (None when disabled)."""
    from longlive.train.tracking import WandbTracker, start_tracking

    config = {"preset": preset, "variants": {v: m.get("info", {}) for v, m in metrics.items()}}
    tracker = start_tracking(name, run_dir, config, cfg, group="evaluate")
    if not isinstance(tracker, WandbTracker):
        tracker.finish()
        return None
    import wandb

    payload: dict = {}
    for variant, m in metrics.items():
        payload.update(_numbers(m, variant))
        if samples_dir is not None:
            for video in sorted((Path(samples_dir) / variant).glob("*.mp4"))[:MAX_VIDEOS_PER_VARIANT]:
                payload[f"{variant}/samples/{video.stem}"] = wandb.Video(str(video), format="mp4")
    summary = {}
    if comparison is not None:
        payload["regression/passed"] = float(comparison["passed"])
        rows = comparison["checks"]
        cols = ["variant", "metric", "baseline", "current", "allowed", "status", "note"]
        payload["regression/checks"] = wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])
        summary = {"regression_passed": comparison["passed"], "regressed": ", ".join(comparison["regressed"])}
    tracker.run.log(payload, step=0)
    run_id = tracker.run_id
    tracker.finish(summary)
    return run_id
