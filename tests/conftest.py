"""Shared fixtures: a small tiny preset, a synth dataset, model-free encoders, a local moto S3 server.

``tests/unit/``: one module (or a few) in process, tiny tensors, seconds each. ``tests/integration/``: the
pieces together as users run them -- stages, the CLI, DVC, Prefect or the installer as processes, local
servers (moto S3, Prefect), the trained tiny models. The helpers beside this file (``_project.py``,
``_tiny_models.py``, ...) serve both; ``python -m pytest tests/unit`` is the quick loop while editing."""

from __future__ import annotations

import hashlib
import os
import socket
import uuid
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F

# Without a GPU the Triton kernels (kernels/) are tested in Triton's CPU interpreter. It must be on before
# anything imports triton.language (torchao does): triton decides at that import whether its own
# helpers (tl.max, ...) are compiled or interpreted, and compiled ones cannot run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from longlive.config import Preset, load_preset

S3_ENV_VARS = ("LONGLIVE_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests use tiny tensors: on 2 shared cores, OpenMP threads only wait on each other
    (the same tests ran 10-30x slower with two threads at load 3). Subprocesses are unaffected."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def built_project(tmp_path_factory):
    """The fast project (tests/_project.py), built once per session as far as its tests ask:
    ``built_project.copy(dest, "evaluate")`` is a copy of it after `dvc repro evaluate`."""
    from _project import SharedBuild

    return SharedBuild(tmp_path_factory.mktemp("built") / "proj")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_preset(num_videos: int = 12, **synth) -> Preset:
    """The tiny preset with fewer clips (same sizes and code paths)."""
    p = load_preset("tiny")
    return p.model_copy(update={"synth": p.synth.model_copy(update={"num_videos": num_videos, **synth})})


@pytest.fixture(scope="session")
def make_preset() -> Callable[..., Preset]:
    """``make_preset(num_videos=12, **synth)``: the tiny preset with other synth settings."""
    return small_preset


@pytest.fixture(scope="session")
def tiny_preset() -> Preset:
    return small_preset()


@pytest.fixture(scope="session")
def synth_dir(tiny_preset, tmp_path_factory):
    from longlive.data.synth import write_dataset

    out = tmp_path_factory.mktemp("synth") / "synth"
    write_dataset(tiny_preset, out)
    return out


def make_fake_encoders(preset: Preset) -> tuple[Callable, Callable]:
    """Deterministic stand-ins for the VAE and the text encoder with the real shapes.

    Video: causal temporal pooling (first frame alone, then groups of ``tc``), spatial average
    pooling, and a fixed 3 -> C channel mix. Text: per-caption embeddings seeded by its sha256.
    """
    tc, sc = preset.vae.temporal_compression, preset.vae.spatial_compression
    channels, tokens, dim = preset.vae.z_dim, preset.text.max_tokens, preset.text.dim
    mix = torch.randn(channels, 3, generator=torch.Generator().manual_seed(0))

    def encode_video(x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        first, rest = x[:, :, :1], x[:, :, 1:].reshape(b, c, (t - 1) // tc, tc, h, w).mean(3)
        pooled = torch.cat([first, rest], 2)
        pooled = F.avg_pool3d(pooled, (1, sc, sc))
        return torch.einsum("kc,bcfhw->bkfhw", mix, pooled + 0.5)

    def encode_text(captions: list[str]) -> torch.Tensor:
        out = []
        for cap in captions:
            seed = int.from_bytes(hashlib.sha256(cap.encode()).digest()[:8], "little")
            out.append(torch.randn(tokens, dim, generator=torch.Generator().manual_seed(seed)))
        return torch.stack(out)

    return encode_video, encode_text


def validate_into(url: str, preset: Preset, out_dir) -> str:
    """Run the real validation over the shards at ``url`` and write its report under ``out_dir``; return the
    ``report.json`` path, the record training requires (``validation_report=``) before it reads a shard."""
    from longlive.data.validate import expected_from_preset, validate_shards

    report = validate_shards(url, expected_from_preset(preset), preset.validate_)
    assert report.success, report.to_markdown()
    return str(report.write(out_dir)[0])


@pytest.fixture(scope="session")
def fake_encoders(tiny_preset):
    return make_fake_encoders(tiny_preset)


@pytest.fixture
def clean_s3_env(monkeypatch, tmp_path):
    """No real AWS config or endpoint leaks into a test."""
    for var in S3_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never probe 169.254.169.254
    return monkeypatch


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 for the whole session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto_server, clean_s3_env) -> str:
    """A fresh bucket on the moto server, with fake credentials and the endpoint in the environment.

    Yields ``s3://{bucket}``; a bucket per test keeps tests independent on the shared server.
    """
    import boto3

    clean_s3_env.setenv("AWS_ENDPOINT_URL", moto_server)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}"
