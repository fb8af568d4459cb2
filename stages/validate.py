"""`validate`: a great-expectations suite over the shards; bad data stops the DAG here.

``reports/validate/report.json`` is also the gate in code: training refuses shards unless it passed
them (:func:`longlive.data.validate.require_validated`, keyed by the manifest's sha256).
"""

import sys
from pathlib import Path

from longlive.data.validate import Check, Report, expected_from_preset, validate_shards
from longlive.secrets import redact_url
from stages._common import setup, write_json

OUT = Path("reports/validate")
REPORT = OUT / "report.json"  # what training checks before it reads a shard


def write_verdict(report: Report) -> None:
    report.write(OUT)
    write_json(OUT / "metrics.json", {"success": report.success, **report.summary()})


def main() -> None:
    preset = setup("validate")
    url = preset.encode.url
    # A failing verdict first: whatever stops this run (a crash, a kill), no earlier report is left
    # claiming these shards passed.
    write_verdict(Report(redact_url(url), [Check(
        "validate finished", False, kind="shard", observed="the validate stage started but did not finish",
        examples=["rerun `dvc repro validate`"])]))
    report = validate_shards(url, expected_from_preset(preset), preset.validate_)
    write_verdict(report)
    print(report.to_markdown())
    if not report.success:
        sys.exit(f"validate: {report.headline()} (full report: {OUT / 'report.md'})")


if __name__ == "__main__":
    main()
