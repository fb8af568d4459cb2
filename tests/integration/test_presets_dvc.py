"""Presets as DVC records them: `dvc exp run -S preset=NAME` composes params.yaml for that preset (conf/, DVC's
Hydra composition), dvc.lock records what the stages ran, each preset's DAG holds only the items its evaluate
and publish need, a LONGLIVE_PRESET that disagrees fails with one line naming the route, and `dvc exp show`
lists the active preset's params alone."""

import copy
import csv
import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from _project import ROOT, make_project, run
from longlive.config import ConfigError, load_params, load_preset, params_document, preset_files
from longlive.dag import DagError, dag_section

ROUTE = ("synth: LONGLIVE_PRESET=tiny but params.yaml records preset: small (what DVC runs and records); "
         "switch with `dvc exp run -S preset=tiny` and unset LONGLIVE_PRESET")


def library(name: str) -> dict:
    return load_params(preset_files()[name])["presets"][name]


def items(project: Path) -> set[str]:
    return {line.split()[0] for line in run(["dvc", "stage", "list"], project).stdout.splitlines() if line.strip()}


def composed(overrides: list[str], out: Path) -> dict:
    """params.yaml as `dvc exp run -S ...` writes it, from the repository's conf/ (DVC's own function)."""
    import runpy

    runpy.run_path(str(ROOT / "scripts/compose_params.py"))["compose"](overrides, out)
    return yaml.safe_load(out.read_text())


# ------------------------------------------------------------------ the composition (fast)


def test_params_yaml_is_the_composition_of_conf(tmp_path):
    # params.yaml is what `dvc exp run` would write: a preset edited in conf/ alone would not be what runs
    assert composed([], tmp_path / "params.yaml") == yaml.safe_load((ROOT / "params.yaml").read_text()), \
        "params.yaml is not the composition of conf/: python scripts/compose_params.py"
    small = composed(["preset=small"], tmp_path / "small.yaml")
    assert small == params_document("small", library("small"))
    assert list(small["presets"]) == ["small"]  # the other presets are not in the file DVC reads


def test_each_preset_builds_what_its_evaluate_and_publish_read():
    tiny = dag_section(library("tiny"), "tiny")
    assert tiny["train_ar"] == ["t2v", "i2v"]
    assert list(tiny["train_dmd"]) == ["t2v-2step", "i2v-2step"]  # evaluate's dmd_* (2-step students only)
    assert tiny["train_dmd"]["i2v-2step"] == ["i2v", "2step"]  # [VARIANT, STUDENT]: dvc.yaml's ${item[0]} ${item[1]}
    # only the T2V 2-step QAT student is read (nvfp4_t2v_2step_qat, publish): no 4-step or I2V QAT, no bf16 quantize
    assert list(tiny["train_qat"]) == ["t2v-2step"]
    assert tiny["quantize"] == ["t2v-2step-qat"]
    assert tiny["evaluate"] == list(library("tiny")["evaluate"]["variants"])  # the drift plots' lines
    for name in ("small", "wan22-5b"):  # they evaluate and publish their AR students alone
        d = dag_section(library(name), name)
        assert d["train_ar"] == ["t2v", "i2v"] and not d["train_dmd"] and not d["train_qat"] and not d["quantize"]


@pytest.mark.parametrize("mutate, words", [
    (lambda p: p["evaluate"]["variants"].update(x={"checkpoint": "models/dmd/t2v-8step", "kind": "t2v"}),
     ["presets.tiny.evaluate.variants.x.checkpoint", "'t2v-8step'", "dmd.students"]),
    (lambda p: p["dmd"].update(qat_students=[]),
     ["presets.tiny.evaluate.variants.nvfp4_t2v_2step_qat.checkpoint", "not in dmd.qat_students"]),
    (lambda p: p["publish"]["checkpoints"].update(x="models/ar/v2v"),
     ["presets.tiny.publish.checkpoints.x", "'v2v'", "ar.variants"]),
])
def test_a_checkpoint_no_stage_can_build_is_named(mutate, words):
    p = copy.deepcopy(library("tiny"))
    mutate(p)
    with pytest.raises(DagError) as e:
        dag_section(p, "tiny")
    assert all(w in str(e.value) for w in words), str(e.value)


def test_a_preset_edited_in_params_yaml_alone_is_refused_where_dvc_reads_it(tmp_path, monkeypatch):
    monkeypatch.delenv("LONGLIVE_PRESET", raising=False)
    doc = params_document("tiny", copy.deepcopy(library("tiny")))
    doc["presets"]["tiny"]["evaluate"]["variants"].pop("dmd_t2v_2step")  # dag still builds and plots it
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    assert load_preset(path=tmp_path / "params.yaml").name == "tiny"  # no dvc.yaml here: DVC does not read it
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    with pytest.raises(ConfigError, match=r"dag\.\w+ is not what presets\.tiny implies.*conf/preset/tiny\.yaml"):
        load_preset(path=tmp_path / "params.yaml")
    doc["preset"] = "small"  # `preset:` edited by hand: the file still holds tiny
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"records preset: small but holds presets \['tiny'\].*dvc exp run -S preset=small"):
        load_preset(path=tmp_path / "params.yaml")


def test_exp_show_on_the_default_preset_is_under_300_columns(tmp_path):
    # The plain `dvc exp show --no-pager` of this checkout: its files, committed figures in reports/ included, in a
    # fresh repository, so experiments kept in this one (other presets' params) do not count.
    files = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], ROOT).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tmp_path / name)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "checkout"]):
        run(cmd, tmp_path)
    header = next(csv.reader(io.StringIO(run(["dvc", "exp", "show", "--no-pager", "--csv"], tmp_path).stdout)))
    table = [h for h in header if h not in ("rev", "typ", "parent")]  # the table folds these into Experiment
    params = [h for h in table if h == "preset" or h.startswith(("presets.", "dag."))]
    deps = [h for h in table if h not in params and "/" in h and ":" not in h]
    metrics = [h for h in table if h not in params and h not in deps and h not in ("Experiment", "Created")]
    assert len(table) < 300, (
        f"`dvc exp show` has {len(table)} columns: {len(metrics)} metrics, {len(params)} params, {len(deps)} deps. "
        "dvc.yaml declares as DVC metrics only the figures worth a column (headline.json); every figure stays in "
        "the stage's metrics.json, a plain out")
    # the DVC metrics are the headline files: a stage's every figure (metrics.json, evaluate's metrics/) is not one
    assert metrics and not [h for h in metrics if "metrics.json:" in h or "/metrics/" in h], metrics


# ------------------------------------------------------------------ a DVC project (the fast tiny preset)

@pytest.fixture(scope="module")
def project(tmp_path_factory):
    path = make_project(tmp_path_factory.mktemp("presets"))
    conf = path / "conf/preset/small.yaml"  # small at its sizes with a handful of clips: its synth in seconds
    small = yaml.safe_load(conf.read_text())
    small["presets"]["small"]["synth"]["num_videos"] = 6
    conf.write_text("# @package _global_\n" + yaml.safe_dump(small, sort_keys=False))
    run(["git", "add", "-A"], path)
    run(["git", "commit", "-qm", "project"], path)
    return path


def lock(project: Path, stage: str) -> dict:
    return yaml.safe_load((project / "dvc.lock").read_text())["stages"][stage]


# small reads the user's videos by default (data.source unset); these tests switch to it on synth's shapes
SMALL_ON_SYNTH = "presets.small.data.source=synth"


def clips(project: Path) -> int:
    return len((project / "data/synth/index.jsonl").read_text().splitlines())


@pytest.mark.slow
def test_exp_show_on_the_default_preset_lists_its_params_alone(project):
    header = next(csv.reader(io.StringIO(run(["dvc", "exp", "show", "--no-pager", "--csv"], project).stdout)))
    params = [h for h in header if h.startswith(("preset", "dag.")) or ".tiny." in h or h.startswith("presets.")]
    assert params and all(h == "preset" or h.startswith(("presets.tiny.", "dag.")) for h in params), params
    doc = yaml.safe_load((project / "params.yaml").read_text())

    def leaves(x):
        return sum(leaves(v) for v in x.values()) if isinstance(x, dict) and x else 1

    assert len(params) == leaves(doc), (len(params), leaves(doc))  # the active preset's values and its dag, no more


@pytest.mark.slow
def test_switching_preset_with_dvc_exp_run_is_what_dvc_lock_records(project):
    run(["dvc", "repro", "synth"], project)
    tiny_items = items(project)
    assert {"train_dmd@t2v-2step", "train_qat@t2v-2step", "quantize@t2v-2step-qat"} <= tiny_items
    assert not tiny_items & {"train_dmd@t2v-4step", "train_qat@t2v-4step", "quantize@t2v-2step", "quantize@i2v-4step-qat",
                              "train_qat@i2v-2step", "quantize@i2v-2step-qat"}
    assert lock(project, "synth")["params"]["params.yaml"]["preset"] == "tiny" and clips(project) == 12

    run(["dvc", "exp", "run", "-S", "preset=small", "-S", SMALL_ON_SYNTH, "synth"], project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["preset"] == "small" and list(params["presets"]) == ["small"]
    recorded = lock(project, "synth")["params"]["params.yaml"]
    assert recorded["preset"] == "small" and recorded["presets.small.synth"]["num_videos"] == 6
    assert clips(project) == 6  # what ran is what dvc.lock says ran
    status = run(["dvc", "status"], project).stdout
    assert "synth:" not in status and "base:" in status and "presets.tiny" not in status, status
    # small evaluates and publishes its AR students: no DMD, QAT or quantize items in its DAG
    assert not {i for i in items(project) if i.startswith(("train_dmd", "train_qat", "quantize"))}
    assert {"train_ar@t2v", "train_ar@i2v", "evaluate", "publish"} <= items(project)


@pytest.mark.slow
def test_a_disagreeing_LONGLIVE_PRESET_fails_with_one_line_naming_the_route(project):
    if yaml.safe_load((project / "params.yaml").read_text())["preset"] != "small":
        run(["dvc", "exp", "run", "-S", "preset=small", "-S", SMALL_ON_SYNTH, "synth"], project)
    before = (project / "dvc.lock").read_text()
    env = {**os.environ, "LONGLIVE_PRESET": "tiny"}
    stage = run([sys.executable, "-m", "stages.synth"], project, check=False, env=env)
    assert stage.returncode == 1 and stage.stderr.strip() == ROUTE, stage.stderr
    repro = run(["dvc", "repro", "-f", "synth"], project, check=False, env=env)
    assert repro.returncode != 0 and ROUTE in repro.stderr.splitlines(), repro.stderr
    # nothing is recorded; `repro -f` had removed the outputs before the stage refused: checkout restores them
    assert (project / "dvc.lock").read_text() == before
    run(["dvc", "checkout", "synth"], project)
    assert clips(project) == 6

    # the Prefect flows: an item's flow run (a worker's environment) and the orchestrator refuse it up front
    code = ("import json, os; from pathlib import Path; from flows.pipeline import recorded_preset, stage\n"
            "state = stage.fn(item='synth', repo_dir='.')\n"
            "try:\n    recorded_preset(Path('.'))\nexcept ValueError as e:\n    err = str(e)\n"
            "print(json.dumps({'failed': state.is_failed(), 'message': state.message, 'err': err}))\n")
    out = run([sys.executable, "-c", code], project, env={**env, "PREFECT_LOGGING_LEVEL": "ERROR"})
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["failed"] and got["message"] == ROUTE and got["err"] == ROUTE[len("synth: "):], got
    assert (project / "dvc.lock").read_text() == before
