"""`distill_decoder`: distil the VAE decoder into the light causal decoder (``inference.decoder: light``)."""

import sys
from pathlib import Path

from longlive.data.shards import ShardError
from longlive.io import UnsafeStateError
from longlive.train.light_decoder import distill_decoder
from stages._common import setup, write_metrics
from stages._data import clips_dir
from stages.validate import REPORT as VALIDATION_REPORT

HEADLINE = ("psnr_light_vs_vae_db",)  # how closely the light decoder reproduces the VAE it replaces


def main() -> None:
    preset = setup("distill_decoder")
    try:
        metrics = distill_decoder(
            preset,
            shards_url=preset.encode.url,
            validation_report=VALIDATION_REPORT,  # refuses shards validate did not pass
            synth_dir=clips_dir(preset, "distill_decoder"),  # the frames: held-out PSNRs and the small pixel term
            base_dir=Path("models/base"),
            out_dir=Path("models/light_decoder"),
            work_dir=Path(".work/distill_decoder"),  # resume state for an interrupted run; outside DVC's outs
            plots_dir=Path("reports/distill_decoder"),
        )
    except (ShardError, UnsafeStateError) as e:  # not validated, damaged, planted resume state: one line
        sys.exit(f"distill_decoder: {e}")
    write_metrics("reports/distill_decoder", metrics, HEADLINE)


if __name__ == "__main__":
    main()
