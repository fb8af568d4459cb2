"""Triton kernel: attention that reads the NVFP4 KV cache packed (reference: ``kernels/nvfp4_attention_ref.py``).

The plain path dequantizes every held token of K and V to the model's dtype, concatenates the new tokens,
rotates all keys and only then runs SDPA: at Wan2.2-5B's shape ~1.6 GiB of K/V traffic and ~0.95 GiB of
temporaries per layer call, for a 70 MiB cache (``benchmarks/nvfp4_kv_attention.py``). This flash-attention forward (online softmax, float32 accumulators)
instead streams the cache as it is stored -- 4-bit codes, one E4M3 scale per 16 channels, one float32
global per token -- dequantizes and rotates each key tile in registers, then streams the new dense tokens.

Layout tricks:

* Wan's RoPE rotates *adjacent* channel pairs (2i, 2i+1), and a packed byte holds exactly elements 2i (low
  nibble) and 2i+1 (high nibble). So a byte is one RoPE pair: the kernel keeps every head split into its
  even and odd halves (q, k, v and the accumulator), rotates (even, odd) with one cos/sin per byte, and
  takes q.k as ``q_even.k_even + q_odd.k_odd`` -- two dots, no interleaving of nibbles.
* Values decode to exactly the reference's float32 ``code * (global * block_scale)`` (then rounded to the
  model's dtype); keys are rotated from that float32 decode, where the reference first rounds them to the
  model's dtype (no difference in float32; at most one bf16 rounding apart in bf16). Beyond that the two
  differ in the order of float32 sums and the online softmax.

Grid: (query tiles, batch * heads); each program walks all keys of its (sample, head).

Speed (H100, Wan2.2-5B shape): 36 ms against 6.1 ms for dequantize + cat + RoPE + SDPA, at 67 TFLOP/s: every
query tile decodes and rotates the whole cache again (28 tiles of 256 queries per head), and the decode,
rotation and cos/sin loads cost ALU and L2 time that Hopper's tensor cores do not hide. An earlier version
that loaded q / new tokens as one tile split into even/odd halves (``tl.split``) ran at 27.6 ms.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from longlive_kernels.nvfp4_gemm import _e2m1_to_f16

BLOCK = 16


@triton.jit
def _attend(qe, qo, ke, ko, ve, vo, valid, m_i, l_i, acc_e, acc_o, qk_scale, PRECISION: tl.constexpr):
    """One key tile of the online softmax (base-2: qk_scale carries log2(e))."""
    s = tl.dot(qe, tl.trans(ke), input_precision=PRECISION)
    s = tl.dot(qo, tl.trans(ko), s, input_precision=PRECISION) * qk_scale
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(ve.dtype)
    acc_e = tl.dot(p, ve, acc_e * alpha[:, None], input_precision=PRECISION)
    acc_o = tl.dot(p, vo, acc_o * alpha[:, None], input_precision=PRECISION)
    return m_new, l_i, acc_e, acc_o


@triton.jit
def _dequantize(packed_ptr, scales_ptr, global_ptr, rows, cols, mask, row_mask, stride_pt, stride_st, stride_gt):
    """Even and odd channels of a tile of cached tokens in float32, exactly ``dequantize_rows``' values."""
    byte = tl.load(packed_ptr + rows[:, None] * stride_pt + cols[None, :], mask=mask, other=0).to(tl.uint16)
    # byte j of a head is channels 2j, 2j+1: its block of 16 channels is j // 8 (E4M3 -> float32 is exact)
    bs = tl.load(scales_ptr + rows[:, None] * stride_st + (cols // 8)[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(global_ptr + rows * stride_gt, mask=row_mask, other=0.0)
    scale = g[:, None] * bs  # global * block scale first, as the reference
    # _e2m1_to_f16 is code * 2**-14 (exact); * 2**14 restores the code exactly, then one rounding by scale
    even = (_e2m1_to_f16(byte).to(tl.float32) * 16384.0) * scale
    odd = (_e2m1_to_f16(byte >> 4).to(tl.float32) * 16384.0) * scale
    return even, odd


@triton.jit
def _rotate(even, odd, cos_ptr, sin_ptr, tokens, cols, mask, stride_ts, DTYPE: tl.constexpr):
    """RoPE of a (tokens, pairs) tile in float32, rounded to DTYPE (as ``apply_rope``)."""
    off = tokens[:, None] * stride_ts + cols[None, :]
    cos = tl.load(cos_ptr + off, mask=mask, other=1.0)
    sin = tl.load(sin_ptr + off, mask=mask, other=0.0)
    e, o = even.to(tl.float32), odd.to(tl.float32)
    return (e * cos - o * sin).to(DTYPE), (e * sin + o * cos).to(DTYPE)


@triton.jit
def _nvfp4_attention_kernel(
    q_ptr, out_ptr, kp_ptr, ks_ptr, kg_ptr, vp_ptr, vs_ptr, vg_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr,
    Sq, N_CACHED, S_NEW, H, HALF_D, qk_scale,
    stride_qb, stride_qs, stride_qh, stride_ob, stride_os, stride_oh,
    stride_pb, stride_pt, stride_sb, stride_st, stride_gb, stride_gt,
    stride_kb, stride_ks, stride_kh, stride_tb, stride_ts,
    SQ_BUCKET, KEYS_BUCKET,  # only autotuning keys
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HD: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = (tl.program_id(1) // H).to(tl.int64)
    h = tl.program_id(1) % H
    DTYPE = q_ptr.dtype.element_ty

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    j = tl.arange(0, BLOCK_HD)  # pair (= packed byte) index within the head; padded to a power of 2
    jm = j < HALF_D
    # even and odd channels as two plain strided tiles (no reshape/split): ordinary layouts for the dots
    q_off = b * stride_qb + rm[:, None] * stride_qs + h * stride_qh + 2 * j[None, :]
    q_mask = (rm < Sq)[:, None] & jm[None, :]
    qe = tl.load(q_ptr + q_off, mask=q_mask, other=0.0)
    qo = tl.load(q_ptr + q_off + 1, mask=q_mask, other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_e = tl.zeros((BLOCK_M, BLOCK_HD), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_M, BLOCK_HD), dtype=tl.float32)
    cos_b, sin_b = cos_ptr + b * stride_tb, sin_ptr + b * stride_tb

    # held tokens: packed codes + block scales + per-token global, pre-RoPE keys
    p_off, s_off, g_off = b * stride_pb + h * HALF_D, b * stride_sb + h * (HALF_D // 8), b * stride_gb
    for start in range(0, N_CACHED, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N)
        valid = rn < N_CACHED
        mask = valid[:, None] & jm[None, :]
        # the key is rotated from the float32 decode (the reference rounds it to DTYPE first: <= 1 ulp apart)
        ke, ko = _dequantize(kp_ptr + p_off, ks_ptr + s_off, kg_ptr + g_off, rn, j, mask, valid,
                             stride_pt, stride_st, stride_gt)
        ke, ko = _rotate(ke, ko, cos_b, sin_b, rn, j, mask, stride_ts, DTYPE)
        ve, vo = _dequantize(vp_ptr + p_off, vs_ptr + s_off, vg_ptr + g_off, rn, j, mask, valid,
                             stride_pt, stride_st, stride_gt)
        m_i, l_i, acc_e, acc_o = _attend(qe, qo, ke, ko, ve.to(DTYPE), vo.to(DTYPE), valid, m_i, l_i, acc_e, acc_o,
                                         qk_scale, PRECISION)

    # new tokens: dense, pre-RoPE keys at key positions N_CACHED + s
    kv_off = b * stride_kb + h * stride_kh
    for start in range(0, S_NEW, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N)
        valid = rn < S_NEW
        mask = valid[:, None] & jm[None, :]
        off = kv_off + rn[:, None] * stride_ks + 2 * j[None, :]
        ke, ko = tl.load(k_ptr + off, mask=mask, other=0.0), tl.load(k_ptr + off + 1, mask=mask, other=0.0)
        ke, ko = _rotate(ke, ko, cos_b, sin_b, N_CACHED + rn, j, mask, stride_ts, DTYPE)
        ve, vo = tl.load(v_ptr + off, mask=mask, other=0.0), tl.load(v_ptr + off + 1, mask=mask, other=0.0)
        m_i, l_i, acc_e, acc_o = _attend(qe, qo, ke, ko, ve, vo, valid, m_i, l_i, acc_e, acc_o, qk_scale, PRECISION)

    o_off = b * stride_ob + rm[:, None] * stride_os + h * stride_oh + 2 * j[None, :]
    tl.store(out_ptr + o_off, (acc_e / l_i[:, None]).to(DTYPE), mask=q_mask)
    tl.store(out_ptr + o_off + 1, (acc_o / l_i[:, None]).to(DTYPE), mask=q_mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _configs():
    if _interpreting():  # the CPU interpreter: the smallest tiles tl.dot takes, so odd sizes cross tiles
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16})]
    # Hopper, head_dim 128: the key tile's decode + rotation is shared by BLOCK_M queries, so tall query
    # tiles amortise it; the accumulator is two (BLOCK_M, head_dim / 2) halves, i.e. one ordinary one.
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 8, 3), (128, 64, 4, 2),
                             (64, 64, 4, 2), (64, 32, 4, 3), (64, 128, 4, 2), (256, 64, 8, 2), (256, 32, 8, 2)]
    ]


_kernel = triton.autotune(configs=_configs(), key=["HALF_D", "SQ_BUCKET", "KEYS_BUCKET"])(_nvfp4_attention_kernel)

Packed = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel takes one set of strides for K and V: make them agree (cache views normally do)."""
    if a.stride() != b.stride() or a.stride(-1) != 1:
        return a.contiguous(), b.contiguous()
    return a, b


def nvfp4_attention(
    q: torch.Tensor, k_held: Packed | None, v_held: Packed | None, k: torch.Tensor, v: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor,
) -> torch.Tensor:
    """SDPA of rotated ``q`` over rope(cached K ++ k) and cached V ++ v; see ``kernels/nvfp4_attention_ref.py``.

    q (B, Sq, H, D) already rotated; ``k_held`` / ``v_held``: (packed (B, n, H*D/2) uint8, scales
    (B, n, H*D/16) float8_e4m3fn, global (B, n) float32) views of the n held tokens, or None; k, v
    (B, Sn, H, D) new tokens (k before RoPE); cos/sin (n + Sn, 1, D/2) or (B, n + Sn, 1, D/2). D a multiple
    of 16. Returns (B, Sq, H, D) in q's dtype.
    """
    B, Sq, H, D = q.shape
    Sn = k.shape[1]
    if D % BLOCK or k.shape != (B, Sn, H, D) or v.shape != k.shape or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)} {v.dtype}: "
                         f"need (B, S, H, D) of one dtype with D a multiple of {BLOCK}")
    n = 0 if k_held is None else k_held[2].shape[1]
    for held in (k_held, v_held) if n else ():
        p, s, g = held
        if p.shape != (B, n, H * D // 2) or s.shape != (B, n, H * D // BLOCK) or g.shape != (B, n):
            raise ValueError(f"cached K/V views must be (B, n, H*D/2), (B, n, H*D/16), (B, n) for B={B}, n={n}, "
                             f"H*D={H * D}; got {tuple(p.shape)}, {tuple(s.shape)}, {tuple(g.shape)}")
    batched = cos.dim() == 4
    want = (B, n + Sn, 1, D // 2) if batched else (n + Sn, 1, D // 2)
    if tuple(cos.shape) != want or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be {want} for {n} cached + {Sn} new keys, got {tuple(cos.shape)}")
    if n + Sn == 0:
        raise ValueError("attention needs at least one key")
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError("the Triton NVFP4 attention kernel needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")

    q = q if q.stride(-1) == 1 else q.contiguous()
    k, v = _same_strides(k, v)
    cos, sin = cos.float(), sin.float()
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    if n:
        (kp, vp), (ks, vs), (kg, vg) = (_same_strides(a, b) for a, b in zip(k_held, v_held))
    else:  # unused pointers
        kp = vp = torch.empty(1, 1, 1, dtype=torch.uint8, device=q.device)
        ks = vs = torch.empty(1, 1, 1, dtype=torch.float8_e4m3fn, device=q.device)
        kg = vg = torch.empty(1, 1, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # float32 stays float32 (no TF32 rounding)
    bucket = lambda x: max(x, 1).bit_length()  # noqa: E731 -- retune only when a size doubles
    grid = lambda meta: (triton.cdiv(Sq, meta["BLOCK_M"]), B * H)  # noqa: E731
    _kernel[grid](
        q, out, kp, ks, kg, vp, vs, vg, k, v, cos, sin,
        Sq, n, Sn, H, D // 2, 1.0 / math.sqrt(D) * math.log2(math.e),
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
        kp.stride(0), kp.stride(1), ks.stride(0), ks.stride(1), kg.stride(0), kg.stride(1),
        k.stride(0), k.stride(1), k.stride(2), cos.stride(0) if batched else 0, cos.stride(-3),
        bucket(Sq), bucket(n + Sn),
        BLOCK_HD=max(triton.next_power_of_2(D // 2), 16), PRECISION=precision,
    )
    return out
