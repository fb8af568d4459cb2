"""Prompt-following benchmark of the tiny AR students (issue 3's closing figures).

Runs :func:`longlive.eval.quality.eval_prompt_following` on ``models/ar/t2v`` and ``models/ar/i2v``, and as reference
points the base teacher used block by block with the students' layout and steps, the teacher sampling the
whole clip as one block (bidirectional, as it was trained) with the same 4 steps and with 20 Euler steps,
and the model-free references (held-out clips, their VAE reconstructions, the I2V image held still).
Diagnostics: the students' drift without the sink at the same number of held frames as with it
(sink 0 + window 4 against sink 1 + window 3), and T2V with 8 steps or classifier-free guidance 3.
Writes ``benchmarks/results/ar_quality_tiny.json`` and ``.md`` (every figure beside ``CHANCE_SCORE``), and
a few sample mp4s of the students in ``benchmarks/results/ar_quality_tiny_samples/``.

    python benchmarks/ar_quality.py            # ~5-8 min on 2 shared CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from longlive.bench.harness import fmt
from longlive.bench.quality import QualityRun, provenance_lines
from longlive.config import load_preset
from longlive.eval.prompt_following import CHANCE_SCORE, MATCH_CHANCE
from longlive.eval.quality import DRIFT_SETTINGS, HELDOUT_START, eval_references, heldout_prompts, load_checkpoint
from longlive.models.checkpoint import Checkpoint

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
LAYOUT = ("block_frames", "independent_first_frame", "denoising_steps", "timestep_shift")
EULER_20 = [1000 - 50 * i for i in range(20)]
RENOISE_8 = [1000 - 125 * i for i in range(8)]


def layout_of(checkpoint: Path) -> list[str]:
    """``--set`` overrides that give another model a student's block layout and step list."""
    ar = Checkpoint.open(checkpoint).trained
    return [f"{k}={json.dumps(ar[k])}" for k in LAYOUT]


def run(name: str, checkpoint: Path, overrides: list[str], kinds: list[str], *, image: bool = False,
        samples: int = 0, drift: tuple = DRIFT_SETTINGS) -> dict:
    return {"name": name, "checkpoint": checkpoint, "set": overrides, "kinds": kinds, "i2v": image,
            "samples": samples, "drift": drift}


def runs() -> list[dict]:
    """Every model run: name, checkpoint, ``--set`` overrides, kinds, I2V, sample videos, drift settings."""
    t2v, i2v, teacher = ROOT / "models/ar/t2v", ROOT / "models/ar/i2v", ROOT / "models/base/dit"
    clip_latents = 1 + (load_preset("tiny").video.num_frames - 1) // 4
    whole = [f"block_frames={clip_latents}"]
    sink_off = tuple(s for s in DRIFT_SETTINGS if not s[2])
    return [
        run("student t2v", t2v, [], ["t2v", "multishot", "drift"], samples=1),
        run("student i2v", i2v, [], ["i2v", "multishot", "drift"], image=True, samples=1),
        # the reference points: the base teacher with the students' blocks and steps, and as it was trained
        run("teacher block-by-block (t2v layout)", teacher, layout_of(t2v), ["t2v", "multishot"]),
        run("teacher block-by-block (i2v layout)", teacher, layout_of(i2v), ["i2v", "multishot"], image=True),
        run("teacher whole clip, 4 steps", teacher, layout_of(t2v) + whole, ["t2v"]),
        run("teacher whole clip, euler 20 steps", teacher,
            layout_of(t2v) + whole + ["sampler=euler", f"denoising_steps={json.dumps(EULER_20)}"], ["t2v"]),
        # diagnostics: sink off at the same number of held frames as sink 1 + window 3 (0 + 4), and sampling knobs
        run("student t2v, window 4", t2v, ["window_frames=4"], ["drift"], drift=sink_off),
        run("student i2v, window 4", i2v, ["window_frames=4"], ["drift"], image=True, drift=sink_off),
        run("student t2v, 8 steps", t2v, [f"denoising_steps={json.dumps(RENOISE_8)}"], ["t2v"]),
        run("student t2v, cfg 3", t2v, ["guidance_scale=3"], ["t2v"]),
    ]


def markdown(result: dict) -> str:
    c = result["chance_score"]
    lines = [
        "# AR prompt following, tiny preset", "", *provenance_lines(result),
        f"* held-out prompts: synth clips >= {HELDOUT_START}, balanced over colours/shapes/motions; "
        f"{result['settings']['num_prompts']} T2V/I2V, {result['settings']['num_multishot']} multi-shot, "
        f"{result['settings']['num_drift']} drift videos per setting of {result['settings']['length_factor']} training clips",
        f"* chance: score **{c:.3f}** (CHANCE_SCORE), colour+shape match {result['match_chance']:.3f} (MATCH_CHANCE)", "",
        f"## Single clip ({result['settings'].get('clip_frames', '?')} frames)", "",
        "score = mean(colour acc, shape acc, motion ok) per video; match = frames with colour and shape both right; "
        "object = frames with a detected object; I2V's frame 0 is the image, so 'after frame 0' scores only generated "
        "frames. References: the held-out clips, their VAE reconstructions, the I2V image held still.", "",
        "| model | eval | n | score ± sem | colour | shape | motion | match | object | score after frame 0 | chance |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [(name, kind, r[kind]) for name, r in result["runs"].items() for kind in ("t2v", "i2v") if kind in r]
    rows += [(f"reference: {k}", "-", v) for k, v in result["references"].items()]
    for name, kind, r in rows:
        after = r.get("after_first", {}).get("score")
        lines.append(f"| {name} | {kind} | {r['n']} | {fmt(r['score'])} ± {fmt(r['score_sem'])} | {fmt(r['colour_acc'])} | "
                     f"{fmt(r['shape_acc'])} | {fmt(r['motion_acc'])} | {fmt(r['match_rate'])} | {fmt(r['object_rate'])} | "
                     f"{fmt(after)} | {c:.3f} |")
    lines += ["", "## Multi-shot (cut at the mid-point block boundary)", "",
              "switched = fraction of videos whose second caption's colour and shape show for two consecutive frames "
              "after the cut; delay = frames until then; stuck = second-shot frames still matching shot 1.", "",
              "| model | n | score | shot 1 score (colour/shape/motion) | shot 2 score (colour/shape/motion) | "
              "switched | delay (frames) | stuck on shot 1 | chance |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        if "multishot" in r:
            m = r["multishot"]
            shots = [f"{fmt(s['score'])} ({fmt(s['colour_acc'], '.2f')}/{fmt(s['shape_acc'], '.2f')}/{fmt(s['motion_acc'], '.2f')})" for s in m["shots"]]
            lines.append(f"| {name} | {m['n']} | {fmt(m['score'])} | {shots[0]} | {shots[1]} | {fmt(m['transition_rate'], '.2f')} | "
                         f"{fmt(m['transition_delay_frames'], '.1f')} | {fmt(m['stuck_rate'], '.2f')} | {c:.3f} |")
    lines += ["", "## Long-video drift (per segment of one training clip)", "",
              "switch: the prompt's motion changes every training clip (same object, in-shot switch); single: one "
              "prompt. mean ± sem over videos; slope = least-squares change of the segment score per segment; "
              "cache: max KiB over the video (over the first clip).", "",
              "| model | setting | mean | first | last | min | slope / segment | match mean | segments > chance | "
              "cache KiB max (first clip) | chance |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        for setting, d in r.get("drift", {}).items():
            lines.append(f"| {name} | {setting} | {fmt(d['mean'])} ± {fmt(d['mean_sem'])} | {fmt(d['first'])} | {fmt(d['last'])} | {fmt(d['min'])} | "
                         f"{fmt(d['slope'], '.4f')} | {fmt(d['match_mean'])} | {fmt(d['segments_above_chance'], '.2f')} | "
                         f"{d['cache_bytes_max'] / 1024:.0f} ({d['cache_bytes_first_clip'] / 1024:.0f}) | {c:.3f} |")
    lines += ["", "Per-segment curves, per-prompt rows and motion confusion matrices are in the JSON.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--num-multishot", type=int, default=24)
    p.add_argument("--num-drift", type=int, default=4)
    p.add_argument("--length-factor", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest for tiny models on shared cores)")
    p.add_argument("--out", default=str(RESULTS / "ar_quality_tiny.json"))
    args = p.parse_args(argv)
    bench = QualityRun(ROOT, "benchmarks/ar_quality.py", argv, args.threads)
    out = Path(args.out)
    samples_dir = out.with_name(out.stem + "_samples")
    result: dict = {
        **bench.head, "chance_score": CHANCE_SCORE, "match_chance": MATCH_CHANCE,
        "settings": {"clip_frames": bench.preset.video.num_frames, "num_prompts": args.num_prompts,
                     "num_multishot": args.num_multishot, "num_drift": args.num_drift,
                     "length_factor": args.length_factor, "drift_settings": [s[0] for s in DRIFT_SETTINGS]},
        "runs": {},
    }
    for run in runs():
        report, _, ar_config = bench.score(
            run["name"], run["checkpoint"], run["kinds"], overrides=run["set"], i2v=run["i2v"],
            num_prompts=args.num_prompts, num_multishot=args.num_multishot, num_drift=args.num_drift,
            length_factor=args.length_factor, drift_settings=run["drift"], samples=run["samples"],
            out_dir=samples_dir / run["name"].split(" (")[0].replace(" ", "_") if run["samples"] else None)
        result["runs"][run["name"]] = {"checkpoint": str(run["checkpoint"].relative_to(ROOT)), "overrides": run["set"],
                                       "ar_config": ar_config, **report}
    models, cfg_preset, _ = load_checkpoint(bench.preset, ROOT / "models/ar/t2v", ROOT / "models/base")
    result["references"] = eval_references(models, cfg_preset, heldout_prompts(bench.preset, args.num_prompts))
    bench.finish(result, out, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
