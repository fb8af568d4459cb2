"""What the prompt-following benchmarks of the tiny students share (``benchmarks/ar_quality.py``,
``dmd_quality.py``, ``dmd_from_diffusion_ar.py``, ``nvfp4_quality.py``, ``cache_from_last_step.py``): the run's
set-up and provenance, scoring a checkpoint with :func:`longlive.eval.quality.eval_prompt_following` on the
held-out prompts, and the paired DMD-vs-AR comparison."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from longlive.bench.harness import command, cpu_machine, git_commit, now, paired, utc_now, write_results
from longlive.config import Preset, load_preset
from longlive.eval.quality import eval_prompt_following, load_checkpoint


class QualityRun:
    """One benchmark run on the tiny preset: ``threads`` torch threads (1 is fastest for tiny models on shared
    cores), ``root`` (the checkout) as the working directory, the clock started, and ``head``: the provenance
    its result starts with (date, commit, machine, command)."""

    def __init__(self, root: Path, script: str, argv: list[str] | None, threads: int = 1) -> None:
        torch.set_num_threads(threads)
        os.chdir(root)
        self.root, self.preset, self.t0 = root, load_preset("tiny"), now()
        self.head = {"date": utc_now(), "commit": git_commit(root), "machine": cpu_machine(),
                     "command": command(script, sys.argv[1:] if argv is None else argv)}

    def score(self, label: str, checkpoint: Path, kinds: list[str], *, overrides: Sequence[str] = (),
              preset: Preset | None = None, **kwargs) -> tuple[dict, Preset, dict | None]:
        """Load ``checkpoint`` (with ``--set`` ``overrides``) beside ``models/base`` and run ``kinds`` of the
        prompt-following check: (report, the preset it ran with, the checkpoint's trained layout)."""
        t = now()
        models, cfg, ar_config = load_checkpoint(preset or self.preset, checkpoint, self.root / "models/base",
                                                 list(overrides))
        report = eval_prompt_following(models, cfg, kinds, **kwargs)
        scores = [f"{k} {report[k]['score']:.3f}" for k in ("t2v", "i2v") if k in report]
        print(f"{label}: {', '.join(scores + [f'{now() - t:.0f} s'])}", file=sys.stderr, flush=True)
        return report, cfg, ar_config

    def finish(self, result: dict, out: Path, markdown: Callable[[dict], str]) -> str:
        """Record the runtime, write ``out`` (JSON) and its markdown beside it; returns the markdown."""
        result["runtime_s"] = now() - self.t0
        text = markdown(result)
        md = write_results(out, result, text)
        print(f"wrote {out} and {md} in {result['runtime_s']:.0f} s", file=sys.stderr)
        return text


def provenance_lines(result: dict) -> list[str]:
    """The markdown bullets of :attr:`QualityRun.head` and the runtime."""
    return [f"* date: {result['date']}", f"* commit: `{result['commit']}`", f"* machine: {result['machine']}",
            f"* command: `{result['command']}`", f"* runtime: {result['runtime_s']:.0f} s"]


def dmd_vs_ar(many: list[float], two: list[float], dmd: list[float]) -> dict:
    """Per-video scores of the AR student at many and at 2 steps and of the DMD 2-step student -> the paired
    differences DMD - AR with their standard errors."""
    vs_many, vs_many_sem = paired(many, dmd)
    vs_two, vs_two_sem = paired(two, dmd)
    return {"vs_many": vs_many, "vs_many_sem": vs_many_sem, "vs_two": vs_two, "vs_two_sem": vs_two_sem}


def dmd_vs_ar_lines(comparisons: dict) -> list[str]:
    """The table rows of :func:`dmd_vs_ar`'s results, one per variant."""
    return [f"| {v} | {d['vs_many']:+.3f} ± {d['vs_many_sem']:.3f} | {d['vs_two']:+.3f} ± {d['vs_two_sem']:.3f} |"
            for v, d in comparisons.items()]
