"""Where clips are cut: the settings of one ingest run and the windows (start time + shots) of a video.

A clip is ``num_frames`` frames sampled at the preset's ``fps``: frame ``t`` of a clip starting at ``a``
shows the video as it is at time ``a + t / fps`` (the last source frame whose timestamp is <= that time),
so any source frame rate, variable ones included, resamples the same way. Windows start every
``stride`` seconds (back to back by default), at most ``max_clips`` per video.

Shots: a clip that spans a cut becomes a multi-shot clip in the format ``synth`` writes (``shots``:
``start_frame``, ``start_latent_frame``, ``caption``). The causal VAE groups pixel frames
``1 + tc*(j-1) .. tc*j`` into latent frame ``j``, so a shot can only start at pixel frame ``1 + tc*k``
(latent frame ``k + 1``) without one latent frame mixing two shots. The window is therefore moved
(by at most half a latent group) so that its first cut falls exactly on such a frame; a later cut in
the same clip, or one the move cannot reach (segment edges, a cut just before), is snapped to the
nearest one instead and counted (``snapped_cuts``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

# A sample time this close after a frame's timestamp still shows that frame: timestamps are rationals
# (pts * time_base) and cut times come from other arithmetic, so exact equality cannot be relied on.
TIME_EPS = 1e-4


@dataclass(frozen=True)
class IngestSettings:
    """Everything that decides a video's clips; its JSON is part of every cache key."""

    height: int
    width: int
    num_frames: int
    fps: int
    temporal_compression: int
    stride: float | None = None  # seconds between clip starts; None: one clip after the other
    max_clips: int = 8
    scene_detect: bool = True  # PySceneDetect's ContentDetector where the manifest gives no cuts
    scene_threshold: float = 27.0
    max_upscale: float = 1.0  # 1: never upscale; a source smaller than the frame is rejected (too_small)
    black_level: float = 12.0
    static_level: float = 0.5

    @classmethod
    def from_preset(cls, preset) -> "IngestSettings":
        """The preset's frame size, length, fps and VAE grouping, and its ``data`` section's choices."""
        v, d = preset.video, preset.data
        return cls(height=v.height, width=v.width, num_frames=v.num_frames, fps=v.fps,
                   temporal_compression=preset.vae.temporal_compression, stride=d.clip_stride,
                   max_clips=d.max_clips_per_video, scene_detect=d.scene_detect, scene_threshold=d.scene_threshold,
                   max_upscale=d.max_upscale, black_level=d.black_level, static_level=d.static_level)

    def __post_init__(self) -> None:
        tc = self.temporal_compression
        if (self.num_frames - 1) % tc:
            raise ValueError(f"num_frames {self.num_frames} must be 1 + {tc}k for the causal VAE")
        if self.stride is not None and self.stride <= 0:
            raise ValueError(f"stride must be > 0 seconds, got {self.stride}")
        if self.max_clips < 1:
            raise ValueError(f"max_clips must be >= 1, got {self.max_clips}")

    @property
    def span(self) -> float:
        """Seconds from a clip's first frame time to its last."""
        return (self.num_frames - 1) / self.fps

    @property
    def step(self) -> float:
        return self.stride if self.stride is not None else self.num_frames / self.fps

    @property
    def groups(self) -> int:
        """Latent frames after the first: the places a shot can start are 1 + tc*k, k in [1, groups - 1]."""
        return (self.num_frames - 1) // self.temporal_compression

    def frame_times(self, start: float) -> np.ndarray:
        return start + np.arange(self.num_frames) / self.fps

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ShotStart:
    start_frame: int
    start_latent_frame: int
    shot: int  # index into the video's shot captions (0 when cuts come from the detector: one caption)


@dataclass(frozen=True)
class Window:
    index: int
    start: float  # seconds from the video's start
    shots: tuple[ShotStart, ...]
    snapped_cuts: int = 0  # cuts not exactly on a latent-group edge (moved up to tc/2 frames)


def _latent_of(frame: int, tc: int) -> int:
    return 0 if frame == 0 else (frame - 1) // tc + 1


def _shot_at(t: float, shot_starts: list[float]) -> int:
    """Index of the shot showing at time t (shots are sorted; the first covers everything before it)."""
    i = 0
    for j, s in enumerate(shot_starts):
        if s <= t + TIME_EPS:
            i = j
    return i


def plan_windows(seg_start: float, seg_end: float, shot_starts: list[float], settings: IngestSettings) -> list[Window]:
    """The clip windows of the segment ``[seg_start, seg_end)`` of a video whose shots start at ``shot_starts``.

    ``shot_starts[i]`` is the time shot ``i`` begins (the first may be <= seg_start; [] or [t0] means one
    shot). A window needs its last frame time strictly before ``seg_end``. Returns [] when the segment is
    shorter than one clip (the caller rejects the video as too_short).
    """
    s = settings
    fps, tc, groups = s.fps, s.temporal_compression, s.groups
    starts = sorted(shot_starts) or [seg_start]
    cuts = [(c, i) for i, c in enumerate(starts) if i > 0]

    def fits(a: float) -> bool:
        return a >= seg_start - TIME_EPS and a + s.span < seg_end - TIME_EPS

    def cuts_in(a: float) -> list[tuple[float, int]]:
        # inside when a frame a + t/fps with t >= 1 already shows the new shot
        return [(c, i) for c, i in cuts if a + TIME_EPS < c <= a + s.span + TIME_EPS]

    def on_edge(c: float, a: float) -> bool:
        x = (c - a) * fps - 1  # frames after frame 1
        k = round(x / tc)
        return k >= 1 and abs(x - tc * k) < 1e-3

    windows: list[Window] = []
    a0 = seg_start
    while fits(a0) and len(windows) < s.max_clips:
        a, inside = a0, cuts_in(a0)
        if inside and groups < 2:  # a clip of one latent group cannot hold two shots: none across this cut
            a0 += s.step
            continue
        if inside and not on_edge(inside[0][0], a):
            # Move the window by at most half a latent group so that its first cut lands exactly on a frame
            # 1 + tc*k, or so that it starts at the cut, or ends just before it; nearest move first.
            c = inside[0][0]
            moves = [c - (1 + tc * k) / fps for k in range(1, groups)] + [c, c - s.span - 1 / fps]
            for a2 in sorted(moves, key=lambda x: (abs(x - a), x)):
                if abs(a2 - a) > (tc / 2 + 0.5) / fps:
                    break
                first = cuts_in(a2)[:1]
                if fits(a2) and all(on_edge(c2, a2) for c2, _ in first):
                    a = a2
                    break
        shots = [ShotStart(0, 0, _shot_at(a, starts))]
        snapped = 0
        edges = [0, *(1 + tc * k for k in range(1, groups)), s.num_frames]  # num_frames: past the end
        for c, i in cuts_in(a):  # the first is on an edge unless no move fitted; others snap to the nearest
            exact = (c - a) * fps
            frame = min(edges, key=lambda e: (abs(e - exact), e))
            snapped += abs(frame - exact) > 1e-3
            if frame == s.num_frames:  # nearer the end than any edge: the last frames keep the old caption
                continue
            if frame == shots[-1].start_frame:  # two cuts on one edge (or a cut at frame 0): the later shot takes it
                shots[-1] = ShotStart(frame, _latent_of(frame, tc), i)
            else:
                shots.append(ShotStart(frame, _latent_of(frame, tc), i))
        windows.append(Window(len(windows), round(a, 6), tuple(shots), snapped))  # round: clean JSON
        a0 += s.step
    return windows
