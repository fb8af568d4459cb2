"""`ingest`: the user's videos and captions (``data.source``) -> clips in ``data/ingest``, the format encode reads.

Runs on Ray Data (a local Ray unless ``RAY_ADDRESS`` / ``data.ray_address`` names a cluster). Every file or clip
left out is in ``reports/ingest/report.md`` with its reason. DVC keeps ``data/ingest`` between runs (``persist``)
and reruns the stage when its code or ``data`` params change; it does not watch the videos themselves (they may
be in a bucket), so after adding or changing some, ``dvc repro -f ingest``: the per-video cache decodes only the
new or changed files, and an unchanged source gives a byte-identical output, so nothing downstream reruns.
With ``data.source: synth`` (the tiny preset) there is nothing to ingest: ``data/ingest`` is left empty.
"""

import shutil
import sys
from pathlib import Path

from longlive.config import ConfigError
from longlive.data.ingest import IngestError, IngestSettings, run_ingest
from stages._common import setup, write_json

OUT, REPORTS = Path("data/ingest"), Path("reports/ingest")


def main() -> None:
    preset = setup("ingest")
    data = preset.data
    try:
        data.require_source(preset.name)
    except ConfigError as e:
        sys.exit(f"ingest: {e}")
    if data.is_synth:
        for folder in (OUT, REPORTS):  # clips and reports of an earlier real source must not linger
            shutil.rmtree(folder, ignore_errors=True)
        OUT.mkdir(parents=True)
        (OUT / "index.jsonl").write_text("")
        write_json(OUT / "stats.json", {"source": "synth", "clips": 0})
        write_json(REPORTS / "metrics.json", {"clips": 0})
        (REPORTS / "report.md").write_text("# Ingest\n\ndata.source is synth: encode reads data/synth, "
                                           "nothing to ingest.\n")
        return
    try:
        stats = run_ingest(data.source, OUT, IngestSettings.from_preset(preset), captions=data.captions,
                           storage_options=data.storage_options, reports_dir=REPORTS, workers=data.workers,
                           ray_address=data.ray_address, num_cpus=data.num_cpus)
    except IngestError as e:
        sys.exit(f"ingest: {e}")
    if not stats["clips"]:
        sys.exit(f"ingest: no clip passed; every file's reason is in {REPORTS / 'report.md'}")


if __name__ == "__main__":
    main()
