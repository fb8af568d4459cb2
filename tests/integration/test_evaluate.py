"""The evaluate stage on a fast tiny project: per-variant metrics, drift and speed plots, the report (VBench
skips named), samples, DVC's view of them; then the scheduled regression flow against a local Prefect server:
a passing run, a failing one on a raised baseline, their artifacts read back through the Prefect client,
wandb's offline records (the stage's and the flow's) with the sample videos, and the cron deployment."""

import json
import subprocess
import sys
import time

import pytest
import yaml

from _project import run
from _wandb_runs import offline_runs
from test_prefect_flow import prefect_env  # noqa: F401 - the local Prefect server fixture

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(built_project, tmp_path_factory):
    # after `dvc repro evaluate` (the session's full `dvc repro`, where test_dvc_dag ran first)
    return built_project.copy(tmp_path_factory.mktemp("evalproj") / "proj", "evaluate")


def evaluate_params(project) -> dict:
    return yaml.safe_load((project / "params.yaml").read_text())["presets"]["tiny"]["evaluate"]


def test_stage_writes_per_variant_metrics_plots_report_and_samples(project):
    out = project / "reports/evaluate"
    params = evaluate_params(project)
    variants = params["variants"]
    assert {"ar_t2v", "ar_i2v"} <= set(variants)
    assert sorted(f.stem for f in (out / "metrics").glob("*.json")) == sorted(variants)
    for v, spec in variants.items():
        kind = spec["kind"]
        m = json.loads((out / f"metrics/{v}.json").read_text())
        assert 0 <= m["score"] <= 1 and m["score_sem"] is not None
        assert m["fps"] > 0 and m["first_chunk_latency_s"] > 0 and m["peak_memory_mb"] >= 0
        assert m["kv_cache_mb"] > 0 and m["weights_mb"] > 0
        assert 0 < m["vbench_temporal_flickering"] <= 1
        assert m["vbench_not_computed"] == len(params["vbench"]["dimensions"]) - 1
        assert "vbench_subject_consistency" not in m  # skipped dimensions never get a number
        assert m["info"]["kind"] == kind and m["info"]["device_class"] == "cpu"
        # a quantize-stage export runs as stored (packed NVFP4) and says so
        assert m["info"]["quant"] == ("nvfp4" if (project / spec["checkpoint"] / "dit/quantization.json").is_file()
                                      or spec.get("quant") == "nvfp4" else "none")
        assert m["info"]["memory_kind"] in ("cpu_peak_rss_increase", "cpu_max_rss_process")
        # the DVC metrics: the headline figures alone (`dvc exp show` has a column per declared figure)
        assert json.loads((out / f"headline/{v}.json").read_text()) == {"score": m["score"], "fps": m["fps"]}
        for name in (f"{kind}_00", "multishot_00", "drift_schedule_00", "drift_single_00"):
            assert (out / f"samples/{v}/{name}.mp4").stat().st_size > 0
    assert sorted(f.stem for f in (out / "headline").glob("*.json")) == sorted(variants)
    for setting in ("schedule", "single"):  # a row per segment, a field per variant: a line each in one plot
        rows = json.loads((out / f"plots/drift/{setting}.json").read_text())
        assert len(rows) == params["length_factor"]
        assert [r["segment"] for r in rows] == list(range(len(rows))) and rows[1]["time_s"] > rows[0]["time_s"]
        assert all(set(r) == {"segment", "time_s", *variants} and all(0 <= r[v] <= 1 for v in variants) for r in rows)
    assert sorted(p.name for p in (out / "plots/drift").iterdir()) == ["schedule.json", "single.json"]
    assert [r["variant"] for r in json.loads((out / "plots/speed.json").read_text())] == list(variants)
    report = (out / "report.md").read_text()
    assert all(f"| {v} |" in report for v in variants)
    assert "| subject_consistency | skipped |" in report and "not importable" in report
    assert "| temporal_flickering | computed |" in report
    details = json.loads((out / "report.json").read_text())["variants"]["ar_i2v"]["details"]
    assert len(details["i2v"]["rows"]) == params["num_prompts"]


def test_dvc_sees_every_variant_and_only_evaluate_depends_on_its_params(project):
    shown = run(["dvc", "metrics", "show", "--json"], project).stdout
    every = run(["dvc", "metrics", "show", "--json", "reports/evaluate/metrics"], project).stdout  # every figure
    for v in evaluate_params(project)["variants"]:
        assert f"reports/evaluate/headline/{v}.json" in shown and f"reports/evaluate/metrics/{v}.json" not in shown
        assert f"reports/evaluate/metrics/{v}.json" in every
    base = json.loads((project / "reports/base/metrics.json").read_text())  # upstream stages: the same pattern
    headline = json.loads((project / "reports/base/headline.json").read_text())
    assert headline == {"vae": {"eval_psnr_db": base["vae"]["eval_psnr_db"]}}
    assert "reports/base/headline.json" in shown and "reports/base/metrics.json" not in shown
    plots = json.loads(run(["dvc", "plots", "show", "--json"], project).stdout)["data"]
    lines = {d["field"] for d in plots["reports/evaluate/plots/drift/schedule.json"][0]["content"]["data"]["values"]}
    assert lines == set(evaluate_params(project)["variants"])  # the overlay: a line per variant
    assert "Running stage" not in run(["dvc", "repro", "evaluate"], project).stdout
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(text.replace("num_prompts: 2", "num_prompts: 3", 1))
    try:
        status = run(["dvc", "status", "evaluate"], project).stdout
        assert "evaluate:" in status and "train_ar" not in status and "base" not in status, status
    finally:
        (project / "params.yaml").write_text(text)


def test_stage_refuses_an_unknown_variant_by_name(project):
    proc = run([sys.executable, "-m", "stages.evaluate", "ar_t2x"], project, check=False)
    assert proc.returncode != 0 and "unknown variants ['ar_t2x']" in proc.stderr


READ_ARTIFACTS = """
import asyncio, json
from prefect.client.orchestration import get_client

async def main():
    async with get_client() as client:
        runs = [r for r in await client.read_flow_runs() if r.name]
        flows = {r.flow_id: (await client.read_flow(r.flow_id)).name for r in runs}
        out = {"runs": [{"id": str(r.id), "flow": flows[r.flow_id], "state": r.state.type.value} for r in runs],
               "artifacts": [{"key": a.key, "type": a.type, "run": str(a.flow_run_id), "data": a.data}
                             for a in await client.read_artifacts()]}
    print(json.dumps(out, default=str))

asyncio.run(main())
"""


@pytest.mark.server
def test_regression_flow_passes_fails_and_records(prefect_env, project):  # noqa: F811
    flow = [sys.executable, "-m", "flows.regression", "--repo-dir", str(project)]
    run([sys.executable, "-m", "longlive.eval.regress", "--update"], project)  # benchmarks/baselines/tiny.json
    ok = run(flow, project, env=prefect_env)
    assert "PASS" in ok.stdout + ok.stderr
    baseline = project / "benchmarks/baselines/tiny.json"
    b = json.loads(baseline.read_text())
    b["variants"]["ar_t2v"].update(score=0.99, score_sem=0.0)  # as if the model had been much better
    baseline.write_text(json.dumps(b))
    bad = run(flow, project, env=prefect_env, check=False)
    assert bad.returncode != 0 and "ar_t2v.score" in bad.stdout + bad.stderr

    seen = json.loads(run([sys.executable, "-c", READ_ARTIFACTS], project, env=prefect_env).stdout)
    runs = {r["id"]: r for r in seen["runs"] if r["flow"] == "longlive-regression"}
    assert sorted(r["state"] for r in runs.values()) == ["COMPLETED", "FAILED"]
    by_run = {}
    for a in seen["artifacts"]:
        if a["run"] in runs:
            by_run.setdefault(runs[a["run"]]["state"], {})[a["key"]] = a
    for state, verdict in (("COMPLETED", "PASS"), ("FAILED", "FAIL")):
        arts = by_run[state]
        assert {"evaluate-metrics", "regression-check", "regression-report"} <= set(arts)
        assert arts["regression-report"]["type"] == "markdown" and verdict in arts["regression-report"]["data"]
        table = arts["regression-check"]["data"]
        table = json.loads(table) if isinstance(table, str) else table
        score = [r for r in table if r["variant"] == "ar_t2v" and r["metric"] == "score"][0]
        assert score["status"].startswith("REGRESSED" if verdict == "FAIL" else "ok")
    assert "ar_t2v.score" in by_run["FAILED"]["regression-report"]["data"]
    # wandb: offline runs with the metrics and the sample videos, the evaluate stage's own and both flow runs'
    runs = offline_runs(project / ".work/evaluate")
    assert sorted(r.name for r in runs if r.name != "evaluate") == ["regression-tiny"] * 2
    assert "evaluate" in [r.name for r in runs]
    for r in runs:
        videos = [v for v in r.history[0].values() if isinstance(v, dict) and v.get("_type") == "video-file"]
        assert videos and all(r.media(v).stat().st_size > 0 for v in videos), r.name


@pytest.mark.server
def test_regression_cron_deployment_is_served(prefect_env, project):  # noqa: F811
    serve = subprocess.Popen(
        [sys.executable, "-m", "flows.regression", "--serve", "--cron", "15 4 * * *", "--name", "regression-test",
         "--repo-dir", str(project)],
        cwd=project, env=prefect_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        out = ""
        while time.time() < deadline:
            out = run(["prefect", "deployment", "ls"], project, env=prefect_env, check=False).stdout
            if "regression-test" in out:
                break
            time.sleep(2)
        else:
            pytest.fail(f"deployment never appeared:\n{out}")
        spec = run(["prefect", "deployment", "inspect", "longlive-regression/regression-test"], project,
                   env=prefect_env).stdout
        assert "15 4 * * *" in spec, spec
    finally:
        serve.terminate()
        serve.wait(timeout=30)
