"""Plain-PyTorch reference of ``kernels/nvfp4_attention.py``: attention over an NVFP4 KV cache plus new tokens.

The streaming self-attention of a block that reads the NVFP4 KV cache
(``longlive.quant.kv_cache.NVFP4KVStorage``): the keys are the ``n`` held tokens (dequantized) followed
by the new ones, rotated together by the key RoPE tables (keys are cached before RoPE); the values
likewise, unrotated; no mask. It is what ``AttentionCore.forward`` computes for that case, written with
the same functions (``dequantize_rows``, the RoPE reference, SDPA), so the two agree bit for bit
(``tests/unit/test_nvfp4_attention.py``).

Cached K or V: ``(packed, scales, global_)`` views of (B, n, heads * head_dim / 2) uint8,
(B, n, heads * head_dim / 16) float8_e4m3fn and (B, n) float32 (see ``kernels/nvfp4_quant_ref.py``),
or None when the cache holds nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longlive_kernels.nvfp4_quant_ref import dequantize_rows
from longlive_kernels.rope_ref import apply_rope

Packed = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def dequantize_tokens(held: Packed, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, n, heads, head_dim) ``dtype`` from packed / scales / global views of n tokens."""
    packed, scales, g = held
    B, n = g.shape
    rows = dequantize_rows(packed.reshape(B * n, -1), scales.reshape(B * n, -1), g.reshape(-1), dtype)
    return rows.view(B, n, heads, -1)


def nvfp4_attention(
    q: torch.Tensor, k_held: Packed | None, v_held: Packed | None, k: torch.Tensor, v: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor,
) -> torch.Tensor:
    """SDPA of rotated ``q`` (B, Sq, H, D) over rope(cached K ++ k) and cached V ++ v; (B, Sq, H, D) q's dtype.

    ``k`` / ``v``: the new tokens (B, Sn, H, D), ``k`` before RoPE. ``cos`` / ``sin``: key tables for the
    n + Sn key tokens, (n + Sn, 1, D / 2) or (B, n + Sn, 1, D / 2) float32.
    """
    H = k.shape[2]
    if k_held is not None:
        k = torch.cat((dequantize_tokens(k_held, H, k.dtype), k), dim=1)
        v = torch.cat((dequantize_tokens(v_held, H, v.dtype), v), dim=1)
    k = apply_rope(k, cos, sin)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).to(q.dtype)
