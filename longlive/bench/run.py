"""``longlive bench``: the stages in order, each appending to the JSON (and markdown) as it finishes, so a
timeout keeps what finished; ``--budget-s`` skips the optional stages that no longer fit."""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import torch

from longlive.bench.args import DEFAULT_VARIANTS, VARIANT_IDS, VARIANTS, Variant
from longlive.bench.harness import now, python_version, slug, version
from longlive.bench.kernels import ceiling, kernel_checks
from longlive.bench.report import print_table, write_results
from longlive.bench.shapes import BenchShape, bench_shape, step_list
from longlive.bench.vae import build_decoder, is_light, vae_block_time
from longlive.bench.variants import (
    BenchModel, end_to_end, inference_for, profile_block, stream_blocks, summarize, weight_bytes,
)
from longlive.config import ConfigError, Preset, load_preset
from longlive.device import resolve_device

E2E_VARIANTS = ("bf16-fast", "fp8", "fp8-attn8", "fp8-cudnn", "bf16-cudnn8")  # end to end: per step count, bf16 fast and the fastest other (not NVFP4: converted for good)

NOTES = (
    "block ms: the DiT's time for one steady block, denoising steps + the cache pass (the pipeline's marks: CUDA "
    "events on a GPU, host time on the CPU); DiT FPS = video frames per block / block time. steady FPS (DiT + VAE): "
    "measured, each block streamed and then decoded on the same device (VAE ms: the decoder plus the copy of the "
    "frames to the host), over the steady blocks' wall time; DiT + cache pass + VAE + other = total, other being "
    "the rest (noise, Python, launch latency the device waited on); without a VAE (--skip vae, no diffusers) the DiT "
    "alone. Steady blocks: those after the cache holds a full window. first block s: from the start of a stream "
    "until its first block's frames are decoded, in a process warmed up by one unmeasured block of the same variant. "
    "'no (last step writes)': inference.cache_from_last_step, one forward less per block. Ceiling: one layer's GEMMs "
    "+ attention timed alone, x layers x passes. peak GiB: the stream's, decoding included (CUDA: "
    "max_memory_allocated; CPU: the process's peak RSS increase); DiT peak GiB (CUDA): while the DiT ran, the "
    "resident VAE weights included. host syncs / block: synchronizing CUDA calls inside the chunk loop counted by "
    "torch.cuda.set_sync_debug_mode. host ms: wall time until the host had enqueued a steady block's work (the chunk "
    "loop never syncs; while the GPU is behind, launches wait for room in the launch queue, so a GPU-bound row shows host "
    "ms below block ms by the queue's depth, and host ms = block ms means the GPU waited on the host). 'bf16 plain' is the reference path (torch.cat KV cache, PyTorch elementwise "
    "ops, per-forward context projections) run through the same sync-free loop. End to end: the VAE in its worker "
    "thread overlapping the next block, as `longlive generate` runs it.")
TIMING = {
    "cuda": ("CUDA events for the pipeline's phases; wall clock with the device synchronized for the VAE and the "
             "totals; triton.testing.do_bench (median) for pieces timed alone; peak memory "
             "torch.cuda.max_memory_allocated."),
    "cpu": ("CPU: wall-clock time (time.perf_counter) everywhere, no CUDA events or do_bench; peak memory is the "
            "process's peak RSS increase (longlive.eval.perf.PeakMemory); FP8 and NVFP4 run their emulated paths; "
            "kernel checks, the FP8 ceiling, the profile and host-sync counting need CUDA and are not run. "
            "The code paths, not speed."),
}


def _dedupe(items: list) -> list:
    return list(dict.fromkeys(items))


def command_line(args: argparse.Namespace, preset: Preset, shapes: list[BenchShape], variants: list[Variant]) -> str:
    """The effective settings as a ``longlive bench`` command (defaults resolved)."""
    parts = ["longlive", "bench", "--preset", preset.name, "--resolution", *(s.resolution for s in shapes),
             "--variants", *(v.id for v in variants), "--steps", *map(str, args.steps), "--blocks", str(args.blocks)]
    if args.last_step_cache:
        parts += ["--last-step-cache", *map(str, args.last_step_cache)]
    if args.decoder != "vae":
        parts += ["--decoder", args.decoder]
    for flag in ("block_frames", "window_frames", "context_tokens", "budget_s"):
        if getattr(args, flag) is not None:
            parts += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.skip:
        parts += ["--skip", *args.skip]
    return shlex.join(parts)


class Bench:
    """One benchmark run: settings, the result dict, the time budget and the stage wrapper."""

    def __init__(self, args, preset: Preset, shapes: list[BenchShape], variants: list[Variant], device: torch.device,
                 command: str) -> None:
        self.args, self.preset, self.shapes, self.variants, self.device = args, preset, shapes, variants, device
        self.cuda = device.type == "cuda"
        self.t_start = now()
        self.steps = args.steps
        label = torch.cuda.get_device_name(device) if self.cuda else _cpu_label()
        stem = args.name or f"bench_{preset.name}_{slug(label).strip('_') if self.cuda else 'cpu'}"
        self.path = Path(args.out_dir) / f"{stem}.json"
        self.res = {
            "device": label, "machine_kind": args.machine_kind, "torch": torch.__version__, "triton": version("triton"),
            "diffusers": version("diffusers"), "python": python_version(), "date": time.strftime("%Y-%m-%d"),
            "preset": preset.name, "command": command, "timing": TIMING[device.type if self.cuda else "cpu"],
            "timing_short": "CUDA events" if self.cuda else "wall clock, CPU",
            "threads": torch.get_num_threads() if not self.cuda else None,
            "resolutions": [s.resolution for s in shapes], "steps": {n: step_list(n, preset.inference.denoising_steps)
                                                                     for n in _dedupe(self.steps + args.last_step_cache)},
            "variant_ids": [v.id for v in variants], "shapes": {s.resolution: s.to_json() for s in shapes},
            "shape_text": {s.resolution: s.text() for s in shapes},
            "errors": {}, "skipped": {}, "rows": [], "variants": {}, "end_to_end": [], "ceiling": {},
            "vae": "not built yet", "vae_options": {}, "vae_profile": {}, "notes": NOTES,
        }

    # ------------------------------------------------------------------ bookkeeping

    def left(self) -> float:
        return float("inf") if self.args.budget_s is None else self.args.budget_s - (now() - self.t_start)

    def save(self) -> None:
        self.res["wall_s"] = round(now() - self.t_start, 1)
        write_results(self.res, self.path)

    def skipped(self, *names: str) -> bool:
        return any(n in self.args.skip for n in names)

    def stage(self, name: str, fn, min_left: float = 0.0, kind: str | None = None):
        """Run ``fn`` under ``torch.no_grad``; an exception is recorded, never fatal; the results are saved after."""
        if self.skipped(name, kind or name):
            self.res["skipped"][name] = "--skip"
            return None
        if self.left() < min_left:
            self.res["errors"][name] = f"skipped: {self.left():.0f} s of the time budget left"
            print(f"skip {name}: budget", flush=True)
            return None
        t0 = now()
        try:
            with torch.no_grad():
                return fn()
        except Exception as e:  # noqa: BLE001 - one stage failing must not lose the others
            traceback.print_exc()
            self.res["errors"][name] = f"{type(e).__name__}: {e}"[:500]
            return None
        finally:
            print(f"[{name}] {now() - t0:.1f} s (total {now() - self.t_start:.0f} s)", flush=True)
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
            self.save()

    # ------------------------------------------------------------------ stages

    def run(self) -> int:
        res, device, shapes = self.res, self.device, self.shapes
        from longlive.quant.fp8 import fp8_gemm_available

        if self.cuda:
            res["kernels_resolution"] = shapes[0].resolution
            res["kernels"] = self.stage("kernels", lambda: kernel_checks(shapes[0], device)) or []
        else:
            res["skipped"]["kernels"] = "needs CUDA (the Triton kernels run in Triton's interpreter only in tests)"
        for s in shapes:
            c = res["ceiling"][s.resolution] = {}
            c["bf16"] = self.stage(f"ceiling {s.resolution}", partial(ceiling, s, device, False, self.steps),
                                   kind="ceiling") or {}
            if fp8_gemm_available(device):
                c["fp8"] = self.stage(f"ceiling_fp8 {s.resolution}", partial(ceiling, s, device, True, self.steps),
                                      kind="ceiling") or {}
            else:
                res["skipped"]["ceiling fp8"] = "needs torch._scaled_mm (CUDA, compute capability >= 8.9)"

        vae, vae_best = None, {}
        if self.skipped("vae"):
            res["vae"] = "excluded: --skip vae (rows time the DiT alone)"
        else:
            vae, res["vae"] = build_decoder(self.preset, device, self.args.decoder)
        if vae is not None:
            for s in shapes:
                opts = res["vae_options"][s.resolution] = []
                # diffusers' modules (fused norms off / on, 1 or 4 latent frames per call), then the channels-last
                # decoder (longlive.inference.fast_vae: inference.vae_decoder: fast)
                options = ((1, False, False),) if is_light(vae) else (
                    (1, False, False), (1, True, False), (4, True, False), (1, True, True))
                for fpc, kern, fast in options:
                    v = self.stage(f"vae {s.resolution} fpc={fpc} kernels={kern}" + (" fast" if fast else ""), partial(
                        vae_block_time, vae, s, device, frames_per_call=fpc, kernels=kern, fast=fast), min_left=300,
                        kind="vae")
                    if v:
                        opts.append(v)
                if opts:
                    best = min(opts, key=lambda v: v["block_decode_s"])
                    vae_best[s.resolution] = (best["frames_per_call"], best["kernels"], best["fast"])
                    if self.cuda:
                        res["vae_profile"][s.resolution] = {str(k): self.stage(
                            f"vae profile {s.resolution} kernels={k}", partial(
                                vae_block_time, vae, s, device, blocks=2, frames_per_call=1, kernels=k, profile=True),
                            kind="vae") for k in ((False,) if is_light(vae) else (False, True))}
        if not self.cuda:
            res["skipped"]["profile"] = "needs CUDA (torch.profiler's device time)"

        model = BenchModel(self.preset, device)
        res["bf16_weights_gib"] = model.bf16_bytes / 2**30
        g = torch.Generator().manual_seed(3)
        shape0 = shapes[0]
        context = torch.randn(1, shape0.context_tokens, shape0.text_dim, generator=g) * 0.5
        contexts = [context.to(device, torch.bfloat16)]
        warmed_vae: set[str] = set()
        last_e2e = max((i for i, v in enumerate(self.variants) if v.id in E2E_VARIANTS), default=None)

        def rows(v: Variant, s: BenchShape) -> None:
            name = model.name(v)
            inference = inference_for(self.preset, s, v)
            fpc, vae_kernels, vae_fast = vae_best.get(s.resolution, (
                inference.vae_frames_per_call, inference.kernels, inference.vae_decoder == "fast"))
            common = {"plain": v.plain, "kv_cache": v.kv_cache, "vae": vae, "vae_frames_per_call": fpc,
                      "vae_kernels": vae_kernels, "vae_fast": vae_fast, "video_fps": self.preset.video.fps}
            weights_gib = weight_bytes(model.dit) / 2**30
            # one unmeasured block: compilation, autotuning, the allocator (and the decoder's first call)
            stream_blocks(model.dit, inference, s, device, contexts, steps=self.steps[0], blocks=1,
                          **{**common, "vae": vae if s.resolution not in warmed_vae else None})
            warmed_vae.add(s.resolution)
            for steps, cache_pass in [(n, True) for n in self.steps] + [(n, False) for n in self.args.last_step_cache]:
                r = stream_blocks(model.dit, inference, s, device, contexts, steps=steps, cache_pass=cache_pass,
                                  blocks=self.args.blocks, **common)
                key = f"{name} | {s.resolution} | {steps} steps" + ("" if cache_pass else " | last step writes")
                r["weights_gib"] = weights_gib
                res["variants"][key] = r
                row = summarize(name, v.id, s, r)
                row["weights_gib"] = weights_gib
                res["rows"].append(row)
                print(json.dumps(row), flush=True)
                self.save()

        for i, v in enumerate(self.variants):
            if v.weights == "nvfp4" and model.nvfp4_backend is None:
                conv = self.stage("nvfp4 convert", partial(model.to_nvfp4, self.args.nvfp4_backend), min_left=100,
                                  kind=v.id)
                res["nvfp4_conversion"] = conv
                if conv is None:
                    break  # every later variant is NVFP4
            model.setup(v)
            for s in shapes:
                self.stage(f"{model.name(v)} {s.resolution}", partial(rows, v, s), min_left=v.min_left, kind=v.id)
            model.teardown(v)
            if i == last_e2e:
                self.end_to_end(model, vae, vae_best, contexts)

        # last: a torch.profiler (CUPTI) session slows every later kernel launch on the host, which turned
        # launch-heavy rows measured after it (FP8 linears, 480x832) host-bound on an H200
        bf16 = next((v for v in self.variants if v.id == "bf16-fast"), None)
        if bf16 is not None and self.cuda and model.nvfp4_backend is None:
            model.setup(bf16)
            res["profile"] = self.stage("profile", partial(
                profile_block, model.dit, inference_for(self.preset, shape0, bf16), shape0, device, contexts,
                steps=max(self.steps), video_fps=self.preset.video.fps), min_left=60)
            model.teardown(bf16)

        if model.nvfp4_backend is not None:
            res["nvfp4_weights_gib"] = weight_bytes(model.dit) / 2**30
        self.save()
        print_table(res)
        print(f"wrote {self.path} and {self.path.with_suffix('.md')} in {now() - self.t_start:.0f} s", flush=True)
        return 0

    def end_to_end(self, model: BenchModel, vae, vae_best: dict, contexts) -> None:
        """Per step count: bf16 fast and the fastest other variant, with async decoding, over 8 steady blocks
        (a single steady block would leave the figure to one decode's jitter)."""
        if vae is None:
            self.res["skipped"]["end_to_end"] = "no VAE"
            return
        by_id = {v.id: v for v in VARIANTS}
        for s in self.shapes:
            cands = [r for r in self.res["rows"] if r["variant_id"] in E2E_VARIANTS and r["cache_pass"]
                     and r["resolution"] == s.resolution]
            targets = []
            for steps in sorted(self.steps, reverse=True):
                at = [r for r in cands if r["steps"] == steps]
                if any(r["variant_id"] == "bf16-fast" for r in at):
                    targets.append(("bf16-fast", steps))
                others = [r for r in at if r["variant_id"] != "bf16-fast"]
                if others:
                    targets.append((max(others, key=lambda r: r["dit_fps"])["variant_id"], steps))
            for vid, steps in _dedupe(targets):
                v = by_id[vid]
                fpc, kern, fast = vae_best.get(s.resolution, (self.preset.inference.vae_frames_per_call, True,
                                                              self.preset.inference.vae_decoder == "fast"))

                def run(v=v, steps=steps, s=s, fpc=fpc, kern=kern, fast=fast):
                    model.setup(v)
                    try:
                        e = end_to_end(model.dit, inference_for(self.preset, s, v), s, vae, self.device, contexts,
                                       steps=steps, blocks=max(self.args.blocks, s.warm_blocks + 9), frames_per_call=fpc,
                                       vae_kernels=kern, vae_fast=fast, video_fps=self.preset.video.fps)
                    finally:
                        model.teardown(v)
                    e["variant"] = model.name(v)
                    self.res["end_to_end"].append(e)
                    return e

                self.stage(f"end_to_end {vid} {steps} {s.resolution}", run, min_left=60, kind="end_to_end")


def _cpu_label() -> str:
    from longlive.eval.perf import device_name

    return device_name(torch.device("cpu"))


def run(args: argparse.Namespace, command: str | None = None) -> int:
    """The body of ``longlive bench``; ``command`` is what the report says produced it (default: the
    effective settings as a ``longlive bench`` command)."""
    try:
        preset = load_preset(args.preset, args.params)
        resolutions = _dedupe(args.resolution or [(preset.video.height, preset.video.width)])
        shapes = [bench_shape(preset, r, block_frames=args.block_frames, window_frames=args.window_frames,
                              context_tokens=args.context_tokens) for r in resolutions]
        args.steps = _dedupe(args.steps)
        args.last_step_cache = _dedupe(args.last_step_cache)
        for n in args.steps + args.last_step_cache:
            step_list(n)
        wanted = set(VARIANT_IDS if args.variants and "all" in args.variants else args.variants or DEFAULT_VARIANTS)
        variants = [v for v in VARIANTS if v.id in wanted and v.id not in args.skip and v.name not in args.skip
                    and not ("nvfp4" in args.skip and v.weights == "nvfp4")]
        if not variants:
            raise ConfigError("no variant left to run (--variants / --skip)")
        if args.blocks is None:
            # + 2 blocks to capture the steady block's CUDA graphs (steps, then the cache pass), + 2 steady ones
            args.blocks = max(s.warm_blocks for s in shapes) + 4
        if args.blocks < 1:
            raise ConfigError(f"--blocks {args.blocks} must be >= 1")
        device = resolve_device(args.device or preset.device)  # a DeviceError is a ConfigError
    except ConfigError as e:
        print(f"longlive bench: {e}", file=sys.stderr)
        return 2
    threads = args.threads or (preset.cpu_threads if device.type == "cpu" else None)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        bench = Bench(args, preset, shapes, variants, device, command or command_line(args, preset, shapes, variants))
        print(f"{len(shapes)} resolution(s) x {len(variants)} variant(s) x {len(args.steps) + len(args.last_step_cache)} "
              f"step setting(s), {args.blocks} blocks each, on {bench.res['device']}: {bench.path}", flush=True)
        return bench.run()
    finally:
        torch.set_num_threads(before)
