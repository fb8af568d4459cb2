"""Plain-PyTorch reference of ``kernels/nvfp4_quant.py``: NVFP4 quantization of the rows of a matrix.

Rows of ``x`` (R, K) are quantized in blocks of 16 along K with one FP32 global scale per row or one
for the whole matrix (a per-row global is what the NVFP4 KV cache stores: each cached token is
quantized on its own, so its codes never depend on what else was written with it). The arithmetic is
the NVFP4 definition of ``longlive/quant/nvfp4.py`` (torchao's order of operations), restated here in
plain PyTorch so that ``kernels/`` stays below ``longlive`` in the layering; ``tests/unit/test_nvfp4_kernels.py``
checks the two agree bit for bit, and that the Triton kernel agrees with this file bit for bit.

Layouts: codes packed two per byte, lower index in the low nibble, (R, K/2) uint8; block scales
(R, K/16) float8_e4m3fn; dequantized value = code * (global * block_scale).
"""

from __future__ import annotations

import functools

import torch

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_MIN_SCALE = 2.0**-6  # smallest normal E4M3: the floor of block scales (as torchao)
GLOBAL_SCALE_MIN = 2.0**-120  # keeps (1 / global) / 2**-6 finite; see longlive/quant/nvfp4.py
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Midpoints between neighbouring E2M1 magnitudes; a tie goes to the even code (see e2m1_round).
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def global_scale(x: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(global, 1 / global) in float32: ``amax / (6 * 448)`` floored at 2**-120; shape (R,) or ()."""
    # max |x| in x's own dtype (exact), without materialising |x| or a float32 copy of large activations
    amax = torch.linalg.vector_norm(x.detach(), float("inf"), dim=-1 if per_row else None).float()
    g = (amax / (E2M1_MAX * E4M3_MAX)).clamp(min=GLOBAL_SCALE_MIN)
    return g, 1.0 / g


def e2m1_round(v: torch.Tensor) -> torch.Tensor:
    """Float32 values already divided by their scale -> 4-bit codes (uint8): nearest, ties to even, saturating."""
    mag = v.abs()
    idx = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for c, mid in enumerate(_MIDPOINTS):
        # On a midpoint between codes c and c+1 the even one wins: down when c is even, up when odd.
        idx += (mag > mid) if c % 2 == 0 else (mag >= mid)
    return idx | (torch.signbit(v).to(torch.uint8) << 3)


def quantize_rows(
    x: torch.Tensor, g: torch.Tensor, inv_g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, K) floating -> packed codes (R, K/2) uint8 and block scales (R, K/16) float8_e4m3fn.

    ``g`` / ``inv_g``: float32 global scale and its reciprocal, shape () or (R,) (see :func:`global_scale`).
    """
    if x.dim() != 2 or x.shape[-1] % BLOCK:
        raise ValueError(f"quantize_rows needs (R, K) with K a multiple of {BLOCK}, got {tuple(x.shape)}")
    blocks = x.detach().float().unflatten(-1, (-1, BLOCK))  # (R, K/16, 16)
    g = g.float().reshape(-1, 1) if g.dim() else g.float()
    inv_g = inv_g.float().reshape(-1, 1) if inv_g.dim() else inv_g.float()
    # block_scale = e4m3(block_amax / 6 / global): clamp first (the cast turns > 448 into NaN).
    scale = (blocks.abs().amax(-1) / E2M1_MAX / g).clamp(E4M3_MIN_SCALE, E4M3_MAX).to(torch.float8_e4m3fn)
    codes = e2m1_round(blocks * (inv_g / scale.float()).unsqueeze(-1)).flatten(-2)
    return codes[:, 0::2] | (codes[:, 1::2] << 4), scale


@functools.lru_cache(maxsize=None)
def _e2m1_table(device: torch.device) -> torch.Tensor:
    """The 16 E2M1 values on ``device``, made once: a host-to-device copy per call would make every read of
    the NVFP4 KV cache (30 layers x K and V per forward) wait for the GPU."""
    return torch.tensor(E2M1_VALUES, device=device)


def dequantize_rows(
    packed: torch.Tensor, scales: torch.Tensor, g: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_rows`: (R, K/2) codes, (R, K/16) scales, global () or (R,) -> (R, K)."""
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)
    values = _e2m1_table(packed.device)[codes.long()].unflatten(-1, (-1, BLOCK))
    g = g.float().reshape(-1, 1) if g.dim() else g.float()
    scale = g * scales.float()  # global * block scale first, then the element (torchao's order)
    return (values * scale.unsqueeze(-1)).flatten(-2).to(dtype)


DQ16_SCALE = 2.0**-14  # see kernels/nvfp4_gemm.py: float16 operands hold code * block_scale * 2**-14


def dequantize_rows_f16(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(R, K) float16 ``code * block_scale * 2**-14`` (exact in float16): the GEMM's dequantized A operand;
    times ``2**14 * global`` it is :func:`dequantize_rows`."""
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)
    values = _e2m1_table(packed.device)[codes.long()].unflatten(-1, (-1, BLOCK))
    return (values * scales.float().unsqueeze(-1) * DQ16_SCALE).flatten(-2).to(torch.float16)
