"""The one switch for every Triton kernel of ``kernels/``, and the rule that picks kernel or reference.

``LONGLIVE_KERNELS=0`` (or ``off`` / ``false`` / ``no``) turns every kernel off: the fused inference
kernels (RoPE, LayerNorm + adaLN, gated residual, FP8 quantization) fall back to their plain-PyTorch
references, and the NVFP4 Triton backend reports itself unavailable (``auto`` then picks ``emulated``).
Unset or anything else: a kernel runs when its tensors are on a CUDA device and Triton imports; on the
CPU the reference runs -- except inside :func:`interpret_on_cpu` under ``TRITON_INTERPRET=1``, which
tests use to push CPU tensors through the kernels in Triton's interpreter.

Read on every call (a dictionary lookup), so the switch also works on a model already set up.
Imports nothing beyond torch, so it loads on a bare GPU image.
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from typing import Iterator

import torch

ENV = "LONGLIVE_KERNELS"
_OFF = frozenset({"0", "off", "false", "no"})
_cpu_interpreter = False


def kernels_enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in _OFF


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_kernel(*tensors: torch.Tensor) -> bool:
    """True when the kernels are on and every tensor can go through a Triton kernel here."""
    if not kernels_enabled() or not triton_importable():
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return _cpu_interpreter and os.environ.get("TRITON_INTERPRET") == "1"


@contextmanager
def interpret_on_cpu() -> Iterator[None]:
    """Let CPU tensors use the kernels (in Triton's interpreter, TRITON_INTERPRET=1): for tests."""
    global _cpu_interpreter
    previous, _cpu_interpreter = _cpu_interpreter, True
    try:
        yield
    finally:
        _cpu_interpreter = previous
