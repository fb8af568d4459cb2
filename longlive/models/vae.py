"""The Wan causal video VAE: a thin wrapper over diffusers' ``AutoencoderKLWan``.

diffusers owns the conv stack (Wan2.2 layout: ``is_residual=True``, 2x2 patchify, causal 3D convs,
first frame alone then groups of 4 frames); this file adds latent normalisation, a streaming
decoder that keeps its own causal feature cache, and checked, atomic save/load in the diffusers
layout (``config.json`` + ``diffusion_pytorch_model.safetensors``) so real Wan2.2 weights load as-is.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.torch import load_file
from torch import Tensor, nn

from longlive.config import ConfigError, VAEConfig
from longlive.io import atomic_dir

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
ENCODE_GROUP = 4  # diffusers' _encode feeds the first frame alone, then groups of 4 frames


def diffusers_kwargs(cfg: VAEConfig) -> dict:
    """``AutoencoderKLWan`` arguments for ``cfg``, with identity latent stats."""
    p, z = cfg.patch_size, cfg.z_dim
    return dict(
        base_dim=cfg.base_dim,
        decoder_base_dim=cfg.decoder_base_dim,
        z_dim=z,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks,
        temperal_downsample=list(cfg.temperal_downsample),
        is_residual=cfg.is_residual,
        in_channels=3 * p * p,
        out_channels=3 * p * p,
        patch_size=p,
        latents_mean=[0.0] * z,
        latents_std=[1.0] * z,
        scale_factor_temporal=cfg.temporal_compression,
        scale_factor_spatial=cfg.spatial_compression,
    )


def vae_config_from_diffusers(raw: dict) -> VAEConfig:
    """The :class:`VAEConfig` described by an ``AutoencoderKLWan`` ``config.json`` dict."""
    p = raw.get("patch_size") or 1
    c = 3 * p * p
    if raw.get("in_channels", 3) != c or raw.get("out_channels", 3) != c:
        raise ConfigError(
            f"in/out_channels {raw.get('in_channels')}/{raw.get('out_channels')} != 3 * patch_size^2 = {c}; "
            "only RGB Wan VAEs are supported"
        )
    dim_mult = list(raw.get("dim_mult", [1, 2, 4, 4]))
    tdown = list(raw.get("temperal_downsample", [False, True, True]))
    fields = dict(
        base_dim=raw.get("base_dim", 96),
        decoder_base_dim=raw.get("decoder_base_dim") or raw.get("base_dim", 96),
        z_dim=raw.get("z_dim", 16),
        dim_mult=dim_mult,
        num_res_blocks=raw.get("num_res_blocks", 2),
        temperal_downsample=tdown,
        is_residual=raw.get("is_residual", False),
        patch_size=p,
        compression=(2 ** sum(tdown), 2 ** (len(dim_mult) - 1) * p, 2 ** (len(dim_mult) - 1) * p),
    )
    return VAEConfig(**fields)


def check_vae_config(got: VAEConfig, expect: VAEConfig, where: str) -> None:
    """Raise :class:`ConfigError` naming every field where ``got`` differs from ``expect``."""
    diffs = [
        f"{k}: {where} has {getattr(got, k)!r}, the preset expects {getattr(expect, k)!r}"
        for k in VAEConfig.model_fields
        if getattr(got, k) != getattr(expect, k)
    ]
    if diffs:
        raise ConfigError("VAE config mismatch:\n  " + "\n  ".join(diffs))


def _load_state_dict(path: Path) -> dict[str, Tensor]:
    if (path / WEIGHTS_NAME).is_file():
        return load_file(path / WEIGHTS_NAME)
    if (path / WEIGHTS_INDEX_NAME).is_file():  # sharded checkpoint
        shards = sorted(set(json.loads((path / WEIGHTS_INDEX_NAME).read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise FileNotFoundError(f"VAE checkpoint {path}: shards {missing} named in {WEIGHTS_INDEX_NAME} are missing")
        return {k: v for s in shards for k, v in load_file(path / s).items()}
    raise FileNotFoundError(
        f"VAE checkpoint {path}: no {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME}); point at a diffusers "
        "AutoencoderKLWan directory such as Wan2.2-TI2V-5B-Diffusers/vae"
    )


class StreamingDecoder:
    """Decodes normalised latents chunk by chunk, keeping the causal conv cache between calls.

    Chunks of any length concatenate to exactly the whole-video decode. The cache is this
    object's own (not the module's shared ``_feat_map``), so several decoders can run at once.
    """

    def __init__(self, vae: "WanVAE", clamp: bool = True, frames_per_call: int = 1):
        if frames_per_call < 1:
            raise ValueError(f"frames_per_call must be >= 1, got {frames_per_call}")
        self.vae, self.clamp, self.frames_per_call = vae, clamp, frames_per_call
        self.reset()

    def reset(self) -> None:
        n = sum(isinstance(m, WanCausalConv3d) for m in self.vae.model.decoder.modules())
        self.feat_cache: list = [None] * n
        self.first = True  # the first latent frame decodes to one pixel frame, the rest to 4 each

    def decode(self, latents: Tensor) -> Tensor:
        return self.decode_raw(self.vae.denormalize(latents))

    def decode_raw(self, z: Tensor) -> Tensor:
        model = self.vae.model
        x = model.post_quant_conv(z.to(self.vae.dtype))  # 1x1x1: no temporal state to carry
        outs = []
        # By default one latent frame per decoder call, as diffusers' _decode does: it bounds activation
        # memory at full resolution and stays bitwise equal to diffusers. The very first frame must go
        # alone (first_chunk / the "Rep" cache marker); later ones may go ``frames_per_call`` at a time
        # (the causal convs and temporal upsamplers take any chunk length): larger convolutions keep a
        # big GPU busier, equal to the frame-by-frame decode up to float rounding.
        i = 0
        while i < x.shape[2]:
            n = 1 if self.first else self.frames_per_call
            outs.append(self.decode_chunk(x[:, :, i : i + n], self.first))
            self.first = False
            i += n
        out = torch.cat(outs, dim=2)
        if model.config.patch_size is not None:
            out = unpatchify(out, patch_size=model.config.patch_size)
        return out.clamp(-1.0, 1.0) if self.clamp else out

    def decode_chunk(self, x: Tensor, first: bool) -> Tensor:
        """One decoder call on ``x`` (after ``post_quant_conv``), carrying the causal cache; ``first``: the video's
        first chunk. Another decoder forward over the same weights overrides this (``longlive.inference.fast_vae``)."""
        return self.vae.model.decoder(x, feat_cache=self.feat_cache, feat_idx=[0], first_chunk=first)


class WanVAE(nn.Module):
    """Wan causal video VAE. Videos are (B, 3, T, H, W) in [-1, 1] with T = 1 + 4k."""

    def __init__(self, cfg: VAEConfig, model: AutoencoderKLWan | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = model if model is not None else AutoencoderKLWan(**diffusers_kwargs(cfg))

    @property
    def z_dim(self) -> int:
        return self.cfg.z_dim

    @property
    def temporal_compression(self) -> int:
        return self.cfg.temporal_compression

    @property
    def spatial_compression(self) -> int:
        return self.cfg.spatial_compression

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # latent statistics live in the diffusers config so save_pretrained keeps them

    def latent_stats(self, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        c = self.model.config
        shape = (1, self.z_dim, 1, 1, 1)
        mean = torch.tensor(c.latents_mean, dtype=torch.float32, device=device).view(shape)
        std = torch.tensor(c.latents_std, dtype=torch.float32, device=device).view(shape)
        return mean, std

    def set_latent_stats(self, mean: Tensor, std: Tensor) -> None:
        mean, std = mean.detach().float().flatten().cpu(), std.detach().float().flatten().cpu()
        if mean.numel() != self.z_dim or std.numel() != self.z_dim:
            raise ValueError(f"latent stats need {self.z_dim} values each, got {mean.numel()} and {std.numel()}")
        if not (std > 0).all():
            raise ValueError("latent std must be positive")
        self.model.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())

    def normalize(self, z: Tensor) -> Tensor:
        mean, std = self.latent_stats(z.device)
        return ((z.float() - mean) / std).to(z.dtype)

    def denormalize(self, latents: Tensor) -> Tensor:
        mean, std = self.latent_stats(latents.device)
        return (latents.float() * std + mean).to(latents.dtype)

    # encode / decode

    def encode_dist(self, video: Tensor) -> DiagonalGaussianDistribution:
        """Raw (unnormalised) posterior, for training the VAE."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be (B, 3, T, H, W), got {tuple(video.shape)}")
        t, h, w = video.shape[2:]
        if (t - 1) % ENCODE_GROUP:
            # diffusers would silently drop the trailing frames
            raise ValueError(f"video has {t} frames; the causal VAE needs 1 + {ENCODE_GROUP}k")
        if h % self.spatial_compression or w % self.spatial_compression:
            raise ValueError(f"video {h}x{w} must be a multiple of {self.spatial_compression}")
        return self.model.encode(video.to(self.device, self.dtype)).latent_dist  # frames come from the CPU loader

    def encode(self, video: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Normalised latents ``(z - mean) / std``: the posterior mean, or a sample."""
        dist = self.encode_dist(video)
        z = dist.sample(generator=generator) if sample else dist.mode()
        return self.normalize(z)

    def decode_raw(self, z: Tensor, clamp: bool = True) -> Tensor:
        """Raw latents -> video. ``clamp=False`` keeps gradients alive outside [-1, 1] for training."""
        return StreamingDecoder(self, clamp=clamp).decode_raw(z)

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents -> video (B, 3, T, H, W) in [-1, 1]."""
        return self.decode_raw(self.denormalize(latents))

    def streaming_decoder(self, clamp: bool = True, frames_per_call: int = 1) -> StreamingDecoder:
        return StreamingDecoder(self, clamp=clamp, frames_per_call=frames_per_call)

    # diffusers-layout checkpoints

    def save_pretrained(self, path: str | os.PathLike) -> None:
        with atomic_dir(path) as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        expect: VAEConfig | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> "WanVAE":
        """Load a diffusers ``AutoencoderKLWan`` directory (ours, or e.g. ``Wan2.2-TI2V-5B-Diffusers/vae``).

        With ``expect``, raise :class:`ConfigError` naming each field where the checkpoint differs.
        """
        path = Path(path)
        raw = read_diffusers_config(path)
        try:
            cfg = vae_config_from_diffusers(raw)
        except ValueError as e:  # pydantic's ValidationError and ConfigError both are
            raise ConfigError(f"{path / CONFIG_NAME} is not a supported Wan VAE config: {e}") from e
        if expect is not None:
            check_vae_config(cfg, expect, where=str(path))
        state = _load_state_dict(path)

        known = inspect.signature(AutoencoderKLWan.__init__).parameters
        kwargs = {k: v for k, v in raw.items() if k in known and k != "self"}
        for key in ("latents_mean", "latents_std"):
            if len(kwargs.get(key, [])) != cfg.z_dim:
                raise ConfigError(f"{path / CONFIG_NAME}: {key} needs z_dim = {cfg.z_dim} values")
        with torch.device("meta"):  # skip random init; every tensor comes from the checkpoint
            model = AutoencoderKLWan(**kwargs)

        _check_keys(path, model.state_dict(), state)
        # cast the tensors, not the module: ModelMixin.to(dtype) logs a keep-in-fp32 warning
        model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
        return cls(cfg, model.eval())


def _check_keys(path: Path, expected: dict[str, Tensor], state: dict[str, Tensor]) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)}, config {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{name} ({len(keys)}): {keys[:8]}{' ...' if len(keys) > 8 else ''}"
        for name, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if keys
    ]
    if problems:
        raise ValueError(f"VAE checkpoint {path} does not match its {CONFIG_NAME}:\n  " + "\n  ".join(problems))


def read_diffusers_config(path: str | os.PathLike) -> dict:
    """The ``config.json`` of a diffusers ``AutoencoderKLWan`` directory, with clear errors."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"VAE checkpoint directory {path} does not exist")
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"VAE checkpoint {path}: no {CONFIG_NAME}; expected a diffusers AutoencoderKLWan directory"
        )
    raw = json.loads((path / CONFIG_NAME).read_text())
    if raw.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        raise ConfigError(f"{path / CONFIG_NAME}: _class_name is {raw['_class_name']!r}, expected 'AutoencoderKLWan'")
    return raw
