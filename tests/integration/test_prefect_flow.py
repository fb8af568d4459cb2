"""The Prefect flow orchestrates the DVC DAG (flows/).

Fast tests: the DAG is DVC's (a new stage appears by itself, with its pool), a stage's output keeps its log
levels, failures are classed transient or deterministic, stage processes log without third-party chatter.

Server tests (a real `prefect server start` on 127.0.0.1, work pools with process workers):
* a synthetic project of cheap stages (step.py: sleeps and writes) runs through the `dag` deployment of the
  repository's prefect.yaml: independent items overlap, at most max_parallel run at once, each item runs
  on its pool's worker, a preempted item is retried, a deterministic failure is not and its error is the
  flow run's message, the run's markdown artifact links the samples and the release. Synthetic because
  the real fast DAG (26 items of real training on 2 cores) would take many minutes for the same assertions.
* the real fast project (tests/_project.py) up to `validate`: the one place real stage processes matter,
  since great-expectations' chatter and import-time warnings only happen in them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from _project import ROOT, make_project, run

sys.path.insert(0, str(ROOT))
from flows import report  # noqa: E402
from flows.dag import DagError, read_dag  # noqa: E402
from flows.repro import _Reader, classify, repro_command  # noqa: E402

# ---------------------------------------------------------------------------------------------- fast tests


def _dot_graph(repo: Path) -> tuple[set[str], set[tuple[str, str]]]:
    dot = run(["dvc", "dag", "--dot"], repo).stdout
    nodes = set(re.findall(r'^"([^"]+)";$', dot, re.M))
    edges = set(re.findall(r'^"([^"]+)" -> "([^"]+)";$', dot, re.M))
    return nodes, edges


def test_the_dag_is_dvcs_with_each_stage_on_its_pool():
    dag = read_dag(ROOT)
    nodes, edges = _dot_graph(ROOT)
    assert set(dag.items) == nodes and "ingest" in nodes  # the newest stage, never named in flows/
    assert {(up, name) for name, item in dag.items.items() for up in item.upstream} == edges
    order = list(dag.items)
    assert all(order.index(up) < order.index(name) for up, name in edges)
    cpu = {n for n, i in dag.items.items() if i.resource == "cpu"}
    assert cpu == {"synth", "ingest", "validate", "publish"}, cpu
    # the artifacts show every figure (metrics.json), not just the headline DVC metrics (headline.json)
    assert dag.items["train_ar@t2v"].metrics == ("reports/train_ar/t2v/metrics.json",)
    assert dag.items["base"].metrics == ("reports/base/metrics.json",)
    assert dag.items["evaluate"].metrics == ("reports/evaluate/metrics",)
    assert set(dag.upstream_closure(["train_ar"]).items) == {"synth", "ingest", "base", "encode", "validate",
                                                              "train_ar@t2v", "train_ar@i2v"}
    with pytest.raises(DagError, match="unknown stage"):
        dag.upstream_closure(["trian_ar"])


def _dvc_project(path: Path, dvc_yaml: str) -> Path:
    path.mkdir(parents=True)
    (path / "dvc.yaml").write_text(textwrap.dedent(dvc_yaml))
    run(["git", "init", "-q"], path)
    run(["dvc", "init", "-q"], path)
    return path


def test_a_new_stage_appears_with_its_declared_pool(tmp_path, caplog):
    repo = _dvc_project(tmp_path / "p", """
        stages:
          fetch:
            cmd: python -c "open('a', 'w')"
            meta: {resource: cpu}
            outs: [a]
          crunch:
            cmd: python -c "open('b', 'w')"
            deps: [a]
            outs: [b]
        """)
    with caplog.at_level(logging.WARNING, logger="flows.dag"):
        dag = read_dag(repo)
    assert [(n, i.resource, i.upstream) for n, i in dag.items.items()] == [
        ("fetch", "cpu", ()), ("crunch", "gpu", ("fetch",))]
    assert "meta: {resource: cpu}" in caplog.text  # the undeclared one is sent to the gpu pool, saying how to change it
    (repo / "dvc.yaml").write_text((repo / "dvc.yaml").read_text().replace("resource: cpu", "resource: tpu"))
    with pytest.raises(DagError, match="meta.resource is 'tpu'"):
        read_dag(repo)


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[tuple[int, str]] = []

    def emit(self, record):
        self.records.append((record.levelno, record.getMessage()))


def _feed(lines_by_stream: list[tuple[str, str]]) -> tuple[list[tuple[int, str]], _Reader]:
    log = logging.getLogger("test.reader")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    cap = _Capture()
    log.handlers = [cap]
    shared, dvc_errors, ran = [None], [], [False]
    readers = {s: _Reader(log, s, shared, dvc_errors, ran) for s in ("stdout", "stderr")}
    for stream, line in lines_by_stream:
        readers[stream].feed(line + "\n")
    for r in readers.values():
        r.close()
    return cap.records, readers["stderr"]


def test_stage_output_keeps_its_levels_and_names_its_error():
    rec = lambda level, msg, name="train_ar": json.dumps({"level": level, "logger": name, "message": msg})  # noqa: E731
    records, reader = _feed([
        ("stdout", "Running stage 'train_ar@t2v':"),
        ("stderr", rec("WARNING", "Failed to load _C.so", "torchao")),
        ("stderr", "W1206 20:15:19.854000 6602 torch/utils/_pytree.py:630] Enum subclass"),
        ("stderr", "Unable to import `torchao` Tensor objects."),  # a library's own handler: no level known
        ("stderr", rec("INFO", "stage train_ar, preset tiny")),
        ("stderr", "train: 33%|###  | 1/3 [00:01<00:02, 1.00it/s]\rtrain: 100%|#####| 3/3 [00:02<00:00, 1.50it/s]"),
        ("stderr", rec("ERROR", "uncaught exception\nTraceback (most recent call last):\n  File \"x.py\"\n"
                                "ValueError: shapes differ", "stages")),
        ("stderr", "ERROR: failed to reproduce 'train_ar@t2v': failed to run: python -m stages.train_ar, exited with 1"),
        ("stdout", "To track the changes with git, run:"),
    ])
    levels = [lvl for lvl, _ in records]
    assert levels == [logging.INFO, logging.WARNING, logging.WARNING, logging.WARNING, logging.INFO, logging.INFO,
                      logging.ERROR, logging.ERROR, logging.DEBUG], records
    assert records[5][1] == "train: 100%|#####| 3/3 [00:02<00:00, 1.50it/s]"  # a progress bar's last state only
    assert reader.last_error[0] == "ValueError: shapes differ"
    assert reader.dvc_errors == ["failed to reproduce 'train_ar@t2v': failed to run: python -m stages.train_ar, "
                                 "exited with 1"]
    assert reader.ran == [True]
    # a plain Python traceback (a child without our logging) is one ERROR record; its last line is the error
    records, reader = _feed([("stderr", "Traceback (most recent call last):"), ("stderr", '  File "step.py", line 3'),
                             ("stderr", "    raise OSError(5)"), ("stderr", "OSError: [Errno 5] I/O error")])
    assert records == [(logging.ERROR, 'Traceback (most recent call last):\n  File "step.py", line 3\n'
                                       "    raise OSError(5)\nOSError: [Errno 5] I/O error")]
    assert reader.last_error[0] == "OSError: [Errno 5] I/O error"


@pytest.mark.parametrize("status,error,dvc,transient", [
    (-15, None, [], True), (143, None, [], True), (137, None, [], True), (75, "x: store busy", [], True),
    (1, "ConnectionResetError: [Errno 104] Connection reset by peer", [], True),
    (1, "botocore.exceptions.ClientError: An error occurred (SlowDown) when calling PutObject", [], True),
    (1, "OSError: HTTP status 503 from https://huggingface.co", [], True),
    (None, None, ["Unable to acquire lock. Most likely another DVC process is running"], True),
    (1, "ValueError: broken on purpose", [], False),
    (1, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", [], False),
    (2, "train_ar: config error: dit.num_layers must be an integer", [], False),
    (1, "ValueError: timeout must be positive", [], False),  # a word in a message is not a network error
])
def test_only_transient_failures_are_retried(status, error, dvc, transient):
    assert classify(status, error, dvc) is transient


HOLD_LOCK = """
import os, time
from dvc.repo import Repo
while not os.path.exists("started"):  # the stage's command is running
    time.sleep(0.05)
repo = Repo(".")
repo.lock.lock()  # free while a stage's command runs: DVC holds it only to read the project and record results
print("held", flush=True)
time.sleep(5)  # past the 3 s a DVC process waits by default once the command is done
repo.lock.unlock()
"""


def test_a_finishing_item_waits_for_the_repo_lock(tmp_path):
    """What lets items run at once in one workspace: DVC frees its repo lock while a stage's command runs,
    and `--wait-for-lock` makes the finishing item wait for it (without it: "Unable to acquire lock")."""
    repo = _dvc_project(tmp_path / "p", """
        stages:
          a:
            cmd: python -c "import time; open('started', 'w'); time.sleep(1); open('a.txt', 'w')"
            outs: [a.txt]
        """)
    assert repro_command("a", "dvc") == ["dvc", "--wait-for-lock", "repro", "--single-item", "a"]
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK], cwd=repo, env=env, stdout=subprocess.PIPE, text=True)
    item = run(repro_command("a", "dvc"), repo, check=False, env=env)
    assert holder.wait(timeout=30) == 0 and holder.stdout.read() == "held\n"
    assert item.returncode == 0, item.stdout + item.stderr
    assert "a:" not in run(["dvc", "status"], repo).stdout  # recorded in dvc.lock


STAGE_PROCESS = """
import logging, warnings
import stages  # under flows/ (LONGLIVE_LOG_FORMAT=json) logging is set up here, before any library import
from stages._common import configure_logging
configure_logging("validate")
logging.getLogger("great_expectations.data_context").info("Skipping registering function get_context")
logging.getLogger("great_expectations.data_context").warning("a real third-party warning")
logging.getLogger("validate").info("stage validate, preset tiny")
logging.getLogger("longlive.data.validate").info("12 shards")
warnings.warn("deprecated thing")
raise ValueError("shard 3 is corrupt")
"""


def test_a_stage_process_logs_its_own_info_and_everyones_warnings():
    env = {**os.environ, "LONGLIVE_LOG_FORMAT": "json", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", STAGE_PROCESS], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout == ""
    recs = [json.loads(line) for line in proc.stderr.splitlines()]
    assert [(r["level"], r["logger"]) for r in recs] == [
        ("WARNING", "great_expectations.data_context"), ("INFO", "validate"), ("INFO", "longlive.data.validate"),
        ("WARNING", "py.warnings"), ("ERROR", "stages")], recs
    assert recs[-1]["message"].splitlines()[-1] == "ValueError: shard 3 is corrupt"  # the traceback kept with it
    # on a terminal: the same levels through rich
    proc = subprocess.run([sys.executable, "-c", STAGE_PROCESS.replace("raise ValueError", "print")], cwd=ROOT,
                          env={k: v for k, v in env.items() if k != "LONGLIVE_LOG_FORMAT"},
                          capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert "12 shards" in out and "real third-party warning" in out and "Skipping registering" not in out


def test_the_report_reads_where_the_stages_write():
    from longlive.eval import suite
    from stages import publish

    assert report.METRICS_DIR == Path("reports/evaluate") / suite.METRICS_DIR
    assert report.SAMPLES_DIR == Path("reports/evaluate") / suite.SAMPLES_DIR
    assert report.PLOTS_DIR == Path("reports/evaluate") / suite.PLOTS_DIR
    assert report.RELEASE == publish.OUT / "release.json"
    assert report.artifact_key("train_ar@t2v-4step-metrics") == "train-ar-t2v-4step-metrics"


# -------------------------------------------------------------------------------------------- server tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, sig=signal.SIGINT, wait: float = 20) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)  # a worker exits cleanly on Ctrl-C; on SIGTERM it keeps retrying the API
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect_home")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # a worker looks for runs every second (default 10)
        "COLUMNS": "250",
        # the `prefect`/`dvc`/`python` of this interpreter's environment, activated or not
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = open(home / "server.log", "w")
    server = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                pytest.fail("prefect server did not start:\n" + (home / "server.log").read_text()[-3000:])
            time.sleep(1)
    yield env
    _stop(server, signal.SIGTERM)
    log.close()


def api(env: dict, path: str, body: dict | None = None):
    url = env["PREFECT_API_URL"] + path
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"},
                                 method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def wait_final(env: dict, flow_run_id: str, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        fr = api(env, f"/flow_runs/{flow_run_id}")
        if fr["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return fr
        time.sleep(1)
    pytest.fail(f"flow run {flow_run_id} did not finish in {timeout} s: {fr['state']}")


def _ts(s: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    best = cur = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


STEP = '''\
"""A cheap stand-in for a stage: sleeps, writes its outputs, or fails as argv[2] says."""
import json, os, signal, sys, time
from pathlib import Path

name, mode, sleep = sys.argv[1], sys.argv[2], float(sys.argv[3])
start = time.time()
time.sleep(sleep)
if mode == "preempted-once":  # the first attempt is killed as a preempted job is
    marker = Path(".attempts") / name
    if not marker.exists():
        marker.parent.mkdir(exist_ok=True)
        marker.touch()
        os.kill(os.getpid(), signal.SIGTERM)
if mode == "broken":
    raise ValueError(f"{name} is broken on purpose")
Path("out").mkdir(exist_ok=True)
Path("out", name + ".json").write_text(json.dumps({"start": start, "end": time.time()}))
if name == "evaluate":
    for d in ("metrics", "samples/ar_t2v", "plots"):
        Path("reports/evaluate", d).mkdir(parents=True, exist_ok=True)
    Path("reports/evaluate/metrics/ar_t2v.json").write_text(json.dumps({"score": 0.5, "fps": 12.0}))
    Path("reports/evaluate/samples/ar_t2v/t2v_00.mp4").write_bytes(b"a video")
    Path("reports/evaluate/plots/speed.json").write_text(json.dumps([{"variant": "ar_t2v", "fps": 12.0}]))
if name == "publish":
    Path("releases/test-v1").mkdir(parents=True, exist_ok=True)
    Path("reports/publish").mkdir(parents=True, exist_ok=True)
    Path("reports/publish/release.json").write_text(json.dumps({"version": "test-v1", "url": "releases/test-v1"}))
'''

# synth and base overlap (one on each pool; 12 s each, so a worker that starts its flow run's process a few seconds
# late on a loaded 2-core machine still overlaps the other); then three items are ready and max_parallel=2 holds one back;
# publish (cpu) and evaluate (gpu) both follow train_ar, so the chain stays short
SYNTHETIC_DVC_YAML = """\
stages:
  synth:
    cmd: python step.py synth ok 12
    deps: [step.py]
    outs: [out/synth.json]
  base:
    cmd: python step.py base ok 12
    deps: [step.py]
    outs: [out/base.json]
  broken:
    cmd: python step.py broken broken 1
    meta: {resource: cpu}
    deps: [out/synth.json]
    outs: [out/broken.json]
  after_broken:
    cmd: python step.py after_broken ok 0
    meta: {resource: cpu}
    deps: [out/broken.json]
    outs: [out/after_broken.json]
  train_ar:
    foreach: {t2v: ok, i2v: preempted-once}
    do:
      cmd: python step.py train_ar-${key} ${item} 1
      deps: [out/synth.json, out/base.json]
      outs:
        - out/train_ar-${key}.json
  evaluate:
    cmd: python step.py evaluate ok 0
    deps: [out/train_ar-t2v.json, out/train_ar-i2v.json]
    outs:
      - out/evaluate.json
      - reports/evaluate/samples
    metrics:
      - reports/evaluate/metrics:
          cache: false
    plots:
      - reports/evaluate/plots/speed.json:
          cache: false
  publish:
    cmd: python step.py publish ok 0
    deps: [out/train_ar-t2v.json]
    outs:
      - reports/publish/release.json:
          cache: false
"""


@pytest.mark.slow
@pytest.mark.server
def test_deployment_fans_out_on_work_pools_retries_only_transient_failures_and_reports(prefect_env, tmp_path):
    env = prefect_env
    repo = _dvc_project(tmp_path / "syn", SYNTHETIC_DVC_YAML)
    (repo / "step.py").write_text(STEP)
    shutil.copytree(ROOT / "flows", repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "prefect.yaml", repo / "prefect.yaml")  # the repository's own deployments and pools
    for pool in ("cpu", "gpu"):
        run(["prefect", "work-pool", "create", pool, "--type", "process", "--overwrite"], repo, env=env)
    run(["prefect", "deploy", "--all", "--no-prompt"], repo, env=env)
    nightly = api(env, "/deployments/name/longlive-regression/nightly")
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 4 * * *"]

    workers = [subprocess.Popen(["prefect", "worker", "start", "--pool", pool, "--type", "process"], cwd=repo,
                                env=env, stdout=open(tmp_path / f"worker-{pool}.log", "w"), stderr=subprocess.STDOUT)
               for pool in ("cpu", "gpu")]
    try:
        dep = api(env, "/deployments/name/longlive-pipeline/dag")
        fr = api(env, f"/deployments/{dep['id']}/create_flow_run",
                 {"parameters": {"keep_going": True, "retry_delay_s": 0, "poll_s": 1}})
        fr = wait_final(env, fr["id"])
    finally:
        for w in workers:
            _stop(w)
    logs = "".join((tmp_path / f"worker-{p}.log").read_text()[-3000:] for p in ("cpu", "gpu"))

    # the deterministic failure is the flow run's message, its first line the stage's own error
    assert fr["state"]["type"] == "FAILED", (fr["state"], logs)
    assert fr["state"]["message"].splitlines()[0] == "ValueError: broken is broken on purpose", fr["state"]

    tasks = {t["name"]: t for t in api(env, "/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": [fr["id"]]}}})}
    items = {"synth", "base", "broken", "train_ar@t2v", "train_ar@i2v", "evaluate", "publish"}
    assert items <= set(tasks) and "after_broken" not in tasks, sorted(tasks)
    runs = {n: (tasks[n]["state"]["type"], tasks[n]["run_count"]) for n in items}
    assert runs == {**{n: ("COMPLETED", 1) for n in items},
                    "broken": ("FAILED", 1),              # deterministic: not retried
                    "train_ar@i2v": ("COMPLETED", 2)}, runs  # preempted once: retried
    assert {n: set(tasks[n]["tags"]) - {"dvc"} for n in ("synth", "base")} == {"synth": {"cpu"}, "base": {"gpu"}}
    spans = {n: (_ts(tasks[n]["start_time"]), _ts(tasks[n]["end_time"])) for n in items}
    assert spans["synth"][0] < spans["base"][1] and spans["base"][0] < spans["synth"][1], spans
    assert _max_overlap(list(spans.values())) == 2, spans  # max_parallel

    # each item ran as a flow run on its pool's worker, and the stages themselves overlapped
    # (run_deployment links each stage flow run to the orchestrator through a task run of its own)
    stage_runs = api(env, "/flow_runs/filter", {"flow_runs": {"parent_task_run_id": {
        "any_": [t["id"] for t in tasks.values()]}}})
    pools = {r["name"]: r["work_pool_name"] for r in stage_runs}
    assert pools == {"synth": "cpu", "base": "gpu", "broken": "cpu", "train_ar@t2v": "gpu", "train_ar@i2v": "gpu",
                     "evaluate": "gpu", "publish": "cpu"}, pools
    s, b = (json.loads((repo / f"out/{n}.json").read_text()) for n in ("synth", "base"))
    assert s["start"] < b["end"] and b["start"] < s["end"], (s, b)
    broken = next(r for r in stage_runs if r["name"] == "broken")
    records = api(env, "/logs/filter", {"logs": {"flow_run_id": {"any_": [broken["id"]]}}})
    tracebacks = [r for r in records if r["message"].startswith("Traceback")]
    assert [r["level"] for r in tracebacks] == [logging.ERROR], records  # the traceback kept its level
    assert tracebacks[0]["message"].endswith("ValueError: broken is broken on purpose"), tracebacks

    arts = api(env, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [fr["id"]]}}})
    md = next(a["data"] for a in arts if a["key"] == "run-report")
    assert "**ValueError: broken is broken on purpose**" in md
    assert f"[t2v_00.mp4]({(repo / 'reports/evaluate/samples/ar_t2v/t2v_00.mp4').as_uri()})" in md
    assert f"[releases/test-v1]({(repo / 'releases/test-v1').as_uri()}), published by this run" in md
    assert "| [ar_t2v](" in md and "| 0.5 | 12 |" in md
    assert "| `after_broken` | cpu | NOT RUN |" in md and "| `train_ar@i2v` | gpu | COMPLETED | 2 |" in md
    keys = {a["key"] for a in api(env, "/artifacts/filter", {"artifacts": {"key": {"any_": ["evaluate-metrics"]}}})}
    assert keys == {"evaluate-metrics"}
    # items that finished side by side all made it into dvc.lock: only the failed branch is out of date
    assert set(json.loads(run(["dvc", "status", "--json"], repo).stdout)) == {"broken", "after_broken"}


@pytest.mark.slow
@pytest.mark.server
def test_real_stages_log_at_their_levels_without_library_chatter(prefect_env, tmp_path):
    project = make_project(tmp_path / "proj")
    proc = run([sys.executable, "-m", "flows.pipeline", "--repo-dir", str(project), "--target", "validate"],
               project, env=prefect_env)
    flow_run = re.search(r"Flow run '([^']+)' - Finished in state Completed", proc.stdout + proc.stderr)
    assert flow_run, proc.stdout[-3000:] + proc.stderr[-3000:]
    fr = api(prefect_env, "/flow_runs/filter", {"flow_runs": {"name": {"any_": [flow_run.group(1)]}}})[0]
    logs = api(prefect_env, "/logs/filter", {"logs": {"flow_run_id": {"any_": [fr["id"]]}}, "limit": 200})
    assert len(logs) < 200, len(logs)
    text = [(r["level"], r["message"]) for r in logs]
    assert (logging.INFO, "validate: stage validate, preset tiny") in text, text
    assert not [t for t in text if "great_expectations" in t[1] or "Skipping registering function" in t[1]], text
    assert not [t for t in text if t[0] >= logging.ERROR], text
    # DVC did the work: a rerun of those stages changes nothing
    assert "Running stage" not in run(["dvc", "repro", "validate"], project).stdout
