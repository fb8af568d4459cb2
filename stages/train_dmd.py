"""`train_dmd VARIANT STUDENT`: DMD distillation of the AR student ``models/ar/VARIANT`` into the few-step
student STUDENT (a key of ``dmd.students``, e.g. 4step or 2step); the DVC ``matrix`` runs every pair."""

import sys
from pathlib import Path

from longlive.train.dmd import train_dmd
from stages._common import setup, write_json


def main(argv: list[str] | None = None) -> None:
    preset = setup("train_dmd")
    args = sys.argv[1:] if argv is None else argv
    if preset.dmd is None:
        sys.exit(f"preset {preset.name} has no dmd section in params.yaml")
    variants, students = preset.dmd.variants, sorted(preset.dmd.students)
    if len(args) != 2 or args[0] not in variants or args[1] not in students:
        sys.exit(f"usage: python -m stages.train_dmd VARIANT STUDENT, with VARIANT in {variants} (dmd.variants) "
                 f"and STUDENT in {students} (dmd.students)")
    variant, student = args
    name = f"{variant}-{student}"
    metrics = train_dmd(
        preset, variant, student,
        ar_dir=Path("models/ar") / variant,
        base_dir=Path("models/base"),
        out_dir=Path("models/dmd") / name,
        work_dir=Path(".work/train_dmd") / name,  # resume state for an interrupted run; outside DVC's outs
        plots_dir=Path("reports/train_dmd") / name,
    )
    write_json(Path("reports/train_dmd") / name / "metrics.json", metrics)


if __name__ == "__main__":
    main()
