"""Prompt following of NVFP4 students against their bf16 selves on more prompts than the quantize stage.

The ``quantize`` stage scores bf16, NVFP4 and NVFP4 + NVFP4 KV cache on ``quant.quality_prompts`` held-out
prompts (tiny: 24, a standard error of about 0.04). This benchmark repeats that comparison on more prompts
(default 96, same seeds for every model) for the students named, from the checkpoints ``dvc repro`` left in
``models/dmd`` and ``models/nvfp4``. Writes ``benchmarks/results/nvfp4_quality_tiny.json`` and ``.md``.

    python benchmarks/nvfp4_quality.py t2v-2step t2v-2step-qat     # ~2 min per model on one CPU core
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from longlive.bench.harness import fmt
from longlive.bench.quality import QualityRun, provenance_lines
from longlive.eval.prompt_following import CHANCE_SCORE
from longlive.models.checkpoint import Checkpoint

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = (("bf16", "models/dmd", "dense"), ("nvfp4", "models/nvfp4", "dense"), ("nvfp4_kv", "models/nvfp4", "nvfp4"))


def markdown(result: dict) -> str:
    lines = [
        "# NVFP4 students vs bf16, tiny preset", "", *provenance_lines(result),
        f"* {result['num_prompts']} held-out prompts per model, same seeds for every model; chance {CHANCE_SCORE:.3f}",
        "", "| student | bf16 | NVFP4 W4A4 | NVFP4 W4A4 + NVFP4 KV | W4A4 − bf16 | + KV − bf16 |", "|---|---|---|---|---|---|",
    ]
    for name, r in result["students"].items():
        s = {k: r[k]["score"] for k in ("bf16", "nvfp4", "nvfp4_kv")}
        e = {k: r[k]["score_sem"] for k in ("bf16", "nvfp4", "nvfp4_kv")}
        d = lambda k: f"{s[k] - s['bf16']:+.3f} ± {math.hypot(e[k], e['bf16']):.3f}"  # noqa: E731
        lines.append(f"| {name} | {fmt(s['bf16'])} ± {fmt(e['bf16'])} | {fmt(s['nvfp4'])} ± {fmt(e['nvfp4'])} | "
                     f"{fmt(s['nvfp4_kv'])} ± {fmt(e['nvfp4_kv'])} | {d('nvfp4')} | {d('nvfp4_kv')} |")
    lines += ["", "± of a difference: sqrt(sem_a² + sem_b²), as if independent; the models share prompts and seeds, "
              "so this overstates the noise of the difference."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("students", nargs="+", help="names under models/dmd and models/nvfp4, e.g. t2v-2step")
    p.add_argument("--num-prompts", type=int, default=96)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "nvfp4_quality_tiny.json"))
    args = p.parse_args(argv)
    bench = QualityRun(ROOT, "benchmarks/nvfp4_quality.py", argv, args.threads)
    preset = bench.preset
    result: dict = {**bench.head, "num_prompts": args.num_prompts, "students": {}}
    for student in args.students:
        row = result["students"][student] = {}
        for name, root, kv in CONFIGS:
            checkpoint = ROOT / root / student
            if not checkpoint.is_dir():
                sys.exit(f"{checkpoint} not found: run `dvc repro quantize@{student}` first")
            p_kv = preset.model_copy(update={"quant": preset.quant.model_copy(update={"kv_cache": kv})})
            kind = "i2v" if (Checkpoint.open(checkpoint).trained or {}).get("i2v") else "t2v"
            report, _, _ = bench.score(f"{student} {name}", checkpoint, [kind], preset=p_kv, i2v=kind == "i2v",
                                       num_prompts=args.num_prompts, samples=0)
            row[name] = {"checkpoint": str(checkpoint.relative_to(ROOT)), "kv_cache": kv, **report[kind]}
    print(bench.finish(result, Path(args.out), markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
