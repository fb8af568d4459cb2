"""`synth`: procedural videos of coloured shapes with captions and ground truth.

Only when ``data.source`` is synth (the tiny preset); otherwise the clips are the user's (``ingest``) and
``data/synth`` is left with an empty index, so nothing is drawn that no stage reads.
"""

import shutil
from pathlib import Path

from longlive.data.synth import write_dataset
from longlive.io import write_text_atomic
from stages._common import setup, write_json

OUT = Path("data/synth")


def main() -> None:
    preset = setup("synth")
    shutil.rmtree(OUT, ignore_errors=True)
    if not preset.data.is_synth:
        OUT.mkdir(parents=True)
        write_text_atomic(OUT / "index.jsonl", "")
        write_json("reports/synth/metrics.json", {"clips": 0})
        return
    stats = write_dataset(preset, OUT)
    write_json("reports/synth/metrics.json", stats)


if __name__ == "__main__":
    main()
