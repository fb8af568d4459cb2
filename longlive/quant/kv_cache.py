"""NVFP4 storage for the KV cache: keys and values packed 4-bit with E4M3 block scales along head_dim.

A :class:`~longlive.models.attention.KVCache` given ``storage=NVFP4KVStorage(...)`` keeps its K/V here
instead of as dense tensors. Per layer, K and V each hold

* ``packed`` (B, capacity, heads * head_dim / 2) uint8: E2M1 codes, two per byte;
* ``scales`` (B, capacity, heads * head_dim / 16) float8_e4m3fn: one per 16 elements of a head
  (head_dim is a multiple of 16, so a block never straddles two heads);
* ``global_`` (B, capacity) float32: one global scale per token, ``amax(token) / (6 * 448)``.

One global per *token* (not per tensor): a cached token is quantized on its own, so its codes do not
depend on which frames were written with it, on the other half of a CFG batch or on eviction -- and the
global costs 4 bytes against heads * head_dim * 0.5625 for the token (0.2% at Wan2.2-5B's 3072).
Bytes per token and K or V: ``0.5625 * heads * head_dim + 4``, against ``2 * heads * head_dim`` in bf16:
0.282x at 3072 channels, 0.297x at the tiny preset's 128.

Storage is preallocated and updated in place: appends write into the next free rows, eviction
(:meth:`keep`) moves kept frames down within the same buffers. Capacity is ``max_frames`` frames once
the first write has told the storage how many tokens a frame has (one reallocation, during the first
block); if a write ever needs more it grows geometrically and logs it.

Reading dequantizes the held tokens (``longlive_kernels.nvfp4_quant_ref.dequantize_rows``, plain PyTorch) and
concatenates the new, unquantized ones; attention is then the usual SDPA. :meth:`NVFP4KVStorage.update_packed`
instead hands the packed views to a Triton attention kernel that dequantizes in registers
(``kernels/nvfp4_attention.py``; opt-in through ``longlive.inference.optimize``). Quantization uses the
Triton kernel (``kernels/nvfp4_quant.py``) on CUDA and its PyTorch reference elsewhere (bit-identical).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from longlive_kernels.nvfp4_quant_ref import BLOCK, dequantize_rows, global_scale
from longlive_kernels.nvfp4_quant_ref import quantize_rows as quantize_rows_ref

log = logging.getLogger(__name__)

Packed = tuple[Tensor, Tensor, Tensor]  # (packed, scales, global_) of some tokens of K or V


def _quantize_rows(x: Tensor, g: Tensor, inv_g: Tensor) -> tuple[Tensor, Tensor]:
    if x.device.type == "cuda":
        from longlive.quant.linear import triton_available

        if triton_available(x.device):
            from longlive_kernels.nvfp4_quant import quantize_rows

            return quantize_rows(x, g, inv_g)
    return quantize_rows_ref(x, g, inv_g)


def _dequantize(views: Packed, dtype: torch.dtype) -> Tensor:
    """(B, n, C) ``dtype`` from (packed, scales, global_) views of n tokens."""
    p, s, g = views
    B, n = g.shape
    return dequantize_rows(p.reshape(B * n, -1), s.reshape(B * n, -1), g.reshape(-1), dtype).view(B, n, -1)


class _Buffers:
    """K or V of one layer: packed codes, block scales and per-token globals, ``length`` tokens used."""

    def __init__(self, batch: int, capacity: int, channels: int, device: torch.device) -> None:
        self.packed = torch.zeros(batch, capacity, channels // 2, dtype=torch.uint8, device=device)
        self.scales = torch.zeros(batch, capacity, channels // BLOCK, dtype=torch.float8_e4m3fn, device=device)
        self.global_ = torch.zeros(batch, capacity, dtype=torch.float32, device=device)

    @property
    def capacity(self) -> int:
        return self.packed.shape[1]

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.packed, self.scales, self.global_

    def write(self, start: int, x: Tensor) -> None:
        """Quantize (B, S, C) ``x`` into rows ``start .. start + S``."""
        B, S, C = x.shape
        rows = x.reshape(B * S, C)
        g, inv_g = global_scale(rows, per_row=True)
        packed, scales = _quantize_rows(rows, g, inv_g)
        self.packed[:, start : start + S] = packed.view(B, S, -1)
        self.scales[:, start : start + S] = scales.view(B, S, -1)
        self.global_[:, start : start + S] = g.view(B, S)

    def view(self, length: int) -> Packed:
        """(packed, scales, global_) of the first ``length`` tokens: views, no copy."""
        return tuple(t[:, :length] for t in self.tensors())

    def read(self, length: int, dtype: torch.dtype) -> Tensor:
        """(B, length, C) dequantized."""
        return _dequantize(self.view(length), dtype)

    def move(self, src: slice, dst: slice) -> None:
        for t in self.tensors():
            t[:, dst] = t[:, src]

    def grown(self, capacity: int, length: int) -> "_Buffers":
        new = _Buffers(self.packed.shape[0], capacity, self.packed.shape[2] * 2, self.packed.device)
        for old, t in zip(self.tensors(), new.tensors()):
            t[:, :length] = old[:, :length]
        return new


class NVFP4KVStorage:
    """K/V of every layer in NVFP4 (see the module docstring), for :class:`~longlive.models.attention.KVCache`.

    ``max_frames``: most frames the cache ever holds at once, including a block being written (for the
    rolling cache: sink + window + block); None grows on demand.
    """

    def __init__(self, num_layers: int, max_frames: int | None = None) -> None:
        self.num_layers, self.max_frames = num_layers, max_frames
        self.k: list[_Buffers | None] = [None] * num_layers
        self.v: list[_Buffers | None] = [None] * num_layers
        self.length = [0] * num_layers  # tokens held per layer
        self.tokens_per_frame: int | None = None
        self.reallocations = 0  # buffer (re)allocations so far, summed over layers (tests, logs)
        self._shape: tuple[int, int, int] | None = None  # (batch, heads, head_dim) of the held K/V

    # the KVCache protocol

    def update(self, layer: int, k: Tensor, v: Tensor, write: bool) -> tuple[Tensor, Tensor]:
        """Cached K/V (dequantized to k's dtype) followed by the new ones; stores the new ones if ``write``."""
        held = self.update_packed(layer, k, v, write)
        if held is None:
            return k, v
        k_held, v_held = (_dequantize(views, x.dtype).view(x.shape[0], -1, *x.shape[2:])
                          for views, x in zip(held, (k, v)))
        return torch.cat((k_held, k), dim=1), torch.cat((v_held, v), dim=1)

    def update_packed(self, layer: int, k: Tensor, v: Tensor, write: bool) -> tuple[Packed, Packed] | None:
        """Like :meth:`update` for a kernel that reads the cache packed (``kernels/nvfp4_attention.py``): the
        held K and V as ``(packed, scales, global_)`` views of their ``n`` tokens (None when empty), taken
        before the new K/V are stored (if ``write``) behind them -- rows a write never touches, and a growing
        write leaves the old buffers to the views."""
        B, S, H, D = k.shape
        if D % BLOCK:
            raise ValueError(f"the NVFP4 KV cache needs head_dim divisible by {BLOCK}, got {D}; use kv_cache: dense")
        n = self.length[layer]
        if n and self._shape != (B, H, D):
            raise ValueError(f"K/V of shape (B, H, D) = {(B, H, D)} written to a cache holding {self._shape}; reset it first")
        held = (self.k[layer].view(n), self.v[layer].view(n)) if n else None
        if write:
            self._reserve(layer, n + S, (B, H, D), k.device)
            self.k[layer].write(n, k.reshape(B, S, H * D))
            self.v[layer].write(n, v.reshape(B, S, H * D))
            self.length[layer] = n + S
        return held

    def frames_written(self, num_frames: int) -> None:
        """The cache now holds ``num_frames`` frames: learn tokens per frame, and reserve ``max_frames`` once."""
        if not num_frames or not self.length[0]:
            return
        self.tokens_per_frame = self.length[0] // num_frames
        if self.max_frames is not None and self._shape is not None:
            for layer in range(self.num_layers):
                if self.k[layer] is not None:
                    self._reserve(layer, self.max_frames * self.tokens_per_frame, self._shape, self.k[layer].packed.device)

    def keep(self, frames: Tensor, num_frames: int) -> None:
        """Keep the held frames at indices ``frames`` (in that order), compacted to the front, in place."""
        frames = [int(f) for f in frames]
        for layer in range(self.num_layers):
            n = self.length[layer]
            if not n:
                continue
            t = n // num_frames
            if frames == sorted(set(frames)):  # increasing: each frame moves down (or stays), never onto one still needed
                for dst, src in enumerate(frames):
                    if src != dst:
                        for buf in (self.k[layer], self.v[layer]):
                            buf.move(slice(src * t, (src + 1) * t), slice(dst * t, (dst + 1) * t))
            else:  # any order: gather through a temporary
                idx = torch.tensor([f * t + i for f in frames for i in range(t)], device=self.k[layer].packed.device)
                for buf in (self.k[layer], self.v[layer]):
                    for x in buf.tensors():
                        x[:, : len(idx)] = x[:, idx].clone()
            self.length[layer] = len(frames) * t

    def held(self, layer: int) -> tuple[Tensor, Tensor] | None:
        """The held K and V of ``layer`` dequantized to float32, (B, tokens, heads, head_dim); None when empty."""
        n = self.length[layer]
        if not n:
            return None
        B, H, D = self._shape
        return tuple(buf.read(n, torch.float32).view(B, n, H, D) for buf in (self.k[layer], self.v[layer]))

    def reset(self) -> None:
        """Forget the held K/V; the buffers stay allocated for the next video."""
        self.length = [0] * self.num_layers

    def graph_state(self) -> tuple:
        """As :meth:`longlive.models.attention.DenseKVStorage.graph_state` (plus the held K/V's shape)."""
        return (tuple(self.length), self.tokens_per_frame, self.reallocations, self._shape)

    def load_graph_state(self, state: tuple) -> None:
        length, self.tokens_per_frame, reallocations, self._shape = state
        if reallocations != self.reallocations:
            raise RuntimeError("KV buffers were reallocated since this state was taken")
        self.length = list(length)

    def nbytes(self) -> int:
        """Bytes of the held K/V (codes, block scales, globals)."""
        total = 0
        for layer in range(self.num_layers):
            for buf in (self.k[layer], self.v[layer]):
                if buf is not None and self.length[layer]:
                    total += sum(x[:, : self.length[layer]].numel() * x.element_size() for x in buf.tensors())
        return total

    def allocated_bytes(self) -> int:
        return sum(x.numel() * x.element_size() for bufs in (self.k, self.v) for b in bufs if b is not None for x in b.tensors())

    # storage

    def _reserve(self, layer: int, tokens: int, shape: tuple[int, int, int], device: torch.device) -> None:
        B, H, D = shape
        buf = self.k[layer]
        if buf is not None and self._shape == shape and buf.packed.device == device and buf.capacity >= tokens:
            return
        if buf is None or self._shape != shape or buf.packed.device != device:
            if self.length[layer]:
                raise ValueError("cannot change the K/V shape or device of a non-empty NVFP4 KV cache")
            if self.max_frames is not None and self.tokens_per_frame is not None:
                tokens = max(tokens, self.max_frames * self.tokens_per_frame)
            self.k[layer], self.v[layer] = (_Buffers(B, tokens, H * D, device) for _ in range(2))
        else:
            capacity = tokens
            if self.max_frames is None or self.tokens_per_frame is None or tokens > self.max_frames * self.tokens_per_frame:
                capacity = max(tokens, 2 * buf.capacity)  # unplanned growth: geometric, so it stays rare
                if self.tokens_per_frame is not None:
                    log.warning("NVFP4 KV cache layer %d grows to %d tokens (max_frames=%s)", layer, capacity, self.max_frames)
            n = self.length[layer]
            self.k[layer], self.v[layer] = self.k[layer].grown(capacity, n), self.v[layer].grown(capacity, n)
        self._shape = shape
        self.reallocations += 1


def make_kv_storage(kind: str, num_layers: int, max_frames: int | None = None) -> NVFP4KVStorage | None:
    """``dense`` -> None (the KVCache keeps dense tensors); ``nvfp4`` -> :class:`NVFP4KVStorage`."""
    if kind == "dense":
        return None
    if kind == "nvfp4":
        return NVFP4KVStorage(num_layers, max_frames)
    raise ValueError(f"unknown KV cache storage {kind!r}: expected dense or nvfp4")
