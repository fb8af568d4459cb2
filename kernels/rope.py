"""Triton kernel: rotary position embedding in one pass (reference: ``kernels/rope_ref.py``).

PyTorch's version of the rotation (``apply_rope``) runs about eight elementwise kernels with float32
intermediates (cast, two products per output, difference and sum, stack, cast back): for the keys of a
full window at Wan2.2-5B (28160 tokens x 3072 channels, bf16) that is ~2 GB of traffic per layer and
forward. This kernel reads ``x`` and the cos/sin rows once and writes the rotated tensor once (~0.4 GB).

A program handles a tile of ``BLOCK_S`` tokens x ``BLOCK_C`` channels (heads flattened, pairs never
straddle a tile because ``BLOCK_C`` is even); the cos/sin row of a token is shared by all its heads and is
gathered from the (small, L2-resident) table. Arithmetic in float32 as the reference; the compiler may
contract a product and a sum into one FMA, so float32 results can differ in the last bit (tests bound it).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    S, C, HALF_D,
    stride_xb, stride_xs, stride_tb, stride_ts,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(2)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (s < S)[:, None] & (c < C)[None, :]
    x = tl.load(x_ptr + b * stride_xb + s[:, None] * stride_xs + c[None, :], mask=mask, other=0.0).to(tl.float32)
    x1, x2 = tl.split(tl.reshape(x, (BLOCK_S, BLOCK_C // 2, 2)))

    pair = (tl.program_id(1) * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2)) % HALF_D  # pair index within its head
    pmask = (s < S)[:, None] & ((tl.program_id(1) * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2)) < C // 2)[None, :]
    t_off = b * stride_tb + s[:, None] * stride_ts + pair[None, :]
    cos = tl.load(cos_ptr + t_off, mask=pmask, other=1.0)
    sin = tl.load(sin_ptr + t_off, mask=pmask, other=0.0)

    o1 = x1 * cos - x2 * sin
    o2 = x1 * sin + x2 * cos
    out = tl.reshape(tl.join(o1, o2), (BLOCK_S, BLOCK_C))
    tl.store(out_ptr + b * S * C + s[:, None] * C + c[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, S, heads, head_dim) ``x`` by (S, 1, head_dim/2) or (B, S, 1, head_dim/2) float32 tables.

    ``x`` may be a view with any batch and token strides (e.g. a slice of a preallocated KV cache) as
    long as each token's heads x head_dim channels are contiguous. Returns a new contiguous tensor of
    ``x``'s dtype, as the reference does.
    """
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"apply_rope needs (B, S, heads, head_dim) with an even head_dim, got {tuple(x.shape)}")
    if x.device.type != "cuda" and not _interpreting():
        raise RuntimeError("the Triton RoPE kernel needs a CUDA tensor (or TRITON_INTERPRET=1 to run it on the CPU)")
    B, S, H, D = x.shape
    batched = cos.dim() == 4
    want = (B, S, 1, D // 2) if batched else (S, 1, D // 2)
    if tuple(cos.shape) != want or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be {want} for x of shape {tuple(x.shape)}, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if x.stride(-1) != 1 or x.stride(-2) != D:
        x = x.contiguous()
    cos, sin = cos.float(), sin.float()
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty((B, S, H, D), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    C = H * D
    # 8 tokens x 512 channels: 4096 elements per program, 16-byte loads along a token's channels.
    block_s, block_c = (4, 32) if _interpreting() else (8, 512)
    grid = (triton.cdiv(S, block_s), triton.cdiv(C, block_c), B)
    _rope_kernel[grid](
        x, cos, sin, out, S, C, D // 2,
        x.stride(0), x.stride(1), cos.stride(0) if batched else 0, cos.stride(-3),
        BLOCK_S=block_s, BLOCK_C=block_c,
    )
    return out
