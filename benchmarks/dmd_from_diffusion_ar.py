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
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

from longlive.config import load_preset
from longlive.eval.prompt_following import CHANCE_SCORE
from longlive.eval.quality import evaluate, load_checkpoint
from longlive.models.checkpoint import Checkpoint
from longlive.train.ar import train_ar
from longlive.train.dmd import train_dmd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ar_quality import commit, f, machine, write_results  # noqa: E402  (same folder: shared provenance helpers)
from dmd_quality import compare, comparison_lines  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / ".work" / "dmd_from_diffusion_ar"
VALIDATION_REPORT = ROOT / "reports" / "validate" / "report.json"  # training reads only shards validate passed


def steps(n: int) -> list[int]:
    """n evenly spaced timesteps from 1000 (before the shift), as the samplers take them."""
    return [round(1000 - i * 1000 / n) for i in range(n)]


def uniform_preset():
    preset = load_preset("tiny")
    ar = preset.ar.model_copy(update={"timestep_sampling": "uniform"})
    return preset.model_copy(update={"ar": ar})


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
        "# DMD from a many-step (diffusion) AR student, tiny preset", "",
        f"* date: {result['date']}", f"* commit: `{result['commit']}`", f"* machine: {result['machine']}",
        f"* command: `{result['command']}`", f"* runtime: {result['runtime_s']:.0f} s",
        "* AR student: `train_ar` with `ar.timestep_sampling: uniform` (every noise level), otherwise the tiny preset's "
        "recipe; DMD student: `train_dmd` 2-step from it, the tiny preset's recipe",
        f"* {result['num_prompts']} held-out prompts per model, one {result['clip_frames']}-frame video each, same "
        f"seeds for every model; score = mean(colour acc, shape acc, motion ok); chance {c:.3f}", "",
        "| model | steps | score ± sem | colour | shape | motion | object |", "|---|---|---|---|---|---|---|",
    ]
    for name, r in result["runs"].items():
        s = r["score"]
        lines.append(f"| {name} | {r['steps']} | {f(s['score'])} ± {f(s['score_sem'])} | {f(s['colour_acc'])} | "
                     f"{f(s['shape_acc'])} | {f(s['motion_acc'])} | {f(s['object_rate'])} |")
    lines += ["", "## The DMD 2-step student against its AR student (paired per video)", "",
              "| variant | DMD 2-step − AR many steps | DMD 2-step − AR 2 steps |", "|---|---|---|"]
    lines += comparison_lines(result["comparisons"])
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
    torch.set_num_threads(args.threads)
    os.chdir(ROOT)
    preset = uniform_preset()
    t0 = time.perf_counter()
    result: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(), "machine": machine(), "chance_score": CHANCE_SCORE,
        "command": " ".join(["python", "benchmarks/dmd_from_diffusion_ar.py", *(argv if argv is not None else sys.argv[1:])]),
        "num_prompts": args.num_prompts, "clip_frames": preset.video.num_frames, "runs": {}, "comparisons": {},
        "training": {},
    }
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
            t = time.perf_counter()
            models, cfg, _ = load_checkpoint(preset, checkpoint, ROOT / "models/base", overrides)
            report = evaluate(models, cfg, [variant], i2v=variant == "i2v", num_prompts=args.num_prompts, samples=0)
            result["runs"][name] = {"checkpoint": str(checkpoint.relative_to(ROOT)), "overrides": overrides,
                                    "steps": len(cfg.inference.denoising_steps),
                                    "score": {k: v for k, v in report[variant].items() if k != "rows"}}
            rows[name] = [r["score"] for r in report[variant]["rows"]]
            print(f"{name}: {report[variant]['score']:.3f} ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
        result["comparisons"][variant] = compare(rows[runs[0][0]], rows[runs[2][0]], rows[runs[-1][0]])
    result["runtime_s"] = time.perf_counter() - t0
    write_results(result, Path(args.out), markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
