"""What every benchmark shares: timing, errors, provenance, paired comparison and result files.

``longlive bench`` and the scripts in ``benchmarks/`` measure through these, so each script holds only what it
measures. Timing on CUDA is CUDA events or ``triton.testing.do_bench`` (median), with the device synchronised
around wall-clock spans; on the CPU wall-clock time (``time.perf_counter``), which is all there is.

Imports only torch (triton, numpy and git when used): the kernel benchmarks run on a bare GPU image with
no pydantic.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist

from longlive.io import write_text_atomic

# ----------------------------------------------------------------------------- timing


def now() -> float:
    return time.perf_counter()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def do_bench_ms(fn: Callable, *, warmup: int = 10, rep: int = 40) -> float:
    """Median milliseconds of ``fn()`` by ``triton.testing.do_bench`` (CUDA; ``warmup`` and ``rep`` in ms)."""
    import triton

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def times_ms(fn: Callable, reps: int, warmup: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``reps`` calls after ``warmup`` unmeasured ones: CUDA events around each call
    on a GPU, wall clock on the CPU."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t = now()
            fn()
            out.append((now() - t) * 1e3)
    return out


def bench_ms(fn: Callable, device: torch.device, *, warmup: int = 10, rep: int = 40) -> float:
    """Median milliseconds of ``fn()``: :func:`do_bench_ms` on CUDA, the wall clock of 5 calls after one
    warm-up on the CPU."""
    if device.type == "cuda":
        return do_bench_ms(fn, warmup=warmup, rep=rep)
    return statistics.median(times_ms(fn, reps=5, warmup=1, device=device))


def tflops(flop: float, ms: float) -> float:
    """Trillions of floating-point operations per second of ``flop`` done in ``ms`` milliseconds."""
    return flop / (ms * 1e-3) / 1e12


def gbps(nbytes: float, ms: float) -> float:
    """Gigabytes per second of ``nbytes`` moved in ``ms`` milliseconds."""
    return nbytes / (ms * 1e-3) / 1e9


def peak_extra_mib(fn: Callable) -> float:
    """CUDA: peak memory allocated during one call beyond what was allocated before it (output included)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def cuda_peak_gib(device: torch.device) -> dict:
    """Peak allocated and reserved CUDA memory in GiB since the last reset (empty off CUDA)."""
    if device.type != "cuda":
        return {}
    return {"peak_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float32."""
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float32."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, in float32."""
    return float((a.float() - b.float()).abs().max())


def errors(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """``got`` against ``ref`` in float64: max abs error, max |ref|, their ratio and the relative L2 error."""
    got, ref = got.double(), ref.double()
    err = (got - ref).abs()
    return {"max_abs_err": float(err.max()), "max_abs_ref": float(ref.abs().max()),
            "max_rel_err": float(err.max() / ref.abs().max().clamp_min(1e-30)),
            "rel_l2_err": float((got - ref).norm() / ref.norm().clamp_min(1e-30))}


def bit_exact(*pairs: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Whether each pair holds the same bytes (shapes and bit patterns; NaNs and -0.0 compared as bits)."""
    as_bytes = lambda t: t.contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return all(a.shape == b.shape and a.dtype == b.dtype and torch.equal(as_bytes(a), as_bytes(b)) for a, b in pairs)


# ----------------------------------------------------------------------------- provenance


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def version(module: str) -> str | None:
    """``module.__version__``, or None where it does not import."""
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def python_version() -> str:
    return platform.python_version()


def git_commit(root: str | os.PathLike) -> str:
    """HEAD of the checkout at ``root``, marked when the working tree has uncommitted changes."""
    try:
        run = lambda *a, **k: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, **k)  # noqa: E731
        head = run("rev-parse", "HEAD", check=True).stdout.strip()
        dirty = run("status", "--porcelain").stdout.strip()
        return head + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_machine() -> str:
    """The CPU, its visible cores, torch and its thread count: what a CPU figure is tied to."""
    from longlive.eval.perf import cpu_name

    return f"CPU: {cpu_name()}, {os.cpu_count()} cores visible, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def provenance(*modules: str) -> dict:
    """The day (UTC), torch, python and the version of each of ``modules``: the head of a kernel benchmark's JSON."""
    return {"date": utc_now()[:10], "torch": torch.__version__, **{m: version(m) for m in modules},
            "python": python_version()}


def run_environment(device: torch.device, machine: str | None = None) -> dict:
    """Where a run on one or several GPUs ran: date, machine kind, torch, python, device and, on CUDA, the GPU,
    CUDA, visible GPUs, NCCL and triton; the NCCL settings that change collectives (NVLink multicast)."""
    env = {"date": utc_now(), "machine": machine, "torch": torch.__version__, "python": python_version(),
           "device": str(device)}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda, gpus_visible=torch.cuda.device_count(),
                   nccl=".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None,
                   triton=version("triton"))
    env["nccl_env"] = {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")}
    return env


def missing_cuda(message: str) -> bool:
    """True, after printing ``message`` (what to run instead) as one line on stderr, when there is no CUDA GPU."""
    if torch.cuda.is_available():
        return False
    print(message, file=sys.stderr)
    return True


def gpu_short(name: str) -> str:
    """A GPU's model from its name, for result file names: ``NVIDIA H100 80GB HBM3`` -> ``h100``."""
    m = re.search(r"\b([a-z]{1,2}\d{2,4})\b", name.lower().replace("nvidia", ""))
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def slug(text: str) -> str:
    """A file-name stem from a device name: ``NVIDIA H100 80GB HBM3`` -> ``nvidia_h100_80gb_hbm3``."""
    return "".join(c if c.isalnum() else "_" for c in text.lower())


def command(script: str, argv: list[str]) -> str:
    """How the result was produced, for the report: ``python benchmarks/x.py ARGS``."""
    return " ".join(["python", script, *argv])


# ----------------------------------------------------------------------------- comparison


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of the per-item differences ``b - a`` and its standard error: for two models scored on the same
    prompts and seeds, the error that applies to their difference."""
    d = [y - x for x, y in zip(a, b)]
    sem = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return statistics.fmean(d), sem


def fmt(x, spec: str = ".3f") -> str:
    """A figure of a table, ``-`` where there is none."""
    return "-" if x is None else format(x, spec)


# ----------------------------------------------------------------------------- ranks


def rank_max(values: list[float], state) -> list[float]:
    """Each of ``values`` maxed over the ranks of ``state`` (a ``ParallelState``): the slowest rank sets the pace."""
    if not state.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=state.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def rank_gather(obj, state) -> list:
    """``obj`` of every rank of ``state``, in rank order."""
    if not state.distributed:
        return [obj]
    out = [None] * state.world_size
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- result files


def md_table(columns: Sequence[str] | Mapping[str, str | Callable[[dict], str]], rows: Iterable) -> list[str]:
    """A markdown table's lines: the header, its rule, one line per row.

    ``columns`` names the columns and ``rows`` holds sequences of cells (written as ``str`` gives them), or
    ``columns`` maps each name to how a row dict becomes its cell: a format string over the row's keys
    (``"{ms:.3f}"``) or a function of the row."""
    if isinstance(columns, Mapping):
        specs = list(columns.values())
        rows = ([spec.format(**r) if isinstance(spec, str) else spec(r) for spec in specs] for r in rows)
    return (["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def text_table(row: dict[str, str]) -> str:
    """One row under its column names, right-aligned, for the terminal."""
    widths = [max(len(k), len(v)) for k, v in row.items()]
    return ("  ".join(k.rjust(w) for k, w in zip(row, widths)) + "\n"
            + "  ".join(v.rjust(w) for v, w in zip(row.values(), widths)))


def _plain(o):
    if type(o).__module__ == "numpy" and hasattr(o, "item"):  # numpy scalars are numbers, not strings
        return o.item()
    return str(o)


def write_json(path: str | os.PathLike, obj, *, indent: int = 2) -> Path:
    """``obj`` as JSON, atomically; numpy scalars as numbers, anything else JSON lacks as its ``str``."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, default=_plain) + "\n")


def write_results(json_path: str | os.PathLike, result, markdown: str | None = None, *, indent: int = 2) -> Path:
    """``result`` as JSON at ``json_path`` and ``markdown`` beside it (``.md``), each atomically; returns the
    markdown's path."""
    json_path = Path(json_path)
    write_json(json_path, result, indent=indent)
    md = json_path.with_suffix(".md")
    if markdown is not None:
        write_text_atomic(md, markdown)
    return md


def save(out_dir: str | os.PathLike, stem: str, result, markdown: str) -> Path:
    """``out_dir/stem.json`` and ``.md`` (:func:`write_results`), said on the terminal; returns the JSON's path."""
    path = Path(out_dir) / f"{stem}.json"
    write_results(path, result, markdown)
    print(f"wrote {path} and {path.with_suffix('.md').name}", flush=True)
    return path
