"""The Prefect flow that orchestrates the DVC DAG: one task per stage item (``train_ar@t2v``), each running
``dvc repro --single-item ITEM``, started as soon as the items it depends on have finished, at most
``max_parallel`` at a time. DVC keeps deciding what is stale and recording lineage; Prefect schedules,
routes, retries and reports.

* The DAG is DVC's (``flows/dag.py``): a stage added to dvc.yaml is a task of the next run.
* Routing: each item needs the ``cpu`` or the ``gpu`` pool. With ``stage_deployments`` (prefect.yaml sets
  it) an item runs as a flow run of the ``longlive-stage`` deployment of its pool, picked up by that pool's
  worker; without, it runs in this flow's process (one machine, ``python -m flows.pipeline``).
* Retries only for failures a retry can fix (preemption, network, a lock held too long:
  ``flows/repro.py``); a deterministic failure fails at once and the flow run's message is the stage's own
  error line.
* Artifacts: a table of each item's metrics, and one markdown report per run (``flows/report.py``).

Run once:            python -m flows.pipeline [--target evaluate] [--max-parallel 2]
Work pools:          prefect.yaml (prefect deploy --all; a worker per pool), see the README
"""

from __future__ import annotations

import argparse
import concurrent.futures
import subprocess
import sys
from pathlib import Path

import httpx
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as current_flow_run, task_run as current_task_run
from prefect.states import Failed, State

from flows import report
from flows.dag import RESOURCES, Dag, DagError, read_dag
from flows.repro import Outcome, StageFailed, dvc_executable, run_repro
from longlive import config

TRANSIENT_STATE = "TransientFailure"  # name of a stage flow run's Failed state when a retry may succeed
STAGE_FLOW = "longlive-stage"


def retry_if_transient(_task, _task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry a stage that failed transiently, or a lost connection to the API
    (routed mode); never a deterministic failure."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if isinstance(exc, StageFailed):
        return exc.transient
    return isinstance(exc, (ConnectionError, TimeoutError, httpx.TransportError))


def _metrics_artifact(item: str, repo: Path, metrics: list[str]) -> None:
    rows = report.metric_rows(repo, metrics, item)
    if rows:
        create_table_artifact(key=report.artifact_key(f"{item}-metrics"), table=rows,
                              description=f"metrics of `{item}` ({', '.join(metrics)})")


def _run_here(item: str, repo: Path, metrics: list[str]) -> Outcome:
    outcome = run_repro(item, repo, get_run_logger())
    if outcome.ok:
        _metrics_artifact(item, repo, metrics)
    return outcome


@task(name="dvc-repro", task_run_name="{item}", cache_policy=NO_CACHE, retry_condition_fn=retry_if_transient)
def dvc_stage(item: str, repo_dir: str, resource: str, metrics: list[str], deployment: str | None = None,
              poll_s: float = 2.0) -> dict:
    """One stage item: here (``dvc repro --single-item``), or as a flow run of ``deployment`` on its pool."""
    repo = Path(repo_dir)
    if not deployment:
        outcome = _run_here(item, repo, metrics)
        if not outcome.ok:
            raise StageFailed(outcome.message(), outcome.transient, outcome)
        return {"item": item, "ran": outcome.ran, "seconds": outcome.seconds}
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters={"item": item, "repo_dir": repo_dir, "metrics": metrics},
                         flow_run_name=item, tags=[resource], poll_interval=poll_s, as_subflow=True,
                         idempotency_key=f"{current_task_run.id}-{current_task_run.run_count}")
    state = run.state
    if state is not None and state.is_completed():
        return {"item": item, "ran": None, "seconds": run.total_run_time.total_seconds(), "flow_run": str(run.id)}
    name = state.name if state is not None else "unknown"
    message = (state.message if state is not None else None) or f"{item}: flow run {run.id} ended {name}"
    if state is not None and state.is_crashed():  # its process or machine died: preemption, a lost node
        raise StageFailed(f"{item}: its flow run crashed: {message}\n{deployment} flow run {run.id}", True)
    raise StageFailed(message, name == TRANSIENT_STATE)


@flow(name=STAGE_FLOW, flow_run_name="{item}", log_prints=True)
def stage(item: str, repo_dir: str = ".", metrics: list[str] | None = None) -> dict | State:
    """One stage item on this worker's machine; deployed once per work pool (prefect.yaml)."""
    repo = repo_path(repo_dir)
    try:
        recorded_preset(repo)  # this worker's environment is the stage's: refuse a LONGLIVE_PRESET it would inherit
    except config.ConfigError as e:
        return Failed(message=f"{item}: {e}")
    outcome = _run_here(item, repo, list(metrics or []))
    if outcome.ok:
        return {"item": item, "ran": outcome.ran, "seconds": outcome.seconds}
    return Failed(message=outcome.message(), name=TRANSIENT_STATE if outcome.transient else "Failed")


def repo_path(repo_dir: str) -> Path:
    repo = Path(repo_dir).resolve()
    if not (repo / "dvc.yaml").is_file():
        raise DagError(f"{repo} has no dvc.yaml: repo_dir must be the DVC project (the flow run's working "
                       "directory is the one prefect.yaml's pull step sets)")
    return repo


def _check(max_parallel: int, stage_deployments: dict[str, str] | None) -> dict[str, str]:
    if max_parallel < 1:
        raise ValueError(f"max_parallel is {max_parallel}: it must be at least 1")
    deployments = dict(stage_deployments or {})
    unknown = sorted(set(deployments) - set(RESOURCES))
    if unknown:
        raise ValueError(f"stage_deployments has {unknown}: its keys are resources, {list(RESOURCES)}")
    bad = [d for d in deployments.values() if d.count("/") != 1]
    if bad:
        raise ValueError(f"stage_deployments {bad}: a deployment is named 'flow/deployment', "
                         f"e.g. '{STAGE_FLOW}/gpu'")
    return deployments


def run_dag(dag: Dag, repo: Path, max_parallel: int = 2, keep_going: bool = False, retries: int = 2,
            retry_delay_s: float = 60.0, stage_deployments: dict[str, str] | None = None,
            poll_s: float = 2.0) -> tuple[list[report.ItemRow], list[tuple[str, str]]]:
    """Submit each item once its upstream items completed, keeping at most ``max_parallel`` in flight.

    Items are submitted when ready, not all at once with ``wait_for`` pending: a Prefect task waiting on an
    upstream future still holds its worker thread, so a pool of ``max_parallel`` threads would run fewer than
    ``max_parallel`` stages whenever a waiting item sat in a slot. ``wait_for`` still names the upstream
    futures, so Prefect records the dependencies. After a failure nothing new starts (``keep_going``: only
    what depends on the failed item is skipped), as with ``dvc repro [--keep-going]``.
    """
    log = get_run_logger()
    deployments = _check(max_parallel, stage_deployments)
    task_ = dvc_stage.with_options(retries=retries, retry_delay_seconds=retry_delay_s)
    depth = dag.downstream_depth()
    waiting = list(dag.items)  # topological order
    status: dict[str, str] = {}
    futures, results, running = {}, {}, {}
    failures: list[tuple[str, str]] = []  # (item, message), in the order they failed
    while True:
        if not failures or keep_going:
            for name in list(waiting):  # upstream first, so a skip propagates down in one pass
                if any(status.get(up) in ("FAILED", "NOT RUN") for up in dag.items[name].upstream):
                    waiting.remove(name)
                    status[name] = "NOT RUN"
            ready = [n for n in waiting if all(status.get(up) == "COMPLETED" for up in dag.items[n].upstream)]
            ready.sort(key=lambda n: -depth[n])  # the longest chain first; ties keep dvc.yaml's order
            for name in ready[:max_parallel - len(running)]:
                waiting.remove(name)
                item = dag.items[name]
                # tagged with its resource: `prefect concurrency-limit create gpu N` caps GPU items across runs
                fut = task_.with_options(tags={item.resource, "dvc"}).submit(item=name, repo_dir=str(repo), resource=item.resource, metrics=list(item.metrics),
                                   deployment=deployments.get(item.resource), poll_s=poll_s,
                                   wait_for=[futures[up] for up in item.upstream])
                futures[name] = fut
                running[fut.wrapped_future] = name
        if not running:
            break
        done, _ = concurrent.futures.wait(list(running), return_when=concurrent.futures.FIRST_COMPLETED)
        for w in done:
            name = running.pop(w)
            state = w.result()  # the task run's final state
            if state.is_completed():
                status[name], results[name] = "COMPLETED", state.result()
            else:
                status[name] = "FAILED"
                exc = state.result(raise_on_failure=False)
                failures.append((name, str(exc) if isinstance(exc, StageFailed) else f"{name}: {state.message}"))
                log.error("%s failed: %s", name, failures[-1][1].splitlines()[0])
    for name in waiting:
        status[name] = "NOT RUN"
    rows = _rows(dag, status, futures, results)
    skipped = [r.item for r in rows if r.state == "NOT RUN"]
    if skipped:
        log.warning("not run after the failure: %s", ", ".join(skipped))
    return rows, failures


def _rows(dag: Dag, status: dict, futures: dict, results: dict) -> list[report.ItemRow]:
    from prefect.client.orchestration import get_client

    runs = {}
    with get_client(sync_client=True) as client:
        for name, fut in futures.items():
            runs[name] = client.read_task_run(fut.task_run_id)
    rows = []
    for name, item in dag.items.items():
        tr, res = runs.get(name), results.get(name) or {}
        rows.append(report.ItemRow(
            item=name, resource=item.resource, state=status[name], attempts=tr.run_count if tr else 0,
            seconds=res.get("seconds", tr.total_run_time.total_seconds() if tr else None), ran=res.get("ran")))
    return rows


def recorded_preset(repo: Path) -> str | None:
    """The preset params.yaml records: what every item's ``dvc repro`` runs and DVC records. There is no preset
    parameter: another preset is another params.yaml (``dvc exp run -S preset=NAME``, then commit or apply it).
    A ``LONGLIVE_PRESET`` in this process, which the stages inherit, must agree (ConfigError naming the route).
    None for a DVC project without params.yaml (no presets to disagree with)."""
    path = repo / "params.yaml"
    return config.recorded_preset(path) if path.is_file() else None


def _render_plots(repo: Path) -> Path | None:
    """``dvc plots show`` into .work/prefect/<flow run>/plots: one HTML page with every plot of the project."""
    out = repo / ".work" / "prefect" / str(current_flow_run.id or "local") / "plots"
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([dvc_executable(), "plots", "show", "-o", str(out)], cwd=repo, capture_output=True, text=True)
    html = out / "index.html"
    if proc.returncode or not html.is_file():
        get_run_logger().warning("dvc plots show failed, the report links the plot files only: %s",
                                 (proc.stderr or proc.stdout).strip()[-500:])
        return None
    return html


def run_pipeline(repo: Path, targets: list[str] | None, title: str, **options) -> tuple[list[report.ItemRow], str | None]:
    """Read the DAG, run it (``run_dag``), publish the run's markdown report; returns the rows and the
    failure message (None on success), whose first line is the first failed stage's own error line."""
    log = get_run_logger()
    try:
        preset = recorded_preset(repo)
    except config.ConfigError as e:  # before any item runs: each would fail with this line
        return [], str(e)
    dag = read_dag(repo)
    if targets:
        dag = dag.upstream_closure(targets)
    log.info("%d items: %s", len(dag.items), ", ".join(f"{n} ({i.resource})" for n, i in dag.items.items()))
    rows, failures = run_dag(dag, repo, **options)
    failure = None
    if failures:
        failure = failures[0][1] + (f"\n(also failed: {', '.join(item for item, _ in failures[1:])})"
                                    if len(failures) > 1 else "")
    markdown = report.render(repo, title, rows, failure, plots_html=_render_plots(repo), preset=preset)
    create_markdown_artifact(key="run-report", markdown=markdown,
                             description=f"{title}: stages, metrics, samples, plots, release")
    return rows, failure


@flow(name="longlive-pipeline", log_prints=True)
def pipeline(targets: list[str] | None = None, repo_dir: str = ".", max_parallel: int = 2, keep_going: bool = False,
             retries: int = 2, retry_delay_s: float = 60.0, stage_deployments: dict[str, str] | None = None,
             poll_s: float = 2.0) -> dict | State:
    """The DAG (or the part ``targets`` need) as one task per stage item; see the module docstring.

    ``stage_deployments``: resource -> deployment, e.g. ``{"gpu": "longlive-stage/gpu"}``; a resource not
    named runs in this flow's process. ``poll_s``: how often a routed item checks its flow run.
    """
    repo = repo_path(repo_dir)
    rows, failure = run_pipeline(repo, targets, "LongLive pipeline", max_parallel=max_parallel,
                                 keep_going=keep_going, retries=retries, retry_delay_s=retry_delay_s,
                                 stage_deployments=stage_deployments, poll_s=poll_s)
    if failure:
        return Failed(message=failure)
    return {r.item: r.state for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo-dir", default=".")
    ap.add_argument("--target", action="append", help="run only what this stage (or item) needs; repeatable")
    ap.add_argument("--max-parallel", type=int, default=2, help="stage items running at once (default 2)")
    ap.add_argument("--keep-going", action="store_true", help="after a failure, run what does not depend on it")
    ap.add_argument("--retries", type=int, default=2, help="retries of a transient failure (default 2)")
    ap.add_argument("--retry-delay", type=float, default=60.0, help="seconds before a retry (default 60)")
    ap.add_argument("--serve", action="store_true", help="serve a scheduled deployment instead of running once")
    ap.add_argument("--cron", default="0 3 * * *", help="schedule for --serve (default: nightly 03:00)")
    ap.add_argument("--name", default="nightly", help="deployment name for --serve")
    args = ap.parse_args()
    params = {"repo_dir": str(Path(args.repo_dir).resolve()), "targets": args.target,
              "max_parallel": args.max_parallel, "keep_going": args.keep_going, "retries": args.retries,
              "retry_delay_s": args.retry_delay}
    if args.serve:
        pipeline.serve(name=args.name, cron=args.cron, parameters=params, tags=["longlive"])
        return
    state = pipeline(**params, return_state=True)
    if not state.is_completed():
        sys.exit(state.message)


if __name__ == "__main__":
    main()
