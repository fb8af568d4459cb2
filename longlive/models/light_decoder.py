"""A light causal video decoder: the DiT's latents -> pixels at a small fraction of the Wan VAE decoder's cost.

The design is TAEHV's (madebyollin/taehv, the "tiny autoencoder" LightX2V's LightTAE and the Self-Forcing /
StreamDiffusionV2 demos decode Wan latents with); the code is ours. Every convolution is 2D and runs frame by
frame; time enters only through

* **MemBlocks**: conv 3x3 + ReLU (x3) over a frame's features concatenated with the *previous* frame's, plus a
  residual, so frame t sees frames <= t (causal) and a block needs only the last frame of the one before;
* **TGrow**: a 1x1 conv that makes ``stride`` frames out of each frame (temporal upsampling).

A stage is MemBlocks at one width, then a nearest 2x spatial upsampling and/or a TGrow(2), then a 3x3 conv to the
next width; a ReLU + 3x3 conv head and a pixel shuffle (``patch_size``) give RGB. With a total temporal growth of
tc each latent frame becomes tc pixel frames; dropping the video's first tc - 1 frames gives the causal VAE's
layout (the first latent frame -> 1 pixel frame, each later one -> tc), as TAEHV trims them.

Input: normalised latents, exactly what :meth:`longlive.models.vae.WanVAE.decode` takes; output: (B, 3, T, H, W)
in [-1, 1] like it. :class:`LightStreamingDecoder` decodes block by block, carrying each MemBlock's previous frame;
the blocks concatenate to the whole-video decode.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from longlive.config import ConfigError, LightDecoderConfig
from longlive.io import atomic_dir, save_safetensors

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "longlive-light-decoder/1"
DISTILL_STAGE = "dvc repro distill_decoder"


def per_frame(module, x: Tensor) -> Tensor:
    """Apply a 2D module to every frame of ``x`` (B, T, C, H, W)."""
    return module(x.flatten(0, 1)).unflatten(0, x.shape[:2])


def conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class MemBlock(nn.Module):
    """Three conv 3x3 (ReLU between) over [frame, previous frame] + the frame, then ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(conv(2 * channels, channels), nn.ReLU(), conv(channels, channels), nn.ReLU(),
                                  conv(channels, channels))

    def forward(self, x: Tensor, past: Tensor) -> Tensor:
        """``x`` (B, T, C, H, W); ``past`` (B, 1, C, H, W): the frame before ``x[:, 0]`` (zeros at a video's start)."""
        previous = torch.cat([past, x[:, :-1]], dim=1)
        return F.relu(per_frame(self.conv, torch.cat([x, previous], dim=2)) + x)


class TGrow(nn.Module):
    """A 1x1 conv that makes ``stride`` consecutive frames out of each frame."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c, h, w = x.shape
        return per_frame(self.conv, x).reshape(b, t * self.stride, c, h, w)


class Stage(nn.Module):
    def __init__(self, c_in: int, c_out: int, blocks: int, spatial: bool, temporal: bool):
        super().__init__()
        self.blocks = nn.ModuleList(MemBlock(c_in) for _ in range(blocks))
        self.spatial = spatial
        self.grow = TGrow(c_in, 2) if temporal else None
        self.proj = conv(c_in, c_out, bias=False)


def _upsample(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


class LightDecoder(nn.Module):
    """TAEHV-style decoder. ``forward`` maps a chunk of latents and the carried memory to all ``tc`` frames of each
    latent frame (no trim, no clamp) and the new memory; :meth:`decode` / :meth:`streaming_decoder` are the API."""

    def __init__(self, cfg: LightDecoderConfig, latent_channels: int):
        super().__init__()
        self.cfg, self.latent_channels = cfg, latent_channels
        c = cfg.channels
        self.stem = conv(latent_channels, c[0])
        self.stages = nn.ModuleList(
            Stage(c[k], c[k + 1], cfg.blocks[k], cfg.spatial_upsample[k], cfg.temporal_upsample[k])
            for k in range(len(cfg.blocks))
        )
        self.head = conv(c[-1], 3 * cfg.patch_size**2)

    @property
    def temporal_upsampling(self) -> int:
        return self.cfg.temporal_upsampling

    @property
    def spatial_upsampling(self) -> int:
        return self.cfg.spatial_upsampling

    @property
    def num_memblocks(self) -> int:
        return sum(self.cfg.blocks)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, latents: Tensor, memory: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        """``latents`` (B, C, F, h, w) -> (B, 3, F * tc, H, W) and the input of every MemBlock at the last frame
        (its ``past`` for the next chunk). ``memory`` None: the start of a video (zeros)."""
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels or latents.shape[2] == 0:
            raise ValueError(f"latents must be (B, {self.latent_channels}, F >= 1, h, w), got {tuple(latents.shape)}")
        if memory is not None and len(memory) != self.num_memblocks:
            raise ValueError(f"memory holds {len(memory)} frames, the decoder has {self.num_memblocks} MemBlocks")
        x = latents.to(self.stem.weight.dtype).movedim(1, 2)  # (B, F, C, h, w)
        x = F.relu(per_frame(self.stem, 3 * torch.tanh(x / 3)))  # TAEHV's soft clamp of outliers at +-3
        new_memory, i = [], 0
        for stage in self.stages:
            for block in stage.blocks:
                past = memory[i] if memory is not None else torch.zeros_like(x[:, :1])
                new_memory.append(x[:, -1:].clone())  # a copy: a view would keep the whole chunk alive
                x = block(x, past)
                i += 1
            if stage.spatial:
                x = per_frame(_upsample, x)
            if stage.grow is not None:
                x = stage.grow(x)
            x = per_frame(stage.proj, x)
        x = per_frame(self.head, F.relu(x))
        x = per_frame(lambda y: F.pixel_shuffle(y, self.cfg.patch_size), x)  # (B, T, 3, H, W)
        return x.movedim(2, 1), new_memory

    def streaming_decoder(self, clamp: bool = True) -> "LightStreamingDecoder":
        return LightStreamingDecoder(self, clamp=clamp)

    def decode(self, latents: Tensor, clamp: bool = True) -> Tensor:
        """Normalised latents (B, C, F, h, w) -> video (B, 3, 1 + tc (F - 1), H, W), in [-1, 1] with ``clamp``."""
        return LightStreamingDecoder(self, clamp=clamp).decode(latents)

    # checkpoints: config.json (sizes + latent channels) + model.safetensors

    def save_pretrained(self, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
        config = {"format": FORMAT, "latent_channels": self.latent_channels, **self.cfg.sizes()}
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        with atomic_dir(path) as tmp:
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            save_safetensors(state, tmp / WEIGHTS_NAME, metadata=metadata)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        expect: LightDecoderConfig | None = None,
        latent_channels: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> "LightDecoder":
        """Load a :meth:`save_pretrained` directory. ``expect`` / ``latent_channels``: raise :class:`ConfigError`
        naming each size where the checkpoint differs from the preset."""
        path = Path(path)
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"light decoder {path}: no {CONFIG_NAME} + {WEIGHTS_NAME}; inference.decoder: light needs the "
                f"weights the distill_decoder stage writes (run `{DISTILL_STAGE}`), or set inference.decoder: vae"
            )
        raw = json.loads((path / CONFIG_NAME).read_text())
        if raw.pop("format", None) != FORMAT:
            raise ConfigError(f"{path / CONFIG_NAME} is not a {FORMAT} config")
        channels = raw.pop("latent_channels")
        try:
            cfg = LightDecoderConfig(**raw)
        except ValueError as e:
            raise ConfigError(f"{path / CONFIG_NAME} is not a valid light decoder config: {e}") from e
        diffs = []
        if expect is not None:
            diffs = [f"{k}: {path} has {v!r}, the preset expects {expect.sizes()[k]!r}"
                     for k, v in cfg.sizes().items() if v != expect.sizes()[k]]
        if latent_channels is not None and channels != latent_channels:
            diffs.append(f"latent_channels: {path} has {channels}, the VAE has z_dim {latent_channels}")
        if diffs:
            raise ConfigError(f"light decoder mismatch (rerun `{DISTILL_STAGE}`):\n  " + "\n  ".join(diffs))
        with torch.device("meta"):  # every tensor comes from the checkpoint
            model = cls(cfg, channels)
        state = load_file(path / WEIGHTS_NAME)
        model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
        return model.eval()


class LightStreamingDecoder:
    """Decodes normalised latents chunk by chunk in order, carrying each MemBlock's previous frame; chunks of any
    length concatenate to :meth:`LightDecoder.decode` of the whole video. The state is this object's own, so
    several streams may share one model."""

    def __init__(self, model: LightDecoder, clamp: bool = True):
        self.model, self.clamp = model, clamp
        self.reset()

    def reset(self) -> None:
        self.memory: list[Tensor] | None = None
        self.first = True  # the video's first latent frame gives one pixel frame: drop the tc - 1 before it

    def decode(self, latents: Tensor) -> Tensor:
        out, self.memory = self.model(latents, self.memory)
        if self.first:
            out = out[:, :, self.model.temporal_upsampling - 1 :]
            self.first = False
        return out.clamp(-1.0, 1.0) if self.clamp else out
