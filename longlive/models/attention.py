"""Attention pieces of the causal DiT: the SDPA call, the block-causal mask and the KV cache.

Tokens are laid out frame by frame (post-patch frames), ``frame_tokens`` tokens per frame. In
block-causal attention frames are grouped in blocks of ``block_frames``; a token attends to every
token of its own block and of earlier blocks. Block boundaries count from frame 0 of the cache.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)


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


def teacher_forcing_mask(
    num_frames: int, frame_tokens: int, block_frames: int, *, device: torch.device | str | None = None
) -> Tensor:
    """(2S, 2S) boolean mask for the teacher-forcing layout [clean frames 0..F-1 | noisy frames 0..F-1].

    Clean block i attends to clean blocks <= i (what the KV cache holds at inference). Noisy block i
    attends to clean blocks < i (its clean history) and to itself, never to other noisy blocks.
    S = num_frames * frame_tokens. Pair it with ``frame_positions = arange(F).repeat(2)`` so a
    noisy frame shares its clean copy's RoPE position.
    """
    if block_frames < 1:
        raise ValueError(f"block_frames must be >= 1, got {block_frames}")
    block = torch.arange(num_frames, device=device) // block_frames
    q, k = block[:, None], block[None, :]
    clean_to_clean = k <= q
    noisy_to_clean = k < q
    noisy_to_noisy = k == q
    frames = torch.cat(
        (
            torch.cat((clean_to_clean, torch.zeros_like(clean_to_clean)), dim=1),
            torch.cat((noisy_to_clean, noisy_to_noisy), dim=1),
        ),
        dim=0,
    )  # (2F, 2F)
    return frames.repeat_interleave(frame_tokens, dim=0).repeat_interleave(frame_tokens, dim=1)


def cached_history(
    blocks: Tensor, shots: Tensor | None = None, *, sink_frames: int = 0, window_frames: int | None = None,
    multishot_sink: bool = True,
) -> Tensor:
    """(F, F) boolean: ``[q, k]`` True when frame k is in the KV cache while frame q's block is generated.

    ``blocks`` (F,) block index of each frame (non-decreasing), ``shots`` (F,) shot index (default one
    shot). With ``window_frames=None`` that is every frame of an earlier block. Otherwise it is what
    :class:`longlive.models.cache.RollingKVCache` keeps: the sink (the first ``sink_frames`` frames
    of the anchor shot -- the shot of the latest earlier frame with ``multishot_sink``, else shot 0)
    plus the ``window_frames`` latest earlier frames outside the sink. Training with this view teaches
    a student exactly the context it will stream with.
    """
    F = blocks.numel()
    earlier = blocks[None, :] < blocks[:, None]
    if window_frames is None:
        return earlier
    shots = torch.zeros(F, dtype=torch.long) if shots is None else shots.cpu()
    frame = torch.arange(F)
    shot_start = {int(s): int(frame[shots == s].min()) for s in shots.unique()}
    out = torch.zeros(F, F, dtype=torch.bool)
    for b in blocks.unique().tolist():
        rows = (blocks == b).nonzero().flatten()
        history = frame[blocks.cpu() < b]
        if not len(history):
            continue
        anchor = int(shots[history[-1]]) if multishot_sink else int(shots[0])
        in_sink = (shots[history] == anchor) & (history - shot_start[anchor] < sink_frames)
        rest = history[~in_sink]
        keep = torch.cat((history[in_sink], rest[len(rest) - min(window_frames, len(rest)):]))
        out[rows[:, None], keep[None, :]] = True
    return out.to(blocks.device)


def teacher_forcing_mask_from_history(history: Tensor, blocks: Tensor, frame_tokens: int) -> Tensor:
    """(2S, 2S) mask over ``[clean | noisy]`` given each frame's visible clean history (F, F).

    Clean and noisy frames of block b both see the clean history of b; clean frames also see their
    own clean block (the pass that writes the cache), noisy frames their own noisy block.
    """
    same = blocks[None, :] == blocks[:, None]
    frames = torch.cat(
        (
            torch.cat((history | same, torch.zeros_like(same)), dim=1),
            torch.cat((history, same), dim=1),
        ),
        dim=0,
    )
    return frames.repeat_interleave(frame_tokens, dim=0).repeat_interleave(frame_tokens, dim=1)


class KVCache:
    """Self-attention keys (before RoPE) and values of earlier frames, per layer, (B, S, heads, head_dim),
    and the RoPE frame position of each held frame (``positions``, (num_frames,) long).

    A forward given ``kv_cache=cache`` always *reads* it: the new queries attend to the cached
    tokens followed by the new ones. It *writes* (appends the new K/V and their frame positions)
    only while ``cache.write`` is True, e.g. ``with cache.writing(): model(...)``. The streaming loop
    therefore runs the denoising steps of a block as reads, then one pass of the clean block (t=0)
    inside ``writing()``.

    Keys are stored before RoPE and rotated at attention time by ``positions``, so a subclass can
    re-base positions (relative RoPE for unbounded length) or drop frames (:meth:`keep`) without
    recomputing anything: the held K/V do not depend on where the frames sit.

    ``storage``: None keeps the K/V as dense tensors in ``k`` / ``v``; otherwise that object holds them
    (same methods: ``update``, ``frames_written``, ``keep``, ``reset``, ``nbytes``), e.g.
    :class:`longlive.quant.kv_cache.NVFP4KVStorage` (4-bit, in preallocated buffers).
    """

    def __init__(self, num_layers: int, storage=None) -> None:
        self.k: list[Tensor | None] = [None] * num_layers
        self.v: list[Tensor | None] = [None] * num_layers
        self.positions = torch.zeros(0, dtype=torch.long)  # one per held (post-patch) frame
        self.write = False
        self.storage = storage

    @property
    def num_frames(self) -> int:
        return self.positions.numel()

    @contextmanager
    def writing(self) -> Iterator["KVCache"]:
        self.write, previous = True, self.write
        try:
            yield self
        finally:
            self.write = previous

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """K (un-rotated) and V to attend to at ``layer``: cached then new; stored back while writing."""
        if self.storage is not None:
            return self.storage.update(layer, k, v, write=self.write)
        if self.k[layer] is not None:
            k = torch.cat((self.k[layer], k), dim=1)
            v = torch.cat((self.v[layer], v), dim=1)
        if self.write:
            self.k[layer], self.v[layer] = k, v
        return k, v

    def held(self, layer: int) -> tuple[Tensor, Tensor] | None:
        """The held (un-rotated) K and V of ``layer``, each (B, tokens, heads, head_dim); None when empty."""
        if self.storage is not None:
            return self.storage.held(layer)
        return None if self.k[layer] is None else (self.k[layer], self.v[layer])

    def advance(self, positions: Tensor) -> None:
        """Called by the model once per forward, after all layers, with the new frames' positions."""
        if self.write:
            self.positions = torch.cat((self.positions, positions.detach().cpu().long().flatten()))
            if self.storage is not None:
                self.storage.frames_written(self.num_frames)

    def keep(self, frames: Tensor | list[int]) -> None:
        """Keep only the held frames at indices ``frames`` (in that order); drop the rest."""
        frames = torch.as_tensor(frames, dtype=torch.long)
        n = self.num_frames
        if n == 0:
            return
        if self.storage is not None:
            self.storage.keep(frames, n)
        for store in (self.k, self.v):
            for layer, t in enumerate(store):
                if t is not None:
                    store[layer] = t.unflatten(1, (n, -1))[:, frames.to(t.device)].flatten(1, 2)
        self.positions = self.positions[frames]

    def reset(self) -> None:
        self.k = [None] * len(self.k)
        self.v = [None] * len(self.v)
        self.positions = torch.zeros(0, dtype=torch.long)
        if self.storage is not None:
            self.storage.reset()

    def cache_bytes(self) -> int:
        if self.storage is not None:
            return self.storage.nbytes()
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


class DenseKVStorage:
    """Dense K/V of every layer in preallocated buffers, updated in place (a ``storage`` for :class:`KVCache`).

    Per layer, K and V are (B, capacity, heads, head_dim) buffers in the model's dtype; the held tokens
    are rows ``0 .. length``. :meth:`update` copies the new K/V into the rows right after the held ones
    and returns *views* ``[:, :length + new]``, so attention reads cached-then-new tokens with no
    ``torch.cat`` (which would copy the whole cache on every layer of every step); only a writing pass
    advances ``length``, so a denoising step's rows are simply overwritten by the next step. Eviction
    (:meth:`keep`) moves the kept frames down in place (compaction: a contiguous run moves in chunks no
    longer than its shift, so source and destination never overlap within one copy).

    Capacity: ``max_frames`` frames (the rolling cache's sink + window + block) once the first write has
    told the storage how many tokens a frame has -- one reallocation, during the first block; a later
    write that needs more grows geometrically and logs it. Values equal the list-of-tensors cache's
    exactly (the same numbers in the same order), so results do not change.
    """

    def __init__(self, num_layers: int, max_frames: int | None = None) -> None:
        self.num_layers, self.max_frames = num_layers, max_frames
        self.k: list[Tensor | None] = [None] * num_layers
        self.v: list[Tensor | None] = [None] * num_layers
        self.length = [0] * num_layers
        self.tokens_per_frame: int | None = None
        self.reallocations = 0

    def update(self, layer: int, k: Tensor, v: Tensor, write: bool) -> tuple[Tensor, Tensor]:
        n, S = self.length[layer], k.shape[1]
        kb = self.k[layer]
        if n and ((kb.shape[0], *kb.shape[2:]) != (k.shape[0], *k.shape[2:]) or kb.dtype != k.dtype):
            raise ValueError(f"K/V of shape {tuple(k.shape)} ({k.dtype}) written to a cache holding "
                             f"{(kb.shape[0], '*', *kb.shape[2:])} ({kb.dtype}); reset it first")
        if not n and not write:
            return k, v  # nothing held: attend to the new tokens as they are
        self._reserve(layer, n + S, k)
        kb, vb = self.k[layer], self.v[layer]
        kb[:, n : n + S] = k
        vb[:, n : n + S] = v
        if write:
            self.length[layer] = n + S
        return kb[:, : n + S], vb[:, : n + S]

    def frames_written(self, num_frames: int) -> None:
        """The cache holds ``num_frames`` frames: learn tokens per frame and reserve ``max_frames`` once."""
        if not num_frames or not self.length[0]:
            return
        self.tokens_per_frame = self.length[0] // num_frames
        if self.max_frames is not None:
            for layer in range(self.num_layers):
                if self.k[layer] is not None:
                    self._reserve(layer, self.max_frames * self.tokens_per_frame, self.k[layer])

    def keep(self, frames: Tensor, num_frames: int) -> None:
        """Keep the held frames at indices ``frames`` (in that order), compacted to the front, in place."""
        frames = [int(f) for f in frames]
        for layer in range(self.num_layers):
            n = self.length[layer]
            if not n:
                continue
            t = n // num_frames
            bufs = (self.k[layer], self.v[layer])
            if frames == sorted(set(frames)):
                for src, dst, count in _runs(frames):
                    # a run moves down by shift = src - dst frames; chunks of <= shift frames never overlap
                    shift = src - dst
                    step = count if shift == 0 else shift
                    for i in range(0, count if shift else 0, step):
                        c = min(step, count - i)
                        for buf in bufs:
                            buf[:, (dst + i) * t : (dst + i + c) * t] = buf[:, (src + i) * t : (src + i + c) * t]
            else:  # any order: gather through a temporary
                idx = torch.tensor([f * t + i for f in frames for i in range(t)], device=bufs[0].device)
                for buf in bufs:
                    buf[:, : len(idx)] = buf[:, idx].clone()
            self.length[layer] = len(frames) * t

    def held(self, layer: int) -> tuple[Tensor, Tensor] | None:
        n = self.length[layer]
        return (self.k[layer][:, :n], self.v[layer][:, :n]) if n else None

    def reset(self) -> None:
        """Forget the held K/V; the buffers stay allocated for the next video (or re-cache)."""
        self.length = [0] * self.num_layers

    def nbytes(self) -> int:
        return sum(b[:, : self.length[i]].numel() * b.element_size()
                   for i in range(self.num_layers) for b in (self.k[i], self.v[i]) if b is not None)

    def allocated_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for bufs in (self.k, self.v) for b in bufs if b is not None)

    def _reserve(self, layer: int, tokens: int, like: Tensor) -> None:
        buf = self.k[layer]
        if buf is not None and buf.shape[1] >= tokens and buf.device == like.device:
            return
        planned = self.max_frames * self.tokens_per_frame if self.max_frames and self.tokens_per_frame else None
        capacity = max(tokens, planned or 0)
        if buf is not None and self.tokens_per_frame and (planned is None or tokens > planned):
            capacity = max(tokens, 2 * buf.shape[1])  # growth beyond the plan: geometric, so it stays rare
            if planned is not None:
                log.warning("dense KV cache layer %d grows to %d tokens (max_frames=%s)", layer, capacity, self.max_frames)
        B, _, H, D = like.shape
        n = self.length[layer]
        new = []
        for old in (self.k[layer], self.v[layer]):
            t = torch.empty(B, capacity, H, D, dtype=like.dtype, device=like.device)
            if old is not None and n:
                t[:, :n] = old[:, :n]
            new.append(t)
        self.k[layer], self.v[layer] = new
        self.reallocations += 1


def _runs(frames: list[int]) -> list[tuple[int, int, int]]:
    """Increasing kept frame indices -> (src, dst, count) runs of consecutive frames moving by the same shift."""
    runs: list[list[int]] = []
    for dst, src in enumerate(frames):
        if runs and src == runs[-1][0] + runs[-1][2] and dst == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([src, dst, 1])
    return [tuple(r) for r in runs]
