"""Triton kernel: W4A4 NVFP4 GEMM, ``y = dq(A) @ dq(W)^T + bias`` (reference: ``kernels/nvfp4_gemm_ref.py``).

For GPUs without FP4 tensor cores (Hopper). W stays packed in memory (4 bits per element plus one E4M3
scale per 16) and is dequantized tile by tile in registers; so is A when it comes packed. A may
instead come as float16 values already dequantized by the quantization kernel (``kernels/nvfp4_quant.py``
with ``dequantized=True``): the same NVFP4 numbers, read as 2 bytes instead of 0.56 but not decoded
again for every column tile of W.

Exactness: the tensor cores multiply float16 tiles holding ``code * block_scale * 2**-14`` exactly:

* ``code * 2**-14`` is a float16 made directly from the 4 code bits (E2M1's exponent and mantissa bits
  land in float16's, which reads them with bias 15 instead of 1, hence the 2**-14; code 0.5 becomes
  the subnormal 2**-15), and a normal E4M3 scale converts to float16 exactly by re-biasing its exponent;
* their product has at most 6 significant bits (2 from E2M1, 4 from E4M3) and is a multiple of 2**-24
  between 2**-21 and 2688 * 2**-14, so float16 holds it exactly (subnormals included);
* products of two such values are exact in the float32 accumulator; the epilogue multiplies by
  ``2**28`` (exact) and the two FP32 global scales.

So the result equals the float32 reference up to the order of float32 additions. The decode is a few
integer operations per element because dequantization, not the MMA, bounds this kernel on Hopper.
(float16 rather than bfloat16: float16's 10 mantissa bits and subnormals make the above exact, and
Triton's CPU interpreter mis-computes bf16 dots.)

Packed byte j of a row holds elements 2j (low nibble) and 2j+1 (high nibble). Instead of interleaving
the nibbles back into one K tile, the kernel takes two dots, over the even and over the odd elements.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK = 16
DQ16_SCALE = 2.0**-14  # float16 operands hold code * block_scale * DQ16_SCALE


@triton.jit
def _e2m1_to_f16(c):
    """4-bit E2M1 codes (uint16, bits 0-3) -> float16 ``code * 2**-14``: sign to bit 15, the 3 magnitude
    bits to float16's lowest 2 exponent bits and top mantissa bit."""
    return (((c & 7) << 9) | ((c & 8) << 12)).to(tl.float16, bitcast=True)


@triton.jit
def _e4m3_to_f16(b):
    """E4M3 bytes (uint16, sign 0: block scales are positive) -> float16, exactly."""
    normal = (((b & 0x7F) << 7) + 0x2000).to(tl.float16, bitcast=True)  # exponent bias 7 -> 15: +8
    return tl.where((b & 0x78) == 0, (b & 7).to(tl.float16) * 0.001953125, normal)  # subnormal: m * 2**-9


@triton.jit
def _nvfp4_gemm_kernel(
    a_ptr, as_ptr, ag_ptr, w_ptr, ws_ptr, wg_ptr, bias_ptr, out_ptr,
    M, N, K,
    A_PACKED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row-tiles share each column of W tiles while it is in L2.
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    KP, KS = K // 2, K // 16  # packed bytes and scales per row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KP, BLOCK_K // 2):
        j = k0 + tl.arange(0, BLOCK_K // 2)  # packed column; its block is j // 8
        jm = j < KP
        am = (rm < M)[:, None] & jm[None, :]
        if A_PACKED:
            a = tl.load(a_ptr + rm[:, None] * KP + j[None, :], mask=am, other=0).to(tl.uint16)
            a_s = _e4m3_to_f16(tl.load(as_ptr + rm[:, None] * KS + (j // 8)[None, :], mask=am, other=0).to(tl.uint16))
            a_even, a_odd = _e2m1_to_f16(a) * a_s, _e2m1_to_f16(a >> 4) * a_s
        else:  # float16, already code * scale * 2**-14
            a_even = tl.load(a_ptr + rm[:, None] * K + (2 * j)[None, :], mask=am, other=0.0)
            a_odd = tl.load(a_ptr + rm[:, None] * K + (2 * j + 1)[None, :], mask=am, other=0.0)
        wm = jm[:, None] & (rn < N)[None, :]
        w = tl.load(w_ptr + rn[None, :] * KP + j[:, None], mask=wm, other=0).to(tl.uint16)  # (BLOCK_K/2, BLOCK_N)
        w_s = _e4m3_to_f16(tl.load(ws_ptr + rn[None, :] * KS + (j // 8)[:, None], mask=wm, other=0).to(tl.uint16))
        acc = tl.dot(a_even, _e2m1_to_f16(w) * w_s, acc)
        acc = tl.dot(a_odd, _e2m1_to_f16(w >> 4) * w_s, acc)

    # undo the two 2**-14, then one global at a time (tiny globals would underflow as a product)
    acc = acc * 268435456.0 * tl.load(ag_ptr) * tl.load(wg_ptr)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm < M)[:, None] & (rn < N)[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _configs():
    if _interpreting():  # the CPU interpreter: small tiles (tl.dot needs >= 16 on every side)
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 4})]
    # Hopper: decoding W costs ALU time per (BLOCK_K x BLOCK_N) tile and is shared by BLOCK_M rows (A's
    # likewise by BLOCK_N columns), so large M/N tiles amortise it; 128x256x64 won on an H100.
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 256, 128, 8, 3), (256, 128, 64, 8, 3),
            (256, 128, 128, 8, 3), (128, 128, 64, 8, 3), (128, 128, 128, 4, 4), (64, 256, 64, 4, 4),
        ]
    ]


_kernel = triton.autotune(configs=_configs(), key=["M", "N", "K", "A_PACKED"])(_nvfp4_gemm_kernel)


def nvfp4_gemm(
    a: torch.Tensor, a_scales: torch.Tensor | None, a_global: torch.Tensor,
    w_packed: torch.Tensor, w_scales: torch.Tensor, w_global: torch.Tensor,
    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(M, N) ``out_dtype`` for NVFP4 A (M, K) and W (N, K); ``bias`` (N,) or None.

    W: packed codes (N, K/2) uint8, block scales (N, K/16) float8_e4m3fn, one-element float32 global.
    A: the same three (M, K/2), (M, K/16), global; or ``a`` float16 (M, K) holding
    ``code * block_scale * 2**-14`` (``longlive_kernels.nvfp4_quant.quantize_rows(..., dequantized=True)``),
    ``a_scales`` None, and its global.
    """
    N, KP = w_packed.shape
    K, M = 2 * KP, a.shape[0]
    packed = a.dtype == torch.uint8
    if w_packed.dtype != torch.uint8 or (packed and a.shape[1] != KP) or (not packed and (a.dtype != torch.float16 or a.shape[1] != K)):
        raise ValueError(f"A {a.dtype} {tuple(a.shape)} and W {w_packed.dtype} {tuple(w_packed.shape)} must be packed uint8 "
                         "(., K/2) with the same K (or A float16 (M, K) dequantized)")
    if K % BLOCK or w_scales.shape != (N, K // BLOCK) or (packed and (a_scales is None or a_scales.shape != (M, K // BLOCK))):
        raise ValueError(f"block scales must be (M, K/16) and (N, K/16) for K = {K} (a multiple of {BLOCK}), "
                         f"got {None if a_scales is None else tuple(a_scales.shape)} and {tuple(w_scales.shape)}")
    if a_global.numel() != 1 or w_global.numel() != 1:
        raise ValueError("the GEMM takes one global scale per operand")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be ({N},), got {tuple(bias.shape)}")
    tensors = [a, a_global, w_packed, w_scales, w_global] + [t for t in (a_scales, bias) if t is not None]
    if any(t.device != a.device for t in tensors):
        raise ValueError("all NVFP4 GEMM operands must be on one device")
    if a.device.type != "cuda" and not _interpreting():
        raise RuntimeError("the Triton NVFP4 kernels need CUDA tensors (or TRITON_INTERPRET=1 to run them on the CPU)")
    out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.copy_(bias.expand(M, N) if bias is not None else torch.zeros_like(out))
    a_g, w_g = a_global.float().reshape(1).contiguous(), w_global.float().reshape(1).contiguous()
    a_s = a_scales.view(torch.uint8).contiguous() if packed else a_g  # any pointer: unused
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _kernel[grid](a.contiguous(), a_s, a_g, w_packed.contiguous(), w_scales.view(torch.uint8).contiguous(), w_g,
                  bias if bias is not None else a_g, out, M, N, K, A_PACKED=packed, HAS_BIAS=bias is not None)
    return out
