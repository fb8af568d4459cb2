"""`train_dmd VARIANT STUDENT [--qat]`: DMD distillation of the AR student ``models/ar/VARIANT`` into the
few-step student STUDENT (a key of ``dmd.students``, e.g. 4step or 2step); the DVC ``matrix`` runs every
pair. ``--qat``: the NVFP4 QAT fine-tune of that student (``models/dmd/VARIANT-STUDENT-qat``)."""

import sys
from pathlib import Path

from longlive.data.prompts import PromptError
from longlive.data.shards import ShardError
from longlive.io import UnsafeStateError
from longlive.train.dmd import train_dmd
from stages._common import setup, write_json
from stages.validate import REPORT as VALIDATION_REPORT


def main(argv: list[str] | None = None) -> None:
    preset = setup("train_dmd")
    args = sys.argv[1:] if argv is None else argv
    if preset.dmd is None:
        sys.exit(f"preset {preset.name} has no dmd section in params.yaml")
    qat = "--qat" in args
    args = [a for a in args if a != "--qat"]
    variants, students = preset.dmd.variants, sorted(preset.dmd.qat_students if qat else preset.dmd.students)
    if len(args) != 2 or args[0] not in variants or args[1] not in students:
        sys.exit(f"usage: python -m stages.train_dmd VARIANT STUDENT [--qat], with VARIANT in {variants} "
                 f"(dmd.variants) and STUDENT in {students} (dmd.{'qat_students' if qat else 'students'})")
    variant, student = args
    name = f"{variant}-{student}" + ("-qat" if qat else "")
    try:
        metrics = train_dmd(
            preset, variant, student,
            ar_dir=Path("models/ar") / variant,
            base_dir=Path("models/base"),
            validation_report=VALIDATION_REPORT,  # the data term refuses shards validate did not pass
            out_dir=Path("models/dmd") / name,
            work_dir=Path(".work/train_dmd") / name,  # resume state for an interrupted run; outside DVC's outs
            plots_dir=Path("reports/train_dmd") / name,
            qat_from=Path("models/dmd") / f"{variant}-{student}" if qat else None,
        )
    except (ShardError, PromptError, UnsafeStateError) as e:  # bad shards, prompt file or resume state: one line
        sys.exit(f"train_dmd: {e}")
    write_json(Path("reports/train_dmd") / name / "metrics.json", metrics)


if __name__ == "__main__":
    main()
