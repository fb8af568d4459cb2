"""wandb record of an evaluation: every variant's metrics (as scalars and as one table), the regression check
and the sample videos.

Uses :func:`longlive.tracking.start_tracking`, so mode, project and entity follow the same rules as
training's: offline under ``run_dir`` unless ``WANDB_MODE`` or ``tracking.wandb_mode`` says ``online``
(``disabled`` logs nothing); ``WANDB_PROJECT`` / ``WANDB_ENTITY`` pick where the run goes. It only reads the
evaluation's outputs (metrics, mp4 files): nothing is generated or scored again.
"""

from __future__ import annotations

import os
from pathlib import Path

from longlive.config import TrackingConfig

MAX_VIDEOS_PER_VARIANT = 8
TABLE_INFO = ("kind", "quant", "denoising_steps", "checkpoint", "device")  # the info columns of the metrics table


def _numbers(metrics: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            continue  # info: goes to the run's config and the table's text columns
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def metrics_table(metrics: dict[str, dict]) -> tuple[list[str], list[list]]:
    """``(columns, rows)``: one row per variant, its info (:data:`TABLE_INFO`) then every number any variant has
    (in first-seen order; None where a variant lacks one, e.g. a VBench dimension that did not run)."""
    numbers = {v: _numbers(m) for v, m in metrics.items()}
    keys = list(dict.fromkeys(k for n in numbers.values() for k in n))
    rows = [[v] + [m.get("info", {}).get(c) for c in TABLE_INFO] + [numbers[v].get(k) for k in keys]
            for v, m in metrics.items()]
    return ["variant", *TABLE_INFO, *keys], rows


def log_evaluation(
    metrics: dict[str, dict], *, run_dir: str | os.PathLike, samples_dir: str | os.PathLike | None = None,
    comparison: dict | None = None, cfg: TrackingConfig | None = None, name: str = "evaluate",
    preset: str | None = None, config: dict | None = None,
) -> str | None:
    """Log ``{variant: metrics}`` (scalars ``<variant>/<metric>`` and the table ``metrics``), the regression
    ``comparison`` (``Comparison.to_dict()``) and up to :data:`MAX_VIDEOS_PER_VARIANT` sample mp4s per variant
    (``<variant>/samples/<name>``); returns the wandb run id (None when disabled). ``config``: the run's config
    (the stage's resolved settings, :func:`longlive.tracking.stage_config`); each variant's ``info`` is
    added under ``variants``."""
    from longlive.tracking import WandbTracker, import_wandb, start_tracking

    variants = {v: m.get("info", {}) for v, m in metrics.items()}
    run_config = {"preset": preset, **(config or {})}
    run_config["variants"] = {v: {**variants[v], **run_config.get("variants", {}).get(v, {})} for v in variants}
    tracker = start_tracking(name, run_dir, run_config, cfg, group="evaluate", job_type="evaluate")
    if not isinstance(tracker, WandbTracker):
        tracker.finish()
        return None
    wandb = import_wandb()

    payload: dict = {}
    for variant, m in metrics.items():
        payload.update(_numbers(m, f"{variant}/"))
        if samples_dir is not None:
            for video in sorted((Path(samples_dir) / variant).glob("*.mp4"))[:MAX_VIDEOS_PER_VARIANT]:
                payload[f"{variant}/samples/{video.stem}"] = wandb.Video(str(video), format="mp4")
    columns, rows = metrics_table(metrics)
    payload["metrics"] = wandb.Table(columns=columns, data=rows)
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


RUN_DETAILS = ("checkpoint", "kind", "quant", "nvfp4_source", "backend", "ar_config", "inference")


def log_results(results: dict, preset, *, samples_dir: str | os.PathLike, run_dir: str | os.PathLike) -> str | None:
    """The ``evaluate`` stage's record of ``run_evaluate``'s results (``{variant: VariantResult}``): metrics, the
    table and the samples, with the stage's resolved settings (each variant's own inference settings, export
    layout and quantization included) as the run's config."""
    from longlive.tracking import stage_config

    config = stage_config(preset, "evaluate", ("video", "inference", "quant", "evaluate"), variants={
        n: {k: r.details[k] for k in RUN_DETAILS if k in r.details} for n, r in results.items()})
    return log_evaluation({n: r.metrics for n, r in results.items()}, run_dir=run_dir, samples_dir=samples_dir,
                          cfg=preset.tracking, preset=preset.name, config=config)
