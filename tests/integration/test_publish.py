"""Releases: build, publish to a local folder and to S3 (a moto server on 127.0.0.1 started here), pull with
verification, atomicity under injected faults (a failing write, the server stopped mid-upload), tampering,
double publish, the CLI, the stage, and inference from a pulled release. Random tiny models: seconds."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml

from conftest import free_port
from longlive.cli import main
from longlive.config import PublishConfig, load_preset
from longlive.inference.generate import generate_video, load_release_models
from longlive.inference.schedule import PromptSchedule
from longlive.models.dit import WanDiT
from longlive.models.text import TinyTextEncoder
from longlive.models.vae import WanVAE
from longlive.models.wan_adapter import load_dit, save_dit
from longlive.publish import (
    ChecksumError, Release, ReleaseError, ReleaseExistsError, ReleaseStore, UploadError, build_release,
    publish_from_config, pull_release, resolve_version, verify_folder,
)
from longlive.publish.store import LATEST, STAGING
from longlive.quant import nvfp4

DIT_FILE = "transformer/diffusion_pytorch_model.safetensors"  # t2v: the diffusers pipeline's transformer


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def preset():
    return load_preset("tiny")


@pytest.fixture(scope="module")
def inputs(preset, tmp_path_factory) -> Path:
    """A small git+DVC-like repository with what the publish stage reads: base models, a train_ar export,
    an NVFP4 checkpoint, metrics and dvc.lock. Random weights of the tiny preset's sizes."""
    root = tmp_path_factory.mktemp("repo")
    torch.manual_seed(0)
    dit = WanDiT(preset.dit, preset.vae.z_dim, preset.text.dim)
    dit.init_weights(0)
    save_dit(dit, root / "models/ar/t2v/dit")
    (root / "models/ar/t2v/ar_config.json").write_text(json.dumps(
        {"variant": "t2v", "i2v": False, "independent_first_frame": False, "block_frames": 2,
         "denoising_steps": [1000, 750, 500, 250], "timestep_shift": 3.0}))
    WanVAE(preset.vae).save_pretrained(root / "models/base/vae")
    TinyTextEncoder(preset.text, seed=0).save(root / "models/base/text")
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    nvfp4.save(nvfp4.quantize(w), root / "models/quant/t2v_nvfp4/blocks.0.ffn.linear_1.weight.safetensors")
    (root / "reports/eval").mkdir(parents=True)
    (root / "reports/eval/metrics.json").write_text(json.dumps({"t2v": {"fps": 12.5, "score": 0.41}, "latency_s": 0.3}))
    (root / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=root, check=True)
    subprocess.run([*git, "add", "dvc.lock"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "inputs"], cwd=root, check=True)
    return root


def config(inputs: Path, url: str, **update) -> PublishConfig:
    return PublishConfig(
        url=url,
        checkpoints={"t2v": str(inputs / "models/ar/t2v"),
                     "t2v-nvfp4": {"path": str(inputs / "models/quant/t2v_nvfp4"),
                                   "quantization": {"backend": "emulated"}}},
        metrics={"eval": str(inputs / "reports/eval/metrics.json")},
        base=str(inputs / "models/base"),
        **update,
    )


def publish(preset, inputs, url, tmp_path, **kw):
    cfg = kw.pop("cfg", None) or config(inputs, url)
    return publish_from_config(preset, cfg, work_dir=tmp_path / "work", repo=inputs, progress=False, **kw)


@pytest.fixture(scope="module")
def moto_endpoint() -> str:
    """A moto S3 server on 127.0.0.1 for this module, stopped at its end."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def new_bucket(endpoint: str) -> str:
    import boto3

    name = f"rel-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_store(moto_endpoint, clean_s3_env) -> str:
    clean_s3_env.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    return f"s3://{new_bucket(moto_endpoint)}/longlive/releases"


def store_files(store: ReleaseStore) -> list[str]:
    return sorted(p[len(store.root) + 1:] for p in store.fs.find(store.root))


# ----------------------------------------------------------------------------- publish, pull, load


def test_publish_pull_verify_on_s3(preset, inputs, s3_store, tmp_path, clean_s3_env, moto_endpoint):
    result = publish(preset, inputs, s3_store, tmp_path)
    assert result.version == "tiny-v1" and result.uploaded and result.latest
    assert not (tmp_path / "work/tiny-v1").exists(), "the local build is dropped once the store holds it"
    store = ReleaseStore(s3_store)
    assert store.versions() == ["tiny-v1"]
    assert store.latest()["version"] == "tiny-v1"
    assert not any(p.startswith(STAGING) for p in store_files(store)), "staging is cleaned after a publish"

    # Endpoint from storage options instead of the environment.
    clean_s3_env.delenv("AWS_ENDPOINT_URL")
    pulled = pull_release(s3_store, tmp_path / "pulled", storage_options={"endpoint_url": moto_endpoint}, progress=False)
    assert pulled.version == "tiny-v1" and pulled.downloaded
    manifest = verify_folder(tmp_path / "pulled")
    files = set(manifest["files"])
    assert {"README.md", "release.json", "config/preset.json", "metrics/eval.json", "provenance/git.json",
            "provenance/dvc.lock", DIT_FILE, "transformer/ar_config.json", "vae/config.json",
            "text/model.safetensors", "model_index.json"} <= files
    assert any(f.startswith("checkpoints/t2v-nvfp4/") and f.endswith(".safetensors") for f in files)

    release = Release.open(tmp_path / "pulled")
    t2v, q = release.info["checkpoints"]["t2v"], release.info["checkpoints"]["t2v-nvfp4"]
    assert t2v["dtype"] == "bf16" and set(t2v["stored_dtypes"]) == {"BF16", "F32"}  # norms stay float32
    assert q["kind"] == "nvfp4" and q["quantization"]["format"] == "nvfp4" and q["quantization"]["backend"] == "emulated"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=inputs, capture_output=True, text=True).stdout.strip()
    assert release.info["git"]["commit"] == commit
    assert (tmp_path / "pulled/provenance/dvc.lock").read_text() == (inputs / "dvc.lock").read_text()
    card = (tmp_path / "pulled/README.md").read_text()
    for text in ("| t2v.fps | 12.5 |", "## Intended use", "## Limitations", commit, "dvc repro",
                 f"longlive pull {s3_store}/tiny-v1", "nvfp4"):
        assert text in card, text

    # The inference pipeline loads the pulled release: bf16 weights equal to the source cast to bf16.
    models, rel_preset = load_release_models(tmp_path / "pulled", "t2v")
    want = load_dit(inputs / "models/ar/t2v/dit", dtype=torch.bfloat16).state_dict()
    got = models.dit.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert rel_preset.inference.block_frames == 2
    with pytest.raises(ReleaseError, match="t2v-nvfp4 .* is nvfp4"):
        load_release_models(tmp_path / "pulled", "t2v-nvfp4")
    video = generate_video(models, rel_preset, PromptSchedule.single("a red circle moves left"), latent_frames=2,
                           keep_frames=True)
    assert video.frames.shape[1:] == (preset.video.height, preset.video.width, 3)

    # Unchanged inputs publish nothing new (content-addressed; this used to mint tiny-v2, the bug of issue 15);
    # a changed model takes the next number and moves `latest`.
    clean_s3_env.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    again = publish(preset, inputs, s3_store, tmp_path)
    assert (again.version, again.uploaded, again.latest) == ("tiny-v1", False, True)
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"t2v": {"fps": 13.0}}))
    changed = config(inputs, s3_store).model_copy(update={"metrics": {"eval": str(metrics)}})
    assert publish(preset, inputs, s3_store, tmp_path, cfg=changed).version == "tiny-v2"
    assert store.versions() == ["tiny-v1", "tiny-v2"] and store.latest()["version"] == "tiny-v2"
    assert pull_release(f"{s3_store}/tiny-v1", tmp_path / "v1", progress=False).version == "tiny-v1"


@pytest.mark.parametrize("scheme", ["path", "file"])
def test_local_folder_publish_and_pull(preset, inputs, tmp_path, scheme):
    folder = tmp_path / "releases"
    url = str(folder) if scheme == "path" else folder.as_uri()
    result = publish(preset, inputs, url, tmp_path)
    assert (folder / "tiny-v1/manifest.json").is_file() and json.loads((folder / LATEST).read_text())["version"] == "tiny-v1"
    # The empty _staging/ folder stays (removing it raced with a concurrent publisher's mkdir); nothing is in it.
    assert not [p for p in (folder / STAGING).rglob("*")]
    pulled = pull_release(url, tmp_path / "pulled", progress=False)
    assert pulled.num_files == result.num_files
    assert verify_folder(tmp_path / "pulled") == verify_folder(folder / "tiny-v1")
    # Pulling again into the same folder is a verified no-op.
    assert not pull_release(url, tmp_path / "pulled", progress=False).downloaded


# ----------------------------------------------------------------------------- atomicity


class Boom(OSError):
    pass


def _fail_after(m, method: str, n: int, on_fail=None) -> None:
    """Make ``method`` of every filesystem the store opens raise on its (n+1)-th call; with ``on_fail``
    (e.g. stopping the server) run that instead and let the real call fail against the dead server."""
    import longlive.publish.store as store_mod

    real_open = store_mod.open_fs
    calls = {"n": 0}

    def open_fs(url, storage_options=None):
        fs, root = real_open(url, storage_options)
        original = getattr(fs, method)

        def flaky(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > n:
                if on_fail is None:
                    raise Boom(f"injected failure in {method}")
                on_fail()
            return original(*args, **kwargs)

        m.setattr(fs, method, flaky)  # on the instance, undone after the test (local filesystems are cached)
        return fs, root

    m.setattr(store_mod, "open_fs", open_fs)


def assert_nothing_visible(url: str, tmp_path: Path) -> None:
    store = ReleaseStore(url)
    assert store.versions() == [] and store.latest() is None
    assert not store.fs.exists(f"{store.root}/tiny-v1/manifest.json")
    with pytest.raises(ReleaseError):
        pull_release(url, tmp_path / "nope", progress=False)
    with pytest.raises(ReleaseError, match="incomplete|no release|no latest"):
        pull_release(url, tmp_path / "nope", version="tiny-v1", progress=False)
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("phase", ["upload", "promote"])
def test_failed_write_leaves_no_release_and_retry_succeeds(preset, inputs, tmp_path, request, monkeypatch, where, phase):
    url = request.getfixturevalue("s3_store") if where == "s3" else str(tmp_path / "releases")
    with monkeypatch.context() as m:
        if phase == "upload":
            _fail_after(m, "put_file", 3)
        elif where == "s3":
            _fail_after(m, "copy", 2)  # server-side copies from staging: some files land, no manifest
        else:
            real_replace = os.replace

            def replace(src, dst):  # only the rename of the staged release fails
                if f"/{STAGING}/" in str(src):
                    raise Boom("rename failed")
                return real_replace(src, dst)

            m.setattr(os, "replace", replace)
        with pytest.raises(UploadError, match="no release was made visible.*retry"):
            publish(preset, inputs, url, tmp_path)
    assert_nothing_visible(url, tmp_path)
    store = ReleaseStore(url)
    if phase == "promote" and where == "s3":
        # Some files reached the release prefix before the failure, but without a manifest it is not a release.
        assert [p for p in store_files(store) if p.startswith("tiny-v1/")]
        with pytest.raises(ReleaseError, match="tiny-v1 .* is incomplete .* rerun the publish"):
            pull_release(url, tmp_path / "nope", version="tiny-v1", progress=False)

    result = publish(preset, inputs, url, tmp_path)  # the same command again
    assert result.version == "tiny-v1" and result.uploaded
    assert store.versions() == ["tiny-v1"] and store.latest()["version"] == "tiny-v1"
    assert not any(p.startswith(STAGING + "/") for p in store_files(store))
    pull_release(url, tmp_path / "pulled", progress=False)
    verify_folder(tmp_path / "pulled")


def test_server_stopped_mid_upload(preset, inputs, tmp_path, clean_s3_env, monkeypatch):
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        clean_s3_env.setenv("AWS_ENDPOINT_URL", endpoint)
        url = f"s3://{new_bucket(endpoint)}/releases"
        with monkeypatch.context() as m:
            _fail_after(m, "put_file", 4, on_fail=server.stop)
            with pytest.raises(UploadError, match="no release was made visible") as err:
                publish(preset, inputs, url, tmp_path)
        assert endpoint in str(err.value) or "Connect" in str(err.value), str(err.value)
        # The server comes back (moto keeps its objects in this process): nothing is visible; a retry completes.
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        assert_nothing_visible(url, tmp_path)
        assert publish(preset, inputs, url, tmp_path).version == "tiny-v1"
        pull_release(url, tmp_path / "pulled", progress=False)
        # The dead attempt's staging could not be removed (the server was down) and is young: it may be a live
        # upload for all a later publisher knows, so it stays until it is older than STAGING_TTL (the old code
        # removed every staging of the version, in-flight ones included: the bug of issue 15).
        store = ReleaseStore(url)
        debris = {p.split("/")[1] for p in store_files(store) if p.startswith(STAGING + "/")}
        assert len(debris) == 1 and debris.pop().startswith("tiny-v1.")
        m = pytest.MonkeyPatch()
        m.setattr("longlive.publish.store.STAGING_TTL", timedelta(0))
        try:
            store._clear_stale_staging("tiny-v1")
        finally:
            m.undo()
        assert not any(p.startswith(STAGING + "/") for p in store_files(ReleaseStore(url)))
    finally:
        server.stop()


def test_died_before_latest_pointer_is_finished_by_rerun(preset, inputs, tmp_path, monkeypatch):
    url = str(tmp_path / "releases")
    cfg = config(inputs, url, version="r1")
    monkeypatch.setattr(ReleaseStore, "_point_latest", lambda *a: (_ for _ in ()).throw(Boom("killed")))
    with pytest.raises(Boom):
        publish(preset, inputs, url, tmp_path, cfg=cfg)
    monkeypatch.undo()
    assert ReleaseStore(url).versions() == ["r1"] and ReleaseStore(url).latest() is None  # complete, just not latest
    result = publish(preset, inputs, url, tmp_path, cfg=cfg, exist_ok=True)  # what the stage does on a rerun
    assert not result.uploaded and ReleaseStore(url).latest()["version"] == "r1"


# ----------------------------------------------------------------------------- tampering, double publish


def test_tampered_file_is_refused_on_pull(preset, inputs, s3_store, tmp_path):
    publish(preset, inputs, s3_store, tmp_path)
    store = ReleaseStore(s3_store)
    path = f"{store.root}/tiny-v1/{DIT_FILE}"
    data = bytearray(store.fs.cat_file(path))
    data[len(data) // 2] ^= 0x01
    store.fs.pipe_file(path, bytes(data))
    with pytest.raises(ChecksumError, match=f"{DIT_FILE}.*sha256.*refusing release tiny-v1"):
        pull_release(s3_store, tmp_path / "pulled", progress=False)
    assert not (tmp_path / "pulled").exists(), "a refused release leaves nothing behind"

    # A manifest edited to match the tampered file no longer matches what latest.json recorded.
    manifest = json.loads(store.fs.cat_file(f"{store.root}/tiny-v1/manifest.json"))
    import hashlib

    manifest["files"][DIT_FILE]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    store.fs.pipe_file(f"{store.root}/tiny-v1/manifest.json", json.dumps(manifest).encode())
    with pytest.raises(ChecksumError, match="manifest was modified"):
        pull_release(s3_store, tmp_path / "pulled", progress=False)

    # A damaged file in a pulled folder is caught by a local verify, naming it.
    local = tmp_path / "local"
    publish(preset, inputs, str(local), tmp_path)
    pull_release(str(local), tmp_path / "ok", progress=False)
    (tmp_path / "ok" / DIT_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ChecksumError, match=DIT_FILE):
        Release.open(tmp_path / "ok").verify()


def test_double_publish_refused_unless_forced(preset, inputs, tmp_path):
    url = str(tmp_path / "releases")
    cfg = config(inputs, url, version="{preset}-fixed")
    publish(preset, inputs, url, tmp_path, cfg=cfg)
    # The same content again is a no-op by default now (it raised, the bug of issue 15); exist_ok=False refuses it.
    with pytest.raises(ReleaseExistsError, match="tiny-fixed already exists.*identical content.*--force"):
        publish(preset, inputs, url, tmp_path, cfg=cfg, exist_ok=False)
    assert not publish(preset, inputs, url, tmp_path, cfg=cfg).uploaded

    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"t2v": {"fps": 99.0}}))
    changed = cfg.model_copy(update={"metrics": {"eval": str(metrics)}})
    with pytest.raises(ReleaseExistsError, match="different content"):
        publish(preset, inputs, url, tmp_path, cfg=changed, exist_ok=True)
    result = publish(preset, inputs, url, tmp_path, cfg=changed, force=True)
    assert result.uploaded and result.replaced
    pull_release(url, tmp_path / "pulled", progress=False)
    assert json.loads((tmp_path / "pulled/metrics/eval.json").read_text()) == {"t2v": {"fps": 99.0}}


# ----------------------------------------------------------------------------- naming and errors


def test_version_template(preset, inputs, tmp_path):
    store = ReleaseStore(str(tmp_path / "releases"))
    assert resolve_version("{preset}-v{n}", store, preset, inputs) == "tiny-v1"
    short = subprocess.run(["git", "rev-parse", "HEAD"], cwd=inputs, capture_output=True, text=True).stdout[:8]
    assert resolve_version("{preset}-{commit}", store, preset, inputs) == f"tiny-{short}"
    publish(preset, inputs, store.url, tmp_path, cfg=config(inputs, store.url, version="tiny-v7"))
    (tmp_path / "releases/tiny-v9").mkdir()  # an interrupted publish (no manifest) does not take a number
    assert resolve_version("{preset}-v{n}", store, preset, inputs) == "tiny-v8"
    with pytest.raises(ReleaseError, match=r"\['user'\]"):
        resolve_version("{user}-v{n}", store, preset, inputs)
    with pytest.raises(ReleaseError, match="not allowed"):
        resolve_version("../{preset}", store, preset, inputs)


def test_build_errors_name_the_problem(preset, inputs, tmp_path):
    def build(**update):
        cfg = config(inputs, str(tmp_path / "r"))
        build_release(tmp_path / "out", version="v1", preset=preset, cfg=cfg.model_copy(update=update), repo=inputs)

    with pytest.raises(ReleaseError, match=r"checkpoint t2v: .*missing.*publish.checkpoints.t2v.path"):
        build(checkpoints=PublishConfig(checkpoints={"t2v": str(tmp_path / "missing")}).checkpoints)
    with pytest.raises(ReleaseError, match=r"records no backend.*publish.checkpoints.q.quantization"):
        build(checkpoints=PublishConfig(checkpoints={"q": str(inputs / "models/quant/t2v_nvfp4")}).checkpoints)
    with pytest.raises(ReleaseError, match=r"metrics eval: .*not found"):
        build(metrics={"eval": str(tmp_path / "none.json")})
    small = load_preset("small")
    with pytest.raises(ReleaseError, match="DiT sizes .* preset small"):
        build_release(tmp_path / "out", version="v1", preset=small, cfg=config(inputs, "x"), repo=inputs)
    assert not (tmp_path / "out").exists(), "a failed build leaves no folder"
    with pytest.raises(ValueError, match="names a folder"):
        PublishConfig(checkpoints={"a/b": "x"})


# ----------------------------------------------------------------------------- CLI and stage


def test_cli_publish_pull_and_generate(inputs, tmp_path, capsys):
    url = str(tmp_path / "releases")
    args = ["publish", "--url", url, "--checkpoint", f"t2v={inputs / 'models/ar/t2v'}", "--metrics",
            f"eval={inputs / 'reports/eval/metrics.json'}", "--base", str(inputs / "models/base"),
            "--version", "cli-1", "--work-dir", str(tmp_path / "work"), "--quiet"]
    assert main(args) == 0
    capsys.readouterr()
    # The same release again is a no-op naming it (it failed, the bug of issue 15); other content is refused.
    assert main(args) == 0 and f"already published as {url}/cli-1" in capsys.readouterr().out
    (tmp_path / "m2.json").write_text(json.dumps({"t2v": {"fps": 1.0}}))
    other = [a if not a.startswith("eval=") else f"eval={tmp_path / 'm2.json'}" for a in args]
    assert main(other) == 2 and "already exists" in capsys.readouterr().err
    assert main(["pull", f"{url}/cli-1", "--dest", str(tmp_path / "pulled"), "--quiet"]) == 0
    out = tmp_path / "v.mp4"
    assert main(["generate", "--checkpoint", str(tmp_path / "pulled/checkpoints/t2v"), "--prompt",
                 "a red circle moves left", "--seconds", "0.5", "--out", str(out)]) == 0
    assert out.is_file() and json.loads(out.with_suffix(".json").read_text())["preset"] == "tiny"

    (Path(url) / "cli-1/metrics/eval.json").write_text("{}")
    assert main(["pull", url, "--dest", str(tmp_path / "again"), "--quiet"]) == 2
    assert "metrics/eval.json" in capsys.readouterr().err


def test_stage_publishes_and_reruns_idempotently(inputs, tmp_path, monkeypatch):
    import stages.publish

    params = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    cfg = config(inputs, "releases", version="{preset}-{commit}", wandb=True)
    params["presets"]["tiny"]["publish"] = cfg.model_dump()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("LONGLIVE_PARAMS", str(tmp_path / "params.yaml"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("LONGLIVE_PRESET", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("longlive.publish.run.git_info", lambda repo: {"short": "abc12345"})
    stages.publish.main()
    report = json.loads((tmp_path / "reports/publish/release.json").read_text())
    assert report["version"] == "tiny-abc12345" and report["uploaded"]
    assert (tmp_path / "releases/tiny-abc12345/manifest.json").is_file()
    assert list((tmp_path / ".work/publish/wandb").glob("offline-run-*")), "the wandb artifact is logged offline"
    stages.publish.main()  # dvc repro -f: the same release again is a no-op, not an error
    assert not json.loads((tmp_path / "reports/publish/release.json").read_text())["uploaded"]
