"""`base`: train the tiny VAE + bidirectional teacher on the training clips (synth's, or ingest's for
``data.source``), or convert Wan2.2 weights (real presets: ``base.weights``, no clips read)."""

import sys
from pathlib import Path

from longlive.io import UnsafeStateError
from longlive.train.base_models import build_base
from stages._common import setup, write_metrics
from stages._data import SYNTH, clips_dir

HEADLINE = ("vae.eval_psnr_db",)  # the VAE's held-out reconstruction; evaluate's scores cover the teacher


def main() -> None:
    preset = setup("base")
    try:
        metrics = build_base(
            preset,
            synth_dir=SYNTH if preset.base.weights else clips_dir(preset, "base"),  # converting reads no clips
            out_dir=Path("models/base"),
            work_dir=Path(".work/base"),  # resume state for an interrupted run; outside DVC's outs
            plots_dir=Path("reports/base"),
        )
    except UnsafeStateError as e:  # planted or foreign resume state, refused unread: one line naming what to delete
        sys.exit(f"base: {e}")
    write_metrics("reports/base", metrics, HEADLINE)


if __name__ == "__main__":
    main()
