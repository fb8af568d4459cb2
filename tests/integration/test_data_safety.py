"""Data safety, each test injecting the fault: encode deletes only what its own records list, validate
fails (and says so on disk) on missing or unlisted shards, and training refuses shards validate did not pass.

The stage tests run the real stage modules in a temporary working directory (params.yaml, data/synth),
with the VAE and text encoder swapped for the deterministic fakes of conftest: no weights needed.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from conftest import make_fake_encoders, validate_into
from longlive.data.encode import encode_dataset
from longlive.data.shards import ShardError, ShardWriter, iter_samples, open_fs, read_manifest
from longlive.data.validate import NotValidatedError, require_validated
from tests.unit.test_config import write_params

FOREIGN = b"id,value\n1,keep me\n"


def names(url: str) -> set[str]:
    fs, root = open_fs(url)
    return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}


def put(url: str, rel: str, data: bytes) -> None:
    fs, root = open_fs(url)
    path = f"{root}/{rel}"
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # a local folder must exist; on S3 a no-op
    fs.pipe_file(path, data)


def get(url: str, rel: str) -> bytes:
    fs, root = open_fs(url)
    return fs.cat_file(f"{root}/{rel}")


@pytest.fixture(params=["local", "s3"])
def shared_url(request, tmp_path) -> str:
    """A url that also holds someone else's files: a project folder, or a whole bucket (its root)."""
    if request.param == "s3":
        return request.getfixturevalue("s3_bucket")  # s3://bucket: the bucket root itself
    (tmp_path / "shared").mkdir()
    return str(tmp_path / "shared")


# ----------------------------------------------------------------------------- encode: what it deletes


class FakeVAE:
    def __init__(self, encode):
        self.encode = encode

    def eval(self):
        return self

    def to(self, *args, **kwargs):
        return self


class FakeText(FakeVAE):
    def __init__(self, encode):
        super().__init__(lambda captions: (encode(captions),))


@pytest.fixture
def stage_project(tmp_path, monkeypatch, synth_dir, tiny_preset):
    """A working directory for the encode/validate/train stages: ``configure(url, samples_per_shard)``
    writes params.yaml; data/synth is the session's synth set; the encoders are the conftest fakes."""
    import stages.encode

    proj = tmp_path / "proj"
    shutil.copytree(synth_dir, proj / "data" / "synth")
    for part in ("vae", "text"):  # the fingerprint hashes these files; the fakes ignore them
        (proj / "models" / "base" / part).mkdir(parents=True)
        (proj / "models" / "base" / part / "weights.bin").write_bytes(b"v1")
    monkeypatch.chdir(proj)
    monkeypatch.delenv("LONGLIVE_PRESET", raising=False)
    video, text = make_fake_encoders(tiny_preset)
    monkeypatch.setattr(stages.encode.WanVAE, "from_pretrained", classmethod(lambda cls, *a, **k: FakeVAE(video)))
    monkeypatch.setattr(stages.encode, "load_text_encoder", lambda *a, **k: FakeText(text))

    def configure(url: str, samples_per_shard: int) -> None:
        def mutate(p):
            p["encode"] = {"url": url, "samples_per_shard": samples_per_shard}
            p["synth"]["num_videos"] = tiny_preset.synth.num_videos

        monkeypatch.setenv("LONGLIVE_PARAMS", str(write_params(tmp_path, mutate)))

    return proj, configure


def test_encode_with_changed_inputs_deletes_only_its_own_shards(stage_project, shared_url):
    import stages.encode

    proj, configure = stage_project
    # Someone else's files, some named like the writer's temporaries: no record of any run of the writer
    # names them, so nothing proves them its own.
    planted = {"other/important.csv": FOREIGN, "notes.txt": b"also not ours", "_tmp/README": b"not ours",
               "_tmp/shard-000000.tar.0123abcd": b"look-alike", "manifest.json.tmp-0123abcd": b"look-alike"}
    for rel, data in planted.items():
        put(shared_url, rel, data)
    configure(shared_url, samples_per_shard=3)
    stages.encode.main()  # no previous record of its own: deletes nothing
    first = read_manifest(shared_url)
    assert [s["name"] for s in first["shards"]] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert {rel: get(shared_url, rel) for rel in planted} == planted

    # Changed inputs (new text-encoder weights) and fewer, larger shards: the old shards 2 and 3 must go.
    (proj / "models" / "base" / "text" / "weights.bin").write_bytes(b"v2")
    configure(shared_url, samples_per_shard=6)
    stages.encode.main()
    second = read_manifest(shared_url)
    assert second["fingerprint"] != first["fingerprint"]
    assert [s["name"] for s in second["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    assert {rel: get(shared_url, rel) for rel in planted} == planted  # byte-identical
    assert names(shared_url) == {"other", "notes.txt", "_tmp", "manifest.json.tmp-0123abcd", "_progress.json",
                                 "manifest.json", "shard-000000.tar", "shard-000001.tar"}
    assert json.loads((proj / "reports/encode/metrics.json").read_text())["encoded"] == 12  # not resumed
    assert (proj / "data/encoded/manifest.json").read_bytes() == get(shared_url, "manifest.json")
    assert len(list(iter_samples(shared_url))) == 12


def test_resume_after_a_kill_under_new_inputs_leaves_no_orphans(synth_dir, fake_encoders, tmp_path, caplog):
    video, text = fake_encoders
    shared_url = str(tmp_path / "shared")  # local only, for time: the S3 listing and moves are covered above
    put(shared_url, "other/important.csv", FOREIGN)
    encode_dataset(synth_dir, shared_url, encode_video=video, encode_text=text, samples_per_shard=2, fingerprint="a")
    assert len(read_manifest(shared_url)["shards"]) == 6

    calls = 0

    def dies_after_two_batches(x):
        nonlocal calls
        calls += 1
        if calls > 2:
            raise KeyboardInterrupt
        return video(x)

    with caplog.at_level(logging.INFO, logger="longlive.data.shards"), pytest.raises(KeyboardInterrupt):
        encode_dataset(synth_dir, shared_url, encode_video=dies_after_two_batches, encode_text=text,
                       samples_per_shard=5, batch_size=3, fingerprint="b")
    # Every shard of run "a" went, by name, before run "b" wrote its first; the foreign file was logged once.
    assert sum("did not write" in r.getMessage() for r in caplog.records) == 1
    assert "manifest.json" not in names(shared_url)
    assert {n for n in names(shared_url) if n.startswith("shard-")} == {"shard-000000.tar"}
    stats = encode_dataset(synth_dir, shared_url, encode_video=video, encode_text=text, samples_per_shard=5,
                           batch_size=3, fingerprint="b")
    assert stats == {"samples": 12, "encoded": 7, "skipped": 5, "shards": 3}  # resumed, not restarted
    assert {n for n in names(shared_url) if n.startswith("shard-")} == {f"shard-{i:06d}.tar" for i in range(3)}
    assert get(shared_url, "other/important.csv") == FOREIGN


def test_a_shard_named_file_no_record_lists_is_refused_not_deleted(synth_dir, fake_encoders, shared_url):
    video, text = fake_encoders
    put(shared_url, "shard-000000.tar", b"someone else's webdataset")
    with pytest.raises(ShardError, match=r"shard-000000\.tar.*not deleted"):
        encode_dataset(synth_dir, shared_url, encode_video=video, encode_text=text, samples_per_shard=4)
    assert get(shared_url, "shard-000000.tar") == b"someone else's webdataset"
    with pytest.raises(ShardError, match=r"shard-000000\.tar"):
        ShardWriter(shared_url, 4, resume=False)  # starting afresh does not make it ours either
    assert get(shared_url, "shard-000000.tar") == b"someone else's webdataset"


def _sample(key: str) -> dict:
    return {"__key__": key, "latents.npy": np.zeros((1, 1, 1, 1), np.float16), "json": {}}


def test_half_written_files_outside_our_names_survive_tmp_cleanup(tmp_path):
    url = str(tmp_path / "shards")
    killed = ShardWriter(url, 2)  # records its progress, then dies inside its first shard
    killed.write(_sample("a"))
    half = [p.name for p in (tmp_path / "shards" / "_tmp").iterdir()]
    assert half == [f"shard-000000.tar.{json.loads(get(url, '_progress.json'))['run']}"]  # named by its run
    put(url, "_tmp/README", b"not ours")
    put(url, "_tmp/shard-000000.tar.0123abcd", b"a look-alike of no recorded run")
    with ShardWriter(url, 2) as w:
        w.write(_sample("a"))
    assert sorted(p.name for p in (tmp_path / "shards" / "_tmp").iterdir()) == ["README", "shard-000000.tar.0123abcd"]


def test_a_manifest_not_written_by_encode_is_refused_not_overwritten(stage_project, synth_dir, fake_encoders,
                                                                     shared_url):
    import stages.encode

    video, text = fake_encoders
    theirs = json.dumps({"shards": [{"name": "shard-000000.tar"}]}).encode()  # another tool's manifest
    put(shared_url, "manifest.json", theirs)
    put(shared_url, "shard-000000.tar", b"their shard")
    for resume in (True, False):
        with pytest.raises(ShardError, match=r"manifest\.json was not written by the longlive shard writer.*own"):
            encode_dataset(synth_dir, shared_url, encode_video=video, encode_text=text, samples_per_shard=4,
                           fingerprint="x", resume=resume)
    _, configure = stage_project
    configure(shared_url, samples_per_shard=6)
    with pytest.raises(SystemExit) as exit_:  # the stage: one line, no traceback
        stages.encode.main()
    message = str(exit_.value.code)
    assert message.startswith("encode: ") and "\n" not in message and "encode.url" in message
    assert get(shared_url, "manifest.json") == theirs and get(shared_url, "shard-000000.tar") == b"their shard"
    assert names(shared_url) == {"manifest.json", "shard-000000.tar"}  # not even a progress file was added


# ----------------------------------------------------------------------------- validate: missing and extra


@pytest.fixture
def validated_project(stage_project):
    """The stage project after encode and a passing validate (metrics.json says success: true)."""
    import stages.encode
    import stages.validate

    proj, configure = stage_project
    configure("data/encoded/shards", samples_per_shard=5)
    stages.encode.main()
    stages.validate.main()
    assert json.loads((proj / "reports/validate/metrics.json").read_text())["success"] is True
    return proj


def verdict(proj) -> tuple[dict, dict]:
    metrics = json.loads((proj / "reports/validate/metrics.json").read_text())
    report = json.loads((proj / "reports/validate/report.json").read_text())
    return metrics, report


def test_validate_on_a_missing_shard_fails_on_disk_and_in_one_line(validated_project):
    import stages.validate

    proj = validated_project
    (proj / "data/encoded/shards/shard-000001.tar").unlink()
    with pytest.raises(SystemExit) as exit_:
        stages.validate.main()
    message = str(exit_.value.code)
    assert "\n" not in message and "shard-000001.tar" in message and "dvc repro encode" in message
    metrics, report = verdict(proj)
    assert metrics["success"] is False and report["success"] is False
    failed = {c["name"]: c for c in report["checks"] if not c["success"]}
    assert "shard-000001.tar" in failed["every shard the manifest lists is present"]["examples"][0]
    markdown = (proj / "reports/validate/report.md").read_text()
    assert "FAILED" in markdown and "shard-000001.tar is listed in manifest.json but missing" in markdown
    assert "dvc repro encode" in markdown


def test_validate_on_an_unlisted_extra_shard_fails_naming_it(validated_project):
    import stages.validate

    proj = validated_project
    shards = proj / "data/encoded/shards"
    shutil.copy(shards / "shard-000000.tar", shards / "shard-000099.tar")
    with pytest.raises(SystemExit) as exit_:
        stages.validate.main()
    assert "shard-000099.tar" in str(exit_.value.code)
    metrics, report = verdict(proj)
    assert metrics["success"] is False
    failed = {c["name"]: c for c in report["checks"] if not c["success"]}
    assert set(failed) == {"no shard files the manifest does not list"}
    assert failed["no shard files the manifest does not list"]["examples"][0].startswith("shard-000099.tar")
    markdown = (proj / "reports/validate/report.md").read_text()
    assert "shard-000099.tar is not in manifest.json" in markdown and "move it away" in markdown


def test_a_validate_run_that_dies_leaves_no_success_behind(validated_project, monkeypatch):
    import stages.validate

    def crash(*args, **kwargs):
        raise MemoryError("killed mid-validation")

    monkeypatch.setattr(stages.validate, "validate_shards", crash)
    with pytest.raises(MemoryError):
        stages.validate.main()
    metrics, report = verdict(validated_project)
    assert metrics["success"] is False and report["success"] is False and report["manifest_sha256"] is None


# ----------------------------------------------------------------------------- training: the gate


def test_train_ar_stage_refuses_unvalidated_shards_before_any_step(stage_project, monkeypatch):
    import stages.encode
    import stages.train_ar
    import stages.validate
    from longlive.train import ar

    proj, configure = stage_project
    configure("data/encoded/shards", samples_per_shard=5)
    stages.encode.main()
    monkeypatch.setattr(ar, "run_training", lambda *a, **k: pytest.fail("trained on unvalidated shards"))
    with pytest.raises(SystemExit) as exit_:
        stages.train_ar.main(["t2v"])  # validate never ran: no record
    message = str(exit_.value.code)
    assert message.startswith("train_ar: ") and "\n" not in message and "`dvc repro validate`" in message

    stages.validate.main()
    (proj / "models/base/text/weights.bin").write_bytes(b"v2")  # re-encode: the record is for the old manifest
    stages.encode.main()
    with pytest.raises(SystemExit, match="changed since .* judged them.*dvc repro validate"):
        stages.train_ar.main(["t2v"])


def test_nan_data_stops_at_validate_and_train_ar_refuses_it_before_any_model_or_step(stage_project, tiny_preset,
                                                                                     monkeypatch):
    import stages.encode
    import stages.train_ar
    import stages.validate
    from longlive.train import ar

    proj, configure = stage_project
    configure("data/encoded/shards", samples_per_shard=5)
    video, text = make_fake_encoders(tiny_preset)

    def nan_in_the_first_clip(x):
        out = video(x).clone()
        out[0, 0, 0, 0, 0] = float("nan")
        return out

    monkeypatch.setattr(stages.encode.WanVAE, "from_pretrained",
                        classmethod(lambda cls, *a, **k: FakeVAE(nan_in_the_first_clip)))
    stages.encode.main()
    with pytest.raises(SystemExit, match="NaN"):
        stages.validate.main()
    # Run directly (not through dvc repro, which would stop at validate): it must stop before it loads a model.
    for name in ("build_dit", "load_text_encoder", "run_training"):
        monkeypatch.setattr(ar, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} ran on data validate failed"))
    with pytest.raises(SystemExit) as exit_:
        stages.train_ar.main(["t2v"])
    message = str(exit_.value.code)
    assert message.startswith("train_ar: ") and "\n" not in message
    assert "failed validation" in message and "`dvc repro validate`" in message
    assert not (proj / "models/ar/t2v").exists()


def test_train_dmd_stage_refuses_unvalidated_shards_in_one_line(stage_project):
    import stages.encode
    import stages.train_dmd
    from longlive.config import load_preset
    from longlive.models.checkpoint import AR_CONFIG_NAME
    from longlive.train.ar import inference_config

    proj, configure = stage_project
    configure("data/encoded/shards", samples_per_shard=5)
    stages.encode.main()
    (proj / "models/ar/t2v").mkdir(parents=True)
    (proj / "models/ar/t2v" / AR_CONFIG_NAME).write_text(json.dumps(inference_config(load_preset(), "t2v")))
    with pytest.raises(SystemExit) as exit_:
        stages.train_dmd.main(["t2v", "2step"])  # models/base holds no DiT: any model load would traceback
    message = str(exit_.value.code)
    assert message.startswith("train_dmd: ") and "\n" not in message and "`dvc repro validate`" in message


def _poison_one_latent(url: str, tmp_path) -> str:
    """A copy of the dataset at ``url`` with NaN in one clip's latents."""
    dst = str(tmp_path / "nan")
    with ShardWriter(dst, 5) as w:
        for s in iter_samples(url):
            if s["__key__"] == "clip-000003":
                s["latents.npy"] = s["latents.npy"].copy()
                s["latents.npy"][0, 0, 0, 0] = np.nan
            w.write({k: v for k, v in s.items() if k != "__shard__"})
    return dst


def test_the_gate_passes_only_a_passing_record_for_the_same_manifest(synth_dir, fake_encoders, tiny_preset, tmp_path):
    from longlive.data.validate import expected_from_preset, validate_shards
    from longlive.train.ar import ShardClips

    video, text = fake_encoders
    url = str(tmp_path / "shards")
    encode_dataset(synth_dir, url, encode_video=video, encode_text=text, samples_per_shard=5)
    with pytest.raises(NotValidatedError, match=r"not been validated .*`dvc repro validate`"):
        ShardClips(url, validation_report=tmp_path / "none" / "report.json")

    nan_url = _poison_one_latent(url, tmp_path)
    failing = validate_shards(nan_url, expected_from_preset(tiny_preset), tiny_preset.validate_)
    assert not failing.success
    bad_record = failing.write(tmp_path / "nan_report")[0]
    with pytest.raises(NotValidatedError, match=r"failed validation .*dvc repro validate"):
        ShardClips(nan_url, validation_report=bad_record)

    record = validate_into(url, tiny_preset, tmp_path / "report")
    with pytest.raises(NotValidatedError, match="changed since"):
        ShardClips(nan_url, validation_report=record)  # a passing record, but for another manifest
    data = ShardClips(url, validation_report=record)
    assert len(data) == 12 and torch.isfinite(data.first().latents.float()).all()
    _, _, manifest = require_validated(url, record)
    assert [e["name"] for e in manifest["shards"]] == [e["name"] for e in data.entries]


def test_train_dmd_and_distill_decoder_open_shards_through_the_gate(synth_dir, fake_encoders, tiny_preset, tmp_path):
    from longlive.config import DMDConfig
    from longlive.models.checkpoint import AR_CONFIG_NAME
    from longlive.train.ar import inference_config
    from longlive.train.dmd import train_dmd
    from longlive.train.light_decoder import load_latents

    video, text = fake_encoders
    url = str(tmp_path / "shards")
    encode_dataset(synth_dir, url, encode_video=video, encode_text=text, samples_per_shard=5)
    missing = tmp_path / "validate" / "report.json"
    with pytest.raises(NotValidatedError, match="dvc repro validate"):
        load_latents(url, missing)
    preset = tiny_preset.model_copy(update={"dmd": DMDConfig(
        train={"steps": 1, "batch_size": 1, "lr": 1e-3, "log_every": 1}, timestep_shift=3.0,
        students={"2step": [1000, 500]}, variants=["t2v"])})
    (tmp_path / "ar").mkdir()
    (tmp_path / "ar" / AR_CONFIG_NAME).write_text(json.dumps(inference_config(preset, "t2v")))
    with pytest.raises(NotValidatedError, match="dvc repro validate"):  # before any model is loaded
        train_dmd(preset, "t2v", "2step", ar_dir=tmp_path / "ar", base_dir=tmp_path / "no-base",
                  out_dir=tmp_path / "out", work_dir=tmp_path / "work", plots_dir=tmp_path / "plots",
                  shards_url=url, validation_report=missing)
    clips, manifest = load_latents(url, validate_into(url, tiny_preset, tmp_path / "validate"))
    assert len(clips) == 12 == manifest["total_samples"]


def test_storage_errors_do_not_echo_credentials_in_the_endpoint(clean_s3_env):
    from conftest import free_port

    endpoint = f"http://AKIAEXAMPLEKEY:s3cr3t-value@127.0.0.1:{free_port()}"
    clean_s3_env.setenv("AWS_ENDPOINT_URL", endpoint)
    with pytest.raises(ShardError) as err:
        read_manifest("s3://bucket/shards")
    assert "s3cr3t-value" not in str(err.value) and "AKIAEXAMPLEKEY" not in str(err.value)
    assert "127.0.0.1" in str(err.value) and "user:password@" in str(err.value)  # the fix, not the secret
