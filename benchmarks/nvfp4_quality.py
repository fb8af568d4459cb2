"""Prompt following of NVFP4 students against their bf16 selves on more prompts than the quantize stage.

The ``quantize`` stage scores bf16, NVFP4 and NVFP4 + NVFP4 KV cache on ``quant.quality_prompts`` held-out
prompts (tiny: 24, a standard error of about 0.04). This benchmark repeats that comparison on more prompts
(default 96, same seeds for every model) for the students named, from the checkpoints ``dvc repro`` left in
``models/dmd`` and ``models/nvfp4``. Writes ``benchmarks/results/nvfp4_quality_tiny.json`` and ``.md``.

    python benchmarks/nvfp4_quality.py t2v-2step t2v-2step-qat     # ~2 min per model on one CPU core
"""

from __future__ import annotations

import argparse
import datetime
import math
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

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = (("bf16", "models/dmd", "dense"), ("nvfp4", "models/nvfp4", "dense"), ("nvfp4_kv", "models/nvfp4", "nvfp4"))


def markdown(result: dict) -> str:
    lines = [
        "# NVFP4 students vs bf16, tiny preset", "",
        f"* date: {result['date']}", f"* commit: `{result['commit']}`", f"* machine: {result['machine']}",
        f"* command: `{result['command']}`", f"* runtime: {result['runtime_s']:.0f} s",
        f"* {result['num_prompts']} held-out prompts per model, same seeds for every model; chance {CHANCE_SCORE:.3f}",
        "", "| student | bf16 | NVFP4 W4A4 | NVFP4 W4A4 + NVFP4 KV | W4A4 − bf16 | + KV − bf16 |", "|---|---|---|---|---|---|",
    ]
    for name, r in result["students"].items():
        s = {k: r[k]["score"] for k in ("bf16", "nvfp4", "nvfp4_kv")}
        e = {k: r[k]["score_sem"] for k in ("bf16", "nvfp4", "nvfp4_kv")}
        d = lambda k: f"{s[k] - s['bf16']:+.3f} ± {math.hypot(e[k], e['bf16']):.3f}"  # noqa: E731
        lines.append(f"| {name} | {f(s['bf16'])} ± {f(e['bf16'])} | {f(s['nvfp4'])} ± {f(e['nvfp4'])} | "
                     f"{f(s['nvfp4_kv'])} ± {f(e['nvfp4_kv'])} | {d('nvfp4')} | {d('nvfp4_kv')} |")
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
    torch.set_num_threads(args.threads)
    os.chdir(ROOT)
    preset = load_preset("tiny")
    t0 = time.perf_counter()
    result: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(), "machine": machine(), "num_prompts": args.num_prompts, "students": {},
        "command": " ".join(["python", "benchmarks/nvfp4_quality.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    for student in args.students:
        row = result["students"][student] = {}
        for name, root, kv in CONFIGS:
            checkpoint = ROOT / root / student
            if not checkpoint.is_dir():
                sys.exit(f"{checkpoint} not found: run `dvc repro quantize@{student}` first")
            p_kv = preset.model_copy(update={"quant": preset.quant.model_copy(update={"kv_cache": kv})})
            t = time.perf_counter()
            models, cfg, ar_config = load_checkpoint(p_kv, checkpoint, ROOT / "models/base")
            kind = "i2v" if (ar_config or {}).get("i2v") else "t2v"
            r = evaluate(models, cfg, [kind], i2v=kind == "i2v", num_prompts=args.num_prompts, samples=0)[kind]
            row[name] = {"checkpoint": str(checkpoint.relative_to(ROOT)), "kv_cache": kv, **r}
            print(f"{student} {name}: {r['score']:.3f} ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
    result["runtime_s"] = time.perf_counter() - t0
    write_results(result, Path(args.out), markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
