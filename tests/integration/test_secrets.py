"""Credentials stay out of params, logs and errors: secret-looking option keys and URL user-info are found
and refused by name, redaction removes them from text, and no CLI output carries an environment secret."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import free_port
from longlive.config import DEFAULT_PARAMS
from longlive.secrets import (
    REDACTED,
    SecretInParamsError,
    check_no_secrets,
    find_secret_keys,
    redact,
    redact_options,
    redact_url,
)

ROOT = Path(__file__).resolve().parents[2]
# Distinctive enough that finding one in an output can only mean a leak; '/' and '+' as real AWS keys have.
ENV_KEY_ID = "AKIDLEAKCANARY4417"
ENV_SECRET = "EnvSecretCanary/93+q7Zx"
URL_USER = "URLUSERCANARY52"
URL_PASSWORD = "UrlPassCanary/81"
CANARIES = (ENV_KEY_ID, ENV_SECRET, URL_USER, URL_PASSWORD, "UrlPassCanary")


@pytest.mark.parametrize("options, keys", [
    ({"key": "K", "secret": "S"}, ["o.key", "o.secret"]),
    ({"client_kwargs": {"aws_secret_access_key": "S", "region_name": "eu"}}, ["o.client_kwargs.aws_secret_access_key"]),
    ({"token": "T", "session_token": "T"}, ["o.token", "o.session_token"]),
    ({"endpoint_url": f"http://{URL_USER}:{URL_PASSWORD}@h:9"}, ["o.endpoint_url"]),
    ({"profile": "ci", "endpoint_url": "http://127.0.0.1:9000", "sse_kms_key_id": "arn", "token": None}, []),
    ({"anon": True, "max_tokens": 3}, []),
])
def test_secret_keys_are_found_by_name_and_profiles_are_allowed(options, keys):
    assert find_secret_keys(options, "o") == keys
    if keys:
        with pytest.raises(SecretInParamsError) as e:
            check_no_secrets(options, "o")
        assert e.value.keys == keys and "AWS_SECRET_ACCESS_KEY" in str(e.value) and "profile" in str(e.value)
        assert not any(c in str(e.value) for c in CANARIES)
    else:
        check_no_secrets(options, "o")


@pytest.mark.parametrize("url, want", [
    (f"http://{URL_USER}:{URL_PASSWORD}@host:9/p", "http://***@host:9/p"),  # a raw '/' in the password
    ("https://user@host/x", "https://***@host/x"),
    ("s3://bucket/a@b/c", "s3://bucket/a@b/c"),  # '@' in a path is not user-info
    ("http://127.0.0.1:9000/x", "http://127.0.0.1:9000/x"),
    ("releases", "releases"),
])
def test_redact_url(url, want):
    assert redact_url(url) == want


def test_redact_text_and_options():
    text = f"failed: secret={ENV_SECRET} at http://{URL_USER}:{URL_PASSWORD}@h and key {ENV_KEY_ID}"
    out = redact(text, secrets=[ENV_KEY_ID])
    assert not any(c in out for c in CANARIES) and out.count(REDACTED) == 3, out
    opts = redact_options({"key": ENV_KEY_ID, "profile": "ci", "nested": [{"password": "p4ss"}],
                           "endpoint_url": f"http://{URL_USER}:{URL_PASSWORD}@h"})
    assert opts == {"key": REDACTED, "profile": "ci", "nested": [{"password": REDACTED}], "endpoint_url": "http://***@h"}


def _run(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longlive.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          timeout=120)


def test_no_secret_reaches_any_cli_output(tmp_path):
    """Secrets in the environment and in an endpoint's user-info: config refuses the params naming the key,
    publish and pull against a dead endpoint fail, and not one byte of a secret is in stdout or stderr."""
    dead = f"http://{URL_USER}:{URL_PASSWORD}@127.0.0.1:{free_port()}"
    data = copy.deepcopy(yaml.safe_load(DEFAULT_PARAMS.read_text()))
    data["preset"] = "tiny"
    data["presets"]["tiny"]["publish"].update(url="s3://canary-bucket/releases", storage_options={"endpoint_url": dead})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "LONGLIVE_"))}
    env.update(AWS_ACCESS_KEY_ID=ENV_KEY_ID, AWS_SECRET_ACCESS_KEY=ENV_SECRET, AWS_REGION="us-east-1",
               TRITON_INTERPRET="1")

    runs = {
        "config": _run("config", "--params", str(params), env=env),
        "publish": _run("publish", "--params", str(params), "--quiet", "--work-dir", str(tmp_path / "w"), env=env),
        "pull": _run("pull", "s3://canary-bucket/releases", "--endpoint-url", dead, "--quiet",
                     "--dest", str(tmp_path / "pulled"), env=env),
        "pull-plain-endpoint": _run("pull", "s3://canary-bucket/releases", "--endpoint-url", dead.replace(
            f"{URL_USER}:{URL_PASSWORD}@", ""), "--quiet", "--dest", str(tmp_path / "pulled2"), env=env),
    }
    for name, r in runs.items():
        assert r.returncode != 0, (name, r.stdout[-2000:], r.stderr[-2000:])
        for stream in (r.stdout, r.stderr):
            leaked = [c for c in CANARIES if c.encode() in stream]
            assert not leaked, (name, leaked, stream.decode(errors="replace")[-3000:])
    for name in ("config", "publish"):  # refused at load, naming the key
        assert b"presets.tiny.publish.storage_options.endpoint_url: credentials must not be in params" in \
            runs[name].stderr, runs[name].stderr[-2000:]
    # a clean config still prints, with nothing to redact
    ok = _run("config", "--preset", "tiny", env=env)
    assert ok.returncode == 0 and b'"storage_options": {}' in ok.stdout
