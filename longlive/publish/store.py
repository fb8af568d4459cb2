"""A store of releases at any fsspec URL (local path, ``file://``, ``s3://``), with atomic publishing.

Layout under the store URL::

    <version>/...                a release; visible (complete) only once <version>/manifest.json exists
    <version>/manifest.json      written LAST, after every file is uploaded, verified and in place
    latest.json                  {version, manifest_sha256, published_at}: updated after the manifest
    _staging/<version>.<utc>.<id>/  one publisher's uploads in flight (or debris of a dead one)
    _locks/<version>.json        held by the one publisher moving files under <version>/

(On a local disk the empty ``_staging/`` and ``_locks/`` folders stay: removing them would race with
another publisher creating its staging inside.)

Publishing uploads every file to its own staging prefix, reads each back and checks its SHA-256
against the manifest, takes the version's lock, moves the files under ``<version>/`` (one rename on
a local disk, a server-side copy per file on S3), writes the manifest, drops the lock and finally
points ``latest`` at it. A crash, a dead server or Ctrl-C at any point before the manifest leaves no
visible release, and running the same publish again completes it.

Releases are content-addressed (:func:`~longlive.publish.manifest.content_id`, over the payload:
weights, base models, preset, metrics): publishing what the store already holds is a no-op that
names the existing release and, when ``latest.json`` was left behind by a publish that died before
it, points it there.

Concurrent publishers of one version are serialised by the lock, a create-exclusive write (local:
``os.link``, which fails if the name exists; S3: a conditional PUT with ``If-None-Match: *``, which
AWS S3, MinIO and moto honour). The loser fails with :class:`PublishConflictError`, or, when the
winner finished while it uploaded, with :class:`ReleaseExistsError` (a no-op if its content is the
same); it never overwrites what the winner made visible. Each publisher removes only its own staging
(and any older than :data:`STAGING_TTL`, debris of a dead publish), never another's in flight. A
publisher killed outright (SIGKILL, power loss) while moving files leaves its lock: the next publish
of that version names the lock file to delete.

Pulling downloads into a temporary folder beside the destination, hashing as it goes and reading no
more than the manifest's size of each file (plus one byte, to catch a larger one), and renames it into
place only when every file matched: a tampered file is refused with an error naming it, and nothing
is left behind. ``--force`` replaces only a folder that is a release, never the current directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import socket
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from fsspec.callbacks import Callback
from fsspec.implementations.local import LocalFileSystem
from tqdm import tqdm

from longlive.data.shards import open_fs
from longlive.io import atomic_dir
from longlive.publish.manifest import (
    CHUNK, MANIFEST, ChecksumError, Hasher, PublishConflictError, ReleaseError, ReleaseExistsError, UploadError,
    check_version, content_id, hash_stream, json_bytes, mismatch_message, parse_latest, parse_manifest,
    verify_folder,
)
from longlive.secrets import redact_url

log = logging.getLogger(__name__)

LATEST = "latest.json"
STAGING = "_staging"
LOCKS = "_locks"
# Staging older than this belongs to a publish that died (a live one finishes its upload well within it);
# younger staging may be another publisher's upload in flight and is left alone.
STAGING_TTL = timedelta(hours=24)
_STAMP = "%Y%m%dT%H%M%SZ"
_STAGING_RE = re.compile(r"^(?P<version>.+)\.(?P<stamp>\d{8}T\d{6}Z)\.[0-9a-f]{12}$")


class _Progress(Callback):
    """Forwards fsspec's per-chunk progress to a shared byte bar (s3fs reports it; local copies do not)."""

    def __init__(self, bar: tqdm) -> None:
        super().__init__()
        self.bar, self.sent = bar, 0

    def call(self, *args, **kwargs) -> None:
        if self.value > self.sent:
            self.bar.update(self.value - self.sent)
            self.sent = self.value


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                dynamic_ncols=True)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class PublishResult:
    version: str
    url: str  # the release: <store>/<version> (credentials redacted)
    store: str
    uploaded: bool  # False when the store already held this content (then ``version`` names that release)
    num_files: int
    total_bytes: int
    content_id: str
    manifest_sha256: str
    latest: bool
    replaced: bool = False

    def summary(self) -> dict:
        return dict(self.__dict__)


@dataclass
class PullResult:
    version: str
    url: str
    dest: Path
    num_files: int
    total_bytes: int
    downloaded: bool  # False when dest already held this release and it verified
    manifest: dict = field(repr=False, default_factory=dict)


class ReleaseStore:
    """The releases under one URL; see the module docstring for the layout and the guarantees."""

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        raw = url.rstrip("/") or url
        self.url = redact_url(raw)  # what messages and results show: never a user:password@ part
        self.storage_options = storage_options
        self.fs, self.root = open_fs(raw, storage_options)
        self.local = isinstance(self.fs, LocalFileSystem)

    def _p(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def where(self, *parts: str) -> str:
        return "/".join([self.url, *parts])

    # -- reading ----------------------------------------------------------------------------

    def read_manifest(self, version: str) -> tuple[dict, bytes] | None:
        """``(manifest, raw bytes)`` of a visible release, None if there is none."""
        try:
            data = self.fs.cat_file(self._p(check_version(version), MANIFEST))
        except FileNotFoundError:
            return None
        manifest = parse_manifest(data, self.where(version, MANIFEST))
        if manifest["version"] != version:
            raise ReleaseError(f"{self.where(version, MANIFEST)} names version {manifest['version']!r}, not {version!r}: "
                               "the release was moved or edited; republish it")
        return manifest, data

    def versions(self) -> list[str]:
        """Visible releases (those with a manifest), sorted by name."""
        try:
            entries = self.fs.ls(self.root, detail=True, refresh=True)  # not s3fs's cached listing: others publish too
        except FileNotFoundError:
            return []
        names = [posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory"]
        return sorted(n for n in names if n[:1].isalnum() and self.fs.exists(self._p(n, MANIFEST)))

    def manifests(self, versions: list[str]) -> dict[str, dict]:
        """``{version: manifest}`` of those ``versions`` that are visible and readable (one batched read)."""
        paths = {self._p(check_version(v), MANIFEST): v for v in versions}
        found = self.fs.cat(list(paths), on_error="omit") if paths else {}
        out = {}
        for path, data in found.items():
            version = paths.get(path) or paths.get(path.split("://", 1)[-1])
            try:
                manifest = parse_manifest(data, self.where(version, MANIFEST))
            except ReleaseError as e:
                log.warning("skipping %s: %s", version, e)
                continue
            if manifest["version"] == version:
                out[version] = manifest
        return out

    def find_identical(self, cid: str, versions: list[str]) -> str | None:
        """The newest (by name) of ``versions`` whose payload has content id ``cid``."""
        manifests = self.manifests(versions)
        for version in sorted(manifests, key=_natural, reverse=True):
            if content_id(manifests[version]) == cid:
                return version
        return None

    def latest(self) -> dict | None:
        try:
            data = self.fs.cat_file(self._p(LATEST))
        except FileNotFoundError:
            return None
        return parse_latest(data, self.where(LATEST))

    # -- writing ----------------------------------------------------------------------------

    def _put_bytes(self, path: str, data: bytes, exclusive: bool = False) -> None:
        """Write a small file so readers see the old or the new content, never a partial one; with
        ``exclusive``, raise FileExistsError instead of replacing an existing file."""
        if not self.local:
            # One S3 PUT is atomic (an object appears whole or not at all). s3fs's mode="create" sends
            # If-None-Match: * and maps the 412 to FileExistsError; other fsspec stores open the path with "xb".
            if exclusive:
                self.fs.pipe_file(path, data, mode="create")
            else:
                self.fs.pipe_file(path, data)
            return
        # by hand, not longlive.io.atomic_file: the exclusive write (the publish lock) links instead of renaming
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            if exclusive:
                os.link(tmp, path)  # atomic, and fails if the name exists (unlike a rename)
            else:
                os.replace(tmp, path)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)

    def _rm(self, path: str, what: str) -> None:
        try:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        except Exception as e:  # noqa: BLE001 - cleanup must not hide the error that got us here
            log.warning("could not remove %s (%s): %s; a publish once it is %d h old removes it", path, what, e,
                        STAGING_TTL.total_seconds() // 3600)

    def _clear_stale_staging(self, version: str) -> None:
        """Remove staging left by dead publishes: older than STAGING_TTL, or named as older longlive did
        (``<version>.<id>``, no time). Younger staging may be another publisher's upload in flight."""
        try:
            entries = self.fs.ls(self._p(STAGING), detail=False, refresh=True)
        except FileNotFoundError:
            return
        now, legacy = _now(), re.compile(re.escape(version) + r"\.[0-9a-f]{12}$")
        for entry in entries:
            name = posixpath.basename(entry.rstrip("/"))
            m = _STAGING_RE.match(name)
            if m:
                stamp = datetime.strptime(m["stamp"], _STAMP).replace(tzinfo=timezone.utc)
                stale = now - stamp > STAGING_TTL
            else:
                stale = bool(legacy.match(name))
            if stale:
                log.info("removing %s, left by a publish that died", entry)
                self._rm(entry, "stale staging")

    def _lock(self, version: str, cid: str) -> str:
        """Take ``_locks/<version>.json`` (create-exclusive) and return its owner token."""
        path, owner = self._p(LOCKS, f"{version}.json"), uuid.uuid4().hex
        body = json_bytes({"owner": owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "since": _now().isoformat(timespec="seconds"), "content_id": cid})
        if self.local:
            os.makedirs(self._p(LOCKS), exist_ok=True)
        try:
            self._put_bytes(path, body, exclusive=True)
        except FileExistsError:
            raise PublishConflictError(self._held(version)) from None
        return owner

    def _held(self, version: str) -> str:
        where = self.where(LOCKS, f"{version}.json")
        try:
            info = json.loads(self.fs.cat_file(self._p(LOCKS, f"{version}.json")))
            since = datetime.fromisoformat(info["since"])
            who = (f" (host {info['host']}, pid {info['pid']}, since {info['since']}, "
                   f"{int((_now() - since).total_seconds())} s ago)")
        except Exception:  # noqa: BLE001 - gone meanwhile, or not ours to parse: the path says enough
            who = ""
        return (f"another publish of {version} is moving files into {self.where(version)}: it holds {where}{who}; "
                f"wait for it and rerun (the same content is then a no-op), or, if that publish was killed, delete "
                f"{where} and rerun")

    def _unlock(self, version: str, owner: str) -> None:
        path = self._p(LOCKS, f"{version}.json")
        try:
            if json.loads(self.fs.cat_file(path)).get("owner") == owner:
                self.fs.rm_file(path)
            else:
                log.warning("%s is no longer this publish's lock (it was deleted by hand and retaken); leaving it",
                            self.where(LOCKS, f"{version}.json"))
        except FileNotFoundError:
            log.warning("%s was deleted while this publish held it", self.where(LOCKS, f"{version}.json"))
        except Exception as e:  # noqa: BLE001 - must not hide the outcome of the publish
            log.warning("could not release %s (%s): delete it before the next publish of %s",
                        self.where(LOCKS, f"{version}.json"), e, version)

    def publish(
        self,
        folder: str | os.PathLike,
        *,
        force: bool = False,
        exist_ok: bool = True,
        set_latest: bool = True,
        progress: bool = True,
    ) -> PublishResult:
        """Upload a built release folder (it must carry its ``manifest.json``) as ``<store>/<version>``.

        The same content already published under this version is a no-op (unless ``exist_ok=False``,
        which refuses it) that also points ``latest`` at it when the pointer was left behind; other
        content under an existing version is refused (:class:`ReleaseExistsError`) unless ``force``
        (replace it). Any failure before the manifest is written, Ctrl-C included, leaves no visible
        release, no lock and none of this publish's staging; :class:`UploadError` says to rerun.
        """
        folder = Path(folder)
        manifest = verify_folder(folder)  # never upload a folder that does not match its own manifest
        version = manifest["version"]
        mbytes = (folder / MANIFEST).read_bytes()
        cid = content_id(manifest)
        seen = self.read_manifest(version)
        if seen is not None and not force:
            return self._existing(version, seen, cid, exist_ok, set_latest)

        self._clear_stale_staging(version)
        staging = self._p(STAGING, f"{version}.{_now().strftime(_STAMP)}.{uuid.uuid4().hex[:12]}")
        owner = None
        try:
            self._upload(folder, manifest, staging, progress)
            self._verify_remote(staging, manifest, progress)
            owner = self._lock(version, cid)
            current = self.read_manifest(version)
            if current is not None and (seen is None or current[1] != seen[1]):
                # Another publisher finished this version while we uploaded: never overwrite what it made visible.
                return self._existing(version, current, cid, exist_ok, set_latest, raced=True)
            self._promote(version, staging, manifest, replacing=current is not None)
            self._put_bytes(self._p(version, MANIFEST), mbytes)  # the release is visible from here on
        except ReleaseError:
            raise
        except Exception as e:
            raise UploadError(
                f"publishing {version} to {self.url} failed: {type(e).__name__}: {e}; no release was made visible "
                "(no manifest.json at the release prefix); fix the cause and rerun the same command to retry"
            ) from e
        finally:  # on success too: an S3 promote copies out of staging; a local one renamed it away
            self._rm(staging, "this publish's staging")
            if owner is not None:
                self._unlock(version, owner)
        msha = _sha(mbytes)
        if set_latest:
            self._point_latest(version, msha)
        log.info("published %s: %d files, %.1f MB", self.where(version), manifest["num_files"],
                 manifest["total_bytes"] / 1e6)
        return PublishResult(version, self.where(version), self.url, True, manifest["num_files"],
                             manifest["total_bytes"], cid, msha, set_latest, replaced=seen is not None)

    def reuse(self, version: str, *, set_latest: bool = True) -> PublishResult:
        """The no-op publish of content the store already holds as ``version``."""
        got = self.read_manifest(version)
        if got is None:
            raise ReleaseError(f"no release {version} at {self.url}; published: {self.versions() or 'none'}")
        return self._existing(version, got, content_id(got[0]), True, set_latest)

    def _existing(self, version: str, got: tuple[dict, bytes], cid: str, exist_ok: bool, set_latest: bool,
                  raced: bool = False) -> PublishResult:
        manifest, raw = got
        same = content_id(manifest) == cid
        if same and exist_ok:
            sha = _sha(raw)
            latest = self._repair_latest(version, sha, manifest) if set_latest else False
            log.info("release %s is already at %s with identical content; nothing to upload", version, self.url)
            return PublishResult(version, self.where(version), self.url, False, manifest["num_files"],
                                 manifest["total_bytes"], cid, sha, latest)
        how = "was published by another publish while this one uploaded" if raced else "already exists"
        error = PublishConflictError if raced else ReleaseExistsError
        raise error(
            f"release {version} {how} at {self.where(version)} "
            f"({'with identical content' if same else 'with different content'}); publish under another version "
            "(publish.version, --version) or replace it with --force / publish.force: true"
        )

    def _repair_latest(self, version: str, sha: str, manifest: dict) -> bool:
        """Point ``latest`` at ``version`` when it is missing, broken, or names an older release (a publish
        that died between its manifest and the pointer); leave it on a newer release. True if it points here."""
        try:
            cur = self.latest()
        except ReleaseError as e:
            log.warning("%s; rewriting it", e)
            cur = None
        if cur is not None and cur["version"] == version and cur["manifest_sha256"] == sha:
            return True
        if cur is not None and cur["version"] != version:
            try:
                other = self.read_manifest(cur["version"])
            except ReleaseError:
                other = None
            if other is not None and _created(other[0]) >= _created(manifest):
                log.info("latest stays at %s, newer than %s", cur["version"], version)
                return False
        self._point_latest(version, sha)
        return True

    def _upload(self, folder: Path, manifest: dict, staging: str, progress: bool) -> None:
        with _bar(manifest["total_bytes"], f"upload {manifest['version']}", progress) as bar:
            for rel, entry in manifest["files"].items():
                dst = posixpath.join(staging, rel)
                if self.local:
                    self.fs.makedirs(posixpath.dirname(dst), exist_ok=True)  # object stores have no directories
                cb = _Progress(bar)
                self.fs.put_file(str(folder / rel), dst, callback=cb)
                bar.update(entry["bytes"] - cb.sent)

    def _verify_remote(self, staging: str, manifest: dict, progress: bool) -> None:
        """Read every uploaded file back and hash it: what the store holds is what the manifest says."""
        with _bar(manifest["total_bytes"], f"verify {manifest['version']}", progress) as bar:
            for rel, want in manifest["files"].items():
                with self.fs.open(posixpath.join(staging, rel), "rb") as f:
                    got = hash_stream(f, bar.update)
                if got != {"sha256": want["sha256"], "bytes": want["bytes"]}:
                    raise UploadError(mismatch_message(rel, f"the upload to {self.url}", want, got)
                                      + "; no release was made visible: rerun to retry")

    def _promote(self, version: str, staging: str, manifest: dict, replacing: bool) -> None:
        """Move staging under ``<version>/`` (the caller holds the version's lock)."""
        final = self._p(version)
        if replacing:
            # --force: the old release stops being visible first, so no reader mixes old and new files.
            self.fs.rm_file(self._p(version, MANIFEST))
        if self.fs.exists(final):
            # Files of an earlier attempt that died before its manifest (never visible), or the forced old ones.
            self.fs.rm(final, recursive=True)
        if self.local:
            os.replace(staging, final)  # one rename moves every file at once
            return
        for rel in manifest["files"]:
            self.fs.copy(posixpath.join(staging, rel), posixpath.join(final, rel))  # server-side copy
        for rel, want in manifest["files"].items():
            size = self.fs.info(posixpath.join(final, rel))["size"]
            if size != want["bytes"]:
                raise UploadError(f"{self.where(version, rel)}: {size} bytes after the copy from staging, manifest "
                                  f"records {want['bytes']}; no release was made visible: rerun to retry")

    def _point_latest(self, version: str, manifest_sha256: str) -> None:
        body = {"version": version, "manifest_sha256": manifest_sha256,
                "published_at": _now().isoformat(timespec="seconds")}
        self._put_bytes(self._p(LATEST), (json.dumps(body, indent=1) + "\n").encode())

    # -- pulling ----------------------------------------------------------------------------

    def pull(
        self,
        version: str | None = None,
        dest: str | os.PathLike | None = None,
        *,
        force: bool = False,
        progress: bool = True,
    ) -> PullResult:
        """Download ``version`` (default: ``latest.json``'s) into ``dest`` (default ``./<version>``), verified.

        Every file is hashed while it downloads, and no more than its recorded size (+1 byte) is read;
        a mismatch raises :class:`ChecksumError` naming the file and leaves ``dest`` as it was. ``dest``
        already holding the same, intact release is a no-op; another release there is replaced only
        with ``force``; a folder that is not a release, or the current directory (or one above it),
        is never replaced.
        """
        if dest is not None:
            check_dest(dest)
        via_latest = version is None
        if via_latest:
            latest = self.latest()
            if latest is None:
                raise ReleaseError(f"{self.url} has no {LATEST}; pass a version (published: {self.versions() or 'none'})")
            version = latest["version"]
        check_version(version)
        got = self.read_manifest(version)
        if got is None:
            if self.fs.exists(self._p(version)):
                raise ReleaseError(f"release {version} at {self.url} is incomplete (no {MANIFEST}): its upload was "
                                   "interrupted; rerun the publish to finish it")
            raise ReleaseError(f"no release {version} at {self.url}; published: {self.versions() or 'none'}")
        manifest, mbytes = got
        if via_latest and latest["manifest_sha256"] != _sha(mbytes):
            raise ChecksumError(f"{self.where(version, MANIFEST)} does not match the sha256 that {LATEST} records: the "
                                "manifest was modified after publishing; refusing the release (republish it)")
        dest = Path(dest if dest is not None else version)
        check_dest(dest)
        if dest.exists() or dest.is_symlink():
            held = local_release(dest)
            if held is not None and held[1] == mbytes:
                try:
                    verify_folder(dest, manifest)
                    log.info("%s already holds release %s (verified)", dest, version)
                    return PullResult(version, self.where(version), dest, manifest["num_files"],
                                      manifest["total_bytes"], False, manifest)
                except ChecksumError as e:
                    if not force:
                        raise ReleaseError(f"{dest} holds release {version} but fails verification ({e}); pass --force "
                                           "to download it again") from None
            elif held is None:
                raise ReleaseError(f"{dest} exists and is not a release folder (no valid {MANIFEST}); --force replaces "
                                   f"only a release: choose another --dest, or move {dest} away yourself")
            elif not force:
                raise ReleaseError(f"{dest} holds release {held[0]['version']}, not {version}; choose another --dest or "
                                   "pass --force to replace it")
        with atomic_dir(dest) as tmp, _bar(manifest["total_bytes"], f"pull {version}", progress) as bar:
            for rel, want in manifest["files"].items():
                got_entry = self._download(version, rel, want["bytes"], tmp / rel, bar)
                if got_entry["bytes"] > want["bytes"]:
                    raise ChecksumError(f"{rel}: {self.where(version)} holds more than the {want['bytes']} bytes the "
                                        f"manifest records (reading stopped there); refusing release {version} "
                                        f"(nothing was written to {dest})")
                if got_entry != {"sha256": want["sha256"], "bytes": want["bytes"]}:
                    raise ChecksumError(mismatch_message(rel, self.where(version), want, got_entry)
                                        + f"; refusing release {version} (nothing was written to {dest})")
            (tmp / MANIFEST).write_bytes(mbytes)
        log.info("pulled %s into %s: %d files verified", self.where(version), dest, manifest["num_files"])
        return PullResult(version, self.where(version), dest, manifest["num_files"], manifest["total_bytes"], True,
                          manifest)

    def _download(self, version: str, rel: str, size: int, local: Path, bar: tqdm) -> dict:
        """Copy one file, hashing it, reading at most ``size + 1`` bytes: a larger file (a hostile or broken
        store) is refused after one byte too many, not after downloading all of it."""
        local.parent.mkdir(parents=True, exist_ok=True)
        h, limit = Hasher(), size + 1
        try:
            # cache_type="none": each read fetches exactly what it asks for (s3fs would otherwise read ahead a block)
            with self.fs.open(self._p(version, rel), "rb", cache_type="none") as f, open(local, "wb") as out:
                while h.bytes < limit and (chunk := f.read(min(CHUNK, limit - h.bytes))):
                    h.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
        except FileNotFoundError:
            raise ChecksumError(f"{rel}: listed in the manifest but missing from {self.where(version)}; the release "
                                "is damaged: republish it") from None
        return h.entry()


def _created(manifest: dict) -> datetime:
    try:
        return datetime.fromisoformat(str(manifest.get("created_at")))
    except ValueError:  # not ours to trust: an unreadable time sorts first
        return datetime.min.replace(tzinfo=timezone.utc)


def _natural(version: str) -> list:
    """Sort key that puts tiny-v10 after tiny-v9."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", version)]


def check_dest(dest: str | os.PathLike) -> None:
    """Refuse a pull destination that is the current directory or one above it (replacing it would pull
    the floor from under the shell, and fails half-way with EBUSY)."""
    here, target = Path.cwd().resolve(), Path(dest).resolve()
    if target == here or target in here.parents:
        raise ReleaseError(f"refusing --dest {dest}: it is the current directory or one above it, which a pull would "
                           "replace; pass a new folder, e.g. --dest ./<version>")


def local_release(folder: Path) -> tuple[dict, bytes] | None:
    """``(manifest, raw bytes)`` when ``folder`` is a release folder (it holds a valid manifest), else None."""
    path = folder / MANIFEST
    if not folder.is_dir() or not path.is_file():
        return None
    data = path.read_bytes()
    try:
        return parse_manifest(data, str(path)), data
    except ReleaseError:
        return None


def _split_release_url(url: str) -> tuple[str, str]:
    parent, _, name = url.rstrip("/").rpartition("/")
    if not name or parent.endswith(":/") or parent.endswith(":"):
        raise ReleaseError(f"{redact_url(url)} is a bucket root, not a release; pass the store URL and --version "
                           "instead")
    return parent or ".", name


def pull_release(
    url: str,
    dest: str | os.PathLike | None = None,
    *,
    version: str | None = None,
    force: bool = False,
    storage_options: dict | None = None,
    progress: bool = True,
) -> PullResult:
    """Pull a release given its own URL (``<store>/<version>``) or a store URL (its latest, or ``version``)."""
    if dest is not None:
        check_dest(dest)  # before any network: a refused destination costs nothing
    store = ReleaseStore(url, storage_options)
    if version is None and store.fs.exists(store._p(MANIFEST)):
        parent, version = _split_release_url(url)
        store = ReleaseStore(parent, storage_options)
    elif version is None and not store.fs.exists(store._p(LATEST)):
        if store.fs.exists(store._p(STAGING)) or store.versions():
            raise ReleaseError(f"{store.url} has no {LATEST}; pass --version (published: {store.versions() or 'none'})")
        raise ReleaseError(
            f"no release at {store.url}: neither {MANIFEST} (a release) nor {LATEST} (a store of releases) is there; if "
            "a publish to it was interrupted, rerun the publish"
        )
    return store.pull(version, dest, force=force, progress=progress)
