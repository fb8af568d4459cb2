"""Variants of one random-weight DiT streamed through the library's pipeline (``StreamingPipeline``, the code
``longlive generate`` runs), with the VAE decoding each block, and the per-block accounting of a row:

    total (wall) = DiT (denoising steps) + cache pass (t=0 write) + VAE (decode + host copy) + other

``DiT`` and ``cache pass`` are the pipeline's own marks (CUDA events on a GPU, host time on the CPU), ``VAE``
and ``total`` wall time with the device synchronized around them; ``other`` is the rest (noise, Python,
launch latency the GPU waited on), so the four add up to the total. Steady state: the blocks after the cache
holds a full window (every later block costs the same); the first block's total is the first-block latency.
"""

from __future__ import annotations

import json
import warnings

import torch

from longlive.bench.args import Variant
from longlive.bench.harness import now, sync
from longlive.bench.shapes import BenchShape, step_list
from longlive.config import InferenceConfig, Preset
from longlive.eval.perf import PeakMemory
from longlive.inference import optimize
from longlive.inference.build import apply_inference_path, build_dit
from longlive.inference.pipeline import StreamingPipeline
from longlive.inference.schedule import PromptSchedule, stream_block_sizes
from longlive.models.dit import WanDiT


def random_dit(preset: Preset, device: torch.device, dtype: torch.dtype = torch.bfloat16,
               seed: int | None = None) -> WanDiT:
    """The preset's DiT with random weights (PyTorch's default init, drawn on ``device``; from ``seed`` if given,
    so every rank of one GPU type draws the same), stored as ``load_dit(dtype=...)`` stores it: in ``dtype``,
    with norms, adaLN tables and the time embedder in float32."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        dit = WanDiT(preset.dit, preset.vae.z_dim, preset.text.dim)
    if dtype != torch.float32:
        dit.to(dtype)
        for name, p in dit.named_parameters():
            if any(part in WanDiT.keep_in_fp32 for part in name.split(".")):
                p.data = p.data.float()
    return dit.eval()


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + [b for b in module.buffers() if b is not None])


class BenchModel:
    """One DiT (random weights through :func:`~longlive.inference.build.build_dit`) set up for each variant in turn:
    kernels and context memo off for the plain path, FP8 linears swapped in and back, NVFP4 converted in place
    (:meth:`to_nvfp4`, once, after every bf16/FP8 variant), then the variant's inference path -- the build's own
    step, :func:`~longlive.inference.build.apply_inference_path` -- since bench measures several paths on one set
    of weights (the pipeline streams the model as it finds it)."""

    def __init__(self, preset: Preset, device: torch.device) -> None:
        self.preset, self.device = preset, device
        self.dit = build_dit(random_dit(preset, device), preset, device=device)
        self.bf16_bytes = weight_bytes(self.dit)
        self.nvfp4_backend: str | None = None
        self._fp8_originals: dict | None = None

    def name(self, v: Variant) -> str:
        name = v.name.format(backend=self.nvfp4_backend or "not converted")
        from longlive.quant.fp8 import fp8_gemm_available

        if v.weights == "fp8" and not fp8_gemm_available(self.device):
            name += " (emulated)"
        elif v.fp8_attention != "off" and self.device.type != "cuda":
            name += " (reference)"
        return name

    def fp8_on(self) -> None:
        from longlive.quant.fp8 import convert_to_fp8

        optimize.remove_context_memo(self.dit)  # the memo wraps modules the conversion replaces
        self._fp8_originals = {n: m for n, m in self.dit.named_modules() if isinstance(m, torch.nn.Linear)}
        convert_to_fp8(self.dit)

    def fp8_off(self) -> None:
        from longlive.quant.convert import _set_module
        from longlive.quant.fp8 import FP8Linear

        for n, m in list(self.dit.named_modules()):
            if isinstance(m, FP8Linear):
                _set_module(self.dit, n, self._fp8_originals[n])
        self._fp8_originals = None

    def uncompile(self) -> None:
        for m in self.dit.modules():
            if getattr(m, "_compiled_call_impl", None) is not None:
                m._compiled_call_impl = None

    def to_nvfp4(self, backend: str = "auto") -> dict:
        from longlive.quant.convert import convert_to_nvfp4

        optimize.remove_context_memo(self.dit)
        rep = convert_to_nvfp4(self.dit, backend=backend, device=self.device)
        self.nvfp4_backend = rep.backend
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return {"backend": rep.backend, "quantized": len(rep.quantized), "kept": rep.kept}

    def setup(self, v: Variant) -> None:
        if v.weights == "nvfp4" and self.nvfp4_backend is None:
            raise RuntimeError(f"variant {v.id} needs the NVFP4 conversion, which did not run")
        if v.weights == "fp8":
            self.fp8_on()
        if not v.kernels:
            optimize.remove_kernels(self.dit)
        if v.plain:
            optimize.remove_context_memo(self.dit)
        inference = variant_inference(self.preset, v)
        if inference.kernels or inference.compile or inference.fp8:
            apply_inference_path(self.dit, inference)

    def teardown(self, v: Variant) -> None:
        if v.weights == "fp8":
            self.fp8_off()
        if v.compile:
            self.uncompile()


def variant_inference(preset: Preset, v: Variant) -> InferenceConfig:
    """The preset's inference settings with ``v``'s switches (FP8 linears are :class:`BenchModel`'s own, reversible
    swap, so the inference path never converts them)."""
    return preset.inference.model_copy(update={"kernels": v.kernels, "compile": v.compile, "fp8": False,
                                               "fp8_attention": v.fp8_attention, "cuda_graphs": v.cuda_graphs})


def inference_for(preset: Preset, shape: BenchShape, v: Variant | None = None, **update) -> InferenceConfig:
    """The preset's inference settings at ``shape``'s block and window, with ``v``'s switches (see
    :func:`variant_inference`)."""
    cfg = variant_inference(preset, v) if v is not None else preset.inference.model_copy(update={"fp8": False})
    return cfg.model_copy(update={"block_frames": shape.block_frames, "window_frames": shape.window_frames, **update})


def _plans(shape: BenchShape, blocks: int, video_fps: int):
    sizes = stream_block_sizes(blocks * shape.block_frames, shape.block_frames)
    return PromptSchedule.single("random").plan(sizes, video_fps, shape.pixel_frames_per_latent)


def stream_blocks(dit: WanDiT, inference: InferenceConfig, shape: BenchShape, device: torch.device, contexts, *,
                  steps: int, cache_pass: bool = True, blocks: int, plain: bool = False, kv_cache: str = "dense",
                  vae=None, vae_frames_per_call: int = 1, vae_kernels: bool = False, vae_fast: bool = False,
                  video_fps: int = 24) -> dict:
    """Stream ``blocks`` blocks, decoding each one right after it (synchronously, on the same device), and
    time every block's parts (see the module docstring). Host syncs inside the chunk loop are counted on
    CUDA (``torch.cuda.set_sync_debug_mode``). Peak memory over the stream, decoding included:
    ``torch.cuda.max_memory_allocated`` on CUDA, else :class:`~longlive.eval.perf.PeakMemory`'s RSS figure;
    on CUDA also the peak while the DiT ran (``dit_peak_mem_gib``: weights, KV cache, activations, and the
    resident VAE weights, as the bf16 / NVFP4 memory comparison needs)."""
    cfg = inference.model_copy(update={"denoising_steps": step_list(steps, inference.denoising_steps),
                                       "cache_from_last_step": not cache_pass})
    pipe = StreamingPipeline(dit, cfg, device, kv_cache=kv_cache)
    if plain:  # the reference path: KVCache's per-layer tensors, concatenated at every layer and step
        pipe.cache.storage = None
    decoded: list[int] = []
    decoder = None
    if vae is not None:
        from longlive.bench.vae import set_kernels
        from longlive.inference.writer import BlockDecoder

        set_kernels(vae, vae_kernels and not vae_fast)
        decoder = BlockDecoder(vae, lambda i, f: decoded.append(len(f)), device=device, async_decode=False,
                               frames_per_call=vae_frames_per_call, fast=vae_fast)
    cuda = device.type == "cuda"
    it = iter(pipe.stream(_plans(shape, blocks, video_fps), contexts, shape.latent,
                          generator=torch.Generator().manual_seed(0)))
    per_block = []
    row_peak = dit_peak = 0  # CUDA: the most allocated in the stream, and while the DiT ran (reset per block)
    with PeakMemory(device) as mem:
        sync(device)
        start = now()
        for i in range(blocks):
            if cuda:
                row_peak = max(row_peak, torch.cuda.max_memory_allocated(device))
                torch.cuda.reset_peak_memory_stats(device)
            t0 = now()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if cuda:
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    out = next(it)
                finally:
                    if cuda:
                        torch.cuda.set_sync_debug_mode(0)
            captured = pipe.graphs.counts["captured"] if pipe.graphs is not None else 0
            t_issued = now()  # the chunk loop never syncs: the host has enqueued the block's work here
            sync(device)
            t_dit = now()
            if cuda:
                dit_peak = max(dit_peak, torch.cuda.max_memory_allocated(device))
            if decoder is not None:
                decoder.submit(i, out.latents)
                sync(device)
            t1 = now()
            t = out.timings
            dit_s, cache_s = t["denoise_s"], t["cache_s"] + t.get("recache_s", 0.0)
            vae_s = t1 - t_dit if decoder is not None else 0.0
            frames = decoded[-1] if decoder is not None else (
                shape.pixel_frames_per_block if i else 1 + shape.pixel_frames_per_latent * (shape.block_frames - 1))
            per_block.append({
                "block": i, "denoise_s": dit_s, "cache_s": cache_s, "vae_s": vae_s, "total_s": t1 - t0,
                "other_s": (t1 - t0) - dit_s - cache_s - vae_s, "wall_dit_s": t_dit - t0, "host_s": t_issued - t0,
                "done_at_s": t1 - start,
                "pixel_frames": frames, "cache_frames": len(t["cache_frames"]), "cache_bytes": t["cache_bytes"],
                "host_syncs": sum("synchroniz" in str(w.message).lower() for w in caught) if cuda else None,
                "graphs_captured": captured})
        finite = bool(torch.isfinite(out.latents).all())
    peak_gib = mem.peak_mb / 1024 if mem.peak_mb is not None else None
    if cuda:  # PeakMemory's CUDA figure only covers the last block once the statistics were reset
        peak_gib = max(row_peak, torch.cuda.max_memory_allocated(device)) / 2**30
    if decoder is not None:
        decoder.close()
    r = {"steps": steps, "cache_pass": cache_pass, "blocks": per_block, "finite": finite, "vae": decoder is not None,
         "cuda_graphs": dict(pipe.graphs.counts) if pipe.graphs is not None else None,
         "peak_mem_gib": peak_gib, "peak_mem_kind": mem.kind, "dit_peak_mem_gib": dit_peak / 2**30 if cuda else None,
         "kv_cache_gib": per_block[-1]["cache_bytes"] / 2**30}
    storage = pipe.cache.storage
    if storage is not None and hasattr(storage, "allocated_bytes"):
        r["kv_cache_allocated_gib"] = storage.allocated_bytes() / 2**30
    del pipe, it
    return r


def steady_from(shape: BenchShape, blocks: list[dict]) -> int:
    """First steady block of a stream's per-block records: the first with a full window when there is one, else the
    second (else the first); and after the last block that captured a CUDA graph (its capture is warm-up)."""
    n = len(blocks)
    first = shape.warm_blocks if n > shape.warm_blocks else min(1, n - 1)
    last_capture, before = -1, 0
    for i, b in enumerate(blocks):  # graphs_captured: the pipeline's running count after the block
        if b.get("graphs_captured", 0) > before:
            last_capture, before = i, b["graphs_captured"]
    return max(first, min(last_capture + 1, n - 1))


def summarize(name: str, variant_id: str, shape: BenchShape, r: dict) -> dict:
    """One table row: the steady blocks' means, the first-block latency, the stream's memory."""
    first = steady_from(shape, r["blocks"])
    bs = r["blocks"][first:]
    n, frames = len(bs), sum(b["pixel_frames"] for b in bs)

    def ms(key: str) -> float:
        return 1e3 * sum(b[key] for b in bs) / n

    dit, cache, total = ms("denoise_s"), ms("cache_s"), ms("total_s")
    syncs = [b["host_syncs"] for b in bs if b["host_syncs"] is not None]
    return {
        "variant": name, "variant_id": variant_id, "resolution": shape.resolution, "steps": r["steps"],
        "cache_pass": r["cache_pass"], "blocks": len(r["blocks"]), "steady_blocks": n, "steady_from_block": first,
        "window_full": len(r["blocks"]) > shape.warm_blocks,
        "block_ms": dit + cache, "step_ms": dit / r["steps"], "dit_ms": dit, "cache_pass_ms": cache,
        "vae_ms": ms("vae_s") if r["vae"] else None, "other_ms": ms("other_s"), "total_ms": total,
        "wall_block_ms": ms("wall_dit_s"), "host_ms": ms("host_s"),
        "dit_fps": frames / (n * (dit + cache) * 1e-3), "steady_fps": frames / (n * total * 1e-3),
        "first_block_latency_s": r["blocks"][0]["done_at_s"],
        "host_syncs_per_block": max(syncs) if syncs else None,
        "peak_mem_gib": r["peak_mem_gib"], "peak_mem_kind": r["peak_mem_kind"], "dit_peak_mem_gib": r["dit_peak_mem_gib"],
        "kv_cache_gib": r["kv_cache_gib"],
        "finite": r["finite"],
    }


def end_to_end(dit: WanDiT, inference: InferenceConfig, shape: BenchShape, vae, device: torch.device, contexts, *,
               steps: int, blocks: int, kv_cache: str = "dense", frames_per_call: int = 1, vae_kernels: bool = True,
               vae_fast: bool = False,
               video_fps: int = 24) -> dict:
    """The pipeline as ``longlive generate`` runs it: the VAE decoding in its worker thread (its own CUDA
    stream) on the same device, overlapping the next block."""
    from longlive.bench.vae import set_kernels
    from longlive.inference.writer import BlockDecoder

    inference = inference.model_copy(update={"denoising_steps": step_list(steps, inference.denoising_steps)})
    pipe = StreamingPipeline(dit, inference, device, kv_cache=kv_cache)
    counted = []
    set_kernels(vae, vae_kernels and not vae_fast)
    decoder = BlockDecoder(vae, lambda i, f: counted.append(len(f)), device=device, async_decode=True,
                           frames_per_call=frames_per_call, fast=vae_fast)
    sync(device)
    t0 = now()
    for out in pipe.stream(_plans(shape, blocks, video_fps), contexts, shape.latent,
                           generator=torch.Generator().manual_seed(0)):
        decoder.submit(out.plan.index, out.latents)
    timings = decoder.close()
    total = now() - t0
    done = [d["done_at"] - t0 for d in sorted(timings, key=lambda d: d["block"])]
    warm = min(shape.warm_blocks + 2, blocks - 2)  # steady once the window is full and its CUDA graphs captured
    r = {"resolution": shape.resolution, "steps": steps, "blocks": blocks, "vae_frames_per_call": frames_per_call,
         "vae_kernels": vae_kernels, "vae_fast": vae_fast, "first_block_latency_s": done[0], "total_s": total, "pixel_frames": sum(counted),
         "steady_fps": sum(counted[warm + 1:]) / (done[-1] - done[warm]),
         "decode_s_per_block": [d["decode_s"] for d in sorted(timings, key=lambda d: d["block"])]}
    print(json.dumps(r), flush=True)
    return r


def profile_block(dit: WanDiT, inference: InferenceConfig, shape: BenchShape, device: torch.device, contexts, *,
                  steps: int = 4, video_fps: int = 24) -> dict:
    """GPU time of one steady block by kernel family (torch.profiler, CUDA), to place the gap to the ceiling."""
    from torch.profiler import ProfilerActivity, profile

    inference = inference.model_copy(update={"denoising_steps": step_list(steps, inference.denoising_steps)})
    pipe = StreamingPipeline(dit, inference, device)
    warm = shape.warm_blocks
    it = iter(pipe.stream(_plans(shape, warm + 1, video_fps), contexts, shape.latent,
                          generator=torch.Generator().manual_seed(0)))
    for _ in range(warm):
        next(it)
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        next(it)
        sync(device)
    families = {"gemm": 0.0, "attention": 0.0, "fused kernels (ours)": 0.0, "copies": 0.0, "other": 0.0}
    per_kernel = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        if not t or e.key.startswith(("ProfilerStep", "cuda")):
            continue
        name = e.key.lower()
        if any(k in name for k in ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "_kernel_mm", "scaled_mm")):
            fam = "gemm"
        elif any(k in name for k in ("flash", "fmha", "attention", "sdpa")):
            fam = "attention"
        elif any(k in name for k in ("_rope_kernel", "_layernorm_modulate", "_gated_residual", "_fp8_rows", "_quantize_rows")):
            fam = "fused kernels (ours)"
        elif "copy" in name or "memcpy" in name or "memset" in name:
            fam = "copies"
        else:
            fam = "other"
        families[fam] += t / 1e3
        per_kernel[e.key[:90]] = per_kernel.get(e.key[:90], 0.0) + t / 1e3
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:15]
    r = {"resolution": shape.resolution, "steps": steps, "block_ms_by_family": families,
         "total_ms": sum(families.values()), "top_kernels_ms": top}
    print(json.dumps(r), flush=True)
    return r
