"""Decoding with PyAV: probe a video, read a clip's frames by seeking to its time, resize + centre crop.

Why PyAV and not torchcodec: torchcodec's wheels are built against one exact torch release (each
torchcodec version names the torch it needs), so using it would pin torch, which the project must not
(GPU users bring their own torch; see issue 16). PyAV bundles its own FFmpeg, depends on nothing but
numpy, decodes every container and codec we take (mp4, mov, mkv, webm; H.264, HEVC, VP9, AV1) and
exposes what a careful reader needs: per-frame timestamps (variable frame rates), keyframe seeking,
and the display-matrix rotation. It also runs inside Ray workers without torch.

Frames are converted and scaled by FFmpeg's swscale in one call (YUV -> RGB with the stream's own
colour matrix, area averaging when shrinking), then rotated as the display matrix says and centre
cropped. Only the frames a clip shows are converted; the others are decoded (a codec must) and dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO

import numpy as np

from longlive.data.ingest.clips import TIME_EPS
from longlive.data.ingest.filters import Rejected


@dataclass(frozen=True)
class VideoInfo:
    width: int  # stored (coded) size
    height: int
    display_width: int  # as shown: sample aspect ratio applied, then the rotation
    display_height: int
    rotation: int  # degrees counter-clockwise the frame is turned for display (0, 90, 180, 270)
    duration: float  # seconds (metadata; the decoder has the last word)
    codec: str
    fps: float  # average frame rate (metadata, for the report)


def open_container(src: str | BinaryIO):
    """``av.open`` that rejects (``undecodable``) what FFmpeg cannot open."""
    import av

    try:
        return av.open(src, mode="r", metadata_errors="replace")
    except av.error.FFmpegError as e:
        raise Rejected("undecodable", f"cannot open: {_ffmpeg_message(e)}") from None


def _ffmpeg_message(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e)


def _stream(container):
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        raise Rejected("no_video", f"no video stream (has: {', '.join(kinds)})")
    stream = container.streams.video[0]
    return stream


def _frame_time(frame, stream) -> float | None:
    if frame.pts is None:
        return None
    start = stream.start_time or 0
    return float((frame.pts - start) * stream.time_base)


def probe(container) -> VideoInfo:
    """Size, rotation and duration of the first video stream; decodes its first frame (rotation lives in
    frame side data, and a stream that cannot give one frame is rejected here, before any planning)."""
    import av

    stream = _stream(container)
    try:
        first = next(container.decode(stream), None)
    except av.error.FFmpegError as e:
        raise Rejected("undecodable", f"first frame: {_ffmpeg_message(e)}") from None
    if first is None:
        raise Rejected("undecodable", "the video stream holds no decodable frame")
    rotation = int(round((first.rotation or 0) / 90.0)) * 90 % 360
    sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    sar = Fraction(sar) if sar else Fraction(1)
    dw, dh = max(1, round(first.width * sar)), first.height
    if rotation in (90, 270):
        dw, dh = dh, dw
    duration = 0.0
    if stream.duration is not None:
        duration = float(stream.duration * stream.time_base)
    if container.duration is not None:
        duration = max(duration, container.duration / 1_000_000)
    rate = stream.average_rate or stream.guessed_rate or 0
    return VideoInfo(first.width, first.height, dw, dh, rotation, duration, stream.codec_context.name, float(rate))


def scaled_size(info: VideoInfo, height: int, width: int) -> tuple[int, int]:
    """(display_height, display_width) the frame is scaled to before the centre crop: the smallest that
    covers ``height`` x ``width`` with the display aspect ratio kept."""
    s = max(width / info.display_width, height / info.display_height)
    return max(height, round(info.display_height * s)), max(width, round(info.display_width * s))


def to_rgb(frame, info: VideoInfo, height: int, width: int) -> np.ndarray:
    """One decoded frame -> uint8 (height, width, 3): scale to cover, rotate for display, crop the centre."""
    sh, sw = scaled_size(info, height, width)
    if info.rotation in (90, 270):  # scale in the stored orientation, then turn
        sh, sw = sw, sh
    rgb = frame.to_ndarray(width=sw, height=sh, format="rgb24", interpolation="AREA", threads=1)
    if info.rotation:
        rgb = np.rot90(rgb, k=info.rotation // 90)  # counter-clockwise, as the display matrix says
    y0, x0 = (rgb.shape[0] - height) // 2, (rgb.shape[1] - width) // 2
    return np.ascontiguousarray(rgb[y0 : y0 + height, x0 : x0 + width])


def read_clip(container, info: VideoInfo, times: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (len(times), height, width, 3): frame i is the video as shown at ``times[i]`` seconds.

    Seeks to the keyframe at or before ``times[0]`` and decodes forward from there, never from the start
    of the file (unless a container's index seeks past the target; then once from 0). Raises
    :class:`Rejected` (``undecodable``, ``too_short``) when the frames run out or the stream is corrupt.
    """
    import av

    stream = _stream(container)
    n = len(times)
    out = np.empty((n, height, width, 3), np.uint8)
    nominal = 1.0 / float(stream.average_rate or stream.guessed_rate or 25)

    def decode_from(seek_to: float, from_start: bool = False) -> tuple[int, object, float | None]:
        container.seek(max(int(seek_to / stream.time_base) + (stream.start_time or 0), 0), stream=stream,
                       backward=True, any_frame=False)
        i, prev, prev_t, prev_rgb = 0, None, None, None
        for frame in container.decode(stream):
            t = _frame_time(frame, stream)
            if t is None:  # no timestamp: assume the nominal rate after the previous frame
                t = (prev_t + nominal) if prev_t is not None else times[0]
            if prev is None and t > times[0] + TIME_EPS:
                if not from_start:
                    return -1, None, None  # the seek landed after the first time we need
                prev, prev_t = frame, t  # decoding from the start: times before the first frame show it
            while i < n and t > times[i] + TIME_EPS:  # frame is after time i: time i shows prev
                if prev_rgb is None:
                    prev_rgb = to_rgb(prev, info, height, width)
                out[i] = prev_rgb
                i += 1
            if i == n:
                return i, prev, prev_t
            prev, prev_t, prev_rgb = frame, t, None
        # end of stream: the last frame shows until its timestamp + its duration
        end = None
        if prev is not None:
            dur = float(prev.duration * stream.time_base) if prev.duration else nominal
            end = prev_t + dur
            rgb = None
            while i < n and times[i] < end - TIME_EPS:
                rgb = to_rgb(prev, info, height, width) if rgb is None else rgb
                out[i] = rgb
                i += 1
        return i, prev, end

    try:
        done, _, end = decode_from(times[0])
        if done < 0:
            done, _, end = decode_from(0.0, from_start=True)
    except av.error.FFmpegError as e:
        raise Rejected("undecodable", f"decoding near {times[0]:.2f} s: {_ffmpeg_message(e)}") from None
    if done < n:
        if end is None:
            raise Rejected("undecodable", f"no frame decodes after {times[0]:.2f} s (truncated or corrupt file)")
        raise Rejected("too_short", f"the video ends at {end:.3f} s, before frame {done} of the clip at "
                       f"{times[done]:.3f} s (its metadata said {info.duration:.3f} s)")
    return out


def detect_cuts(src: str | BinaryIO, start: float, end: float, threshold: float) -> list[float]:
    """Times (seconds) where a new shot begins in ``[start, end)``: PySceneDetect's ContentDetector (HSV
    content change between consecutive frames), on every source frame of that range."""
    from scenedetect import ContentDetector, SceneManager
    from scenedetect.backends.pyav import VideoStreamAv

    video = VideoStreamAv(src, name="video", suppress_output=True)
    if start > 0:
        video.seek(start)
    manager = SceneManager()
    manager.add_detector(ContentDetector(threshold=threshold))
    manager.detect_scenes(video=video, end_time=end if math.isfinite(end) else None)
    return [float(s.seconds) for s, _ in manager.get_scene_list()[1:]]
