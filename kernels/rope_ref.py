"""Plain-PyTorch reference of ``kernels/rope.py``: rotary position embedding of (B, S, heads, head_dim) tensors.

The same arithmetic as ``longlive.models.rope.apply_rope`` (restated here so that ``kernels/`` stays below
``longlive`` in the layering; ``tests/unit/test_fused_kernels.py`` checks the two agree bit for bit): adjacent
channel pairs ``(x[2i], x[2i+1])`` of every head are rotated by the angle whose cos and sin are
``cos[..., i]`` and ``sin[..., i]``, in float32, and the result is rounded to ``x``'s dtype.

Tables: ``cos`` / ``sin`` of shape (S, 1, head_dim / 2) (one row per token, shared by the heads) or
(B, S, 1, head_dim / 2) (one set per sample), float32, as ``longlive.models.rope.rope_freqs`` builds them
for Wan's 3D RoPE (time, height and width channels side by side in each row).
"""

from __future__ import annotations

import torch


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, S, heads, head_dim) ``x`` by the (S or B x S, 1, head_dim / 2) tables; returns x's dtype."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)
