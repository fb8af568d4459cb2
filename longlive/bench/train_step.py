"""What a training-step benchmark measures beyond time: useful FLOPs, the device's matmul rate, where the time goes.

* :class:`FlopCounter` hooks a :class:`~longlive.models.dit.WanDiT` and adds up the *useful* FLOPs of every forward
  it runs (:data:`FLOP_FORMULA`): linears as 2 x parameters x tokens, self-attention over the query-key pairs the
  mask allows (a :class:`~longlive.models.attention.FrameMask` counts them; a KV-cache read attends to every held
  frame), cross-attention over the text tokens; x3 for a forward that builds a graph (its backward is 2x), x1 for one
  under ``no_grad``. Recomputation under activation checkpointing is not useful work and is not counted.
* :func:`matmul_tflops`: the rate MFU divides by, measured in the same run with one large ``torch.matmul``.
* :func:`time_split`: a ``torch.profiler`` trace cut into attention, linear and other time, by kernel name on CUDA
  and by operator on the CPU.
"""

from __future__ import annotations

import resource
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from longlive.bench.harness import bench_ms
from longlive.models.attention import FrameMask
from longlive.models.dit import WanDiT

FLOP_FORMULA = (
    "useful FLOP per forward = 2 * P * S  +  4 * L * D * pairs  +  4 * L * D * S * T;  "
    "a forward with gradients counts 3x (backward = 2x forward), one under no_grad 1x;  "
    "P = DiT parameters, S = query tokens, L = layers, D = heads x head_dim, pairs = query-key pairs the "
    "self-attention mask allows (block-sparse layouts count allowed pairs only; a KV-cache read: S x (cached + S)), "
    "T = text tokens per query; MFU = useful FLOP / step time / the matmul rate measured in this run"
)


class FlopCounter:
    """Useful FLOPs of the forwards of ``models`` while :meth:`counting` (see :data:`FLOP_FORMULA`)."""

    def __init__(self, *models: WanDiT) -> None:
        self.flops = 0.0
        self.passes: list[dict] = []
        self._on = False
        self._handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in models]

    @contextmanager
    def counting(self) -> Iterator["FlopCounter"]:
        self._on, self.flops, self.passes = True, 0.0, []
        try:
            yield self
        finally:
            self._on = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def _hook(self, model: WanDiT, args: tuple, kwargs: dict) -> None:
        if not self._on:
            return
        x = args[0] if args else kwargs["x"]
        context = args[2] if len(args) > 2 else kwargs["context"]
        cfg = model.cfg
        pt, ph, pw = cfg.patch_size
        B, f, tokens = x.shape[0], x.shape[2] // pt, (x.shape[3] // ph) * (x.shape[4] // pw)
        S = f * tokens
        mask, cache = kwargs.get("attn_mask"), kwargs.get("kv_cache")
        if isinstance(mask, FrameMask):
            pairs = mask.allowed_pairs() * (1 if mask.batched else B)
        elif mask is not None:
            pairs = int(mask.expand(B, 1, *mask.shape[-2:]).sum())
        elif kwargs.get("block_frames") is not None:
            raise ValueError("FlopCounter counts explicit masks and cache reads; pass attn_mask, not block_frames")
        else:
            held = cache.num_frames * tokens if cache is not None else 0
            pairs = B * S * (held + S)
        text = context.shape[-2]
        D, L = cfg.dim, cfg.num_layers
        forward = 2 * model.num_params() * B * S + 4 * L * D * pairs + 4 * L * D * B * S * text
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())
        self.flops += forward * (3 if grad else 1)
        self.passes.append({"tokens": B * S, "pairs": pairs, "grad": grad})


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """TFLOP/s of one ``n x n @ n x n`` ``torch.matmul`` in ``dtype`` (n = 8192 on CUDA, 1024 on the CPU)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    ms = bench_ms(lambda: torch.matmul(a, b), device, warmup=25, rep=100)
    return 2 * n**3 / (ms * 1e-3) / 1e12


ATTENTION = ("flash", "fmha", "attention", "attn", "flex", "sdpa", "triton_tem")  # triton_tem: flex's compiled kernels
LINEAR = ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas", "wgmma", "s16816",
          "aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "aten::baddbmm")


def classify(name: str) -> str:
    n = name.lower()
    if any(p in n for p in ATTENTION):
        return "attention"
    return "linear" if any(p in n for p in LINEAR) else "other"


def time_split(fn: Callable[[], None], device: torch.device) -> dict:
    """Milliseconds of attention, linear and other work in one call of ``fn`` under ``torch.profiler``: CUDA kernel
    time by kernel name (``idle`` = the wall clock the GPU ran no kernel), or CPU operator self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    split = {"attention": 0.0, "linear": 0.0, "other": 0.0}
    if device.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        for e in kernels:
            split[classify(e.name)] += e.device_time / 1e3
        if kernels:
            span = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) / 1e3
            split["idle"] = max(0.0, span - sum(split.values()))
        split["basis"] = "CUDA kernel time by kernel name"
    else:
        for e in prof.key_averages():
            split[classify(e.key)] += e.self_cpu_time_total / 1e3
        split["basis"] = "CPU operator self time by operator name"
    return split


def peak_memory_gib(device: torch.device) -> dict:
    """Peak allocated and reserved CUDA memory since the last reset, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return {"peak_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"peak_rss_gib": rss / 2**30}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Activation checkpointing of every DiT block (recomputed in backward), as ``train_dmd`` applies to its critic."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from longlive.models.dit import Block

    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
    return model


__all__ = ["FLOP_FORMULA", "FlopCounter", "matmul_tflops", "time_split", "classify", "peak_memory_gib",
           "reset_peak_memory", "checkpoint_blocks"]
