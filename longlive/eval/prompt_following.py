"""Built-in prompt-following check for the synthetic shapes domain: plain image processing, no weights.

Each frame is reduced to one :class:`Detection` (is there an object, its palette colour, its shape, its
centroid); a video is then scored against a prompt schedule ``[(start_frame, caption), ...]`` whose
captions follow :mod:`longlive.data.synth`'s template ("a red circle moves left"). Per shot:

* ``colour_acc`` / ``shape_acc``: fraction of the shot's frames whose detected colour / shape is the
  caption's. A frame without a detected object counts as wrong, never skipped.
* ``motion_ok``: the least-squares line through the shot's centroid track, extended over the shot, moves
  the object less than ``MIN_TRAVEL`` of the frame's short side ("still") or else mostly left, right, up
  (``y`` decreasing, synth's convention) or down. Judged only if the object is present in at least
  ``MIN_PRESENT`` of the shot's frames (and two of them); otherwise ``motion_detected == "none"``, wrong.
* ``score = mean(colour_acc, shape_acc, motion_ok)``; the video score is the frame-weighted mean.

Chance: a caption drawn uniformly and independently of the video matches a present object's colour with
probability 1/8, its shape 1/3 and its motion 1/5, so such a video scores ``CHANCE_SCORE`` = 0.219 in
expectation (less if the object is missing); a frame matches colour and shape together with 1/24.

The detector is calibrated to survive what a small VAE does to a video: blur, noise, resampling and
brightness loss (see the constants' comments and ``tests/unit/test_prompt_following.py``). It assumes synth's
scene: one object covering well under half of a darker, roughly plain background.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from longlive.data.synth import BACKGROUND, COLOURS, MOTIONS, SHAPES, parse_caption

# Foreground = RGB distance to the background (the frame's per-channel median) above the larger of an
# absolute floor (palette colours lie >= 215 away from synth's background) and NOISE_K times the
# background's robust (MAD) noise level, so a noisy or blotchy background does not light up.
MIN_CONTRAST = 40.0
NOISE_K = 3.0
# The object is then re-segmented at HALF_MAX of its own contrast (90th percentile inside it): a blurred
# edge crosses half its height where the sharp edge was, so area, extent and centroid survive blur.
HALF_MAX = 0.5
MIN_AREA = 0.002  # of the frame; smaller blobs are "no object" (synth's smallest tiny triangle is 1.6 %)
# Shape (measured on 96 tiny clips, sharp / blurred / noisy / resampled / dimmed): an upward triangle is the
# only asymmetric shape; the hypot of the x and y skewness of its pixels is 0.49-0.68 sharp, >= 0.17 after
# a sigma-2 px blur (>= 0.12 at sigma 2.5, r=7), against <= 0.09 for circles and squares (2x resampled).
SKEW_TRIANGLE = 0.12
# Symmetric shapes: the bounding-box fill is 1 for a square (>= 0.905 at blur sigma 2.5, the worst) and
# pi/4 for a circle (<= 0.88, the worst being r=7 after 2x down/up-sampling).
FILL_SQUARE = 0.89
# Motion: synth moves a shape by >= 24 % of the short side over a shot (40 % of its room), still = 0.
MIN_TRAVEL = 0.08
MIN_PRESENT = 0.5

CHANCE_SCORE: float = (1 / len(COLOURS) + 1 / len(SHAPES) + 1 / len(MOTIONS)) / 3
MATCH_CHANCE: float = 1 / (len(COLOURS) * len(SHAPES))  # colour and shape both right by chance

# Colours are compared in a brightness-free chroma plane: subtract the background, divide by the largest
# channel (undoes blur's mixing with the dark background and any dimming), project onto the hue hexagon.
# White sits at the centre, the seven hues around it >= 0.40 apart; desaturation moves a hue toward the
# centre, not toward its neighbour (unlike nearest RGB).
_HEXAGON = np.array([[1.0, 0.0], [-0.5, np.sqrt(3) / 2], [-0.5, -np.sqrt(3) / 2]])
_NAMES = list(COLOURS)


def _chroma(rgb: np.ndarray) -> np.ndarray:
    v = np.clip(rgb, 0.0, None)
    return v / np.maximum(v.max(axis=-1, keepdims=True), 1e-6) @ _HEXAGON


_PALETTE = _chroma(np.array(list(COLOURS.values()), np.float64) - BACKGROUND)


@dataclass
class Detection:
    present: bool
    colour: str | None
    shape: str | None
    center: tuple[float, float] | None  # (x, y): column, row
    area: float  # fraction of the frame


_ABSENT = Detection(False, None, None, None, 0.0)


def _largest(mask: np.ndarray) -> np.ndarray | None:
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return None
    return labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))


def _shape(xs: np.ndarray, ys: np.ndarray) -> str:
    skew = [float(np.mean(d**3) / max(np.mean(d**2), 1e-9) ** 1.5) for d in (xs - xs.mean(), ys - ys.mean())]
    if np.hypot(*skew) > SKEW_TRIANGLE:
        return "triangle"
    fill = xs.size / ((np.ptp(xs) + 1) * (np.ptp(ys) + 1))
    return "square" if fill > FILL_SQUARE else "circle"


def detect(frame: np.ndarray) -> Detection:
    """The largest object in a uint8 (H, W, 3) frame: palette colour, shape, centroid, area."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"detect needs a uint8 frame (H, W, 3), got {frame.dtype} {frame.shape}")
    diff = frame.astype(np.float32) - np.median(frame.reshape(-1, 3), axis=0)
    dist = np.sqrt((diff**2).sum(-1))
    noise = 1.4826 * np.median(np.abs(diff).reshape(-1, 3), axis=0)
    floor = max(MIN_CONTRAST, NOISE_K * float(np.linalg.norm(noise)))
    blob = _largest(dist > floor)
    if blob is None:
        return _ABSENT
    peak = float(np.percentile(dist[blob], 90))
    blob = _largest(dist > max(floor, HALF_MAX * peak))
    if blob is None or blob.sum() < MIN_AREA * blob.size:
        return _ABSENT
    blob = ndimage.binary_fill_holes(blob)
    core = blob & (dist >= 0.75 * peak)  # the object's own colour, not its blurred rim
    rgb = np.median(diff[core if core.any() else blob], axis=0)
    colour = _NAMES[int(np.argmin(np.linalg.norm(_PALETTE - _chroma(rgb), axis=-1)))]
    ys, xs = np.nonzero(blob)
    return Detection(True, colour, _shape(xs, ys), (float(xs.mean()), float(ys.mean())), float(blob.mean()))


def detect_video(frames) -> list[Detection]:
    """:func:`detect` on every frame of a (T, H, W, 3) uint8 video (or a sequence of frames)."""
    return [detect(f) for f in frames]


@dataclass
class ShotScore:
    caption: str
    start_frame: int
    end_frame: int  # exclusive
    colour_acc: float
    shape_acc: float
    motion_ok: bool
    motion_detected: str  # one of MOTIONS, or "none" when the object is missing too often
    score: float


@dataclass
class VideoScore:
    shots: list[ShotScore]
    score: float
    transition_delays: list[int | None]  # one per caption switch; None if the new caption never shows
    per_segment: list[float]  # colour-and-shape matching rate per segment (default: per shot)
    stability: float  # 1 - mean |change| between consecutive segments; 1.0 for a single segment

    def _weighted(self, field: str) -> float:
        n = sum(s.end_frame - s.start_frame for s in self.shots)
        return sum(float(getattr(s, field)) * (s.end_frame - s.start_frame) for s in self.shots) / n

    @property
    def colour_acc(self) -> float:
        return self._weighted("colour_acc")

    @property
    def shape_acc(self) -> float:
        return self._weighted("shape_acc")

    @property
    def motion_acc(self) -> float:
        return self._weighted("motion_ok")

    def to_dict(self) -> dict:
        """JSON-ready, with the frame-weighted components and the chance level beside the score."""
        return {**asdict(self), "colour_acc": self.colour_acc, "shape_acc": self.shape_acc,
                "motion_acc": self.motion_acc, "chance_score": CHANCE_SCORE}


def _motion(dets: list[Detection], min_side: int) -> str:
    t = np.array([i for i, d in enumerate(dets) if d.present])
    if t.size < max(2, MIN_PRESENT * len(dets)):
        return "none"
    xy = np.array([dets[i].center for i in t])
    travel = np.polyfit(t, xy, 1)[0] * (len(dets) - 1)  # fitted (dx, dy) over the whole shot
    if np.abs(travel).max() < MIN_TRAVEL * min_side:
        return "still"
    if abs(travel[0]) >= abs(travel[1]):
        return "right" if travel[0] > 0 else "left"
    return "down" if travel[1] > 0 else "up"


def _delay(ok: np.ndarray) -> int | None:
    hits = np.nonzero(ok[:-1] & ok[1:])[0]  # first of two consecutive matching frames
    return int(hits[0]) if hits.size else None


def score_video(frames, schedule: list[tuple[int, str]], *, segment_frames: int | None = None) -> VideoScore:
    """Score uint8 (T, H, W, 3) ``frames`` against ``schedule``: (start pixel frame, caption) pairs, each
    caption holding from its start to the next start. ``segment_frames`` sets the ``per_segment`` windows
    (default: one per shot) for drift over long videos."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or len(frames) == 0:
        raise ValueError(f"score_video needs frames (T, H, W, 3) with T > 0, got shape {frames.shape}")
    n = len(frames)
    starts = [int(s) for s, _ in schedule]
    if not starts or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= n:
        raise ValueError(f"schedule starts {starts} must begin at 0 and increase strictly below {n} frames")
    if segment_frames is not None and segment_frames < 1:
        raise ValueError(f"segment_frames must be >= 1, got {segment_frames}")
    targets = [parse_caption(c) for _, c in schedule]
    ends = starts[1:] + [n]
    dets = detect_video(frames)
    shot_of = np.repeat(np.arange(len(starts)), np.diff(starts + [n]))
    colour_ok = np.array([d.colour == targets[k][0] for d, k in zip(dets, shot_of)])
    shape_ok = np.array([d.shape == targets[k][1] for d, k in zip(dets, shot_of)])
    both = colour_ok & shape_ok

    shots = []
    for start, end, (_, caption), (_, _, motion) in zip(starts, ends, schedule, targets):
        moved = _motion(dets[start:end], min(frames.shape[1:3]))
        c, s, m = float(colour_ok[start:end].mean()), float(shape_ok[start:end].mean()), moved == motion
        shots.append(ShotScore(caption, start, end, c, s, m, moved, (c + s + m) / 3))
    score = sum(sh.score * (sh.end_frame - sh.start_frame) for sh in shots) / n
    delays = [_delay(both[a:b]) for a, b in zip(starts[1:], ends[1:])]
    L = segment_frames
    windows = zip(starts, ends) if L is None else ((a, min(a + L, n)) for a in range(0, n, L))
    per_segment = [float(both[a:b].mean()) for a, b in windows]
    stability = 1.0 - float(np.abs(np.diff(per_segment)).mean()) if len(per_segment) > 1 else 1.0
    return VideoScore(shots, float(score), delays, per_segment, stability)

