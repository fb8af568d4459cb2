"""Speed and memory of streaming generation: FPS, first-chunk latency, peak memory, the machine.

**Peak memory** (:class:`PeakMemory`) measures one generation and says what it measured in ``kind``:

* ``cuda_max_allocated``: ``torch.cuda.max_memory_allocated`` over the run (weights, activations, KV
  cache and the VAE on that device), the usual GPU figure. Beside it, ``peak_reserved_mb`` is
  ``torch.cuda.max_memory_reserved``: what the caching allocator held from the GPU over the same run
  (allocated plus cached free blocks and fragmentation), the figure ``nvidia-smi`` comes close to and
  the one that decides whether another process fits beside this one.
* ``cpu_peak_rss_increase`` (Linux): the process's peak resident set during the run minus its resident
  set just before, i.e. the working memory of generation (activations, KV cache, decode buffers) on top
  of the loaded weights. The kernel's high-water mark is reset first (``/proc/self/clear_refs`` = 5) and
  ``malloc_trim`` hands memory freed by earlier runs back to the OS, so pages that glibc kept from a
  previous run do not hide this run's allocations. Exact, not sampled; ``tracemalloc`` would miss it
  because torch allocates tensors outside Python's allocator.
* ``cpu_max_rss_process`` (elsewhere): the process's lifetime peak RSS (``ru_maxrss``), weights and
  libraries included; only comparable with itself.

**FPS and latency** (:func:`measure_speed`): ``warmup`` unmeasured runs, then ``runs`` timed runs of one
single-prompt video; the best run is the headline (timing noise from other load only ever slows a run
down), the median sits beside it; peak memory is the median of the same runs. FPS counts generated pixel frames over the wall time of the whole
stream including decoding; first-chunk latency is the time until the first block's frames are decoded.
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MiB = 2**20


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``'s model name, else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """``cpu (AMD EPYC, 2 cores, AVX2)`` or the GPU's name: what speed and memory figures are tied to. On a CPU
    the vector ISA torch dispatches to is named too: it decides the float bits, so a retraining on another
    ISA gives other models (longlive.eval.regress, "Several machine classes")."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({cpu_name()}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()})"


def device_class(device: torch.device) -> str:
    """What must match for speed/memory to be compared: ``cpu`` or ``cuda:<GPU name>``.

    CPUs of one class are compared (CI runners and laptops differ, hence loose tolerances); a CPU figure is
    never compared with a GPU one, nor an H100's with a B200's."""
    return f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "cpu"


def _proc_status() -> dict[str, int] | None:
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024  # kB
    return out if len(out) == 2 else None


def _reset_peak_rss() -> bool:
    """Trim glibc's free memory and reset the kernel's RSS high-water mark; False where unsupported."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the high-water mark still works, freed-but-kept pages may hide some allocation
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_mb`` and ``m.kind`` (see the module doc)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.kind = ""
        self.peak_mb: float | None = None
        self.reserved_mb: float | None = None  # CUDA only: max_memory_reserved

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_allocated"
        elif sys.platform.startswith("linux") and _proc_status() and _reset_peak_rss():
            self.kind = "cpu_peak_rss_increase"
            self._before = _proc_status()["VmRSS"]
        else:
            self.kind = "cpu_max_rss_process"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / MiB
            self.reserved_mb = torch.cuda.max_memory_reserved(self.device) / MiB
        elif self.kind == "cpu_peak_rss_increase":
            self.peak_mb = max(0, _proc_status()["VmHWM"] - self._before) / MiB
        else:
            scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, kB on Linux
            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MiB


def take_cuda_peaks(device: torch.device | str) -> dict[str, float] | None:
    """``{"allocated": max_memory_allocated, "reserved": max_memory_reserved}`` in MiB since the last call (or the
    last reset), then a reset, so consecutive calls give the peaks of consecutive phases; None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    peaks = {"allocated": torch.cuda.max_memory_allocated(device) / MiB,
             "reserved": torch.cuda.max_memory_reserved(device) / MiB}
    torch.cuda.reset_peak_memory_stats(device)
    return peaks


def weights_mb(*modules: torch.nn.Module) -> float:
    """Bytes of parameters and buffers as stored (dtype-aware; NVFP4 layers count their packed buffers)."""
    total = 0
    for m in modules:
        total += sum(t.numel() * t.element_size() for t in m.parameters())
        total += sum(t.numel() * t.element_size() for t in m.buffers())
    return total / MiB


@dataclass
class SpeedResult:
    fps: float
    fps_median: float
    first_chunk_latency_s: float
    first_chunk_latency_median_s: float
    peak_memory_mb: float
    memory_kind: str
    kv_cache_mb: float
    pixel_frames: int
    runs: int
    peak_reserved_mb: float | None = None  # CUDA: max_memory_reserved of the same runs (median); None elsewhere

    def metrics(self) -> dict:
        m = {"fps": self.fps, "fps_median": self.fps_median, "first_chunk_latency_s": self.first_chunk_latency_s,
             "first_chunk_latency_median_s": self.first_chunk_latency_median_s,
             "peak_memory_mb": self.peak_memory_mb, "kv_cache_mb": self.kv_cache_mb}
        if self.peak_reserved_mb is not None:
            m["peak_reserved_mb"] = self.peak_reserved_mb
        return m


def measure_speed(generate, device: torch.device, *, runs: int = 3, warmup: int = 1) -> SpeedResult:
    """Time ``generate()`` (a callable returning a :class:`~longlive.inference.generate.GenerationResult`
    for the same video each call) and measure the peak memory of each timed run.

    Peak memory is the median over the runs: on the CPU it varies by tens of percent from run to run
    (which thread's malloc arena a freed block sits in, when the decode thread frees), on CUDA hardly.
    The measurement itself (trim, reset) happens outside ``generate``'s own clock."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if torch.device(device).type == "cuda":
        # blocks cached by earlier work would count as this generation's reserved memory; the warm-up
        # runs reserve again what generation itself needs, outside the clock
        torch.cuda.empty_cache()
    for _ in range(warmup):
        generate()
    timings, peaks, reserved, kind = [], [], [], ""
    for _ in range(runs):
        with PeakMemory(device) as mem:
            timings.append(generate().timings)
        peaks.append(float(mem.peak_mb))
        if mem.reserved_mb is not None:
            reserved.append(mem.reserved_mb)
        kind = mem.kind
    fps = [t["generated_fps"] for t in timings]
    latency = [t["first_block_latency_s"] for t in timings]
    return SpeedResult(
        fps=max(fps), fps_median=statistics.median(fps),
        first_chunk_latency_s=min(latency), first_chunk_latency_median_s=statistics.median(latency),
        peak_memory_mb=statistics.median(peaks), memory_kind=kind,
        kv_cache_mb=float(np.max([t["max_cache_bytes"] for t in timings])) / MiB,
        pixel_frames=int(timings[-1]["pixel_frames"]), runs=runs,
        peak_reserved_mb=statistics.median(reserved) if reserved else None,
    )
