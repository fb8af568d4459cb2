"""Attention pieces of the causal DiT: the SDPA call, the block-causal mask and the KV cache.

Tokens are laid out frame by frame (post-patch frames), ``frame_tokens`` tokens per frame. In
block-causal attention frames are grouped in blocks of ``block_frames``; a token attends to every
token of its own block and of earlier blocks. Block boundaries count from frame 0 of the cache.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention on (B, S, heads, head_dim) tensors.

    ``mask`` is boolean, True where a query may attend, and broadcasts to (B, heads, S_q, S_k).
    The one place attention is computed, so sequence parallel or kernels can wrap it.
    """
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def block_causal_mask(
    num_frames: int,
    frame_tokens: int,
    block_frames: int,
    *,
    cached_frames: int = 0,
    device: torch.device | str | None = None,
) -> Tensor | None:
    """(S_q, S_k) boolean mask for ``num_frames`` query frames after ``cached_frames`` cached ones.

    Keys are the cached frames followed by the query frames. Returns None when every query may
    see every key (one block and its history), so the caller can skip the mask.
    """
    if block_frames < 1:
        raise ValueError(f"block_frames must be >= 1, got {block_frames}")
    q_block = (cached_frames + torch.arange(num_frames, device=device)) // block_frames
    k_frame = torch.arange(cached_frames + num_frames, device=device)
    allowed = k_frame[None, :] < (q_block[:, None] + 1) * block_frames  # (frames_q, frames_k)
    if bool(allowed.all()):
        return None
    return allowed.repeat_interleave(frame_tokens, dim=0).repeat_interleave(frame_tokens, dim=1)


class KVCache:
    """Self-attention keys (after RoPE) and values of earlier frames, per layer, (B, S, heads, head_dim).

    A forward given ``kv_cache=cache`` always *reads* it: the new queries attend to the cached
    tokens followed by the new ones. It *writes* (appends the new K/V and advances
    ``num_frames``) only while ``cache.write`` is True, e.g. ``with cache.writing(): model(...)``.
    The streaming loop therefore runs the denoising steps of a block as reads, then one pass of the
    clean block (t=0) inside ``writing()``.
    """

    def __init__(self, num_layers: int) -> None:
        self.k: list[Tensor | None] = [None] * num_layers
        self.v: list[Tensor | None] = [None] * num_layers
        self.num_frames = 0  # post-patch frames held
        self.write = False

    @contextmanager
    def writing(self) -> Iterator["KVCache"]:
        self.write, previous = True, self.write
        try:
            yield self
        finally:
            self.write = previous

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """K and V to attend to at ``layer``: cached then new; stored back while writing."""
        if self.k[layer] is not None:
            k = torch.cat((self.k[layer], k), dim=1)
            v = torch.cat((self.v[layer], v), dim=1)
        if self.write:
            self.k[layer], self.v[layer] = k, v
        return k, v

    def advance(self, frames: int) -> None:
        """Called by the model once per forward, after all layers."""
        if self.write:
            self.num_frames += frames

    def reset(self) -> None:
        self.k = [None] * len(self.k)
        self.v = [None] * len(self.v)
        self.num_frames = 0

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)
