"""`synth`: procedural videos of coloured shapes with captions and ground truth."""

import shutil
from pathlib import Path

from longlive.data.synth import write_dataset
from stages._common import setup, write_json

OUT = Path("data/synth")


def main() -> None:
    preset = setup("synth")
    shutil.rmtree(OUT, ignore_errors=True)
    stats = write_dataset(preset, OUT)
    write_json("reports/synth/metrics.json", stats)


if __name__ == "__main__":
    main()
