"""Quality cost of an inference speed option on the tiny students (issue 6): ``inference.cache_from_last_step``
(the default), ``--option fp8_attention``, ``--option decoder`` (light vs VAE) or ``--option fastest`` (the
fastest streamed variant: row-wise FP8 linears + cuDNN FP8 self-attention + the cache written by the last step).

Writing the KV cache during the last denoising step saves one forward per block (5 -> 4 at 4 steps, 3 -> 2 at
2 steps), but the cache then holds K/V computed from the last step's *noisy* input at its timestep instead of
the clean block at t=0 (what the students were trained to read). This runs the built-in prompt-following
check (:func:`longlive.eval.quality.eval_prompt_following`) on the same held-out prompts and seeds with the option off and
on, and reports per-evaluation scores and the paired difference (per video, same seed) with its standard error.

    python benchmarks/cache_from_last_step.py --models models     # ~5 min on 2 shared CPU cores
    python benchmarks/cache_from_last_step.py --option fp8_attention --checkpoint dmd/t2v-2step
    python benchmarks/cache_from_last_step.py --option fp8_attention --on cudnn --checkpoint dmd/t2v-2step
    python benchmarks/cache_from_last_step.py --option fastest --checkpoint dmd/t2v-2step

``fp8_attention`` on the CPU runs the 8-bit attention's float32 reference (``kernels/fp8_attention_ref.py``),
the same numbers as the GPU kernel up to its online softmax. Writes
``benchmarks/results/<option>_tiny[_<checkpoint>].{json,md}``. ``--option decoder`` compares the VAE's decode with
the light decoder's (``models/light_decoder``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from longlive.bench.harness import paired, write_results  # noqa: E402
from longlive.config import load_preset  # noqa: E402
from longlive.eval.quality import DRIFT_SETTINGS, eval_prompt_following, load_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DRIFT = tuple(s for s in DRIFT_SETTINGS if s[0] in ("single sink=on", "switch sink=on recache=on"))


VALUES = {"cache_from_last_step": ("false", "true"), "fp8_attention": ("off", "triton"), "decoder": ("vae", "light")}
# --option fastest: every speed option of `longlive bench`'s fastest 2-step row at once, against none of them
FASTEST = ("fp8=true", "fp8_attention=cudnn", "cache_from_last_step=true")


def settings(option: str, on_value: str | None) -> tuple[tuple[str, str], list[str], list[str]]:
    """(off and on labels, the off run's ``--set`` overrides, the on run's)."""
    if option == "fastest":
        return ("none", "all"), [], list(FASTEST)
    values = (VALUES[option][0], on_value or VALUES[option][1])
    return values, [f"{option}={values[0]}"], [f"{option}={values[1]}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=str(ROOT / "models"), help="folder with ar/t2v and base/")
    ap.add_argument("--option", default="cache_from_last_step", choices=[*VALUES, "fastest"],
                    help="the inference option compared off vs on (decoder: vae vs light)")
    ap.add_argument("--on", help="the option's 'on' value (default: true; fp8_attention: triton, or cudnn)")
    ap.add_argument("--checkpoint", default="ar/t2v", help="the student under --models")
    ap.add_argument("--num-prompts", type=int, default=120)  # every caption of the held-out design once
    ap.add_argument("--num-multishot", type=int, default=32)
    ap.add_argument("--num-drift", type=int, default=6)
    ap.add_argument("--length-factor", type=int, default=6)
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks/results"))
    args = ap.parse_args()
    if args.option == "fastest" and args.on is not None:
        ap.error("--on sets one option's value; --option fastest turns on all of " + ", ".join(FASTEST))
    values, off_set, on_set = settings(args.option, args.on)
    torch.set_num_threads(1)
    models_dir = Path(args.models)
    preset = load_preset("tiny")
    t0 = time.perf_counter()
    reports = {}
    for on in (False, True):
        models, cfg_preset, ar = load_checkpoint(preset, models_dir / args.checkpoint, models_dir / "base",
                                                 on_set if on else off_set)
        reports[on] = eval_prompt_following(models, cfg_preset, ["t2v", "multishot", "drift"], num_prompts=args.num_prompts,
                               num_multishot=args.num_multishot, num_drift=args.num_drift,
                               length_factor=args.length_factor, drift_settings=DRIFT, seed=0, samples=0,
                               log=lambda m: print(m, flush=True))
        print(f"{args.option}={on}: t2v {reports[on]['t2v']['score']:.3f}", flush=True)
    off, on = reports[False], reports[True]
    rows = []
    d, sem = paired([r["score"] for r in off["t2v"]["rows"]], [r["score"] for r in on["t2v"]["rows"]])
    rows.append({"eval": f"t2v ({off['t2v']['n']} prompts)", "off": off["t2v"]["score"], "on": on["t2v"]["score"],
                 "delta": d, "delta_sem": sem, "off_sem": off["t2v"]["score_sem"], "on_sem": on["t2v"]["score_sem"]})
    d, sem = paired([r["score"] for r in off["multishot"]["rows"]], [r["score"] for r in on["multishot"]["rows"]])
    rows.append({"eval": f"multi-shot ({off['multishot']['n']})", "off": off["multishot"]["score"],
                 "on": on["multishot"]["score"], "delta": d, "delta_sem": sem,
                 "off_sem": off["multishot"]["score_sem"], "on_sem": on["multishot"]["score_sem"]})
    for name in off["drift"]:
        a, b = off["drift"][name], on["drift"][name]
        rows.append({"eval": f"drift {name} ({a['n']} x {a['length_factor']} clips): mean", "off": a["mean"], "on": b["mean"],
                     "delta": b["mean"] - a["mean"], "delta_sem": math.hypot(a["mean_sem"], b["mean_sem"]),
                     "off_sem": a["mean_sem"], "on_sem": b["mean_sem"], "off_last": a["last"], "on_last": b["last"]})
    result = {"date": time.strftime("%Y-%m-%d"), "models": str(models_dir), "ar_config": ar,
              "command": "python " + " ".join(sys.argv), "runtime_s": time.perf_counter() - t0,
              "chance_score": off["chance_score"], "rows": rows, "reports": {"off": off, "on": on}}
    title = {"cache_from_last_step": "Cache from the last denoising step",
             "fp8_attention": {"triton": "8-bit self-attention (INT8 q.k, E4M3 P.v)",
                               "cudnn": "cuDNN FP8 self-attention (per-tensor E4M3 q, k, v, P)"}.get(values[1], values[1]),
             "decoder": "The light decoder (distill_decoder) instead of the VAE",
             "fastest": "The fastest variant (" + ", ".join(FASTEST) + ")"}[args.option]
    off_name, on_name = {"cache_from_last_step": ("off (t=0 cache pass)", "on (last step writes)"),
                         "fp8_attention": ("off (SDPA)", f"on ({values[1]})"),
                         "decoder": ("VAE decoder", "light decoder"),
                         "fastest": ("plain (bf16 linears, SDPA, t=0 cache pass)", "fastest")}[args.option]
    lines = [f"# {title}: quality cost on the tiny T2V student `{args.checkpoint}`", "",
             f"{result['date']}; models `{models_dir}`; `{result['command']}` ({result['runtime_s']:.0f} s). "
             f"Built-in prompt-following score (chance {result['chance_score']:.3f}); same prompts and seeds both ways; "
             "delta = on - off, paired per video where the videos pair up (t2v, multi-shot), else of the means.", "",
             f"| eval | {off_name} | {on_name} | delta ± sem |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['eval']} | {r['off']:.3f} ± {r['off_sem']:.3f} | {r['on']:.3f} ± {r['on_sem']:.3f} | "
                     f"{r['delta']:+.3f} ± {r['delta_sem']:.3f} |")
    stem = f"{args.option}_tiny" + ("" if args.on is None or args.on == VALUES[args.option][1] else f"_{args.on}") \
        + ("" if args.checkpoint == "ar/t2v" else "_" + args.checkpoint.replace("/", "_"))
    write_results(Path(args.out_dir) / f"{stem}.json", result, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
