"""Validation: clean shards pass; corrupt, truncated, NaN and empty-caption data fail by name."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from longlive.data.encode import encode_dataset
from longlive.data.shards import ShardWriter, iter_samples
from longlive.data.validate import expected_from_preset, validate_shards


@pytest.fixture(scope="module")
def clean_url(synth_dir, fake_encoders, tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("validate") / "shards")
    encode_video, encode_text = fake_encoders
    encode_dataset(synth_dir, url, encode_video=encode_video, encode_text=encode_text, samples_per_shard=5)
    return url


@pytest.fixture
def copy_of(clean_url, tmp_path):
    dst = tmp_path / "shards"
    shutil.copytree(clean_url, dst)
    return dst


def validate(url, preset, **expected):
    exp = {**expected_from_preset(preset, num_samples=preset.synth.num_videos), **expected}
    return validate_shards(str(url), exp, preset.validate_)


def failed(report) -> dict:
    return {c.name: c for c in report.checks if not c.success}


def rewrite(src: str, dst, mutate) -> str:
    """Copy the dataset at ``src`` to ``dst`` through ``mutate(sample)`` (which edits in place)."""
    with ShardWriter(str(dst), 5) as w:
        for s in iter_samples(src):
            mutate(s)
            w.write({k: v for k, v in s.items() if k != "__shard__"})
    return str(dst)


def test_clean_data_passes(clean_url, tiny_preset, tmp_path):
    report = validate(clean_url, tiny_preset)
    assert report.success, report.to_markdown()
    assert report.num_samples == tiny_preset.synth.num_videos and report.num_shards == 3
    assert len(report.checks) >= 15
    json_path, md_path = report.write(tmp_path / "reports")
    assert json.loads(json_path.read_text())["success"] is True
    md = md_path.read_text()
    assert "PASSED" in md and "| no NaN in latents/text | n_nan | pass |" in md
    assert report.summary() == {"num_samples": 12, "num_shards": 3, "num_checks": len(report.checks), "num_failed": 0}


def test_flipped_bytes_fail_the_checksum(copy_of, tiny_preset):
    shard = copy_of / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[1500] ^= 0x01  # inside a member's payload: still a readable tar, but not the bytes recorded
    shard.write_bytes(bytes(data))
    report = validate(copy_of, tiny_preset)
    assert not report.success
    bad = failed(report)
    assert "shard sha256 matches manifest" in bad
    assert any("shard-000001.tar" in e for e in bad["shard sha256 matches manifest"].examples)
    md = report.to_markdown()
    assert "FAILED" in md and "shard-000001.tar" in md


def test_truncated_tar_fails_readable_and_counts(copy_of, tiny_preset):
    shard = copy_of / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[:2000])
    report = validate(copy_of, tiny_preset)
    bad = failed(report)
    assert {"shard sha256 matches manifest", "shard is a readable tar with the manifest's keys"} <= set(bad)
    assert "shard-000002.tar" in bad["shard is a readable tar with the manifest's keys"].examples[0]
    assert "every sample in the manifest is readable" in bad  # 2 of 12 samples lost


def test_nan_latent_fails_naming_the_sample(clean_url, tiny_preset, tmp_path):
    def poison(s):
        if s["__key__"] == "clip-000007":
            s["latents.npy"] = s["latents.npy"].copy()
            s["latents.npy"][0, 0, 0, :3] = np.nan

    url = rewrite(clean_url, tmp_path / "nan", poison)
    report = validate(url, tiny_preset)
    bad = failed(report)
    assert set(bad) == {"no NaN in latents/text"}, report.to_markdown()
    assert bad["no NaN in latents/text"].examples == ["clip-000007 (n_nan=3)"]
    assert "clip-000007" in report.to_markdown()


def test_empty_caption_fails_naming_the_sample(clean_url, tiny_preset, tmp_path):
    def blank(s):
        if s["__key__"] == "clip-000004":
            s["json"]["captions"] = [""]

    report = validate(rewrite(clean_url, tmp_path / "blank", blank), tiny_preset)
    bad = failed(report)
    assert set(bad) == {"every caption non-empty"}
    assert bad["every caption non-empty"].examples[0].startswith("clip-000004")


def test_wrong_shape_and_stats_fail(clean_url, tiny_preset, tmp_path):
    def scale(s):
        if s["__key__"] == "clip-000002":
            s["latents.npy"] = (s["latents.npy"].astype(np.float32) * 100).astype(np.float16)

    report = validate(rewrite(clean_url, tmp_path / "big", scale), tiny_preset, latent_shapes=[[16, 5, 8, 8]])  # not the clips' shape
    bad = failed(report)
    assert "latent shape in ['16x5x8x8']" in bad and bad["latent shape in ['16x5x8x8']"].examples[0].startswith("clip-")
    std = next(c for c in bad.values() if c.column == "latent_std")
    assert std.examples[0].startswith("clip-000002")


def test_missing_or_incomplete_manifest_is_a_failed_check(copy_of, tiny_preset):
    manifest = copy_of / "manifest.json"
    body = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**body, "complete": False}))
    report = validate(copy_of, tiny_preset)
    assert not report.success and "not marked complete" in failed(report)["manifest.json present and complete"].observed
    manifest.unlink()
    report = validate(copy_of, tiny_preset)
    assert [c.name for c in report.failures] == ["manifest.json present and complete"]
    assert "encode stage did not finish" in report.to_markdown()
