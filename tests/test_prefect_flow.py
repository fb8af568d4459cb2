"""The Prefect flow runs the DVC stages against a local Prefect server on 127.0.0.1; the flow run,
its stage tasks and their metric artifacts are listed through the Prefect CLI, and the cron
deployment shows up when served."""

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from _project import make_project, run

pytestmark = [pytest.mark.slow, pytest.mark.server]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        "COLUMNS": "250",  # the CLI's tables truncate cells (e.g. COMPLETED) on a narrow terminal
        # the `prefect` CLI of this interpreter's environment, activated or not
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = open(home / "server.log", "w")
    server = subprocess.Popen(
        ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
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
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


def test_flow_run_and_artifacts_are_listed(prefect_env, tmp_path):
    project = make_project(tmp_path / "proj")
    run([sys.executable, "-m", "flows.pipeline", "--repo-dir", str(project)], project, env=prefect_env)
    runs = run(["prefect", "flow-run", "ls"], project, env=prefect_env).stdout
    assert "longlive-pipeline" in runs.replace("\n", "") or "COMPLETED" in runs, runs
    assert "COMPLETED" in runs, runs
    arts = run(["prefect", "artifact", "ls"], project, env=prefect_env).stdout
    for stage in ("synth", "base", "encode", "validate", "train-ar"):
        assert f"{stage}-metrics" in arts, arts
    # DVC did the work: the outputs are in the project and a rerun of the flow changes nothing
    assert (project / "reports/validate/metrics.json").exists()
    assert "Running stage" not in run(["dvc", "repro"], project).stdout


def test_cron_deployment_is_served(prefect_env, tmp_path):
    project = make_project(tmp_path / "proj")
    serve = subprocess.Popen(
        [sys.executable, "-m", "flows.pipeline", "--serve", "--cron", "30 2 * * *", "--name", "nightly-test",
         "--repo-dir", str(project)],
        cwd=project, env=prefect_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            out = run(["prefect", "deployment", "ls"], project, env=prefect_env, check=False).stdout
            if "nightly-test" in out:
                break
            time.sleep(2)
        else:
            pytest.fail(f"deployment never appeared:\n{out}")
        spec = run(["prefect", "deployment", "inspect", "longlive-pipeline/nightly-test"], project, env=prefect_env).stdout
        assert "30 2 * * *" in spec, spec
    finally:
        serve.terminate()
        serve.wait(timeout=30)
