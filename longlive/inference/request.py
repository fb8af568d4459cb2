"""What ``longlive generate`` is asked to do, checked before anything heavy is imported or loaded.

:func:`check_generate_args` turns the command line into a :class:`GenerateRequest` or raises a one-line
:class:`~longlive.errors.UsageError` naming the problem and the fix: a bad length, an empty prompt, a
schedule out of order, an output path that cannot be written, an unreadable image, missing model
directories, an unknown device or ``--set`` key. Only then does :mod:`longlive.inference.generate` (torch,
diffusers, the models) load, so a typo costs a fraction of a second instead of a model load and a
traceback. The module imports nothing heavier than pydantic, PIL and numpy (torch only to check a device).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from longlive.config import Preset
from longlive.errors import UsageError
from longlive.inference.schedule import PromptSchedule, ScheduleError, latent_frame_at, stream_block_sizes
from longlive.models.checkpoint import AR_CONFIG_NAME, DIT_DIR, Checkpoint

LIGHT_DECODER_DIR = "models/light_decoder"  # the distill_decoder stage's output
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov")  # containers that take H.264 from imageio's ffmpeg writer


def timings_path(out: str | os.PathLike) -> Path:
    """The timings JSON beside a video: ``video.mp4`` -> ``video.json``."""
    return Path(out).with_suffix(".json")


def check_seconds(seconds: float, max_seconds: float) -> float:
    """A video length that can be generated: a finite number of seconds in (0, ``max_seconds``]."""
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
        raise UsageError(f"--seconds {seconds:g}: give the video length as a number of seconds > 0, e.g. --seconds 10")
    if seconds > max_seconds:
        raise UsageError(f"--seconds {seconds:g} is longer than inference.max_seconds ({max_seconds:g} s); if you mean "
                         f"it, raise the limit with --set max_seconds={seconds:g} (or inference.max_seconds in params.yaml)")
    return float(seconds)


def latent_frames_for(seconds: float, fps: int, temporal_compression: int) -> int:
    """Latent frames covering ``seconds`` of video: the last pixel frame included."""
    return latent_frame_at(max(1, math.ceil(seconds * fps)), temporal_compression)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """A still image file as uint8 (H, W, 3) RGB, or a :class:`UsageError` naming the file and what is wrong."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise UsageError(f"--image {path} {what}; give a PNG or JPEG file for the first frame")
    try:
        with Image.open(path) as im:
            im.verify()  # structure and checksums (PNG); verify() leaves the image unusable, so it is reopened
        with Image.open(path) as im:
            im.load()  # decodes every pixel: a truncated file fails here
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except UnidentifiedImageError:
        raise UsageError(f"--image {path} is not an image file PIL can read; give a PNG or JPEG") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # PIL reports broken chunks, bad checksums and truncation as OSError / SyntaxError
        raise UsageError(f"--image {path} is corrupt or truncated ({' '.join(str(e).split())}); re-export it as "
                         "PNG or JPEG") from None


def check_out(out: str | os.PathLike) -> Path:
    """An output video path that can be written: a file path with a video suffix under a writable directory
    (missing parent directories are created when the video is written)."""
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a file path such as {out / 'video.mp4'}")
    if out.suffix.lower() not in VIDEO_SUFFIXES:
        raise UsageError(f"--out {out}: give a video path ending in {' / '.join(VIDEO_SUFFIXES)} "
                         "(the timings JSON goes beside it)")
    if timings_path(out).is_dir():
        raise UsageError(f"--out {out}: its timings path {timings_path(out)} is a directory; move it or pick another --out")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--out {out}: {parent} is a file, not a directory; pick another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: {parent} is not writable; pick another --out")
    return out


def check_models(preset: Preset, base: Path, checkpoint: Path) -> None:
    """The model directories :func:`~longlive.inference.build.build_models` will read, present as directories."""
    hint = "run `dvc repro base` (or `longlive stage base`), or pass --base DIR"
    if not base.is_dir():
        raise UsageError(f"base models directory {base} not found; {hint}")
    if not (base / "vae").is_dir():
        raise UsageError(f"{base} has no vae/ directory; {hint}")
    if preset.text.kind == "tiny" and not (base / "text").is_dir():
        raise UsageError(f"{base} has no text/ directory (the tiny text encoder); {hint}")
    if preset.text.kind != "tiny" and not Path(preset.text.path or base / "text").is_dir():
        raise UsageError(f"UMT5 text encoder {preset.text.path or base / 'text'} not found; set text.path in "
                         "params.yaml to a local umt5-xxl directory")
    if not checkpoint.is_dir():
        raise UsageError(f"checkpoint {checkpoint} not found; give a DiT directory, a train_ar/train_dmd export "
                         "(with dit/ inside) or a pulled release (`longlive pull`)")
    if not ((checkpoint / "config.json").is_file() or (checkpoint / DIT_DIR / "config.json").is_file()):
        raise UsageError(f"checkpoint {checkpoint} holds no config.json (nor dit/config.json): it is not a DiT "
                         "directory or a train_ar export; point --checkpoint at one")
    if preset.inference.decoder == "light" and not Path(LIGHT_DECODER_DIR).is_dir():
        raise UsageError(f"inference.decoder is light but {LIGHT_DECODER_DIR} does not exist; run the distill_decoder "
                         "stage, or --set decoder=vae")


def check_device(name: str, what: str = "--device") -> str:
    """A device name torch knows and this machine has (``auto`` stays auto)."""
    from longlive.device import DeviceError, resolve_device

    try:
        resolve_device(name)
    except DeviceError as e:
        raise UsageError(f"{what}: {e}") from None
    return name


@dataclass
class GenerateRequest:
    preset: Preset  # its inference settings are the ones to use (Checkpoint.inference: preset < trained < --set)
    base: Path
    checkpoint: Path | None  # None: <base>/dit
    schedule: PromptSchedule
    seconds: float
    out: Path
    image: np.ndarray | None  # uint8 (H, W, 3)
    seed: int | None
    device: str
    warnings: list[str] = field(default_factory=list)  # one line each, printed before the models load


def check_generate_args(args) -> GenerateRequest:
    """Validate ``longlive generate``'s arguments (an ``argparse.Namespace``) without loading a model."""
    from longlive.config import load_preset
    from longlive.publish.release import find_release

    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("--prompt is empty; give the text to generate from, e.g. --prompt 'a red circle moves left'")
    if not isinstance(args.seconds, (int, float)) or not math.isfinite(args.seconds) or args.seconds <= 0:
        check_seconds(args.seconds, math.inf)  # raises, naming the value
    out = check_out(args.out)
    image = read_image(args.image) if args.image else None

    base, checkpoint, release, variant = Path(args.base), args.checkpoint, None, None
    found = find_release(checkpoint) if checkpoint else None
    if found is not None:  # a release folder: its base models and DiT, and its preset unless --preset/--params
        release, variant = found
        base, checkpoint = release.base, release.checkpoint(variant)
    use_release_preset = release is not None and not (args.preset or args.params)
    preset = release.preset() if use_release_preset else load_preset(args.preset, args.params)
    checkpoint = Path(checkpoint) if checkpoint else base / DIT_DIR
    ckpt = Checkpoint.open(checkpoint)
    cfg = ckpt.inference(preset.inference, overrides=args.set)
    preset = preset.model_copy(update={"inference": cfg})
    check_models(preset, base, checkpoint)
    seconds = check_seconds(args.seconds, cfg.max_seconds)

    warnings = []
    schedule = PromptSchedule.single(args.prompt) if args.prompt is not None else PromptSchedule.load(args.prompt_schedule)
    tc, fps = preset.vae.temporal_compression, preset.video.fps
    sizes = stream_block_sizes(latent_frames_for(seconds, fps, tc), cfg.block_frames,
                        first_alone=image is not None and cfg.independent_first_frame)
    try:  # the order of the starts is checked here, where the fps that compares seconds with frames is known
        warnings += schedule.unused(schedule.plan(sizes, fps, tc), fps, tc)
    except ScheduleError as e:
        raise ScheduleError(f"prompt schedule {args.prompt_schedule}: {e}" if args.prompt_schedule else str(e)) from None
    if ckpt.i2v and image is None:
        warnings.append("this student was trained for I2V; pass --image FIRST_FRAME.png")
    if image is not None and not ckpt.i2v:
        why = f"its {AR_CONFIG_NAME} says i2v: false" if ckpt.trained else f"it has no {AR_CONFIG_NAME} with i2v: true"
        warnings.append(f"--image with a T2V checkpoint ({checkpoint}: {why}): the image becomes frame 0 but the "
                        "frames after it may not follow it; use an I2V checkpoint (models/ar/i2v)")

    device = check_device(args.device or preset.device)
    if cfg.vae_device != "auto":
        check_device(cfg.vae_device, "inference.vae_device")
    return GenerateRequest(preset, base, checkpoint, schedule, seconds, out, image, args.seed, device, warnings)


__all__ = [
    "GenerateRequest", "LIGHT_DECODER_DIR", "check_generate_args", "check_out", "check_seconds", "latent_frames_for",
    "read_image", "timings_path",
]
