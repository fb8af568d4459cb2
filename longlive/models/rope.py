"""3D rotary position embedding of Wan (diffusers ``WanRotaryPosEmbed``), at explicit frame positions.

The head dimension is split into a time part and two equal spatial parts (h and w get
``2 * (head_dim // 6)`` each, t gets the rest); each part rotates pairs of adjacent channels by
``position * theta ** (-2i / part_dim)``. Angles are computed in float64 on the CPU and rounded to
float32, as diffusers does, so the cos/sin tables match its buffers bit for bit. Unlike diffusers
the frame positions are an argument, so a block can sit at any absolute frame (KV cache) and
positions need not start at 0 or be contiguous.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def rope_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of (t, h, w) in one head."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _angles(dim: int, positions: Tensor, theta: float) -> Tensor:
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return positions.to(torch.float64)[..., None] * freqs  # (..., n, dim // 2)


def rope_freqs(
    head_dim: int,
    frame_positions: Tensor,
    height: int,
    width: int,
    *,
    theta: float = 10000.0,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """cos and sin, each (frames * height * width, 1, head_dim // 2) float32, tokens in (f, h, w) order.

    ``frame_positions`` holds the (post-patch) frame position of each frame, e.g.
    ``frame_offset + torch.arange(frames)``; h and w positions start at 0. It is (frames,), or
    (B, frames) for one set of positions per sample, which gives tables of (B, tokens, 1, head_dim // 2).
    """
    if frame_positions.ndim not in (1, 2):
        raise ValueError(f"frame_positions must be (frames,) or (B, frames), got {tuple(frame_positions.shape)}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _rope_tables(head_dim, tuple(frame_positions.tolist()) if frame_positions.ndim == 1 else
                        tuple(map(tuple, frame_positions.tolist())), height, width, theta, device)


@functools.lru_cache(maxsize=16)
def _rope_tables(
    head_dim: int, positions: tuple, height: int, width: int, theta: float, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Memoised: a streaming forward asks for the same positions at every step and, with relative positions,
    in every block after the first few. Besides the arithmetic this skips the host-to-device copies of the
    small tables, which would otherwise make every forward wait for the GPU. Callers must not modify the
    returned tensors in place."""
    frame_positions = torch.tensor(positions, dtype=torch.float64)  # as _angles computes them
    dt, dh, dw = rope_dims(head_dim)
    lead, f = frame_positions.shape[:-1], frame_positions.shape[-1]
    shape = (*lead, f, height, width, -1)
    angles = [
        _angles(dt, frame_positions, theta).view(*lead, f, 1, 1, -1),
        _angles(dh, torch.arange(height), theta).view(height, 1, -1),
        _angles(dw, torch.arange(width), theta).view(width, -1),
    ]  # cos/sin of the small per-axis tables, then broadcast to every token
    cos = torch.cat([_to(a.cos().float(), device).expand(shape) for a in angles], dim=-1)
    sin = torch.cat([_to(a.sin().float(), device).expand(shape) for a in angles], dim=-1)
    return cos.reshape(*lead, -1, 1, head_dim // 2), sin.reshape(*lead, -1, 1, head_dim // 2)


def _to(t: Tensor, device: torch.device) -> Tensor:
    """To ``device``; to a GPU from pinned memory without blocking (a pageable copy waits for the GPU)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, S, heads, head_dim) ``x`` by the tables of :func:`rope_freqs`, in float32."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)
