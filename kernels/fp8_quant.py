"""Triton kernels: dynamic FP8 (E4M3) quantization, row-wise in one launch and per tensor in two (reference:
``kernels/fp8_quant_ref.py``).

In PyTorch the activation quantization of an FP8 linear is four or five kernels (amax, reciprocal,
product in float32, clamp, cast), with a float32 copy of the activation in between. Here one program per
row loops over the row twice (amax, then quantize: the second pass mostly hits L2) and writes the codes
and the row's scale.

Per tensor (:func:`quantize_tensor`, the scaling cuDNN's FP8 attention takes): one launch reduces max |x| over
tiles into a float32 scalar with an atomic max (order-free, so exact and deterministic), a second writes the
codes; the scale never leaves the device.

Bit-exact with the reference: the reciprocal ``448 / amax`` is a correctly rounded division (``div_rn``;
Triton's ``/`` is approximate on GPUs), the product is one float32 multiplication, and the E4M3 rounding
(nearest even, subnormals included) is done on the bits rather than by a cast whose lowering could change
between Triton versions or in the interpreter.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from longlive_kernels.fp8_quant_ref import AMAX_MIN, E4M3_MAX


@triton.jit
def _e4m3_bits(v):
    """float32 values already in [-448, 448] -> E4M3 codes (int32 0..255), round to nearest even."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    mag_bits = bits & 0x7FFFFFFF
    mag = mag_bits.to(tl.float32, bitcast=True)
    # normal range (>= 2**-6): keep 3 mantissa bits, RNE on the bits (a carry rolls into the exponent)
    r = (mag_bits + 0x7FFFF + ((mag_bits >> 20) & 1)) & -1048576  # -1048576 = ~0xFFFFF
    normal = (((r >> 23) - 120) << 3) | ((r >> 20) & 7)  # exponent bias 7 vs float32's 127
    # subnormals: multiples of 2**-9; mag * 512 < 8 is exact, and adding/subtracting 1.5 * 2**23 rounds
    # it to the nearest integer, ties to even (8 is 2**-6, the smallest normal: code 8 either way)
    sub = ((mag * 512.0 + 12582912.0) - 12582912.0).to(tl.int32)
    code = tl.where(mag < 0.015625, sub, normal)
    return code | (sign << 7)


@triton.jit
def _fp8_rows_kernel(x_ptr, codes_ptr, amax_ptr, K, stride_x, amax_min, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_x
    amax = tl.zeros((BLOCK_K,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    a = tl.maximum(tl.max(amax, axis=0), amax_min)
    inv = tl.math.div_rn(tl.full((BLOCK_K,), 448.0, tl.float32), tl.full((BLOCK_K,), 1.0, tl.float32) * a)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(x * inv, -448.0), 448.0)
        tl.store(codes_ptr + row * K + cols, _e4m3_bits(v).to(tl.uint8), mask=cols < K)
    tl.store(amax_ptr + row, a)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As the reference: (R, K) -> codes (R, K) float8_e4m3fn and scales (R, 1) float32, ``x ~= codes * scales``."""
    if x.dim() != 2:
        raise ValueError(f"quantize_rows needs (R, K), got {tuple(x.shape)}")
    if x.device.type != "cuda" and not _interpreting():
        raise RuntimeError("the Triton FP8 kernel needs a CUDA tensor (or TRITON_INTERPRET=1 to run it on the CPU)")
    R, K = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    codes = torch.empty(R, K, dtype=torch.uint8, device=x.device)
    amax = torch.empty(R, dtype=torch.float32, device=x.device)
    if R and K:
        block_k = 64 if _interpreting() else min(4096, triton.next_power_of_2(K))
        _fp8_rows_kernel[(R,)](x, codes, amax, K, x.stride(0), AMAX_MIN, BLOCK_K=block_k,
                               num_warps=1 if _interpreting() else 8)
    else:
        amax.fill_(AMAX_MIN)
    return codes.view(torch.float8_e4m3fn), (amax / E4M3_MAX)[:, None]


@triton.jit
def _tensor_amax_kernel(x_ptr, amax_ptr, S, C, stride_xb, stride_xs, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(2)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (s < S)[:, None] & (c < C)[None, :]
    x = tl.load(x_ptr + b * stride_xb + s[:, None] * stride_xs + c[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.atomic_max(amax_ptr, tl.max(tl.max(tl.abs(x), axis=1), axis=0))


@triton.jit
def _tensor_codes_kernel(x_ptr, codes_ptr, amax_ptr, S, C, stride_xb, stride_xs, amax_min,
                         BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BIT_CAST: tl.constexpr):
    b = tl.program_id(2)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (s < S)[:, None] & (c < C)[None, :]
    x = tl.load(x_ptr + b * stride_xb + s[:, None] * stride_xs + c[None, :], mask=mask, other=0.0).to(tl.float32)
    a = tl.maximum(tl.load(amax_ptr), amax_min)
    inv = tl.math.div_rn(tl.full((BLOCK_S, BLOCK_C), 448.0, tl.float32), tl.full((BLOCK_S, BLOCK_C), 1.0, tl.float32) * a)
    v = tl.minimum(tl.maximum(x * inv, -448.0), 448.0)
    if BIT_CAST:  # the interpreter's float32 -> E4M3 cast mis-rounds at binade carries: round on the bits
        code = _e4m3_bits(v).to(tl.uint8)
    else:  # the GPU's cvt rounds to nearest even, as the reference
        code = v.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    tl.store(codes_ptr + (b * S + s[:, None]) * C + c[None, :], code, mask=mask)


def quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As the reference: (B, S, C) or (B, S, H, D) ``x`` -> contiguous E4M3 codes of its shape and the (1,) float32
    scale ``amax / 448`` on its device. Any batch and token strides (a view of a KV cache's buffers) as long as a
    token's channels are contiguous."""
    if x.dim() not in (3, 4):
        raise ValueError(f"quantize_tensor needs (B, S, C) or (B, S, H, D), got {tuple(x.shape)}")
    if x.device.type != "cuda" and not _interpreting():
        raise RuntimeError("the Triton FP8 kernel needs a CUDA tensor (or TRITON_INTERPRET=1 to run it on the CPU)")
    if x.stride(-1) != 1 or (x.dim() == 4 and x.stride(-2) != x.shape[-1]):
        x = x.contiguous()
    x3 = x.flatten(2)
    B, S, C = x3.shape
    amax = torch.zeros(1, dtype=torch.float32, device=x.device)
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    if x3.numel():
        block_s, block_c = (4, 32) if _interpreting() else (8, 512)
        grid = (triton.cdiv(S, block_s), triton.cdiv(C, block_c), B)
        warps = 1 if _interpreting() else 4
        _tensor_amax_kernel[grid](x3, amax, S, C, x3.stride(0), x3.stride(1), BLOCK_S=block_s, BLOCK_C=block_c,
                                  num_warps=warps)
        _tensor_codes_kernel[grid](x3, codes, amax, S, C, x3.stride(0), x3.stride(1), AMAX_MIN, BLOCK_S=block_s,
                                   BLOCK_C=block_c, BIT_CAST=_interpreting(), num_warps=warps)
    return codes.view(torch.float8_e4m3fn), amax.clamp(min=AMAX_MIN) / E4M3_MAX
