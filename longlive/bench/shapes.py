"""Benchmark shapes from a preset and a resolution.

A :class:`BenchShape` is what one streaming block costs: the DiT's sizes (from the preset), the latent
frame (resolution / the VAE's spatial compression), tokens per latent frame (latent / the DiT's patch),
block and window frames and the context length (the preset's inference and text settings, or flags).
Wan2.2-TI2V-5B: 16x spatial compression and a 1x2x2 patch, so 704x1280 -> latent 44x80, 880 tokens per
latent frame; 480x832 -> latent 30x52, 390 tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from longlive.config import ConfigError, Preset


def step_list(steps: int, preset_steps: list[int] | None = None) -> list[int]:
    """Timesteps of an ``steps``-step student: the preset's list when it has that length, else evenly
    spaced from 1000 (4 -> [1000, 750, 500, 250], 2 -> [1000, 500], LongLive's students)."""
    if steps < 1:
        raise ConfigError(f"--steps {steps}: a step count must be >= 1")
    if preset_steps and len(preset_steps) == steps:
        return list(preset_steps)
    return [round(1000 * (1 - i / steps)) for i in range(steps)]


def resolution_name(height: int, width: int) -> str:
    return f"{height}x{width}"


@dataclass(frozen=True)
class BenchShape:
    """The sizes one streaming block runs at (``asdict`` goes to the JSON)."""

    preset: str
    height: int
    width: int
    layers: int
    dim: int
    heads: int
    ffn: int
    z_dim: int
    text_dim: int
    lat_h: int
    lat_w: int
    h: int  # tokens along the height of one latent frame (after the DiT's patch)
    w: int
    frame_tokens: int
    block_frames: int  # latent frames per block
    sink_frames: int
    window_frames: int  # cached latent frames besides the sink (inference.window_frames)
    context_tokens: int
    pixel_frames_per_latent: int  # the causal VAE's temporal compression (the video's first latent gives 1)

    @property
    def resolution(self) -> str:
        return resolution_name(self.height, self.width)

    @property
    def cached_frames(self) -> int:
        """Latent frames a steady block attends to besides its own: sink + window."""
        return self.sink_frames + self.window_frames

    @property
    def pixel_frames_per_block(self) -> int:
        return self.block_frames * self.pixel_frames_per_latent

    @property
    def warm_blocks(self) -> int:
        """Blocks before the cache holds a full window: from this block on, every block costs the same."""
        return math.ceil(self.cached_frames / self.block_frames)

    @property
    def latent(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent frame, as :meth:`StreamingPipeline.stream` takes it."""
        return self.z_dim, self.lat_h, self.lat_w

    def to_json(self) -> dict:
        return {**asdict(self), "resolution": self.resolution, "cached_frames": self.cached_frames,
                "warm_blocks": self.warm_blocks, "pixel_frames_per_block": self.pixel_frames_per_block}

    def text(self) -> str:
        return (f"{self.preset}: DiT {self.layers} layers, dim {self.dim}, {self.heads} heads, ffn {self.ffn}; "
                f"{self.resolution} (latent {self.lat_h}x{self.lat_w}, {self.frame_tokens} tokens per latent frame); "
                f"blocks of {self.block_frames} latent frames = {self.pixel_frames_per_block} video frames; "
                f"window {self.cached_frames} cached + {self.block_frames}; context {self.context_tokens} tokens")


def bench_shape(preset: Preset, resolution: tuple[int, int] | None = None, *, block_frames: int | None = None,
                window_frames: int | None = None, context_tokens: int | None = None) -> BenchShape:
    """The shape of ``preset`` at ``resolution`` (default: the preset's video size). Raises
    :class:`ConfigError` naming the rule when the resolution does not divide into whole tokens."""
    height, width = resolution or (preset.video.height, preset.video.width)
    sc, (_, ph, pw) = preset.vae.spatial_compression, preset.dit.patch_size
    for key, size, patch in (("height", height, ph), ("width", width, pw)):
        mult = sc * patch
        if size % mult:
            lower, upper = size // mult * mult, (size // mult + 1) * mult
            raise ConfigError(
                f"resolution {height}x{width}: {key} {size} is not a multiple of {mult} (VAE spatial compression "
                f"{sc} x DiT patch {patch}) for preset {preset.name}; use a {key} of "
                + (f"{lower} or {upper}" if lower else f"{upper}"))
    inf = preset.inference
    block_frames = inf.block_frames if block_frames is None else block_frames
    window_frames = inf.window_frames if window_frames is None else window_frames
    context_tokens = preset.text.max_tokens if context_tokens is None else context_tokens
    for flag, value, low in (("--block-frames", block_frames, 1), ("--window-frames", window_frames, 0),
                             ("--context-tokens", context_tokens, 1)):
        if value < low:
            raise ConfigError(f"{flag} {value} must be >= {low}")
    lat_h, lat_w = height // sc, width // sc
    d = preset.dit
    return BenchShape(
        preset=preset.name, height=height, width=width, layers=d.num_layers, dim=d.dim, heads=d.num_heads,
        ffn=d.ffn_dim, z_dim=preset.vae.z_dim, text_dim=preset.text.dim, lat_h=lat_h, lat_w=lat_w,
        h=lat_h // ph, w=lat_w // pw, frame_tokens=(lat_h // ph) * (lat_w // pw), block_frames=block_frames,
        sink_frames=inf.sink_frames, window_frames=window_frames, context_tokens=context_tokens,
        pixel_frames_per_latent=preset.vae.temporal_compression,
    )
