"""Plain-PyTorch reference of ``kernels/fp8_quant.py``: row-wise dynamic FP8 (E4M3) quantization.

Each row of ``x`` (R, K) gets one float32 scale ``amax(row) / 448`` (448: E4M3's largest finite value;
an all-zero row's amax is floored at ``AMAX_MIN``) and is stored as ``e4m3(x * (448 / amax))``, rounded to
nearest even. ``x ~= codes * scale``. This is torchao's float8 "row-wise" recipe (one scale per token for
activations, per output channel for weights), which ``torch._scaled_mm`` consumes directly on Hopper.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
AMAX_MIN = 1e-12  # an all-zero row: scale 1e-12 / 448 and codes 0, no 0/0


def row_amax(x: torch.Tensor) -> torch.Tensor:
    """(R, K) -> (R,) float32 max |x| per row (exact, in x's dtype), floored at ``AMAX_MIN``."""
    return torch.linalg.vector_norm(x.detach(), float("inf"), dim=-1).float().clamp(min=AMAX_MIN)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, K) -> codes (R, K) float8_e4m3fn and scales (R, 1) float32 with ``x ~= codes * scales``."""
    if x.dim() != 2:
        raise ValueError(f"quantize_rows needs (R, K), got {tuple(x.shape)}")
    amax = row_amax(x)
    # a correctly rounded division (tensor / tensor); ``448 / amax`` would be reciprocal(amax) * 448 in PyTorch
    inv = (torch.full_like(amax, E4M3_MAX) / amax)[:, None]
    codes = (x.detach().float() * inv).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, (amax / E4M3_MAX)[:, None]


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (codes.float() * scales.float()).to(dtype)


def quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor E4M3 (the scaling cuDNN's FP8 attention takes): one float32 scale ``amax(x) / 448`` for the
    whole tensor, codes ``e4m3(x * (448 / amax))`` of ``x``'s shape, contiguous. Returns the codes and the
    scale as a (1,) tensor on ``x``'s device (a device scalar: no host sync to read it)."""
    amax = torch.linalg.vector_norm(x.detach(), float("inf")).float().clamp(min=AMAX_MIN).reshape(1)
    inv = torch.full_like(amax, E4M3_MAX) / amax
    codes = (x.detach().float() * inv).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).contiguous()
    return codes, amax / E4M3_MAX
