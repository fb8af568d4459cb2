"""`base`: train the tiny VAE + bidirectional teacher, or convert Wan2.2 weights (real presets)."""

from pathlib import Path

from longlive.train.base import build_base
from stages._common import setup, write_json


def main() -> None:
    preset = setup("base")
    metrics = build_base(
        preset,
        synth_dir=Path("data/synth"),
        out_dir=Path("models/base"),
        work_dir=Path(".work/base"),  # resume state for an interrupted run; outside DVC's outs
        plots_dir=Path("reports/base"),
    )
    write_json("reports/base/metrics.json", metrics)


if __name__ == "__main__":
    main()
