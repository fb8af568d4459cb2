"""Sequence-parallel scaling of streaming inference, and one FSDP2 + SP training step (issue 7).

Wan2.2-TI2V-5B DiT (``load_preset("wan22-5b").dit``: 30 layers, dim 3072, 24 heads, ffn 14336; random
weights from one seed, identical on every rank and in every run) at 704x1280 (latent 44x80, 48 channels,
880 tokens per latent frame), streamed through the library's :class:`StreamingPipeline` with the preset's
inference settings (blocks of 8 latent frames, sink 0 + window 24, 4 denoising steps + the pass that writes
the KV cache, fused kernels on CUDA) and a random 512-token text context. Sequence parallel is
``longlive.parallel.parallelize`` (Ulysses, spatial partition: every rank holds half of every frame and
caches half of the heads). DiT only: the VAE decode is not part of these numbers.

Run once per SP degree; every run appends its part to ``--work-dir`` and rank 0 rewrites the report
(``sp_scaling.json`` / ``.md`` in ``--out-dir``) from all parts found there, so the last run prints the
whole table:

    torchrun --standalone --nproc_per_node 1 benchmarks/sp_scaling.py --parts infer   # SP=1 (also plain python)
    torchrun --standalone --nproc_per_node 2 benchmarks/sp_scaling.py --parts infer   # SP=2, compared with SP=1
    torchrun --standalone --nproc_per_node 2 benchmarks/sp_scaling.py --parts train   # FSDP2 + SP=2 training step
    torchrun --standalone --nproc_per_node 2 benchmarks/sp_scaling.py --preset tiny --parts infer,train  # CPU, gloo

On the device (nvidia-h200-x2; about 2-3 minutes after start-up; pydantic travels as wheels in .whl): run
``python3 -m torch.distributed.run --standalone --nproc_per_node N benchmarks/sp_scaling.py --machine
nvidia-h200-x2 --work-dir /tmp/spw --out-dir $OUT --parts P`` for (N, P) = (1, infer), (2, infer), (2, train),
in that order in one command; ``(1, train)`` after them adds the one-GPU training step for a training speedup
(about 70 s more; 100 GiB peak on one H200).

Inference, per SP degree: the output of one plain forward (one block, no cache) and the clean latents of
the first ``--compare-blocks`` streamed blocks, compared with the SP=1 run's (saved in the work dir);
per-block wall time (host clock around each block, synchronised) and GPU time (CUDA events), steady
state = blocks whose cache holds the full sink + window; FPS = 4 pixel frames per latent frame x 8 =
32 video frames per block / steady block time; first-block latency of a warm process (and of the cold
first block in the process, which includes kernel JIT); peak memory per GPU.

Training (``--parts train``): the teacher-forcing step of :mod:`longlive.bench.train` ([clean | noisy] =
2 x ``--train-frames`` latent frames, full block-causal history as the wan22-5b AR preset, bf16 autocast
over float32 weights) with activation checkpointing of every block (``--ac``, applied before
``parallelize``), FSDP2 over all ranks + SP and AdamW; the first step warms up, the rest are timed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from longlive.bench.harness import (  # noqa: E402
    cuda_peak_gib, errors, fmt, md_table, now, rank_gather, rank_max, run_environment, sync, write_json, write_results,
)
from longlive.bench.train import summarize_steps, teacher_forcing_inputs, teacher_forcing_loss, train_steps  # noqa: E402
from longlive.bench.variants import random_dit  # noqa: E402
from longlive.config import ParallelConfig, load_preset  # noqa: E402
from longlive.inference import build  # noqa: E402
from longlive.inference.pipeline import StreamingPipeline  # noqa: E402
from longlive.inference.schedule import PromptSchedule, stream_block_sizes  # noqa: E402
from longlive.models.dit import Block  # noqa: E402
from longlive.parallel import init_parallel, parallelize, shutdown  # noqa: E402

PIXEL_FRAMES_PER_LATENT = 4  # the causal VAE: 4 pixel frames per latent frame (a video's very first latent gives 1)
TOLERANCE = {"bfloat16": 2e-2, "float32": 1e-4}  # relative L2 of SP=N vs SP=1 (see report notes)


def log(state, *msg) -> None:
    if state.is_main:
        print(*msg, flush=True)


# ----------------------------------------------------------------------------- model and shapes


def shapes(preset) -> dict:
    C, F, h, w = preset.latent_shape
    _, ph, pw = preset.dit.patch_size
    inf = preset.inference
    return {"z_dim": C, "clip_frames": F, "lat_h": h, "lat_w": w, "frame_tokens": (h // ph) * (w // pw),
            "height": preset.video.height, "width": preset.video.width, "text_dim": preset.text.dim,
            "text_tokens": preset.text.max_tokens, "block_frames": inf.block_frames, "sink_frames": inf.sink_frames,
            "window_frames": inf.window_frames, "denoising_steps": list(inf.denoising_steps),
            "layers": preset.dit.num_layers, "dim": preset.dit.dim, "heads": preset.dit.num_heads,
            "ffn": preset.dit.ffn_dim}


@torch.no_grad()
def checksum(model: torch.nn.Module) -> float:
    return float(sum(p.detach().double().abs().sum() * (i + 1) for i, p in enumerate(model.parameters())))


def weight_gib(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30


# ----------------------------------------------------------------------------- inference


def run_inference(args, preset, state, dtype: torch.dtype, work: Path) -> dict:
    dev, shp, inf = state.device, shapes(preset), preset.inference
    bf, C, h, w = shp["block_frames"], shp["z_dim"], shp["lat_h"], shp["lat_w"]
    t0 = now()
    dit = random_dit(preset, dev, dtype, args.seed)  # the same weights on every rank of one GPU type
    sums = rank_gather(checksum(dit), state)
    if len(set(sums)) != 1:
        raise RuntimeError(f"ranks built different weights: checksums {sums}")
    wgib = weight_gib(dit)
    # the preset's inference path (fused kernels on CUDA), then sequence parallel over all ranks (no FSDP)
    dit = build.build_dit(dit, preset, inference=inf, parallel=state)
    pipe = StreamingPipeline(dit, inf, dev)
    log(state, f"[sp={state.sp}] model built and wrapped in {now() - t0:.1f} s ({wgib:.2f} GiB of weights)")

    g = torch.Generator().manual_seed(args.seed + 1)
    context = torch.randn(1, shp["text_tokens"], shp["text_dim"], generator=g).to(dev, dtype)
    x = torch.randn(1, C, bf, h, w, generator=g)
    t = torch.rand(1, bf, generator=g) * 1000

    lat = (C, h, w)
    warm = math.ceil((inf.sink_frames + inf.window_frames) / bf)  # blocks until the cache holds sink + window
    n = max(warm + args.measure_blocks, args.compare_blocks)

    def plans(blocks: int):
        return PromptSchedule.single("random").plan(stream_block_sizes(blocks * bf, bf), preset.video.fps,
                                                   preset.vae.temporal_compression)

    # 1. cold: the very first block run in this process (Triton JIT, cuBLAS and NCCL set-up included)
    sync(dev)
    t0 = now()
    next(iter(pipe.stream(plans(1), [context], lat, generator=torch.Generator().manual_seed(0))))
    sync(dev)
    cold = now() - t0

    # 2. one plain forward (one block, no cache), and the same sample inside a batch of two: the batch
    #    changes GEMM shapes only, so their difference is the bf16 floor of reordered arithmetic.
    with torch.no_grad():
        fwd = dit(x.to(dev), t.to(dev), context, block_frames=bf).float().cpu()
        fwd2 = dit(torch.cat((x, x.flip(2))).to(dev), torch.cat((t, t.flip(1))).to(dev),
                   context.expand(2, -1, -1), block_frames=bf)[:1].float().cpu()
    floor = errors(fwd2, fwd)

    # 3. the measured stream
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    it = iter(pipe.stream(plans(n), [context], lat, generator=torch.Generator().manual_seed(args.seed + 2)))
    walls, outs = [], []
    sync(dev)
    for _ in range(n):
        t0 = now()
        out = next(it)
        sync(dev)
        walls.append(now() - t0)
        outs.append(out)
    blocks = []
    for i, out in enumerate(outs):
        tm = out.timings
        blocks.append({"block": i, "wall_s": walls[i], "gpu_s": tm["denoise_s"] + tm["cache_s"],
                       "denoise_s": tm["denoise_s"], "cache_pass_s": tm["cache_s"],
                       "cache_frames": len(tm["cache_frames"]), "kv_cache_gib": tm["cache_bytes"] / 2**30})
    # the slowest rank sets the pace: max over ranks of every timing
    flat = rank_max([b[k] for b in blocks for k in ("wall_s", "gpu_s", "denoise_s", "cache_pass_s")] + [cold], state)
    for i, b in enumerate(blocks):
        b["wall_s"], b["gpu_s"], b["denoise_s"], b["cache_pass_s"] = flat[4 * i: 4 * i + 4]
    cold = flat[-1]
    steady = blocks[warm:]
    per_rank_mem = rank_gather(cuda_peak_gib(dev), state)

    latents = [o.latents.float().cpu() for o in outs[: args.compare_blocks]]
    finite = all(bool(torch.isfinite(o.latents).all()) for o in outs)
    frames = bf * PIXEL_FRAMES_PER_LATENT
    block_wall = sum(b["wall_s"] for b in steady) / len(steady)
    block_gpu = sum(b["gpu_s"] for b in steady) / len(steady)
    r = {
        "sp": state.sp, "world": state.world_size, "dtype": str(dtype).replace("torch.", ""),
        "kernels": bool(inf.kernels and dev.type == "cuda" and os.environ.get("LONGLIVE_KERNELS", "1") != "0"),
        "weights_gib": wgib, "weights_checksum": sums[0], "warm_blocks": warm, "blocks": blocks,
        "steady_block_wall_s": block_wall, "steady_block_gpu_s": block_gpu,
        "steady_step_gpu_s": sum(b["denoise_s"] for b in steady) / len(steady) / len(inf.denoising_steps),
        "steady_cache_pass_gpu_s": sum(b["cache_pass_s"] for b in steady) / len(steady),
        "fps_wall": frames / block_wall, "fps_gpu": frames / block_gpu,
        "first_block_latency_s": blocks[0]["wall_s"], "cold_first_block_s": cold,
        "kv_cache_gib_per_rank": blocks[-1]["kv_cache_gib"], "memory_per_rank": per_rank_mem,
        "finite": finite, "bf16_floor_forward": floor,
    }
    ref_path = work / "reference_sp1.pt"
    if state.sp == 1:
        if state.is_main:
            torch.save({"forward": fwd, "latents": latents, "checksum": sums[0]}, ref_path)
    elif ref_path.exists():
        ref = torch.load(ref_path, weights_only=True)  # tensors, lists and a checksum: nothing to unpickle
        r["match"] = {
            "same_weights_as_sp1": ref["checksum"] == sums[0],
            "forward": errors(fwd, ref["forward"]),
            "blocks": [errors(a, b) for a, b in zip(latents, ref["latents"])],
        }
    else:
        r["match"] = None  # no SP=1 run in this work dir
    del pipe, it, outs, dit
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return r


# ----------------------------------------------------------------------------- training


def run_train(args, preset, state) -> dict:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from longlive.train.loop import autocast_dtype

    dev, shp = state.device, shapes(preset)
    F = args.train_frames or shp["clip_frames"]
    t0 = now()
    model = random_dit(preset, dev, torch.float32, args.seed)  # float32 master weights, bf16 autocast (train_ar)
    if args.ac:  # before parallelize: SP hooks and FSDP units then sit on the checkpoint wrappers
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
    parallelize(model, state, training=True)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    log(state, f"[train sp={state.sp}] model built, AC={args.ac}, FSDP2={state.distributed} in {now() - t0:.1f} s")
    batch, mask = teacher_forcing_inputs(preset, F, dev, args.seed + 3)  # the same batch on every rank
    steps = train_steps(model, opt, partial(teacher_forcing_loss, model, batch, mask, dev), args.train_steps, dev,
                        grad_clip=preset.ar.grad_clip,
                        log=lambda rec: log(state, f"[train sp={state.sp}] {json.dumps(rec)}"))
    tokens = 2 * F * shp["frame_tokens"]
    r = {"sp": state.sp, "world": state.world_size, "fsdp2": state.distributed, "activation_checkpointing": args.ac,
         "latent_frames": F, "frames_in_forward": 2 * F, "tokens": tokens, "tokens_per_rank": tokens // state.sp,
         "batch": 1, "autocast": str(autocast_dtype("auto", dev) or "none (float32)").replace("torch.", ""),
         "master_weights": "float32", "optimizer": "AdamW", **summarize_steps(steps, state)}
    del model, opt, batch, mask
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return r


# ----------------------------------------------------------------------------- report


def peak(result: dict, key: str) -> float | None:
    """The most any rank of ``result`` held of ``key`` (None off CUDA)."""
    return max(m.get(key, 0) for m in result["memory_per_rank"]) or None


def match_cell(row: dict) -> str:
    if row["sp"] == 1:
        return "reference"
    if "match_pass" not in row:
        return "no SP=1 run"
    return (f"{fmt(row.get('match_forward_rel_l2'), '.3g')} / {fmt(row.get('match_blocks_rel_l2_max'), '.3g')} "
            f"({'pass' if row.get('match_pass') else 'FAIL'})")


def report(work: Path, out_dir: Path, preset_name: str, extra_notes: list[str] | None = None, stem: str = "sp_scaling") -> dict:
    parts = {p.stem: json.loads(p.read_text()) for p in sorted(work.glob("part_*.json"))}
    infer = sorted((v for k, v in parts.items() if k.startswith("part_infer")), key=lambda r: r["result"]["sp"])
    train = [v for k, v in parts.items() if k.startswith("part_train")]
    base = next((r["result"] for r in infer if r["result"]["sp"] == 1), None)
    env = (infer or train)[0]["environment"] if (infer or train) else {}
    dtype = infer[0]["result"]["dtype"] if infer else "bfloat16"
    tol = TOLERANCE.get(dtype, 2e-2)
    shp = (infer or train)[0]["shapes"] if (infer or train) else {}

    rows = []
    for part in infer:
        r = part["result"]
        row = {"sp": r["sp"], "gpus": r["world"], "steady_block_ms": 1e3 * r["steady_block_wall_s"],
               "steady_block_gpu_ms": 1e3 * r["steady_block_gpu_s"], "step_gpu_ms": 1e3 * r["steady_step_gpu_s"],
               "cache_pass_gpu_ms": 1e3 * r["steady_cache_pass_gpu_s"], "fps": r["fps_wall"], "fps_gpu": r["fps_gpu"],
               "speedup": base["steady_block_wall_s"] / r["steady_block_wall_s"] if base else None,
               "first_block_ms": 1e3 * r["first_block_latency_s"], "cold_first_block_s": r["cold_first_block_s"],
               "peak_alloc_gib_per_gpu": peak(r, "peak_alloc_gib"), "peak_reserved_gib_per_gpu": peak(r, "peak_reserved_gib"),
               "kv_cache_gib_per_gpu": r["kv_cache_gib_per_rank"], "kernels": r["kernels"], "finite": r["finite"]}
        m = r.get("match")
        if m:
            worst = max(b["rel_l2_err"] for b in m["blocks"]) if m["blocks"] else None
            row.update(match_forward_rel_l2=m["forward"]["rel_l2_err"], match_forward_max_abs=m["forward"]["max_abs_err"],
                       match_blocks_rel_l2_max=worst, match_blocks_max_abs=max(b["max_abs_err"] for b in m["blocks"]),
                       match_pass=bool(m["same_weights_as_sp1"] and m["forward"]["rel_l2_err"] <= tol
                                       and (worst is None or worst <= tol)))
        rows.append(row)
    summary = {"preset": preset_name, "environment": env, "shapes": shp, "tolerance_rel_l2": tol,
               "inference": rows, "training": [t["result"] for t in train],
               "runs": {k: v["result"] for k, v in parts.items()}, "notes": NOTES + (extra_notes or [])}

    lines = [f"# Sequence-parallel scaling, {preset_name} ({env.get('machine') or env.get('device')})", ""]
    lines.append(f"{env.get('date')}; {env.get('gpu', env.get('device'))}; torch {env.get('torch')}"
                 + (f", CUDA {env.get('cuda')}, NCCL {env.get('nccl')}, triton {env.get('triton')}" if env.get("cuda") else "")
                 + ". Written by `benchmarks/sp_scaling.py`.")
    lines.append("")
    if shp:
        lines.append(f"DiT {shp['layers']} layers, dim {shp['dim']}, {shp['heads']} heads, ffn {shp['ffn']}, random weights; "
                     f"{shp['height']}x{shp['width']} (latent {shp['lat_h']}x{shp['lat_w']}, {shp['z_dim']} channels, "
                     f"{shp['frame_tokens']} tokens per latent frame); blocks of {shp['block_frames']} latent frames "
                     f"(= {shp['block_frames'] * PIXEL_FRAMES_PER_LATENT} video frames), sink {shp['sink_frames']} + window "
                     f"{shp['window_frames']}, {len(shp['denoising_steps'])} denoising steps + the cache pass, "
                     f"{shp['text_tokens']} random text tokens. **DiT only, VAE decode excluded.** Ulysses SP, spatial partition.")
        lines.append("")
    if rows:
        lines += ["## Streaming inference", ""] + md_table(
            ("SP", "GPUs", "steady block ms", "GPU ms / block", "step ms", "cache pass ms", "FPS (DiT)", "speedup",
             "first block ms", "cold first block s", "peak alloc GiB/GPU", "KV cache held GiB/GPU",
             "output vs SP=1 (rel L2 fwd / blocks max)"),
            ((r["sp"], r["gpus"], f"{r['steady_block_ms']:.1f}", f"{r['steady_block_gpu_ms']:.1f}", f"{r['step_gpu_ms']:.1f}",
              f"{r['cache_pass_gpu_ms']:.1f}", f"{r['fps']:.2f}", f"{fmt(r['speedup'], '.2f')}x", f"{r['first_block_ms']:.1f}",
              f"{r['cold_first_block_s']:.2f}", fmt(r["peak_alloc_gib_per_gpu"], ".1f"), f"{r['kv_cache_gib_per_gpu']:.2f}",
              match_cell(r)) for r in rows))
        lines.append("")
        for part in infer:
            m = part["result"].get("match")
            if m:
                lines.append(f"SP={part['result']['sp']} vs SP=1, per block (max abs err / max |ref| / rel L2): "
                             + "; ".join(f"{i}: {b['max_abs_err']:.3g} / {b['max_abs_ref']:.3g} / {b['rel_l2_err']:.3g}"
                                         for i, b in enumerate(m["blocks"]))
                             + f". One plain forward: max abs {m['forward']['max_abs_err']:.3g}, rel L2 {m['forward']['rel_l2_err']:.3g}; "
                             f"the same weights in both runs: {m['same_weights_as_sp1']}.")
        if base:
            fl = base["bf16_floor_forward"]
            lines.append(f"Floor: the same forward as sample 0 of a batch of 2 (only GEMM shapes change) differs from it by "
                         f"rel L2 {fl['rel_l2_err']:.3g} (max abs {fl['max_abs_err']:.3g}). Tolerance: rel L2 <= {tol:g} ({dtype}).")
        lines.append("")
    if train:
        train.sort(key=lambda part: part["result"]["sp"])
        base_t = next((p["result"] for p in train if p["result"]["sp"] == 1), None)
        lines += ["## One training step (teacher forcing; FSDP2 + SP over the GPUs when there are several)", ""] + md_table(
            ("SP", "GPUs", "FSDP2", "act. ckpt", "latent frames (x2 clean/noisy)", "tokens (per rank)", "step s", "speedup",
             "fwd+bwd s", "peak alloc GiB/GPU", "peak reserved GiB/GPU", "loss", "grad norm"),
            ((t["sp"], t["world"], t["fsdp2"], t["activation_checkpointing"], t["latent_frames"],
              f"{t['tokens']} ({t['tokens_per_rank']})", f"{t['step_s']:.2f}",
              fmt(base_t["step_s"] / t["step_s"] if base_t and base_t["latent_frames"] == t["latent_frames"] else None, ".2f") + "x",
              f"{t['fwd_bwd_s']:.2f}", fmt(peak(t, "peak_alloc_gib"), ".1f"), fmt(peak(t, "peak_reserved_gib"), ".1f"),
              f"{t['steps'][-1]['loss']:.4g}", f"{t['steps'][-1]['grad_norm']:.4g}") for t in (p["result"] for p in train)))
        lines += ["", f"{len(train[0]['result']['steps'])} steps, the first a warm-up; step time = mean of the others "
                  "(zero_grad, forward + backward, grad-norm clip, AdamW), slowest rank. Float32 master weights, "
                  f"{train[0]['result']['autocast']} autocast (as train_ar), batch 1, AdamW; peak memory over all steps.", ""]
    lines += ["## Notes", ""] + [f"* {n}" for n in summary["notes"]] + [""]
    write_results(out_dir / f"{stem}.json", summary, "\n".join(lines))
    print("\n".join(lines), flush=True)
    return summary


NOTES = [
    "Timings are the slowest rank's. Block time = wall clock around one block of the streaming loop (4 denoising "
    "forwards + the t=0 pass that writes the KV cache), synchronised; GPU ms = CUDA events on rank's stream. Steady = "
    "blocks whose cache already holds sink + window frames (block 3 on at window 24 / block 8).",
    "FPS = 32 video frames per block (8 latent frames x 4 pixel frames) / steady block time; the DiT alone, VAE decode excluded.",
    "First block = block 0 of a stream in a warm process (empty cache, so less attention than a steady block); "
    "cold first block = the first block ever run in the process (Triton JIT, cuBLAS and NCCL set-up included).",
    "KV cache held = the cache's K/V bytes at the last block on one GPU (sink + window frames after eviction; Ulysses "
    "keeps heads / SP of them per rank); its preallocated buffer holds sink + window + block frames. Peak alloc = "
    "torch.cuda.max_memory_allocated over the measured stream (weights, cache, activations).",
    "Output match: SP=N's outputs vs the SP=1 run's, same seeds and weights (checksums compared). SP only reorders "
    "floating-point work (GEMMs over fewer rows, attention over the same keys per head), so differences are "
    "rounding noise, compounded over 30 layers, 4 steps and the KV cache feeding later blocks. Tolerance: relative "
    "L2 error <= 2e-2 in bf16 (bf16's unit roundoff is 2^-8 = 3.9e-3), 1e-4 in float32.",
]


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="wan22-5b", help="shapes: wan22-5b (the benchmark) or tiny (a CPU check)")
    ap.add_argument("--parts", default="infer", help="comma list of infer, train")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="inference weights; auto: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--measure-blocks", type=int, default=4, help="steady blocks timed after the cache has filled")
    ap.add_argument("--compare-blocks", type=int, default=4, help="first blocks whose latents are compared with SP=1")
    ap.add_argument("--train-frames", type=int, default=None, help="latent frames of the training clip (default: the preset's)")
    ap.add_argument("--train-steps", type=int, default=2, help="training steps; the first is a warm-up")
    ap.add_argument("--ac", action=argparse.BooleanOptionalAction, default=True, help="activation checkpointing of every block")
    ap.add_argument("--work-dir", default="/tmp/sp_scaling")
    ap.add_argument("--out-dir", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--machine", default=None, help="machine kind for the report, e.g. nvidia-h200-x2")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="collective timeout")
    args = ap.parse_args()

    preset = load_preset(args.preset)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    state = init_parallel(ParallelConfig(nproc=world, sp=world), device=args.device, timeout_s=args.timeout_s)
    if state.device.type == "cpu":
        torch.set_num_threads(1)  # a shape check, not a CPU benchmark
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype) or (
        torch.bfloat16 if state.device.type == "cuda" else torch.float32)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    env = run_environment(state.device, args.machine)
    log(state, f"sp_scaling: {args.preset}, world {world}, {env}")
    try:
        for part in [p.strip() for p in args.parts.split(",") if p.strip()]:
            t0 = now()
            if part == "infer":
                result = run_inference(args, preset, state, dtype, work)
            elif part == "train":
                result = run_train(args, preset, state)
            else:
                raise ValueError(f"unknown part {part!r}")
            result["seconds"] = now() - t0
            if state.is_main:
                write_json(work / f"part_{part}_sp{state.sp}.json",
                           {"environment": env, "shapes": shapes(preset), "result": result})
            state.barrier()
        if state.is_main:
            report(work, Path(args.out_dir), args.preset)
    finally:
        shutdown(state)


if __name__ == "__main__":
    main()
