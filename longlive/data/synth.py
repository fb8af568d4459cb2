"""Procedural synthetic videos with ground truth: one coloured shape moving on a dark background.

Every clip is a pure function of ``(synth.seed, index)`` (``numpy.random.default_rng(seed + index)``),
so clip ``i`` never depends on clip ``j`` and the same seed gives byte-identical files. Captions follow
one template, ``"a {colour} {shape} moves {left|right|up|down}"`` or ``"a {colour} {shape} stays still"``
(``"an"`` before a vowel: ``"an orange square"``),
which :func:`parse_caption` inverts; the tiny text encoder and the prompt-following scorer reuse the
constants below.

Coordinates: ``x`` is the column index, ``y`` the row index, pixel centres at integers. ``radius`` is the
radius of a circle, half the side of a square and the circumradius of an (upward) equilateral triangle;
in all three the recorded centre is the shape's centroid.

A multi-shot clip is two shots separated by a hard cut on a VAE temporal-group edge: pixel frame
``1 + tc*k`` (tc = temporal compression), which is exactly where latent frame ``k + 1`` starts, so the
latent boundary is clean.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from longlive.config import Preset
from longlive.io import atomic_dir

# Fixed, well separated hues; the scorer classifies by nearest RGB, so do not make two close.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 50),
    "blue": (40, 80, 240),
    "yellow": (240, 225, 30),
    "cyan": (30, 220, 230),
    "magenta": (220, 40, 220),
    "white": (245, 245, 245),
    "orange": (250, 135, 15),
}
BACKGROUND: tuple[int, int, int] = (16, 16, 20)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still")
# Unit direction (dx, dy) of each motion in image coordinates (y grows downwards).
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
# Every word a caption can contain, in a fixed order (the tiny text encoder's vocabulary).
CAPTION_WORDS: tuple[str, ...] = ("a", "an", "moves", "stays", *COLOURS, *SHAPES, *MOTIONS)

PREVIEW_CLIPS = 8


@dataclass
class Shot:
    start_frame: int
    start_latent_frame: int
    caption: str
    colour: str
    rgb: tuple[int, int, int]
    shape: str
    motion: str


@dataclass
class Clip:
    key: str
    frames: np.ndarray  # (T, H, W, 3) uint8
    shots: list[Shot]
    centers: np.ndarray  # (T, 2) float64, (x, y) per frame
    radius: float


def make_caption(colour: str, shape: str, motion: str) -> str:
    verb = "stays still" if motion == "still" else f"moves {motion}"
    article = "an" if colour[0] in "aeiou" else "a"  # "an orange square"
    return f"{article} {colour} {shape} {verb}"


def parse_caption(caption: str) -> tuple[str, str, str]:
    """Inverse of :func:`make_caption`: ``"a red circle moves left"`` -> ``("red", "circle", "left")``."""
    words = caption.strip().lower().split()
    ok = (
        len(words) == 5
        and words[0] in ("a", "an")
        and words[1] in COLOURS
        and words[2] in SHAPES
        and ((words[3] == "moves" and words[4] in MOTIONS[:-1]) or words[3:] == ["stays", "still"])
    )
    if not ok:
        raise ValueError(f"caption {caption!r} does not follow 'a COLOUR SHAPE moves DIR' / 'a COLOUR SHAPE stays still'")
    return words[1], words[2], words[4]


def clip_key(index: int) -> str:
    return f"clip-{index:06d}"


def is_multishot(index: int, fraction: float) -> bool:
    # Spread exactly round(fraction * n) multi-shot clips evenly over the indices, from the index alone.
    return int((index + 1) * fraction + 1e-9) > int(index * fraction + 1e-9)


def shape_mask(shape: str, cx: float, cy: float, r: float, h: int, w: int) -> np.ndarray:
    """Boolean (h, w) mask of ``shape`` centred (centroid) at (cx, cy) with size ``r``."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    mask = np.zeros((h, w), bool)
    # Evaluate only the shape's bounding box: large presets have 704x1280 frames.
    x0, x1 = max(int(np.floor(cx - r)), 0), min(int(np.ceil(cx + r)) + 1, w)
    y0, y1 = max(int(np.floor(cy - r)), 0), min(int(np.ceil(cy + r)) + 1, h)
    if x0 >= x1 or y0 >= y1:
        return mask
    y, x = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif shape == "square":
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    else:
        # Upward equilateral triangle with circumradius r: apex at dy=-r, base at dy=r/2, centroid at 0.
        s = np.sqrt(3.0)
        inside = (dy <= r / 2) & (s * dx - dy <= r) & (-s * dx - dy <= r)
    mask[y0:y1, x0:x1] = inside
    return mask


def _trajectory(rng: np.random.Generator, motion: str, n: int, r: float, h: int, w: int) -> np.ndarray:
    """(n, 2) centres moving at constant velocity that keep the whole shape in frame."""
    lo, hi_x, hi_y = r + 1.0, w - 2.0 - r, h - 2.0 - r  # one pixel margin from each edge
    dx, dy = DIRECTIONS[motion]
    span = (hi_x - lo) if dx else (hi_y - lo)
    # Travel 40-90% of the room there is, so motion is visible yet never leaves the frame.
    travel = 0.0 if motion == "still" else rng.uniform(0.4, 0.9) * span
    start = np.array([rng.uniform(lo, hi_x), rng.uniform(lo, hi_y)])
    for axis, d in ((0, dx), (1, dy)):
        if d:
            hi = hi_x if axis == 0 else hi_y
            start[axis] = rng.uniform(lo + travel, hi) if d < 0 else rng.uniform(lo, hi - travel)
    t = np.arange(n, dtype=np.float64)[:, None] / max(n - 1, 1)
    return start[None, :] + t * travel * np.array([dx, dy], dtype=np.float64)[None, :]


def make_clip(index: int, preset: Preset) -> Clip:
    cfg, v = preset.synth, preset.video
    tc = preset.vae.temporal_compression
    rng = np.random.default_rng(cfg.seed + index)
    groups = (v.num_frames - 1) // tc  # latent frames after the first
    radius = float(rng.integers(cfg.min_radius, cfg.max_radius + 1))

    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    motion = str(rng.choice(MOTIONS))
    specs = [(0, colour, shape, motion)]
    if is_multishot(index, cfg.multishot_fraction) and groups >= 2:
        k = int(rng.integers(1, groups))  # boundary at pixel 1 + tc*k, i.e. latent frame k + 1
        change = int(rng.integers(3))  # 0: colour, 1: shape, 2: both; the motion always changes
        colour2 = str(rng.choice([c for c in COLOURS if c != colour])) if change != 1 else colour
        shape2 = str(rng.choice([s for s in SHAPES if s != shape])) if change != 0 else shape
        motion2 = str(rng.choice([m for m in MOTIONS if m != motion]))
        specs.append((1 + tc * k, colour2, shape2, motion2))

    frames = np.empty((v.num_frames, v.height, v.width, 3), np.uint8)
    frames[:] = BACKGROUND
    centers = np.empty((v.num_frames, 2), np.float64)
    shots = []
    for i, (start, col, shp, mot) in enumerate(specs):
        end = specs[i + 1][0] if i + 1 < len(specs) else v.num_frames
        # A new shot is a hard cut: the new shape appears at a fresh position.
        centers[start:end] = _trajectory(rng, mot, end - start, radius, v.height, v.width)
        for t in range(start, end):
            frames[t][shape_mask(shp, *centers[t], radius, v.height, v.width)] = COLOURS[col]
        start_latent = 0 if start == 0 else (start - 1) // tc + 1
        shots.append(Shot(start, start_latent, make_caption(col, shp, mot), col, COLOURS[col], shp, mot))
    return Clip(clip_key(index), frames, shots, centers, radius)


def clip_record(clip: Clip, preset: Preset) -> dict:
    """The clip's line in ``index.jsonl``: captions, shots and per-frame ground truth."""
    v = preset.video
    return {
        "key": clip.key,
        "video": f"videos/{clip.key}.npy",
        "num_frames": v.num_frames,
        "fps": v.fps,
        "height": v.height,
        "width": v.width,
        "captions": [s.caption for s in clip.shots],
        "shots": [{**asdict(s), "rgb": list(s.rgb)} for s in clip.shots],
        "radius": clip.radius,
        "centers": [[round(float(x), 4), round(float(y), 4)] for x, y in clip.centers],
        "radii": [clip.radius] * len(clip.centers),
    }


def write_dataset(preset: Preset, out_dir: str | os.PathLike) -> dict:
    """Write ``num_videos`` clips to ``out_dir`` atomically and return the stats.

    Layout: ``videos/{key}.npy`` (uint8 T,H,W,3), ``index.jsonl``, ``previews/{key}.mp4`` (first 8),
    ``stats.json``. Everything goes to a sibling temporary directory first, renamed into place at the
    end, so a crash never leaves a half-written dataset that DVC or the encode stage could pick up.
    """
    from longlive.data.video_io import write_mp4  # imageio is only needed when writing

    counts = {"colour": Counter(), "shape": Counter(), "motion": Counter()}
    n_multi = 0
    with atomic_dir(out_dir) as tmp:
        (tmp / "videos").mkdir()
        (tmp / "previews").mkdir()
        with open(tmp / "index.jsonl", "w") as index:
            for i in tqdm(range(preset.synth.num_videos), desc="synth", unit="clip", disable=None):
                clip = make_clip(i, preset)
                np.save(tmp / "videos" / f"{clip.key}.npy", clip.frames, allow_pickle=False)
                index.write(json.dumps(clip_record(clip, preset), sort_keys=True) + "\n")
                if i < PREVIEW_CLIPS:
                    write_mp4(tmp / "previews" / f"{clip.key}.mp4", clip.frames, preset.video.fps)
                n_multi += len(clip.shots) > 1
                for s in clip.shots:
                    counts["colour"][s.colour] += 1
                    counts["shape"][s.shape] += 1
                    counts["motion"][s.motion] += 1
        stats = {
            "clips": preset.synth.num_videos,
            "multishot_clips": n_multi,
            "shots": sum(counts["shape"].values()),
            "seed": preset.synth.seed,
            **{name: {k: c[k] for k in order} for (name, c), order in zip(counts.items(), (COLOURS, SHAPES, MOTIONS))},
        }
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def read_index(out_dir: str | os.PathLike) -> list[dict]:
    path = Path(out_dir) / "index.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run the synth stage (dvc repro synth) first")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_frames(out_dir: str | os.PathLike, key: str) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of clip ``key``."""
    return np.load(Path(out_dir) / "videos" / f"{key}.npy", allow_pickle=False)
