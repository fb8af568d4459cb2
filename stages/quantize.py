"""`quantize NAME`: merge the LoRA of the DMD student ``models/dmd/NAME`` (if any; NAME = VARIANT-STUDENT or
VARIANT-STUDENT-qat), then quantize it to NVFP4 (``quant`` in params.yaml); writes ``models/nvfp4/NAME`` and
its report."""

import sys
from pathlib import Path

from longlive.eval.quantize import quantize_student
from longlive.device import resolve_device
from stages._common import setup, write_json


def main(argv: list[str] | None = None) -> None:
    preset = setup("quantize")
    args = sys.argv[1:] if argv is None else argv
    if preset.dmd is None:
        sys.exit(f"preset {preset.name} has no dmd section in params.yaml: nothing to quantize")
    d = preset.dmd
    names = [f"{v}-{s}" for v in d.variants for s in d.students] + [f"{v}-{s}-qat" for v in d.variants for s in d.qat_students]
    if len(args) != 1 or args[0] not in names:
        sys.exit(f"usage: python -m stages.quantize NAME, with NAME one of {names} (a models/dmd export)")
    name = args[0]
    metrics = quantize_student(
        preset, Path("models/dmd") / name, Path("models/nvfp4") / name, base_dir=Path("models/base"),
        num_prompts=preset.quant.quality_prompts, plots_dir=Path("reports/quantize") / name,
        device=str(resolve_device(preset.device)),
    )
    write_json(Path("reports/quantize") / name / "metrics.json", metrics)


if __name__ == "__main__":
    main()
