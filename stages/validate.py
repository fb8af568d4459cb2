"""`validate`: a great-expectations suite over the shards; bad data stops the DAG here."""

import sys
from pathlib import Path

from longlive.data.validate import expected_from_preset, validate_shards
from stages._common import setup, write_json

OUT = Path("reports/validate")


def main() -> None:
    preset = setup("validate")
    report = validate_shards(preset.encode.url, expected_from_preset(preset), preset.validate_)
    report.write(OUT)
    write_json(OUT / "metrics.json", {"success": report.success, **report.summary()})
    if not report.success:
        print(report.to_markdown(), file=sys.stderr)
        sys.exit(f"validate: the shards at {preset.encode.url} failed validation; see {OUT / 'report.md'}")
    print(report.to_markdown())


if __name__ == "__main__":
    main()
