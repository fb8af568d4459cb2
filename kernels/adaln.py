"""Triton kernels: LayerNorm + adaLN modulation, and the gated residual (reference: ``kernels/adaln_ref.py``).

In PyTorch a Wan block's ``LayerNorm32(x) * (1 + scale) + shift`` is five or six elementwise kernels
with float32 intermediates (cast, norm, ``1 + scale``, product, sum, cast back) and ``x + h * gate`` three
or four: at Wan2.2-5B's block of 7040 tokens x 3072 channels each float32 intermediate is 87 MB, so a
layer moves ~1.5 GB for what needs ~0.25 GB. Each kernel here reads its inputs once and writes once.

``layernorm_modulate``: one program per token (a whole row of D channels in registers, D <= 16384): mean
and variance in float32 (two passes over the registers, as ``torch.var`` rather than a running sum of
squares), optional affine weight/bias, then the frame's ``scale``/``shift`` row. ``gated_residual``: tiles
of tokens x channels, the gate row of each token's frame. Results differ from the reference only in float32
rounding (the order of the row sums, FMA contraction), which tests bound.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _layernorm_modulate_kernel(
    x_ptr, out_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,
    S, D, frame_tokens, frames, eps,
    stride_xb, stride_xs, stride_mb, stride_mf,
    AFFINE: tl.constexpr, MODULATE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // S
    s = row % S
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    x = tl.load(x_ptr + b * stride_xb + s * stride_xs + cols, mask=cmask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(cmask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / D
    y = xc * (1.0 / tl.sqrt(var + eps))
    if AFFINE:
        y = y * tl.load(w_ptr + cols, mask=cmask, other=1.0) + tl.load(b_ptr + cols, mask=cmask, other=0.0)
    if MODULATE:
        frame = tl.minimum(s // frame_tokens, frames - 1)
        m_off = b * stride_mb + frame * stride_mf + cols
        scale = tl.load(scale_ptr + m_off, mask=cmask, other=0.0)
        shift = tl.load(shift_ptr + m_off, mask=cmask, other=0.0)
        y = y * (1.0 + scale) + shift
    tl.store(out_ptr + row * D + cols, y.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _gated_residual_kernel(
    x_ptr, h_ptr, gate_ptr, out_ptr,
    S, D, frame_tokens, frames,
    stride_xb, stride_xs, stride_hb, stride_hs, stride_gb, stride_gf,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(2)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (s < S)[:, None] & (c < D)[None, :]
    x = tl.load(x_ptr + b * stride_xb + s[:, None] * stride_xs + c[None, :], mask=mask, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + b * stride_hb + s[:, None] * stride_hs + c[None, :], mask=mask, other=0.0).to(tl.float32)
    frame = tl.minimum(s // frame_tokens, frames - 1)
    g = tl.load(gate_ptr + b * stride_gb + frame[:, None] * stride_gf + c[None, :], mask=mask, other=0.0)
    out = x + h * g
    tl.store(out_ptr + b * S * D + s[:, None] * D + c[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check(x: torch.Tensor, mod: torch.Tensor | None, name: str) -> None:
    if x.dim() != 3:
        raise ValueError(f"expected x of shape (B, S, D), got {tuple(x.shape)}")
    if x.device.type != "cuda" and not _interpreting():
        raise RuntimeError("the Triton adaLN kernels need CUDA tensors (or TRITON_INTERPRET=1 to run them on the CPU)")
    if mod is not None:
        B, S, D = x.shape
        if mod.dim() != 4 or mod.shape[0] not in (1, B) or mod.shape[2] != 1 or mod.shape[3] != D or S % mod.shape[1]:
            raise ValueError(f"{name} must be (B, f, 1, {D}) with f dividing {S} tokens, got {tuple(mod.shape)}")


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _mod(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """float32 modulation rows with a unit channel stride; (tensor, batch stride, frame stride)."""
    t = t.float()
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, t.stride(0) if t.shape[0] > 1 else 0, t.stride(1)


def layernorm_modulate(
    x: torch.Tensor, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None, *,
    weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-6,
) -> torch.Tensor:
    """As the reference: (B, S, D) ``x`` -> ``(LayerNorm(x) [* weight + bias]) * (1 + scale) + shift`` in x's dtype."""
    _check(x, scale, "scale")
    if (scale is None) != (shift is None) or (weight is None) != (bias is None):
        raise ValueError("give scale and shift together, and weight and bias together")
    if shift is not None and shift.shape != scale.shape:
        raise ValueError(f"shift {tuple(shift.shape)} and scale {tuple(scale.shape)} must have the same shape")
    B, S, D = x.shape
    if D > 16384:
        raise ValueError(f"layernorm_modulate keeps a row in registers: D <= 16384, got {D}")
    x = _rows(x)
    out = torch.empty((B, S, D), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    frames, mb, mf = 1, 0, 0
    if scale is not None:
        scale, mb, mf = _mod(scale)
        shift, mb2, mf2 = _mod(shift)
        if (mb2, mf2) != (mb, mf):  # the kernel indexes both with one set of strides
            (scale, mb, mf), (shift, _, _) = _mod(scale.contiguous()), _mod(shift.contiguous())
        frames = scale.shape[1]
    w = weight.float().contiguous() if weight is not None else out  # unused pointers when not AFFINE/MODULATE
    bb = bias.float().contiguous() if bias is not None else out
    block_d = triton.next_power_of_2(D)
    _layernorm_modulate_kernel[(B * S,)](
        x, out, w, bb, scale if scale is not None else out, shift if shift is not None else out,
        S, D, S // frames, frames, float(eps), x.stride(0), x.stride(1), mb, mf,
        AFFINE=weight is not None, MODULATE=scale is not None, BLOCK_D=block_d,
        num_warps=1 if _interpreting() else min(16, max(1, block_d // 256)),
    )
    return out


def gated_residual(x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """As the reference: ``x + h * gate`` in float32, rounded to x's dtype; (B, S, D) x and h, (B, f, 1, D) gate."""
    _check(x, gate, "gate")
    if h.shape != x.shape:
        raise ValueError(f"h {tuple(h.shape)} must have x's shape {tuple(x.shape)}")
    B, S, D = x.shape
    x, h = _rows(x), _rows(h)
    out = torch.empty((B, S, D), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    gate, gb, gf = _mod(gate)
    block_s, block_d = (4, 32) if _interpreting() else (8, 256)
    grid = (triton.cdiv(S, block_s), triton.cdiv(D, block_d), B)
    _gated_residual_kernel[grid](
        x, h, gate, out, S, D, S // gate.shape[1], gate.shape[1],
        x.stride(0), x.stride(1), h.stride(0), h.stride(1), gb, gf,
        BLOCK_S=block_s, BLOCK_D=block_d,
    )
    return out
