"""Versioned, verifiable, atomic releases of checkpoints to a local folder or any fsspec URL (s3:// included).

* :func:`build_release` (build.py) writes a release folder: weights, preset, metrics, model card,
  provenance (git commit, dvc.lock) and a SHA-256 manifest written last.
* :class:`ReleaseStore` (store.py) publishes it through a staging prefix, verifies the upload, makes
  it visible under a per-version lock (manifest, then ``latest.json``) and pulls with verification.
  Releases are content-addressed: publishing what the store already holds is a no-op naming it.
* :func:`publish_from_config` (run.py) does both from a preset's ``publish:`` section.
* :class:`Release` (release.py) is a pulled folder as inference loads it.
"""

from longlive.publish.build import build_release
from longlive.publish.manifest import (
    ChecksumError, PublishConflictError, ReleaseError, ReleaseExistsError, UploadError, content_id, read_manifest,
    verify_folder,
)
from longlive.publish.release import Release, find_release
from longlive.publish.run import publish_from_config, resolve_version
from longlive.publish.store import PublishResult, PullResult, ReleaseStore, pull_release

__all__ = [
    "build_release", "ReleaseStore", "PublishResult", "PullResult", "pull_release", "publish_from_config",
    "resolve_version", "Release", "find_release", "read_manifest", "verify_folder",
    "ReleaseError", "ReleaseExistsError", "PublishConflictError", "ChecksumError", "UploadError", "content_id",
]
