"""DMD from an AR student trained as a many-step diffusion model (issue 4's I2V figures).

The pipeline's AR students (`train_ar`, ``timestep_sampling: steps``) draw each block's noise level from the
4-step list, so they already are few-step samplers: at tiny size the I2V one scores the same at 2 steps as at 4
or 8 (``benchmarks/results/dmd_quality_tiny.md``) and leaves DMD nothing to win back at 2 steps. This script
runs the set-up DMD distils in the literature (CausVid, Self-Forcing: a diffusion model that needs many steps ->
a few-step generator): the same `train_ar` with ``timestep_sampling: uniform`` (shifted U(0, 1), every noise
level) from the same base models and shards, then the same `train_dmd` 2-step recipe from that student. On the
same held-out prompts and seeds it scores that AR student with its many-step sampler, with only 2 steps, and
the DMD 2-step student, with paired differences per video.

Needs the DAG's `base` and `encode` outputs (models/base, the shards); writes its models under
``.work/dmd_from_diffusion_ar/`` and ``benchmarks/results/dmd_from_diffusion_ar_tiny.{json,md}``.

    python benchmarks/dmd_from_diffusion_ar.py                  # i2v, ~12 min on one CPU core
    python benchmarks/dmd_from_diffusion_ar.py --variants t2v i2v
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from longlive.bench.harness import fmt
from longlive.bench.quality import QualityRun, dmd_vs_ar, dmd_vs_ar_lines, provenance_lines
from longlive.eval.prompt_following import CHANCE_SCORE
from longlive.models.checkpoint import Checkpoint
from longlive.train.ar import train_ar
from longlive.train.dmd import train_dmd

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / ".work" / "dmd_from_diffusion_ar"
VALIDATION_REPORT = ROOT / "reports" / "validate" / "report.json"  # training reads only shards validate passed


def steps(n: int) -> list[int]:
    """n evenly spaced timesteps from 1000 (before the shift), as the samplers take them."""
    return [round(1000 - i * 1000 / n) for i in range(n)]


def uniform(preset):
    """``preset`` with ``ar.timestep_sampling: uniform``: the AR student trains at every noise level."""
    return preset.model_copy(update={"ar": preset.ar.model_copy(update={"timestep_sampling": "uniform"})})


def train(preset, variant: str) -> tuple[Path, Path, dict]:
    ar_dir, dmd_dir = WORK / "ar" / variant, WORK / "dmd" / f"{variant}-2step"
    metrics = {}
    if Checkpoint.open(ar_dir).trained is None:
        r = train_ar(preset, variant, shards_url=preset.encode.url, validation_report=VALIDATION_REPORT,
                     base_dir=ROOT / "models/base", out_dir=ar_dir,
                     work_dir=WORK / "work/ar" / variant, plots_dir=WORK / "reports/ar" / variant)
        metrics["train_ar"] = r.metrics
    if Checkpoint.open(dmd_dir).trained is None:
        metrics["train_dmd"] = train_dmd(preset, variant, "2step", ar_dir=ar_dir, base_dir=ROOT / "models/base",
                                         validation_report=VALIDATION_REPORT,
                                         out_dir=dmd_dir, work_dir=WORK / "work/dmd" / variant,
                                         plots_dir=WORK / "reports/dmd" / variant)
    return ar_dir, dmd_dir, metrics


def markdown(result: dict) -> str:
    c = result["chance_score"]
    lines = [
        "# DMD from a many-step (diffusion) AR student, tiny preset", "", *provenance_lines(result),
        "* AR student: `train_ar` with `ar.timestep_sampling: uniform` (every noise level), otherwise the tiny preset's "
        "recipe; DMD student: `train_dmd` 2-step from it, the tiny preset's recipe",
        f"* {result['num_prompts']} held-out prompts per model, one {result['clip_frames']}-frame video each, same "
        f"seeds for every model; score = mean(colour acc, shape acc, motion ok); chance {c:.3f}", "",
        "| model | steps | score ± sem | colour | shape | motion | object |", "|---|---|---|---|---|---|---|",
    ]
    for name, r in result["runs"].items():
        s = r["score"]
        lines.append(f"| {name} | {r['steps']} | {fmt(s['score'])} ± {fmt(s['score_sem'])} | {fmt(s['colour_acc'])} | "
                     f"{fmt(s['shape_acc'])} | {fmt(s['motion_acc'])} | {fmt(s['object_rate'])} |")
    lines += ["", "## The DMD 2-step student against its AR student (paired per video)", "",
              "| variant | DMD 2-step − AR many steps | DMD 2-step − AR 2 steps |", "|---|---|---|"]
    lines += dmd_vs_ar_lines(result["comparisons"])
    lines += ["", "± is the standard error of the mean per-video difference (same prompt and seed)."]
    if result.get("training"):
        lines += ["", "## Training wall time", "", "| stage | wall s |", "|---|---|"]
        for name, m in result["training"].items():
            lines.append(f"| {name} | {m.get('wall_time_s', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["i2v"], choices=["t2v", "i2v"])
    p.add_argument("--many", type=int, default=16, help="steps of the AR student's many-step run (default 16)")
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "dmd_from_diffusion_ar_tiny.json"))
    args = p.parse_args(argv)
    bench = QualityRun(ROOT, "benchmarks/dmd_from_diffusion_ar.py", argv, args.threads)
    preset = uniform(bench.preset)
    result: dict = {**bench.head, "chance_score": CHANCE_SCORE, "num_prompts": args.num_prompts,
                    "clip_frames": preset.video.num_frames, "runs": {}, "comparisons": {}, "training": {}}
    for variant in args.variants:
        ar_dir, dmd_dir, metrics = train(preset, variant)
        for stage, m in metrics.items():
            result["training"][f"{stage}@{variant}"] = m
        runs = [(f"AR {variant} (uniform), {args.many} steps", ar_dir, [f"denoising_steps={json.dumps(steps(args.many))}"]),
                (f"AR {variant} (uniform), 4 steps", ar_dir, [f"denoising_steps={json.dumps(steps(4))}"]),
                (f"AR {variant} (uniform), 2 steps", ar_dir, [f"denoising_steps={json.dumps(steps(2))}"]),
                (f"DMD {variant} 2-step (from it)", dmd_dir, [])]
        rows = {}
        for name, checkpoint, overrides in runs:
            report, cfg, _ = bench.score(name, checkpoint, [variant], overrides=overrides, preset=preset,
                                         i2v=variant == "i2v", num_prompts=args.num_prompts, samples=0)
            result["runs"][name] = {"checkpoint": str(checkpoint.relative_to(ROOT)), "overrides": overrides,
                                    "steps": len(cfg.inference.denoising_steps),
                                    "score": {k: v for k, v in report[variant].items() if k != "rows"}}
            rows[name] = [r["score"] for r in report[variant]["rows"]]
        result["comparisons"][variant] = dmd_vs_ar(rows[runs[0][0]], rows[runs[2][0]], rows[runs[-1][0]])
    print(bench.finish(result, Path(args.out), markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
