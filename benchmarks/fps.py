"""Streaming FPS at LongLive 2.0's real shapes on one GPU, random weights (issue 6).

Wan2.2-TI2V-5B DiT (30 layers, dim 3072, 24 heads, ffn 14336) at 704x1280 (latent 44x80, 880 tokens per
latent frame), blocks of 8 latent frames (= 32 video frames: the causal VAE gives 4 pixel frames per latent
frame after the first), a local window of 24 cached + 8 new latent frames, 4 or 2 denoising steps plus the
pass that writes the KV cache, UMT5-sized context of 512 random embeddings. Everything runs through the
library's streaming pipeline (``StreamingPipeline``), the same code ``longlive generate`` uses.

One process, in order (each stage appends to the JSON, so a timeout keeps what finished):

1. kernel checks at real sizes: each Triton kernel against its PyTorch reference (error, and both timed);
   the FP8 GEMM path against its float32 emulation;
2. the ceiling: one layer's GEMMs + attention timed alone (bf16, and with FP8 GEMMs), x 30 layers x passes;
3. the Wan2.2 VAE decoder (diffusers ``AutoencoderKLWan``, 5B config, random weights, bf16) decoding one
   block of 8 latent frames, alone;
4. variants of the DiT, each streamed for several blocks (steady state = a full window of 24 cached frames):
   ``bf16 plain`` (the reference path: per-layer ``torch.cat`` KV cache, PyTorch elementwise ops),
   ``bf16 fast`` (in-place KV cache, fused kernels, per-prompt context), ``+ compile``, ``fp8`` (row-wise
   E4M3 linears), ``nvfp4`` (Triton W4A4 backend), ``nvfp4 + nvfp4 KV``; per block: GPU time (CUDA events),
   the cache pass, host syncs inside the loop (``torch.cuda.set_sync_debug_mode``), peak memory;
5. end to end with the VAE decoding in its worker thread on its own CUDA stream, on the same GPU: steady
   FPS and first-block latency.

    python benchmarks/fps.py --out-dir benchmarks/results            # writes fps_<gpu>.{json,md}
    python benchmarks/fps.py --smoke                                  # tiny shapes, any device: the code paths

Imports torch, triton, diffusers (optional: without it the VAE is excluded and the report says so) and
longlive (pydantic, yaml).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from longlive.config import DiTConfig, load_preset  # noqa: E402
from longlive.inference import fast  # noqa: E402
from longlive.inference.pipeline import StreamingPipeline, step_sigmas  # noqa: E402
from longlive.inference.schedule import PromptSchedule, block_sizes  # noqa: E402
from longlive.models.dit import WanDiT  # noqa: E402

STEPS = {4: [1000, 750, 500, 250], 2: [1000, 500]}
PIXEL_FRAMES_PER_LATENT = 4  # the causal VAE: 4 pixel frames per latent frame (the video's very first latent gives 1)


def now() -> float:
    return time.perf_counter()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_ms(fn, device) -> float:
    if device.type == "cuda":
        import triton

        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    t0 = now()
    for _ in range(3):
        fn()
    return (now() - t0) / 3 * 1e3


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


# ----------------------------------------------------------------------------- 1. kernels at real sizes


def kernel_checks(shape: dict, device) -> list[dict]:
    from kernels import adaln, adaln_ref, fp8_quant, fp8_quant_ref, rope, rope_ref
    from longlive.models.rope import rope_freqs
    from longlive.quant.fp8 import FP8Linear, fp8_gemm_available

    g = torch.Generator(device=device).manual_seed(0)
    D, H, hd, ft, bf = shape["dim"], shape["heads"], shape["dim"] // shape["heads"], shape["frame_tokens"], shape["block_frames"]
    S, S_k = bf * ft, (bf + shape["window_frames"]) * ft
    out = []

    def record(name, got, ref, fn_kernel, fn_ref, bytes_moved, exact=False):
        r = {"kernel": name, "max_rel_err": max_rel(got, ref), "rel_l2_err": rel_err(got, ref),
             "kernel_ms": bench_ms(fn_kernel, device), "reference_ms": bench_ms(fn_ref, device)}
        if exact:
            r["bit_exact"] = bool(torch.equal(got.view(torch.uint8), ref.view(torch.uint8)))
        r["speedup"] = r["reference_ms"] / r["kernel_ms"]
        r["kernel_GBps"] = bytes_moved / (r["kernel_ms"] * 1e-3) / 1e9
        out.append(r)
        print(json.dumps(r), flush=True)

    # RoPE on the keys of a full window, read from a preallocated cache buffer (a strided view)
    buf = torch.randn(1, S_k + ft, H, hd, device=device, generator=g, dtype=torch.bfloat16)
    k = buf[:, :S_k]
    cos, sin = rope_freqs(hd, torch.arange(S_k // ft), shape["h"], shape["w"], device=device)
    record("rope (keys, full window)", rope.apply_rope(k, cos, sin), rope_ref.apply_rope(k, cos, sin),
           lambda: rope.apply_rope(k, cos, sin), lambda: rope_ref.apply_rope(k, cos, sin), 2 * k.numel() * 2)
    # LayerNorm + adaLN on one block, per-frame modulation; affine LayerNorm; gated residual
    x = torch.randn(1, S, D, device=device, generator=g, dtype=torch.bfloat16) * 3
    h = torch.randn(1, S, D, device=device, generator=g, dtype=torch.bfloat16)
    scale, shift, gate = (torch.randn(1, bf, 1, D, device=device, generator=g) * 0.3 for _ in range(3))
    w, b = torch.randn(D, device=device, generator=g) + 1, torch.randn(D, device=device, generator=g)
    record("layernorm + adaLN modulation", adaln.layernorm_modulate(x, scale, shift), adaln_ref.layernorm_modulate(x, scale, shift),
           lambda: adaln.layernorm_modulate(x, scale, shift), lambda: adaln_ref.layernorm_modulate(x, scale, shift),
           2 * x.numel() * 2)
    record("layernorm affine", adaln.layernorm_modulate(x, weight=w, bias=b), adaln_ref.layernorm_modulate(x, weight=w, bias=b),
           lambda: adaln.layernorm_modulate(x, weight=w, bias=b), lambda: adaln_ref.layernorm_modulate(x, weight=w, bias=b),
           2 * x.numel() * 2)
    record("gated residual", adaln.gated_residual(x, h, gate), adaln_ref.gated_residual(x, h, gate),
           lambda: adaln.gated_residual(x, h, gate), lambda: adaln_ref.gated_residual(x, h, gate), 3 * x.numel() * 2)
    # the VAE decoder's channel RMS norm + SiLU at its largest stage (256 channels, 4 frames of 352x640)
    from kernels import channel_rmsnorm, channel_rmsnorm_ref

    v = torch.randn(1, 256, 4, 8 * shape["lat_h"], 8 * shape["lat_w"], device=device, generator=g, dtype=torch.bfloat16)
    gam = (torch.randn(256, 1, 1, 1, device=device, generator=g) * 0.2 + 1).to(torch.bfloat16)
    record("VAE channel RMS norm + SiLU", channel_rmsnorm.rms_norm(v, gam, silu=True),
           channel_rmsnorm_ref.rms_norm(v, gam, silu=True), lambda: channel_rmsnorm.rms_norm(v, gam, silu=True),
           lambda: channel_rmsnorm_ref.rms_norm(v, gam, silu=True), 2 * v.numel() * 2)
    # FP8 row-wise activation quantization (bit-exact), FFN-up sized activations too
    for K in (D, shape["ffn"]):
        a = torch.randn(S, K, device=device, generator=g, dtype=torch.bfloat16)
        codes, scales = fp8_quant.quantize_rows(a)
        rc, rs = fp8_quant_ref.quantize_rows(a)
        r_exact = bool(torch.equal(codes.view(torch.uint8), rc.view(torch.uint8)) and torch.equal(scales, rs))
        record(f"fp8 row quantization K={K}", codes.float() * scales, rc.float() * rs,
               lambda: fp8_quant.quantize_rows(a), lambda: fp8_quant_ref.quantize_rows(a), a.numel() * 3)
        out[-1]["bit_exact"] = r_exact
        del a, codes, rc
    # FP8 GEMM (torch._scaled_mm, row-wise) vs its float32 emulation and vs the bf16 linear
    if fp8_gemm_available(device):
        for K, N in ((D, D), (D, shape["ffn"]), (shape["ffn"], D)):
            lin = torch.nn.Linear(K, N, device=device, dtype=torch.bfloat16)
            layer = FP8Linear.from_linear(lin)
            a = torch.randn(S, K, device=device, generator=g, dtype=torch.bfloat16)
            y = layer(a)
            layer.emulated = True
            y_emu = layer(a)
            layer.emulated = False
            r = {"kernel": f"fp8 linear {K}x{N}", "max_rel_err_vs_emulated": max_rel(y, y_emu),
                 "rel_l2_vs_emulated": rel_err(y, y_emu), "rel_l2_vs_bf16": rel_err(y, lin(a)),
                 "fp8_ms": bench_ms(lambda: layer(a), device), "bf16_ms": bench_ms(lambda: lin(a), device),
                 "bias_in_gemm": FP8Linear._bias_in_gemm}
            qa, sa = fp8_quant.quantize_rows(a)
            r["fp8_gemm_only_ms"] = bench_ms(lambda: layer._scaled_mm(qa, sa), device)
            r["fp8_quant_only_ms"] = bench_ms(lambda: fp8_quant.quantize_rows(a), device)
            r["speedup"] = r["bf16_ms"] / r["fp8_ms"]
            r["fp8_TFLOPs"] = 2 * S * K * N / (r["fp8_ms"] * 1e-3) / 1e12
            out.append(r)
            print(json.dumps(r), flush=True)
            del lin, layer, a, y, y_emu
    return out


# ----------------------------------------------------------------------------- 2. the ceiling


def ceiling(shape: dict, device, fp8: bool) -> dict:
    """One layer's GEMMs + attention at a full window, timed alone (the issue's DiT-only ceiling)."""
    D, H, F_, ft, bf = shape["dim"], shape["heads"], shape["ffn"], shape["frame_tokens"], shape["block_frames"]
    S, S_k, L = bf * ft, (bf + shape["window_frames"]) * ft, shape["context_tokens"]
    g = torch.Generator(device=device).manual_seed(1)
    dt = torch.bfloat16

    def gemm(M, K, N):
        a = torch.randn(M, K, device=device, generator=g, dtype=dt)
        w = torch.randn(N, K, device=device, generator=g, dtype=dt) * K**-0.5
        if not fp8:
            return bench_ms(lambda: F.linear(a, w), device)
        from kernels.fp8_quant_ref import quantize_rows

        qa, sa = quantize_rows(a)
        qw, sw = quantize_rows(w)
        sw = sw.reshape(1, -1).contiguous()
        return bench_ms(lambda: torch._scaled_mm(qa, qw.t(), scale_a=sa, scale_b=sw, out_dtype=dt, use_fast_accum=True), device)

    parts = {
        "self q,k,v,o (4)": 4 * gemm(S, D, D),
        "cross q,o (2)": 2 * gemm(S, D, D),
        "cross k,v on context (2)": 2 * gemm(L, D, D),
        "ffn up": gemm(S, D, F_),
        "ffn down": gemm(S, F_, D),
    }
    q = torch.randn(1, H, S, D // H, device=device, generator=g, dtype=dt)
    kv = torch.randn(2, 1, H, S_k, D // H, device=device, generator=g, dtype=dt)
    ckv = torch.randn(2, 1, H, L, D // H, device=device, generator=g, dtype=dt)
    parts["self-attention (SDPA)"] = bench_ms(lambda: F.scaled_dot_product_attention(q, kv[0], kv[1]), device)
    parts["cross-attention (SDPA)"] = bench_ms(lambda: F.scaled_dot_product_attention(q, ckv[0], ckv[1]), device)
    layer_ms = sum(parts.values())
    forward_ms = shape["layers"] * layer_ms
    frames = bf * PIXEL_FRAMES_PER_LATENT
    r = {"gemm": "fp8 row-wise" if fp8 else "bf16", "parts_ms": parts, "layer_ms": layer_ms, "forward_ms": forward_ms}
    for steps in STEPS:
        r[f"fps_{steps}step_with_cache_pass"] = frames / ((steps + 1) * forward_ms * 1e-3)
        r[f"fps_{steps}step_no_cache_pass"] = frames / (steps * forward_ms * 1e-3)
    print(json.dumps(r), flush=True)
    return r


# ----------------------------------------------------------------------------- 3. the VAE


def build_vae(preset, device):
    try:
        from longlive.models.vae import WanVAE
    except ImportError as e:  # diffusers missing
        return None, f"excluded: diffusers is not importable here ({e})"
    with torch.device(device):
        vae = WanVAE(preset.vae)
    return vae.to(torch.bfloat16).eval(), "diffusers AutoencoderKLWan, Wan2.2-TI2V-5B config, random weights, bf16"


def vae_block_time(vae, shape, device, blocks: int = 3, frames_per_call: int = 1, kernels: bool = False,
                   profile: bool = False) -> dict:
    """Streaming decode of blocks of ``block_frames`` latent frames; the first block (with the video's first
    frame) is the warm-up; the others are steady blocks of 32 pixel frames. ``profile``: GPU kernel time of
    the last block by family (convolutions, other), against its wall time."""
    from longlive.data.video_io import frames_uint8

    from longlive.inference.fast_vae import apply_vae_kernels, remove_vae_kernels

    apply_vae_kernels(vae) if kernels else remove_vae_kernels(vae)
    dec = vae.streaming_decoder(frames_per_call=frames_per_call)
    C, bf = shape["z_dim"], shape["block_frames"]
    g = torch.Generator(device=device).manual_seed(2)
    times = []
    prof = None
    with torch.no_grad():
        for i in range(blocks):
            z = torch.randn(1, C, bf, shape["lat_h"], shape["lat_w"], device=device, generator=g)
            sync()
            with (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                  if profile and i == blocks - 1 and device.type == "cuda" else contextlib.nullcontext()) as prof:
                t0 = now()
                frames = frames_uint8(dec.decode(z)[0])
                sync()
                times.append(now() - t0)
            n_frames = frames.shape[0]
    steady = times[1:] or times
    r = {"frames_per_call": frames_per_call, "kernels": kernels,
         "block_decode_s": sum(steady) / len(steady), "first_block_decode_s": times[0], "pixel_frames_per_block": n_frames,
         "frame_shape": list(frames.shape[1:]),
         "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    if prof is not None:
        fam, per_kernel = {"convolution": 0.0, "other": 0.0}, {}
        for e in prof.key_averages():
            t = getattr(e, "self_device_time_total", 0.0) or 0.0
            if t:
                k = e.key.lower()
                conv = any(x in k for x in ("conv", "implicit", "wgrad", "dgrad", "xmma", "cudnn", "gemm", "nvjet"))
                fam["convolution" if conv else "other"] += t / 1e6
                per_kernel[e.key[:90]] = per_kernel.get(e.key[:90], 0.0) + t / 1e3
        r["gpu_kernel_s_by_family"] = fam
        r["top_kernels_ms"] = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:15]
        r["gpu_busy_fraction"] = sum(fam.values()) / times[-1]
    print(json.dumps(r), flush=True)
    return r


# ----------------------------------------------------------------------------- 4. DiT variants


def build_dit(cfg: DiTConfig, shape: dict, device) -> WanDiT:
    with torch.device(device):
        dit = WanDiT(cfg, shape["z_dim"], shape["text_dim"])
    dit.to(torch.bfloat16)
    for name, p in dit.named_parameters():  # as load_dit(dtype=bf16): norms, adaLN tables, time embedder in fp32
        if any(part in WanDiT.keep_in_fp32 for part in name.split(".")):
            p.data = p.data.float()
    return dit.eval()


def weight_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + [b for b in module.buffers() if b is not None])


def stream_variant(dit, inference, shape, device, *, plain: bool, kv_cache: str, warm_blocks: int,
                   measure: list[tuple[int, bool]], contexts) -> dict:
    """Stream ``warm_blocks`` + len(measure) blocks; ``measure``: (steps, cache_from_last_step) per measured block."""
    pipe = StreamingPipeline(dit, inference, device, kv_cache=kv_cache)
    if plain:  # the reference path: KVCache's per-layer tensors, concatenated at every layer and step
        pipe.cache.storage = None
    n = warm_blocks + len(measure)
    plans = PromptSchedule.single("random").plan(block_sizes(n * shape["block_frames"], shape["block_frames"]), 24, 4)
    lat = (shape["z_dim"], shape["lat_h"], shape["lat_w"])
    it = iter(pipe.stream(plans, contexts, lat, generator=torch.Generator().manual_seed(0)))
    outs, syncs, walls = [], [], []
    torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
    for i in range(n):
        steps, from_last = (4, False) if i < warm_blocks else measure[i - warm_blocks]
        pipe.sigmas = step_sigmas(STEPS[steps], inference.timestep_shift)
        pipe.cfg = inference.model_copy(update={"cache_from_last_step": from_last})
        measured = i >= warm_blocks
        if measured:
            sync()
            t0 = now()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if measured and device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                out = next(it)
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode(0)
        if measured:
            syncs.append(sum("synchroniz" in str(w.message).lower() for w in caught))
            sync()
            walls.append(now() - t0)
        outs.append((steps, from_last, out))
    blocks = []
    for i, (steps, from_last, out) in enumerate(outs):
        t = out.timings
        blocks.append({"block": i, "steps": steps, "cache_from_last_step": from_last, "denoise_s": t["denoise_s"],
                       "cache_s": t["cache_s"], "block_s": t["denoise_s"] + t["cache_s"],
                       "cache_frames": len(t["cache_frames"]), "cache_bytes": t["cache_bytes"]})
    for b, s, w in zip(blocks[warm_blocks:], syncs, walls):
        b["host_syncs"], b["wall_s"] = s, w
    r = {"blocks": blocks, "finite": bool(torch.isfinite(outs[-1][2].latents).all()),
         "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
         "kv_cache_gib": blocks[-1]["cache_bytes"] / 2**30}
    storage = pipe.cache.storage
    if storage is not None and hasattr(storage, "allocated_bytes"):
        r["kv_cache_allocated_gib"] = storage.allocated_bytes() / 2**30
    del pipe, it, outs
    return r


def summarize(name: str, r: dict, shape: dict, vae_s: float | None) -> list[dict]:
    frames = shape["block_frames"] * PIXEL_FRAMES_PER_LATENT
    rows = []
    for steps in STEPS:
        for from_last in (False, True):
            bs = [b for b in r["blocks"] if "wall_s" in b and b["steps"] == steps and b["cache_from_last_step"] == from_last]
            if not bs:
                continue
            block = sum(b["block_s"] for b in bs) / len(bs)
            row = {"variant": name, "steps": steps, "cache_pass": not from_last, "block_ms": 1e3 * block,
                   "step_ms": 1e3 * sum(b["denoise_s"] for b in bs) / len(bs) / steps,
                   "cache_pass_ms": 1e3 * sum(b["cache_s"] for b in bs) / len(bs),
                   "wall_block_ms": 1e3 * sum(b["wall_s"] for b in bs) / len(bs),
                   "dit_fps": frames / block, "host_syncs_per_block": max(b["host_syncs"] for b in bs),
                   "peak_mem_gib": r.get("peak_mem_gib"), "weights_gib": r.get("weights_gib"),
                   "kv_cache_gib": r.get("kv_cache_gib")}
            if vae_s is not None:
                row["dit_plus_vae_fps"] = frames / (block + vae_s)  # one GPU: the decoder's work adds to the DiT's
            rows.append(row)
    return rows


def end_to_end(dit, inference, shape, vae, device, contexts, *, steps: int, kv_cache: str = "dense", blocks: int = 6,
               frames_per_call: int = 1, vae_kernels: bool = True) -> dict:
    """The pipeline with the VAE decoding in its worker thread (own CUDA stream) on the same GPU."""
    from longlive.inference.writer import BlockDecoder

    inference = inference.model_copy(update={"denoising_steps": STEPS[steps]})
    pipe = StreamingPipeline(dit, inference, device, kv_cache=kv_cache)
    plans = PromptSchedule.single("random").plan(block_sizes(blocks * shape["block_frames"], shape["block_frames"]), 24, 4)
    lat = (shape["z_dim"], shape["lat_h"], shape["lat_w"])
    counted = []
    from longlive.inference.fast_vae import apply_vae_kernels, remove_vae_kernels

    apply_vae_kernels(vae) if vae_kernels else remove_vae_kernels(vae)
    decoder = BlockDecoder(vae, lambda i, f: counted.append(len(f)), device=device, async_decode=True,
                           frames_per_call=frames_per_call)
    sync()
    t0 = now()
    for out in pipe.stream(plans, contexts, lat, generator=torch.Generator().manual_seed(0)):
        decoder.submit(out.plan.index, out.latents)
    timings = decoder.close()
    total = now() - t0
    done = [d["done_at"] - t0 for d in sorted(timings, key=lambda d: d["block"])]
    warm = min(3, blocks - 2)  # steady once the window is full (block 3 on)
    steady_frames = sum(counted[warm + 1:])
    r = {"steps": steps, "blocks": blocks, "vae_frames_per_call": frames_per_call, "vae_kernels": vae_kernels,
         "first_block_latency_s": done[0], "total_s": total,
         "pixel_frames": sum(counted), "steady_fps": steady_frames / (done[-1] - done[warm]),
         "decode_s_per_block": [d["decode_s"] for d in sorted(timings, key=lambda d: d["block"])]}
    print(json.dumps(r), flush=True)
    return r


def profile_block(dit, inference, shape, device, contexts, warm_blocks: int = 3) -> dict:
    """GPU time of one steady 4-step block by kernel family (torch.profiler), to place the gap to the ceiling."""
    from torch.profiler import ProfilerActivity, profile

    pipe = StreamingPipeline(dit, inference, device)
    plans = PromptSchedule.single("random").plan(block_sizes((warm_blocks + 1) * shape["block_frames"], shape["block_frames"]), 24, 4)
    it = iter(pipe.stream(plans, contexts, (shape["z_dim"], shape["lat_h"], shape["lat_w"]),
                          generator=torch.Generator().manual_seed(0)))
    for _ in range(warm_blocks):
        next(it)
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        next(it)
        sync()
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
    r = {"block_ms_by_family": families, "total_ms": sum(families.values()), "top_kernels_ms": top}
    print(json.dumps(r), flush=True)
    return r


# ----------------------------------------------------------------------------- report


def markdown(res: dict) -> str:
    lines = [f"# Streaming FPS at LongLive 2.0's shapes ({res['device']})", "",
             f"{res['date']}; machine kind `{res['machine_kind']}`; torch {res['torch']}, triton {res['triton']}, "
             f"diffusers {res.get('diffusers')}. Script: `benchmarks/fps.py` (random weights, one GPU).", "",
             f"Shapes: {res['shape_text']}", "",
             f"VAE: {res['vae']}", ""]
    for v in res.get("vae_options", []):
        lines.append(f"VAE streaming decode of one block (8 latent -> {v['pixel_frames_per_block']} frames of "
                     f"{v['frame_shape'][0]}x{v['frame_shape'][1]}), {v['frames_per_call']} latent frame(s) per call, "
                     f"fused norm kernels {v['kernels']}: {1e3 * v['block_decode_s']:.0f} ms "
                     f"({v['pixel_frames_per_block'] / v['block_decode_s']:.1f} FPS alone; peak {v['peak_mem_gib'] or 0:.1f} GiB)")
    for kern in (False, True):
        v = res.get(f"vae_profile_kernels_{kern}")
        if v and "gpu_kernel_s_by_family" in v:
            lines.append(f"VAE GPU kernel time per block, fused norm kernels {kern}: " + ", ".join(
                f"{k} {1e3 * t:.0f} ms" for k, t in v["gpu_kernel_s_by_family"].items())
                + f" (busy {100 * v['gpu_busy_fraction']:.0f}% of wall)")
    lines.append("")
    lines += ["| variant | steps | cache pass | block ms | step ms | cache pass ms | DiT FPS | DiT + VAE FPS | "
              "ceiling FPS | % of ceiling | host syncs / block | peak GiB | weights GiB | KV GiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ceil = res.get("ceiling", {}).get("bf16", {})
    for r in res["rows"]:
        key = f"fps_{r['steps']}step_{'with' if r['cache_pass'] else 'no'}_cache_pass"
        c = ceil.get(key)
        fmt = lambda v, f="{:.1f}": f.format(v) if v is not None else "-"  # noqa: E731
        lines.append(
            f"| {r['variant']} | {r['steps']} | {'yes' if r['cache_pass'] else 'no (last step writes)'} | "
            f"{r['block_ms']:.0f} | {r['step_ms']:.0f} | {r['cache_pass_ms']:.0f} | {r['dit_fps']:.1f} | "
            f"{fmt(r.get('dit_plus_vae_fps'))} | {fmt(c)} | {fmt(100 * r['dit_fps'] / c if c else None, '{:.0f}')} | "
            f"{r['host_syncs_per_block']} | {fmt(r.get('peak_mem_gib'))} | {fmt(r.get('weights_gib'), '{:.2f}')} | "
            f"{fmt(r.get('kv_cache_gib'), '{:.2f}')} |")
    lines += ["", "Ceiling (one layer's GEMMs + attention timed alone, x 30 layers x passes; bf16 GEMMs): "
              + ", ".join(f"{k} {v:.1f}" for k, v in ceil.items() if k.startswith("fps_"))]
    if "fp8" in res.get("ceiling", {}):
        lines.append("With FP8 GEMMs: " + ", ".join(f"{k} {v:.1f}" for k, v in res["ceiling"]["fp8"].items() if k.startswith("fps_")))
    if res.get("profile"):
        p = res["profile"]
        lines.append("Where a steady 4-step block of 'bf16 fast' spends GPU time (torch.profiler, ms): "
                     + ", ".join(f"{k} {v:.0f}" for k, v in p["block_ms_by_family"].items()))
    for e in res.get("end_to_end", []):
        lines.append(f"End to end ({e['variant']}, {e['steps']} steps, VAE in its thread and stream on the same GPU, "
                     f"{e['vae_frames_per_call']} latent frame(s) per decoder call, fused VAE norms {e['vae_kernels']}): "
                     f"steady {e['steady_fps']:.1f} FPS, first-block latency {e['first_block_latency_s']:.2f} s")
    lines += ["", "| kernel check | max rel err | kernel ms | reference ms | speedup | bit exact |", "|---|---|---|---|---|---|"]
    for k in res.get("kernels", []):
        if "kernel_ms" in k:
            lines.append(f"| {k['kernel']} | {k['max_rel_err']:.1e} | {k['kernel_ms']:.3f} | {k['reference_ms']:.3f} | "
                         f"{k['speedup']:.1f}x | {k.get('bit_exact', '-')} |")
        else:
            lines.append(f"| {k['kernel']} (vs float32 emulation; vs bf16 {k['rel_l2_vs_bf16']:.1e}; GEMM alone "
                         f"{k.get('fp8_gemm_only_ms', float('nan')):.3f} ms, "
                         f"quantization {k.get('fp8_quant_only_ms', float('nan')):.3f} ms) | "
                         f"{k['max_rel_err_vs_emulated']:.1e} | {k['fp8_ms']:.3f} | {k['bf16_ms']:.3f} (bf16) | "
                         f"{k['speedup']:.2f}x | - |")
    if res.get("errors"):
        lines += ["", "Errors: " + "; ".join(f"{k}: {v}" for k, v in res["errors"].items())]
    lines += ["", res.get("notes", ""), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--name", default=None, help="file stem; default fps_<gpu>")
    ap.add_argument("--machine-kind", default="nvidia-h100-x1")
    ap.add_argument("--smoke", action="store_true", help="tiny preset shapes on any device (the code paths, not speed)")
    ap.add_argument("--budget-s", type=float, default=520, help="skip the remaining optional stages after this")
    ap.add_argument("--skip", nargs="*", default=[], help="variants or stages to skip")
    args = ap.parse_args()
    t_start = now()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = load_preset("tiny" if args.smoke else "wan22-5b")
    dcfg, inf = preset.dit, preset.inference
    C, _, lat_h, lat_w = preset.latent_shape
    shape = {"layers": dcfg.num_layers, "dim": dcfg.dim, "heads": dcfg.num_heads, "ffn": dcfg.ffn_dim, "z_dim": C,
             "lat_h": lat_h, "lat_w": lat_w, "h": lat_h // dcfg.patch_size[1], "w": lat_w // dcfg.patch_size[2],
             "frame_tokens": (lat_h // dcfg.patch_size[1]) * (lat_w // dcfg.patch_size[2]),
             "block_frames": inf.block_frames, "window_frames": inf.window_frames + inf.sink_frames,
             "context_tokens": preset.text.max_tokens, "text_dim": preset.text.dim}
    import triton

    try:
        import diffusers
        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "machine_kind": args.machine_kind,
           "torch": torch.__version__, "triton": triton.__version__, "diffusers": diffusers_version,
           "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "preset": preset.name,
           "shape": shape, "errors": {}, "rows": [], "variants": {}, "end_to_end": [],
           "shape_text": (f"{preset.name}: DiT {dcfg.num_layers} layers, dim {dcfg.dim}, {dcfg.num_heads} heads, ffn {dcfg.ffn_dim}; "
                          f"{preset.video.height}x{preset.video.width} (latent {lat_h}x{lat_w}, {shape['frame_tokens']} tokens "
                          f"per latent frame); blocks of {inf.block_frames} latent frames = "
                          f"{inf.block_frames * PIXEL_FRAMES_PER_LATENT} video frames; window {shape['window_frames']} cached + "
                          f"{inf.block_frames}; context {preset.text.max_tokens} tokens; steps {STEPS}.")}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or "fps_" + ("smoke" if args.smoke else "".join(c if c.isalnum() else "_" for c in res["device"].lower()))

    def save():
        res["wall_s"] = round(now() - t_start, 1)
        (out / f"{stem}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
        try:
            (out / f"{stem}.md").write_text(markdown(res))
        except Exception as e:  # noqa: BLE001 - a partial result must not lose the JSON
            print(f"markdown failed: {e}", flush=True)

    def left() -> float:
        return args.budget_s - (now() - t_start)

    def stage(name, fn, min_left=0.0):
        if name in args.skip:
            return None
        if left() < min_left:
            res["errors"][name] = f"skipped: {left():.0f} s of the time budget left"
            print(f"skip {name}: budget", flush=True)
            return None
        t0 = now()
        try:
            with torch.no_grad():
                return fn()
        except Exception as e:  # noqa: BLE001 - one stage failing must not lose the others
            import traceback

            traceback.print_exc()
            res["errors"][name] = f"{type(e).__name__}: {e}"[:500]
            return None
        finally:
            print(f"[{name}] {now() - t0:.1f} s (total {now() - t_start:.0f} s)", flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            save()

    if device.type == "cuda":
        res["kernels"] = stage("kernels", lambda: kernel_checks(shape, device)) or []
        res["ceiling"] = {"bf16": stage("ceiling", lambda: ceiling(shape, device, fp8=False)) or {}}
        from longlive.quant.fp8 import fp8_gemm_available

        if fp8_gemm_available(device):
            res["ceiling"]["fp8"] = stage("ceiling_fp8", lambda: ceiling(shape, device, fp8=True)) or {}

    vae, res["vae"] = build_vae(preset, device)
    vae_s, vae_best = None, (1, False)
    if vae is not None:
        res["vae_options"] = []
        for fpc, kern in ((1, False), (1, True), (4, True)):
            v = stage(f"vae fpc={fpc} kernels={kern}",
                      lambda: vae_block_time(vae, shape, device, frames_per_call=fpc, kernels=kern), min_left=300)
            if v:
                res["vae_options"].append(v)
        if res["vae_options"]:
            best = min(res["vae_options"], key=lambda v: v["block_decode_s"])
            vae_best = (best["frames_per_call"], best["kernels"])
            for kern in (False, True) if device.type == "cuda" else ():
                res[f"vae_profile_kernels_{kern}"] = stage(f"vae profile kernels={kern}", lambda: vae_block_time(
                    vae, shape, device, blocks=2, frames_per_call=1, kernels=kern, profile=True))
            vae_s = best["block_decode_s"]

    dit = build_dit(dcfg, shape, device)
    g = torch.Generator().manual_seed(3)
    contexts = [(torch.randn(1, preset.text.max_tokens, preset.text.dim, generator=g) * 0.5).to(device, torch.bfloat16)]
    bf16_bytes = weight_bytes(dit)
    warm = 3 if not args.smoke else 2  # blocks 0-2 fill the 24-frame window; block 3 on is steady
    measure = [(4, False), (4, False), (2, False), (2, False), (2, True)]

    def variant(name, *, plain=False, kernels=True, compile=False, kv_cache="dense", measure=measure, min_left=30.0):
        cfg = inf.model_copy(update={"kernels": kernels, "compile": compile})

        def run():
            if not kernels:
                fast.remove_kernels(dit)
            if plain:
                fast.remove_context_memo(dit)
            t0 = now()
            r = stream_variant(dit, cfg, shape, device, plain=plain, kv_cache=kv_cache, warm_blocks=warm,
                               measure=measure, contexts=contexts)
            r["wall_s"] = now() - t0
            r["weights_gib"] = weight_bytes(dit) / 2**30
            res["variants"][name] = r
            rows = summarize(name, r, shape, vae_s)
            for row in rows:
                row["weights_gib"] = r["weights_gib"]
                print(json.dumps(row), flush=True)
            res["rows"].extend(rows)
            return r

        return stage(name, run, min_left)

    variant("bf16 plain", plain=True, kernels=False)
    variant("bf16 fast", kernels=True)
    if device.type == "cuda":
        res["profile"] = stage("profile", lambda: profile_block(dit, inf, shape, device, contexts), min_left=60)
    fastest = ("bf16 fast", 2)

    from longlive.quant.convert import _set_module
    from longlive.quant.fp8 import FP8Linear, convert_to_fp8, fp8_gemm_available

    def fp8_on():
        fast.remove_context_memo(dit)
        originals = {n: m for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear)}
        convert_to_fp8(dit)
        return originals

    def fp8_off(originals):
        for n, m in list(dit.named_modules()):
            if isinstance(m, FP8Linear):
                _set_module(dit, n, originals[n])

    def uncompile():
        for m in dit.modules():
            if getattr(m, "_compiled_call_impl", None) is not None:
                m._compiled_call_impl = None

    if fp8_gemm_available(device) or args.smoke:
        originals = fp8_on()
        if variant("fp8 fast", kernels=True):
            fastest = ("fp8 fast", 2)
        fp8_off(originals)
        del originals

    if vae is not None and device.type == "cuda":
        for name, steps in (("bf16 fast", 4), fastest):
            originals = fp8_on() if name.startswith("fp8") else None
            e = stage(f"end_to_end {name} {steps}", lambda: end_to_end(
                dit, inf, shape, vae, device, contexts, steps=steps, frames_per_call=vae_best[0], vae_kernels=vae_best[1]),
                min_left=60)
            if e:
                e["variant"] = name
                res["end_to_end"].append(e)
            if originals is not None:
                fp8_off(originals)
                del originals

    variant("bf16 fast + compile", kernels=True, compile=True, min_left=200)
    uncompile()
    variant("bf16 compile, kernels off", kernels=False, compile=True, min_left=200)
    uncompile()

    # NVFP4 last: converted in place (the bf16 weights of the quantized layers are dropped)
    def to_nvfp4():
        from longlive.quant.convert import convert_to_nvfp4

        fast.remove_context_memo(dit)
        rep = convert_to_nvfp4(dit, backend="triton" if device.type == "cuda" else "emulated")
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None
        return {"quantized": len(rep.quantized), "kept": rep.kept}

    if "nvfp4" not in args.skip and stage("nvfp4 convert", to_nvfp4, min_left=100):
        variant("nvfp4 (triton)", kernels=True, measure=[(4, False), (2, False), (2, True)], min_left=80)
        variant("nvfp4 (triton) + nvfp4 KV", kernels=True, kv_cache="nvfp4", measure=[(2, False)], min_left=50)

    res["bf16_weights_gib"] = bf16_bytes / 2**30
    res["notes"] = (
        "block ms: GPU time of one steady block (a full window: 24 cached + 8 new latent frames) from CUDA events, "
        "denoising steps + the cache pass; DiT FPS = 32 video frames / block time. 'no (last step writes)': "
        "inference.cache_from_last_step, one forward less per block. DiT + VAE FPS: the decoder's time for a block "
        "added to the DiT's (both share the GPU). host syncs / block: synchronizing CUDA calls inside the chunk loop "
        "counted by torch.cuda.set_sync_debug_mode. 'bf16 plain' is the reference path (torch.cat KV cache, "
        "PyTorch elementwise ops, per-forward context projections) run through the same sync-free loop.")
    save()
    print(markdown(res))
    print(f"wrote {out / stem}.json/.md in {now() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
