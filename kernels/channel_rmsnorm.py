"""Triton kernel: channel RMS norm (+ SiLU) of the Wan VAE decoder in one pass (reference:
``kernels/channel_rmsnorm_ref.py``).

At 704x1280 the VAE decoder's last stages run on (1, 256, 4, 352, 640) bf16 tensors (460 MB). diffusers'
``WanRMS_norm`` + SiLU is a float32 copy, a norm reduction over channels, a division, a cast, two products,
a bias and the SiLU: about eight passes, several of them over float32 copies. This kernel reads the tensor
twice (sum of squares over channels, then normalise; the second read mostly hits L2) and writes it once.

Layout: channels-first and contiguous, viewed as (B, C, P) with P the flattened spatial positions; a
program owns ``BLOCK_P`` consecutive positions (coalesced along P) and loops over the channels in
``BLOCK_C`` chunks. Arithmetic in float32 with one final rounding (the reference rounds after the norm,
after each product and after the SiLU), so bf16 results may differ from the reference by a rounding or two.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _channel_rmsnorm_kernel(
    x_ptr, gamma_ptr, bias_ptr, out_ptr, C, P, scale,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(1)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < P
    base = b.to(tl.int64) * C * P
    sumsq = tl.zeros((BLOCK_P,), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = (c < C)[:, None] & pmask[None, :]
        x = tl.load(x_ptr + base + c[:, None].to(tl.int64) * P + p[None, :], mask=m, other=0.0).to(tl.float32)
        sumsq += tl.sum(x * x, axis=0)
    inv = scale / tl.maximum(tl.sqrt(sumsq), 1e-12)  # F.normalize's eps, then diffusers' sqrt(C)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < C
        m = cmask[:, None] & pmask[None, :]
        off = base + c[:, None].to(tl.int64) * P + p[None, :]
        x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        y = x * inv[None, :] * tl.load(gamma_ptr + c, mask=cmask, other=0.0)[:, None]
        if HAS_BIAS:
            y += tl.load(bias_ptr + c, mask=cmask, other=0.0)[:, None]
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=m)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def rms_norm(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | float = 0.0, *, silu: bool = False) -> torch.Tensor:
    """As the reference: (B, C, *spatial) channels-first ``x`` -> normalised over C, ``* sqrt(C) * gamma + bias``,
    optionally SiLU; ``gamma`` / ``bias`` hold C values (any shape, e.g. diffusers' (C, 1, 1, 1))."""
    if x.dim() < 2:
        raise ValueError(f"rms_norm needs (B, C, ...), got {tuple(x.shape)}")
    if x.device.type != "cuda" and not _interpreting():
        raise RuntimeError("the Triton channel RMS-norm kernel needs a CUDA tensor (or TRITON_INTERPRET=1 on the CPU)")
    B, C = x.shape[:2]
    if gamma.numel() != C or (isinstance(bias, torch.Tensor) and bias.numel() != C):
        raise ValueError(f"gamma and bias need {C} values, got {gamma.numel()} and "
                         f"{bias.numel() if isinstance(bias, torch.Tensor) else 'a scalar'}")
    has_bias = isinstance(bias, torch.Tensor)
    if not has_bias and bias != 0.0:
        raise ValueError("a scalar bias must be 0.0 (diffusers' bias=False)")
    x = x.contiguous()
    P = x.numel() // (B * C) if B * C else 0
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    g = gamma.detach().reshape(C).float().contiguous()
    bb = bias.detach().reshape(C).float().contiguous() if has_bias else g
    block_c, block_p = (8, 16) if _interpreting() else (32, 128)
    _channel_rmsnorm_kernel[(triton.cdiv(P, block_p), B)](
        x, g, bb, out, C, P, float(C) ** 0.5, HAS_BIAS=has_bias, SILU=silu, BLOCK_C=block_c, BLOCK_P=block_p,
        num_warps=1 if _interpreting() else 4,
    )
    return out
