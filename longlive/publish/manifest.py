"""The release manifest: SHA-256 and size of every file of a release folder, and the errors of publishing.

``manifest.json`` sits at the top of the release and lists every other file by its relative POSIX
path. It is written last (when a folder is built and when a release is uploaded), so its presence
is what makes a release complete. A manifest is untrusted input (anyone who can write to the store
can plant one): every path, entry and count is checked before use, and anything hostile (``../x``,
an absolute path, a NUL byte, an over-long name, a file and a directory of one name) is refused
with one :class:`ReleaseError` rather than followed outside the destination.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from longlive.io import write_bytes_atomic

MANIFEST = "manifest.json"
FORMAT = "longlive-release/1"
CHUNK = 8 << 20  # hashing/copy chunk: large enough for throughput, small enough for memory
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RESERVED = {"latest", "latest.json"}
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
NAME_MAX = 255  # bytes in one path component: the limit of ext4, xfs, APFS and S3-mounted tools alike
PATH_MAX = 1024  # bytes in a whole relative path (S3 keys stop at 1024 too)
# Files that describe a release rather than being part of it: they name the version, the store URL
# and the run (commit, dirty flag, dvc.lock), so two publishes of the same model differ in them.
# content_id leaves them out; everything else (weights, base models, preset, metrics) is the payload.
DESCRIPTIVE = ("release.json", "README.md", "provenance/")


class ReleaseError(RuntimeError):
    """A release is missing, incomplete or unusable; the message names it and the fix."""


class ReleaseExistsError(ReleaseError):
    """The version is already published (and ``force`` was not given)."""


class PublishConflictError(ReleaseExistsError):
    """Another publish of the same version holds its lock (or finished first with other content)."""


class ChecksumError(ReleaseError):
    """A file's bytes do not match the SHA-256 (or size) the manifest records."""


class UploadError(ReleaseError):
    """An upload failed part-way; nothing was made visible and the publish can be retried."""


def check_version(version: str) -> str:
    if not VERSION_RE.match(version) or version in RESERVED:
        raise ReleaseError(
            f"release version {version!r} is not allowed: use letters, digits, '.', '-' or '_' (first a letter or "
            f"digit, at most 128 characters), and not {sorted(RESERVED)}"
        )
    return version


def check_relpath(rel: str) -> str:
    """A manifest path must stay inside the release and be writable on any disk: relative, POSIX, no
    '..' or empty parts, no NUL or other control character, no drive letter, components of at most
    255 bytes."""
    if not isinstance(rel, str):
        raise ReleaseError(f"manifest path {rel!r} is not a string; refusing it")
    parts = rel.split("/")
    why = None
    if not rel or rel.startswith("/") or PurePosixPath(rel).is_absolute() or re.match(r"^[A-Za-z]:", rel):
        why = "it is absolute"
    elif "\\" in rel:
        why = "it holds a backslash"
    elif any(part in ("", ".", "..") for part in parts):
        why = "it has an empty, '.' or '..' part"
    elif any(ord(c) < 32 or ord(c) == 127 for c in rel):
        why = "it holds a NUL or another control character"
    elif any(len(part.encode()) > NAME_MAX for part in parts):
        why = f"a part is longer than {NAME_MAX} bytes"
    elif len(rel.encode()) > PATH_MAX:
        why = f"it is longer than {PATH_MAX} bytes"
    if why:
        shown = rel if len(rel) <= 80 else f"{rel[:60]}...({len(rel)} chars)"
        raise ReleaseError(f"manifest path {shown!r} is not a plain relative path inside the release ({why}); "
                           "refusing it")
    return rel


def check_tree(paths) -> None:
    """Refuse a set of paths that no folder can hold: a file that is also another entry's directory
    (``a`` and ``a/b``), or the manifest listing itself."""
    files = set(paths)
    if MANIFEST in files:
        raise ReleaseError(f"the manifest lists {MANIFEST} itself; refusing it")
    for rel in files:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in files:
                raise ReleaseError(f"the manifest lists {parent!r} as a file and as the directory of {rel!r}; "
                                   "refusing it")


class Hasher:
    """SHA-256 and byte count of what passes through ``update``."""

    def __init__(self) -> None:
        self.sha, self.bytes = hashlib.sha256(), 0

    def update(self, chunk: bytes) -> None:
        self.sha.update(chunk)
        self.bytes += len(chunk)

    def entry(self) -> dict:
        return {"sha256": self.sha.hexdigest(), "bytes": self.bytes}


def hash_stream(f: BinaryIO, on_chunk=None) -> dict:
    h = Hasher()
    while chunk := f.read(CHUNK):
        h.update(chunk)
        if on_chunk is not None:
            on_chunk(len(chunk))
    return h.entry()


def hash_file(path: str | os.PathLike) -> dict:
    with open(path, "rb") as f:
        return hash_stream(f)


def scan_folder(folder: str | os.PathLike) -> dict[str, dict]:
    """``{relative posix path: {sha256, bytes}}`` of every file under ``folder`` except the manifest."""
    folder = Path(folder)
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise ReleaseError(f"{path} is a symbolic link; a release holds plain files only (copy the target in)")
        if path.is_file():
            rel = path.relative_to(folder).as_posix()
            if rel != MANIFEST:
                files[check_relpath(rel)] = hash_file(path)
    return files


def build_manifest(folder: str | os.PathLike, version: str) -> dict:
    files = scan_folder(folder)
    return {
        "format": FORMAT,
        "version": check_version(version),
        # microseconds: store.py orders releases by it to tell whether latest.json fell behind
        "created_at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        "num_files": len(files),
        "total_bytes": sum(e["bytes"] for e in files.values()),
        "files": files,
    }


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def write_manifest(folder: str | os.PathLike, manifest: dict) -> Path:
    """Write ``manifest.json`` atomically (a reader sees the whole file or none)."""
    return write_bytes_atomic(Path(folder) / MANIFEST, manifest_bytes(manifest))


def parse_manifest(data: bytes, where: str) -> dict:
    """Decode and check a manifest's structure (and every path in it)."""
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReleaseError(f"{where} is not valid JSON ({e}); the release is damaged: republish it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise ReleaseError(f"{where} is not a {FORMAT} manifest (format={fmt!r}); the release is damaged: republish it")
    if not isinstance(manifest.get("version"), str):
        raise ReleaseError(f"{where}: version {manifest.get('version')!r} is not a string; the release is damaged: "
                           "republish it")
    check_version(manifest["version"])
    try:
        for rel, entry in manifest["files"].items():
            check_relpath(rel)
            ok = (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and SHA256_RE.match(entry["sha256"])
                  and type(entry.get("bytes")) is int and entry["bytes"] >= 0)
            if not ok:
                raise ReleaseError(f"entry for {rel[:80]!r} needs a sha256 (64 hex digits) and a byte count (an "
                                   "integer >= 0)")
        check_tree(manifest["files"])
        files = manifest["files"].values()
        if manifest.get("num_files") != len(files) or manifest.get("total_bytes") != sum(e["bytes"] for e in files):
            raise ReleaseError(f"num_files/total_bytes ({manifest.get('num_files')!r}/{manifest.get('total_bytes')!r}) "
                               "do not match its files")
    except ReleaseError as e:
        raise ReleaseError(f"{where}: {e}; the release is damaged or hostile: republish it") from None
    return manifest


def parse_latest(data: bytes, where: str) -> dict:
    """Decode and check ``latest.json``: ``{version, manifest_sha256, ...}``."""
    try:
        latest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        latest, why = None, f"not valid JSON: {e}"
    else:
        why = None
    if why is None and not isinstance(latest, dict):
        why = f"a JSON {type(latest).__name__}, not an object"
    elif why is None and not (isinstance(latest.get("version"), str) and VERSION_RE.match(latest["version"])
                              and latest["version"] not in RESERVED):
        why = f"version {str(latest.get('version'))[:80]!r} is not a release version"
    elif why is None and not (isinstance(latest.get("manifest_sha256"), str)
                              and SHA256_RE.match(latest["manifest_sha256"])):
        why = "manifest_sha256 is not 64 hex digits"
    if why:
        raise ReleaseError(f"{where} is not a valid latest pointer ({why}); pass --version, or republish the latest "
                           "release to rewrite it")
    return latest


def read_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ReleaseError(f"{folder} has no {MANIFEST}: it is not a (complete) release folder; build or pull it again")
    return parse_manifest(path.read_bytes(), str(path))


def is_payload(rel: str) -> bool:
    return not any(rel == d or (d.endswith("/") and rel.startswith(d)) for d in DESCRIPTIVE)


def content_id(manifest: dict) -> str:
    """One digest of the payload files (paths and SHA-256; :data:`DESCRIPTIVE` files left out): equal ids
    mean the same model, base models, preset and metrics, whatever the version, date or commit.

    Releases are addressed by it: publishing a payload the store already holds is a no-op naming that
    release (store.py, run.py), so rerunning an unchanged pipeline does not mint ``-v2``, ``-v3``.
    """
    h = hashlib.sha256()
    for rel in sorted(filter(is_payload, manifest["files"])):
        h.update(f"{rel}\0{manifest['files'][rel]['sha256']}\n".encode())
    return h.hexdigest()


def mismatch_message(rel: str, where: str, want: dict, got: dict) -> str:
    what = (f"sha256 {got['sha256'][:16]}... but the manifest records {want['sha256'][:16]}..."
            if got["bytes"] == want["bytes"] else f"{got['bytes']} bytes but the manifest records {want['bytes']}")
    return f"{rel}: {where} has {what}; the file was modified or corrupted after it was published"


def verify_folder(folder: str | os.PathLike, manifest: dict | None = None) -> dict:
    """Check every file of a local release against its manifest; :class:`ChecksumError` names the file.

    Files that are not in the manifest are refused too: a release is exactly what was published.
    """
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()} - {MANIFEST}
    missing, extra = sorted(manifest["files"].keys() - present), sorted(present - manifest["files"].keys())
    if missing:
        raise ChecksumError(f"{folder}: files of the manifest are missing: {missing[:5]}; pull the release again")
    if extra:
        raise ChecksumError(f"{folder}: files not in the manifest: {extra[:5]}; remove them or pull the release again")
    for rel, want in manifest["files"].items():
        if (folder / rel).is_symlink():
            raise ChecksumError(f"{folder / rel} is a symbolic link, not the published file; pull the release again")
        got = hash_file(folder / rel)
        if got != {"sha256": want["sha256"], "bytes": want["bytes"]}:
            raise ChecksumError(mismatch_message(rel, str(folder), want, got) + "; pull the release again")
    return manifest


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
