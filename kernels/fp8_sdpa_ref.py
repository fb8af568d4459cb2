"""Plain-PyTorch reference of ``kernels/fp8_sdpa.py``: cuDNN's FP8 flash attention with per-tensor scales.

The recipe cuDNN's ``sdpa_fp8`` computes (and FlashAttention-3's FP8 forward): q, k and v each quantized to
E4M3 with **one scale for the whole tensor** (``kernels/fp8_quant_ref.quantize_tensor``: ``amax / 448``); the
logits are the E4M3 dot accumulated in float32 times ``descale_q * descale_k / sqrt(head_dim)``; softmax in
float32 against the row max; P (in [0, 1]) scaled by ``SCALE_S = 448`` and rounded to E4M3 before the P.v
dot; the output divided by the row sum of the *unrounded* P and by the scales, returned in q's dtype.

Per-tensor scales are what cuDNN takes (one float each, read on the device); E4M3 keeps 3 mantissa bits over
a 2**17 range, so a per-tensor scale costs little against a per-token one for RMS-normed q and k. What is
lost is E4M3's rounding of every q, k, v and P element (about 2**-4 relative each); on random data that is a
few percent of the output (``benchmarks/fp8_attention.py``), and its cost on generated video is measured by
the prompt-following check (``benchmarks/cache_from_last_step.py --option fp8_attention``).

The kernel's online softmax rounds P against the running row max of the key tiles seen so far (and skips
rescaling below a threshold), not the final one, and sums in another order: that is what separates the two
(``tests/unit/test_fp8_sdpa.py`` states the tolerance).
"""

from __future__ import annotations

import torch

from longlive_kernels.fp8_quant_ref import E4M3_MAX, quantize_tensor

SCALE_S = E4M3_MAX  # P in [0, 1] is stored as e4m3(P * 448): its max code is P = 1


def fp8_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention of (B, Sq, H, D) q over (B, Sk, H, D) k, v in FP8 as above; (B, Sq, H, D) in q's dtype."""
    (qc, dq), (kc, dk), (vc, dv) = quantize_tensor(q), quantize_tensor(k), quantize_tensor(v)
    qh, kh, vh = (c.float().transpose(1, 2) for c in (qc, kc, vc))  # (B, H, S, D)
    s = (qh @ kh.transpose(2, 3)) * (dq * dk * q.shape[-1] ** -0.5)
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    p8 = (p * SCALE_S).to(torch.float8_e4m3fn).float()
    out = (p8 @ vh) * (dv / SCALE_S) / p.sum(dim=-1, keepdim=True)
    return out.transpose(1, 2).to(q.dtype)
