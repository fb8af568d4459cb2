"""End to end: `dvc repro` runs synth -> base -> encode -> validate on a fast tiny preset, a second
`dvc repro` does nothing, and a changed param reruns only what depends on it."""

import json

import pytest

from _project import run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(built_project, tmp_path_factory):
    return built_project.copy(tmp_path_factory.mktemp("proj") / "proj")  # after `dvc repro`: every stage


def test_repro_produces_every_stage_output(project):
    assert (project / "data/synth/index.jsonl").exists()
    for sub in ("vae", "dit", "text"):
        assert (project / "models/base" / sub).is_dir()
    manifest = json.loads((project / "data/encoded/manifest.json").read_text())
    assert manifest["complete"] and manifest["total_samples"] == 12
    assert json.loads((project / "reports/validate/metrics.json").read_text())["success"] is True
    for plot in ("vae_loss.json", "teacher_loss.json"):
        rows = json.loads((project / "reports/base" / plot).read_text())
        assert len(rows) == 3 and all("loss" in r for r in rows)
    assert not list((project / ".work/base").rglob("checkpoint.pt*")), "resume state is removed once the stage finished"


def test_second_repro_does_nothing(project):
    out = run(["dvc", "repro"], project).stdout
    assert "Running stage" not in out, out
    assert "up to date" in out


def test_param_change_reruns_only_dependents(project):
    # a param of the last stage: what it reruns is seconds, and every stage above it must stay put
    text = (project / "params.yaml").read_text()
    assert text.count("version: '{preset}-v{n}'") == 1, "publish.version moved: pick another param of one stage"
    (project / "params.yaml").write_text(text.replace("version: '{preset}-v{n}'", "version: '{preset}-r{n}'"))
    out = run(["dvc", "repro"], project).stdout
    assert "Running stage 'publish'" in out
    for stage in ("synth", "base", "encode", "validate", "train_ar@t2v", "train_dmd@t2v-2step", "evaluate"):
        assert f"Running stage '{stage}'" not in out, out
