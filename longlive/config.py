"""Typed configuration: one source of truth built from a preset in ``params.yaml``.

``params.yaml`` holds ``preset: <name>`` and ``presets: {name: {...}}``. A preset changes sizes,
never code paths. Everything is validated at load; a bad value raises :class:`ConfigError` whose
message names the full key (``presets.tiny.dit.num_heads``) and what is expected.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"
PRESET_ENV = "LONGLIVE_PRESET"
PARAMS_ENV = "LONGLIVE_PARAMS"


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the key and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VideoConfig(_Strict):
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    num_frames: int = Field(gt=0, description="pixel frames per training clip; 1 + 4k for the causal VAE")
    fps: int = Field(gt=0, le=240)


class VAEConfig(_Strict):
    """Sizes of the Wan-style causal VAE (diffusers ``AutoencoderKLWan`` arguments)."""

    base_dim: int = Field(gt=0)
    decoder_base_dim: int = Field(gt=0)
    z_dim: int = Field(gt=0)
    dim_mult: list[int] = Field(min_length=2)
    num_res_blocks: int = Field(gt=0)
    temperal_downsample: list[bool]
    is_residual: bool = True
    patch_size: int = Field(ge=1)
    compression: tuple[int, int, int] = Field(description="declared (t, h, w) compression; checked against the sizes")

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.dim_mult) - 1) * self.patch_size

    @model_validator(mode="after")
    def _check(self) -> "VAEConfig":
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temperal_downsample needs len(dim_mult) - 1 = {len(self.dim_mult) - 1} entries, "
                f"got {len(self.temperal_downsample)}"
            )
        if self.dim_mult[-1] != self.dim_mult[-2]:
            raise ValueError("the last two dim_mult entries must be equal (the last stage does not downsample)")
        derived = (self.temporal_compression, self.spatial_compression, self.spatial_compression)
        if tuple(self.compression) != derived:
            raise ValueError(f"compression {list(self.compression)} does not match the sizes, which give {list(derived)}")
        return self


class TextConfig(_Strict):
    """``tiny``: the built-in word-level encoder; ``umt5``: UMT5 through transformers from ``path``."""

    kind: Literal["tiny", "umt5"]
    max_tokens: int = Field(gt=0, le=4096)
    dim: int = Field(gt=0, description="width of the text embeddings the DiT cross-attends to")
    num_layers: int = Field(default=2, ge=0)
    num_heads: int = Field(default=4, gt=0)
    path: str | None = Field(default=None, description="local UMT5 directory (umt5 only); nothing downloads")

    @model_validator(mode="after")
    def _check(self) -> "TextConfig":
        if self.kind == "tiny" and self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} must be divisible by num_heads {self.num_heads}")
        return self


class DiTConfig(_Strict):
    """Sizes of the Wan2.2 DiT. Wan2.2-TI2V-5B: 30 layers, dim 3072, 24 heads, ffn 14336."""

    num_layers: int = Field(gt=0)
    dim: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    ffn_dim: int = Field(gt=0)
    freq_dim: int = Field(gt=0)
    patch_size: tuple[int, int, int]
    eps: float = Field(default=1e-6, gt=0)
    cross_attn_norm: bool = True
    rope_max_seq_len: int = Field(default=1024, gt=0)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @model_validator(mode="after")
    def _check(self) -> "DiTConfig":
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} must be divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if any(p < 1 for p in self.patch_size):
            raise ValueError(f"patch_size {list(self.patch_size)} must be positive")
        return self


class SynthConfig(_Strict):
    num_videos: int = Field(gt=0)
    multishot_fraction: float = Field(ge=0.0, le=1.0)
    seed: int = 0
    min_radius: int = Field(gt=0)
    max_radius: int = Field(gt=0)

    @model_validator(mode="after")
    def _check(self) -> "SynthConfig":
        if self.max_radius < self.min_radius:
            raise ValueError(f"max_radius {self.max_radius} < min_radius {self.min_radius}")
        return self


class TrainConfig(_Strict):
    steps: int = Field(ge=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    log_every: int = Field(default=10, gt=0)


class BaseConfig(_Strict):
    """The ``base`` stage: train the tiny VAE and teacher, or convert Wan2.2 weights from ``weights``."""

    vae: TrainConfig
    dit: TrainConfig
    kl_weight: float = Field(default=1e-6, ge=0)
    timestep_shift: float = Field(gt=0)
    weights: str | None = Field(default=None, description="local Wan2.2 diffusers directory (real presets)")


class EncodeConfig(_Strict):
    url: str = Field(min_length=1, description="local path or s3:// prefix of the shards")
    samples_per_shard: int = Field(gt=0)


class ValidateConfig(_Strict):
    latent_mean_abs_max: float = Field(gt=0)
    latent_std_min: float = Field(gt=0)
    latent_std_max: float = Field(gt=0)


def _check_denoising_steps(steps: list[int]) -> None:
    if any(not 0 < t <= 1000 for t in steps):
        raise ValueError(f"denoising_steps {steps} must lie in (0, 1000]")
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"denoising_steps {steps} must be strictly decreasing")


class EMAConfig(_Strict):
    """Exponential moving average of the weights; the EMA weights are what a trainer exports."""

    decay: float = Field(default=0.99, gt=0, lt=1)
    start_step: int = Field(default=0, ge=0, description="before this step the EMA just copies the weights")


class ARVariantConfig(_Strict):
    """One ``train_ar`` variant (an item of the DVC ``foreach``)."""

    i2v: bool = Field(default=False, description="latent frame 0 is the clean image latent: t=0, no loss")
    independent_first_frame: bool = Field(default=False, description="latent frame 0 is a block of its own")


class ARConfig(_Strict):
    """``train_ar``: block-causal teacher forcing, the student initialised from the base teacher."""

    train: TrainConfig
    block_frames: int = Field(gt=0, description="latent frames per causal block")
    timestep_shift: float = Field(gt=0)
    denoising_steps: list[int] = Field(min_length=1, description="timesteps in (0, 1000], before the shift")
    timestep_sampling: Literal["steps", "uniform"] = Field(
        default="steps", description="steps: each block draws one of denoising_steps; uniform: shifted U(0, 1)"
    )
    caption_dropout: float = Field(default=0.1, ge=0, le=1)
    ema: EMAConfig = EMAConfig()
    grad_clip: float = Field(default=1.0, gt=0)
    grad_accum: int = Field(default=1, ge=1, description="micro-batches of train.batch_size per optimizer step")
    precision: Literal["auto", "bf16", "fp32"] = Field(default="auto", description="auto: bf16 autocast on CUDA")
    ckpt_every: int = Field(default=50, gt=0)
    shards_in_memory: int | None = Field(
        default=None, ge=1, description="None: load every shard once; k: stream, holding k shards (a batch per shard)"
    )
    variants: dict[str, ARVariantConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "ARConfig":
        _check_denoising_steps(self.denoising_steps)
        for name in self.variants:
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"variant name {name!r} must be letters, digits, '-' or '_' (it names folders)")
        return self


class TrackingConfig(_Strict):
    """Experiment tracking (wandb). ``WANDB_MODE`` in the environment overrides ``wandb_mode``."""

    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "longlive"


class InferenceConfig(_Strict):
    """Streaming generation (``longlive generate``): the chunk loop, KV cache, sinks and decoding.

    ``denoising_steps`` are timesteps in (0, 1000] before the shift: step t runs at sigma
    ``shift_sigma(t / 1000, timestep_shift)`` (Self-Forcing's warped step list).
    """

    block_frames: int = Field(gt=0, description="latent frames generated per chunk")
    denoising_steps: list[int] = Field(min_length=1, description="timesteps in (0, 1000], before the shift")
    timestep_shift: float = Field(gt=0)
    sampler: Literal["renoise", "euler"] = Field(
        default="renoise", description="renoise: x0 then fresh noise at the next sigma (few-step students); euler: ODE step"
    )
    independent_first_frame: bool = Field(default=True, description="I2V: the image latent is a block of its own")
    sink_frames: int = Field(ge=0, description="first latent frames (of the video, or of the shot) always kept")
    window_frames: int = Field(ge=0, description="most recent latent frames kept besides the sink")
    multishot_sink: bool = Field(default=True, description="re-anchor the sink to each new shot's first frames")
    multishot_rope_offset: int = Field(default=0, ge=0, description="extra RoPE frames between shots")
    recache_on_switch: bool = Field(default=True, description="recompute the cached K/V under a new prompt")
    guidance_scale: float = Field(default=1.0, ge=0, description="classifier-free guidance; 1 = off")
    vae_device: str = Field(default="auto", description="device of the VAE decoder; auto = the DiT's")
    async_decode: bool = Field(default=True, description="decode block k in a thread while block k+1 denoises")

    @model_validator(mode="after")
    def _check(self) -> "InferenceConfig":
        _check_denoising_steps(self.denoising_steps)
        return self


class Preset(_Strict):
    name: str
    seed: int = 0
    device: str = "auto"
    video: VideoConfig
    vae: VAEConfig
    text: TextConfig
    dit: DiTConfig
    synth: SynthConfig
    base: BaseConfig
    encode: EncodeConfig
    validate_: ValidateConfig = Field(alias="validate")
    ar: ARConfig
    tracking: TrackingConfig = TrackingConfig()
    inference: InferenceConfig

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(channels, frames, height, width) of one clip's latents."""
        v = self.video
        return (
            self.vae.z_dim,
            (v.num_frames - 1) // self.vae.temporal_compression + 1,
            v.height // self.vae.spatial_compression,
            v.width // self.vae.spatial_compression,
        )

    @model_validator(mode="after")
    def _check(self) -> "Preset":
        tc, sc = self.vae.temporal_compression, self.vae.spatial_compression
        if (self.video.num_frames - 1) % tc:
            raise ValueError(f"video.num_frames {self.video.num_frames} must be 1 + {tc}k for the causal VAE")
        pt, ph, pw = self.dit.patch_size
        for key, size, mult in (("height", self.video.height, sc * ph), ("width", self.video.width, sc * pw)):
            if size % mult:
                raise ValueError(f"video.{key} {size} must be a multiple of {mult} (VAE {sc} x DiT patch)")
        if self.latent_shape[1] % pt:
            raise ValueError(f"latent frames {self.latent_shape[1]} must be a multiple of dit.patch_size[0] {pt}")
        if self.synth.max_radius * 2 >= min(self.video.height, self.video.width):
            raise ValueError("synth.max_radius is too large for the frame; lower it or enlarge video")
        return self

    @model_validator(mode="after")
    def _check_ar(self) -> "Preset":
        if self.dit.patch_size[0] != 1:
            raise ValueError(f"ar: causal blocks need dit.patch_size[0] = 1, got {self.dit.patch_size[0]}")
        if self.ar.block_frames > self.latent_shape[1]:
            raise ValueError(f"ar.block_frames {self.ar.block_frames} exceeds the {self.latent_shape[1]} latent frames of a clip")
        return self


def _format_error(err: ValidationError, prefix: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p != "__root__")
        key = f"{prefix}.{loc}" if loc else prefix
        lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})" if e["type"] != "missing" else f"{key}: missing")
    return "invalid configuration in params.yaml:\n  " + "\n  ".join(lines)


def load_params(path: str | os.PathLike | None = None) -> dict:
    path = Path(path or os.environ.get(PARAMS_ENV) or DEFAULT_PARAMS)
    if not path.is_file():
        raise ConfigError(f"params file {path} not found; run from the repo root or set {PARAMS_ENV}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict) or "presets" not in data:
        raise ConfigError(f"{path}: expected a mapping with a 'presets' key")
    return data


def load_preset(name: str | None = None, path: str | os.PathLike | None = None) -> Preset:
    """Load and validate one preset. ``name`` defaults to $LONGLIVE_PRESET, then ``preset:`` in the file."""
    data = load_params(path)
    name = name or os.environ.get(PRESET_ENV) or data.get("preset") or "tiny"
    presets = data["presets"]
    if name not in presets:
        raise ConfigError(f"preset: unknown preset {name!r}; choose one of {sorted(presets)}")
    raw = dict(presets[name] or {})
    raw.setdefault("name", name)
    try:
        return Preset.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(e, f"presets.{name}")) from None
