"""Prefect flow over the DVC DAG: each task runs ``dvc repro STAGE``, so caching and lineage stay
DVC's; Prefect adds scheduling, retries, logs and a table artifact of each stage's metrics.

Run once:            python -m flows.pipeline
Serve on a schedule: python -m flows.pipeline --serve --cron "0 3 * * *"   (needs a Prefect API,
                     e.g. `prefect server start --host 127.0.0.1` and PREFECT_API_URL set)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

STAGES = ["synth", "ingest", "base", "encode", "validate", "distill_decoder", "train_ar", "train_dmd", "train_qat", "quantize", "evaluate", "publish"]


def _flatten(d: dict, prefix: str = "") -> list[dict]:
    rows = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            rows += _flatten(v, key + ".")
        elif not isinstance(v, list):
            rows.append({"metric": key, "value": v})
    return rows


@task(retries=1, retry_delay_seconds=5, task_run_name="dvc repro {stage}")
def run_stage(stage: str, repo_dir: str, preset: str | None = None) -> dict:
    """``dvc repro STAGE`` in ``repo_dir``; its output goes to the Prefect log line by line."""
    log = get_run_logger()
    env = dict(os.environ)
    if preset:
        env["LONGLIVE_PRESET"] = preset
    proc = subprocess.Popen(
        ["dvc", "repro", stage], cwd=repo_dir, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    tail: list[str] = []
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            log.info("%s | %s", stage, line)
            tail = (tail + [line])[-30:]
    if proc.wait():
        raise RuntimeError(f"`dvc repro {stage}` failed (exit {proc.returncode}):\n" + "\n".join(tail))
    # reports/STAGE/metrics.json, or reports/STAGE/ITEM/metrics.json for a `foreach` stage, or
    # reports/STAGE/metrics/ITEM.json for a stage with a metrics directory (evaluate: one file per variant)
    metrics = {}
    for path in sorted((Path(repo_dir) / "reports" / stage).glob("**/metrics.json")):
        item = path.parent.relative_to(Path(repo_dir) / "reports" / stage).as_posix()
        metrics[item if item != "." else stage] = json.loads(path.read_text())
    for path in sorted((Path(repo_dir) / "reports" / stage / "metrics").glob("*.json")):
        metrics[path.stem] = json.loads(path.read_text())
    if metrics:
        create_table_artifact(
            key=f"{stage.replace('_', '-')}-metrics",
            table=[{"item": item, **row} for item, m in metrics.items() for row in _flatten(m)],
            description=f"Metrics of stage `{stage}` (reports/{stage}/)",
        )
    return metrics


@flow(name="longlive-pipeline", log_prints=True)
def pipeline(stages: list[str] = STAGES, repo_dir: str = ".", preset: str | None = None) -> dict:
    """Run the DVC stages in order; a failed stage fails the flow run and skips the rest."""
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; choose from {STAGES}")
    repo = str(Path(repo_dir).resolve())
    return {stage: run_stage(stage, repo, preset) for stage in stages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", action="store_true", help="serve a scheduled deployment instead of running once")
    ap.add_argument("--cron", default="0 3 * * *", help="schedule for --serve (default: nightly 03:00)")
    ap.add_argument("--name", default="nightly", help="deployment name for --serve")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--repo-dir", default=".")
    args = ap.parse_args()
    params = {"repo_dir": str(Path(args.repo_dir).resolve()), "preset": args.preset}
    if args.serve:
        pipeline.serve(name=args.name, cron=args.cron, parameters=params, tags=["longlive"])
    else:
        pipeline(**params)


if __name__ == "__main__":
    main()
