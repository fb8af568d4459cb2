"""`train_ar VARIANT`: block-causal teacher forcing from the base teacher; the variants (t2v, i2v) are
``ar.variants`` in params.yaml and the items of the DVC ``foreach``."""

import sys
from pathlib import Path

from longlive.data.shards import ShardError
from longlive.io import UnsafeStateError
from longlive.parallel import parallel_session
from longlive.train.ar import train_ar
from stages._common import setup, write_json
from stages.validate import REPORT as VALIDATION_REPORT


def main(argv: list[str] | None = None) -> None:
    preset = setup("train_ar")
    args = sys.argv[1:] if argv is None else argv
    variants = sorted(preset.ar.variants)
    if len(args) != 1 or args[0] not in variants:
        sys.exit(f"usage: python -m stages.train_ar VARIANT, with VARIANT one of {variants} (ar.variants in params.yaml)")
    variant = args[0]
    # One process, or one of parallel.nproc x nnodes under torchrun (python -m longlive.parallel.launch).
    with parallel_session(preset.parallel, device=preset.device) as parallel:
        try:
            result = train_ar(
                preset,
                variant,
                shards_url=preset.encode.url,
                validation_report=VALIDATION_REPORT,  # refuses shards validate did not pass
                base_dir=Path("models/base"),
                out_dir=Path("models/ar") / variant,
                work_dir=Path(".work/train_ar") / variant,  # resume state for an interrupted run; outside DVC's outs
                plots_dir=Path("reports/train_ar") / variant,
                parallel=parallel,
            )
        except (ShardError, UnsafeStateError) as e:  # not validated, damaged, planted resume state: one line
            sys.exit(f"train_ar: {e}")
        if parallel.is_main:
            write_json(Path("reports/train_ar") / variant / "metrics.json", result.metrics)


if __name__ == "__main__":
    main()
