"""NVFP4: 4-bit E2M1 elements, one FP8 E4M3 scale per 16 elements, one FP32 scale per tensor.

The format (issue 5, "The format"):

* elements are FP4 E2M1, values +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}; two 4-bit codes per byte, the
  element with the lower index in the LOW nibble (the layout of ``torch.float4_e2m1fn_x2``);
* 16 consecutive elements along the last (reduction) dimension share one E4M3 block scale;
* one FP32 per-tensor scale ``global = amax / (6 * 448)``, so that the block holding the tensor's
  amax gets the largest E4M3 scale, 448;
* ``block_scale = e4m3(block_amax / 6 / global)`` (round to nearest even, saturating),
  ``code = e2m1(x / (block_scale * global))`` (round to nearest even, saturating at +-6),
  dequantized value ``code * block_scale * global``.

The arithmetic is written to agree bit for bit with torchao's reference
(``torchao.prototype.mx_formats.nvfp4_tensor.nvfp4_quantize``), which fixes three details the
one-line definition leaves open:

1. ``x / (block_scale * global)`` is evaluated as ``x * ((1 / global) / block_scale)`` (the
   reciprocal form the GPU kernels use). Mathematically equal; in float32 the two can differ in
   the last bit and so flip a rounding tie.
2. Block scales are clamped to ``[finfo(e4m3).tiny, 448] = [2**-6, 448]`` before the E4M3 cast:
   an all-zero block (or one whose scale would underflow) gets the smallest normal scale instead
   of 0, so the division never produces NaN and its codes are simply 0.
3. The sign of an element is kept even when it rounds to zero (``-0.0`` has code ``0b1000``).

One convention is ours, for tensors torchao does not handle: ``global`` is clamped below to
``2**-120``. For an all-zero tensor torchao's ``0 / 0`` gives NaN scales (and garbage codes); with
the clamp every block scale is 2**-6, every code 0 and the dequantized tensor is exactly zero. The
floor is the smallest power of two for which ``(1 / global) / block_scale`` stays finite for the
smallest block scale 2**-6 (2**120 * 2**6 < float32 max); below it ``0 * inf`` would give NaN. For
any tensor with ``amax >= 6 * 448 * 2**-120`` (~2e-33) the clamp is inactive.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Literal

import torch

FORMAT_NAME = "nvfp4"
FORMAT_VERSION = 1

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
E4M3_MIN_SCALE = float(torch.finfo(torch.float8_e4m3fn).tiny)  # 2**-6, torchao's floor
# Floor of the global scale: keeps (1 / global) / 2**-6 finite (see module docstring).
GLOBAL_SCALE_MIN = 2.0**-120

# Decoded value of each 4-bit code: bit 3 is the sign, bits 0-2 index the magnitudes.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES = torch.tensor(list(E2M1_MAGNITUDES) + [-m for m in E2M1_MAGNITUDES], dtype=torch.float32)
# Midpoints between neighbouring magnitudes: 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.
_MIDPOINTS = [(a + b) / 2 for a, b in zip(E2M1_MAGNITUDES[:-1], E2M1_MAGNITUDES[1:])]

ScaleRule = Literal["six", "four_over_six"]


# ---------------------------------------------------------------------------------------------
# E2M1 elements
# ---------------------------------------------------------------------------------------------


def e2m1_encode(v: torch.Tensor, *, stochastic: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Float32 values (already divided by their scale) -> 4-bit codes in a uint8 tensor.

    Round to nearest, ties to the even code (the code whose mantissa bit is 0), saturating at +-6.
    With ``stochastic`` a magnitude between grid neighbours lo < |v| < hi rounds up with
    probability (|v| - lo) / (hi - lo), so E[decode(code)] == v for |v| <= 6.
    """
    mag = v.abs().clamp(max=E2M1_MAX)
    if stochastic:
        grid = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=v.device)
        # index of the largest grid value <= mag (0..7); mag <= 6 so it is always in range.
        lo_idx = (torch.bucketize(mag, grid, right=True) - 1).clamp(0, 6)
        lo, hi = grid[lo_idx], grid[lo_idx + 1]
        p_up = (mag - lo) / (hi - lo)
        u = torch.rand(mag.shape, generator=generator, device=v.device, dtype=torch.float32)
        idx = lo_idx + (u < p_up).to(lo_idx.dtype)
    else:
        # Count the midpoints below mag. A value exactly on a midpoint between codes c and c+1
        # goes to whichever of the two is even: down when c is even (strict >), up when c is odd.
        idx = torch.zeros(mag.shape, dtype=torch.int64, device=v.device)
        for c, mid in enumerate(_MIDPOINTS):
            idx += (mag > mid) if c % 2 == 0 else (mag >= mid)
    # The sign bit follows the input's sign bit, also for values that round to zero (torchao does).
    sign = torch.signbit(v).to(torch.int64) << 3
    return (idx | sign).to(torch.uint8)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (uint8, one per element) -> float32 values."""
    return E2M1_VALUES.to(codes.device)[codes.long()]


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """(..., K) codes -> (..., K/2) bytes, element 2i in the low nibble, 2i+1 in the high nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_codes`."""
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


# ---------------------------------------------------------------------------------------------
# E4M3 block scales
# ---------------------------------------------------------------------------------------------


def _to_e4m3(s: torch.Tensor, *, round_up: bool = False) -> torch.Tensor:
    """Float32 scales -> float8_e4m3fn, saturating to [2**-6, 448].

    The clamp comes first because the E4M3 cast turns values above 448 into NaN, and a zero scale
    would make the division NaN. ``round_up`` returns the smallest E4M3 value >= s instead of RNE
    (used by stochastic rounding so that no element of the block is clipped at 6, which would
    bias it).
    """
    s = s.clamp(min=E4M3_MIN_SCALE, max=E4M3_MAX)
    q = s.to(torch.float8_e4m3fn)  # round to nearest even
    if round_up:
        # Positive E4M3 bit patterns are ordered like their values: +1 on the bits is the next value.
        below = q.float() < s
        bits = q.view(torch.uint8)
        q = torch.where(below, bits + 1, bits).view(torch.float8_e4m3fn)
    return q


def _global_scale(x: torch.Tensor) -> torch.Tensor:
    """global = amax / (6 * 448), floored at 2**-120 (see module docstring)."""
    amax = x.abs().amax().to(torch.float32)
    return (amax / (E2M1_MAX * E4M3_MAX)).clamp(min=GLOBAL_SCALE_MIN)


def _check_input(x: torch.Tensor, block_2d: bool) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"NVFP4 quantize expects a floating point tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() == 0 or x.shape[-1] % BLOCK != 0:
        raise ValueError(f"NVFP4 needs the last dimension to be a multiple of {BLOCK}, got shape {tuple(x.shape)}")
    if block_2d and (x.dim() < 2 or x.shape[-2] % BLOCK != 0):
        raise ValueError(
            f"NVFP4 16x16 block scaling needs the last two dimensions to be multiples of {BLOCK}, "
            f"got shape {tuple(x.shape)}"
        )
    if torch.isnan(x).any():
        raise ValueError("NVFP4 quantize: input contains NaN")
    if torch.isinf(x).any():
        raise ValueError("NVFP4 quantize: input contains Inf")


# ---------------------------------------------------------------------------------------------
# Container
# ---------------------------------------------------------------------------------------------


@dataclass
class NVFP4Tensor:
    """A tensor in NVFP4: packed codes (..., K/2) uint8, block scales (..., K/16) E4M3, FP32 global.

    16x16 block scaling stores its scales in the same (..., K/16) layout (each tile's scale repeated
    on its 16 rows), so dequantization and the GEMM backends never need to know which was used.
    """

    packed: torch.Tensor
    block_scales: torch.Tensor
    global_scale: torch.Tensor
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        lead, k = self.shape[:-1], self.shape[-1]
        if self.packed.dtype != torch.uint8 or tuple(self.packed.shape) != (*lead, k // 2):
            raise ValueError(f"packed must be uint8 {(*lead, k // 2)}, got {self.packed.dtype} {tuple(self.packed.shape)}")
        if self.block_scales.dtype != torch.float8_e4m3fn or tuple(self.block_scales.shape) != (*lead, k // BLOCK):
            raise ValueError(
                f"block_scales must be float8_e4m3fn {(*lead, k // BLOCK)}, "
                f"got {self.block_scales.dtype} {tuple(self.block_scales.shape)}"
            )
        if self.global_scale.dtype != torch.float32 or self.global_scale.numel() != 1:
            raise ValueError("global_scale must be a float32 scalar")
        self.global_scale = self.global_scale.reshape(())

    def codes(self) -> torch.Tensor:
        """The unpacked 4-bit codes, one uint8 per element, shape ``self.shape``."""
        return unpack_codes(self.packed)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        values = e2m1_decode(self.codes()).unflatten(-1, (-1, BLOCK))
        # global * block_scale first, then times the element: the order torchao uses, so the
        # dequantized tensors agree bit for bit too.
        scale = self.global_scale * self.block_scales.to(torch.float32)
        return (values * scale.unsqueeze(-1)).flatten(-2).to(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of codes + block scales + the global scale (4.5 bits per element + 4 bytes)."""
        return self.packed.numel() + self.block_scales.numel() + 4

    def save(self, path: str | os.PathLike) -> None:
        save(self, path)


def quantize(
    x: torch.Tensor,
    *,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    block_2d: bool = False,
    scale_rule: ScaleRule = "six",
) -> NVFP4Tensor:
    """Quantize ``x`` (float32/bf16/fp16, last dim a multiple of 16) to NVFP4.

    * ``stochastic``: stochastic rounding of the elements (unbiased; for gradients). Block scales
      are then rounded UP to E4M3 so no element is clipped at 6 (clipping would be biased).
    * ``block_2d``: one scale per 16x16 tile of the last two dims (for weights, so W and W^T
      quantize to the same values).
    * ``scale_rule="four_over_six"``: per block, scale the block max to 6 or to 4, whichever gives
      the smaller squared error after quantization (the "Four Over Six" method). The candidate
      "scale to 4" is still an E4M3 scale saturating at 448, so with ``global = amax / (6 * 448)``
      blocks whose amax exceeds 2/3 of the tensor amax cannot be scaled fully to 4; they keep a
      valid (merely larger) scale and the error comparison still picks the better one.
    """
    _check_input(x, block_2d)
    if scale_rule not in ("six", "four_over_six"):
        raise ValueError(f"unknown scale_rule {scale_rule!r}: expected 'six' or 'four_over_six'")
    shape = tuple(x.shape)
    xf = x.detach().to(torch.float32).contiguous()
    g = _global_scale(xf)
    inv_g = 1.0 / g  # finite, and inv_g / block_scale too: g >= 2**-120
    blocks = xf.unflatten(-1, (-1, BLOCK))  # (..., K/16, 16)

    # Block amax: over 16 elements, or over 16x16 tiles broadcast back to their 16 rows.
    bmax = blocks.abs().amax(-1)  # (..., K/16)
    if block_2d:
        tiles = bmax.unflatten(-2, (-1, BLOCK))  # (..., M/16, 16, K/16)
        bmax = tiles.amax(-2, keepdim=True).expand_as(tiles).flatten(-3, -2)

    def encode(target_max: float, round_up: bool, sr: bool):
        # Divide by target then by g: the same float32 operations as torchao's reference.
        scale_e4m3 = _to_e4m3(bmax / target_max / g, round_up=round_up)
        scaled = blocks * (inv_g / scale_e4m3.to(torch.float32)).unsqueeze(-1)
        return scale_e4m3, e2m1_encode(scaled, stochastic=sr, generator=generator)

    scales, codes = encode(E2M1_MAX, stochastic, stochastic)
    if scale_rule == "four_over_six":
        scales4, codes4 = encode(4.0, stochastic, stochastic)
        # Choose per block by the squared error of round-to-nearest quantization (deterministic
        # even in stochastic mode, so the choice itself adds no noise).
        rn6 = (scales, codes) if not stochastic else encode(E2M1_MAX, True, False)
        rn4 = (scales4, codes4) if not stochastic else encode(4.0, True, False)

        def sse(s, c):
            deq = e2m1_decode(c) * (g * s.to(torch.float32)).unsqueeze(-1)
            return (deq - blocks).square().sum(-1)

        use4 = sse(*rn4) < sse(*rn6)
        if block_2d:  # one decision per tile, so the tile keeps a single scale
            err4 = sse(*rn4).unflatten(-2, (-1, BLOCK)).sum(-2, keepdim=True)
            err6 = sse(*rn6).unflatten(-2, (-1, BLOCK)).sum(-2, keepdim=True)
            use4 = (err4 < err6).expand(*err4.shape[:-2], BLOCK, err4.shape[-1]).flatten(-3, -2)
        scales = torch.where(use4, scales4.view(torch.uint8), scales.view(torch.uint8)).view(torch.float8_e4m3fn)
        codes = torch.where(use4.unsqueeze(-1), codes4, codes)

    return NVFP4Tensor(
        packed=pack_codes(codes.flatten(-2)),
        block_scales=scales.contiguous(),
        global_scale=g.reshape(()),
        shape=shape,
    )


def fake_quantize(x: torch.Tensor, **kwargs) -> torch.Tensor:
    """dequantize(quantize(x)) in x's dtype."""
    return quantize(x, **kwargs).dequantize(x.dtype)


# ---------------------------------------------------------------------------------------------
# Safetensors I/O
# ---------------------------------------------------------------------------------------------


def save(t: NVFP4Tensor, path: str | os.PathLike) -> None:
    """Write ``t`` to a safetensors file atomically (temp file in the same dir, then os.replace).

    The E4M3 scales are stored as their uint8 bit patterns so any safetensors reader can load the
    file; the metadata names the format, its version and the logical shape.
    """
    from longlive.io import save_safetensors

    tensors = {
        "packed": t.packed.contiguous().cpu(),
        "block_scales": t.block_scales.contiguous().view(torch.uint8).cpu(),
        "global_scale": t.global_scale.reshape(1).cpu(),
    }
    meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "shape": json.dumps(list(t.shape))}
    save_safetensors(tensors, path, metadata=meta)


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> NVFP4Tensor:
    """Read a file written by :func:`save`; checks the format name and version."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT_NAME:
            raise ValueError(f"{path}: not an NVFP4 file (format={meta.get('format')!r})")
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise ValueError(f"{path}: unsupported NVFP4 format version {meta.get('format_version')!r}")
        return NVFP4Tensor(
            packed=f.get_tensor("packed"),
            block_scales=f.get_tensor("block_scales").view(torch.float8_e4m3fn),
            global_scale=f.get_tensor("global_scale").reshape(()),
            shape=tuple(json.loads(meta["shape"])),
        )
