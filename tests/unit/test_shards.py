"""Shards: local and S3 (moto) round trips, resumable encode, clear errors for dead endpoints."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest

from longlive.data.encode import encode_dataset
from longlive.data.shards import (
    ChecksumError, ShardError, ShardWriter, StorageError, iter_samples, open_fs, read_manifest,
)
from longlive.data.synth import read_index


def make_samples(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {
            "__key__": f"s{i:03d}",
            "latents.npy": rng.standard_normal((4, 3, 2, 2)).astype(np.float16 if i % 2 else np.float32),
            "text.npy": rng.standard_normal((1 + i % 2, 5, 8)).astype(np.float16),
            "json": {"i": i, "captions": ["a red circle moves left"]},
        }
        for i in range(n)
    ]


def assert_same_samples(got: list[dict], want: list[dict]) -> None:
    assert [s["__key__"] for s in got] == [s["__key__"] for s in want]
    for g, w in zip(got, want):
        for field in ("latents.npy", "text.npy"):
            assert g[field].dtype == w[field].dtype and np.array_equal(g[field], w[field]), (g["__key__"], field)
        assert g["json"] == w["json"]


def test_local_round_trip(tmp_path):
    url = str(tmp_path / "shards")
    samples = make_samples(7)
    with ShardWriter(url, samples_per_shard=3) as w:
        for s in samples:
            w.write(s)
    manifest = read_manifest(url)
    assert manifest["complete"] and manifest["total_samples"] == 7 and manifest["num_shards"] == 3
    assert [s["count"] for s in manifest["shards"]] == [3, 3, 1]
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(3)]
    assert manifest["fields"]["latents.npy"] == {"shapes": [[4, 3, 2, 2]], "dtypes": ["float16", "float32"]}
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "_progress.json", "manifest.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    got = list(iter_samples(url))
    assert_same_samples(got, samples)
    assert [g["__shard__"] for g in got] == ["shard-000000.tar"] * 3 + ["shard-000001.tar"] * 3 + ["shard-000002.tar"]


def test_writer_rejects_duplicates_and_resume_false_starts_over(tmp_path):
    url = str(tmp_path / "shards")
    samples = make_samples(4)
    with ShardWriter(url, 2) as w:
        for s in samples:
            w.write(s)
        with pytest.raises(ValueError, match="already written"):
            w.write(samples[0])
    with ShardWriter(url, 2) as w:  # resume: everything is done, nothing to write
        assert w.done_keys == {s["__key__"] for s in samples}
    assert read_manifest(url)["total_samples"] == 4
    with ShardWriter(url, 2, resume=False) as w:
        assert w.done_keys == set()
        w.write(samples[3])
    assert [s["__key__"] for s in iter_samples(url)] == ["s003"]


def test_corrupt_shard_raises_naming_it(tmp_path):
    url = str(tmp_path / "shards")
    with ShardWriter(url, 2) as w:
        for s in make_samples(4):
            w.write(s)
    path = tmp_path / "shards" / "shard-000001.tar"
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="shard-000001.tar"):
        list(iter_samples(url))
    path.write_bytes(bytes(data[:600]))
    with pytest.raises(ShardError, match="shard-000001.tar.*not a readable tar"):
        list(iter_samples(url, verify=False))
    (tmp_path / "shards" / "manifest.json").unlink()
    with pytest.raises(ShardError, match="rerun"):
        read_manifest(url)


def test_s3_round_trip(s3_bucket):
    url = f"{s3_bucket}/data/shards"
    samples = make_samples(5)
    with ShardWriter(url, samples_per_shard=2) as w:
        for s in samples:
            w.write(s)
    fs, root = open_fs(url)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    assert names == ["_progress.json", "manifest.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert read_manifest(url)["total_samples"] == 5
    assert_same_samples(list(iter_samples(url)), samples)


class Interrupt(RuntimeError):
    pass


def _encode(synth_dir, url, encoders, fail_after: int | None = None, **kw) -> dict:
    encode_video, encode_text = encoders
    calls = 0

    def flaky(x):
        nonlocal calls
        calls += 1
        if fail_after is not None and calls > fail_after:
            raise Interrupt("killed")
        return encode_video(x)

    return encode_dataset(synth_dir, url, encode_video=flaky, encode_text=encode_text, **kw)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_interrupted_encode_resumes_to_the_same_result(where, synth_dir, fake_encoders, tmp_path, request):
    base = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path)
    ref_url, url = f"{base}/ref", f"{base}/resumed"
    kw = dict(samples_per_shard=4, batch_size=3)
    ref = _encode(synth_dir, ref_url, fake_encoders, **kw)
    n = len(read_index(synth_dir))
    assert ref == {"samples": n, "encoded": n, "skipped": 0, "shards": 3}

    # Killed after 3 batches (9 clips): shards 0 and 1 (8 clips) are complete, the 9th is in a partial shard.
    with pytest.raises(Interrupt):
        _encode(synth_dir, url, fake_encoders, fail_after=3, **kw)
    fs, root = open_fs(url)
    assert not fs.exists(f"{root}/manifest.json")
    progress = json.loads(fs.cat_file(f"{root}/_progress.json"))
    assert [s["name"] for s in progress["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    # Debris of a harder kill: a half-written shard in _tmp/ (named by the killed run's recorded id) and a
    # shard moved into place but not yet recorded (under the recorded pending name).
    assert progress["pending"] == "shard-000002.tar"
    fs.pipe_file(f"{root}/_tmp/shard-000002.tar.{progress['run']}", b"half a tar")
    fs.pipe_file(f"{root}/shard-000002.tar", b"not recorded")

    again = _encode(synth_dir, url, fake_encoders, **kw)
    assert again == {"samples": n, "encoded": n - 8, "skipped": 8, "shards": 3}
    m_ref, m = read_manifest(ref_url), read_manifest(url)
    strip = lambda man: [{k: s[k] for k in ("name", "count", "keys", "sha256", "bytes")} for s in man["shards"]]
    assert strip(m) == strip(m_ref)  # same shards, byte for byte (sha256)
    keys = [k for s in m["shards"] for k in s["keys"]]
    assert len(keys) == len(set(keys)) == n
    assert not fs.exists(f"{root}/_tmp")
    assert_same_samples(list(iter_samples(url)), list(iter_samples(ref_url)))


def test_dead_endpoint_fails_fast_and_clearly(clean_s3_env):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    clean_s3_env.setenv("AWS_ENDPOINT_URL", endpoint)
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        ShardWriter("s3://bucket/shards", 4)
    assert time.monotonic() - start < 15
    assert endpoint in str(err.value) and "AWS_ENDPOINT_URL" in str(err.value)
    with pytest.raises(StorageError, match="LONGLIVE_S3_ENDPOINT"):
        read_manifest("s3://bucket/shards")


def test_missing_bucket_is_named(s3_bucket):
    with pytest.raises(StorageError, match="no-such-bucket.*does not exist"):
        read_manifest("s3://no-such-bucket/shards")
