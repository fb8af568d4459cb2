"""Why a file or clip is left out: one reason code per rejection, and the content filters.

Every rejection is a :class:`Reject` that ends up in ``reports/ingest/`` (counted by reason, listed with
its detail); nothing a user's data holds makes ingest crash. The codes are stable names a user can
grep for; the detail says what was seen and, where there is one, the fix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# code -> what it means (the report's legend)
REASONS: dict[str, str] = {
    "missing": "the manifest names a file that is not in the source",
    "empty": "zero-byte file",
    "undecodable": "the container or the video stream cannot be decoded (corrupt, truncated, unknown codec)",
    "no_video": "the file has no video stream (audio only, subtitles, ...)",
    "too_short": "shorter than one clip (num_frames / fps seconds) in the requested segment",
    "too_small": "smaller than the preset's frame even after the allowed upscale (data.max_upscale)",
    "black": "the clip is (nearly) black: mean luma under data.black_level",
    "static": "the clip does not move: mean absolute frame difference under data.static_level",
    "duplicate": "same content as a clip or file kept earlier (sha256 of the file bytes or of the clip frames)",
    "no_caption": "no caption: not in the manifest, and no sidecar .txt (or webdataset txt/json) beside it",
    "caption_not_utf8": "the caption bytes are not UTF-8; re-save the manifest or sidecar as UTF-8",
    "bad_manifest_row": "a manifest row that cannot be read (fields, types, times)",
    "error": "an unexpected error while processing this file (a bug: please report it with the detail)",
}


@dataclass(frozen=True)
class Reject:
    source: str  # file (relative to the source root, a URL, or tar#key) or manifest line
    reason: str  # a key of REASONS
    detail: str
    clip: int | None = None  # window index within the video; None: the whole file

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown reject reason {self.reason!r}; add it to REASONS")

    def to_dict(self) -> dict:
        return asdict(self)


class Rejected(Exception):
    """Raised inside the per-video work to reject the file (or the current clip) with a reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ITU-R BT.601 luma weights: a brightness measure only, the exact matrix does not matter here.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def content_reason(frames: np.ndarray, black_level: float, static_level: float) -> tuple[str, str] | None:
    """``(reason, detail)`` when the uint8 (T, H, W, 3) clip is black or static, else None.

    Black: the mean luma (0-255) of the whole clip. Static: the mean over consecutive frame pairs of the
    mean absolute pixel difference (0-255); a still image re-encoded as video stays under 1 (codec noise),
    real footage, even a slow pan, is well above.
    """
    x = frames.astype(np.float32)
    luma = float((x @ _LUMA).mean())
    if luma < black_level:
        return "black", f"mean luma {luma:.1f} < data.black_level {black_level:g}"
    if len(frames) > 1:
        motion = float(np.abs(np.diff(x, axis=0)).mean())
        if motion < static_level:
            return "static", f"mean frame difference {motion:.2f} < data.static_level {static_level:g}"
    return None
