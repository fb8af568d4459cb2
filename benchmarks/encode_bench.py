"""Encode throughput at Wan2.2-TI2V-5B's clip size, random weights (issue 17): is the VAE the bottleneck?

Runs the encode stage's own path -- :func:`longlive.data.encode.encode_dataset` with its DataLoader (reader
processes, pinned memory, non-blocking copies), the VAE in ``encode.dtype`` (bf16 on CUDA) through
:func:`~longlive.data.encode.video_encoder`, the caption cache and the background shard writer -- over synthetic
clips written in the format ``synth`` and ``ingest`` write (``videos/KEY.npy`` uint8 (T, H, W, 3) +
``index.jsonl``): the preset's VAE (wan22-5b: the Wan2.2 VAE, 48 latent channels, 16x16x4) with random
weights, 704x1280 clips of the preset's 125 frames (338 MB each), one distinct caption per clip.

1. writes one clip and encodes it (warm-up: CUDA context, cuDNN's algorithm search), then one batch more
   (probe: a steady seconds-per-clip estimate);
2. writes as many clips as ``--budget-s`` of encoding holds (at most ``--clips``), each fsynced and dropped from
   the page cache (``--page-cache`` keeps them there), so the loader reads the disk as a real run does;
3. encodes them in one timed run and reports clips/s, seconds per clip, the VAE's share, where the rest went
   (waiting on the loader, captions, the writer thread) and peak GPU memory; prints a table and writes
   ``NAME.json`` + ``NAME.md`` under ``--out-dir``.

The VAE share is the sum of CUDA-event spans around each ``encode_video`` call (events recorded on the stream
right before and after it, read once at the end) over the timed run's wall time (first batch asked for -> last
shard written): the fraction of the run the GPU spent on the VAE's work, its own launch gaps included. Events
cost nothing and add no synchronisation; a torch.profiler trace of the VAE's thousands of small kernels (pads,
norms, casts) would slow the run it measures. 1 - share is everything else the GPU waited for: reading and copying
clips, captions, writing, Python. On the CPU the spans are wall time.

On the device (nvidia-h100-x1: torch 2.11, no DVC or Prefect; the call carries ``.whl``, the wheels
``scripts/gpu_wheels.sh`` fills here; about 4 minutes, 100 s of them the timed run; the JSON + markdown come back from ``$OUT``
for ``benchmarks/results/``):

    eval "$(bash scripts/gpu_wheels.sh --install .whl /tmp/site)"; PYTHONUNBUFFERED=1 python3 benchmarks/encode_bench.py --out-dir $OUT

Any machine, the code path in seconds (tests/unit/test_encode.py runs this):

    python benchmarks/encode_bench.py --preset tiny --clips 4 --out-dir /tmp/encode_bench
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from longlive.bench.harness import md_table, save, slug, text_table, utc_now, version  # noqa: E402
from longlive.config import TextConfig, load_preset  # noqa: E402
from longlive.data.encode import EncodeTimings, encode_dataset, encode_dtype, text_encoder, video_encoder  # noqa: E402
from longlive.device import resolve_device  # noqa: E402
from longlive.models.text import TinyTextEncoder  # noqa: E402
from longlive.models.vae import WanVAE  # noqa: E402


def build_models(preset, device: torch.device, dtype: torch.dtype):
    """The preset's VAE with random weights in ``dtype``, and a text encoder with the preset's output size: the tiny
    one as is, for UMT5 a layer-free word encoder (UMT5's weights are not here; its cost is reported apart)."""
    torch.manual_seed(0)
    with torch.device(device):
        vae = WanVAE(preset.vae)
    vae = vae.to(dtype).eval().requires_grad_(False)
    t = preset.text
    cfg = t if t.kind == "tiny" else TextConfig(kind="tiny", max_tokens=t.max_tokens, dim=t.dim, num_layers=0)
    return vae, TinyTextEncoder(cfg).to(device)


class ClipFolder:
    """Synthetic clips in the encode stage's input format; ``view(n)`` is a folder whose index lists the first n."""

    def __init__(self, root: Path, preset, page_cache: bool):
        v = preset.video
        self.root, self.preset, self.page_cache = root, preset, page_cache
        (root / "videos").mkdir(parents=True)
        # Noise: the VAE's cost does not depend on the pixels, and noise does not compress on the way through
        self.frames = np.random.default_rng(0).integers(0, 256, (v.num_frames, v.height, v.width, 3), dtype=np.uint8)
        self.written, self.write_s = 0, 0.0

    def key(self, i: int) -> str:
        return f"clip{i:06d}"

    def row(self, i: int) -> dict:
        v, key, caption = self.preset.video, self.key(i), f"benchmark clip number {i}"
        return {"key": key, "video": f"videos/{key}.npy", "num_frames": v.num_frames, "fps": v.fps,
                "height": v.height, "width": v.width, "captions": [caption],
                "shots": [{"start_frame": 0, "start_latent_frame": 0, "caption": caption}]}

    def ensure(self, n: int) -> None:
        t0 = time.perf_counter()
        for i in range(self.written, n):
            path = self.root / "videos" / f"{self.key(i)}.npy"
            with open(path, "wb") as f:
                np.save(f, self.frames, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            self.written += 1
        self.write_s += time.perf_counter() - t0
        self.drop_cache(n)

    def drop_cache(self, n: int) -> None:
        """Drop the clips' pages from the page cache (they were fsynced), so the loader reads the disk."""
        if self.page_cache or not hasattr(os, "posix_fadvise"):
            return
        for i in range(n):
            fd = os.open(self.root / "videos" / f"{self.key(i)}.npy", os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def view(self, name: str, start: int, stop: int) -> Path:
        """A clip folder (the clips' index) holding clips ``start`` to ``stop - 1``, none of them in the page cache."""
        self.ensure(stop)
        d = self.root.parent / name
        d.mkdir()
        (d / "videos").symlink_to(self.root / "videos")
        (d / "index.jsonl").write_text("".join(json.dumps(self.row(i)) + "\n" for i in range(start, stop)))
        return d


def encode(folder: Path, url: Path, models, args, device: torch.device) -> EncodeTimings:
    vae, text = models
    timings = EncodeTimings()
    encode_dataset(folder, str(url), encode_video=video_encoder(vae), encode_text=text_encoder(text),
                   samples_per_shard=args.samples_per_shard, batch_size=args.batch_size, workers=args.workers,
                   prefetch=args.prefetch, device=device, timings=timings)
    return timings


def filesystem(path: Path) -> str:
    """The type of the filesystem ``path`` is on (tmpfs: the clips are in RAM whatever the page cache does)."""
    best, fstype = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            mount, kind = line.split()[1:3]
            if str(path.resolve()).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
                best, fstype = mount, kind
    except OSError:
        pass
    return fstype


def with_size(preset, size: str | None):
    """The preset with clips of ``FRAMESxHEIGHTxWIDTH`` (the VAE's constraints checked; training's are not at stake)."""
    if not size:
        return preset
    try:
        frames, height, width = (int(x) for x in size.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--size {size!r}: expected FRAMESxHEIGHTxWIDTH, e.g. 5x64x64") from None
    tc, sc = preset.vae.temporal_compression, preset.vae.spatial_compression
    if frames < 1 or (frames - 1) % tc or height % sc or width % sc or min(height, width) < sc:
        raise SystemExit(f"--size {size}: the {preset.name} VAE needs 1 + {tc}k frames and sides that are multiples "
                         f"of {sc}")
    return preset.model_copy(update={"video": preset.video.model_copy(
        update={"num_frames": frames, "height": height, "width": width})})


def run(args, command: str) -> dict:
    preset = with_size(load_preset(args.preset), args.size)
    device = resolve_device(args.device)
    dtype = encode_dtype(args.dtype or preset.encode.dtype, device)
    args.batch_size = args.batch_size or preset.encode.batch_size
    args.workers = preset.encode.workers if args.workers is None else args.workers
    args.prefetch = args.prefetch or preset.encode.prefetch
    args.samples_per_shard = preset.encode.samples_per_shard
    v = preset.video
    print(f"encode bench: {preset.name} VAE, {v.num_frames}x{v.height}x{v.width} clips, batch {args.batch_size}, "
          f"{args.workers} reader processes, {str(dtype).removeprefix('torch.')} on {device}", flush=True)
    models = build_models(preset, device, dtype)
    with tempfile.TemporaryDirectory(prefix="encode-bench-", dir=args.tmp_dir) as tmp:
        tmp = Path(tmp)
        clip_fs = filesystem(tmp)
        clips = ClipFolder(tmp / "clips", preset, args.page_cache)
        warm = encode(clips.view("warmup", 0, 1), tmp / "warmup_shards", models, args, device)
        probe = encode(clips.view("probe", 1, 1 + args.batch_size), tmp / "probe_shards", models, args, device)
        per_clip = probe.wall_s / probe.clips
        n = min(args.clips, max(2 * args.batch_size, math.floor(args.budget_s / per_clip)))
        n = max(args.batch_size, n // args.batch_size * args.batch_size)  # whole batches: the same work per batch
        print(f"warm-up {warm.wall_s:.1f} s for 1 clip, probe {per_clip:.2f} s per clip: timing {n} clips", flush=True)
        folder = clips.view("timed", 0, n)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t = encode(folder, tmp / "shards", models, args, device)
        shard_bytes = sum(p.stat().st_size for p in (tmp / "shards").glob("shard-*.tar"))
        write_s = clips.write_s
    res = {
        "date": utc_now(), "command": command,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "device_type": device.type,
        "torch": torch.__version__, "diffusers": version("diffusers"), "preset": preset.name,
        "clip": {"frames": v.num_frames, "height": v.height, "width": v.width,
                 "mb": v.num_frames * v.height * v.width * 3 / 1e6, "latent_shape": list(preset.latent_shape)},
        "vae": f"WanVAE (diffusers AutoencoderKLWan), the {preset.name} preset's config: z_dim {preset.vae.z_dim}, "
               f"compression {'x'.join(map(str, preset.vae.compression))}, base_dim {preset.vae.base_dim}, random weights",
        "dtype": str(dtype).removeprefix("torch."), "batch_size": args.batch_size, "workers": args.workers,
        "prefetch": args.prefetch, "clip_fs": clip_fs,
        "reads": "page cache" if args.page_cache else f"{clip_fs} filesystem, page cache dropped",
        "clips": t.clips, "clips_per_s": t.clips / t.wall_s, "s_per_clip": t.wall_s / t.clips,
        "vae_s_per_clip": t.vae_s / t.clips, "vae_share": t.vae_share, "timings": t.as_dict(),
        "warmup_s": warm.wall_s, "probe_s_per_clip": per_clip, "clip_write_s": write_s,
        "shard_mb_per_clip": shard_bytes / 1e6 / t.clips,
        "timing": "VAE share = sum of CUDA-event spans around each encode_video call / wall time of the timed run "
                  "(first batch asked for -> last shard written)" if device.type == "cuda" else
                  "CPU: every time is wall-clock time",
    }
    if device.type == "cuda":
        res["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        res["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return res


COLUMNS = ("clips", "batch", "readers", "dtype", "clips/s", "s/clip", "VAE s/clip", "VAE share", "after 1st batch",
           "loader wait s", "1st batch s", "captions s", "writer wait s", "peak GiB")


def row(res: dict) -> dict:
    t = res["timings"]
    peak = res.get("peak_allocated_gib")
    return dict(zip(COLUMNS, (
        str(res["clips"]), str(res["batch_size"]), str(res["workers"]), res["dtype"], f"{res['clips_per_s']:.3f}",
        f"{res['s_per_clip']:.2f}", f"{res['vae_s_per_clip']:.2f}", f"{100 * res['vae_share']:.1f}%",
        f"{100 * t['steady_vae_share']:.1f}%", f"{t['load_wait_s']:.2f}", f"{t['first_load_s']:.2f}",
        f"{t['text_s']:.2f}", f"{t['write_wait_s']:.2f}",
        "-" if peak is None else f"{peak:.1f}")))


def markdown(res: dict) -> str:
    c, r = res["clip"], row(res)
    return "\n".join([
        f"# Encode throughput, {res['preset']} preset, random weights ({res['device']})", "",
        f"{res['date']}; torch {res['torch']}, diffusers {res['diffusers']}. Command: `{res['command']}`.", "",
        f"Clips: {c['frames']}x{c['height']}x{c['width']} uint8 ({c['mb']:.3g} MB each) -> latents "
        f"{'x'.join(map(str, c['latent_shape']))}; read from {res['reads']}. VAE: {res['vae']}, {res['dtype']}.", "",
        *md_table(list(r), [r.values()]), "",
        f"Timing: {res['timing']}; 'after 1st batch' leaves out the wait for the first batch (reader processes "
        "starting, nothing read ahead yet), which a long run amortises. "
        f"Warm-up (1 clip, cuDNN's algorithm search included) {res['warmup_s']:.1f} s; "
        f"writing the clips {res['clip_write_s']:.1f} s; shards {res['shard_mb_per_clip']:.3g} MB per clip.", ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="wan22-5b", help="whose VAE, clip size and encode settings (tiny: any machine)")
    ap.add_argument("--size", default=None, help="FRAMESxHEIGHTxWIDTH instead of the preset's clips (a CPU smoke "
                    "test of a large preset's VAE: --preset wan22-5b --size 5x64x64)")
    ap.add_argument("--clips", type=int, default=32, help="at most this many clips in the timed run")
    ap.add_argument("--budget-s", type=float, default=100.0, help="the timed run's clips are cut to about this long")
    ap.add_argument("--batch-size", type=int, default=None, help="clips per VAE call (default: encode.batch_size)")
    ap.add_argument("--workers", type=int, default=None, help="reader processes (default: encode.workers)")
    ap.add_argument("--prefetch", type=int, default=None, help="batches each reader keeps ready (default: encode.prefetch)")
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default=None, help="default: encode.dtype")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--page-cache", action="store_true", help="leave the clips in the page cache (reads cost ~nothing)")
    ap.add_argument("--tmp-dir", default=None, help="where the clips and shards go (default: the system's temp dir)")
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--name", default=None, help="output file stem (default: encode_<device>)")
    args = ap.parse_args(argv)
    if args.clips < 1 or args.budget_s <= 0:
        ap.error("--clips must be >= 1 and --budget-s > 0")
    argv = sys.argv[1:] if argv is None else argv
    res = run(args, command=shlex.join(["python", "benchmarks/encode_bench.py", *argv]))
    print(text_table(row(res)))
    save(args.out_dir, args.name or "encode_" + slug(res["device"]).strip("_"), res, markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
