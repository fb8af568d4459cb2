"""`publish`: build a versioned release (checkpoints, preset, metrics, model card, git commit, dvc.lock,
SHA-256 manifest) and upload it atomically to ``publish.url`` (a local folder or ``s3://``).

Releases are content-addressed: a rerun whose payload (weights, base models, preset, metrics) the
store already holds under a version of ``publish.version``'s template is a no-op naming that release
(and finishes a publish that died before ``latest.json``); a different release under an existing
version is refused unless ``publish.force``.
"""

import sys
from pathlib import Path

from longlive.data.shards import StorageError
from longlive.publish import ReleaseError, publish_from_config
from stages._common import setup, write_json

OUT = Path("reports/publish")


def main() -> None:
    preset = setup("publish")
    try:
        result = publish_from_config(preset, work_dir=Path(".work/publish"))
    except (ReleaseError, StorageError) as e:
        sys.exit(f"publish: {e}")
    write_json(OUT / "release.json", result.summary())
    print(f"published release {result.version} at {result.url} ({result.num_files} files, "
          f"{result.total_bytes / 1e6:.1f} MB){'' if result.uploaded else ' (already there, identical)'}")


if __name__ == "__main__":
    main()
