"""Plain-PyTorch reference of ``kernels/channel_rmsnorm.py``: the Wan VAE's channel RMS norm (+ SiLU).

diffusers' ``WanRMS_norm`` on a channels-first tensor (B, C, *spatial): ``F.normalize`` over C in float32
(``x / max(||x||_2, 1e-12)``), rounded to x's dtype, then ``* sqrt(C) * gamma + bias`` in x's dtype; in the
decoder's residual blocks and head a SiLU follows. Restated here so that ``kernels/`` stays below
``longlive``; ``tests/unit/test_fused_kernels.py`` checks this equals the diffusers module bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | float = 0.0, *, silu: bool = False) -> torch.Tensor:
    """(B, C, *spatial) -> same shape and dtype. ``gamma`` / ``bias``: (C, 1, ...) as diffusers stores them."""
    scale = x.shape[1] ** 0.5
    low = x.dtype in (torch.float16, torch.bfloat16)
    y = F.normalize(x.float() if low else x, dim=1).to(x.dtype) * scale * gamma + bias
    return F.silu(y) if silu else y
