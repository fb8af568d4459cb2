"""Plain-PyTorch reference of ``kernels/adaln.py``: LayerNorm + adaLN modulation, and the gated residual.

The arithmetic of a Wan DiT block (``longlive.models.dit``), restated here so that ``kernels/`` stays
below ``longlive`` in the layering (``tests/unit/test_fused_kernels.py`` checks the two agree bit for bit):

* ``layernorm_modulate``: ``LayerNorm(x)`` in float32 (optionally with a float32 weight and bias), then
  per frame ``* (1 + scale) + shift``, rounded to ``x``'s dtype;
* ``gated_residual``: ``x + h * gate`` in float32, rounded to ``x``'s dtype.

Shapes: ``x`` and ``h`` (B, S, D) with S = f * frame_tokens tokens laid out frame by frame; ``scale``,
``shift`` and ``gate`` (B, f, 1, D) float32, one row per frame (f = 1: one per sample).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _frames(x: torch.Tensor, f: int) -> torch.Tensor:
    return x.unflatten(1, (f, -1))


def layernorm_modulate(
    x: torch.Tensor, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None, *,
    weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-6,
) -> torch.Tensor:
    """(B, S, D) -> (B, S, D) in x's dtype: ``(LayerNorm(x) [* weight + bias]) * (1 + scale) + shift``."""
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    y = F.layer_norm(x.float(), x.shape[-1:], w, b, eps)
    if scale is None:
        return y.type_as(x)
    f = scale.shape[1]
    return (_frames(y, f) * (1 + scale) + shift).flatten(1, 2).type_as(x)


def gated_residual(x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """(B, S, D) -> (B, S, D) in x's dtype: ``x + h * gate`` in float32."""
    f = gate.shape[1]
    return (_frames(x.float(), f) + _frames(h.float(), f) * gate).flatten(1, 2).type_as(x)
