"""Prompt following of the DMD students against their AR students (issue 4's closing figures).

For each variant (t2v, i2v): the AR student with its training step list (4 steps), with many steps
(8, the reference "many steps" run) and with only 2 steps, and the DMD 4-step and 2-step students, all
on the same held-out prompts and seeds (:func:`longlive.eval.quality.eval_prompt_following`), plus the wall time of
each train_dmd stage from its metrics. Writes ``benchmarks/results/dmd_quality_tiny.json`` and ``.md``.

    python benchmarks/dmd_quality.py            # ~5 min on 2 shared CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from longlive.bench.harness import fmt
from longlive.bench.quality import QualityRun, dmd_vs_ar, dmd_vs_ar_lines, provenance_lines
from longlive.eval.prompt_following import CHANCE_SCORE

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MANY = [1000 - 125 * i for i in range(8)]
TWO = [1000, 500]


def runs(variant: str) -> list[tuple[str, Path, list[str]]]:
    ar, dmd = ROOT / "models/ar" / variant, ROOT / "models/dmd"
    return [
        (f"AR {variant}, 4 steps (its training list)", ar, []),
        (f"AR {variant}, 8 steps", ar, [f"denoising_steps={json.dumps(MANY)}"]),
        (f"AR {variant}, 2 steps", ar, [f"denoising_steps={json.dumps(TWO)}"]),
        (f"DMD {variant} 4-step", dmd / f"{variant}-4step", []),
        (f"DMD {variant} 2-step", dmd / f"{variant}-2step", []),
    ]


def comparisons(runs: dict, variant: str) -> dict:
    """The DMD 2-step student minus the AR student at 8 and at 2 steps, paired per video (every model sees the
    same prompts and seeds, so the per-video difference's standard error is the one that applies)."""
    rows = lambda n: [r["score"] for r in runs[n]["score"]["rows"]]  # noqa: E731
    return dmd_vs_ar(rows(f"AR {variant}, 8 steps"), rows(f"AR {variant}, 2 steps"), rows(f"DMD {variant} 2-step"))


def markdown(result: dict) -> str:
    c = result["chance_score"]
    lines = [
        "# DMD students vs AR students, tiny preset", "", *provenance_lines(result),
        f"* {result['num_prompts']} held-out prompts per variant, one {result['clip_frames']}-frame video each, "
        f"same seeds for every model; score = mean(colour acc, shape acc, motion ok); chance {c:.3f}", "",
        "| model | eval | steps | score ± sem | colour | shape | motion | object | chance |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["runs"].items():
        s = r["score"]
        lines.append(f"| {name} | {r['kind']} | {r['steps']} | {fmt(s['score'])} ± {fmt(s['score_sem'])} | {fmt(s['colour_acc'])} | "
                     f"{fmt(s['shape_acc'])} | {fmt(s['motion_acc'])} | {fmt(s['object_rate'])} | {c:.3f} |")
    lines += ["", "## The 2-step student against the AR student", "",
              "| variant | DMD 2-step − AR 8 steps | DMD 2-step − AR 2 steps |", "|---|---|---|"]
    lines += dmd_vs_ar_lines(result["comparisons"])
    lines += ["", "± is the standard error of the mean per-video difference (same prompt and seed for every model).", "",
              "## train_dmd wall time", "", "| stage | wall s | steps |", "|---|---|---|"]
    for name, m in result["train_dmd"].items():
        lines.append(f"| train_dmd@{name} | {m.get('wall_time_s', '-')} | {m.get('steps', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "dmd_quality_tiny.json"))
    args = p.parse_args(argv)
    bench = QualityRun(ROOT, "benchmarks/dmd_quality.py", argv, args.threads)
    result: dict = {**bench.head, "chance_score": CHANCE_SCORE, "num_prompts": args.num_prompts,
                    "clip_frames": bench.preset.video.num_frames, "runs": {}, "comparisons": {}, "train_dmd": {}}
    for variant in ("t2v", "i2v"):
        for name, checkpoint, overrides in runs(variant):
            report, cfg, _ = bench.score(name, checkpoint, [variant], overrides=overrides, i2v=variant == "i2v",
                                         num_prompts=args.num_prompts, samples=0)
            result["runs"][name] = {"checkpoint": str(checkpoint.relative_to(ROOT)), "overrides": overrides,
                                    "kind": variant, "steps": len(cfg.inference.denoising_steps),
                                    "score": report[variant]}
        result["comparisons"][variant] = comparisons(result["runs"], variant)
        for student in ("4step", "2step"):
            m = ROOT / "reports/train_dmd" / f"{variant}-{student}" / "metrics.json"
            result["train_dmd"][f"{variant}-{student}"] = json.loads(m.read_text()) if m.is_file() else {}
    print(bench.finish(result, Path(args.out), markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
