"""Generation streams: memory does not grow with the video's length.

Two views of one guarantee (random tiny models, the tiny preset):

* ``longlive generate`` end to end, each length in a fresh process: the peak RSS of a 10x-longer video is
  within 10% of the 1x one. The peak is the process's own ``VmHWM``, read by the child at exit, not
  ``getrusage(...).ru_maxrss``: on Linux that also counts the RSS of the process it was forked from (pytest,
  with whatever earlier tests loaded), which would hide the child's own peak.
* in process, precisely: the block latents alive at any time stay under a bound set by the decoder's queue
  and the KV cache, whatever the number of blocks, and the Python/numpy heap (tracemalloc) peaks at the
  same size for both lengths. Each detector is shown to trip on the fault it guards against
  (``keep_latents`` / ``keep_frames``, which hold the whole video on purpose).

At the tiny preset's 64x64 a whole held video is ~1 MB, far below RSS noise (allocator arenas move by tens
of MB), so the RSS test guards against gross growth and the in-process checks against any per-block hoard.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
import weakref
from pathlib import Path

import pytest
import torch

from longlive.config import load_preset
from longlive.inference.generate import Models, generate_video, timings_path
from longlive.inference.pipeline import StreamingPipeline
from longlive.inference.schedule import PromptSchedule
from longlive.models.dit import WanDiT
from longlive.models.text import TinyTextEncoder
from longlive.models.vae import WanVAE

from _tiny_models import save_tiny_base

ROOT = Path(__file__).resolve().parents[2]
SECONDS = 3  # the 1x length; 10x = 30 s = 241 frames (tiny preset: 8 fps, 2 latent frames = 8 frames a block)

# `longlive generate` in this process, then its peak resident set (VmHWM: this process only, kilobytes)
PEAK_RSS = """
import json, re, sys
from longlive.cli import main
rc = main(sys.argv[1:])
status = open("/proc/self/status").read()
print(json.dumps({"rc": rc, "peak_rss": 1024 * int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1))}))
"""


@pytest.fixture(scope="module")
def preset():
    return load_preset("tiny")


def peak_rss_of_generate(base: Path, out: Path, seconds: float) -> int:
    args = ["generate", "--prompt", "a red circle moves left", "--seconds", str(seconds), "--out", str(out),
            "--base", str(base), "--preset", "tiny"]
    r = subprocess.run([sys.executable, "-c", PEAK_RSS, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.splitlines()[-1])
    assert result["rc"] == 0, r.stderr
    return result["peak_rss"]


def test_peak_rss_is_flat_over_a_10x_longer_video(preset, tmp_path):
    base = save_tiny_base(preset, tmp_path / "base")
    short = peak_rss_of_generate(base, tmp_path / "short.mp4", SECONDS)
    long = peak_rss_of_generate(base, tmp_path / "long.mp4", 10 * SECONDS)
    frames = [json.loads(timings_path(tmp_path / f"{n}.mp4").read_text())["pixel_frames"] for n in ("short", "long")]
    assert frames[1] >= 8 * frames[0]  # 10x the seconds; both rounded up to whole blocks
    assert long <= 1.10 * short, f"peak RSS {long / 2**20:.0f} MiB at {10 * SECONDS} s vs {short / 2**20:.0f} MiB " \
                                 f"at {SECONDS} s"


# ----------------------------------------------------------------------------- in process, per block


@pytest.fixture(scope="module")
def models(preset) -> Models:
    torch.manual_seed(0)
    dit = WanDiT(preset.dit, preset.vae.z_dim, preset.text.dim)
    dit.init_weights(0)
    return Models(dit.eval(), WanVAE(preset.vae).eval(), TinyTextEncoder(preset.text, seed=0))


def measure(models, preset, out: Path, seconds: float, monkeypatch, **keep) -> tuple[int, int, int]:
    """(blocks, most block latents alive at once, peak traced Python/numpy heap in bytes) of one generation."""
    alive: list[int] = []
    real_stream = StreamingPipeline.stream

    def stream(self, *args, **kwargs):  # the real loop, watching each block's latents after it is handed on
        refs = []
        for block in real_stream(self, *args, **kwargs):
            refs.append(weakref.ref(block.latents))
            alive.append(sum(r() is not None for r in refs))
            yield block

    monkeypatch.setattr(StreamingPipeline, "stream", stream)
    tracemalloc.start()
    try:
        generate_video(models, preset, PromptSchedule.single("a red circle moves left"), seconds=seconds, out=out,
                       **keep)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.stat().st_size > 0
    return len(alive), max(alive), peak


def test_nothing_is_kept_per_block(models, preset, tmp_path, monkeypatch):
    cfg = preset.inference
    # alive at once, at most: those in the decoder's queue (BlockDecoder's max_pending, 4) and the one it
    # decodes; those whose frames the KV cache holds (the sink's, and the window's plus the new block's, which
    # may straddle a block edge). None of it depends on the length.
    per = cfg.block_frames
    bound = 4 + 1 + -(-cfg.sink_frames // per) + (-(-cfg.window_frames // per) + 1)
    measure(models, preset, tmp_path / "warm.mp4", 1, monkeypatch)  # one-time allocations (imports, caches)
    _, _, heap_1x = measure(models, preset, tmp_path / "1x.mp4", 2, monkeypatch)
    blocks, most_alive, heap_10x = measure(models, preset, tmp_path / "10x.mp4", 20, monkeypatch)
    assert blocks > bound  # long enough that keeping every block would exceed the bound
    assert most_alive <= bound, (most_alive, bound)
    # per block, only a dict of timings (~1 KB) is kept; a held frame alone is 12 KB, a 20 s video ~2 MB
    assert heap_10x <= heap_1x + 256 * 1024, (heap_1x, heap_10x)

    # the fault: a caller keeping every frame and every latent. Both detectors above must see it.
    _, hoarded_alive, hoarded_heap = measure(models, preset, tmp_path / "kept.mp4", 20, monkeypatch,
                                             keep_frames=True, keep_latents=True)
    assert hoarded_alive == blocks > bound
    assert hoarded_heap > heap_1x + 1024 * 1024
