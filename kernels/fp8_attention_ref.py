"""Plain-PyTorch reference of ``kernels/fp8_attention.py``: 8-bit attention (INT8 q.k, FP8 E4M3 P.v).

Hopper's tensor cores run 8-bit dots at twice the bf16 rate, and at Wan2.2-5B's shape self-attention is
half of a block's GPU time, so 8-bit attention is the speed option bf16 cannot be. The split follows
SageAttention2 (Zhang et al., 2024): the logits q.k in **INT8** (E4M3's 3 mantissa bits cost 4-7% relative
error on the output at random data, INT8's 7 bits with per-token scales a fraction of that), P.v in **FP8
E4M3** (P lives in [0, 1], where a float format fits). Every scale sits where the kernel applies it for
(almost) nothing:

* **k is smoothed** first: its per-(sample, head) channel mean over the tokens is subtracted. q.(k - mean)
  differs from q.k by a constant per query row, which softmax ignores, so this is exact in math; it takes a
  shared offset out of the range INT8 must cover (real keys carry large ones; SageAttention's observation);
* **q**: one scale per (sample, token, head) row of head_dim values, ``amax / 127``, codes
  ``round(x * (127 / amax))`` to nearest even; **k** (smoothed): one scale per (sample, head), likewise. A
  logit is the exact int32 dot times one multiplier per query row (q's scale x k's x the softmax scale).
  Per-token key scales were 20% slower on an H100 (a second multiply per logit;
  ``benchmarks/results/fp8_attention_h100.md``);
* **v**: E4M3 with one scale per (sample, head, channel), ``amax / 448`` (torchao's float8 recipe), applied
  to the output's columns once at the end;
* **P** (in [0, 1]) is rounded to E4M3 after a x256 shift, so small probabilities stay out of E4M3's
  subnormals; the shift is undone on the output.

All-zero groups have their amax floored at ``AMAX_MIN`` (as ``kernels/fp8_quant_ref.py``). The kernel's
codes and scales equal these bit for bit; the attention here is exact float32 arithmetic on the same
codes (the int32 dots are exact in float32: |sum| <= 127**2 * 256 < 2**24) with P rounded against the row's
final max, where the kernel's online softmax rounds against the running max: that and the float32 sum
order is what separates the two (``tests/unit/test_fp8_attention.py`` states the tolerances).
"""

from __future__ import annotations

import torch

from longlive_kernels.fp8_quant_ref import AMAX_MIN, E4M3_MAX

P_SHIFT = 256.0  # P in [0, 1] is stored as e4m3(P * 256): normal E4M3 down to 2**-14, and the x256 is exact
INT8_MAX = 127.0


def _round_codes(x: torch.Tensor, amax: torch.Tensor, qmax: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of ``x`` (float32) with ``amax`` broadcast against it, and the scale ``amax / qmax``."""
    amax = amax.float().clamp(min=AMAX_MIN)
    inv = torch.full_like(amax, qmax) / amax  # a correctly rounded division, as the kernel's div_rn
    y = (x * inv).clamp(-qmax, qmax)
    codes = torch.round(y).to(dtype) if dtype == torch.int8 else y.to(dtype)  # both round to nearest even
    return codes, amax / qmax


def _int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, S, D) float32 -> int8 codes and (B, H, S) scales, one per row."""
    codes, scale = _round_codes(x, torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True), INT8_MAX,
                                torch.int8)
    return codes.contiguous(), scale[..., 0].contiguous()


def key_mean(k: torch.Tensor) -> torch.Tensor:
    """(B, S, H, D) -> (B, H, D) float32 mean over the tokens (what smoothing subtracts)."""
    return k.mean(dim=1, dtype=torch.float32)


def channel_amax(v: torch.Tensor) -> torch.Tensor:
    """(B, S, H, D) -> (B, H, D) max |v| per sample, head and channel (exact)."""
    return torch.linalg.vector_norm(v, float("inf"), dim=1).float()


def quantize_q(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, H, D) -> int8 codes (B, H, S, D) and scales (B, H, S): one per token and head."""
    return _int8_rows(q.transpose(1, 2).float())


def smoothed_key_amax(k: torch.Tensor) -> torch.Tensor:
    """(B, S, H, D) -> (B, H) max |k - key_mean(k)| per sample and head (exact)."""
    return torch.linalg.vector_norm(k.float() - key_mean(k)[:, None], float("inf"), dim=(1, 3))


def quantize_k(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, H, D) -> int8 codes (B, H, S, D) of the smoothed keys and scales (B, H), one per sample and head."""
    codes, scale = _round_codes(k.transpose(1, 2).float() - key_mean(k)[:, :, None, :],
                                smoothed_key_amax(k)[:, :, None, None], INT8_MAX, torch.int8)
    return codes.contiguous(), scale[:, :, 0, 0].contiguous()


def quantize_v(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, H, D) -> E4M3 codes (B, H, D, S) -- transposed: the P.v dot reduces over tokens, and Hopper's
    FP8 tensor cores want the reduced dimension contiguous -- and scales (B, H, D), one per channel."""
    codes, scale = _round_codes(v.permute(0, 2, 3, 1).float(), channel_amax(v)[..., None], E4M3_MAX,
                                torch.float8_e4m3fn)
    return codes.contiguous(), scale[..., 0].contiguous()


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention of (B, Sq, H, D) q over (B, Sk, H, D) k, v through the codes above, in float32;
    (B, Sq, H, D) in q's dtype."""
    qc, qs = quantize_q(q)
    kc, ks = quantize_k(k)
    vc, vs = quantize_v(v)
    s = (qc.float() @ kc.float().transpose(2, 3)) * (qs[..., :, None] * ks[:, :, None, None]) * q.shape[-1] ** -0.5
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    p8 = (p * P_SHIFT).to(torch.float8_e4m3fn).float()
    out = (p8 @ vc.float().transpose(2, 3)) * (vs[:, :, None, :] / P_SHIFT) / p.sum(dim=-1, keepdim=True)
    return out.transpose(1, 2).to(q.dtype)
