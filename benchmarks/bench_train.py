"""One training step of the DiT, timed and counted (issue 20, item 2): teacher forcing (``train_ar``) and DMD
(``train_dmd``: a generator step, which also updates the critic, and a critic-only step).

The preset's DiT with random weights (float32 master weights and bf16 autocast on CUDA, as the trainers run; or
``--weights bf16``), one clip of ``--frames`` latent frames at ``--resolution``, batch ``--batch``. The steps are the
library's own: ``build_batch`` / ``ClipMasks`` / ``tf_forward`` / ``masked_flow_loss`` for teacher forcing over
[clean | noisy], ``dmd_step_losses`` (self-forcing rollout through the rolling KV cache, CFG teacher, critic) for DMD,
then gradient clipping and AdamW (``--optimizer none``: forward + backward only). ``--attention`` picks how the
teacher-forcing mask is applied: ``flex`` (block-sparse FlexAttention, compiled on CUDA), ``dense`` (a boolean S x S
mask to SDPA) or ``auto`` (flex on CUDA, dense on the CPU). DMD's rollout, critic and teacher need no mask.

Per step: wall time (one warm-up step, which compiles, then ``--steps`` timed), tokens/s (the tokens of the training
sequence: 2 F x tokens per frame for teacher forcing, the clip's F x tokens for DMD), useful FLOPs and MFU against
the bf16 (CUDA) or float32 (CPU) ``torch.matmul`` rate measured in this run (formula printed and saved), a
torch.profiler split of one more step into attention / linear / other (/ idle) time, and peak memory.

    python benchmarks/bench_train.py --preset tiny --steps 2                 # any CPU, seconds
    python benchmarks/bench_train.py --preset wan22-5b --steps 3 --parts tf   # one GPU (5B: checkpointing on)
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from longlive.bench.harness import command, fmt, git_commit, now, slug, sync, utc_now, write_results  # noqa: E402
from longlive.bench.train_step import (  # noqa: E402
    FLOP_FORMULA, FlopCounter, matmul_tflops, peak_memory_gib, reset_peak_memory, time_split,
)
from longlive.bench.variants import random_dit  # noqa: E402
from longlive.config import load_preset  # noqa: E402
from longlive.device import resolve_device  # noqa: E402
from longlive.diffusion import dmd, flow  # noqa: E402
from longlive.train.ar import (  # noqa: E402
    Clip, ClipMasks, build_batch, clip_block_sizes, collate, masked_flow_loss, max_block_position, tf_forward,
)
from longlive.train.dmd import DMDModels, dmd_step_losses  # noqa: E402
from longlive.inference.build import build_dit  # noqa: E402
from longlive.train.loop import autocast, autocast_dtype, build_optimizer  # noqa: E402
from longlive.train.prefetch import StepPrefetcher  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="wan22-5b")
    p.add_argument("--resolution", help="HxW in pixels (default: the preset's video size)")
    p.add_argument("--frames", type=int, help="latent frames per clip (default: the preset's)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--attention", choices=("auto", "flex", "dense"), default="auto")
    p.add_argument("--checkpointing", choices=("auto", "on", "off"), default="auto",
                   help="activation checkpointing of every block (the teacher-forcing model, DMD's critic; DMD's "
                        "generator: its cross-attention and FFN, the sublayers that never read its KV cache); "
                        "auto: on except for the tiny preset")
    p.add_argument("--weights", choices=("fp32", "bf16"), default="fp32", help="trained weights' dtype")
    p.add_argument("--optimizer", choices=("adamw", "adamw8bit", "none"), default="adamw",
                   help="the trainers' optimizer (train.loop.build_optimizer; adamw8bit: torchao's 8-bit moments); "
                        "none: forward + backward only")
    p.add_argument("--data-workers", type=int, default=2, help="teacher forcing: DataLoader workers that build each "
                   "step's batch (clip draw, noise, [clean | noisy]) ahead of it, as ar.data_workers; 0: in the step")
    p.add_argument("--compile", action="store_true", help="torch.compile each DiT block (ar.compile / dmd.compile)")
    p.add_argument("--parts", default="tf,dmd", help="comma-separated: tf, dmd")
    p.add_argument("--steps", type=int, default=3, help="timed steps per part, after one warm-up step")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads (default: the preset's cpu_threads)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", help="result file stem (default: bench_train_<preset>_<device>)")
    return p.parse_args(argv)


def sized_preset(args):
    preset = load_preset(args.preset)
    video = preset.video
    if args.resolution:
        h, w = (int(v) for v in args.resolution.lower().split("x"))
        video = video.model_copy(update={"height": h, "width": w})
    if args.frames:
        video = video.model_copy(update={"num_frames": (args.frames - 1) * preset.vae.temporal_compression + 1})
    return preset.model_copy(update={"video": video})


def trainable(preset, device, args, checkpointing: bool | str, compile_blocks: bool = False):
    """The random DiT with the trainers' wrappers, through the same build_dit they use."""
    model = random_dit(preset, device, torch.float32 if args.weights == "fp32" else torch.bfloat16, args.seed)
    return build_dit(model, preset, training=True, checkpointing=checkpointing, compile_blocks=compile_blocks).train()


def make_optimizer(params, args, lr: float, device):
    return None if args.optimizer == "none" else build_optimizer([{"params": list(params)}], args.optimizer, lr, device)[0]


def optimizer_step(params: list, opt, grad_clip: float) -> None:
    if opt is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()


def measure(name: str, step, counter: FlopCounter, device, args, tokens: int, rate: float, data=None) -> dict:
    """Warm-up, timed steps (FLOPs counted in each), a profiled step and peak memory of ``step()``; ``data``: the
    step's StepPrefetcher, whose wait over the timed steps is reported."""
    step()
    sync(device)
    reset_peak_memory(device)
    if data is not None:
        data.wait_s, data.waits = 0.0, 0
    times, flops = [], []
    for _ in range(args.steps):
        with counter.counting():
            t0 = now()
            step()
            sync(device)
            times.append(now() - t0)
        flops.append(counter.flops)
    mem = peak_memory_gib(device)
    step_s, flop = sum(times) / len(times), sum(flops) / len(flops)
    row = {"part": name, "step_s": step_s, "steps_s": times, "tokens": tokens, "tokens_per_s": tokens / step_s,
           "useful_tflop": flop / 1e12, "tflops": flop / step_s / 1e12, "mfu": flop / step_s / 1e12 / rate,
           "passes": counter.passes, **mem}
    if data is not None:
        row.update(data_wait_ms=data.mean_wait_ms, data_workers=data.workers)
    if not args.no_profile:
        row["time_ms"] = time_split(step, device)
    print(f"{name}: {step_s:.3f} s/step, {row['tokens_per_s']:.0f} tokens/s, {flop:.3g} FLOP/step, "
          f"MFU {100 * row['mfu']:.1f}%, {mem}", flush=True)
    return row


def bench_tf(preset, device, args, checkpointing: bool, rate: float) -> dict:
    cfg, variant = preset.ar, preset.ar.variants["t2v"]
    C, F, h, w = preset.latent_shape
    model = trainable(preset, device, args, checkpointing, args.compile)
    opt = make_optimizer(model.parameters(), args, 1e-5, device)
    g = torch.Generator().manual_seed(args.seed + 1)
    clips = [Clip(f"c{i}", torch.randn(C, F, h, w, generator=g), torch.randn(1, preset.text.max_tokens, preset.text.dim,
                  generator=g), [0]) for i in range(args.batch)]
    null = torch.zeros(preset.text.max_tokens, preset.text.dim)
    mask = ClipMasks(cfg, variant, F, model.tokens_per_frame(h, w), backend=args.attention)(clips)
    # each step's batch comes through the trainers' StepPrefetcher: the time the step waits for it is measured
    data = StepPrefetcher(lambda s, gen: build_batch(*collate([clips[int(torch.randint(len(clips), (1,), generator=gen))]
                                                                for _ in range(args.batch)]), null, cfg, variant, gen),
                          1 << 30, seed=args.seed, workers=args.data_workers, pin_memory=device.type == "cuda")
    counter_step = iter(range(1 << 30))

    def step():
        s = next(counter_step)
        batch = data.get(s, torch.Generator()).to(device, non_blocking=True)
        model.zero_grad(set_to_none=True)
        with autocast(cfg.precision, device):
            loss = masked_flow_loss(tf_forward(model, batch, mask), batch)
        loss.backward()
        optimizer_step(list(model.parameters()), opt, cfg.grad_clip)

    counter = FlopCounter(model)
    row = measure("teacher forcing", step, counter, device, args, args.batch * mask.q_len, rate, data)
    partial, full = mask.tiles()
    row.update(attention=("flex" if mask.use_flex(device) else "dense"), mask_density=mask.allowed_pairs() / (
        mask.q_len * mask.kv_len * (mask.frames.shape[0] if mask.batched else 1)),
        partial_tiles=int(partial.sum()), full_tiles=int(full.sum()))
    counter.remove()
    return row


def bench_dmd(preset, device, args, checkpointing: bool, rate: float) -> list[dict]:
    cfg, ar = preset.dmd, preset.ar
    C, F, h, w = preset.latent_shape
    # the generator's self-attention reads the rollout's changing KV cache: only its cache-free sublayers recompute
    generator = trainable(preset, device, args, "cache_free" if checkpointing else False)
    critic = trainable(preset, device, args, checkpointing, args.compile)
    frozen = torch.bfloat16 if device.type == "cuda" and cfg.frozen_dtype != "fp32" else torch.float32
    teacher = random_dit(preset, device, frozen, args.seed + 7).requires_grad_(False)
    models = DMDModels(generator, critic)
    opt = make_optimizer(models.parameters(), args, 1e-6, device)
    steps = next(iter(cfg.students.values()))
    layout = dmd.RolloutLayout(clip_block_sizes(F, ar.block_frames), flow.step_list_sigmas(steps, cfg.timestep_shift),
                               ar.sink_frames, ar.window_frames, max_block_position(F, ar.block_frames))
    g = torch.Generator().manual_seed(args.seed + 2)
    x_data = torch.randn(args.batch, C, F, h, w, generator=g).to(device)
    context = torch.randn(args.batch, preset.text.max_tokens, preset.text.dim, generator=g).to(device)
    null = torch.zeros(preset.text.max_tokens, preset.text.dim, device=device)
    counter = FlopCounter(generator, critic, teacher)
    rows = []
    for name, update_generator in (("DMD generator + critic", True), ("DMD critic", False)):
        def step():
            models.zero_grad(set_to_none=True)
            with autocast(cfg.precision, device):
                loss, _ = dmd_step_losses(models, teacher, layout, cfg, x_data, context, null,
                                          torch.Generator().manual_seed(args.seed), update_generator=update_generator)
            loss.backward()
            optimizer_step(list(models.parameters()), opt, cfg.grad_clip)
        rows.append(measure(name, step, counter, device, args, args.batch * F * generator.tokens_per_frame(h, w), rate))
    counter.remove()
    return rows


def markdown(result: dict) -> str:
    e = result["environment"]
    lines = [f"# Training step: {result['preset']} DiT at {result['resolution']}, {result['latent_frames']} latent frames",
             "", f"{e['device']}, torch {e['torch']}, {e['date']}, commit {e['commit']}", "",
             f"`{result['command']}`", "", f"Settings: {result['settings']}", "",
             f"Matmul rate ({result['matmul_dtype']}, measured in this run): {result['matmul_tflops']:.3g} TFLOP/s", "",
             "| step | s/step | tokens/s | useful FLOP | TFLOP/s | MFU | attention ms | linear ms | other ms | idle ms | "
             "data wait ms | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['part']} | {r['error']} |" + " |" * 11)
            continue
        t = r.get("time_ms", {})
        peak = r.get("peak_alloc_gib", r.get("peak_rss_gib"))
        lines.append(f"| {r['part']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['useful_tflop'] * 1e12:.3g} | "
                     f"{r['tflops']:.3g} | {100 * r['mfu']:.1f}% | {fmt(t.get('attention'), '.0f')} | "
                     f"{fmt(t.get('linear'), '.0f')} | {fmt(t.get('other'), '.0f')} | {fmt(t.get('idle'), '.0f')} | "
                     f"{fmt(r.get('data_wait_ms'), '.1f')} | {fmt(peak, '.1f')} |")
    tf = next((r for r in result["rows"] if r["part"] == "teacher forcing" and "error" not in r), None)
    if tf:
        lines += ["", f"Teacher-forcing attention: {tf['attention']}, mask density {tf['mask_density']:.3f}, "
                      f"{tf['full_tiles']} whole and {tf['partial_tiles']} partial 128x128 tiles."]
    lines += ["", f"FLOPs: {result['flop_formula']}", "", "Peak memory: CUDA peak allocated on a GPU, the process's "
              "peak RSS on the CPU. Time split: " + next((r["time_ms"]["basis"] for r in result["rows"] if "time_ms" in r), "-"), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    preset = sized_preset(args)
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or preset.cpu_threads or torch.get_num_threads())
    checkpointing = args.checkpointing == "on" or (args.checkpointing == "auto" and preset.name != "tiny")
    mm_dtype = autocast_dtype("auto", device) or torch.float32
    rate = matmul_tflops(device, mm_dtype)
    print(f"{FLOP_FORMULA}\nmatmul rate ({mm_dtype}): {rate:.3g} TFLOP/s", flush=True)
    if args.attention == "flex" and device.type != "cuda" and "tf" in args.parts:
        raise SystemExit("--attention flex needs a CUDA device: FlexAttention has no backward on the CPU "
                         "(use --attention dense or auto there)")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - {"tf", "dmd"}
    if unknown:
        raise SystemExit(f"--parts: unknown {sorted(unknown)}; use tf, dmd")
    C, F, h, w = preset.latent_shape
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "date": utc_now(), "commit": git_commit(ROOT)}
    result = {"preset": preset.name, "resolution": f"{preset.video.height}x{preset.video.width}", "latent_frames": F,
              "settings": {"batch": args.batch, "attention": args.attention, "checkpointing": checkpointing,
                           "weights": args.weights, "optimizer": args.optimizer, "compile": args.compile,
                           "data_workers": args.data_workers,
                           "timed_steps": args.steps},
              "matmul_tflops": rate, "matmul_dtype": str(mm_dtype).replace("torch.", ""), "flop_formula": FLOP_FORMULA,
              "rows": [], "environment": env,
              "command": command("benchmarks/bench_train.py", sys.argv[1:] if argv is None else argv)}
    stem = args.name or f"bench_train_{preset.name}_{slug(env['device'])}"
    for part in parts:  # the results are rewritten after each part, so an out-of-memory part keeps the others
        try:
            if part == "tf":
                result["rows"].append(bench_tf(preset, device, args, checkpointing, rate))
            else:
                result["rows"] += bench_dmd(preset, device, args, checkpointing, rate)
        except torch.OutOfMemoryError as e:
            print(f"{part}: out of memory: {e}", flush=True)
            result["rows"].append({"part": part, "error": f"out of memory: {str(e).splitlines()[0]}"})
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        md = write_results(args.out_dir / f"{stem}.json", result, markdown(result))
    print(f"wrote {md}")
    return result


if __name__ == "__main__":
    main()
