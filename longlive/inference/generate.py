"""``longlive generate``: build the models, stream a video to mp4 and write a JSON of timings.

Models come from :func:`longlive.inference.build.build_models` (the DiT of a checkpoint or release, the base
directory's VAE and text encoder, the light decoder with ``inference.decoder: light``), built once for the
inference settings they stream with; :func:`generate_video` runs them as they are.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from longlive.config import InferenceConfig, Preset
from longlive.data.video_io import frames_to_tensor
from longlive.device import resolve_device
from longlive.errors import UsageError
from longlive.inference.build import Models, build_models
from longlive.inference.pipeline import StreamingPipeline, phase_seconds
from longlive.inference.request import (
    LIGHT_DECODER_DIR, GenerateRequest, check_seconds, latent_frames_for, read_image, timings_path,
)
from longlive.inference.schedule import PromptSchedule, eval_schedule, stream_block_sizes
from longlive.inference.writer import BlockDecoder, Mp4Stream
from longlive.io import write_text_atomic
from longlive.models.checkpoint import Checkpoint
from longlive.models.light_decoder import DISTILL_STAGE, LightDecoder
from longlive.models.vae import WanVAE


def load_release_models(
    release: str | os.PathLike,
    variant: str | None = None,
    *,
    preset: Preset | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[Models, Preset]:
    """Build a release folder's models (``longlive pull``): the DiT of checkpoint ``variant``, the release's VAE
    and text encoder, and the preset the release was built with (unless ``preset`` is given), its inference
    settings merged with the student's trained layout (:meth:`Checkpoint.inference`). ``release`` may also be
    ``<release>/checkpoints/<variant>``. Returns ``(models, preset)`` for :func:`generate_video`."""
    from longlive.publish import ReleaseError
    from longlive.publish.release import Release, find_release

    rel, named = find_release(release) or (Release.open(release), None)  # open() explains what is missing
    name = rel.variant(variant or named)
    checkpoint = rel.checkpoint(name)  # transformer/ for the diffusers pipeline's checkpoint
    kind = rel.info["checkpoints"][name].get("kind")
    if kind != "dit":
        raise ReleaseError(f"checkpoint {name} of release {rel.version} is {kind}, which build_models cannot "
                           "load yet; pick one of its DiT checkpoints (kind dit in release.json)")
    ckpt = Checkpoint.open(checkpoint)
    preset = preset or rel.preset()
    preset = preset.model_copy(update={"inference": ckpt.inference(preset.inference)})
    return build_models(preset, rel.base, ckpt, device=device, dtype=dtype), preset


def load_image(image: str | os.PathLike | np.ndarray, height: int, width: int) -> torch.Tensor:
    """A PNG/JPEG path or a uint8 (H, W, 3[+1]) array -> (1, 3, 1, height, width) in [-1, 1] (resized)."""
    image = read_image(image) if not isinstance(image, np.ndarray) else np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4) or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3 or 4), got {image.dtype} {image.shape}")
    x = frames_to_tensor(np.ascontiguousarray(image[None, ..., :3]))  # (3, 1, H, W)
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x.transpose(0, 1), size=(height, width), mode="bilinear", antialias=True,
                          align_corners=False).transpose(0, 1).clamp(-1, 1)
    return x[None]


@dataclass
class GenerationResult:
    path: Path | None
    timings: dict
    schedule: list[tuple[int, str]]  # realised (start pixel frame, prompt), for prompt-following scores
    frames: np.ndarray | None = None  # uint8 (T, H, W, 3) when keep_frames
    latents: torch.Tensor | None = None  # (1, C, F, h, w) when keep_latents


def generate_video(
    models: Models,
    preset: Preset,
    schedule: PromptSchedule,
    *,
    seconds: float | None = None,
    latent_frames: int | None = None,
    out: str | os.PathLike | None = None,
    image: str | os.PathLike | np.ndarray | torch.Tensor | None = None,
    seed: int | None = None,
    inference: InferenceConfig | None = None,
    keep_frames: bool = False,
    keep_latents: bool = False,
) -> GenerationResult:
    """Stream one video. Length: ``seconds`` at ``preset.video.fps`` or ``latent_frames``, rounded up
    to whole blocks, at most ``inference.max_seconds``. ``image``: path, uint8 array or a (1, 3, 1, H, W)
    tensor in [-1, 1] (I2V). Writes ``out`` (mp4) and its timings (:func:`timings_path`) when ``out`` is given.

    Memory does not grow with the length: each block's frames go to the mp4 encoder as soon as they are
    decoded, and only per-block timings (a few numbers) are kept -- unless ``keep_frames`` /
    ``keep_latents`` ask for the whole video in memory."""
    cfg = inference or preset.inference
    tc, fps = preset.vae.temporal_compression, preset.video.fps
    if latent_frames is None:
        if seconds is None:
            raise UsageError("generate_video needs seconds or latent_frames")
        latent_frames = latent_frames_for(check_seconds(seconds, cfg.max_seconds), fps, tc)
    elif latent_frames < 1:
        raise UsageError(f"latent_frames {latent_frames}: give at least 1")
    else:
        check_seconds((1 + tc * (latent_frames - 1)) / fps, cfg.max_seconds)
    dit, vae, text = models.dit, models.vae, models.text
    device = next(dit.parameters()).device
    pipe = StreamingPipeline(dit, cfg, device, kv_cache=preset.quant.kv_cache)
    C, _, h, w = preset.latent_shape

    image_latent = None
    if image is not None:
        pixels = image if isinstance(image, torch.Tensor) else load_image(image, preset.video.height, preset.video.width)
        with torch.no_grad():
            image_latent = vae.encode(pixels.to(next(vae.parameters()).device)).float()
    sizes = stream_block_sizes(latent_frames, cfg.block_frames, first_alone=image is not None and cfg.independent_first_frame)
    plans = schedule.plan(sizes, fps, tc)
    contexts = [text.encode([p])[0] for p in schedule.prompts]
    null_context = text.encode([""])[0] if cfg.guidance_scale != 1.0 else None
    generator = torch.Generator().manual_seed(preset.seed if seed is None else seed)

    frames_out: list[np.ndarray] = []
    latents_out: list[torch.Tensor] = []
    writer = Mp4Stream(out, fps) if out is not None else None

    def on_frames(_: int, frames: np.ndarray) -> None:
        if writer is not None:
            writer.append(frames)
        if keep_frames:
            frames_out.append(frames.copy())  # on CUDA a view of the decoder's reused pinned buffer

    decoder = BlockDecoder(block_decoder_model(models, cfg), on_frames, async_decode=cfg.async_decode,
                           frames_per_call=cfg.vae_frames_per_call, fast=cfg.vae_decoder == "fast")
    # per block: a dict of facts and the phase marks (floats, or CUDA events read after the loop so that
    # reading them never stalls the stream); the block's latents are not kept, so memory stays flat
    blocks, marks, ok = [], [], False
    start = time.perf_counter()
    try:
        for block in pipe.stream(plans, contexts, (C, h, w), image_latent=image_latent,
                                 null_context=null_context, generator=generator):
            decoder.submit(block.plan.index, block.latents)
            if keep_latents:
                latents_out.append(block.latents.cpu())
            # generated_at: when the loop handed the block on (the GPU may still be working on it; the
            # block's own timings are read after the loop, so reading them never stalls the stream)
            blocks.append({"block": block.plan.index, "start_latent_frame": block.plan.start,
                           "frames": block.plan.frames, "prompt": block.plan.prompt, "shot": block.plan.shot,
                           "generated_at": time.perf_counter() - start, **block.stats})
            marks.append(block.marks)
            del block  # the decoder holds the latents until they are decoded; nothing here does
        decode = decoder.close()
        ok = True
    finally:
        # on an error or Ctrl-C the mp4 is discarded (it never appears at ``out``), even if a second Ctrl-C
        # lands while the decoder thread winds down
        try:
            if not ok:
                try:
                    decoder.close(cancel=True)  # skip the queued blocks: they would only be thrown away
                except Exception:  # noqa: BLE001 - the original error matters more
                    pass
        finally:
            if writer is not None:
                writer.close(ok)
    total = time.perf_counter() - start

    for b, m in zip(blocks, marks):
        b.update(phase_seconds(m))
    for b, d in zip(blocks, sorted(decode, key=lambda d: d["block"])):
        b["decode_s"] = d["decode_s"]
        b["decoded_at"] = d["done_at"] - start
    pixel_frames = 1 + tc * (sum(sizes) - 1)
    timings = {
        "preset": preset.name,
        "device": str(device),
        "vae_device": str(decoder.device),
        "async_decode": cfg.async_decode,
        "latent_frames": sum(sizes),
        "pixel_frames": pixel_frames,
        "fps_video": fps,
        "first_block_latency_s": blocks[0]["decoded_at"] if blocks else None,
        "total_s": total,
        "generated_fps": pixel_frames / total if total > 0 else None,
        "denoise_s": sum(b["denoise_s"] for b in blocks),
        "cache_s": sum(b["cache_s"] for b in blocks),
        "recache_s": sum(b.get("recache_s", 0.0) for b in blocks),
        "decode_s": sum(b.get("decode_s", 0.0) for b in blocks),
        "max_cache_bytes": max((b["cache_bytes"] for b in blocks), default=0),
        "inference": cfg.model_dump(),
        "schedule": eval_schedule(plans, schedule.prompts, tc),
        "blocks": blocks,
    }
    if out is not None:
        write_text_atomic(timings_path(out), json.dumps(timings, indent=2) + "\n")
    return GenerationResult(
        Path(out) if out is not None else None, timings, timings["schedule"],
        np.concatenate(frames_out) if keep_frames else None,
        torch.cat(latents_out, dim=2) if keep_latents else None,
    )


def block_decoder_model(models: Models, cfg: InferenceConfig) -> WanVAE | LightDecoder:
    """What decodes the blocks: the VAE (as :func:`~longlive.inference.build.build_models` set it up, its fused
    kernels included) or the light decoder."""
    if cfg.decoder == "light":
        if models.light_decoder is None:
            raise ValueError(f"inference.decoder is light, but no light decoder was loaded: build_models() reads it "
                             f"from {LIGHT_DECODER_DIR} when the preset's inference.decoder is light (run "
                             f"`{DISTILL_STAGE}` to make it), or pass Models(light_decoder=...)")
        return models.light_decoder
    return models.vae


def run_request(request: GenerateRequest) -> int:
    """The body of ``longlive generate`` once :func:`~longlive.inference.request.check_generate_args` has
    passed: build the models, stream the video and say where it went."""
    device = resolve_device(request.device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    models = build_models(request.preset, request.base, request.checkpoint, device=device, dtype=dtype)
    result = generate_video(models, request.preset, request.schedule, seconds=request.seconds, out=request.out,
                            image=request.image, seed=request.seed)
    t = result.timings
    print(f"wrote {request.out} ({t['pixel_frames']} frames, {t['generated_fps']:.2f} fps generated, "
          f"first block after {t['first_block_latency_s']:.2f} s) and {timings_path(request.out)}")
    return 0
