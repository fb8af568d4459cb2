"""What ``longlive generate`` is asked to do, checked before anything heavy is imported or loaded.

:func:`check_generate_args` turns the command line into a :class:`GenerateRequest` or raises a one-line
:class:`~longlive.errors.UsageError` naming the problem and the fix: a bad length, an empty prompt, a
schedule out of order, an output path that cannot be written, an unreadable image, missing model
directories, an unknown device or ``--set`` key. Only then does :mod:`longlive.inference.generate` (torch,
diffusers, the models) load, so a typo costs a fraction of a second instead of a model load and a
traceback. The module imports nothing heavier than pydantic, PIL and numpy (torch only to check a device).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from longlive.config import InferenceConfig, Preset
from longlive.errors import UsageError
from longlive.inference.schedule import PromptSchedule, ScheduleError, block_sizes, latent_frame_at

LIGHT_DECODER_DIR = "models/light_decoder"  # the distill_decoder stage's output
AR_CONFIG_NAME = "ar_config.json"  # written by train_ar beside the student's dit/ directory
FROM_AR_CONFIG = ("block_frames", "independent_first_frame", "denoising_steps", "timestep_shift", "max_block_position")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov")  # containers that take H.264 from imageio's ffmpeg writer


def timings_path(out: str | os.PathLike) -> Path:
    """The timings JSON beside a video: ``video.mp4`` -> ``video.json``."""
    return Path(out).with_suffix(".json")


def read_ar_config(checkpoint: str | os.PathLike) -> dict | None:
    """The ``ar_config.json`` of a train_ar export (in the checkpoint directory or its parent), if any."""
    for d in (Path(checkpoint), Path(checkpoint).parent):
        if (d / AR_CONFIG_NAME).is_file():
            try:
                return json.loads((d / AR_CONFIG_NAME).read_text())
            except json.JSONDecodeError as e:
                raise UsageError(f"{d / AR_CONFIG_NAME} is not valid JSON ({e}); re-export the checkpoint "
                                 "(train_ar writes it) or delete the file") from None
    return None


def with_ar_config(cfg: InferenceConfig, ar_config: dict | None) -> InferenceConfig:
    """The student's training layout and step list (block size, first frame, steps, shift) win over the preset's."""
    if not ar_config:
        return cfg
    return InferenceConfig.model_validate({**cfg.model_dump(), **{k: ar_config[k] for k in FROM_AR_CONFIG if k in ar_config}})


def validation_line(e) -> str:
    """A pydantic ``ValidationError`` as one line: ``field: message (got value); ...``."""
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']} (got {err.get('input')!r})"
                     for err in e.errors())


def inference_overrides(cfg: InferenceConfig, pairs: list[str]) -> InferenceConfig:
    """Apply ``KEY=VALUE`` overrides (values parsed as YAML) and re-validate."""
    import yaml
    from pydantic import ValidationError

    updates = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in InferenceConfig.model_fields:
            raise UsageError(f"--set {pair!r}: expected KEY=VALUE with KEY one of {sorted(InferenceConfig.model_fields)}")
        try:
            updates[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UsageError(f"--set {pair!r}: the value is not valid YAML ({' '.join(str(e).split())}); quote it") from None
    try:
        return InferenceConfig.model_validate({**cfg.model_dump(), **updates})
    except ValidationError as e:
        raise UsageError(f"--set: {validation_line(e)}; see `longlive config` for the current inference settings") from None


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
    """The model directories :func:`~longlive.inference.generate.load_models` will read, present as directories."""
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
    if not ((checkpoint / "config.json").is_file() or (checkpoint / "dit" / "config.json").is_file()):
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
    preset: Preset  # its inference settings are the ones to use (preset, then ar_config.json, then --set)
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
    from pydantic import ValidationError

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
    checkpoint = Path(checkpoint) if checkpoint else base / "dit"
    ar_config = read_ar_config(checkpoint)
    try:
        cfg = with_ar_config(preset.inference, ar_config)
    except ValidationError as e:
        raise UsageError(f"the ar_config.json beside {checkpoint}: {validation_line(e)}; re-export the checkpoint") from None
    cfg = inference_overrides(cfg, args.set)
    preset = preset.model_copy(update={"inference": cfg})
    check_models(preset, base, checkpoint)
    seconds = check_seconds(args.seconds, cfg.max_seconds)

    warnings = []
    schedule = PromptSchedule.single(args.prompt) if args.prompt is not None else PromptSchedule.load(args.prompt_schedule)
    tc, fps = preset.vae.temporal_compression, preset.video.fps
    sizes = block_sizes(latent_frames_for(seconds, fps, tc), cfg.block_frames,
                        first_alone=image is not None and cfg.independent_first_frame)
    try:  # the order of the starts is checked here, where the fps that compares seconds with frames is known
        warnings += schedule.unused(schedule.plan(sizes, fps, tc), fps, tc)
    except ScheduleError as e:
        raise ScheduleError(f"prompt schedule {args.prompt_schedule}: {e}" if args.prompt_schedule else str(e)) from None
    i2v = bool(ar_config and ar_config.get("i2v"))
    if ar_config and ar_config.get("i2v") and image is None:
        warnings.append("this student was trained for I2V; pass --image FIRST_FRAME.png")
    if image is not None and not i2v:
        why = "its ar_config.json says i2v: false" if ar_config else "it has no ar_config.json with i2v: true"
        warnings.append(f"--image with a T2V checkpoint ({checkpoint}: {why}): the image becomes frame 0 but the "
                        "frames after it may not follow it; use an I2V checkpoint (models/ar/i2v)")

    device = check_device(args.device or preset.device)
    if cfg.vae_device != "auto":
        check_device(cfg.vae_device, "inference.vae_device")
    return GenerateRequest(preset, base, checkpoint, schedule, seconds, out, image, args.seed, device, warnings)


__all__ = [
    "AR_CONFIG_NAME", "FROM_AR_CONFIG", "GenerateRequest", "LIGHT_DECODER_DIR", "check_generate_args", "check_out",
    "check_seconds", "latent_frames_for", "read_ar_config", "read_image", "timings_path", "with_ar_config",
]
