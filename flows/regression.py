"""Scheduled regression evaluation: the DAG up to ``evaluate`` (the pipeline flow's orchestration: one task per
stage item, DVC reruns only what changed), compare with the committed baseline, publish Prefect artifacts, log
to wandb, and fail the flow run on a regression.

Artifacts: ``evaluate-metrics`` (table: every variant's metrics, from the stage task), ``run-report`` (markdown:
stages, metrics, samples, plots, release), ``regression-check`` (table: baseline, current, change, allowed,
status per gated metric) and ``regression-report`` (markdown: PASS/FAIL, what regressed, the table). wandb
(offline by default, under ``.work/evaluate``): the metrics, the check and the sample videos.

The nightly schedule is the ``nightly`` deployment in prefect.yaml (cron, work pools).
Run once:            python -m flows.regression
Serve on a schedule: python -m flows.regression --serve --cron "0 4 * * *"   (no work pools: runs here)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Failed, State

from flows.pipeline import recorded_preset, repo_path, run_pipeline
from longlive.config import ConfigError, load_preset
from longlive.eval.regress import compare, default_baseline, load_baseline, load_metrics


class RegressionDetected(RuntimeError):
    """The evaluation ran and a gated metric got worse than the baseline allows."""


@task(task_run_name="compare with {baseline}")
def check(repo: str, preset: str, baseline: str, hardware: str = "auto") -> dict:
    """Compare ``reports/evaluate/metrics`` with the baseline; publishes the table and markdown artifacts."""
    log = get_run_logger()
    result = compare(load_baseline(baseline), load_metrics(Path(repo) / "reports/evaluate/metrics"),
                     hardware=hardware, baseline_path=baseline, preset=preset)
    create_table_artifact(key="regression-check", table=result.rows(),
                          description=f"{'PASS' if result.passed else 'FAIL'}: {result.summary()}")
    create_markdown_artifact(key="regression-report", markdown=result.markdown(),
                             description=f"regression check of preset {preset} against {baseline}")
    (log.info if result.passed else log.error)(result.summary())
    return result.to_dict()


@task(task_run_name="wandb")
def track(repo: str, preset: str, comparison: dict) -> str | None:
    """Metrics, the check and the sample videos to wandb (tracking.wandb_mode; offline by default)."""
    from longlive.eval.tracking import log_evaluation

    root = Path(repo)
    cfg = load_preset(preset, root / "params.yaml").tracking
    return log_evaluation(load_metrics(root / "reports/evaluate/metrics"), run_dir=root / ".work/evaluate",
                          samples_dir=root / "reports/evaluate/samples", comparison=comparison, cfg=cfg,
                          name=f"regression-{preset}", preset=preset)


@flow(name="longlive-regression", log_prints=True)
def regression(repo_dir: str = ".", baseline: str | None = None, hardware: str = "auto", wandb: bool = True,
               max_parallel: int = 2, retries: int = 2, retry_delay_s: float = 60.0,
               stage_deployments: dict[str, str] | None = None, poll_s: float = 2.0) -> dict | State:
    """Evaluate (what ``evaluate`` needs, item by item), compare, record; a failed stage or a regression fails
    the run. The preset is the one params.yaml records (what DVC ran)."""
    repo = repo_path(repo_dir)
    try:
        name = recorded_preset(repo) or "tiny"
    except ConfigError as e:
        return Failed(message=str(e))
    base = Path(baseline) if baseline else repo / default_baseline(name)
    _, failure = run_pipeline(repo, ["evaluate"], "LongLive regression", max_parallel=max_parallel,
                              retries=retries, retry_delay_s=retry_delay_s, stage_deployments=stage_deployments,
                              poll_s=poll_s)
    if failure:
        return Failed(message=failure)
    result = check(str(repo), name, str(base), hardware)
    if wandb:
        track(str(repo), name, result)
    if not result["passed"]:
        raise RegressionDetected(result["summary"])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", action="store_true", help="serve a scheduled deployment instead of running once")
    ap.add_argument("--cron", default="0 4 * * *", help="schedule for --serve (default: daily 04:00)")
    ap.add_argument("--name", default="nightly-regression", help="deployment name for --serve")
    ap.add_argument("--repo-dir", default=".")
    ap.add_argument("--baseline", default=None, help="default: benchmarks/baselines/<preset>.json in the repo")
    ap.add_argument("--hardware", choices=("auto", "always", "never"), default="auto")
    ap.add_argument("--max-parallel", type=int, default=2, help="stage items running at once (default 2)")
    ap.add_argument("--no-wandb", action="store_true")
    args = ap.parse_args()
    params = {"repo_dir": str(Path(args.repo_dir).resolve()), "baseline": args.baseline,
              "hardware": args.hardware, "wandb": not args.no_wandb, "max_parallel": args.max_parallel}
    if args.serve:
        regression.serve(name=args.name, cron=args.cron, parameters=params, tags=["longlive", "regression"])
        return
    state = regression(**params, return_state=True)
    if not state.is_completed():
        exc = state.result(raise_on_failure=False)
        sys.exit(f"regression: {exc}" if isinstance(exc, RegressionDetected) else state.message)


if __name__ == "__main__":
    main()
