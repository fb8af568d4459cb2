"""``longlive generate``: load the models, stream a video to mp4 and write a JSON of timings.

Models: the VAE and text encoder from the base directory (``models/base``: ``vae/``, ``text/``; UMT5 from
``text.path``), the DiT from ``checkpoint`` (default ``<base>/dit``; any :func:`load_dit` checkpoint), and with
``inference.decoder: light`` the distilled light decoder (``models/light_decoder``, the distill_decoder stage).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from longlive.config import InferenceConfig, Preset
from longlive.data.video_io import frames_to_tensor
from longlive.inference.pipeline import StreamingPipeline
from longlive.inference.schedule import PromptSchedule, block_sizes, eval_schedule, latent_frame_at
from longlive.inference.writer import BlockDecoder, Mp4Stream
from longlive.models.dit import WanDiT
from longlive.models.light_decoder import DISTILL_STAGE, LightDecoder
from longlive.models.text import TextEncoder, load_text_encoder
from longlive.models.vae import WanVAE
from longlive.models.lora import load_and_merge_adapter
from longlive.quant.checkpoint import is_nvfp4_checkpoint, load_nvfp4_dit
from longlive.models.wan_adapter import load_dit


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


LIGHT_DECODER_DIR = "models/light_decoder"  # the distill_decoder stage's output


@dataclass
class Models:
    dit: WanDiT
    vae: WanVAE
    text: TextEncoder
    light_decoder: LightDecoder | None = None  # inference.decoder: light


def load_models(
    preset: Preset,
    base: str | os.PathLike = "models/base",
    checkpoint: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    light_decoder: str | os.PathLike = LIGHT_DECODER_DIR,
) -> Models:
    """``light_decoder``: where the light decoder is read from when ``preset.inference.decoder`` is ``light`` (it
    goes to the VAE's device, in ``dtype``, float32 when None)."""
    base = Path(base)
    device = torch.device(device)
    checkpoint = Path(checkpoint or base / "dit")
    export_dir = None
    if (checkpoint / "dit").is_dir():  # a train_ar / train_dmd export: dit/ beside ar_config.json
        export_dir, checkpoint = checkpoint, checkpoint / "dit"
    if is_nvfp4_checkpoint(checkpoint):  # a quantize-stage export: packed weights, backend picked for the device
        dit = load_nvfp4_dit(checkpoint, backend=preset.quant.backend, device=device)
    else:
        dit = load_dit(checkpoint, dtype=dtype, expect=preset.dit)
        # a LoRA-trained student: lora.safetensors beside dit/ (given the export or its dit/ directory)
        load_and_merge_adapter(dit, export_dir or checkpoint.parent)
        dit = dit.to(device).eval()
    vae_device = resolve_device(preset.inference.vae_device) if preset.inference.vae_device != "auto" else device
    vae = WanVAE.from_pretrained(base / "vae", expect=preset.vae, device=vae_device).eval()
    text = load_text_encoder(preset.text, base / "text")
    light = None
    if preset.inference.decoder == "light":  # on the VAE's device: vae_device is the decoder's device
        light = LightDecoder.from_pretrained(light_decoder, expect=preset.light_decoder, latent_channels=vae.z_dim,
                                             dtype=dtype or torch.float32, device=vae_device)
    return Models(dit, vae, text, light)


def load_release_models(
    release: str | os.PathLike,
    variant: str | None = None,
    *,
    preset: Preset | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[Models, Preset]:
    """Load a release folder (``longlive pull``): the DiT of ``checkpoints/<variant>``, the VAE and text
    encoder of ``base/``, and the preset the release was built with (unless ``preset`` is given), its
    inference settings updated from the student's ``ar_config.json``. ``release`` may also be
    ``<release>/checkpoints/<variant>``. Returns ``(models, preset)`` for :func:`generate_video`."""
    from longlive.publish import ReleaseError
    from longlive.publish.release import Release, find_release

    rel, named = find_release(release) or (Release.open(release), None)  # open() explains what is missing
    checkpoint = rel.checkpoint(variant or named)
    kind = rel.info["checkpoints"][checkpoint.name].get("kind")
    if kind != "dit":
        raise ReleaseError(f"checkpoint {checkpoint.name} of release {rel.version} is {kind}, which load_models cannot "
                           "load yet; pick one of its DiT checkpoints (kind dit in release.json)")
    preset = preset or rel.preset()
    preset = preset.model_copy(update={"inference": with_ar_config(preset.inference, read_ar_config(checkpoint))})
    return load_models(preset, rel.base, checkpoint, device=device, dtype=dtype), preset


def load_image(image: str | os.PathLike | np.ndarray, height: int, width: int) -> torch.Tensor:
    """A PNG/JPEG path or a uint8 (H, W, 3[+1]) array -> (1, 3, 1, height, width) in [-1, 1] (resized)."""
    if not isinstance(image, np.ndarray):
        import imageio.v3 as iio

        image = iio.imread(Path(image))
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4) or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3 or 4), got {image.dtype} {image.shape}")
    x = frames_to_tensor(np.ascontiguousarray(image[None, ..., :3]))  # (3, 1, H, W)
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x.transpose(0, 1), size=(height, width), mode="bilinear", antialias=True,
                          align_corners=False).transpose(0, 1).clamp(-1, 1)
    return x[None]


def timings_path(out: str | os.PathLike) -> Path:
    """The timings JSON beside a video: ``video.mp4`` -> ``video.json``."""
    return Path(out).with_suffix(".json")


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
    to whole blocks. ``image``: path, uint8 array or a (1, 3, 1, H, W) tensor in [-1, 1] (I2V).
    Writes ``out`` (mp4) and its timings (:func:`timings_path`) when ``out`` is given."""
    cfg = inference or preset.inference
    tc, fps = preset.vae.temporal_compression, preset.video.fps
    if latent_frames is None:
        if seconds is None or seconds <= 0:
            raise ValueError("give seconds > 0 or latent_frames")
        latent_frames = latent_frame_at(max(1, math.ceil(seconds * fps)), tc)  # covers the last pixel frame
    dit, vae, text = models.dit, models.vae, models.text
    device = next(dit.parameters()).device
    pipe = StreamingPipeline(dit, cfg, device, kv_cache=preset.quant.kv_cache)
    C, _, h, w = preset.latent_shape

    image_latent = None
    if image is not None:
        pixels = image if isinstance(image, torch.Tensor) else load_image(image, preset.video.height, preset.video.width)
        with torch.no_grad():
            image_latent = vae.encode(pixels.to(next(vae.parameters()).device)).float()
    sizes = block_sizes(latent_frames, cfg.block_frames, first_alone=image is not None and cfg.independent_first_frame)
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
                           frames_per_call=cfg.vae_frames_per_call)
    blocks, outputs, ok = [], [], False
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
                           "generated_at": time.perf_counter() - start})
            outputs.append(block)
        decode = decoder.close()
        ok = True
    finally:
        if not ok:
            try:
                decoder.close()
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
        if writer is not None:
            writer.close(ok)
    total = time.perf_counter() - start

    for b, block_output in zip(blocks, outputs):
        b.update(block_output.timings)
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
        timings_path(out).write_text(json.dumps(timings, indent=2) + "\n")
    return GenerationResult(
        Path(out) if out is not None else None, timings, timings["schedule"],
        np.concatenate(frames_out) if keep_frames else None,
        torch.cat(latents_out, dim=2) if keep_latents else None,
    )


def block_decoder_model(models: Models, cfg: InferenceConfig) -> WanVAE | LightDecoder:
    """What decodes the blocks: the VAE (with its fused kernels when ``cfg.kernels``) or the light decoder."""
    if cfg.decoder == "light":
        if models.light_decoder is None:
            raise ValueError(f"inference.decoder is light, but no light decoder was loaded: load_models() reads it "
                             f"from {LIGHT_DECODER_DIR} when the preset's inference.decoder is light (run "
                             f"`{DISTILL_STAGE}` to make it), or pass Models(light_decoder=...)")
        return models.light_decoder
    if cfg.kernels:  # the decoder's fused norm + SiLU (bitwise the reference off CUDA)
        from longlive.inference.fast_vae import apply_vae_kernels

        apply_vae_kernels(models.vae)
    return models.vae


AR_CONFIG_NAME = "ar_config.json"  # written by train_ar beside the student's dit/ directory
FROM_AR_CONFIG = ("block_frames", "independent_first_frame", "denoising_steps", "timestep_shift", "max_block_position")


def read_ar_config(checkpoint: str | os.PathLike) -> dict | None:
    """The ``ar_config.json`` of a train_ar export (in the checkpoint directory or its parent), if any."""
    for d in (Path(checkpoint), Path(checkpoint).parent):
        if (d / AR_CONFIG_NAME).is_file():
            return json.loads((d / AR_CONFIG_NAME).read_text())
    return None


def with_ar_config(cfg: InferenceConfig, ar_config: dict | None) -> InferenceConfig:
    """The student's training layout and step list (block size, first frame, steps, shift) win over the preset's."""
    if not ar_config:
        return cfg
    return InferenceConfig.model_validate({**cfg.model_dump(), **{k: ar_config[k] for k in FROM_AR_CONFIG if k in ar_config}})


def inference_overrides(cfg: InferenceConfig, pairs: list[str]) -> InferenceConfig:
    """Apply ``KEY=VALUE`` overrides (values parsed as YAML) and re-validate."""
    import yaml

    updates = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in InferenceConfig.model_fields:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE with KEY one of {sorted(InferenceConfig.model_fields)}")
        updates[key] = yaml.safe_load(value)
    return InferenceConfig.model_validate({**cfg.model_dump(), **updates})


def cli_generate(args) -> int:
    """The body of ``longlive generate`` (see ``longlive generate --help``)."""
    import sys

    from pydantic import ValidationError

    from longlive.config import ConfigError, load_preset
    from longlive.publish import ReleaseError, find_release

    try:
        base, checkpoint, release = args.base, args.checkpoint, None
        found = find_release(args.checkpoint) if args.checkpoint else None
        if found is not None:  # a release folder: its base models and DiT, and its preset unless --preset/--params
            release, variant = found
            base, checkpoint = release.base, release.checkpoint(variant)
        use_release_preset = release is not None and not (args.preset or args.params)
        preset = release.preset() if use_release_preset else load_preset(args.preset, args.params)
        ar_config = read_ar_config(checkpoint) if checkpoint else None
        cfg = inference_overrides(with_ar_config(preset.inference, ar_config), args.set)
        schedule = PromptSchedule.single(args.prompt) if args.prompt else PromptSchedule.load(args.prompt_schedule)
    except (ConfigError, ValidationError, ValueError, FileNotFoundError, ReleaseError) as e:
        print(f"longlive generate: {e}", file=sys.stderr)
        return 2
    if ar_config and ar_config.get("i2v") and not args.image:
        print("longlive generate: warning: this student was trained for I2V; pass --image", file=sys.stderr)
    device = resolve_device(args.device or preset.device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    preset = preset.model_copy(update={"inference": cfg})
    models = load_models(preset, base, checkpoint, device=device, dtype=dtype)
    result = generate_video(models, preset, schedule, seconds=args.seconds, out=args.out, image=args.image,
                            seed=args.seed)
    t = result.timings
    print(f"wrote {args.out} ({t['pixel_frames']} frames, {t['generated_fps']:.2f} fps generated, "
          f"first block after {t['first_block_latency_s']:.2f} s) and {timings_path(args.out)}")
    return 0
