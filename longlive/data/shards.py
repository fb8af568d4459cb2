"""Webdataset shards on a local path or ``s3://``, with a manifest and resumable writing.

Layout under ``url``::

    shard-000000.tar ...   webdataset tars; members {key}.latents.npy, {key}.text.npy, {key}.json
    _progress.json         completed shards so far (rewritten atomically after each shard),
                           ``pending``, the name the next shard will take, and ``run``, the writer's
                           run id that ends its temporary names
    _tmp/                  the shard being written (discarded by the next writer)
    manifest.json          written LAST by ShardWriter.close(): its presence with complete=true
                           is what makes the dataset usable

A shard is written under ``_tmp/`` and moved into place (an S3 server-side copy) only once it is
complete, then recorded in ``_progress.json``. A resumed writer trusts only what the progress file
records, so a shard from a killed run is either fully recorded or rewritten, never duplicated.

The url may be shared with other files (a bucket root, a project folder). A writer deletes only
what it can prove it wrote: the shards its previous progress file or manifest lists, the
``pending`` name (a shard moved into place by a run killed before recording it), and the
temporary names of the run its progress file names. Anything else is left alone. A shard-named file
that no record lists stops the writer (the dataset would hold a shard no manifest vouches for), and so
does a ``manifest.json`` or ``_progress.json`` that this module did not write (it would be overwritten).
With no record of its own at the url, a writer deletes nothing.

Several writers (data-parallel ranks under torchrun) share a url through parts: writer ``r`` of ``W`` is a
ShardWriter of its own at ``url/part-RRRRR-of-WWWWW/`` (the layout above, inside that folder), ``_parts.json``
at ``url`` records the parts before any of them is written (:func:`prepare_layout`), and once all are done
one ``manifest.json`` at ``url`` lists every part's shards as ``part-.../shard-NNNNNN.tar``, parts in rank
order (:func:`merge_parts`). Readers see one dataset either way. A run with another number of writers first
removes, by the same records, what the previous layout wrote.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
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

from longlive.secrets import redact, redact_url

MANIFEST = "manifest.json"
PROGRESS = "_progress.json"
PARTS = "_parts.json"  # the part folders of a run of several writers, recorded before any is written
TMP_DIR = "_tmp"
FORMAT = "longlive-shards/1"
ARRAY_FIELDS = ("latents.npy", "text.npy")
SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")
# A writer's temporary names end in its run id (8 hex digits), recorded in _progress.json before the first of
# them exists: a later writer deletes such a name only if a record names that run.
TMP_SHARD_RE = re.compile(r"^shard-\d{6}\.tar\.(?P<run>[0-9a-f]{8})$")  # a shard being written, under _tmp/
ATOMIC_TMP_RE = re.compile(r"^(manifest|_progress)\.json\.tmp-(?P<run>[0-9a-f]{8})$")  # _atomic_write's
RUN_RE = re.compile(r"^[0-9a-f]{8}$")
PART_RE = re.compile(r"^part-(\d{5})-of-(\d{5})$")  # writer r of W: part-RRRRR-of-WWWWW/
ENDPOINT_ENVS = ("LONGLIVE_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
TAR_MTIME = 0  # fixed member mtime: the same samples give byte-identical shards (and sha256)
log = logging.getLogger(__name__)


class ShardError(RuntimeError):
    """A shard or manifest is missing, corrupt or unreadable; the message names it and the fix."""


class ChecksumError(ShardError):
    """A shard's bytes do not match the sha256 recorded in the manifest."""


class StorageError(ShardError):
    """The storage behind a URL cannot be reached (dead endpoint, missing bucket or credentials)."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def part_name(rank: int, world_size: int) -> str:
    """The folder of writer ``rank`` of ``world_size`` (the world size is in the name: a run with another
    number of writers never resumes into a part that holds another share of the clips)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return f"part-{rank:05d}-of-{world_size:05d}"


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
    endpoint = getattr(fs, "endpoint_url", None)
    return redact_url(endpoint) if endpoint else "the default AWS endpoint"


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
            f"access to S3 bucket {bucket!r} at {endpoint} was denied ({redact(str(e))}); check AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY (or storage_options key/secret)"
        ) from None
    except Exception as e:  # botocore/aiohttp connection errors have no common base worth naming
        hint = "set LONGLIVE_S3_ENDPOINT or AWS_ENDPOINT_URL to a reachable S3 endpoint"
        if "@" in (getattr(fs, "endpoint_url", None) or ""):
            hint = ("take the user:password@ part out of the endpoint URL and give the keys as AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY")
        elif "credentials" in str(e).lower():
            hint = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or storage_options key/secret)"
        raise StorageError(
            f"cannot reach S3 bucket {bucket!r} at {endpoint}: {type(e).__name__}: {redact(str(e))}; {hint}"
        ) from None


def _join(root: str, *parts: str) -> str:
    return posixpath.join(root, *parts) if root else posixpath.join(*parts)


def _atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes, run: str | None = None) -> None:
    """Write ``data`` to ``path`` so readers see the old or the new file, never a partial one.

    ``run``: the writer's run id, which names the temporary file (so a later writer can prove it its own)."""
    tmp = f"{path}.tmp-{run or uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict | None:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def _read_record(fs: fsspec.AbstractFileSystem, path: str, url: str) -> dict | None:
    """A writer's own record (progress or manifest); None if absent.

    A file of that name that is not one of ours (unreadable, or without this module's ``format``) is an
    error, not an absent record: the writer would otherwise overwrite someone else's ``manifest.json``, and
    without a record of its own it cannot tell which files it may delete."""
    name = posixpath.basename(path)
    try:
        record = _read_json(fs, path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{redact_url(url)}/{name} is not valid JSON ({e}); it names the shards "
                         "this writer may replace, so nothing is deleted: restore or delete it, then rerun") from None
    if record is None:
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ShardError(
            f"{redact_url(url)}/{name} was not written by the longlive shard writer (no format {FORMAT!r}); "
            "nothing there is deleted or overwritten: point encode.url at a prefix of its own "
            f"(e.g. {redact_url(url).rstrip('/')}/shards)"
        )
    return record


def _owned_shards(*records: dict | None) -> set[str]:
    """Shard names a writer's records prove it wrote: the shards they list and the pending name."""
    names = set()
    for record in records:
        for entry in (record or {}).get("shards", []):
            names.add(entry["name"])
        if (record or {}).get("pending"):
            names.add(record["pending"])
    return {n for n in names if isinstance(n, str) and SHARD_RE.match(n)}


def _list_names(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Base names of the entries directly under ``path`` ([] if it does not exist)."""
    # s3fs caches listings per instance (and fsspec reuses instances): a file another client added or
    # removed since the last listing must be seen, both to refuse foreign shards and to report missing ones.
    fs.invalidate_cache(path)
    try:
        return [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []


def _discard_records(fs: fsspec.AbstractFileSystem, root: str, progress: dict | None, manifest: dict | None,
                     runs: set[str]) -> None:
    """Delete the files of a previous run at ``root``, by name: the manifest first (the dataset stops being usable
    before any of it goes), then its shards, then the progress file that names them."""
    present = set(_list_names(fs, root))
    if MANIFEST in present:
        fs.rm(_join(root, MANIFEST))
    for name in sorted(_owned_shards(progress, manifest) & present):
        try:
            fs.rm(_join(root, name))
        except FileNotFoundError:
            pass
    _clear_tmp(fs, root, runs)
    if PROGRESS in present:
        fs.rm(_join(root, PROGRESS))


def _clear_tmp(fs: fsspec.AbstractFileSystem, root: str, runs: set[str]) -> None:
    """Remove what a killed writer left half-written: shards under ``_tmp/`` and temporary records, only
    under names of a run a record names (a writer records its run id before its first temporary file)."""
    tmp = _join(root, TMP_DIR)
    for name in _list_names(fs, tmp):
        m = TMP_SHARD_RE.match(name)
        if m and m["run"] in runs:
            fs.rm(_join(tmp, name))
    for name in _list_names(fs, root):
        m = ATOMIC_TMP_RE.match(name)
        if m and m["run"] in runs:
            fs.rm(_join(root, name))
    if isinstance(fs, LocalFileSystem) and fs.isdir(tmp) and not fs.ls(tmp):
        fs.rmdir(tmp)  # object stores have no empty folders; a local one would linger


def _recorded_runs(progress: dict | None) -> set[str]:
    run = (progress or {}).get("run")
    return {run} if isinstance(run, str) and RUN_RE.match(run) else set()


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
    ``resume=False`` deletes this writer's files under ``url`` (those its records list) and starts
    afresh; so does a ``fingerprint`` (of the inputs) that differs from the one the records carry.
    Files at ``url`` that no record lists are never deleted (see the module docstring).
    """

    def __init__(self, url: str, samples_per_shard: int, *, resume: bool = True, storage_options: dict | None = None,
                 fingerprint: str | None = None):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.url = url
        self.samples_per_shard = samples_per_shard
        self.fingerprint = fingerprint
        self.fs, self.root = open_fs(url, storage_options)
        self._tar: Any = None
        self._file: Any = None
        self._hasher: _HashingWriter | None = None
        self._current: list[str] = []
        self._current_meta: dict[str, set] = {}
        self._closed = False
        self.fs.makedirs(self.root, exist_ok=True)
        progress = _read_record(self.fs, self._path(PROGRESS), url)
        manifest = _read_record(self.fs, self._path(MANIFEST), url)
        previous = progress or manifest or {}
        # Temporary names this writer may delete: its own run's and the run its progress record names.
        # Without a record of its own at url nothing there is provably its own, and it deletes nothing.
        self._run = uuid.uuid4().hex[:8]
        self._runs = {self._run} | _recorded_runs(progress)
        stale = fingerprint is not None and bool(previous) and previous.get("fingerprint") != fingerprint
        if stale:
            log.info("the inputs changed since the shards at %s were written: removing the %d shards of that run",
                     redact_url(url), len(_owned_shards(progress, manifest)))
        if resume and not stale:
            self.shards = self._recover(progress, manifest)
        else:
            self.shards = self._discard(progress, manifest)
        self._done = {k for s in self.shards for k in s["keys"]}
        self._next_index = max((int(SHARD_RE.match(s["name"]).group(1)) for s in self.shards), default=-1) + 1
        self._check_foreign()
        self._write_progress(self.shards)  # records the pending name before any shard can be moved into place
        self._manifest_dropped = False

    # -- state on disk ---------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return _join(self.root, *parts)

    def _names(self) -> list[str]:
        return _list_names(self.fs, self.root)

    def _discard(self, progress: dict | None, manifest: dict | None) -> list[dict]:
        _discard_records(self.fs, self.root, progress, manifest, self._runs)
        return []

    def _clear_tmp(self) -> None:
        _clear_tmp(self.fs, self.root, self._runs)

    def _recover(self, progress: dict | None, manifest: dict | None) -> list[dict]:
        """Completed shards from a previous run; drop half-written and unrecorded ones."""
        self._clear_tmp()  # a shard a killed run was writing: never trusted, rewritten
        record = progress or manifest or {}
        present = set(self._names())
        # A recorded shard that vanished is dropped here: its keys are simply encoded again.
        shards = [s for s in record.get("shards", []) if s["name"] in present]
        pending = record.get("pending")
        if pending in present and pending not in {s["name"] for s in shards}:
            self.fs.rm(self._path(pending))  # moved into place but the run died before recording it
        return shards

    def _check_foreign(self) -> None:
        """Refuse shard-named files no record lists; log (once) the other files this writer leaves alone."""
        mine = {s["name"] for s in self.shards} | {MANIFEST, PROGRESS, TMP_DIR}
        foreign = sorted(n for n in self._names() if n not in mine)
        clashing = [n for n in foreign if SHARD_RE.match(n)]
        if clashing:
            raise ShardError(
                f"{redact_url(self.url)} holds shard files that no manifest of this dataset lists ({', '.join(clashing[:5])}"
                f"{', ...' if len(clashing) > 5 else ''}); they were not written here, so they are not deleted: move "
                "them away, or point encode.url at a prefix of its own"
            )
        if foreign:
            log.info("leaving %d entries at %s that this writer did not write: %s%s", len(foreign),
                     redact_url(self.url), ", ".join(foreign[:5]), ", ..." if len(foreign) > 5 else "")

    def _write_progress(self, shards: list[dict], *, final: bool = False) -> None:
        body = {"format": FORMAT, "samples_per_shard": self.samples_per_shard, "updated_at": _now(), "shards": shards,
                "run": self._run}
        if self.fingerprint is not None:
            body["fingerprint"] = self.fingerprint
        if not final:
            # The name the next shard takes: if a kill lands between its move into place and this record,
            # the next writer knows the file is its own.
            body["pending"] = shard_name(self._next_index)
        _atomic_write(self.fs, self._path(PROGRESS), _json_bytes(body), self._run)

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

        self._tmp_path = self._path(TMP_DIR, f"{shard_name(self._next_index)}.{self._run}")
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
        self._next_index += 1
        self._write_progress(self.shards)  # only now does the shard count as done
        self._done.update(self._current)
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
        self._write_progress(self.shards, final=True)  # no pending name: nothing more will be moved in
        manifest = build_manifest(self.shards, self.samples_per_shard, self.fingerprint)
        _atomic_write(self.fs, self._path(MANIFEST), _json_bytes(manifest), self._run)
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


# ---------------------------------------------------------------------------------------------
# Several writers: parts


def prepare_layout(url: str, world_size: int, storage_options: dict | None = None) -> list[str]:
    """Ready ``url`` for a run of ``world_size`` writers; return the part names (``[]`` for one writer, which
    writes at ``url`` itself). Call it once, before any writer starts (rank 0, then a barrier).

    What an earlier run with another layout left is removed by its records: with one writer now, the parts
    that ``_parts.json`` or a merged manifest lists (and those records); with several, a single writer's
    dataset at ``url`` (its manifest, shards and progress) and parts of another world size. Parts of this
    layout are kept, so each writer resumes from its own. A merged manifest is removed in either case: the
    dataset is complete again only when :func:`merge_parts` writes it.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    fs, root = open_fs(url, storage_options)
    fs.makedirs(root, exist_ok=True)
    record = _read_record(fs, _join(root, PARTS), url)
    manifest = _read_record(fs, _join(root, MANIFEST), url)
    merged = manifest is not None and "parts" in manifest
    previous = {p for rec in (record, manifest if merged else None) for p in (rec or {}).get("parts", [])
                if isinstance(p, str) and PART_RE.match(p)}
    parts = [part_name(r, world_size) for r in range(world_size)] if world_size > 1 else []
    if merged:
        fs.rm(_join(root, MANIFEST))  # first: the dataset stops being usable before any of it goes
    if world_size > 1:
        progress = _read_record(fs, _join(root, PROGRESS), url)
        if progress is not None or (manifest is not None and not merged):  # one writer's dataset at url
            log.info("removing the single-writer shards at %s: %d writers write parts now", redact_url(url), world_size)
            _discard_records(fs, root, progress, None if merged else manifest, _recorded_runs(progress))
    for part in sorted(previous - set(parts)):
        log.info("removing part %s of an earlier run at %s", part, redact_url(url))
        _remove_part(fs, _join(root, part), f"{url.rstrip('/')}/{part}")
    if parts:
        _atomic_write(fs, _join(root, PARTS), _json_bytes({"format": FORMAT, "parts": parts, "updated_at": _now()}))
    elif record is not None:
        fs.rm(_join(root, PARTS))
    return parts


def _remove_part(fs: fsspec.AbstractFileSystem, root: str, url: str) -> None:
    """Delete one part (a ShardWriter's folder) by its own records; a local folder left empty goes too."""
    progress = _read_record(fs, _join(root, PROGRESS), url)
    manifest = _read_record(fs, _join(root, MANIFEST), url)
    _discard_records(fs, root, progress, manifest, _recorded_runs(progress))
    if isinstance(fs, LocalFileSystem) and fs.isdir(root) and not fs.ls(root):
        fs.rmdir(root)


def merge_parts(url: str, parts: list[str], samples_per_shard: int, fingerprint: str | None = None,
                storage_options: dict | None = None) -> dict:
    """Write ``url``'s ``manifest.json`` listing the shards of every finished part, in the order of ``parts``
    (rank order: each rank holds a contiguous block of the index, so the keys keep the index order); return it.
    A part without a complete manifest, or a key in two parts, is a :class:`ShardError`."""
    fs, root = open_fs(url, storage_options)
    shards: list[dict] = []
    seen: dict[str, str] = {}
    for part in parts:
        part_manifest = read_manifest(f"{url.rstrip('/')}/{part}", fs=fs, root=_join(root, part))
        for entry in part_manifest["shards"]:
            for key in entry["keys"]:
                if key in seen:
                    raise ShardError(f"{redact_url(url)}: key {key!r} is in both {seen[key]} and {part}; delete "
                                     "the parts and rerun the encode stage")
                seen[key] = part
            shards.append({**entry, "name": f"{part}/{entry['name']}"})
    manifest = build_manifest(shards, samples_per_shard, fingerprint)
    manifest["parts"] = list(parts)
    _atomic_write(fs, _join(root, MANIFEST), _json_bytes(manifest))
    return manifest


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def build_manifest(shards: list[dict], samples_per_shard: int, fingerprint: str | None = None) -> dict:
    fields = {}
    for f in ARRAY_FIELDS:
        shapes = sorted({tuple(s) for sh in shards for s in sh.get("shapes", {}).get(f, [])})
        dtypes = sorted({d for sh in shards for d in sh.get("dtypes", {}).get(f, [])})
        fields[f] = {"shapes": [list(s) for s in shapes], "dtypes": dtypes}
    manifest = {
        "format": FORMAT,
        "complete": True,
        "created_at": _now(),
        "num_shards": len(shards),
        "total_samples": sum(s["count"] for s in shards),
        "samples_per_shard": samples_per_shard,
        "fields": fields,
        "shards": shards,
    }
    if fingerprint is not None:
        manifest["fingerprint"] = fingerprint  # of the inputs: a writer given another one starts afresh
    return manifest


# ---------------------------------------------------------------------------------------------
# Reading


def read_manifest(url: str, storage_options: dict | None = None, *, fs: Any = None, root: str | None = None) -> dict:
    """The manifest of a finished dataset; :class:`ShardError` if it is missing or incomplete."""
    return read_manifest_digest(url, storage_options, fs=fs, root=root)[0]


def read_manifest_digest(url: str, storage_options: dict | None = None, *, fs: Any = None,
                         root: str | None = None) -> tuple[dict, str]:
    """``(manifest, sha256 of its bytes)`` from one read: the digest names exactly this dataset (a validation
    record is bound to it)."""
    if fs is None:
        fs, root = open_fs(url, storage_options)
    where = redact_url(url)
    try:
        data = fs.cat_file(_join(root, MANIFEST))
    except FileNotFoundError:
        raise ShardError(
            f"no {MANIFEST} under {where}: the encode stage did not finish; rerun it (it resumes from {PROGRESS})"
        ) from None
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{where}/{MANIFEST} is not valid JSON ({e}); rerun the encode stage") from None
    if not isinstance(manifest, dict) or not manifest.get("complete") or "shards" not in manifest:
        raise ShardError(f"{where}/{MANIFEST} is not marked complete; rerun the encode stage")
    return manifest, hashlib.sha256(data).hexdigest()


def shard_files(url: str, storage_options: dict | None = None, *, fs: Any = None, root: str | None = None) -> set[str]:
    """Names of the files at ``url`` that match the shard pattern (listed in the manifest or not), with those in
    part folders as ``part-.../shard-NNNNNN.tar`` (the names a merged manifest gives them)."""
    if fs is None:
        fs, root = open_fs(url, storage_options)
    names = _list_names(fs, root)
    found = {n for n in names if SHARD_RE.match(n)}
    for part in (n for n in names if PART_RE.match(n)):
        found |= {f"{part}/{n}" for n in _list_names(fs, _join(root, part)) if SHARD_RE.match(n)}
    return found


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
    where = f"shard {name} of {redact_url(url)}"
    with tempfile.TemporaryDirectory(prefix="longlive-shard-") as tmpdir:
        try:
            local = _local_copy(fs, path, tmpdir)
            digest = sha256_file(local) if verify else None
        except FileNotFoundError:
            raise ShardError(f"{where} is listed in {MANIFEST} but missing; rerun `dvc repro encode` "
                             "(it encodes the clips of missing shards again)") from None
        if verify:
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
                f"{where} is not a readable tar ({type(e).__name__}: {redact(str(e))}); delete it and rerun the "
                "encode stage"
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
    "ShardError", "ChecksumError", "StorageError", "ShardWriter", "open_fs", "read_manifest", "read_manifest_digest",
    "iter_samples", "iter_shard", "shard_files", "shard_urls", "shard_name", "build_manifest", "encode_sample", "decode_field", "sha256_file",
    "part_name", "prepare_layout", "merge_parts",
]
