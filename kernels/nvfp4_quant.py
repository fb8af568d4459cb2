"""Triton kernel: NVFP4 quantization of the rows of a matrix (reference: ``kernels/nvfp4_quant_ref.py``).

Bit-exact with the reference: the same float32 operations in the same order, divisions correctly
rounded (``div_rn``; Triton's ``/`` is an approximate division on GPUs), and the E4M3 and E2M1
roundings done on the bits, so the result does not depend on how a Triton version lowers FP8 casts.
Used for the activations of the NVFP4 linear layers (one global scale) and for the NVFP4 KV cache
(one global scale per row, i.e. per token).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK = 16


@triton.jit
def _quantize_rows_kernel(
    x_ptr, g_ptr, inv_g_ptr, packed_ptr, scales_ptr, dq_ptr,
    R, K, stride_x, stride_g,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, WRITE_DQ: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < R
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=rmask[:, None] & (cols < K)[None, :], other=0.0)
    x = tl.reshape(x.to(tl.float32), (BLOCK_R, BLOCK_K // 16, 16))
    g = tl.load(g_ptr + rows * stride_g, mask=rmask, other=1.0)
    inv_g = tl.load(inv_g_ptr + rows * stride_g, mask=rmask, other=1.0)

    # block_scale = e4m3(clamp(block_amax / 6 / global, 2**-6, 448)), round to nearest even.
    # (div_rn does not broadcast: both operands get the (BLOCK_R, blocks) shape explicitly.)
    six = tl.full((BLOCK_R, BLOCK_K // 16), 6.0, tl.float32)
    s = tl.math.div_rn(tl.math.div_rn(tl.max(tl.abs(x), axis=2), six), tl.broadcast_to(g[:, None], (BLOCK_R, BLOCK_K // 16)))
    s = tl.minimum(tl.maximum(s, 0.015625), 448.0)
    bits = s.to(tl.int32, bitcast=True)
    # RNE of the float32 mantissa to E4M3's 3 bits: add half an ulp (minus one unless the kept LSB
    # is odd) and truncate; a carry rolls into the exponent as it should. s is normal in E4M3.
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # -1048576 = ~0xFFFFF
    s = bits.to(tl.float32, bitcast=True)
    e4m3 = (((bits >> 23) - 120) << 3) | ((bits >> 20) & 7)  # E4M3 exponent bias 7 vs float32's 127

    # code = e2m1(x * ((1 / global) / block_scale)): count the midpoints below |v|; a tie goes to the
    # even code (strict > above an even code, >= above an odd one), saturating at 6 (code 7).
    v = x * tl.math.div_rn(tl.broadcast_to(inv_g[:, None], (BLOCK_R, BLOCK_K // 16)), s)[:, :, None]
    mag = tl.abs(v)
    idx = ((mag > 0.25).to(tl.int32) + (mag >= 0.75).to(tl.int32) + (mag > 1.25).to(tl.int32)
           + (mag >= 1.75).to(tl.int32) + (mag > 2.5).to(tl.int32) + (mag >= 3.5).to(tl.int32)
           + (mag > 5.0).to(tl.int32))
    code = idx | (((v.to(tl.int32, bitcast=True) >> 31) & 1) << 3)  # the sign bit, -0.0 included
    lo, hi = tl.split(tl.reshape(code, (BLOCK_R, BLOCK_K // 2, 2)))

    pcols = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    tl.store(packed_ptr + rows[:, None] * (K // 2) + pcols[None, :], (lo | (hi << 4)).to(tl.uint8),
             mask=rmask[:, None] & (pcols < K // 2)[None, :])
    scols = tl.program_id(1) * (BLOCK_K // 16) + tl.arange(0, BLOCK_K // 16)
    tl.store(scales_ptr + rows[:, None] * (K // 16) + scols[None, :], e4m3.to(tl.uint8),
             mask=rmask[:, None] & (scols < K // 16)[None, :])
    if WRITE_DQ:  # float16 code * scale * 2**-14, exact (see kernels/nvfp4_gemm.py): the GEMM's A operand
        c = code.to(tl.uint16)
        dq = (((c & 7) << 9) | ((c & 8) << 12)).to(tl.float16, bitcast=True) * s.to(tl.float16)[:, :, None]
        tl.store(dq_ptr + rows[:, None] * K + cols[None, :], tl.reshape(dq, (BLOCK_R, BLOCK_K)),
                 mask=rmask[:, None] & (cols < K)[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def quantize_rows(x: torch.Tensor, g: torch.Tensor, inv_g: torch.Tensor, dequantized: bool = False):
    """(R, K) -> packed codes (R, K/2) uint8, block scales (R, K/16) float8_e4m3fn; as the reference.

    ``g`` / ``inv_g``: float32 global scale and its reciprocal, one element (whole matrix) or (R,).
    ``dequantized``: also return (R, K) float16 ``code * block_scale * 2**-14`` (``dequantize_rows_f16``).
    """
    if x.dim() != 2 or x.shape[1] % BLOCK:
        raise ValueError(f"quantize_rows needs (R, K) with K a multiple of {BLOCK}, got {tuple(x.shape)}")
    if x.device.type != "cuda" and not _interpreting():
        raise RuntimeError("the Triton NVFP4 kernels need a CUDA tensor (or TRITON_INTERPRET=1 to run them on the CPU)")
    R, K = x.shape
    if g.numel() not in (1, R) or inv_g.shape != g.shape:
        raise ValueError(f"global scale must have 1 or {R} elements (and its reciprocal the same shape), got {tuple(g.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    g, inv_g = g.float().contiguous().reshape(-1), inv_g.float().contiguous().reshape(-1)
    packed = torch.empty(R, K // 2, dtype=torch.uint8, device=x.device)
    scales = torch.empty(R, K // BLOCK, dtype=torch.uint8, device=x.device)
    dq = torch.empty(R, K, dtype=torch.float16, device=x.device) if dequantized else packed  # packed: unused pointer
    if R == 0:
        return (packed, scales.view(torch.float8_e4m3fn)) + ((dq,) if dequantized else ())
    # A 64-column tile is 4 blocks; 32 rows keep a tile's registers small. The kernel is memory bound.
    block_r, block_k = (16, 32) if _interpreting() else (32, 64)
    grid = (triton.cdiv(R, block_r), triton.cdiv(K, block_k))
    _quantize_rows_kernel[grid](
        x, g, inv_g, packed, scales, dq, R, K, x.stride(0), 0 if g.numel() == 1 else 1,
        BLOCK_R=block_r, BLOCK_K=block_k, WRITE_DQ=dequantized,
    )
    return (packed, scales.view(torch.float8_e4m3fn)) + ((dq,) if dequantized else ())
