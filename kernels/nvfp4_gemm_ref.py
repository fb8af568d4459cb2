"""Plain-PyTorch reference of ``kernels/nvfp4_gemm.py``: ``y = dq(A) @ dq(W)^T + bias`` for NVFP4 A and W.

A (M, K) and W (N, K) are NVFP4 along K (packed codes, E4M3 block scales, one FP32 global scale each);
both are dequantized to float32 and multiplied in float32. This is exactly the emulated W4A4 linear
of ``longlive.quant.linear`` (there the dequantization comes from ``longlive.quant.nvfp4``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longlive_kernels.nvfp4_quant_ref import dequantize_rows


def nvfp4_gemm(
    a_packed: torch.Tensor, a_scales: torch.Tensor, a_global: torch.Tensor,
    w_packed: torch.Tensor, w_scales: torch.Tensor, w_global: torch.Tensor,
    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    a = dequantize_rows(a_packed, a_scales, a_global.reshape(()))
    w = dequantize_rows(w_packed, w_scales, w_global.reshape(()))
    return F.linear(a, w, None if bias is None else bias.float()).to(out_dtype)
