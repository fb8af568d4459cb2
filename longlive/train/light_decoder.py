"""``distill_decoder``: distil the full VAE decoder into the light causal decoder (``longlive.models.light_decoder``).

The student learns to reproduce what the VAE decodes from the encoded training latents (L1 + L2 against the VAE's
decode) plus a small L1 term against the real frames (``gt_weight``), so it copies the VAE where the VAE is right
and is pulled a little towards the data where it is not. Held out: the first ``eval_clips`` clips (key order), on
which the metrics give the PSNR of the light decoder against the VAE's decode and against the real frames, and the
VAE's own PSNR against the real frames for reference. The shared loop (:func:`longlive.train.loop.run_training`)
gives checkpoints, exact resume, wandb and the progress bar.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from longlive.config import Preset
from longlive.data.shards import iter_shard
from longlive.data.validate import require_validated
from longlive.io import file_stamp
from longlive.data.synth import load_frames
from longlive.data.video_io import frames_to_tensor
from longlive.device import resolve_device
from longlive.models.light_decoder import LightDecoder
from longlive.models.vae import WanVAE
from longlive.train.loop import run_training, write_history
from longlive.tracking import stage_config

log = logging.getLogger(__name__)
EVAL_BLOCK_FRAMES = 8  # the light decoder streams held-out clips in blocks of this many latent frames (LongLive's)


def load_latents(shards_url: str, validation_report: str | os.PathLike) -> tuple[list[tuple[str, Tensor]], dict]:
    """``(key, latents (C, F, h, w) as stored)`` of every clip of a shard dataset, in key order, and its
    manifest; only if ``validation_report`` (the validate stage's ``report.json``) passed that manifest."""
    fs, root, manifest = require_validated(shards_url, validation_report)
    clips = [(s["__key__"], torch.from_numpy(s["latents.npy"]))
             for e in manifest["shards"] for s in iter_shard(shards_url, e, fs=fs, root=root)]
    if not clips:
        raise ValueError(f"the dataset at {shards_url} has no clips; run `dvc repro encode` first")
    return sorted(clips, key=lambda c: c[0]), manifest


def psnr(mse: float) -> float:
    """PSNR in dB of videos in [-1, 1] (a peak of 1 on the [0, 1] scale)."""
    return float(10 * math.log10(4.0 / max(mse, 1e-12)))


class ClipStore:
    """The VAE's decode (the target) and the real frames of clips, computed on demand; kept with ``cache``."""

    def __init__(self, vae: WanVAE, synth_dir: Path, device: torch.device, cache: bool):
        self.vae, self.synth_dir, self.device, self.cache = vae, synth_dir, device, cache
        self._decoded: dict[str, Tensor] = {}
        self._frames: dict[str, Tensor] = {}

    @torch.no_grad()
    def decoded(self, key: str, latents: Tensor) -> Tensor:
        """(3, T, H, W) float32 in [-1, 1]: the VAE's decode of ``latents`` (C, F, h, w), clip ``key``'s first F
        latent frames (the same F on every call: the decode of a causal prefix is the prefix of the decode)."""
        if key in self._decoded:
            return self._decoded[key]
        out = self.vae.decode(latents[None].to(self.device, self.vae.dtype))[0].float()
        if self.cache:
            self._decoded[key] = out
        return out

    def frames(self, key: str) -> Tensor:
        """(3, T, H, W) float32 in [-1, 1]: the real frames of clip ``key`` (kept as uint8)."""
        if key in self._frames:
            u8 = self._frames[key]
        else:
            u8 = torch.from_numpy(load_frames(self.synth_dir, key)).to(self.device)
            if self.cache:
                self._frames[key] = u8
        return frames_to_tensor(u8)


def distill_decoder(
    preset: Preset,
    *,
    shards_url: str,
    synth_dir: str | os.PathLike,
    base_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    work_dir: str | os.PathLike,
    plots_dir: str | os.PathLike,
    validation_report: str | os.PathLike,
) -> dict:
    """Train the light decoder of ``preset.light_decoder`` on shards that ``validation_report`` passed; write ``out_dir`` (its checkpoint) and
    ``plots_dir/loss.json``; return the metrics. Resume state lives in ``work_dir`` (removed after success)."""
    cfg = preset.light_decoder
    if cfg is None or cfg.distill is None:
        raise ValueError(f"presets.{preset.name}.light_decoder.distill is not set: the stage needs its settings")
    d = cfg.distill
    synth_dir, base_dir, out_dir, work_dir, plots_dir = map(Path, (synth_dir, base_dir, out_dir, work_dir, plots_dir))
    device = resolve_device(preset.device)
    vae_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae = WanVAE.from_pretrained(base_dir / "vae", expect=preset.vae, dtype=vae_dtype, device=device).eval()
    vae.requires_grad_(False)

    clips, manifest = load_latents(shards_url, validation_report)
    if tuple(clips[0][1].shape) != preset.latent_shape:
        raise ValueError(f"shard latents are {tuple(clips[0][1].shape)}, the preset expects {preset.latent_shape}; "
                         "re-encode")
    if len(clips) <= d.eval_clips:
        raise ValueError(f"{len(clips)} clips: none left for training after holding out eval_clips = {d.eval_clips}")
    held, train = clips[: d.eval_clips], clips[d.eval_clips :]
    store = ClipStore(vae, synth_dir, device, d.cache)

    torch.manual_seed(preset.seed)
    student = LightDecoder(cfg, preset.vae.z_dim).to(device)
    tc, sc = preset.vae.temporal_compression, preset.vae.spatial_compression
    C, F, h, w = preset.latent_shape
    cf, ch, cw = d.latent_crop or (F, h, w)
    cf, ch, cw = min(cf, F), min(ch, h), min(cw, w)

    def loss_fn(step: int, g: torch.Generator):
        idx = torch.randint(0, len(train), (d.train.batch_size,), generator=g)
        ys = torch.randint(0, h - ch + 1, (len(idx),), generator=g).tolist()
        xs = torch.randint(0, w - cw + 1, (len(idx),), generator=g).tolist()
        latents, target, real = [], [], []
        for i, y, x in zip(idx.tolist(), ys, xs):
            key, z = train[i]
            pix = (slice(None), slice(0, 1 + tc * (cf - 1)),  # (3, T, H, W) of the latent window
                   slice(y * sc, (y + ch) * sc), slice(x * sc, (x + cw) * sc))
            latents.append(z[:, :cf, y : y + ch, x : x + cw])
            target.append(store.decoded(key, z[:, :cf])[pix])
            if d.gt_weight > 0:
                real.append(store.frames(key)[pix])
        pred = student.decode(torch.stack(latents).to(device).float(), clamp=False).float()
        diff = pred - torch.stack(target)
        l1, l2 = diff.abs().mean(), diff.pow(2).mean()
        loss = l1 + l2
        metrics = {"l1": l1.item(), "l2": l2.item()}
        if d.gt_weight > 0:
            gt = (pred - torch.stack(real)).abs().mean()
            loss = loss + d.gt_weight * gt
            metrics["l1_gt"] = gt.item()
        return loss, metrics

    fingerprint = json.dumps({
        "data": hashlib.sha256("".join(e["sha256"] for e in manifest["shards"]).encode()).hexdigest()[:16],
        "vae": file_stamp(base_dir / "vae"), "light_decoder": cfg.model_dump(exclude={"distill": {"train"}}),
    }, sort_keys=True)
    t0 = time.time()
    history = run_training(
        "distill_decoder", student, loss_fn, d.train, work_dir, seed=preset.seed, ckpt_every=d.ckpt_every,
        data_fingerprint=fingerprint, precision=d.precision, tracking=preset.tracking,
        run_config=stage_config(preset, "distill_decoder", ("video", "vae", "light_decoder")),
    )
    wall = time.time() - t0

    metrics = eval_light_decoder(student, vae, held, store)
    student.save_pretrained(out_dir, metadata={"distilled_from": str(base_dir / "vae"), "preset": preset.name})
    write_history(history, plots_dir / "loss.json")
    tail = max(1, len(history) // 10)
    metrics.update({
        "steps": d.train.steps,
        "loss_first": float(np.mean([r["loss"] for r in history[:tail]])) if history else math.nan,
        "loss_last": float(np.mean([r["loss"] for r in history[-tail:]])) if history else math.nan,
        "wall_time_s": round(wall, 2),
        "train_clips": len(train),
        "eval_clips": len(held),
        "params_light": student.num_params(),
        "params_vae_decoder": sum(p.numel() for n, p in vae.model.named_parameters()
                                  if n.startswith(("decoder.", "post_quant_conv."))),
    })
    log.info("distill_decoder on %s: %s", device, metrics)
    for name in ("checkpoint.pt", "checkpoint.pt.stale"):  # resume state served its purpose (see run_training)
        (work_dir / name).unlink(missing_ok=True)
    return metrics


@torch.no_grad()
def eval_light_decoder(student: LightDecoder, vae: WanVAE, held: list[tuple[str, Tensor]], store: ClipStore,
                       block_frames: int = EVAL_BLOCK_FRAMES) -> dict:
    """PSNRs over the held-out clips (one MSE over all their frames) and seconds per clip of each decoder. The
    light decoder streams blocks of ``block_frames`` latent frames, as at inference (and so bounds its memory)."""
    was_training = student.training
    student.eval()
    sse = {"light_vs_vae": 0.0, "light_vs_gt": 0.0, "vae_vs_gt": 0.0}
    n, t_vae, t_light = 0, 0.0, 0.0
    dtype = next(student.parameters()).dtype
    for key, z in held:
        z = z[None].to(store.device)
        t = time.perf_counter()
        decoded = vae.decode(z.to(vae.dtype)).float()
        t_vae += _synced(t, z.device)
        t = time.perf_counter()
        stream = student.streaming_decoder()
        light = torch.cat([stream.decode(z[:, :, i : i + block_frames].to(dtype)).float()
                           for i in range(0, z.shape[2], block_frames)], dim=2)
        t_light += _synced(t, z.device)
        real = store.frames(key)[None]
        sse["light_vs_vae"] += (light - decoded).pow(2).sum().item()
        sse["light_vs_gt"] += (light - real).pow(2).sum().item()
        sse["vae_vs_gt"] += (decoded - real).pow(2).sum().item()
        n += real.numel()
    student.train(was_training)
    return {
        **{f"psnr_{k}_db": round(psnr(v / n), 3) for k, v in sse.items()},
        "decode_s_per_clip_vae": round(t_vae / len(held), 4),
        "decode_s_per_clip_light": round(t_light / len(held), 4),
    }


def _synced(t0: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0
