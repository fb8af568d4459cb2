"""AR teacher forcing: turn the bidirectional base teacher into a block-causal student.

A clip's F latent frames are grouped in causal blocks of ``block_frames`` (with
``independent_first_frame`` latent frame 0 is a block of its own: [0] [1..k] [k+1..2k] ...; the last
block may be shorter). One training sequence is the clip twice, ``[clean x0 | noisy x_t]``:

* RoPE frame positions ``[0..F-1, 0..F-1]``: a noisy frame sits where its clean copy sits;
* timesteps ``[0 ... 0 | t_block ...]``: each noisy block has its own noise level;
* attention ``teacher_forcing_frames`` (a :class:`FrameMask`): clean block i sees clean blocks <= i
  (what the KV cache holds at inference), noisy block i sees clean blocks < i and itself;
* loss: flow matching (target ``noise - x0``) on the noisy half only.

With ``window_frames`` set, "earlier blocks" narrows to what the streaming cache holds for the block:
the sink (first ``sink_frames`` frames of the shot) and the ``window_frames`` latest earlier frames
(``cached_history``). On clips longer than sink + window + block the last blocks then see a sink far
behind their window, at the same RoPE distances streaming uses once it outgrows a clip
(``max_block_position`` in ``ar_config.json``): the student learns to stream with a sink rather than
meeting one for the first time at inference.

Noise levels (``timestep_sampling: steps``, the default): each block draws one timestep of the
inference step list (``denoising_steps``, e.g. [1000, 750, 500, 250]) mapped through the timestep
shift, ``sigma = shift * s / (1 + (shift - 1) s)`` with ``s = t / 1000`` -- Self-Forcing's
``warp_denoising_step``, which LongLive inherits: the student is trained at exactly the noise
levels the few-step sampler visits. ``uniform`` draws ``s ~ U(0, 1)`` per block (then shifted), as
the base teacher was trained, for a student meant for many-step sampling.

I2V (``i2v``): latent frame 0 is the clean image latent. In the noisy half it is replaced by the
clean latent with timestep 0, and it is left out of the loss: the model conditions on it and is
never asked to generate it. With ``independent_first_frame`` it is also its own causal block, so at
inference the image is written to the KV cache alone and generation proceeds in whole blocks.

Multi-shot: each clip carries one caption embedding per shot (``text.npy`` (num_shots, L, D)) and
``shot_start_latent_frames``; the DiT gets ``context (B, N, L, D)`` and ``context_index (B, 2F)``,
so every frame cross-attends to its own shot's caption. Caption dropout (for classifier-free
guidance) replaces all of a clip's captions with the empty-prompt embedding.

Every random draw of a step comes from the step's generator (see :mod:`longlive.train.loop`), so a
killed run resumes exactly. The export is the EMA of the weights, plus ``ar_config.json`` with the
settings inference needs (block layout, I2V, step list, shift).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from longlive.config import ARConfig, ARVariantConfig, Preset
from longlive.data.shards import iter_shard
from longlive.data.validate import require_validated
from longlive.io import file_stamp
from longlive.device import resolve_device
from longlive.diffusion import flow
from longlive.models.attention import FrameMask, cached_history, teacher_forcing_frames
from longlive.models.dit import WanDiT
from longlive.inference.build import build_dit
from longlive.models.checkpoint import DIT_DIR, write_trained
from longlive.models.text import load_text_encoder
from longlive.models.wan_adapter import save_dit
from longlive.secrets import redact_url
from longlive.parallel import ParallelState, plain_copy
from longlive.train.ema import EMA
from longlive.train.loop import autocast, run_training, write_history
from longlive.tracking import stage_config

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Block layout, noise levels, masks


def frame_blocks(num_frames: int, block_frames: int, independent_first_frame: bool = False) -> Tensor:
    """(F,) causal block index of each latent frame."""
    f = torch.arange(num_frames)
    return (f + block_frames - 1) // block_frames if independent_first_frame else f // block_frames


def clip_block_sizes(num_frames: int, block_frames: int, independent_first_frame: bool = False) -> list[int]:
    """A training clip of ``num_frames`` latent frames cut into its causal blocks: the last one is short when
    the clip does not divide (a stream's blocks are :func:`longlive.inference.schedule.stream_block_sizes`)."""
    return torch.bincount(frame_blocks(num_frames, block_frames, independent_first_frame)).tolist()


def attention_frames(
    num_frames: int, block_frames: int, independent_first_frame: bool = False, *, shots: Tensor | None = None,
    sink_frames: int = 0, window_frames: int | None = None, multishot_sink: bool = True,
) -> Tensor:
    """(2F, 2F) bool: which frames of ``[clean | noisy]`` each frame attends to, for the block layout above.

    Each block sees the clean frames the streaming cache would hold for it (``cached_history``): all
    earlier blocks, or with ``window_frames`` the sink + window view, so a clip longer than sink +
    window + block trains the student on the context it streams with (a sink far behind the window).
    """
    blocks = frame_blocks(num_frames, block_frames, independent_first_frame)
    history = cached_history(blocks, shots, sink_frames=sink_frames, window_frames=window_frames,
                             multishot_sink=multishot_sink)
    return teacher_forcing_frames(history, blocks)


def attention_mask(
    num_frames: int, frame_tokens: int, block_frames: int, independent_first_frame: bool = False,
    device: torch.device | str | None = None, **history,
) -> Tensor:
    """(2S, 2S) dense boolean mask of :func:`attention_frames` (``history``: its keyword arguments), the SDPA
    reference that the block-sparse path is tested against."""
    frames = attention_frames(num_frames, block_frames, independent_first_frame, **history)
    return FrameMask(frames, frame_tokens).dense(device)


class ClipMasks:
    """The teacher-forcing :class:`FrameMask` of a batch: one shared mask, or one table per clip when it depends on
    the shots (a windowed view with a sink re-anchored per shot). Masks are kept by layout (the clips' shot starts),
    so each builds its dense mask or FlexAttention ``BlockMask`` once."""

    def __init__(self, cfg: ARConfig, variant: ARVariantConfig, num_frames: int, frame_tokens: int,
                 backend: str = "auto", max_batched: int = 64) -> None:
        self.cfg, self.variant, self.F, self.tokens, self.backend = cfg, variant, num_frames, frame_tokens, backend
        self.per_clip = cfg.window_frames is not None and cfg.sink_frames > 0
        self.max_batched = max_batched
        self._layouts: dict[tuple[int, ...], FrameMask] = {}  # one clip's layout -> its mask
        self._batches: OrderedDict[tuple, FrameMask] = OrderedDict()  # per-clip layouts of a batch: LRU of max_batched

    def layout(self, shot_starts: tuple[int, ...]) -> FrameMask:
        if shot_starts not in self._layouts:
            c = self.cfg
            frames = attention_frames(
                self.F, c.block_frames, self.variant.independent_first_frame,
                shots=shot_index(list(shot_starts), self.F), sink_frames=c.sink_frames,
                window_frames=c.window_frames, multishot_sink=c.multishot_sink,
            )
            self._layouts[shot_starts] = FrameMask(frames, self.tokens, backend=self.backend)
        return self._layouts[shot_starts]

    def __call__(self, clips: list[Clip]) -> FrameMask:
        if not self.per_clip:
            return self.layout((0,))
        masks = [self.layout(tuple(c.shot_starts)) for c in clips]
        if all(m is masks[0] for m in masks):
            return masks[0]  # one table for the batch (it broadcasts)
        key = tuple(tuple(c.shot_starts) for c in clips)
        if key not in self._batches:
            self._batches[key] = FrameMask.stack(masks)  # (B, 2F, 2F): per sample
            while len(self._batches) > self.max_batched:
                self._batches.popitem(last=False)
        self._batches.move_to_end(key)
        return self._batches[key]


def max_block_position(num_frames: int, block_frames: int, independent_first_frame: bool = False) -> int:
    """First frame of the last whole block of a training clip: past it, streaming re-bases RoPE positions
    so every block sits where that block sat in training (see ``RollingKVCache``)."""
    sizes = clip_block_sizes(num_frames, block_frames, independent_first_frame)
    starts = np.cumsum([0] + sizes[:-1])
    whole = [int(s) for s, n in zip(starts, sizes) if n == block_frames]
    return whole[-1] if whole else 0


step_sigmas = flow.step_list_sigmas  # the inference step list's sigmas (one definition, in flow)


def sample_block_sigmas(cfg: ARConfig, batch: int, num_blocks: int, g: torch.Generator) -> Tensor:
    """(B, num_blocks) noise level of each block (see the module docstring)."""
    if cfg.timestep_sampling == "steps":
        sigmas = step_sigmas(cfg.denoising_steps, cfg.timestep_shift)
        return sigmas[torch.randint(0, len(sigmas), (batch, num_blocks), generator=g)]
    return flow.sample_sigmas((batch, num_blocks), cfg.timestep_shift, g)


def shot_index(shot_starts: list[int], num_frames: int) -> Tensor:
    """(F,) shot of each latent frame, from the shots' first latent frames (sorted, the first 0)."""
    if not shot_starts or shot_starts[0] != 0 or sorted(shot_starts) != list(shot_starts):
        raise ValueError(f"shot_start_latent_frames must be sorted and start at 0, got {shot_starts}")
    return torch.searchsorted(torch.tensor(shot_starts), torch.arange(num_frames), right=True) - 1


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class Clip:
    key: str
    latents: Tensor  # (C, F, h, w) as stored (float16)
    text: Tensor  # (num_shots, L, D) as stored
    shot_starts: list[int]
    captions: tuple[str, ...] = ()  # what ``text`` embeds, one per shot (DMD matches prompts to them)


def clip_from_sample(sample: dict) -> Clip:
    meta = sample["json"]
    text = torch.from_numpy(sample["text.npy"])
    starts = list(meta.get("shot_start_latent_frames", [0]))
    if len(starts) != text.shape[0]:
        raise ValueError(f"sample {sample['__key__']}: {len(starts)} shot starts but {text.shape[0]} captions")
    return Clip(sample["__key__"], torch.from_numpy(sample["latents.npy"]), text, starts,
                tuple(meta.get("captions", ())))


class ShardClips:
    """The clips of a finished shard dataset, drawn into batches with a step's generator.

    ``shards_in_memory=None`` reads every shard once and keeps all clips (small datasets); a batch is
    B clips drawn uniformly. ``shards_in_memory=k`` streams: each step draws one shard (weighted by
    its size) and the batch from it, keeping the k most recent shards; memory stays bounded and the
    draw is still a function of the generator alone, so exact resume holds either way.

    ``validation_report`` is the validate stage's ``report.json``: the shards are opened only if it passed
    this very manifest (:func:`~longlive.data.validate.require_validated`), before any model is loaded.
    """

    def __init__(self, url: str, shards_in_memory: int | None = None, storage_options: dict | None = None, *,
                 validation_report: str | os.PathLike) -> None:
        self.url, self.storage_options = url, storage_options
        self.fs, self.root, manifest = require_validated(url, validation_report, storage_options)
        self.entries = manifest["shards"]
        if not self.entries:
            raise ValueError(f"the dataset at {redact_url(url)} has no shards")
        self.sizes = torch.tensor([len(e["keys"]) for e in self.entries], dtype=torch.float64)
        self.streaming = shards_in_memory is not None and shards_in_memory < len(self.entries)
        self.capacity = shards_in_memory or len(self.entries)
        self._cache: OrderedDict[int, list[Clip]] = OrderedDict()
        self._all: list[Clip] = []
        self._shard_of = {k: i for i, e in enumerate(self.entries) for k in e["keys"]}
        self._by_key: dict[str, Clip] | None = None
        if not self.streaming:  # from the validated manifest's entries, not a second read of the manifest
            self._all = [clip_from_sample(s) for e in self.entries
                         for s in iter_shard(url, e, fs=self.fs, root=self.root)]

    def __len__(self) -> int:
        return int(self.sizes.sum())

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256("".join(e["sha256"] for e in self.entries).encode()).hexdigest()[:16]

    def _shard(self, i: int) -> list[Clip]:
        if i not in self._cache:
            self._cache[i] = [clip_from_sample(s) for s in iter_shard(self.url, self.entries[i], fs=self.fs, root=self.root)]
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        self._cache.move_to_end(i)
        return self._cache[i]

    def sample(self, batch: int, g: torch.Generator) -> list[Clip]:
        if not self.streaming:
            return [self._all[int(i)] for i in torch.randint(0, len(self._all), (batch,), generator=g)]
        shard = self._shard(int(torch.multinomial(self.sizes, 1, generator=g)))
        return [shard[int(i)] for i in torch.randint(0, len(shard), (batch,), generator=g)]

    def first(self) -> Clip:
        return self._all[0] if not self.streaming else self._shard(0)[0]

    def has(self, key: str) -> bool:
        return key in self._shard_of

    def by_key(self, key: str) -> Clip:
        """The clip stored under ``key`` (streaming: its shard joins the kept ones); KeyError if there is none."""
        if not self.streaming:
            if self._by_key is None:
                self._by_key = {c.key: c for c in self._all}
            return self._by_key[key]
        return next(c for c in self._shard(self._shard_of[key]) if c.key == key)


def collate(clips: list[Clip]) -> tuple[Tensor, Tensor, Tensor]:
    """x0 (B, C, F, h, w) float32, context (B, N, L, D) float32 with N the most shots of any clip
    (shorter lists padded with their last caption, which no frame points at), context_index (B, F)."""
    x0 = torch.stack([c.latents for c in clips]).float()
    n = max(c.text.shape[0] for c in clips)
    context = torch.stack([
        torch.cat([c.text, c.text[-1:].expand(n - c.text.shape[0], -1, -1)]) for c in clips
    ]).float()
    index = torch.stack([shot_index(c.shot_starts, x0.shape[2]) for c in clips])
    return x0, context, index


# ---------------------------------------------------------------------------------------------
# The teacher-forcing batch and loss


@dataclass
class TFBatch:
    """One teacher-forcing forward: model inputs over ``[clean | noisy]`` (2F frames) and the loss terms."""

    x: Tensor  # (B, C, 2F, h, w)
    timestep: Tensor  # (B, 2F)
    frame_positions: Tensor  # (2F,)
    context: Tensor  # (B, N, L, D)
    context_index: Tensor  # (B, 2F)
    target: Tensor  # (B, C, F, h, w): noise - x0
    loss_mask: Tensor  # (B, F): 1 where a noisy frame counts in the loss
    sigma: Tensor  # (B, F) noise level of each noisy frame

    def to(self, device: torch.device) -> "TFBatch":
        return TFBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def build_batch(
    x0: Tensor, context: Tensor, context_index: Tensor, null_context: Tensor,
    cfg: ARConfig, variant: ARVariantConfig, g: torch.Generator,
) -> TFBatch:
    """x0 (B, C, F, h, w), context (B, N, L, D), context_index (B, F), null_context (L, D)."""
    B, _, F = x0.shape[:3]
    blocks = frame_blocks(F, cfg.block_frames, variant.independent_first_frame)
    sigma = sample_block_sigmas(cfg, B, int(blocks[-1]) + 1, g)[:, blocks]  # (B, F): one level per block
    if variant.i2v:
        sigma[:, 0] = 0.0  # the image frame is clean in the noisy half too
    noise = torch.randn(x0.shape, generator=g)
    x_t = flow.add_noise(x0, noise, sigma)
    if variant.i2v:
        x_t[:, :, 0] = x0[:, :, 0]
    drop = torch.rand(B, generator=g) < cfg.caption_dropout
    context = torch.where(drop[:, None, None, None], null_context.to(context), context)
    loss_mask = torch.ones(B, F)
    if variant.i2v:
        loss_mask[:, 0] = 0.0
    return TFBatch(
        x=torch.cat([x0, x_t], dim=2),
        timestep=torch.cat([torch.zeros(B, F), flow.timestep(sigma)], dim=1),
        frame_positions=torch.arange(F).repeat(2),
        context=context,
        context_index=context_index.repeat(1, 2),
        target=flow.velocity_target(x0, noise),
        loss_mask=loss_mask,
        sigma=sigma,
    )


def masked_flow_loss(pred: Tensor, batch: TFBatch) -> Tensor:
    """Mean squared error of the noisy half's prediction over the frames ``loss_mask`` keeps."""
    F = batch.target.shape[2]
    err = (pred[:, :, F:].float() - batch.target.float()).pow(2).mean(dim=(1, 3, 4))  # (B, F)
    return (err * batch.loss_mask).sum() / batch.loss_mask.sum().clamp_min(1.0)


def tf_forward(model: WanDiT, batch: TFBatch, mask: FrameMask | Tensor) -> Tensor:
    return model(batch.x, batch.timestep, batch.context, attn_mask=mask,
                 frame_positions=batch.frame_positions, context_index=batch.context_index)


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class ARResult:
    model: WanDiT  # holds the EMA weights after training
    history: list[dict]
    metrics: dict


def inference_config(preset: Preset, variant_name: str) -> dict:
    """What inference reads beside the weights (``ar_config.json``)."""
    cfg, variant = preset.ar, preset.ar.variants[variant_name]
    F = preset.latent_shape[1]
    return {
        "variant": variant_name,
        "i2v": variant.i2v,
        "independent_first_frame": variant.independent_first_frame,
        "block_frames": cfg.block_frames,
        "train_latent_frames": F,
        "train_block_sizes": clip_block_sizes(F, cfg.block_frames, variant.independent_first_frame),
        "max_block_position": max_block_position(F, cfg.block_frames, variant.independent_first_frame),
        "sink_frames": cfg.sink_frames,
        "window_frames": cfg.window_frames,
        "denoising_steps": list(cfg.denoising_steps),
        "timestep_shift": cfg.timestep_shift,
        "denoising_sigmas": [round(s, 6) for s in step_sigmas(cfg.denoising_steps, cfg.timestep_shift).tolist()],
        "timestep_sampling": cfg.timestep_sampling,
        "caption_dropout": cfg.caption_dropout,
        "weights": "ema",
        "qat": preset.quant.qat,
    }


def qat_fingerprint(preset: Preset) -> dict:
    """What QAT adds to a run's identity (nothing without QAT, so existing checkpoints still resume)."""
    q = preset.quant
    return {"qat": q.model_dump(include={"keep_high_precision", "scale_rule", "weight_block_2d"})} if q.qat else {}


def train_ar(
    preset: Preset,
    variant_name: str,
    *,
    shards_url: str,
    base_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    work_dir: str | os.PathLike,
    plots_dir: str | os.PathLike,
    validation_report: str | os.PathLike,
    null_context: Tensor | None = None,
    parallel: ParallelState | None = None,
) -> ARResult:
    """Train one variant; write ``out_dir/{dit/, ar_config.json}`` and ``plots_dir/loss.json``.

    The shards must have passed validation: ``validation_report`` is the validate stage's ``report.json``
    (see :class:`ShardClips`). The student starts from ``base_dir/dit``. ``null_context`` (L, D) is the empty-prompt embedding for
    caption dropout; by default it is computed with the preset's text encoder (``base_dir/text`` for
    the tiny encoder). Resume state lives in ``work_dir`` (``checkpoint.pt``, removed after success;
    offline wandb runs under ``work_dir/wandb`` stay for ``wandb sync``).
    ``parallel`` (from :func:`longlive.parallel.init_parallel`, e.g. under torchrun): sequence parallel
    and FSDP2 over its ranks, a sharded ``checkpoint.dcp`` that resumes at any world size, outputs
    written by the main rank. None: one process.
    """
    cfg = preset.ar
    if variant_name not in cfg.variants:
        raise KeyError(f"unknown train_ar variant {variant_name!r}; params.yaml ar.variants has {sorted(cfg.variants)}")
    variant = cfg.variants[variant_name]
    base_dir, out_dir, work_dir, plots_dir = map(Path, (base_dir, out_dir, work_dir, plots_dir))
    device = parallel.device if parallel is not None else resolve_device(preset.device)

    data = ShardClips(shards_url, cfg.shards_in_memory, validation_report=validation_report)
    if null_context is None:
        text_path = preset.text.path if preset.text.kind == "umt5" else base_dir / "text"
        with torch.no_grad():
            null_context = load_text_encoder(preset.text, text_path).encode([""])[0][0].float().cpu()

    # QAT (NVFP4 fake quantization) keeps the parameters, so the export stays plain weights; SP and FSDP last
    model = build_dit(base_dir / DIT_DIR, preset, device=device, dtype=torch.float32, training=True,
                      quant="qat" if preset.quant.qat else "none", parallel=parallel)
    C, F, h, w = data.first().latents.shape
    if (C, F, h, w) != preset.latent_shape:
        raise ValueError(f"shard latents are {(C, F, h, w)}, the preset expects {preset.latent_shape}; re-encode")
    masks = ClipMasks(cfg, variant, F, model.tokens_per_frame(h, w))
    ema = EMA(model, cfg.ema.decay, cfg.ema.start_step)

    def loss_fn(step: int, g: torch.Generator):
        clips = data.sample(cfg.train.batch_size, g)
        x0, context, index = collate(clips)
        batch = build_batch(x0, context, index, null_context, cfg, variant, g).to(device)
        loss = masked_flow_loss(tf_forward(model, batch, masks(clips)), batch)
        return loss, {}

    settings = {k: v for k, v in cfg.model_dump().items() if k not in ("variants", "train", "ckpt_every", "shards_in_memory")}
    fingerprint = json.dumps({"data": data.fingerprint, "base": file_stamp(base_dir / DIT_DIR), "variant": variant.model_dump(),
                              "ar": settings, **qat_fingerprint(preset)}, sort_keys=True)
    t0 = time.time()
    history = run_training(
        f"train_ar-{variant_name}", model, loss_fn, cfg.train, work_dir, seed=preset.seed,
        grad_clip=cfg.grad_clip, ckpt_every=cfg.ckpt_every, data_fingerprint=fingerprint, ema=ema,
        grad_accum=cfg.grad_accum, precision=cfg.precision, tracking=preset.tracking,
        run_config=stage_config(preset, "train_ar", ("dit",) + (("quant",) if preset.quant.qat else ()),
                                ar={**cfg.model_dump(mode="json"), "variants": {variant_name: variant}},  # this one only
                                variant=variant_name, inference=inference_config(preset, variant_name)),
        parallel=parallel,
    )
    wall = time.time() - t0

    eval_raw = eval_tf_loss(model, data, null_context, cfg, variant, masks, device, preset.seed)
    ema.copy_to(model)
    eval_ema = eval_tf_loss(model, data, null_context, cfg, variant, masks, device, preset.seed)

    export = plain_copy(model, parallel) if parallel is not None and parallel.distributed else model
    if export is not None:  # the main rank (every rank gathered its shards for it)
        save_dit(export, out_dir / DIT_DIR)
        write_trained(out_dir, inference_config(preset, variant_name))
        write_history(history, plots_dir / "loss.json")
    tail = max(1, len(history) // 10)
    metrics = {  # numbers only: DVC metrics and the Prefect table
        "steps": cfg.train.steps,
        "final_loss": float(np.mean([r["loss"] for r in history[-tail:]])) if history else math.nan,
        "first_loss": float(np.mean([r["loss"] for r in history[:tail]])) if history else math.nan,
        "eval_loss_raw": eval_raw,
        "eval_loss_ema": eval_ema,
        "wall_time_s": round(wall, 2),
        "clips": len(data),
        "params": model.num_params(),
    }
    log.info("train_ar %s on %s: %s", variant_name, device, metrics)
    if parallel is None or parallel.is_main:
        for name in ("checkpoint.pt", "checkpoint.pt.stale"):  # resume state served its purpose (see run_training)
            (work_dir / name).unlink(missing_ok=True)
        for name in ("checkpoint.dcp", "checkpoint.dcp.stale"):  # the sharded form (run_training with parallel)
            shutil.rmtree(work_dir / name, ignore_errors=True)
    return ARResult(model, history, metrics)


@torch.no_grad()
def eval_tf_loss(
    model: WanDiT, data: ShardClips, null_context: Tensor, cfg: ARConfig, variant: ARVariantConfig,
    masks: ClipMasks, device: torch.device, seed: int, batches: int = 4,
) -> float:
    """Teacher-forcing loss on fixed batches (same clips, noise and levels on every call), no dropout."""
    cfg = cfg.model_copy(update={"caption_dropout": 0.0})
    was_training = model.training
    model.eval()
    losses = []
    for i in range(batches):
        g = torch.Generator().manual_seed(10_007 * (seed + 1) + i)
        clips = data.sample(cfg.train.batch_size, g)
        x0, context, index = collate(clips)
        batch = build_batch(x0, context, index, null_context, cfg, variant, g).to(device)
        with autocast(cfg.precision, device):
            losses.append(masked_flow_loss(tf_forward(model, batch, masks(clips)), batch).item())
    model.train(was_training)
    return float(np.mean(losses))


__all__ = [
    "frame_blocks", "clip_block_sizes", "attention_frames", "attention_mask", "ClipMasks", "max_block_position", "step_sigmas", "sample_block_sigmas", "shot_index",
    "Clip", "ShardClips", "collate", "TFBatch", "build_batch", "masked_flow_loss", "tf_forward",
    "train_ar", "inference_config", "ARResult",
]
