"""A store of releases at any fsspec URL (local path, ``file://``, ``s3://``), with atomic publishing.

Layout under the store URL::

    <version>/...                a release; visible (complete) only once <version>/manifest.json exists
    <version>/manifest.json      written LAST, after every file is uploaded, verified and in place
    latest.json                  {version, manifest_sha256, published_at}: updated after the manifest
    _staging/<version>.<id>/     uploads in flight (or debris of a failed one; the next publish clears it)

Publishing uploads every file to a fresh staging prefix, reads each back and checks its SHA-256
against the manifest, then moves the files under ``<version>/`` (one rename on a local disk, a
server-side copy per file on S3), writes the manifest and finally the ``latest`` pointer. A crash
or a dead server at any point before the manifest leaves no visible release, and running the same
publish again cleans up and completes it. Pulling downloads into a temporary folder beside the
destination, hashing as it goes, and renames it into place only when every file matched: a
tampered file is refused with an error naming it, and nothing is left behind.

The store assumes one publisher per version at a time (the usual case for a pipeline stage); two
concurrent publishes of the same version can race, as with any object store without locking.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from fsspec.callbacks import Callback
from fsspec.implementations.local import LocalFileSystem
from tqdm import tqdm

from longlive.data.shards import open_fs
from longlive.io import atomic_dir
from longlive.publish.manifest import (
    CHUNK, MANIFEST, ChecksumError, Hasher, ReleaseError, ReleaseExistsError, UploadError, check_version, content_id,
    hash_stream, mismatch_message, parse_manifest, verify_folder,
)

log = logging.getLogger(__name__)

LATEST = "latest.json"
STAGING = "_staging"


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


@dataclass
class PublishResult:
    version: str
    url: str  # the release: <store>/<version>
    store: str
    uploaded: bool  # False when an identical release was already there (exist_ok)
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
        self.url = url.rstrip("/") or url
        self.storage_options = storage_options
        self.fs, self.root = open_fs(self.url, storage_options)
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
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        names = [posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory"]
        return sorted(n for n in names if n[:1].isalnum() and self.fs.exists(self._p(n, MANIFEST)))

    def latest(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self._p(LATEST)))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ReleaseError(f"{self.where(LATEST)} is not valid JSON ({e}); republish the latest release to "
                               "rewrite it") from None

    # -- writing ----------------------------------------------------------------------------

    def _put_bytes(self, path: str, data: bytes) -> None:
        """Write a small file so readers see the old or the new content, never a partial one."""
        if self.local:
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)  # one S3 PUT is atomic: an object appears whole or not at all

    def _rm(self, path: str, what: str) -> None:
        try:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        except Exception as e:  # noqa: BLE001 - cleanup must not hide the error that got us here
            log.warning("could not remove %s (%s): %s; the next publish of this version removes it", path, what, e)

    def _clear_staging(self, version: str) -> None:
        """Remove what failed uploads of ``version`` left in ``_staging/`` (never visible, never reused)."""
        try:
            entries = self.fs.ls(self._p(STAGING), detail=False)
        except FileNotFoundError:
            return
        for entry in entries:
            if posixpath.basename(entry.rstrip("/")).startswith(f"{version}."):
                log.info("removing %s, left by an interrupted publish of %s", entry, version)
                self.fs.rm(entry, recursive=True)

    def publish(
        self,
        folder: str | os.PathLike,
        *,
        force: bool = False,
        exist_ok: bool = False,
        set_latest: bool = True,
        progress: bool = True,
    ) -> PublishResult:
        """Upload a built release folder (it must carry its ``manifest.json``) as ``<store>/<version>``.

        An existing version is refused (:class:`ReleaseExistsError`) unless ``force`` (replace it) or
        ``exist_ok`` with byte-identical content (nothing to upload; the ``latest`` pointer is still
        set, finishing a publish that died just before it). Any failure before the manifest is
        written raises :class:`UploadError` and leaves no visible release; rerun to retry.
        """
        folder = Path(folder)
        manifest = verify_folder(folder)  # never upload a folder that does not match its own manifest
        version = manifest["version"]
        mbytes = (folder / MANIFEST).read_bytes()
        msha = hashlib.sha256(mbytes).hexdigest()
        cid = content_id(manifest)
        existing = self.read_manifest(version)

        def result(uploaded: bool, latest: bool, sha: str = msha) -> PublishResult:
            return PublishResult(version, self.where(version), self.url, uploaded, manifest["num_files"],
                                 manifest["total_bytes"], cid, sha, latest, replaced=existing is not None and uploaded)

        if existing is not None and not force:
            same = content_id(existing[0]) == cid
            if same and exist_ok:
                sha = hashlib.sha256(existing[1]).hexdigest()
                if set_latest:
                    self._point_latest(version, sha)
                log.info("release %s is already at %s with identical content; nothing to upload", version, self.url)
                return result(False, set_latest, sha)
            raise ReleaseExistsError(
                f"release {version} already exists at {self.where(version)} "
                f"({'with identical content' if same else 'with different content'}); publish under another version "
                "(publish.version, --version) or replace it with --force / publish.force: true"
            )

        self._clear_staging(version)
        staging = self._p(STAGING, f"{version}.{uuid.uuid4().hex[:12]}")
        try:
            self._upload(folder, manifest, staging, progress)
            self._verify_remote(staging, manifest, progress)
            self._promote(version, staging, manifest, replacing=existing is not None)
        except BaseException as e:
            self._rm(staging, "staging of a failed upload")
            if isinstance(e, (ReleaseError, KeyboardInterrupt)):
                raise
            raise UploadError(
                f"publishing {version} to {self.url} failed: {type(e).__name__}: {e}; no release was made visible "
                "(no manifest.json at the release prefix); fix the cause and rerun the same command to retry"
            ) from e
        self._put_bytes(self._p(version, MANIFEST), mbytes)  # the release is visible from here on
        if set_latest:
            self._point_latest(version, msha)
        log.info("published %s: %d files, %.1f MB", self.where(version), manifest["num_files"],
                 manifest["total_bytes"] / 1e6)
        return result(True, set_latest)

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
        final = self._p(version)
        if replacing:
            # --force: the old release stops being visible first, so no reader mixes old and new files.
            self.fs.rm_file(self._p(version, MANIFEST))
        if self.fs.exists(final):
            # Files of an earlier attempt that died before its manifest (never visible), or the forced old ones.
            self.fs.rm(final, recursive=True)
        if self.local:
            os.replace(staging, final)  # one rename moves every file at once
            try:
                os.rmdir(self._p(STAGING))  # tidy: only succeeds when no other upload is in flight
            except OSError:
                pass
            return
        for rel in manifest["files"]:
            self.fs.copy(posixpath.join(staging, rel), posixpath.join(final, rel))  # server-side copy
        for rel, want in manifest["files"].items():
            size = self.fs.info(posixpath.join(final, rel))["size"]
            if size != want["bytes"]:
                raise UploadError(f"{self.where(version, rel)}: {size} bytes after the copy from staging, manifest "
                                  f"records {want['bytes']}; no release was made visible: rerun to retry")
        self.fs.rm(staging, recursive=True)

    def _point_latest(self, version: str, manifest_sha256: str) -> None:
        body = {"version": version, "manifest_sha256": manifest_sha256,
                "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
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

        Every file is hashed while it downloads; a mismatch raises :class:`ChecksumError` naming the
        file and leaves ``dest`` as it was. ``dest`` already holding the same, intact release is a no-op;
        any other existing ``dest`` is refused unless ``force``.
        """
        via_latest = version is None
        if via_latest:
            latest = self.latest()
            if latest is None:
                raise ReleaseError(f"{self.url} has no {LATEST}; pass a version (published: {self.versions() or 'none'})")
            version = str(latest.get("version"))
        check_version(version)
        got = self.read_manifest(version)
        if got is None:
            if self.fs.exists(self._p(version)):
                raise ReleaseError(f"release {version} at {self.url} is incomplete (no {MANIFEST}): its upload was "
                                   "interrupted; rerun the publish to finish it")
            raise ReleaseError(f"no release {version} at {self.url}; published: {self.versions() or 'none'}")
        manifest, mbytes = got
        if via_latest and latest.get("manifest_sha256") != hashlib.sha256(mbytes).hexdigest():
            raise ChecksumError(f"{self.where(version, MANIFEST)} does not match the sha256 that {LATEST} records: the "
                                "manifest was modified after publishing; refusing the release (republish it)")
        dest = Path(dest if dest is not None else version)
        if dest.exists():
            if (dest / MANIFEST).is_file() and (dest / MANIFEST).read_bytes() == mbytes:
                try:
                    verify_folder(dest, manifest)
                    log.info("%s already holds release %s (verified)", dest, version)
                    return PullResult(version, self.where(version), dest, manifest["num_files"],
                                      manifest["total_bytes"], False, manifest)
                except ChecksumError as e:
                    if not force:
                        raise ReleaseError(f"{dest} holds release {version} but fails verification ({e}); pass --force "
                                           "to download it again") from None
            elif not force:
                raise ReleaseError(f"{dest} already exists and is not release {version}; choose another --dest or pass "
                                   "--force to replace it")
        with atomic_dir(dest) as tmp, _bar(manifest["total_bytes"], f"pull {version}", progress) as bar:
            for rel, want in manifest["files"].items():
                got_entry = self._download(version, rel, tmp / rel, bar)
                if got_entry != {"sha256": want["sha256"], "bytes": want["bytes"]}:
                    raise ChecksumError(mismatch_message(rel, self.where(version), want, got_entry)
                                        + f"; refusing release {version} (nothing was written to {dest})")
            (tmp / MANIFEST).write_bytes(mbytes)
        log.info("pulled %s into %s: %d files verified", self.where(version), dest, manifest["num_files"])
        return PullResult(version, self.where(version), dest, manifest["num_files"], manifest["total_bytes"], True,
                          manifest)

    def _download(self, version: str, rel: str, local: Path, bar: tqdm) -> dict:
        local.parent.mkdir(parents=True, exist_ok=True)
        h = Hasher()
        try:
            with self.fs.open(self._p(version, rel), "rb") as f, open(local, "wb") as out:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
        except FileNotFoundError:
            raise ChecksumError(f"{rel}: listed in the manifest but missing from {self.where(version)}; the release "
                                "is damaged: republish it") from None
        return h.entry()


def _split_release_url(url: str) -> tuple[str, str]:
    parent, _, name = url.rstrip("/").rpartition("/")
    if not name or parent.endswith(":/") or parent.endswith(":"):
        raise ReleaseError(f"{url} is a bucket root, not a release; pass the store URL and --version instead")
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
    store = ReleaseStore(url, storage_options)
    if version is None and store.fs.exists(store._p(MANIFEST)):
        parent, version = _split_release_url(url)
        store = ReleaseStore(parent, storage_options)
    elif version is None and not store.fs.exists(store._p(LATEST)):
        if store.fs.exists(store._p(STAGING)) or store.versions():
            raise ReleaseError(f"{url} has no {LATEST}; pass --version (published: {store.versions() or 'none'})")
        raise ReleaseError(
            f"no release at {url}: neither {MANIFEST} (a release) nor {LATEST} (a store of releases) is there; if a "
            "publish to it was interrupted, rerun the publish"
        )
    return store.pull(version, dest, force=force, progress=progress)
