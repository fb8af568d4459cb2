"""Webdataset shards on a local path or ``s3://``, with a manifest and resumable writing.

Layout under ``url``::

    shard-000000.tar ...   webdataset tars; members {key}.latents.npy, {key}.text.npy, {key}.json
    _progress.json         completed shards so far (rewritten atomically after each shard)
    _tmp/                  the shard being written (discarded by the next writer)
    manifest.json          written LAST by ShardWriter.close(): its presence with complete=true
                           is what makes the dataset usable

A shard is written under ``_tmp/`` and moved into place (an S3 server-side copy) only once it is
complete, then recorded in ``_progress.json``. A resumed writer trusts only what the progress file
records, so a shard from a killed run is either fully recorded or rewritten, never duplicated.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

MANIFEST = "manifest.json"
PROGRESS = "_progress.json"
TMP_DIR = "_tmp"
FORMAT = "longlive-shards/1"
ARRAY_FIELDS = ("latents.npy", "text.npy")
SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")
ENDPOINT_ENVS = ("LONGLIVE_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
TAR_MTIME = 0  # fixed member mtime: the same samples give byte-identical shards (and sha256)


class ShardError(RuntimeError):
    """A shard or manifest is missing, corrupt or unreadable; the message names it and the fix."""


class ChecksumError(ShardError):
    """A shard's bytes do not match the sha256 recorded in the manifest."""


class StorageError(ShardError):
    """The storage behind a URL cannot be reached (dead endpoint, missing bucket or credentials)."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


# ---------------------------------------------------------------------------------------------
# Filesystems


def _s3_options(storage_options: dict | None) -> dict:
    """s3fs options from ``storage_options`` and the environment, with short timeouts.

    botocore's defaults (60 s connect timeout, several retries, and s3fs's own retry loop on top)
    turn a wrong endpoint into minutes of silence; a data pipeline should fail in seconds instead.
    """
    opts = dict(storage_options or {})
    endpoint = opts.pop("endpoint_url", None) or next((os.environ[e] for e in ENDPOINT_ENVS if os.environ.get(e)), None)
    client_kwargs = dict(opts.pop("client_kwargs", None) or {})
    endpoint = client_kwargs.pop("endpoint_url", None) or endpoint
    if endpoint:
        opts["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region or endpoint:
        client_kwargs.setdefault("region_name", region or "us-east-1")
    opts["client_kwargs"] = client_kwargs
    config = dict(opts.pop("config_kwargs", None) or {})
    config.setdefault("connect_timeout", 3)
    config.setdefault("read_timeout", 60)
    config.setdefault("retries", {"max_attempts": 2, "mode": "standard"})
    opts["config_kwargs"] = config
    opts.setdefault("skip_instance_cache", True)  # env may change between calls (tests, stages)
    opts.setdefault("use_listings_cache", False)  # another process may have written since
    return opts


def _describe_endpoint(fs: Any) -> str:
    return getattr(fs, "endpoint_url", None) or "the default AWS endpoint"


def open_fs(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, root path)`` for a local path or ``s3://bucket/prefix``.

    For ``s3://`` the endpoint comes from ``storage_options["endpoint_url"]`` or the environment
    (``LONGLIVE_S3_ENDPOINT``, ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``); credentials and region
    from ``storage_options`` (``key``, ``secret``) or the usual ``AWS_*`` variables. The bucket is
    probed once so a dead endpoint fails now with a :class:`StorageError`, not mid-write.
    """
    if url.startswith("s3://") or url.startswith("s3a://"):
        fs, root = fsspec.core.url_to_fs(url, **_s3_options(storage_options))
        fs.retries = 1  # the probe: an unreachable endpoint should fail in seconds
        _probe_s3(fs, root)
        fs.retries = 2  # then s3fs's own retry loop (on top of botocore's) rides out transient errors
        return fs, root.rstrip("/")
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, root.rstrip("/") or root


def _probe_s3(fs: Any, root: str) -> None:
    bucket = root.split("/", 1)[0]
    endpoint = _describe_endpoint(fs)
    try:
        fs.ls(bucket, refresh=True)
    except FileNotFoundError:
        raise StorageError(
            f"S3 bucket {bucket!r} does not exist at {endpoint}; create it, fix the URL, or point "
            "LONGLIVE_S3_ENDPOINT / AWS_ENDPOINT_URL at the server that has it"
        ) from None
    except PermissionError as e:
        raise StorageError(
            f"access to S3 bucket {bucket!r} at {endpoint} was denied ({e}); check AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY (or storage_options key/secret)"
        ) from None
    except Exception as e:  # botocore/aiohttp connection errors have no common base worth naming
        hint = "set LONGLIVE_S3_ENDPOINT or AWS_ENDPOINT_URL to a reachable S3 endpoint"
        if "credentials" in str(e).lower():
            hint = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or storage_options key/secret)"
        raise StorageError(f"cannot reach S3 bucket {bucket!r} at {endpoint}: {type(e).__name__}: {e}; {hint}") from None


def _join(root: str, *parts: str) -> str:
    return posixpath.join(root, *parts) if root else posixpath.join(*parts)


def _atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old or the new file, never a partial one."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict | None:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


# ---------------------------------------------------------------------------------------------
# Sample encoding


def encode_sample(sample: dict) -> dict:
    """Sample dict -> the bytes webdataset stores. Arrays as .npy (no pickle), json sorted."""
    out: dict[str, Any] = {"__key__": sample["__key__"]}
    for field, value in sample.items():
        if field.startswith("__"):
            continue
        if field.endswith(".npy"):
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(value), allow_pickle=False)
            out[field] = buf.getvalue()
        elif field == "json" or field.endswith(".json"):
            out[field] = json.dumps(value, sort_keys=True).encode()
        elif isinstance(value, (bytes, bytearray)):
            out[field] = bytes(value)
        else:
            raise ValueError(f"sample field {field!r} must be .npy, json or bytes, got {type(value).__name__}")
    return out


def decode_field(field: str, data: bytes) -> Any:
    if field.endswith(".npy"):
        return np.load(io.BytesIO(data), allow_pickle=False)
    if field == "json" or field.endswith(".json"):
        return json.loads(data)
    return data


class _HashingWriter:
    """File-object wrapper that hashes and counts what passes through (one pass, no re-read)."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.bytes += len(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.bytes

    def flush(self) -> None:
        self.f.flush()


# ---------------------------------------------------------------------------------------------
# Writing


class ShardWriter:
    """Write samples into ``shard-{i:06d}.tar`` files of ``samples_per_shard`` samples each.

    Use as a context manager. A clean exit finishes the last (possibly short) shard and writes
    ``manifest.json``; an exception discards the partial shard and writes no manifest, keeping
    the completed shards for the next run (``resume=True``) to continue from ``done_keys``.
    ``resume=False`` deletes this writer's files under ``url`` and starts afresh.
    """

    def __init__(self, url: str, samples_per_shard: int, *, resume: bool = True, storage_options: dict | None = None):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.url = url
        self.samples_per_shard = samples_per_shard
        self.fs, self.root = open_fs(url, storage_options)
        self._tar: Any = None
        self._file: Any = None
        self._hasher: _HashingWriter | None = None
        self._current: list[str] = []
        self._current_meta: dict[str, set] = {}
        self._closed = False
        self.fs.makedirs(self.root, exist_ok=True)
        self.shards: list[dict] = self._recover() if resume else self._wipe()
        self._done = {k for s in self.shards for k in s["keys"]}
        self._next_index = max((int(SHARD_RE.match(s["name"]).group(1)) for s in self.shards), default=-1) + 1
        self._manifest_dropped = False

    # -- state on disk ---------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return _join(self.root, *parts)

    def _our_files(self) -> list[str]:
        try:
            names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []
        return [n for n in names if SHARD_RE.match(n) or n in (MANIFEST, PROGRESS) or n.startswith(PROGRESS + ".tmp")]

    def _wipe(self) -> list[dict]:
        for name in self._our_files():
            self.fs.rm(self._path(name))
        self._clear_tmp()
        return []

    def _clear_tmp(self) -> None:
        if self.fs.exists(self._path(TMP_DIR)):
            self.fs.rm(self._path(TMP_DIR), recursive=True)

    def _recover(self) -> list[dict]:
        """Completed shards from a previous run; drop half-written and unrecorded ones."""
        self._clear_tmp()  # a shard a killed run was writing: never trusted, rewritten
        progress = _read_json(self.fs, self._path(PROGRESS)) or _read_json(self.fs, self._path(MANIFEST)) or {}
        present = set(self._our_files())
        shards = [s for s in progress.get("shards", []) if s["name"] in present]
        if len(shards) < len(progress.get("shards", [])):
            # A recorded shard vanished: its keys are simply encoded again.
            self._write_progress(shards)
        recorded = {s["name"] for s in shards}
        for name in present:
            if SHARD_RE.match(name) and name not in recorded:
                self.fs.rm(self._path(name))  # moved into place but the run died before recording it
        return shards

    def _write_progress(self, shards: list[dict]) -> None:
        body = {"format": FORMAT, "samples_per_shard": self.samples_per_shard, "updated_at": _now(), "shards": shards}
        _atomic_write(self.fs, self._path(PROGRESS), _json_bytes(body))

    @property
    def done_keys(self) -> set[str]:
        """Keys stored in completed shards (including those finished by this writer)."""
        return set(self._done)

    # -- writing ---------------------------------------------------------------------------

    def write(self, sample: dict) -> None:
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        key = sample.get("__key__")
        if not isinstance(key, str) or not key or "." in key or "/" in key:
            raise ValueError(f"sample __key__ must be a non-empty string without '.' or '/', got {key!r}")
        if key in self._done or key in self._current:
            raise ValueError(f"sample {key!r} is already written; skip keys in ShardWriter.done_keys when resuming")
        if not self._manifest_dropped:
            # New data makes any previous manifest stale: remove it before the first new byte lands.
            if self.fs.exists(self._path(MANIFEST)):
                self.fs.rm(self._path(MANIFEST))
            self._manifest_dropped = True
        if self._tar is None:
            self._open_shard()
        self._tar.write(encode_sample(sample))
        self._current.append(key)
        for field in ARRAY_FIELDS:
            if field in sample:
                arr = np.asarray(sample[field])
                self._current_meta.setdefault(f"{field}:shapes", set()).add(tuple(arr.shape))
                self._current_meta.setdefault(f"{field}:dtypes", set()).add(str(arr.dtype))
        if len(self._current) >= self.samples_per_shard:
            self._finish_shard()

    def _open_shard(self) -> None:
        import webdataset as wds

        self._tmp_path = self._path(TMP_DIR, f"{shard_name(self._next_index)}.{uuid.uuid4().hex[:8]}")
        self.fs.makedirs(self._path(TMP_DIR), exist_ok=True)
        self._file = self.fs.open(self._tmp_path, "wb")
        self._hasher = _HashingWriter(self._file)
        self._tar = wds.TarWriter(self._hasher, encoder=False, mtime=TAR_MTIME)

    def _finish_shard(self) -> None:
        self._tar.close()  # writes the tar end blocks through the hasher
        self._file.close()
        name = shard_name(self._next_index)
        self.fs.mv(self._tmp_path, self._path(name))
        meta = self._current_meta
        entry = {
            "name": name,
            "count": len(self._current),
            "keys": list(self._current),
            "sha256": self._hasher.sha.hexdigest(),
            "bytes": self._hasher.bytes,
            "shapes": {f: sorted(list(s) for s in meta.get(f"{f}:shapes", ())) for f in ARRAY_FIELDS},
            "dtypes": {f: sorted(meta.get(f"{f}:dtypes", ())) for f in ARRAY_FIELDS},
        }
        self.shards.append(entry)
        self._write_progress(self.shards)  # only now does the shard count as done
        self._done.update(self._current)
        self._next_index += 1
        self._tar = self._file = self._hasher = None
        self._current, self._current_meta = [], {}

    def abort(self) -> None:
        """Discard the partial shard; keep completed ones; write no manifest."""
        if self._tar is not None:
            try:
                self._tar.close()
                self._file.close()
            finally:
                if self.fs.exists(self._tmp_path):
                    self.fs.rm(self._tmp_path)
        self._tar = self._file = self._hasher = None
        self._current, self._current_meta = [], {}
        self._closed = True

    def close(self) -> dict:
        """Finish the last shard and write ``manifest.json`` (last, atomically); return it."""
        if self._closed:
            raise RuntimeError("ShardWriter is already closed")
        if self._current:
            self._finish_shard()
        self._clear_tmp()
        manifest = build_manifest(self.shards, self.samples_per_shard)
        _atomic_write(self.fs, self._path(MANIFEST), _json_bytes(manifest))
        self._closed = True
        return manifest

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._closed:
            return
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def build_manifest(shards: list[dict], samples_per_shard: int) -> dict:
    fields = {}
    for f in ARRAY_FIELDS:
        shapes = sorted({tuple(s) for sh in shards for s in sh.get("shapes", {}).get(f, [])})
        dtypes = sorted({d for sh in shards for d in sh.get("dtypes", {}).get(f, [])})
        fields[f] = {"shapes": [list(s) for s in shapes], "dtypes": dtypes}
    return {
        "format": FORMAT,
        "complete": True,
        "created_at": _now(),
        "num_shards": len(shards),
        "total_samples": sum(s["count"] for s in shards),
        "samples_per_shard": samples_per_shard,
        "fields": fields,
        "shards": shards,
    }


# ---------------------------------------------------------------------------------------------
# Reading


def read_manifest(url: str, storage_options: dict | None = None, *, fs: Any = None, root: str | None = None) -> dict:
    """The manifest of a finished dataset; :class:`ShardError` if it is missing or incomplete."""
    if fs is None:
        fs, root = open_fs(url, storage_options)
    try:
        manifest = _read_json(fs, _join(root, MANIFEST))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{url}/{MANIFEST} is not valid JSON ({e}); rerun the encode stage") from None
    if manifest is None:
        raise ShardError(
            f"no {MANIFEST} under {url}: the encode stage did not finish; rerun it (it resumes from {PROGRESS})"
        )
    if not manifest.get("complete") or "shards" not in manifest:
        raise ShardError(f"{url}/{MANIFEST} is not marked complete; rerun the encode stage")
    return manifest


def _local_copy(fs: Any, path: str, tmpdir: str) -> str:
    if isinstance(fs, LocalFileSystem):
        return path
    local = os.path.join(tmpdir, posixpath.basename(path))
    fs.get_file(path, local)
    return local


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def iter_shard(url: str, entry: dict, *, verify: bool = True, fs: Any = None, root: str | None = None,
               storage_options: dict | None = None) -> Iterator[dict]:
    """Decoded samples of one manifest entry, in order; :class:`ShardError` on any problem.

    Remote shards are copied to a temporary file first so the checksum is verified before a
    single sample is handed out (and large shards do not have to fit in memory).
    """
    if fs is None:
        fs, root = open_fs(url, storage_options)
    name = entry["name"]
    path = _join(root, name)
    where = f"shard {name} of {url}"
    with tempfile.TemporaryDirectory(prefix="longlive-shard-") as tmpdir:
        try:
            local = _local_copy(fs, path, tmpdir)
        except FileNotFoundError:
            raise ShardError(f"{where} is missing; rerun the encode stage without resume to rebuild it") from None
        if verify:
            digest = sha256_file(local)
            if digest != entry["sha256"]:
                raise ChecksumError(
                    f"{where}: sha256 mismatch (manifest {entry['sha256'][:12]}..., file {digest[:12]}...); "
                    "the file is corrupt or was modified: delete it and rerun the encode stage (it resumes)"
                )
        groups: dict[str, dict] = {}
        order: list[str] = []
        try:
            with tarfile.open(local, "r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    base = posixpath.basename(member.name)
                    key, _, field = base.partition(".")
                    if key not in groups:
                        groups[key] = {"__key__": key, "__shard__": name}
                        order.append(key)
                    groups[key][field] = decode_field(field, tar.extractfile(member).read())
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            raise ShardError(
                f"{where} is not a readable tar ({type(e).__name__}: {e}); delete it and rerun the encode stage"
            ) from None
    if order != list(entry["keys"]):
        missing = sorted(set(entry["keys"]) - set(order))[:5]
        extra = sorted(set(order) - set(entry["keys"]))[:5]
        raise ShardError(
            f"{where}: keys differ from the manifest (missing {missing}, unexpected {extra}); the tar is truncated "
            "or was replaced: delete it and rerun the encode stage"
        )
    for key in order:
        yield groups[key]


def iter_samples(url: str, verify: bool = True, storage_options: dict | None = None) -> Iterator[dict]:
    """Every sample of a finished dataset, shard by shard: ``{"__key__", "__shard__", "latents.npy",
    "text.npy", "json"}`` with arrays decoded. ``verify`` checks each shard's sha256 first."""
    fs, root = open_fs(url, storage_options)
    manifest = read_manifest(url, fs=fs, root=root)
    for entry in manifest["shards"]:
        yield from iter_shard(url, entry, verify=verify, fs=fs, root=root)


def shard_urls(url: str, storage_options: dict | None = None) -> list[str]:
    """Full URLs of the manifest's shards, for ``webdataset.WebDataset`` (training loaders)."""
    manifest = read_manifest(url, storage_options)
    base = url.rstrip("/")
    return [f"{base}/{s['name']}" for s in manifest["shards"]]


__all__ = [
    "ShardError", "ChecksumError", "StorageError", "ShardWriter", "open_fs", "read_manifest", "iter_samples", "iter_shard",
    "shard_urls", "shard_name", "build_manifest", "encode_sample", "decode_field", "sha256_file",
]
