"""Pieces timed alone: each Triton kernel against its PyTorch reference at a shape's sizes (CUDA), and the
ceiling -- one DiT layer's GEMMs + attention at a full window, timed alone, times layers and passes."""

from __future__ import annotations

import json
from functools import partial

import torch
import torch.nn.functional as F

from longlive.bench.harness import bench_ms, bit_exact, gbps, max_rel, rel_l2, tflops
from longlive.bench.shapes import BenchShape


def kernel_checks(shape: BenchShape, device: torch.device) -> list[dict]:
    """Each kernel of ``kernels/`` against its reference (errors, both timed, bandwidth); the FP8 GEMM path
    against its float32 emulation and the bf16 linear. CUDA only (the caller skips it elsewhere)."""
    from longlive_kernels import (
        adaln, adaln_ref, channel_rmsnorm, channel_rmsnorm_ref, fp8_quant, fp8_quant_ref, rope, rope_ref,
    )
    from longlive.models.rope import rope_freqs
    from longlive.quant.fp8 import FP8Linear, fp8_gemm_available

    g = torch.Generator(device=device).manual_seed(0)
    D, H, ft, bf = shape.dim, shape.heads, shape.frame_tokens, shape.block_frames
    hd = D // H
    S, S_k = bf * ft, (bf + shape.cached_frames) * ft
    out = []

    def record(name, got, ref, fn_kernel, fn_ref, bytes_moved, exact=False):
        r = {"kernel": name, "resolution": shape.resolution, "max_rel_err": max_rel(got, ref), "rel_l2_err": rel_l2(got, ref),
             "kernel_ms": bench_ms(fn_kernel, device), "reference_ms": bench_ms(fn_ref, device)}
        if exact:
            r["bit_exact"] = bit_exact((got, ref))
        r["speedup"] = r["reference_ms"] / r["kernel_ms"]
        r["kernel_GBps"] = gbps(bytes_moved, r["kernel_ms"])
        out.append(r)
        print(json.dumps(r), flush=True)

    # RoPE on the keys of a full window, read from a preallocated cache buffer (a strided view)
    buf = torch.randn(1, S_k + ft, H, hd, device=device, generator=g, dtype=torch.bfloat16)
    k = buf[:, :S_k]
    cos, sin = rope_freqs(hd, torch.arange(S_k // ft), shape.h, shape.w, device=device)
    record("rope (keys, full window)", rope.apply_rope(k, cos, sin), rope_ref.apply_rope(k, cos, sin),
           lambda: rope.apply_rope(k, cos, sin), lambda: rope_ref.apply_rope(k, cos, sin), 2 * k.numel() * 2)
    # LayerNorm + adaLN on one block, per-frame modulation; affine LayerNorm; gated residual
    x = torch.randn(1, S, D, device=device, generator=g, dtype=torch.bfloat16) * 3
    h = torch.randn(1, S, D, device=device, generator=g, dtype=torch.bfloat16)
    scale, shift, gate = (torch.randn(1, bf, 1, D, device=device, generator=g) * 0.3 for _ in range(3))
    w, b = torch.randn(D, device=device, generator=g) + 1, torch.randn(D, device=device, generator=g)
    record("layernorm + adaLN modulation", adaln.layernorm_modulate(x, scale, shift),
           adaln_ref.layernorm_modulate(x, scale, shift),
           lambda: adaln.layernorm_modulate(x, scale, shift), lambda: adaln_ref.layernorm_modulate(x, scale, shift),
           2 * x.numel() * 2)
    record("layernorm affine", adaln.layernorm_modulate(x, weight=w, bias=b), adaln_ref.layernorm_modulate(x, weight=w, bias=b),
           lambda: adaln.layernorm_modulate(x, weight=w, bias=b), lambda: adaln_ref.layernorm_modulate(x, weight=w, bias=b),
           2 * x.numel() * 2)
    record("gated residual", adaln.gated_residual(x, h, gate), adaln_ref.gated_residual(x, h, gate),
           lambda: adaln.gated_residual(x, h, gate), lambda: adaln_ref.gated_residual(x, h, gate), 3 * x.numel() * 2)
    # the VAE decoder's channel RMS norm + SiLU at its largest stage (256 channels, 4 frames at half resolution)
    v = torch.randn(1, 256, 4, 8 * shape.lat_h, 8 * shape.lat_w, device=device, generator=g, dtype=torch.bfloat16)
    gam = (torch.randn(256, 1, 1, 1, device=device, generator=g) * 0.2 + 1).to(torch.bfloat16)
    record("VAE channel RMS norm + SiLU", channel_rmsnorm.rms_norm(v, gam, silu=True),
           channel_rmsnorm_ref.rms_norm(v, gam, silu=True), lambda: channel_rmsnorm.rms_norm(v, gam, silu=True),
           lambda: channel_rmsnorm_ref.rms_norm(v, gam, silu=True), 2 * v.numel() * 2)
    # FP8 row-wise activation quantization (bit-exact), FFN-up sized activations too
    for K in (D, shape.ffn):
        a = torch.randn(S, K, device=device, generator=g, dtype=torch.bfloat16)
        codes, scales = fp8_quant.quantize_rows(a)
        rc, rs = fp8_quant_ref.quantize_rows(a)
        r_exact = bit_exact((codes, rc), (scales, rs))
        record(f"fp8 row quantization K={K}", codes.float() * scales, rc.float() * rs,
               partial(fp8_quant.quantize_rows, a), partial(fp8_quant_ref.quantize_rows, a), a.numel() * 3)
        out[-1]["bit_exact"] = r_exact
        del a, codes, rc
    # FP8 per-tensor quantization of a full window's keys (cuDNN FP8 attention's input), bit-exact
    a = torch.randn(1, S_k, H, hd, device=device, generator=g, dtype=torch.bfloat16)
    codes, scale = fp8_quant.quantize_tensor(a)
    rc, rs = fp8_quant_ref.quantize_tensor(a)
    record("fp8 per-tensor quantization (keys, full window)", codes.float() * scale, rc.float() * rs,
           partial(fp8_quant.quantize_tensor, a), partial(fp8_quant_ref.quantize_tensor, a), a.numel() * 5)
    out[-1]["bit_exact"] = bit_exact((codes, rc), (scale, rs))
    del a, codes, rc
    # FP8 GEMM (torch._scaled_mm, row-wise) vs its float32 emulation and vs the bf16 linear
    if fp8_gemm_available(device):
        for K, N in ((D, D), (D, shape.ffn), (shape.ffn, D)):
            lin = torch.nn.Linear(K, N, device=device, dtype=torch.bfloat16)
            layer = FP8Linear.from_linear(lin)
            a = torch.randn(S, K, device=device, generator=g, dtype=torch.bfloat16)
            y = layer(a)
            layer.emulated = True
            y_emu = layer(a)
            layer.emulated = False
            r = {"kernel": f"fp8 linear {K}x{N}", "resolution": shape.resolution,
                 "max_rel_err_vs_emulated": max_rel(y, y_emu), "rel_l2_vs_emulated": rel_l2(y, y_emu),
                 "rel_l2_vs_bf16": rel_l2(y, lin(a)), "fp8_ms": bench_ms(partial(layer, a), device),
                 "bf16_ms": bench_ms(partial(lin, a), device), "bias_in_gemm": FP8Linear._bias_in_gemm}
            qa, sa = fp8_quant.quantize_rows(a)
            r["fp8_gemm_only_ms"] = bench_ms(partial(layer._scaled_mm, qa, sa), device)
            r["fp8_quant_only_ms"] = bench_ms(partial(fp8_quant.quantize_rows, a), device)
            r["speedup"] = r["bf16_ms"] / r["fp8_ms"]
            r["fp8_TFLOPs"] = tflops(2 * S * K * N, r["fp8_ms"])
            out.append(r)
            print(json.dumps(r), flush=True)
            del lin, layer, a, y, y_emu
    return out


def ceiling_key(steps: int, cache_pass: bool) -> str:
    return f"fps_{steps}step_{'with' if cache_pass else 'no'}_cache_pass"


def ceiling(shape: BenchShape, device: torch.device, fp8: bool, steps: list[int]) -> dict:
    """One layer's GEMMs + attention at a full window, timed alone (the issue's DiT-only ceiling); FPS for
    each step count with and without the cache pass. ``fp8``: row-wise FP8 GEMMs (``torch._scaled_mm``)."""
    D, H, F_, ft, bf = shape.dim, shape.heads, shape.ffn, shape.frame_tokens, shape.block_frames
    S, S_k, L = bf * ft, (bf + shape.cached_frames) * ft, shape.context_tokens
    g = torch.Generator(device=device).manual_seed(1)
    dt = torch.bfloat16

    def gemm(M, K, N):
        a = torch.randn(M, K, device=device, generator=g, dtype=dt)
        w = torch.randn(N, K, device=device, generator=g, dtype=dt) * K**-0.5
        if not fp8:
            return bench_ms(lambda: F.linear(a, w), device)
        from longlive_kernels.fp8_quant_ref import quantize_rows

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
    forward_ms = shape.layers * layer_ms
    frames = shape.pixel_frames_per_block
    r = {"gemm": "fp8 row-wise" if fp8 else "bf16", "resolution": shape.resolution, "parts_ms": parts,
         "layer_ms": layer_ms, "forward_ms": forward_ms}
    for n in steps:
        r[ceiling_key(n, True)] = frames / ((n + 1) * forward_ms * 1e-3)
        r[ceiling_key(n, False)] = frames / (n * forward_ms * 1e-3)
    print(json.dumps(r), flush=True)
    return r
