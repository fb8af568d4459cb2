"""The rolling KV cache of streaming generation: an attention sink plus a local window, relative RoPE.

Every held latent frame has a :class:`FrameRecord` (absolute frame, block, shot, clean latent). After a
block's K/V are written, :meth:`RollingKVCache.commit` keeps

* the **sink**: the first ``sink_frames`` frames of the anchor shot -- the current shot with
  ``multishot_sink`` (re-anchored at every shot boundary), else the video's first shot;
* the **window**: the ``window_frames`` most recent frames that are not in the sink;

and drops the rest, so the cache never holds more than ``sink_frames + window_frames`` frames.

Positions are **relative**: keys are stored before RoPE (see :class:`~longlive.models.attention.KVCache`)
and the held frames, in temporal order, get RoPE positions 0, 1, 2, ... -- gaps left by evicted frames
are closed -- plus ``shot_rope_offset`` extra positions wherever the shot changes between neighbours.
The block being generated continues right after the last held frame. Positions therefore stay below
``sink_frames + window_frames + block + offsets`` however long the video runs, and a block whose cache
holds the same K/V computes the same output whatever its absolute index.

With ``max_block_position`` (the first frame of the last whole block of a training clip, which
``train_ar`` records in ``ar_config.json``) the gap between the sink and the window is not closed
entirely: frames after the sink move up by ``min(evicted gap, max_block_position - closed start)``,
so once the video outgrows a training clip every block sees its sink and window at exactly the
distances the last block of a training clip saw them (the student trains on that view, see
``longlive.models.attention.cached_history``), and before that the positions are the true ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longlive.models.attention import KVCache


@dataclass
class FrameRecord:
    frame: int  # absolute latent frame in the video
    block: int  # the block that generated it
    shot: int
    shot_frame: int  # index of the frame within its shot
    latent: Tensor  # (B, C, 1, h, w) clean latent, kept for re-caching under a new prompt


class RollingKVCache(KVCache):
    """A :class:`KVCache` with sink + window eviction and re-based (relative) RoPE positions."""

    def __init__(
        self,
        num_layers: int,
        sink_frames: int,
        window_frames: int,
        *,
        multishot_sink: bool = True,
        shot_rope_offset: int = 0,
        max_block_position: int | None = None,
        storage=None,
    ) -> None:
        super().__init__(num_layers, storage)  # storage: see KVCache (None = dense K/V)
        if sink_frames < 0 or window_frames < 0 or shot_rope_offset < 0 or (max_block_position or 0) < 0:
            raise ValueError("sink_frames, window_frames, shot_rope_offset and max_block_position must be >= 0")
        self.sink_frames, self.window_frames = sink_frames, window_frames
        self.multishot_sink, self.shot_rope_offset = multishot_sink, shot_rope_offset
        self.max_block_position = max_block_position
        self.frames: list[FrameRecord] = []

    # positions

    def _positions(self, shots: list[int]) -> list[int]:
        """Closed-up positions: consecutive, plus ``shot_rope_offset`` at each shot change."""
        out, prev = [], None
        for shot in shots:
            gap = self.shot_rope_offset if prev is not None and shot != prev else 0
            out.append((out[-1] + 1 if out else 0) + gap)
            prev = shot
        return out

    def _sink_gap(self, closed: list[int]) -> tuple[int, int]:
        """(index of the first held frame after the sink, positions to add from it on) -- see the module doc."""
        sink = self.sink_indices()
        if self.max_block_position is None or not sink or sink[-1] + 1 >= len(self.frames):
            return len(self.frames), 0
        after = sink[-1] + 1
        evicted = self.frames[after].frame - self.frames[sink[-1]].frame - 1
        room = self.max_block_position - (closed[-1] + 1)
        return after, max(0, min(evicted, room))

    def _held_positions(self) -> list[int]:
        closed = self._positions([r.shot for r in self.frames])
        after, gap = self._sink_gap(closed)
        return [p + (gap if i >= after else 0) for i, p in enumerate(closed)]

    def next_positions(self, num_frames: int, shot: int) -> Tensor:
        """RoPE positions of the next ``num_frames`` frames (of ``shot``): right after the held ones."""
        shots = [r.shot for r in self.frames] + [shot] * num_frames
        closed = self._positions(shots)[len(self.frames):]
        if self.frames:
            held = self._held_positions()
            shift = held[-1] - self._positions([r.shot for r in self.frames])[-1]
            closed = [p + shift for p in closed]
        return torch.tensor(closed, dtype=torch.long)

    # bookkeeping

    def sink_indices(self) -> list[int]:
        """Indices (into ``frames``) of the sink: the anchor shot's first ``sink_frames`` frames."""
        if not self.frames or self.sink_frames == 0:
            return []
        anchor = self.frames[-1].shot if self.multishot_sink else self.frames[0].shot
        return [i for i, r in enumerate(self.frames) if r.shot == anchor and r.shot_frame < self.sink_frames]

    def commit(self, records: list[FrameRecord]) -> None:
        """After a writing pass: record its frames, evict beyond sink + window, re-base positions."""
        self.frames.extend(records)
        if len(self.frames) != self.num_frames:
            raise RuntimeError(f"cache holds K/V of {self.num_frames} frames but {len(self.frames)} records")
        sink = self.sink_indices()
        rest = [i for i in range(len(self.frames)) if i not in sink]
        window = rest[max(0, len(rest) - self.window_frames):]
        keep = sorted(sink + window)
        if len(keep) < len(self.frames):
            self.keep(keep)
            self.frames = [self.frames[i] for i in keep]
        self.positions = torch.tensor(self._held_positions(), dtype=torch.long)

    def clear_kv(self) -> None:
        """Drop the K/V (and positions) but keep the frame records: the start of a re-cache."""
        super().reset()

    def reset(self) -> None:
        super().reset()
        self.frames = []

    # what is held

    def held_frames(self) -> list[int]:
        return [r.frame for r in self.frames]

    def latents(self) -> Tensor:
        """(B, C, n, h, w) clean latents of the held frames, in order."""
        return torch.cat([r.latent for r in self.frames], dim=2)


def history_mask(blocks: list[int], frame_tokens: int, device: torch.device | str | None = None) -> Tensor | None:
    """(S, S) mask over frames of the given block ids: a frame sees frames of its own and earlier blocks.

    The re-cache pass runs all held frames at once with this mask, which gives each frame the K/V
    context it would have had if the held frames were written block by block from scratch.
    """
    b = torch.tensor(blocks)
    allowed = b[None, :] <= b[:, None]  # (frames, frames), decided on the host: no wait for the GPU
    if bool(allowed.all()):
        return None
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":  # a pageable host-to-device copy would wait for the GPU's queue
        allowed = allowed.pin_memory().to(device, non_blocking=True)
    else:
        allowed = allowed.to(device)
    return allowed.repeat_interleave(frame_tokens, dim=0).repeat_interleave(frame_tokens, dim=1)
