"""Video files and tensors: mp4 through imageio's ffmpeg (the binary from imageio-ffmpeg).

Pixel videos are ``uint8 (T, H, W, 3)`` arrays; models take ``float (3, T, H, W)`` in ``[-1, 1]``
(with any leading batch dimensions). mp4 is lossy: use it for previews and outputs, never as the
training source (synth stores lossless ``.npy``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from longlive.io import atomic_file


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int, *, quality: int = 8) -> Path:
    """Write ``frames`` (T, H, W, 3) uint8 to an H.264 mp4, atomically (temp file, then rename)."""
    import imageio.v2 as iio

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"write_mp4 needs uint8 frames of shape (T, H, W, 3), got {frames.dtype} {frames.shape}")
    path = Path(path)
    with atomic_file(path, keep_suffix=True) as tmp:  # ffmpeg picks the container by the suffix
        # yuv420p needs even sizes; macro_block_size=2 pads odd ones instead of failing.
        with iio.get_writer(
            tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=quality,
            pixelformat="yuv420p", macro_block_size=2, ffmpeg_log_level="error",
        ) as writer:
            for frame in frames:
                writer.append_data(frame)
    return path


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """All frames of a video file as uint8 (T, H, W, 3)."""
    import imageio.v2 as iio

    with iio.get_reader(Path(path), format="FFMPEG") as reader:
        return np.stack([np.asarray(f)[..., :3] for f in reader])


def frames_to_tensor(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (..., T, H, W, 3) -> float32 (..., 3, T, H, W) in [-1, 1]."""
    x = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
    if x.dtype != torch.uint8 or x.ndim < 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (..., T, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    return x.movedim(-1, -4).float().div(127.5).sub(1.0)


def frames_uint8(x: torch.Tensor) -> torch.Tensor:
    """float (..., 3, T, H, W) in [-1, 1] -> uint8 (..., T, H, W, 3) (clamped, rounded), on x's device."""
    if x.ndim < 4 or x.shape[-4] != 3:
        raise ValueError(f"expected a tensor (..., 3, T, H, W), got {tuple(x.shape)}")
    y = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return y.movedim(-4, -1)


def tensor_to_frames(x: torch.Tensor) -> np.ndarray:
    """float (..., 3, T, H, W) in [-1, 1] -> uint8 (..., T, H, W, 3) numpy (clamped, rounded)."""
    return frames_uint8(x).cpu().numpy()
