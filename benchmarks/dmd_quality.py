"""Prompt following of the DMD students against their AR students (issue 4's closing figures).

For each variant (t2v, i2v): the AR student with its training step list (4 steps), with many steps
(8, the reference "many steps" run) and with only 2 steps, and the DMD 4-step and 2-step students, all
on the same held-out prompts and seeds (:func:`longlive.eval.quality.evaluate`), plus the wall time of
each train_dmd stage from its metrics. Writes ``benchmarks/results/dmd_quality_tiny.json`` and ``.md``.

    python benchmarks/dmd_quality.py            # ~5 min on 2 shared CPU cores
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ar_quality import commit, f, machine, write_results  # noqa: E402  (same folder: shared provenance helpers)
from cache_from_last_step import paired  # noqa: E402

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
    return compare(rows(f"AR {variant}, 8 steps"), rows(f"AR {variant}, 2 steps"), rows(f"DMD {variant} 2-step"))


def compare(many: list[float], two: list[float], dmd: list[float]) -> dict:
    """Per-video scores of the AR student at many and at 2 steps and of the DMD 2-step student -> the paired
    differences DMD - AR with their standard errors."""
    vs_many, vs_many_sem = paired(many, dmd)
    vs_two, vs_two_sem = paired(two, dmd)
    return {"vs_many": vs_many, "vs_many_sem": vs_many_sem, "vs_two": vs_two, "vs_two_sem": vs_two_sem}


def comparison_lines(comparisons: dict) -> list[str]:
    """The table rows of :func:`compare`'s results, one per variant."""
    return [f"| {v} | {d['vs_many']:+.3f} ± {d['vs_many_sem']:.3f} | {d['vs_two']:+.3f} ± {d['vs_two_sem']:.3f} |"
            for v, d in comparisons.items()]


def markdown(result: dict) -> str:
    c = result["chance_score"]
    lines = [
        "# DMD students vs AR students, tiny preset", "",
        f"* date: {result['date']}", f"* commit: `{result['commit']}`", f"* machine: {result['machine']}",
        f"* command: `{result['command']}`", f"* runtime: {result['runtime_s']:.0f} s",
        f"* {result['num_prompts']} held-out prompts per variant, one {result['clip_frames']}-frame video each, "
        f"same seeds for every model; score = mean(colour acc, shape acc, motion ok); chance {c:.3f}", "",
        "| model | eval | steps | score ± sem | colour | shape | motion | object | chance |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["runs"].items():
        s = r["score"]
        lines.append(f"| {name} | {r['kind']} | {r['steps']} | {f(s['score'])} ± {f(s['score_sem'])} | {f(s['colour_acc'])} | "
                     f"{f(s['shape_acc'])} | {f(s['motion_acc'])} | {f(s['object_rate'])} | {c:.3f} |")
    lines += ["", "## The 2-step student against the AR student", "",
              "| variant | DMD 2-step − AR 8 steps | DMD 2-step − AR 2 steps |", "|---|---|---|"]
    lines += comparison_lines(result["comparisons"])
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
    torch.set_num_threads(args.threads)
    os.chdir(ROOT)
    preset = load_preset("tiny")
    t0 = time.perf_counter()
    result: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(), "machine": machine(), "chance_score": CHANCE_SCORE,
        "command": " ".join(["python", "benchmarks/dmd_quality.py", *(argv if argv is not None else sys.argv[1:])]),
        "num_prompts": args.num_prompts, "clip_frames": preset.video.num_frames, "runs": {}, "comparisons": {},
        "train_dmd": {},
    }
    for variant in ("t2v", "i2v"):
        for name, checkpoint, overrides in runs(variant):
            t = time.perf_counter()
            models, cfg, ar_config = load_checkpoint(preset, checkpoint, ROOT / "models/base", overrides)
            report = evaluate(models, cfg, [variant], i2v=variant == "i2v", num_prompts=args.num_prompts, samples=0)
            result["runs"][name] = {"checkpoint": str(checkpoint.relative_to(ROOT)), "overrides": overrides,
                                    "kind": variant, "steps": len(cfg.inference.denoising_steps),
                                    "score": report[variant]}
            print(f"{name}: {report[variant]['score']:.3f} ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
        result["comparisons"][variant] = comparisons(result["runs"], variant)
        for student in ("4step", "2step"):
            m = ROOT / "reports/train_dmd" / f"{variant}-{student}" / "metrics.json"
            result["train_dmd"][f"{variant}-{student}"] = json.loads(m.read_text()) if m.is_file() else {}
    result["runtime_s"] = time.perf_counter() - t0
    write_results(result, Path(args.out), markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
