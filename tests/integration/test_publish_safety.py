"""Releases under hostile use (issue 15): pull --force on folders that are not releases, oversized files,
republishing unchanged content, concurrent publishers of one version, Ctrl-C mid-publish, hostile
manifests and latest pointers, and credentials. Each test injects the fault and asserts the guarantee,
on a local folder and, where it differs, on a moto S3 server on 127.0.0.1. Hand-made release folders
(a few small files) keep most of them under a second; the content-addressing ones build real releases
of an NVFP4 checkpoint (no model is run)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch

from conftest import free_port
from longlive.cli import main
from longlive.config import PublishConfig, load_preset
from longlive.publish import (
    ChecksumError, PublishConflictError, ReleaseError, ReleaseExistsError, ReleaseStore, build_release,
    content_id, publish_from_config, pull_release, verify_folder,
)
from longlive.publish.manifest import build_manifest, manifest_bytes, write_manifest
from longlive.publish.store import LATEST, LOCKS, STAGING

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- helpers and fixtures


def make_folder(root: Path, version: str, payload: str = "weights", extra: dict[str, bytes] | None = None) -> Path:
    """A small release folder: a payload file, a description naming the version, and its manifest."""
    folder = root / f"build-{version}-{uuid.uuid4().hex[:6]}"
    (folder / "checkpoints/t2v").mkdir(parents=True)
    (folder / "checkpoints/t2v/model.bin").write_text(payload * 50)
    (folder / "release.json").write_text(json.dumps({"version": version}))
    for rel, data in (extra or {}).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    write_manifest(folder, build_manifest(folder, version))
    return folder


def put(store: ReleaseStore, rel: str, data: bytes) -> None:
    """Write a file into the store behind its back (a planted or hand-made object)."""
    path = f"{store.root}/{rel}"
    if store.local:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    store.fs.pipe_file(path, data)


def store_files(store: ReleaseStore) -> list[str]:
    return sorted(p[len(store.root) + 1:] for p in store.fs.find(store.root))


def assert_clean(store: ReleaseStore) -> None:
    """No lock held and no staging left: what a finished or failed publish leaves."""
    left = [p for p in store_files(store) if p.startswith((STAGING + "/", LOCKS + "/"))]
    assert not left, left


@pytest.fixture(scope="module")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_url(moto_endpoint, clean_s3_env) -> str:
    import boto3

    clean_s3_env.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    bucket = f"safe-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/releases"


@pytest.fixture(params=["local", "s3"])
def url(request, tmp_path) -> str:
    return request.getfixturevalue("s3_url") if request.param == "s3" else str(tmp_path / "releases")


@pytest.fixture(scope="module")
def preset():
    return load_preset("tiny")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A git repository holding what a publish reads: an NVFP4 checkpoint (copied as is: no model runs),
    metrics and dvc.lock."""
    from longlive.quant import nvfp4

    root = tmp_path_factory.mktemp("repo")
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    nvfp4.save(nvfp4.quantize(w), root / "models/quant/t2v/blocks.0.ffn.linear_1.weight.safetensors")
    (root / "metrics.json").write_text(json.dumps({"t2v": {"fps": 12.5}}))
    (root / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=root, check=True)
    subprocess.run([*git, "add", "dvc.lock"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "inputs"], cwd=root, check=True)
    return root


def config(inputs: Path, url: str, **update) -> PublishConfig:
    return PublishConfig(url=url, checkpoints={"t2v": {"path": str(inputs / "models/quant/t2v"),
                                                       "quantization": {"backend": "emulated"}}},
                         metrics={"eval": str(inputs / "metrics.json")}, base_components=[], **update)


def publish(preset, inputs, cfg, tmp_path, **kw):
    return publish_from_config(preset, cfg, work_dir=tmp_path / "work", repo=inputs, progress=False, **kw)


class Boom(OSError):
    pass


# ----------------------------------------------------------------------------- 1: pull --dest / --force


def test_force_never_replaces_a_folder_that_is_not_a_release(tmp_path):
    store = ReleaseStore(str(tmp_path / "releases"))
    store.publish(make_folder(tmp_path, "v1"), progress=False)
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("precious")
    (mine / "manifest.json").write_text('{"not": "a release manifest"}')  # a manifest.json alone is not enough
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ReleaseError, match=r"mine exists and is not a release folder.*--force replaces only a release"):
        pull_release(store.url, mine, force=True, progress=False)
    assert (mine / "notes.txt").read_text() == "precious" and (mine / "sub").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a refusal leaves nothing beside the folder"

    # A release folder (another version) is replaced with --force, refused without.
    other = tmp_path / "other"
    store.publish(make_folder(tmp_path, "v2", payload="other"), progress=False)
    pull_release(store.url, other, version="v2", progress=False)
    with pytest.raises(ReleaseError, match="holds release v2, not v1.*--force"):
        pull_release(store.url, other, version="v1", progress=False)
    assert pull_release(store.url, other, version="v1", force=True, progress=False).downloaded
    assert verify_folder(other)["version"] == "v1"


@pytest.mark.parametrize("dest", [".", "..", "{cwd}", "{tmp}"])
def test_pull_refuses_the_current_directory_and_its_parents(tmp_path, monkeypatch, capsys, dest):
    store = ReleaseStore(str(tmp_path / "releases"))
    store.publish(make_folder(tmp_path, "v1"), progress=False)
    cwd = tmp_path / "work" / "here"
    cwd.mkdir(parents=True)
    (cwd / "file.txt").write_text("keep")
    monkeypatch.chdir(cwd)
    dest = dest.format(cwd=cwd, tmp=tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(ReleaseError, match="current directory or one above it"):
        pull_release(store.url, dest, force=True, progress=False)
    assert main(["pull", store.url, "--dest", dest, "--force", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "current directory" in err, err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before, "no .old-/.tmp- folder or lost file"


# ----------------------------------------------------------------------------- 2: reading stops at the recorded size


def test_pull_stops_reading_at_the_recorded_size(url, tmp_path, monkeypatch):
    store = ReleaseStore(url)
    folder = make_folder(tmp_path, "v1", extra={"big.bin": b"x" * 226})
    store.publish(folder, progress=False)
    # The store's copy grows to 20 MiB (a hostile or broken store); the manifest still says 226 bytes.
    store.fs.pipe_file(f"{store.root}/v1/big.bin", b"y" * (20 << 20))
    read = {}
    real_open = store.fs.open

    def counting_open(path, mode="rb", **kw):
        f = real_open(path, mode, **kw)
        real_read, name = f.read, path.rsplit("/", 1)[-1]

        def read_(n=-1):
            data = real_read(n)
            read[name] = read.get(name, 0) + len(data)
            return data

        f.read = read_
        return f

    monkeypatch.setattr(store.fs, "open", counting_open)
    with pytest.raises(ChecksumError, match=r"big.bin: .* holds more than the 226 bytes the manifest records"):
        store.pull("v1", tmp_path / "pulled", progress=False)
    assert read["big.bin"] == 227, read  # the recorded size and one byte to tell it is larger: not 20 MiB
    assert not (tmp_path / "pulled").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pulled")], "no temporary folder is left"


# ----------------------------------------------------------------------------- 3: content-addressed releases


def test_unchanged_inputs_publish_once(preset, inputs, tmp_path):
    url = str(tmp_path / "releases")
    cfg = config(inputs, url)
    results = [publish(preset, inputs, cfg, tmp_path) for _ in range(3)]
    assert [(r.version, r.uploaded) for r in results] == [("tiny-v1", True), ("tiny-v1", False), ("tiny-v1", False)]
    store = ReleaseStore(url)
    assert store.versions() == ["tiny-v1"] and store.latest()["version"] == "tiny-v1"

    # Volatile provenance (a dirty tree, a rewritten dvc.lock, a new commit) does not make it new.
    lock = inputs / "dvc.lock"
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-q", "-am"]
    lock.write_text(lock.read_text() + "# rewritten by dvc repro\n")
    again = publish(preset, inputs, cfg, tmp_path)
    assert (again.version, again.uploaded) == ("tiny-v1", False)
    by_commit = config(inputs, url, version="{preset}-{commit}")
    first = publish(preset, inputs, by_commit, tmp_path)  # another template names its own releases
    assert first.uploaded and first.version.startswith("tiny-") and first.version != "tiny-v1"
    subprocess.run([*git, "next commit"], cwd=inputs, check=True)
    same = publish(preset, inputs, by_commit, tmp_path)  # a new commit, the same payload: its first name
    assert (same.version, same.uploaded) == (first.version, False)
    # Changed content is a new release.
    (tmp_path / "m.json").write_text(json.dumps({"t2v": {"fps": 99.0}}))
    changed = cfg.model_copy(update={"metrics": {"eval": str(tmp_path / "m.json")}})
    assert publish(preset, inputs, changed, tmp_path).version == "tiny-v2"
    assert "tiny-v2" in store.versions() and store.latest()["version"] == "tiny-v2"
    # Republishing the first content names tiny-v1 and leaves latest on the newer tiny-v2.
    back = publish(preset, inputs, cfg, tmp_path)
    assert (back.version, back.uploaded, back.latest) == ("tiny-v1", False, False)
    assert store.latest()["version"] == "tiny-v2"


def test_crash_before_latest_is_finished_not_duplicated(preset, inputs, url, tmp_path, monkeypatch):
    cfg = config(inputs, url)
    publish(preset, inputs, cfg, tmp_path)  # tiny-v1, latest
    (tmp_path / "m.json").write_text(json.dumps({"t2v": {"fps": 3.0}}))
    changed = cfg.model_copy(update={"metrics": {"eval": str(tmp_path / "m.json")}})
    with monkeypatch.context() as m:
        m.setattr(ReleaseStore, "_point_latest", lambda *a: (_ for _ in ()).throw(Boom("killed")))
        with pytest.raises(Boom):
            publish(preset, inputs, changed, tmp_path)
    store = ReleaseStore(url)
    assert store.versions() == ["tiny-v1", "tiny-v2"] and store.latest()["version"] == "tiny-v1"  # stale pointer
    result = publish(preset, inputs, changed, tmp_path)  # the same command again
    assert (result.version, result.uploaded, result.latest) == ("tiny-v2", False, True)
    assert store.versions() == ["tiny-v1", "tiny-v2"] and store.latest()["version"] == "tiny-v2"
    pull_release(url, tmp_path / "pulled", progress=False)
    assert json.loads((tmp_path / "pulled/metrics/eval.json").read_text()) == {"t2v": {"fps": 3.0}}


def test_content_id_ignores_descriptive_files(tmp_path):
    a = build_manifest(make_folder(tmp_path, "v1", extra={"provenance/git.json": b'{"dirty": true}'}), "v1")
    b = build_manifest(make_folder(tmp_path, "v2", extra={"provenance/git.json": b'{"dirty": false}',
                                                          "README.md": b"# v2"}), "v2")
    c = build_manifest(make_folder(tmp_path, "v1", payload="changed"), "v1")
    assert content_id(a) == content_id(b) != content_id(c)


# ----------------------------------------------------------------------------- 4: concurrent publishers


def _race(url: str, folders: list[Path], jitter: bool, monkeypatch) -> list:
    """Publish every folder (one version, different content) at once; the outcome of each."""
    store = ReleaseStore(url)
    if jitter:  # widen the windows between upload, lock and promote so the threads interleave there
        real = store.fs.put_file

        def slow_put(*a, **kw):
            time.sleep(0.002 * (hash(threading.get_ident()) % 5))
            return real(*a, **kw)

        monkeypatch.setattr(store.fs, "put_file", slow_put)
    barrier, outcomes = threading.Barrier(len(folders)), [None] * len(folders)

    def run(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = ReleaseStore(url).publish(folders[i], progress=False)
        except BaseException as e:  # noqa: BLE001 - every outcome is asserted on below
            outcomes[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(folders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return outcomes


def _one_winner(url: str, folders: list[Path], outcomes: list, version: str, tmp_path: Path) -> None:
    winners = [i for i, o in enumerate(outcomes) if not isinstance(o, BaseException) and o.uploaded]
    losers = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(winners) == 1, outcomes
    assert len(losers) == len(folders) - 1 and all(isinstance(e, ReleaseExistsError) for e in losers), losers
    assert all("\n" not in str(e) and version in str(e) for e in losers)
    dest = tmp_path / f"pulled-{version}"
    pull_release(url, dest, version=version, progress=False)  # verifies every file
    won = folders[winners[0]]
    assert (dest / "checkpoints/t2v/model.bin").read_bytes() == (won / "checkpoints/t2v/model.bin").read_bytes()
    assert ReleaseStore(url).latest()["version"] == version
    assert_clean(ReleaseStore(url))


def test_concurrent_publishers_of_one_version_local(tmp_path, monkeypatch):
    # 20 races (the lost update it guards against showed in one trial of three), every other one with jitter
    url = str(tmp_path / "releases")
    for round_ in range(20):
        version = f"race-{round_}"
        folders = [make_folder(tmp_path, version, payload=f"content {i} ") for i in range(20 if round_ < 2 else 6)]
        with monkeypatch.context() as m:
            outcomes = _race(url, folders, jitter=round_ % 2 == 1, monkeypatch=m)
        _one_winner(url, folders, outcomes, version, tmp_path)


_PUBLISHER = """
import json, sys
from longlive.publish import ReleaseExistsError, ReleaseStore
try:
    r = ReleaseStore(sys.argv[1]).publish(sys.argv[2], progress=False)
    print(json.dumps({"uploaded": r.uploaded}))
except ReleaseExistsError as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
"""


def test_concurrent_publisher_processes(tmp_path):
    url = str(tmp_path / "releases")
    folders = [make_folder(tmp_path, "proc", payload=f"process {i} ") for i in range(8)]
    procs = [subprocess.Popen([sys.executable, "-c", _PUBLISHER, url, str(f)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for f in folders]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err  # no traceback: a win or a clean ReleaseExistsError
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(r.get("uploaded", False) for r in results) == 1, results
    pull_release(url, tmp_path / "pulled", progress=False)
    assert_clean(ReleaseStore(url))


def test_concurrent_publishers_of_one_version_s3(s3_url, tmp_path, monkeypatch):
    folders = [make_folder(tmp_path, "race", payload=f"content {i} ") for i in range(5)]
    outcomes = _race(s3_url, folders, jitter=True, monkeypatch=monkeypatch)
    _one_winner(s3_url, folders, outcomes, "race", tmp_path)


def test_a_publisher_never_removes_anothers_staging(url, tmp_path):
    store = ReleaseStore(url)
    now = datetime.now(timezone.utc)
    live = f"v1.{now.strftime('%Y%m%dT%H%M%SZ')}.{'a' * 12}"  # another publisher's upload in flight
    dead = f"v1.{(now - timedelta(days=2)).strftime('%Y%m%dT%H%M%SZ')}.{'b' * 12}"
    legacy, other = f"v1.{'c' * 12}", f"v1.1.{'d' * 12}"  # older longlive's name; another version's (v1.1)
    for name in (live, dead, legacy, other):
        put(store, f"{STAGING}/{name}/x.bin", b"partial")
    store.publish(make_folder(tmp_path, "v1"), progress=False)
    left = {p.split("/")[1] for p in store_files(store) if p.startswith(STAGING + "/")}
    assert left == {live, other}


def test_a_lock_left_by_a_killed_publisher_is_named(url, tmp_path):
    store = ReleaseStore(url)
    put(store, f"{LOCKS}/v1.json", json.dumps(
        {"owner": "x", "host": "gone", "pid": 1, "since": "2026-01-01T00:00:00+00:00"}).encode())
    with pytest.raises(PublishConflictError, match=rf"holds {store.url}/{LOCKS}/v1.json \(host gone.*delete"):
        store.publish(make_folder(tmp_path, "v1"), progress=False)
    assert store.versions() == [] and not [p for p in store_files(store) if p.startswith(STAGING + "/")]
    store.fs.rm_file(f"{store.root}/{LOCKS}/v1.json")  # what the message says to do
    assert store.publish(make_folder(tmp_path, "v1"), progress=False).uploaded


# ----------------------------------------------------------------------------- 5: Ctrl-C mid-publish


@pytest.mark.parametrize("phase", ["upload", "promote", "manifest"])
def test_ctrl_c_leaves_nothing_visible_and_a_rerun_completes(url, tmp_path, monkeypatch, phase):
    store = ReleaseStore(url)
    folder = make_folder(tmp_path, "v1", extra={"a.bin": b"a" * 1000, "b/c.bin": b"c" * 10})
    with monkeypatch.context() as m:
        if phase == "upload":
            real, calls = store.fs.put_file, []

            def put_file(*a, **kw):
                calls.append(1)
                if len(calls) == 3:
                    raise KeyboardInterrupt
                return real(*a, **kw)

            m.setattr(store.fs, "put_file", put_file)
        elif phase == "promote":
            if store.local:
                real_replace = os.replace
                m.setattr(os, "replace", lambda s, d: (_ for _ in ()).throw(KeyboardInterrupt)
                          if f"/{STAGING}/" in str(s) else real_replace(s, d))
            else:
                real_copy, copies = store.fs.copy, []

                def copy(*a, **kw):
                    copies.append(1)
                    if len(copies) == 2:
                        raise KeyboardInterrupt
                    return real_copy(*a, **kw)

                m.setattr(store.fs, "copy", copy)
        else:
            real_put = ReleaseStore._put_bytes

            def put_bytes(self, path, data, exclusive=False):
                if path.endswith("/v1/manifest.json"):
                    raise KeyboardInterrupt
                return real_put(self, path, data, exclusive)

            m.setattr(ReleaseStore, "_put_bytes", put_bytes)
        with pytest.raises(KeyboardInterrupt):
            store.publish(folder, progress=False)
    store = ReleaseStore(url)
    assert store.versions() == [] and store.latest() is None
    assert_clean(store)
    with pytest.raises(ReleaseError, match="incomplete|no release"):
        pull_release(url, tmp_path / "nope", version="v1", progress=False)
    result = store.publish(folder, progress=False)  # the same command again
    assert result.uploaded and store.latest()["version"] == "v1"
    pull_release(url, tmp_path / "pulled", progress=False)
    assert_clean(store)


# `longlive publish --folder` whose every file upload takes a while, so a SIGINT lands inside the upload
_SLOW_PUBLISH = """
import signal, sys, time
from fsspec.implementations.local import LocalFileSystem
signal.signal(signal.SIGINT, signal.default_int_handler)  # even if the test runner was started with SIGINT ignored
real = LocalFileSystem.put_file
LocalFileSystem.put_file = lambda self, *a, **kw: (time.sleep(0.4), real(self, *a, **kw))[1]
from longlive.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_of_the_publish_command_is_one_line_and_exit_130(tmp_path, capsys):
    """SIGINT to a running ``longlive publish`` mid-upload: exit 130, one line, no traceback, nothing visible, no
    lock; the same command then publishes."""
    url = str(tmp_path / "releases")
    folder = make_folder(tmp_path, "v1", extra={"a.bin": b"a" * 1000, "b/c.bin": b"c" * 10})
    args = ["publish", "--url", url, "--folder", str(folder), "--quiet"]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_PUBLISH, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120  # a hang guard, not a speed check
        while not [p for p in (tmp_path / "releases" / STAGING).glob("*/**/*") if p.is_file()]:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "publish never began uploading"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert out == "" and "Traceback" not in err and err.splitlines() == ["longlive publish: interrupted"], err
    store = ReleaseStore(url)
    assert store.versions() == [] and store.latest() is None
    assert_clean(store)
    assert main(args) == 0 and "published" in capsys.readouterr().out
    assert store.latest()["version"] == "v1" and verify_folder(folder)["version"] == "v1"
    assert_clean(store)


# ----------------------------------------------------------------------------- 6: hostile manifests and pointers

def cli_refuses(args: list[str], capsys, why: str) -> bool:
    """``longlive ARGS`` exits 2 with one line on stderr, holding ``why`` (a regex), and nothing on stdout."""
    import re

    capsys.readouterr()
    rc = main(args)
    out, err = capsys.readouterr()
    assert rc == 2 and not out.strip() and len(err.strip().splitlines()) == 1, (rc, out, err)
    assert err.startswith(f"longlive {args[0]}: ") and re.search(why, err), err
    return True


_SHA = "0" * 64
_HOSTILE = {
    "file-and-dir": ({"a": 1, "a/b": 1}, "as a file and as the directory"),
    "nul": ({"a\x00b": 1}, "NUL"),
    "long-name": ({"x" * 300: 1}, "longer than 255 bytes"),
    "absolute": ({"/etc/passwd": 1}, "absolute"),
    "drive": ({"C:/x": 1}, "absolute"),
    "dotdot": ({"a/../../x": 1}, r"'\.\.' part"),
    "backslash": ({"a\\..\\x": 1}, "backslash"),
    "itself": ({"manifest.json": 1}, "lists manifest.json itself"),
    "negative": ({"a": -1}, "byte count"),
    "bool-size": ({"a": True}, "byte count"),
}


def _plant(store: ReleaseStore, version: str, manifest: dict) -> None:
    data = manifest_bytes(manifest)
    put(store, f"{version}/manifest.json", data)
    put(store, LATEST, json.dumps(
        {"version": version, "manifest_sha256": hashlib.sha256(data).hexdigest()}).encode())


@pytest.mark.parametrize("case", sorted(_HOSTILE))
def test_hostile_manifest_is_refused_in_one_line(tmp_path, case, capsys):
    files, why = _HOSTILE[case]
    store = ReleaseStore(str(tmp_path / "releases"))
    entries = {rel: {"sha256": _SHA, "bytes": size} for rel, size in files.items()}
    _plant(store, "bad", {"format": "longlive-release/1", "version": "bad", "num_files": len(entries),
                          "total_bytes": sum(max(0, int(e["bytes"])) for e in entries.values()), "files": entries})
    for attempt in (lambda: pull_release(store.url, tmp_path / "dest", progress=False),
                    lambda: pull_release(f"{store.url}/bad", tmp_path / "dest", progress=False)):
        with pytest.raises(ReleaseError, match=why) as err:
            attempt()
        assert "\n" not in str(err.value) and "damaged or hostile" in str(err.value) and len(str(err.value)) < 600
    assert not (tmp_path / "dest").exists() and not (tmp_path / "etc").exists()
    assert cli_refuses(["pull", store.url, "--dest", str(tmp_path / "dest"), "--quiet"], capsys, why)
    # The same manifest in a local folder is refused by verification too.
    local = tmp_path / "local"
    local.mkdir()
    (local / "manifest.json").write_bytes(store.fs.cat_file(f"{store.root}/bad/manifest.json"))
    with pytest.raises(ReleaseError, match=why):
        verify_folder(local)


def test_hostile_manifest_on_s3(s3_url, tmp_path):
    store = ReleaseStore(s3_url)
    _plant(store, "bad", {"format": "longlive-release/1", "version": "bad", "num_files": 2, "total_bytes": 2,
                          "files": {"a": {"sha256": _SHA, "bytes": 1}, "a/b": {"sha256": _SHA, "bytes": 1}}})
    with pytest.raises(ReleaseError, match="as a file and as the directory"):
        pull_release(s3_url, tmp_path / "dest", progress=False)


@pytest.mark.parametrize("latest", ['["tiny-v1"]', "not json", '{"version": 3}', '{"version": "../x"}',
                                    '{"version": "v1"}', '"v1"'])
def test_malformed_latest_pointer(url, tmp_path, latest, capsys):
    store = ReleaseStore(url)
    folder = make_folder(tmp_path, "v1")
    store.publish(folder, progress=False)
    store.fs.pipe_file(f"{store.root}/{LATEST}", latest.encode())
    with pytest.raises(ReleaseError, match=r"latest.json is not a valid latest pointer .*--version"):
        pull_release(url, tmp_path / "dest", progress=False)
    assert cli_refuses(["pull", url, "--dest", str(tmp_path / "dest"), "--quiet"], capsys,
                       "latest.json is not a valid latest pointer")
    assert pull_release(url, tmp_path / "dest", version="v1", progress=False).downloaded
    # Republishing the release repairs the pointer (a no-op otherwise).
    result = ReleaseStore(url).publish(folder, progress=False)
    assert not result.uploaded and result.latest and ReleaseStore(url).latest()["version"] == "v1"


# ----------------------------------------------------------------------------- 7: credentials


def test_release_never_holds_credentials(preset, inputs, tmp_path):
    # Config refuses credentials in params; a preset built in code bypasses that, the release must not.
    secret_opts = {"key": "AKIAFAKEKEY123", "secret": "SuperSecretValue9", "endpoint_url": "http://USERX:PASSY9@host:9"}
    cfg = config(inputs, "releases")
    leaky = preset.model_copy(update={"publish": cfg.model_copy(update={"storage_options": secret_opts})})
    out = tmp_path / "rel"
    build_release(out, version="v1", preset=leaky, cfg=cfg, repo=inputs, url="http://USERX:PASSY9@host:9/releases")
    blob = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    for secret in ("AKIAFAKEKEY123", "SuperSecretValue9", "USERX", "PASSY9"):
        assert secret.encode() not in blob, secret
    assert json.loads((out / "release.json").read_text())["url"] == "http://***@host:9/releases"


@pytest.mark.parametrize("command", ["pull", "publish"])
def test_cli_never_echoes_endpoint_credentials(clean_s3_env, tmp_path, capsys, command):
    endpoint = f"http://KEYID1234:SECRETVAL987@127.0.0.1:{free_port()}"  # nothing listens there
    args = [command, "--endpoint-url", endpoint, "--quiet"]
    args += (["s3://some-bucket/releases"] if command == "pull"
             else ["--url", "s3://some-bucket/releases", "--version", "v1", "--work-dir", str(tmp_path / "w")])
    assert main(args) == 2
    captured = capsys.readouterr()
    err = captured.err + captured.out
    assert err.strip() and "KEYID1234" not in err and "SECRETVAL987" not in err, err
    assert err.strip().count("\n") == 0, err


def test_store_messages_never_show_url_credentials(tmp_path, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    import longlive.publish.store as store_mod

    # Stand a local folder in for the server: what is checked is what the store shows of its URL.
    monkeypatch.setattr(store_mod, "open_fs", lambda url, opts=None: (LocalFileSystem(), str(tmp_path / "r")))
    store = ReleaseStore("s3://USERX:PASSY9@bucket/releases")
    result = store.publish(make_folder(tmp_path, "v1"), progress=False)
    assert (result.url, result.store) == ("s3://***@bucket/releases/v1", "s3://***@bucket/releases")
    with pytest.raises(ReleaseExistsError) as err:
        store.publish(make_folder(tmp_path, "v1", payload="other"), progress=False)
    assert "PASSY9" not in str(err.value) and "USERX" not in str(err.value)
