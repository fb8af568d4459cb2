"""Typed configuration: one source of truth built from a preset in ``params.yaml``.

``params.yaml`` holds ``preset: <name>``, ``presets: {name: {...}}`` with that preset alone and ``dag`` (the
stage items it builds), as ``dvc exp run`` composes it from ``conf/preset/<name>.yaml``; the other named
presets are read from there. A preset changes sizes, never code paths. Everything is validated at load; a
bad value raises :class:`ConfigError` whose message names the full key (``presets.tiny.dit.num_heads``) and
what is expected.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from longlive.dag import DagError, dag_section
from longlive.secrets import (
    REDACTED,
    SECRET_FIX,
    SecretInParamsError,
    check_no_secrets,
    is_secret_key,
    redact,
    redact_options,
)

DEFAULT_PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"
PRESET_ENV = "LONGLIVE_PRESET"   # may only repeat params.yaml's preset (recorded_preset)
PARAMS_ENV = "LONGLIVE_PARAMS"
PRESETS_DIR = Path("conf") / "preset"   # the named presets, beside params.yaml; DVC composes params.yaml from them


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the key and the fix."""


class _Strict(BaseModel):
    # A ValidationError printed as is (callers that re-validate a section) must not echo a value: it may be a
    # credential that was refused. _format_error shows inputs, redacted, for load_preset's ConfigError.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class VideoConfig(_Strict):
    height: StrictInt = Field(gt=0)
    width: StrictInt = Field(gt=0)
    num_frames: StrictInt = Field(gt=0, description="pixel frames per training clip; 1 + 4k for the causal VAE")
    fps: StrictInt = Field(gt=0, le=240)


class VAEConfig(_Strict):
    """Sizes of the Wan-style causal VAE (diffusers ``AutoencoderKLWan`` arguments)."""

    base_dim: StrictInt = Field(gt=0)
    decoder_base_dim: StrictInt = Field(gt=0)
    z_dim: StrictInt = Field(gt=0)
    dim_mult: list[StrictInt] = Field(min_length=2)
    num_res_blocks: StrictInt = Field(gt=0)
    temperal_downsample: list[StrictBool]
    is_residual: StrictBool = True
    patch_size: StrictInt = Field(ge=1)
    compression: tuple[StrictInt, StrictInt, StrictInt] = Field(description="declared (t, h, w) compression; checked against the sizes")

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
    max_tokens: StrictInt = Field(gt=0, le=4096)
    dim: StrictInt = Field(gt=0, description="width of the text embeddings the DiT cross-attends to")
    num_layers: StrictInt = Field(default=2, ge=0)
    num_heads: StrictInt = Field(default=4, gt=0)
    path: str | None = Field(default=None, description="local UMT5 directory (umt5 only); nothing downloads")

    @model_validator(mode="after")
    def _check(self) -> "TextConfig":
        if self.kind == "tiny" and self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} must be divisible by num_heads {self.num_heads}")
        return self


class DiTConfig(_Strict):
    """Sizes of the Wan2.2 DiT. Wan2.2-TI2V-5B: 30 layers, dim 3072, 24 heads, ffn 14336."""

    num_layers: StrictInt = Field(gt=0)
    dim: StrictInt = Field(gt=0)
    num_heads: StrictInt = Field(gt=0)
    ffn_dim: StrictInt = Field(gt=0)
    freq_dim: StrictInt = Field(gt=0)
    patch_size: tuple[StrictInt, StrictInt, StrictInt]
    eps: StrictFloat = Field(default=1e-6, gt=0)
    cross_attn_norm: StrictBool = True
    rope_max_seq_len: StrictInt = Field(default=1024, gt=0)

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
    num_videos: StrictInt = Field(gt=0)
    multishot_fraction: StrictFloat = Field(ge=0.0, le=1.0)
    seed: StrictInt = 0
    min_radius: StrictInt = Field(gt=0)
    max_radius: StrictInt = Field(gt=0)

    @model_validator(mode="after")
    def _check(self) -> "SynthConfig":
        if self.max_radius < self.min_radius:
            raise ValueError(f"max_radius {self.max_radius} < min_radius {self.min_radius}")
        return self


class TrainConfig(_Strict):
    steps: StrictInt = Field(ge=0)
    batch_size: StrictInt = Field(gt=0)
    lr: StrictFloat = Field(gt=0)
    log_every: StrictInt = Field(default=10, gt=0)


class BaseConfig(_Strict):
    """The ``base`` stage: train the tiny VAE and teacher, or convert Wan2.2 weights from ``weights``."""

    vae: TrainConfig
    dit: TrainConfig
    kl_weight: StrictFloat = Field(default=1e-6, ge=0)
    timestep_shift: StrictFloat = Field(gt=0)
    weights: str | None = Field(default=None, description="local Wan2.2 diffusers directory (real presets)")


class LightDecoderDistillConfig(_Strict):
    """The ``distill_decoder`` stage: the light decoder learns the full VAE decoder's output on the encoded latents."""

    train: TrainConfig
    gt_weight: StrictFloat = Field(default=0.1, ge=0, description="weight of an L1 term against the real frames, beside "
                             "L1 + L2 against the VAE's decode")
    eval_clips: StrictInt = Field(default=8, ge=1, description="the first clips (key order) are held out for the PSNRs "
                            "(base holds the first synth.num_videos // 12 out of the VAE's training too)")
    latent_crop: tuple[StrictInt, StrictInt, StrictInt] | None = Field(
        default=None, description="(frames, height, width) in latents: train on each clip's first `frames` latent "
        "frames and a random window, against the same window of the VAE's full-frame decode; None: whole clips")
    cache: StrictBool = Field(default=True, description="keep each training clip's VAE decode and frames in memory "
                        "(small datasets); false: decode every batch")
    precision: Literal["auto", "bf16", "fp32"] = Field(default="auto", description="auto: bf16 autocast on CUDA")
    ckpt_every: StrictInt = Field(default=100, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "LightDecoderDistillConfig":
        if self.latent_crop is not None and min(self.latent_crop) < 1:
            raise ValueError(f"latent_crop {list(self.latent_crop)} must be positive")
        return self


class LightDecoderConfig(_Strict):
    """Sizes of the light causal decoder (``longlive.models.light_decoder``, TAEHV's design), ``inference.decoder:
    light``. Stage k: ``blocks[k]`` MemBlocks at ``channels[k]``, then a nearest 2x upsampling where
    ``spatial_upsample[k]``, a TGrow(2) where ``temporal_upsample[k]``, and a conv to ``channels[k + 1]``; the head
    pixel-shuffles by ``patch_size``. Its upsampling must equal ``vae.compression`` (checked with the preset)."""

    channels: list[StrictInt] = Field(min_length=2, description="width of each stage, then of the output head")
    blocks: list[StrictInt] = Field(min_length=1, description="MemBlocks per stage: len(channels) - 1 entries")
    spatial_upsample: list[StrictBool]
    temporal_upsample: list[StrictBool]
    patch_size: StrictInt = Field(default=1, ge=1, description="pixel shuffle of the output head")
    distill: LightDecoderDistillConfig | None = Field(default=None, description="distill_decoder's settings")

    @property
    def temporal_upsampling(self) -> int:
        return 2 ** sum(self.temporal_upsample)

    @property
    def spatial_upsampling(self) -> int:
        return 2 ** sum(self.spatial_upsample) * self.patch_size

    def sizes(self) -> dict:
        """The fields that shape the model (what a checkpoint records)."""
        return self.model_dump(exclude={"distill"})

    @model_validator(mode="after")
    def _check(self) -> "LightDecoderConfig":
        stages = len(self.channels) - 1
        for key in ("blocks", "spatial_upsample", "temporal_upsample"):
            if len(getattr(self, key)) != stages:
                raise ValueError(f"{key} needs len(channels) - 1 = {stages} entries (one per stage), "
                                 f"got {len(getattr(self, key))}")
        if min(self.channels) < 1 or min(self.blocks) < 0:
            raise ValueError(f"channels {self.channels} must be positive and blocks {self.blocks} >= 0")
        return self


def _no_credentials(value: Any) -> Any:
    """Params are printed, recorded in dvc.lock and published: refuse credentials (keys of options, URL
    user-info) there, so they come from the environment or a named profile (``longlive.secrets``)."""
    check_no_secrets(value, "")
    return value


class EncodeConfig(_Strict):
    """The ``encode`` stage (``longlive.data.encode``): clips -> VAE latents + caption embeddings in shards; under
    torchrun every process encodes its share of the clips on its own GPU (docs/ingest.md, "Encoding on GPUs")."""

    url: str = Field(min_length=1, description="local path or s3:// prefix of the shards")
    samples_per_shard: StrictInt = Field(gt=0)
    batch_size: StrictInt = Field(default=4, gt=0, description="clips per VAE call")
    dtype: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="weights and compute of the VAE (and UMT5): auto = bf16 on CUDA, fp32 elsewhere")
    workers: StrictInt = Field(default=0, ge=0, description="DataLoader processes reading clips; 0: the main process")
    prefetch: StrictInt = Field(default=2, ge=1, description="batches each reader process keeps ready")
    nproc: StrictInt | Literal["auto"] = Field(
        default=1, description="encoding processes on this machine (torchrun, one GPU each): auto = one per CUDA "
        "device; under a torchrun you start yourself, torchrun's count")

    @field_validator("nproc")
    @classmethod
    def _check_nproc(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"nproc must be >= 1 or auto, got {v}")
        return v

    _check_url = field_validator("url")(_no_credentials)


class DataConfig(_Strict):
    """Where the training clips come from: ``synth`` (the shapes domain the synth stage draws) or the user's own
    videos, which the ``ingest`` stage decodes and clips (``longlive.data.ingest``; README, "Your own videos")."""

    source: str | None = Field(default="synth", min_length=1, description="synth, or a folder / fsspec URL "
                               "(s3://bucket/videos) of mp4/webm/mov/mkv files and video webdataset tars; null: not "
                               "set yet (a stage that reads clips says which key to set)")
    captions: str | None = Field(default=None, description="caption manifest (.jsonl or .csv, a path or URL); null: a .txt "
                                 "beside each video (webdataset samples carry their own txt/json)")
    storage_options: dict = Field(default_factory=dict, description="fsspec options, e.g. {endpoint_url: ...}; "
                                  "credentials come from the environment")
    clip_stride: StrictFloat | None = Field(default=None, gt=0, description="seconds between clip starts; null: back to back")
    max_clips_per_video: StrictInt = Field(default=8, ge=1)
    scene_detect: StrictBool = Field(default=True, description="find cuts with PySceneDetect where the manifest gives no shots")
    scene_threshold: StrictFloat = Field(default=27.0, gt=0, description="ContentDetector threshold (its default)")
    max_upscale: StrictFloat = Field(default=1.0, ge=1.0, description="1: a video smaller than the frame is rejected")
    black_level: StrictFloat = Field(default=12.0, ge=0, description="a clip whose mean luma (0-255) is lower is black")
    static_level: StrictFloat = Field(default=0.5, ge=0, description="a clip whose mean frame difference (0-255) is lower is static")
    ray_address: str | None = Field(default=None, description="a Ray cluster to run on; null: $RAY_ADDRESS, else a local Ray")
    num_cpus: StrictInt = Field(default=2, ge=1, description="CPUs of the local Ray (ignored on a cluster)")
    workers: StrictInt | None = Field(default=None, ge=1, description="videos decoded at once; null: one per Ray CPU")

    _check_credentials = field_validator("source", "captions", "storage_options", "ray_address")(_no_credentials)

    @property
    def is_synth(self) -> bool:
        return self.source == "synth"

    def require_source(self, preset: str) -> str:
        """``source``, or a :class:`ConfigError` naming the key to set (real presets leave it empty)."""
        if self.source is None:
            raise ConfigError(f"presets.{preset}.data.source is not set: point it at a folder or s3:// URL of your "
                              "videos (and data.captions at their captions; README, \"Your own videos\"), or set it "
                              "to synth for the synthetic shapes")
        return self.source


class ValidateConfig(_Strict):
    latent_mean_abs_max: StrictFloat = Field(gt=0)
    latent_std_min: StrictFloat = Field(gt=0)
    latent_std_max: StrictFloat = Field(gt=0)


def _check_denoising_steps(steps: list[int]) -> None:
    if any(not 0 < t <= 1000 for t in steps):
        raise ValueError(f"denoising_steps {steps} must lie in (0, 1000]")
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"denoising_steps {steps} must be strictly decreasing")


class EMAConfig(_Strict):
    """Exponential moving average of the weights; the EMA weights are what a trainer exports."""

    decay: StrictFloat = Field(default=0.99, gt=0, lt=1)
    start_step: StrictInt = Field(default=0, ge=0, description="before this step the EMA just copies the weights")


class ARVariantConfig(_Strict):
    """One ``train_ar`` variant (an item of the DVC ``foreach``)."""

    i2v: StrictBool = Field(default=False, description="latent frame 0 is the clean image latent: t=0, no loss")
    independent_first_frame: StrictBool = Field(default=False, description="latent frame 0 is a block of its own")


class LoRAConfig(_Strict):
    """LoRA adapters (``longlive.models.lora``) on the DiT's projections; trained alone, base frozen."""

    rank: StrictInt = Field(gt=0)
    alpha: StrictFloat = Field(gt=0, description="the update is scaled by alpha / rank")
    targets: list[str] = Field(
        default_factory=lambda: ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out",
                                 "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out",
                                 "ffn.linear_1", "ffn.linear_2"],
        min_length=1, description="suffixes of nn.Linear module names",
    )


class ARConfig(_Strict):
    """``train_ar``: block-causal teacher forcing, the student initialised from the base teacher."""

    train: TrainConfig
    block_frames: StrictInt = Field(gt=0, description="latent frames per causal block")
    timestep_shift: StrictFloat = Field(gt=0)
    denoising_steps: list[StrictInt] = Field(min_length=1, description="timesteps in (0, 1000], before the shift")
    timestep_sampling: Literal["steps", "uniform"] = Field(
        default="steps", description="steps: each block draws one of denoising_steps; uniform: shifted U(0, 1)"
    )
    caption_dropout: StrictFloat = Field(default=0.1, ge=0, le=1)
    sink_frames: StrictInt = Field(
        default=0, ge=0, description="with window_frames: the first latent frames of the (anchor) shot every block sees"
    )
    window_frames: StrictInt | None = Field(
        default=None, ge=0,
        description="None: a block sees all earlier blocks; k: only the sink and the k latest earlier frames "
        "(the inference cache's view, so long clips teach the student to stream)",
    )
    multishot_sink: StrictBool = Field(default=True, description="the sink is the current shot's first frames, as at inference")
    lora: LoRAConfig | None = Field(default=None, description="train LoRA adapters instead of all weights")
    ema: EMAConfig = EMAConfig()
    grad_clip: StrictFloat = Field(default=1.0, gt=0)
    grad_accum: StrictInt = Field(default=1, ge=1, description="micro-batches of train.batch_size per optimizer step")
    precision: Literal["auto", "bf16", "fp32"] = Field(default="auto", description="auto: bf16 autocast on CUDA")
    activation_checkpointing: StrictBool = Field(default=False, description="recompute each block's activations in "
                                                 "backward (the 5B teacher-forcing step does not fit a GPU without)")
    compile: StrictBool = Field(default=False, description="torch.compile each DiT block (fuses the elementwise work "
                                "around matmuls and attention; CUDA)")
    optimizer: Literal["adamw", "adamw8bit"] = Field(default="adamw", description="adamw8bit: torchao's 8-bit "
                                                     "moments, 2 instead of 8 bytes of state per parameter")
    data_workers: StrictInt = Field(default=0, ge=0, description="DataLoader worker processes that build batches "
                                    "(shard reads, noise) ahead of the step; 0: in the training thread. The batches "
                                    "are the same either way (longlive.train.prefetch)")
    ckpt_every: StrictInt = Field(default=50, gt=0)
    shards_in_memory: StrictInt | None = Field(
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


class DMDConfig(_Strict):
    """``train_dmd``: distribution matching distillation of the AR student into few-step students.

    The generator (initialised from the AR export of the same variant) rolls out clips block by block
    with its own KV cache (self-forcing); the frozen base teacher is the real score (with CFG), a
    critic initialised from it is the fake score, trained on the generator's samples.
    """

    train: TrainConfig
    critic_lr: StrictFloat | None = Field(default=None, gt=0, description="None: train.lr")
    critic_updates: StrictInt = Field(default=5, ge=1, description="critic updates per generator update")
    guidance_scale: StrictFloat = Field(default=3.0, ge=1, description="classifier-free guidance of the real score")
    timestep_shift: StrictFloat = Field(gt=0)
    min_timestep: StrictFloat = Field(default=20, ge=0, lt=1000, description="DMD noise levels t ~ U(min, max), then shifted")
    max_timestep: StrictFloat = Field(default=980, gt=0, le=1000)
    students: dict[str, list[StrictInt]] = Field(
        min_length=1, description="student name -> denoising step list, e.g. {4step: [1000, 750, 500, 250]}")
    variants: list[str] = Field(min_length=1, description="ar.variants to distil (t2v, i2v)")
    prompts: str | None = Field(
        default=None, min_length=1,
        description="the prompt corpus DMD draws from: a .txt (one per line) or .jsonl file, a path or fsspec URL "
        "(longlive.data.prompts); data/encoded/prompts.jsonl is the training captions encode writes; "
        "null: the training clips' first-shot captions, drawn with the clips",
    )
    tf_weight: StrictFloat = Field(
        default=0.0, ge=0,
        description="weight of a data term on generator steps: the AR teacher-forcing loss at the student's "
        "step list (0: pure DMD). It keeps what AR training learned from data where the teacher is weak",
    )
    lora: LoRAConfig | None = Field(default=None, description="train LoRA adapters; the export keeps them apart")
    qat_students: list[str] = Field(
        default_factory=list, description="students that also get an NVFP4 QAT fine-tune (train_qat stage)")
    qat_steps: StrictInt = Field(default=50, ge=1, description="DMD steps of the QAT fine-tune")
    ema: EMAConfig = EMAConfig()
    grad_clip: StrictFloat = Field(default=1.0, gt=0)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    frozen_dtype: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="dtype of the frozen teacher: auto = bf16 on CUDA, fp32 elsewhere")
    activation_checkpointing: StrictBool = Field(default=False, description="recompute the critic's block activations in "
                                                 "backward, and the generator's cross-attention and FFN (its "
                                                 "self-attention reads the rollout's KV cache and keeps its activations)")
    compile: StrictBool = Field(default=False, description="torch.compile each block of the critic (its forward is a "
                                "plain pass; the generator's rollout runs through a KV cache and stays eager)")
    optimizer: Literal["adamw", "adamw8bit"] = Field(default="adamw", description="as ar.optimizer")
    ckpt_every: StrictInt = Field(default=50, gt=0)

    _check_prompts = field_validator("prompts")(_no_credentials)

    @model_validator(mode="after")
    def _check(self) -> "DMDConfig":
        for name, steps in self.students.items():
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"student name {name!r} must be letters, digits, '-' or '_' (it names folders)")
            _check_denoising_steps(steps)
        unknown = [q for q in self.qat_students if q not in self.students]
        if unknown:
            raise ValueError(f"qat_students {unknown} are not students ({sorted(self.students)})")
        if self.min_timestep >= self.max_timestep:
            raise ValueError(f"min_timestep {self.min_timestep} must be below max_timestep {self.max_timestep}")
        return self


class TrackingConfig(_Strict):
    """Experiment tracking (wandb). ``WANDB_MODE`` in the environment overrides ``wandb_mode``."""

    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "longlive"


class ParallelConfig(_Strict):
    """Processes of a stage and how they split the work (``longlive.parallel``; see docs/design.md).

    ``nproc * nnodes`` processes (torchrun, one per GPU); ``sp`` of them share each sample and split its
    tokens (sequence parallel), the rest are data parallel (``dp_shard = world / sp``). In training,
    weights, gradients and optimizer state are sharded over all of them (FSDP2).
    """

    nproc: StrictInt = Field(default=1, ge=1, description="processes per node (torchrun --nproc_per_node); 1 runs plainly")
    nnodes: StrictInt = Field(default=1, ge=1, description="nodes; > 1 needs LONGLIVE_RDZV_ENDPOINT for torchrun")
    sp: StrictInt = Field(default=1, ge=1, description="sequence-parallel degree; divides nproc * nnodes")
    sp_attention: Literal["ulysses", "allgather"] = Field(
        default="ulysses", description="ulysses: all-to-all to a head split (heads divide by sp); "
        "allgather: each rank attends its own queries to all-gathered K/V (any head count)",
    )
    sp_partition: Literal["spatial", "zigzag", "contiguous"] = Field(
        default="spatial", description="which tokens a rank holds: 1/sp of every frame, or whole frames "
        "(zigzag: LongLive 2.0's balanced clean+noisy block pairs; contiguous: the plain split)",
    )

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    @property
    def dp_shard(self) -> int:
        return self.world_size // self.sp

    @model_validator(mode="after")
    def _check(self) -> "ParallelConfig":
        if self.world_size % self.sp:
            raise ValueError(f"sp {self.sp} must divide nproc * nnodes = {self.world_size}")
        return self


class InferenceConfig(_Strict):
    """Streaming generation (``longlive generate``): the chunk loop, KV cache, sinks and decoding.

    ``denoising_steps`` are timesteps in (0, 1000] before the shift: step t runs at sigma
    ``shift_sigma(t / 1000, timestep_shift)`` (Self-Forcing's warped step list).
    """

    block_frames: StrictInt = Field(gt=0, description="latent frames generated per chunk")
    denoising_steps: list[StrictInt] = Field(min_length=1, description="timesteps in (0, 1000], before the shift")
    timestep_shift: StrictFloat = Field(gt=0)
    sampler: Literal["renoise", "euler"] = Field(
        default="renoise", description="renoise: x0 then fresh noise at the next sigma (few-step students); euler: ODE step"
    )
    independent_first_frame: StrictBool = Field(default=True, description="I2V: the image latent is a block of its own")
    sink_frames: StrictInt = Field(ge=0, description="first latent frames (of the video, or of the shot) always kept")
    window_frames: StrictInt = Field(ge=0, description="most recent latent frames kept besides the sink")
    multishot_sink: StrictBool = Field(default=True, description="re-anchor the sink to each new shot's first frames")
    multishot_rope_offset: StrictInt = Field(default=0, ge=0, description="extra RoPE frames between shots")
    max_block_position: StrictInt | None = Field(
        default=None, ge=0,
        description="RoPE position a block never starts beyond: once the video outgrows the training clip, "
        "the sink keeps its positions and the window + block sit where the last block of a training clip "
        "sat (from the student's ar_config.json); None: closed-up positions",
    )
    recache_on_switch: StrictBool = Field(default=True, description="recompute the cached K/V under a new prompt")
    guidance_scale: StrictFloat = Field(default=1.0, ge=0, description="classifier-free guidance; 1 = off")
    vae_device: str = Field(default="auto", description="device of the VAE decoder; auto = the DiT's")
    async_decode: StrictBool = Field(default=True, description="decode block k in a thread while block k+1 denoises")
    max_seconds: StrictFloat = Field(
        default=3600.0, gt=0, allow_inf_nan=False,
        description="longest video `longlive generate` accepts (memory stays flat at any length, but an hour of "
        "real-time video is far past anything the students were trained on; a typo such as 1e9 is refused up front)")
    vae_frames_per_call: StrictInt = Field(default=1, ge=1, description="latent frames per VAE decoder call after the "
                                     "first (1: bitwise as diffusers; more: larger convolutions, more memory)")
    vae_decoder: Literal["fast", "reference"] = Field(
        default="fast", description="fast: the channels-last streaming decoder over the VAE's weights "
        "(longlive.inference.fast_vae; Wan2.2 layout, equal to the reference up to float rounding); reference: "
        "diffusers' modules frame by frame")
    # the real-time path (longlive.inference.optimize); on the CPU every option below but fp8/compile is a no-op
    kernels: StrictBool = Field(default=True, description="fused Triton kernels (RoPE, LayerNorm + adaLN, gated residual) "
                          "on CUDA, the PyTorch reference elsewhere; LONGLIVE_KERNELS=0 turns every kernel off")
    compile: StrictBool = Field(default=False, description="torch.compile each DiT block (the KV-cache core stays eager)")
    fp8: StrictBool = Field(default=False, description="row-wise dynamic FP8 (E4M3) linears through torch._scaled_mm "
                      "(compute capability >= 8.9; a float32 emulation elsewhere); quant.keep_high_precision stays bf16")
    cuda_graphs: StrictBool = Field(
        default=False, description="replay the chunk loop's repeating DiT forwards (denoising steps, cache pass) as CUDA "
        "graphs, captured in the second block a shape and cache state come in (longlive.inference.cuda_graphs); CUDA "
        "only, a no-op elsewhere. Off until its GPU tests (tests/unit/test_cuda_graphs.py) have run on a device: "
        "tested on the CPU with a stand-in graph only")
    cache_from_last_step: StrictBool = Field(
        default=False, description="write the KV cache during the last denoising step instead of a separate t=0 pass "
        "over the clean block (one forward less per block; the cache then holds K/V of the last step's noisy input)")
    decoder: Literal["vae", "light"] = Field(
        default="vae", description="vae: the full VAE decoder; light: the distilled light causal decoder "
        "(models/light_decoder, written by the distill_decoder stage)")
    fp8_attention: Literal["off", "triton", "cudnn"] = Field(
        default="off", description="self-attention in 8 bits, a speed option for Hopper: triton = our kernel (INT8 "
        "q.k, E4M3 P.v; kernels/fp8_attention.py); cudnn = cuDNN's FP8 flash attention (per-tensor E4M3 q, k, v and "
        "P; kernels/fp8_sdpa.py, needs the `hopper` extra). With the kernels on CUDA; each one's float32 reference "
        "elsewhere. false / true mean off / triton")

    @model_validator(mode="before")
    @classmethod
    def _fp8_attention_bools(cls, data: Any) -> Any:
        # the option was a bool before the cuDNN path existed: keep `fp8_attention: true` meaning the Triton kernel
        if isinstance(data, dict) and isinstance(data.get("fp8_attention"), bool):
            data = {**data, "fp8_attention": "triton" if data["fp8_attention"] else "off"}
        return data

    @model_validator(mode="after")
    def _check(self) -> "InferenceConfig":
        _check_denoising_steps(self.denoising_steps)
        return self


_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class PublishCheckpoint(_Strict):
    """One checkpoint of a release: a train_ar export (``dit/`` + ``ar_config.json``), a DiT directory,
    or an NVFP4 checkpoint (copied as is; its format and backend are recorded in the release)."""

    path: str = Field(min_length=1)
    dtype: Literal["bf16", "keep"] = Field(default="bf16", description="bf16: DiT weights cast to bf16 (norms and "
                                           "time embedding stay fp32, as in diffusers); keep: copied as stored")
    quantization: dict[str, str | int | float | bool] | None = Field(
        default=None, description="e.g. {format: nvfp4, backend: triton}; merged over what the checkpoint records")
    lora: Literal["merged", "separate"] = Field(default="merged", description="a LoRA-trained export: merged = the "
                                                "adapter folded into dit/; separate = base dit/ + a peft adapter beside it")

    @model_validator(mode="before")
    @classmethod
    def _from_path(cls, value):
        return {"path": value} if isinstance(value, str) else value


class PublishConfig(_Strict):
    """The ``publish`` stage: build a release folder and upload it to ``url`` (local path, file:// or s3://).

    ``version`` may use ``{preset}``, ``{n}`` (1 + the highest published n for this template), ``{date}``
    (UTC YYYYMMDD) and ``{commit}`` (short git commit). Endpoint, region and credentials of ``s3://``
    come from the environment (see README, "Releases"); ``storage_options`` are passed to fsspec.
    """

    url: str = Field(default="releases", min_length=1)
    version: str = Field(default="{preset}-v{n}", min_length=1)
    checkpoints: dict[str, PublishCheckpoint] = Field(
        default_factory=lambda: {"t2v": PublishCheckpoint(path="models/ar/t2v"),
                                 "i2v": PublishCheckpoint(path="models/ar/i2v")})
    metrics: dict[str, str] = Field(default_factory=dict, description="name -> metrics JSON file")
    base: str = Field(default="models/base", description="base models directory (vae/, text/)")
    base_components: list[str] = Field(default_factory=lambda: ["vae", "text"])
    latest: StrictBool = Field(default=True, description="point <url>/latest.json at the new release")
    force: StrictBool = Field(default=False, description="replace an existing release of the same version")
    storage_options: dict = Field(default_factory=dict, description="fsspec options, e.g. {endpoint_url: ...}")
    wandb: StrictBool = Field(default=False, description="also log the release as a wandb artifact (tracking.wandb_mode)")
    license: str = Field(default="apache-2.0", description="the model card's licence (a Hub licence id); Wan2.2's "
                         "weights, and so what is trained from them, are Apache-2.0")
    base_model: str | None = Field(default=None, description="the card's base_model (a Hub repo id); None: "
                                   "Wan-AI/Wan2.2-TI2V-5B when the DiT has its sizes, else none")

    _check_credentials = field_validator("url", "storage_options")(_no_credentials)

    @model_validator(mode="after")
    def _check(self) -> "PublishConfig":
        for kind, names in (("checkpoints", self.checkpoints), ("metrics", self.metrics)):
            for name in names:
                if not re.match(_NAME_RE, name):
                    raise ValueError(f"{kind} name {name!r} must be letters, digits, '.', '-' or '_' (it names a folder)")
        if not self.checkpoints:
            raise ValueError("checkpoints is empty: a release needs at least one checkpoint")
        return self


DEFAULT_KEEP_HIGH_PRECISION = ["patch_embedding", "time_embedder", "time_proj", "text_embedder", "proj_out"]


class QuantConfig(_Strict):
    """NVFP4 (``longlive.quant``): QAT in training, the inference backend, which linears stay high precision,
    and the KV cache storage.

    ``keep_high_precision`` are module-name patterns (fnmatch; a pattern also covers the modules under it):
    by default the patch, text and time embedders, ``time_proj`` (the adaLN modulation) and ``proj_out``.
    Only ``nn.Linear`` modules are ever quantized; the adaLN tables (``scale_shift_table``) are parameters
    and norms are not linears, so they always stay as they are.
    """

    qat: StrictBool = Field(default=False, description="train (train_ar, DMD) with NVFP4 fake quantization of weights "
                      "and activations (straight-through gradients)")
    backend: Literal["auto", "emulated", "triton", "native", "transformer_engine"] = Field(
        default="auto", description="NVFP4 linears at inference: auto = native on compute capability >= 10, "
        "triton on other CUDA GPUs, emulated on the CPU")
    keep_high_precision: list[str] = Field(default_factory=lambda: list(DEFAULT_KEEP_HIGH_PRECISION))
    scale_rule: Literal["six", "four_over_six"] = Field(
        default="six", description="block scaling of weights and activations: plain NVFP4 or adaptive 4-over-6")
    weight_block_2d: StrictBool = Field(default=False, description="16x16 weight blocks (W and W^T quantize alike)")
    kv_cache: Literal["dense", "nvfp4"] = Field(
        default="dense", description="streaming KV cache storage: the model's dtype, or NVFP4 along head_dim")
    quality_prompts: StrictInt = Field(default=24, ge=1, description="held-out prompts the quantize stage scores "
                                 "bf16 against NVFP4 on")



class EvalVariantConfig(_Strict):
    """One checkpoint the ``evaluate`` stage measures (a key of ``evaluate.variants``).

    Adding a variant is this entry: the DAG then builds its checkpoint (params.yaml's ``dag``, ``longlive.dag``).
    """

    checkpoint: str = Field(min_length=1, description="a train_ar/train_dmd export (dit/ + ar_config.json) or a DiT directory")
    kind: Literal["t2v", "i2v"] = Field(description="i2v: every video starts from a held-out clip's first frame")
    denoising_steps: list[StrictInt] | None = Field(
        default=None, description="None: the export's ar_config.json (else inference.denoising_steps)")
    quant: Literal["none", "nvfp4"] = Field(
        default="none", description="nvfp4: convert a high-precision export's linears at load (quant: settings); "
        "a quantize-stage export is NVFP4 already and needs nothing here")
    inference: dict[str, Any] = Field(default_factory=dict, description="other inference: overrides, e.g. {sink_frames: 0}")

    @model_validator(mode="after")
    def _check(self) -> "EvalVariantConfig":
        if self.denoising_steps is not None:
            _check_denoising_steps(self.denoising_steps)
        unknown = sorted(set(self.inference) - set(InferenceConfig.model_fields))
        if unknown:
            raise ValueError(f"inference overrides {unknown} are not inference settings; choose from "
                             f"{sorted(InferenceConfig.model_fields)}")
        return self


class EvalSpeedConfig(_Strict):
    """Throughput runs: a single-prompt video of ``length_factor`` training clips, ``runs`` times after
    ``warmup`` unmeasured runs; FPS and first-chunk latency are the best of the runs (least disturbed by
    other load), the median is reported beside them."""

    runs: StrictInt = Field(default=3, ge=1)
    warmup: StrictInt = Field(default=1, ge=0)
    length_factor: StrictInt = Field(default=4, ge=1)


# VBench dimensions that score custom videos (longlive.eval.vbench knows their weight files; a test keeps
# the two lists equal), and those that read annotations of VBench's own prompts and so cannot.
VBENCH_DIMENSIONS = (
    "temporal_flickering", "subject_consistency", "background_consistency", "motion_smoothness", "dynamic_degree",
    "aesthetic_quality", "imaging_quality", "human_action", "temporal_style", "overall_consistency",
)
VBENCH_PROMPT_SUITE_DIMENSIONS = ("object_class", "multiple_objects", "color", "spatial_relationship", "scene",
                                  "appearance_style")


class EvalVBenchConfig(_Strict):
    """VBench dimensions on the first ``num_videos`` T2V/I2V videos (``longlive.eval.vbench``).

    ``weights``: a local directory in VBench's cache layout (``VBENCH_CACHE_DIR``); nothing downloads.
    ``python``: an interpreter where the ``vbench`` package is installed (it pins transformers 4.33 and
    numpy < 2, so it usually lives in its own environment); default this one. Dimensions whose package or
    weights are missing are reported as skipped with the reason; weight-free ones are always computed.
    """

    dimensions: list[str] = Field(default_factory=lambda: ["temporal_flickering"])
    weights: str | None = None
    python: str | None = None
    num_videos: StrictInt = Field(default=8, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "EvalVBenchConfig":
        suite = [d for d in self.dimensions if d in VBENCH_PROMPT_SUITE_DIMENSIONS]
        if suite:
            raise ValueError(f"VBench dimensions {suite} need VBench's own prompt suite and cannot score custom "
                             f"videos; choose from {list(VBENCH_DIMENSIONS)}")
        unknown = [d for d in self.dimensions if d not in VBENCH_DIMENSIONS]
        if unknown:
            raise ValueError(f"unknown VBench dimensions {unknown}; choose from {list(VBENCH_DIMENSIONS)}")
        if len(set(self.dimensions)) != len(self.dimensions):
            raise ValueError(f"VBench dimensions listed twice: {self.dimensions}")
        return self


class EvaluateConfig(_Strict):
    """The ``evaluate`` stage (``longlive.eval.suite``): speed, memory, prompt following on the held-out
    prompt set, long-video drift, VBench and sample videos for every variant."""

    variants: dict[str, EvalVariantConfig] = Field(default_factory=dict)
    prompts: str | None = Field(
        default=None, min_length=1,
        description="real data (data.source not synth): the prompt set videos are generated from, a .txt/.jsonl file "
        "(path or URL), or vbench (null: vbench), VBench's suite (longlive.eval.prompt_sets); synthetic data: "
        "ignored, the held-out shape prompts and their detector")
    num_prompts: StrictInt = Field(default=32, ge=2, description="single-prompt T2V/I2V videos (the score's sem needs >= 2)")
    num_multishot: StrictInt = Field(default=16, ge=1, description="two-shot videos")
    num_drift: StrictInt = Field(default=2, ge=1, description="long videos per drift setting (prompt schedule, single prompt)")
    length_factor: StrictInt = Field(default=8, ge=2, description="drift video length in training clips")
    samples: StrictInt = Field(default=1, ge=0, description="sample mp4s per evaluation and variant")
    seed: StrictInt = 0
    threads: StrictInt | None = Field(default=1, ge=1, description="torch CPU threads (1 is fastest for tiny models on shared cores)")
    workers: StrictInt = Field(
        default=1, ge=1,
        description="variants evaluated at once on the CPU, each in its own process with `threads` threads: a "
        "variant's figures do not depend on it (its timing does); on a GPU, or under torchrun, the variants run one "
        "after another")
    speed: EvalSpeedConfig = EvalSpeedConfig()
    vbench: EvalVBenchConfig = EvalVBenchConfig()

    _check_prompts = field_validator("prompts")(_no_credentials)

    @model_validator(mode="after")
    def _check(self) -> "EvaluateConfig":
        for name in self.variants:
            if not re.match(_NAME_RE, name):
                raise ValueError(f"variant name {name!r} must be letters, digits, '.', '-' or '_' (it names files)")
        return self


class Preset(_Strict):
    name: str
    seed: StrictInt = 0
    # Fixed, not "all cores": a CPU float reduction is split by thread, so a different thread count gives
    # different bits, and a few hundred training steps amplify those into different models (CI's 2-thread
    # rerun of the tiny DAG scored up to 0.2 apart from a 1-thread run). None keeps torch's default.
    cpu_threads: StrictInt | None = Field(default=None, ge=1, description="torch intra-op CPU threads for every stage")
    device: str = "auto"
    video: VideoConfig
    vae: VAEConfig
    text: TextConfig
    dit: DiTConfig
    synth: SynthConfig
    data: DataConfig = DataConfig()
    base: BaseConfig
    encode: EncodeConfig
    validate_: ValidateConfig = Field(alias="validate")
    ar: ARConfig
    dmd: DMDConfig | None = None
    tracking: TrackingConfig = TrackingConfig()
    inference: InferenceConfig
    parallel: ParallelConfig = ParallelConfig()
    publish: PublishConfig = PublishConfig()
    quant: QuantConfig = QuantConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    light_decoder: LightDecoderConfig | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, hide_input_in_errors=True)

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
    def _check_light_decoder(self) -> "Preset":
        ld = self.light_decoder
        if ld is not None:
            got = [ld.temporal_upsampling, ld.spatial_upsampling, ld.spatial_upsampling]
            if got != list(self.vae.compression):
                raise ValueError(
                    f"light_decoder upsamples {got} (t: 2^sum(temporal_upsample); h, w: 2^sum(spatial_upsample) x "
                    f"patch_size), but vae.compression is {list(self.vae.compression)}: they must be equal")
        elif self.inference.decoder == "light":
            raise ValueError("inference.decoder is light, but the preset has no light_decoder section")
        return self

    @model_validator(mode="after")
    def _check_parallel(self) -> "Preset":
        sp = self.parallel.sp
        if sp > 1 and self.parallel.sp_attention == "ulysses" and self.dit.num_heads % sp:
            raise ValueError(
                f"parallel.sp {sp} must divide dit.num_heads {self.dit.num_heads} for Ulysses (each rank takes "
                f"heads / sp); choose another sp or parallel.sp_attention: allgather"
            )
        return self

    @model_validator(mode="after")
    def _check_dmd(self) -> "Preset":
        if self.dmd is not None:
            unknown = [v for v in self.dmd.variants if v not in self.ar.variants]
            if unknown:
                raise ValueError(f"dmd.variants {unknown} are not ar.variants ({sorted(self.ar.variants)})")
        return self

    @model_validator(mode="after")
    def _check_ar(self) -> "Preset":
        if self.dit.patch_size[0] != 1:
            raise ValueError(f"ar: causal blocks need dit.patch_size[0] = 1, got {self.dit.patch_size[0]}")
        if self.ar.block_frames > self.latent_shape[1]:
            raise ValueError(f"ar.block_frames {self.ar.block_frames} exceeds the {self.latent_shape[1]} latent frames of a clip")
        return self


def _format_error(err: ValidationError, prefix: str, filename: str = "params.yaml") -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p != "__root__")
        key = f"{prefix}.{loc}" if loc else prefix
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, SecretInParamsError):  # name the keys, never the values
            lines.append(f"{', '.join('.'.join(filter(None, (key, k))) for k in cause.keys)}: {SECRET_FIX}")
        elif e["type"] == "missing":
            lines.append(f"{key}: missing")
        else:
            # a value under a credential-like key, or one holding a URL's user-info, is not echoed back
            secret = any(is_secret_key(str(p)) for p in e["loc"])
            shown = REDACTED if secret else redact(repr(redact_options(e.get("input"))))
            lines.append(f"{key}: {e['msg']} (got {shown})")
    return f"invalid configuration in {filename}:\n  " + "\n  ".join(lines)


def _params_path(path: str | os.PathLike | None) -> Path:
    return Path(path or os.environ.get(PARAMS_ENV) or DEFAULT_PARAMS)


def load_params(path: str | os.PathLike | None = None) -> dict:
    path = _params_path(path)
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


def preset_files(path: str | os.PathLike | None = None) -> dict[str, Path]:
    """The named presets (``conf/preset/NAME.yaml``) beside the params file, else the shipped ones."""
    for conf in (_params_path(path).resolve().parent / PRESETS_DIR, DEFAULT_PARAMS.parent / PRESETS_DIR):
        if conf.is_dir():
            return {f.stem: f for f in sorted(conf.glob("*.yaml"))}
    return {}


def recorded_preset(path: str | os.PathLike | None = None, data: dict | None = None) -> str:
    """The preset params.yaml names: the one DVC templates and records. ``LONGLIVE_PRESET`` may only agree with
    it: a stage that read another preset would write outputs that dvc.lock attributes to this one."""
    path = _params_path(path)
    data = load_params(path) if data is None else data
    recorded = data.get("preset") or "tiny"
    env = os.environ.get(PRESET_ENV)
    if env and env != recorded:
        raise ConfigError(f"{PRESET_ENV}={env} but {path.name} records preset: {recorded} (what DVC runs and "
                          f"records); switch with `dvc exp run -S preset={env}` and unset {PRESET_ENV}")
    return recorded


def check_dag(data: dict, path: str | os.PathLike) -> None:
    """params.yaml's ``dag`` (what dvc.yaml builds) must be what its preset implies (``longlive.dag``), where
    DVC reads that file: a preset edited in params.yaml alone would run items DVC does not build or record."""
    path = Path(path)
    if "dag" not in data or not (path.resolve().parent / "dvc.yaml").is_file():
        return
    name = data.get("preset") or "tiny"
    if name not in data["presets"]:
        raise ConfigError(f"{path.name} records preset: {name} but holds presets {sorted(data['presets'])}: switch "
                          f"presets with `dvc exp run -S preset={name}`, which composes params.yaml for it")
    try:
        expected = dag_section(data["presets"][name] or {}, name)
    except DagError as e:
        raise ConfigError(f"{path.name}: {e}") from None
    changed = [k for k in sorted(set(expected) | set(data["dag"] or {})) if expected.get(k) != (data["dag"] or {}).get(k)]
    if changed:
        raise ConfigError(f"{path.name}: dag.{changed[0]} is not what presets.{name} implies: params.yaml is composed "
                          f"by `dvc exp run` from {PRESETS_DIR}/{name}.yaml; change the preset there (or with "
                          f"`dvc exp run -S presets.{name}.KEY=VALUE`) and run `dvc exp run`")


def params_document(name: str, preset: dict) -> dict:
    """What DVC's composition writes to params.yaml for ``preset`` (tests and scripts that write params.yaml)."""
    return {"preset": name, "presets": {name: preset}, "dag": dag_section(preset, name)}


def load_preset(name: str | None = None, path: str | os.PathLike | None = None) -> Preset:
    """Load and validate one preset: by default the one params.yaml records (see :func:`recorded_preset`);
    a named one not in the file from ``conf/preset/NAME.yaml``."""
    path = _params_path(path)
    data = load_params(path)
    recorded = recorded_preset(path, data) if name is None else data.get("preset") or "tiny"
    name = name or recorded
    presets, source = data["presets"], path
    if name == recorded:
        check_dag(data, path)
    if name not in presets:
        files = preset_files(path)
        if name not in files:
            raise ConfigError(f"preset: unknown preset {name!r}; choose one of {sorted(set(presets) | set(files))}")
        source = files[name]
        presets = load_params(source)["presets"]
        if name not in presets:
            raise ConfigError(f"{source}: expected presets.{name}")
    raw = dict(presets[name] or {})
    raw.setdefault("name", name)
    try:
        return Preset.model_validate(raw)
    except ValidationError as e:
        shown = path.name if source == path else f"{PRESETS_DIR}/{source.name}"
        raise ConfigError(_format_error(e, f"presets.{name}", shown)) from None
