"""Prompt-following benchmark of the tiny AR students (issue 3's closing figures).

Runs :func:`longlive.eval.quality.evaluate` on ``models/ar/t2v`` and ``models/ar/i2v``, and as reference
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
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from longlive.config import load_preset
from longlive.eval.perf import cpu_name
from longlive.eval.prompt_following import CHANCE_SCORE, MATCH_CHANCE
from longlive.eval.quality import (
    DRIFT_SETTINGS, HELDOUT_START, eval_references, evaluate, heldout_prompts, load_checkpoint, write_json,
)
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


def machine() -> str:
    return f"CPU: {cpu_name()}, {os.cpu_count()} cores visible, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return head + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_results(result: dict, out: Path, markdown_text: str) -> Path:
    """``result`` as JSON at ``out`` and ``markdown_text`` beside it (``.md``), each written atomically."""
    write_json(result, out)
    md = out.with_suffix(".md")
    tmp = md.with_name(f".{md.name}.tmp")
    tmp.write_text(markdown_text)
    os.replace(tmp, md)
    return md


def f(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(result: dict) -> str:
    c = result["chance_score"]
    lines = [
        "# AR prompt following, tiny preset", "",
        f"* date: {result['date']}", f"* commit: `{result['commit']}`", f"* machine: {result['machine']}",
        f"* command: `{result['command']}`", f"* runtime: {result['runtime_s']:.0f} s",
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
        lines.append(f"| {name} | {kind} | {r['n']} | {f(r['score'])} ± {f(r['score_sem'])} | {f(r['colour_acc'])} | "
                     f"{f(r['shape_acc'])} | {f(r['motion_acc'])} | {f(r['match_rate'])} | {f(r['object_rate'])} | "
                     f"{f(after)} | {c:.3f} |")
    lines += ["", "## Multi-shot (cut at the mid-point block boundary)", "",
              "switched = fraction of videos whose second caption's colour and shape show for two consecutive frames "
              "after the cut; delay = frames until then; stuck = second-shot frames still matching shot 1.", "",
              "| model | n | score | shot 1 score (colour/shape/motion) | shot 2 score (colour/shape/motion) | "
              "switched | delay (frames) | stuck on shot 1 | chance |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        if "multishot" in r:
            m = r["multishot"]
            shots = [f"{f(s['score'])} ({f(s['colour_acc'], 2)}/{f(s['shape_acc'], 2)}/{f(s['motion_acc'], 2)})" for s in m["shots"]]
            lines.append(f"| {name} | {m['n']} | {f(m['score'])} | {shots[0]} | {shots[1]} | {f(m['transition_rate'], 2)} | "
                         f"{f(m['transition_delay_frames'], 1)} | {f(m['stuck_rate'], 2)} | {c:.3f} |")
    lines += ["", "## Long-video drift (per segment of one training clip)", "",
              "switch: the prompt's motion changes every training clip (same object, in-shot switch); single: one "
              "prompt. mean ± sem over videos; slope = least-squares change of the segment score per segment; "
              "cache: max KiB over the video (over the first clip).", "",
              "| model | setting | mean | first | last | min | slope / segment | match mean | segments > chance | "
              "cache KiB max (first clip) | chance |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        for setting, d in r.get("drift", {}).items():
            lines.append(f"| {name} | {setting} | {f(d['mean'])} ± {f(d['mean_sem'])} | {f(d['first'])} | {f(d['last'])} | {f(d['min'])} | "
                         f"{f(d['slope'], 4)} | {f(d['match_mean'])} | {f(d['segments_above_chance'], 2)} | "
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
    torch.set_num_threads(args.threads)
    os.chdir(ROOT)
    preset = load_preset("tiny")
    out = Path(args.out)
    samples_dir = out.with_name(out.stem + "_samples")
    t0 = time.perf_counter()
    result: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(), "machine": machine(),
        "command": " ".join(["python", "benchmarks/ar_quality.py", *(argv if argv is not None else sys.argv[1:])]),
        "chance_score": CHANCE_SCORE, "match_chance": MATCH_CHANCE,
        "settings": {"clip_frames": preset.video.num_frames, "num_prompts": args.num_prompts, "num_multishot": args.num_multishot, "num_drift": args.num_drift,
                     "length_factor": args.length_factor, "drift_settings": [s[0] for s in DRIFT_SETTINGS]},
        "runs": {},
    }
    for run in runs():
        t = time.perf_counter()
        models, cfg_preset, ar_config = load_checkpoint(preset, run["checkpoint"], ROOT / "models/base", run["set"])
        report = evaluate(models, cfg_preset, run["kinds"], i2v=run["i2v"], num_prompts=args.num_prompts,
                          num_multishot=args.num_multishot, num_drift=args.num_drift, length_factor=args.length_factor,
                          drift_settings=run["drift"],
                          out_dir=samples_dir / run["name"].split(" (")[0].replace(" ", "_") if run["samples"] else None,
                          samples=run["samples"])
        result["runs"][run["name"]] = {"checkpoint": str(run["checkpoint"].relative_to(ROOT)), "overrides": run["set"],
                                       "ar_config": ar_config, **report}
        print(f"{run['name']}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    models, cfg_preset, _ = load_checkpoint(preset, ROOT / "models/ar/t2v", ROOT / "models/base")
    result["references"] = eval_references(models, cfg_preset, heldout_prompts(preset, args.num_prompts))
    result["runtime_s"] = time.perf_counter() - t0
    md = write_results(result, out, markdown(result))
    print(f"wrote {out} and {md} in {result['runtime_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
