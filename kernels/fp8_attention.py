"""Triton kernels: 8-bit attention for Hopper -- INT8 q.k, FP8 E4M3 P.v (reference: ``kernels/fp8_attention_ref.py``).

PyTorch's SDPA has no 8-bit path in the torch we run (cuDNN's FP8 SDPA was still an open PR), and FA3 /
SageAttention are not on the device image, so this is ours: a flash-attention forward whose two dots take
8-bit operands (twice bf16's tensor-core rate on Hopper) with 32-bit accumulators and an online softmax in
base 2. The number formats and scales are the reference's (SageAttention2's split); its docstring says why.

Two kinds of launch per call:

1. ``_quantize_kernel`` (q, k, v): a (tokens, head_dim) tile of one (sample, head) -> codes in the layout
   the attention reads: int8 (B, H, S, D) for q and k, with a scale per token computed in the tile (k minus
   its channel mean, one PyTorch reduction first); E4M3 (B, H, D, S) for v -- the P.v dot reduces over
   tokens, which Hopper's 8-bit MMA wants contiguous -- with per-channel scales (one exact PyTorch max
   first). Codes and scales equal the reference bit for bit (``div_rn``; rounding on the bits).
2. ``_attention_kernel``: grid (query tiles, B * H); each program streams all key tiles of its head. A
   logit is the int32 dot x the query row's multiplier (its scale x softmax scale x log2 e) x the key's
   scale; P (in [0, 1]) is rounded to E4M3 after a x256 shift and v's channel scales / 256 apply once to
   the output.

Inputs are bf16/fp16/fp32 (B, S, H, D) tensors with head_dim a power of 2 in [16, 256]; any strides with
contiguous head_dim, which is what the KV cache's views are.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from longlive_kernels.fp8_attention_ref import P_SHIFT, channel_amax, key_mean
from longlive_kernels.fp8_quant import _e4m3_bits
from longlive_kernels.fp8_quant_ref import AMAX_MIN, E4M3_MAX

LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------- 1. quantization


@triton.jit
def _head_tile(x_ptr, S, H, stride_xb, stride_xs, stride_xh, D: tl.constexpr, BLOCK_S: tl.constexpr):
    """This program's (BLOCK_S, D) float32 tile of one (sample, head) of a (B, S, H, D) tensor, its (b, h) and rows."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    rs = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    mask = (rs < S)[:, None]
    x = tl.load(x_ptr + b * stride_xb + rs[:, None] * stride_xs + h * stride_xh + d[None, :], mask=mask, other=0.0)
    return x.to(tl.float32), bh, b, h, rs, d, mask


@triton.jit
def _quantize_kernel(
    x_ptr, codes_ptr, scale_ptr, aux_ptr,
    S, H, stride_xb, stride_xs, stride_xh,
    stride_cb, stride_ch, stride_cs, stride_cd,
    amax_min,
    MODE: tl.constexpr,  # 0: int8, a scale per token (q); 1: int8 of x - mean (aux) with inv per (b, h) given (k);
                         # 2: E4M3 with inv = 448 / amax per (b, h, channel) given in aux (v)
    D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    x, bh, b, h, rs, d, mask = _head_tile(x_ptr, S, H, stride_xb, stride_xs, stride_xh, D, BLOCK_S)
    off = b * stride_cb + h * stride_ch + rs[:, None] * stride_cs + d[None, :] * stride_cd
    if MODE == 0 or MODE == 1:
        if MODE == 0:
            amax = tl.maximum(tl.max(tl.abs(x), axis=1), amax_min)
            inv = tl.math.div_rn(tl.full((BLOCK_S,), 127.0, tl.float32), amax)[:, None]
            tl.store(scale_ptr + bh * S + rs, amax / 127.0, mask=rs < S)
        else:
            x = x - tl.load(aux_ptr + bh * D + d)[None, :]
            inv = tl.load(scale_ptr + bh)
        y = tl.minimum(tl.maximum(x * inv, -127.0), 127.0)
        y = (y + 12582912.0) - 12582912.0  # round to nearest even: 1.5 * 2**23 leaves no fraction bits
        tl.store(codes_ptr + off, y.to(tl.int8), mask=mask)
    else:
        y = tl.minimum(tl.maximum(x * tl.load(aux_ptr + bh * D + d)[None, :], -448.0), 448.0)
        tl.store(codes_ptr + off, _e4m3_bits(y).to(tl.uint8), mask=mask)


@triton.jit
def _smoothed_amax_kernel(x_ptr, mean_ptr, amax_ptr, S, H, stride_xb, stride_xs, stride_xh,
                          D: tl.constexpr, BLOCK_S: tl.constexpr):
    """max |x - mean| of a tile into amax[b, h] (atomic max: order-free, so exact and deterministic)."""
    x, bh, b, h, rs, d, mask = _head_tile(x_ptr, S, H, stride_xb, stride_xs, stride_xh, D, BLOCK_S)
    y = tl.where(mask, tl.abs(x - tl.load(mean_ptr + bh * D + d)[None, :]), 0.0)
    tl.atomic_max(amax_ptr + bh, tl.max(tl.max(y, axis=1), axis=0))


def _smoothed_amax(k: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """As ``smoothed_key_amax`` (one pass over k instead of PyTorch's float32 temporary: 0.8 ms -> ~0.06)."""
    B, S, H, D = k.shape
    amax = torch.zeros(B, H, dtype=torch.float32, device=k.device)
    block_s = 16 if _interpreting() else 64
    _smoothed_amax_kernel[(triton.cdiv(S, block_s), B * H)](k, mean, amax, S, H, k.stride(0), k.stride(1), k.stride(2),
                                                            D=D, BLOCK_S=block_s, num_warps=1 if _interpreting() else 4)
    return amax


def _launch_quantize(x: torch.Tensor, mode: int, *, aux: torch.Tensor | None = None, inv: torch.Tensor | None = None):
    B, S, H, D = x.shape
    transposed = mode == 2
    codes = torch.empty((B, H, D, S) if transposed else (B, H, S, D), dtype=torch.uint8 if transposed else torch.int8,
                        device=x.device)
    scale = torch.empty((B, H, S), dtype=torch.float32, device=x.device) if mode == 0 else inv
    stride_cs, stride_cd = (1, S) if transposed else (D, 1)
    block_s = 16 if _interpreting() else 64
    _quantize_kernel[(triton.cdiv(S, block_s), B * H)](
        x, codes, scale if scale is not None else codes, aux if aux is not None else codes,
        S, H, x.stride(0), x.stride(1), x.stride(2),
        codes.stride(0), codes.stride(1), stride_cs, stride_cd, AMAX_MIN,
        MODE=mode, D=D, BLOCK_S=block_s,
        num_warps=1 if _interpreting() else 4,
    )
    return codes, scale


def quantize_q(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As the reference: (B, S, H, D) -> int8 codes (B, H, S, D), scales (B, H, S)."""
    return _launch_quantize(q, 0)


def quantize_k(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As the reference: (B, S, H, D) -> int8 codes (B, H, S, D) of k minus its channel mean, scales (B, H).

    The channel mean is PyTorch's (the reference's sum order), the smoothed max one Triton pass."""
    mean = key_mean(k).contiguous()
    amax = _smoothed_amax(k, mean).clamp(min=AMAX_MIN)
    inv = torch.full_like(amax, 127.0) / amax
    codes, _ = _launch_quantize(k, 1, aux=mean, inv=inv.contiguous())
    return codes, amax / 127.0


def quantize_v(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As the reference: (B, S, H, D) -> E4M3 codes (B, H, D, S), scales (B, H, D)."""
    amax = channel_amax(v).clamp(min=AMAX_MIN).contiguous()
    codes, _ = _launch_quantize(v, 2, aux=torch.full_like(amax, E4M3_MAX) / amax)
    return codes.view(torch.float8_e4m3fn), amax / E4M3_MAX


# ----------------------------------------------------------------------------- 2. attention


@triton.jit
def _key_tile(q, k_ptrs, ks_ptrs, vt_ptrs, cols, Sk, row_mult, m_i, l_i, acc, MASKED: tl.constexpr,
              BIT_CAST: tl.constexpr, QK_INT8: tl.constexpr, KEY_PER_TOKEN: tl.constexpr):
    if MASKED:
        k = tl.load(k_ptrs, mask=(cols < Sk)[:, None], other=0)
        vt = tl.load(vt_ptrs, mask=(cols < Sk)[:, None], other=0)
    else:
        k = tl.load(k_ptrs)
        vt = tl.load(vt_ptrs)
    if QK_INT8:
        s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)  # exact
    else:
        s = tl.dot(q, tl.trans(k.to(tl.float8e4nv, bitcast=True)))
    if KEY_PER_TOKEN:
        if MASKED:
            s = s * tl.load(ks_ptrs, mask=cols < Sk, other=0.0)[None, :]
        else:
            s = s * tl.load(ks_ptrs)[None, :]
    if MASKED:
        s = tl.where((cols < Sk)[None, :], s, float("-inf"))
    # base-2 logits are s * row_mult (> 0), so the row max scales too: one FMA per logit (the tutorial's form),
    # and + 8 = log2(256) is P's shift, free inside the exponent; l sums the shifted P, so it cancels
    m_new = tl.maximum(m_i, tl.max(s, 1) * row_mult)
    p = tl.math.exp2(s * row_mult[:, None] - (m_new - 8.0)[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if BIT_CAST:  # the interpreter's float32 -> E4M3 cast mis-rounds at binade carries (124.3 -> 64): round on the bits
        p8 = _e4m3_bits(p).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    else:  # the GPU's cvt rounds to nearest even
        p8 = p.to(tl.float8e4nv)
    acc = tl.dot(p8, vt.to(tl.float8e4nv, bitcast=True), acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _attention_kernel(
    q_ptr, qs_ptr, k_ptr, ks_ptr, vt_ptr, vs_ptr, out_ptr,
    Sq, Sk, H, sm_scale_log2,
    stride_ob, stride_os, stride_oh,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BIT_CAST: tl.constexpr,
    QK_INT8: tl.constexpr = True, KEY_PER_TOKEN: tl.constexpr = True,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    rn = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + bh * Sq * D + rm[:, None] * D + d[None, :], mask=(rm < Sq)[:, None], other=0)
    if not QK_INT8:
        q = q.to(tl.float8e4nv, bitcast=True)
    # padded query rows: zero codes, multiplier 1 -- finite logits, never stored
    row_mult = tl.load(qs_ptr + bh * Sq + rm, mask=rm < Sq, other=1.0) * sm_scale_log2
    if not KEY_PER_TOKEN:
        row_mult = row_mult * tl.load(ks_ptr + bh)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    k_base = k_ptr + bh * Sk * D + d[None, :]
    ks_base = ks_ptr + bh * Sk
    vt_base = vt_ptr + bh * D * Sk + d[None, :] * Sk
    n_full = (Sk // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        cols = start + rn
        m_i, l_i, acc = _key_tile(q, k_base + cols[:, None] * D, ks_base + cols, vt_base + cols[:, None], cols, Sk,
                                  row_mult, m_i, l_i, acc, MASKED=False, BIT_CAST=BIT_CAST, QK_INT8=QK_INT8,
                                  KEY_PER_TOKEN=KEY_PER_TOKEN)
    if n_full < Sk:
        cols = n_full + rn
        m_i, l_i, acc = _key_tile(q, k_base + cols[:, None] * D, ks_base + cols, vt_base + cols[:, None], cols, Sk,
                                  row_mult, m_i, l_i, acc, MASKED=True, BIT_CAST=BIT_CAST, QK_INT8=QK_INT8,
                                  KEY_PER_TOKEN=KEY_PER_TOKEN)

    vs = tl.load(vs_ptr + bh * D + d)  # v's channel scales (P's x256 is in l too)
    out = acc * vs[None, :] / l_i[:, None]
    o_off = b * stride_ob + rm[:, None] * stride_os + h * stride_oh + d[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=(rm < Sq)[:, None])


def default_config(D: int) -> dict:
    """Tile sizes and launch shape: the smallest tiles the interpreter's dots take on the CPU; on Hopper, the
    fastest of ``benchmarks/fp8_attention.py``'s sweep at Wan2.2-5B's shape (128 x 64, 4 warps, 3 stages)."""
    if _interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}


def attention_codes(qc, qs, kc, ks, vc, vs, out: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """The attention launch on quantized operands (as ``quantize_q/k/v`` return them) into ``out`` (B, Sq, H, D).

    ``benchmarks/fp8_attention.py`` also times E4M3 q/k codes (int8 views of them) and one key scale per head
    (``ks`` of (B, H)): what INT8 logits and per-token key scales cost in speed."""
    B, H, Sq, D = qc.shape
    Sk = kc.shape[2]
    cfg = {**default_config(D), **(config or {})}
    qk_int8 = qc.dtype == torch.int8
    if not qk_int8:
        qc, kc = qc.view(torch.uint8), kc.view(torch.uint8)
    grid = (triton.cdiv(Sq, cfg["BLOCK_M"]), B * H)
    _attention_kernel[grid](
        qc, qs, kc, ks, vc.view(torch.uint8), vs, out,
        Sq, Sk, H, D**-0.5 * LOG2E, out.stride(0), out.stride(1), out.stride(2),
        D=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BIT_CAST=_interpreting(), QK_INT8=qk_int8,
        KEY_PER_TOKEN=ks.dim() == 3, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """Softmax attention of (B, Sq, H, D) q over (B, Sk, H, D) k, v through 8 bits; (B, Sq, H, D) in q's dtype.

    No mask (the steady streaming block: every query sees the whole window); the fast path sends masked
    calls to SDPA.
    """
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    if k.shape != (B, Sk, H, D) or v.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: need (B, S, H, D) with "
                         "the same B, H, D and k, v of one shape")
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"head_dim {D}: the FP8 attention kernel needs a power of 2 in [16, 256]")
    if Sk == 0:
        raise ValueError("attention needs at least one key")
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError("the Triton FP8 attention needs CUDA tensors (or TRITON_INTERPRET=1 to run it on the CPU)")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if Sq == 0:
        return out
    return attention_codes(*quantize_q(q), *quantize_k(k), *quantize_v(v), out, config)


__all__ = ["fp8_attention", "quantize_q", "quantize_k", "quantize_v", "attention_codes", "default_config", "P_SHIFT"]
