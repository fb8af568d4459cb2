"""Attention pieces of the causal DiT: the attention call, frame-level masks and the KV cache.

Tokens are laid out frame by frame (post-patch frames), ``frame_tokens`` tokens per frame. In
block-causal attention frames are grouped in blocks of ``block_frames``; a token attends to every
token of its own block and of earlier blocks. Block boundaries count from frame 0 of the cache.

Every self-attention mask the project uses is a rule between *frames* (block-causal, teacher forcing
with its histories, a re-cache pass): :class:`FrameMask` holds that (F_q, F_k) table and applies it
either as a dense boolean token mask to SDPA or as a block-sparse ``BlockMask`` to FlexAttention
(``flex_attention.md``).
"""

from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

# FlexAttention's tile, queries and keys alike: the kernel's own block, so a tile the table calls fully allowed
# is computed without evaluating the mask. At 704x1280 a frame is 880 tokens and a block of 8 frames 7040 =
# 55 x 128, so every tile of the 5B teacher-forcing layout is fully allowed or fully masked.
FLEX_BLOCK = 128
BACKENDS = ("auto", "flex", "dense")


def attention(q: Tensor, k: Tensor, v: Tensor, mask: "Tensor | FrameMask | None" = None) -> Tensor:
    """Scaled dot-product attention on (B, S, heads, head_dim) tensors.

    ``mask``: a :class:`FrameMask`, its FlexAttention ``BlockMask`` (:meth:`FrameMask.block_mask`), or a boolean
    tensor, True where a query may attend, that broadcasts to (B, heads, S_q, S_k). The one place attention is
    computed, so sequence parallel or kernels can wrap it.
    """
    if _is_block_mask(mask):
        return flex(q, k, v, mask)
    if isinstance(mask, FrameMask):
        if mask.use_flex(q.device):
            return flex(q, k, v, mask.block_mask(q.device))
        mask = mask.dense(q.device)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _is_block_mask(mask) -> bool:
    return type(mask).__name__ == "BlockMask" and type(mask).__module__.startswith("torch.nn.attention")


@functools.cache
def _compiled_flex() -> Callable:
    # Compiled once per process; without compile flex_attention materialises every score (its eager reference).
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex(q: Tensor, k: Tensor, v: Tensor, block_mask) -> Tensor:
    """FlexAttention on (B, S, heads, head_dim) tensors under ``block_mask``: compiled on CUDA, the eager
    reference elsewhere. q, k, v run in v's dtype (autocast does not reach flex_attention)."""
    from torch.nn.attention.flex_attention import flex_attention

    # inside a compiled region (compiled DiT blocks) the enclosing graph compiles flex_attention itself
    fn = _compiled_flex() if q.is_cuda and not torch.compiler.is_compiling() else flex_attention
    dtype = v.dtype
    with torch.autocast(q.device.type, enabled=False):
        out = fn(q.transpose(1, 2).to(dtype), k.transpose(1, 2).to(dtype), v.transpose(1, 2), block_mask=block_mask)
    return out.transpose(1, 2)


class FrameMask:
    """Self-attention allowed frame by frame: query token i may attend to key token j iff
    ``frames[b, frame(i), frame(j)]``, where frame(t) = t // ``frame_tokens``.

    ``frames``: (F_q, F_k) bool, one layout for the batch, or (B, F_q, F_k), one per sample. ``rows``: the global
    indices of the queries this call holds (sequence parallel hands a rank its own tokens), None for all.
    ``backend``: ``flex`` (block-sparse FlexAttention), ``dense`` (a boolean S_q x S_k mask to SDPA) or ``auto``:
    flex on CUDA, dense elsewhere (``flex_attention.md`` says why).

    One predicate, :meth:`mask_mod`, defines the mask: :meth:`dense` evaluates it on every token pair and
    :meth:`block_mask` hands it to FlexAttention for the tiles the frame table calls partly allowed, so the two
    paths cannot disagree. Both are built once per device and kept; keep the FrameMask of a layout to reuse them.
    """

    def __init__(self, frames: Tensor, frame_tokens: int, *, rows: Tensor | None = None, backend: str = "auto") -> None:
        if frames.dtype != torch.bool or frames.ndim not in (2, 3):
            raise ValueError(f"frames must be a (F_q, F_k) or (B, F_q, F_k) bool table, got {frames.dtype} "
                             f"{tuple(frames.shape)}")
        if frame_tokens < 1:
            raise ValueError(f"frame_tokens must be >= 1, got {frame_tokens}")
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        self.frames, self.frame_tokens, self.backend = frames.detach().cpu(), frame_tokens, backend
        self.rows = None if rows is None else rows.detach().cpu().long()
        if self.rows is not None and self.rows.numel() and int(self.rows.max()) >= self.frames.shape[-2] * frame_tokens:
            raise ValueError(f"rows index tokens beyond the {self.frames.shape[-2] * frame_tokens} queries")
        self._cache: dict[tuple, object] = {}
        self._parts: list[FrameMask] | None = None  # per-sample masks this one stacks (:meth:`stack`)

    @classmethod
    def stack(cls, masks: list["FrameMask"]) -> "FrameMask":
        """One table per sample from per-sample masks of one size; the dense mask stacks theirs (kept by them)."""
        if len({(m.frames.shape, m.frame_tokens, m.backend) for m in masks}) != 1 or any(
                m.batched or m.rows is not None for m in masks):
            raise ValueError("FrameMask.stack needs unbatched masks of one size, tokens per frame and backend")
        out = cls(torch.stack([m.frames for m in masks]), masks[0].frame_tokens, backend=masks[0].backend)
        out._parts = masks
        return out

    @property
    def batched(self) -> bool:
        return self.frames.ndim == 3

    @property
    def q_len(self) -> int:
        return self.frames.shape[-2] * self.frame_tokens if self.rows is None else self.rows.numel()

    @property
    def kv_len(self) -> int:
        return self.frames.shape[-1] * self.frame_tokens

    def with_backend(self, backend: str) -> "FrameMask":
        return FrameMask(self.frames, self.frame_tokens, rows=self.rows, backend=backend)

    def select_rows(self, index: Tensor) -> "FrameMask":
        """The queries at ``index`` (of this mask's queries) against every key."""
        index = index.detach().cpu().long()
        rows = index if self.rows is None else self.rows[index]
        return FrameMask(self.frames, self.frame_tokens, rows=rows, backend=self.backend)

    def use_flex(self, device: torch.device) -> bool:
        return self.backend == "flex" or (self.backend == "auto" and device.type == "cuda")

    def mask_mod(self, device: torch.device | str) -> Callable:
        """``(b, h, q_idx, kv_idx) -> bool``, FlexAttention's mask_mod, over this mask's tensors on ``device``."""
        device = torch.device(device)
        key = ("mask_mod", str(device))
        if key not in self._cache:
            table, T = self.frames.to(device), self.frame_tokens
            rows = None if self.rows is None else self.rows.to(device)
            # one plain function per case, closing over tensors and an int only: the compiled kernel takes the
            # tensors as inputs, so another layout of the same shapes should not need a recompile
            if rows is None and not self.batched:
                def mask_mod(b, h, q_idx, kv_idx):
                    return table[q_idx // T, kv_idx // T]
            elif rows is None:
                def mask_mod(b, h, q_idx, kv_idx):
                    return table[b, q_idx // T, kv_idx // T]
            elif not self.batched:
                def mask_mod(b, h, q_idx, kv_idx):
                    return table[rows[q_idx] // T, kv_idx // T]
            else:
                def mask_mod(b, h, q_idx, kv_idx):
                    return table[b, rows[q_idx] // T, kv_idx // T]

            self._cache[key] = mask_mod
        return self._cache[key]

    def dense(self, device: torch.device | str | None = None) -> Tensor:
        """The boolean token mask, (S_q, S_k) or (B, 1, S_q, S_k): :meth:`mask_mod` at every token pair."""
        device = torch.device(device or "cpu")
        key = ("dense", str(device))
        if key not in self._cache:
            fn = self.mask_mod(device)
            q = torch.arange(self.q_len, device=device)
            k = torch.arange(self.kv_len, device=device)
            if self._parts is not None:  # each sample's own mask, built once per layout, not per batch
                self._cache[key] = torch.stack([m.dense(device) for m in self._parts])[:, None]
            elif self.batched:
                b = torch.arange(self.frames.shape[0], device=device)
                self._cache[key] = fn(b[:, None, None], 0, q[None, :, None], k[None, None, :])[:, None]
            else:
                self._cache[key] = fn(0, 0, q[:, None], k[None, :])
        return self._cache[key]

    def tiles(self, block: int = FLEX_BLOCK) -> tuple[Tensor, Tensor]:
        """(partial, full) bool tables over (block x block) tiles, (B or 1, tiles_q, tiles_k), from the frame table.

        A tile is full when every frame pair it touches is allowed and it lies inside both sequences (a tile
        past the end counts as partial, as ``create_block_mask`` pads); partial when some pair is allowed.
        """
        table = (self.frames if self.batched else self.frames[None]).float()
        q_frame = (torch.arange(self.q_len) if self.rows is None else self.rows) // self.frame_tokens
        k_frame = torch.arange(self.kv_len) // self.frame_tokens

        def touches(frame: Tensor, num_frames: int) -> Tensor:  # (tiles, frames): which frames a tile holds
            m = torch.zeros(-(-frame.numel() // block), num_frames)
            m[torch.arange(frame.numel()) // block, frame] = 1.0
            return m

        mq, mk = touches(q_frame, table.shape[-2]), touches(k_frame, table.shape[-1])
        allowed = (mq @ table @ mk.T) > 0
        denied = (mq @ (1 - table) @ mk.T) > 0
        inside_q = torch.arange(mq.shape[0]) * block + block <= self.q_len
        inside_k = torch.arange(mk.shape[0]) * block + block <= self.kv_len
        full = ~denied & inside_q[:, None] & inside_k[None, :]
        return allowed & ~full, full

    def block_mask(self, device: torch.device | str):
        """FlexAttention's ``BlockMask`` (built from the frame table, no S_q x S_k tensor), kept per device."""
        from torch.nn.attention.flex_attention import BlockMask

        device = torch.device(device)
        key = ("block_mask", str(device))
        if key not in self._cache:
            partial, full = self.tiles()

            def ordered(t: Tensor) -> tuple[Tensor, Tensor]:  # (num, indices) per row: allowed tiles first
                t = t.to(torch.int32)[:, None]  # (B, 1 head, tiles_q, tiles_k)
                idx = torch.argsort(t, dim=-1, descending=True, stable=True)
                return t.sum(-1).to(torch.int32).to(device), idx.to(torch.int32).to(device)

            self._cache[key] = BlockMask.from_kv_blocks(
                *ordered(partial), *ordered(full), BLOCK_SIZE=FLEX_BLOCK, mask_mod=self.mask_mod(device),
                seq_lengths=(self.q_len, self.kv_len),
            )
        return self._cache[key]

    def allowed_pairs(self) -> int:
        """Query-key token pairs allowed, summed over the batch of tables (per sample when unbatched)."""
        T = self.frame_tokens
        if self.rows is None:
            return int(self.frames.sum()) * T * T
        rows_per_frame = torch.bincount(self.rows // T, minlength=self.frames.shape[-2]).float()
        return int((rows_per_frame[:, None] * self.frames.float()).sum()) * T

    def union(self) -> Tensor:
        """(F_q, F_k): frames any sample may attend to (one partition serves the whole batch)."""
        return self.frames.any(0) if self.batched else self.frames


def block_causal_frames(num_frames: int, block_frames: int, *, cached_frames: int = 0) -> Tensor:
    """(F_q, F_k) bool: ``num_frames`` query frames after ``cached_frames`` cached ones, keys the cached frames
    followed by the query frames; a frame sees its own and earlier blocks."""
    if block_frames < 1:
        raise ValueError(f"block_frames must be >= 1, got {block_frames}")
    q_block = (cached_frames + torch.arange(num_frames)) // block_frames
    k_frame = torch.arange(cached_frames + num_frames)
    return k_frame[None, :] < (q_block[:, None] + 1) * block_frames


@functools.lru_cache(maxsize=64)
def block_causal(num_frames: int, frame_tokens: int, block_frames: int, *, cached_frames: int = 0) -> FrameMask | None:
    """The block-causal :class:`FrameMask` (kept per layout); None when every query may see every key."""
    frames = block_causal_frames(num_frames, block_frames, cached_frames=cached_frames)
    return None if bool(frames.all()) else FrameMask(frames, frame_tokens)


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
    frames = block_causal_frames(num_frames, block_frames, cached_frames=cached_frames)
    return None if bool(frames.all()) else FrameMask(frames, frame_tokens).dense(device)


def teacher_forcing_frames(history: Tensor, blocks: Tensor) -> Tensor:
    """(2F, 2F) bool over ``[clean | noisy]`` frames given each frame's visible clean history (F, F).

    Clean and noisy frames of block b both see the clean history of b; clean frames also see their
    own clean block (the pass that writes the cache), noisy frames their own noisy block.
    """
    history, blocks = history.cpu(), blocks.cpu()
    same = blocks[None, :] == blocks[:, None]
    return torch.cat(
        (
            torch.cat((history | same, torch.zeros_like(same)), dim=1),
            torch.cat((history, same), dim=1),
        ),
        dim=0,
    )


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
    blocks = torch.arange(num_frames) // block_frames
    history = blocks[None, :] < blocks[:, None]
    return FrameMask(teacher_forcing_frames(history, blocks), frame_tokens).dense(device)


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
    """(2S, 2S) dense mask over ``[clean | noisy]`` of :func:`teacher_forcing_frames` (the SDPA reference)."""
    return FrameMask(teacher_forcing_frames(history, blocks), frame_tokens).dense(history.device)


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

    def graph_state(self) -> tuple | None:
        """The host-side state a forward reads and changes: held positions, the write flag and the storage's own
        (:meth:`DenseKVStorage.graph_state`). A forward replayed from a CUDA graph
        (:mod:`longlive.inference.cuda_graphs`) runs none of this Python, so the replayer sets it instead. None
        for the list-of-tensors cache, whose every write makes new tensors (nothing fixed to capture)."""
        storage_state = getattr(self.storage, "graph_state", None)
        if storage_state is None:
            return None
        return (tuple(self.positions.tolist()), self.write, storage_state())

    def load_graph_state(self, state: tuple) -> None:
        """Set what :meth:`graph_state` returned (the write flag is the caller's ``writing()`` context: checked)."""
        positions, write, storage_state = state
        if write != self.write:
            raise RuntimeError(f"graph state of a {'writing' if write else 'reading'} pass loaded into a "
                               f"{'writing' if self.write else 'reading'} one")
        self.positions = torch.tensor(positions, dtype=torch.long)
        self.storage.load_graph_state(storage_state)

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

    def graph_state(self) -> tuple:
        """Held tokens per layer and tokens per frame (what a forward changes on the host), and the buffers'
        generation (a reallocation moves them, so a captured forward no longer reads the right memory)."""
        return (tuple(self.length), self.tokens_per_frame, self.reallocations)

    def load_graph_state(self, state: tuple) -> None:
        length, self.tokens_per_frame, reallocations = state
        if reallocations != self.reallocations:
            raise RuntimeError("KV buffers were reallocated since this state was taken")
        self.length = list(length)

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
