"""Convert a built model to NVFP4 from outside, as torchao/torchtitan convert to float8: the model file
never mentions quantization.

* :func:`convert_to_nvfp4`: each ``nn.Linear`` not kept high precision becomes an
  :class:`~longlive.quant.linear.NVFP4Linear` (packed weights, W4A4) with the configured backend, or a
  :class:`~longlive.quant.linear.TENVFP4Linear` for ``transformer_engine``.
* :func:`apply_qat`: each such linear becomes an
  :class:`~longlive.quant.linear.NVFP4FakeQuantLinear` (same parameters), for AR / DMD training;
  :func:`remove_qat` undoes it.

Which layers stay high precision is ``QuantConfig.keep_high_precision``: fnmatch patterns over module
names, where a pattern also covers every module under it (``time_embedder`` keeps
``time_embedder.linear_1``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

import torch
from torch import nn

from longlive.quant.linear import (
    NVFP4FakeQuantLinear, NVFP4Linear, TENVFP4Linear, check_quantizable, resolve_backend,
)
from longlive.quant.nvfp4 import BLOCK

if TYPE_CHECKING:
    from longlive.config import QuantConfig

log = logging.getLogger(__name__)


def _default_config() -> "QuantConfig":
    # Imported on use: longlive.config needs pydantic, and longlive.quant must load without it (the GPU
    # image the kernels are checked on has torch and triton only).
    from longlive.config import QuantConfig

    return QuantConfig()

# Modules whose weight *dtype* the WanDiT forward reads (``text_embedder.linear_1.weight.dtype``,
# ``time_embedder.linear_1.weight.dtype``): they must keep a ``weight`` tensor, so they stay high
# precision whatever the patterns say (quantizing them is refused with this explanation).
_READS_WEIGHT_DTYPE = ("text_embedder.linear_1", "time_embedder.linear_1")


def is_kept(name: str, patterns: list[str] | tuple[str, ...]) -> bool:
    """True when module ``name`` matches a pattern or lies under a module that does."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatchcase(p, pat) for pat in patterns for p in prefixes)


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Plain ``nn.Linear`` modules (a QAT layer counts as one: it is converted like the linear it wraps)."""
    return [(n, m) for n, m in model.named_modules() if type(m) in (nn.Linear, NVFP4FakeQuantLinear)]


def select_linears(model: nn.Module, keep: list[str] | tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(names to quantize, names kept high precision) among the model's linears; warns on patterns
    that match no module at all (a typo would otherwise quantize a layer meant to stay precise)."""
    names = [n for n, _ in model.named_modules() if n]
    for pat in keep:
        if not any(is_kept(n, [pat]) for n in names):
            log.warning("quant.keep_high_precision pattern %r matches no module of %s", pat, type(model).__name__)
    quantize, kept = [], []
    for name, _ in _linears(model):
        (kept if is_kept(name, keep) else quantize).append(name)
    for name in quantize:
        if name in _READS_WEIGHT_DTYPE:
            raise ValueError(
                f"{name} must stay high precision: the model reads its weight dtype in forward; "
                f"add {name.split('.')[0]!r} to quant.keep_high_precision"
            )
    return quantize, kept


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@dataclass
class ConversionReport:
    backend: str
    quantized: list[str]
    kept: list[str]
    # per quantized layer: relative Frobenius error of the weight, ||W - dq(q(W))|| / ||W||
    weight_error: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def convert_to_nvfp4(
    model: nn.Module, cfg: QuantConfig | None = None, *, backend: str | None = None,
    device: torch.device | str | None = None,
) -> ConversionReport:
    """Swap the model's linears (except the kept ones) for NVFP4 layers, in place.

    ``backend`` overrides ``cfg.backend``; ``auto`` resolves for ``device`` (default: where the model's
    parameters are). QAT layers are converted from their (high-precision) weights.
    """
    cfg = cfg or _default_config()
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    chosen = resolve_backend(backend or cfg.backend, device)
    quantize, kept = select_linears(model, cfg.keep_high_precision)
    modules = dict(model.named_modules())
    report = ConversionReport(chosen, quantize, kept)
    for name in quantize:
        linear = modules[name]
        check_quantizable(name, linear, cfg.weight_block_2d)
        if chosen == "transformer_engine":
            new = TENVFP4Linear(linear, block_2d=cfg.weight_block_2d)
        else:
            new = NVFP4Linear.from_linear(linear, backend=chosen, scale_rule=cfg.scale_rule, block_2d=cfg.weight_block_2d)
            w = linear.weight.detach().float()
            err = (w - new.weight_nvfp4().dequantize()).norm() / w.norm().clamp_min(1e-30)
            report.weight_error[name] = float(err)
        new.train(linear.training)
        _set_module(model, name, new)
    log.info("NVFP4 (%s): %d linears quantized, %d kept high precision", chosen, len(quantize), len(kept))
    return report


def apply_qat(model: nn.Module, cfg: QuantConfig | None = None) -> list[str]:
    """NVFP4 fake quantization (weights and activations, straight-through gradients) on the linears
    that :func:`convert_to_nvfp4` would quantize; in place, keeping the parameters (and so the
    optimizer state, EMA and state-dict keys). Returns the names of the layers it wrapped."""
    cfg = cfg or _default_config()
    quantize, _ = select_linears(model, cfg.keep_high_precision)
    modules = dict(model.named_modules())
    for name in quantize:
        linear = modules[name]
        check_quantizable(name, linear, cfg.weight_block_2d)
        if isinstance(linear, NVFP4FakeQuantLinear):
            linear.scale_rule, linear.block_2d = cfg.scale_rule, cfg.weight_block_2d
            continue
        _set_module(model, name, NVFP4FakeQuantLinear.from_linear(linear, scale_rule=cfg.scale_rule,
                                                                  block_2d=cfg.weight_block_2d))
    log.info("QAT: NVFP4 fake quantization on %d linears", len(quantize))
    return quantize


def remove_qat(model: nn.Module) -> None:
    """Back to plain ``nn.Linear`` modules (same parameters)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, NVFP4FakeQuantLinear):
            _set_module(model, name, m.to_linear())


# ---------------------------------------------------------------------------------------------
# Sizes


def weight_bytes(model: nn.Module, high_precision_bytes: int | None = 2) -> int:
    """Bytes of the model's weights: NVFP4 layers as stored (codes, scales, global, bias), everything
    else at ``high_precision_bytes`` per element (2 = bf16; None = as stored)."""
    total = 0
    for m in model.modules():
        if isinstance(m, NVFP4Linear):
            total += m.weight_nvfp4().nbytes
            if m.bias is not None:
                total += m.bias.numel() * (high_precision_bytes or m.bias.element_size())
            continue
        for t in list(m.parameters(recurse=False)) + [b for b in m.buffers(recurse=False) if b is not None]:
            total += t.numel() * (high_precision_bytes or t.element_size())
    return total


def planned_weight_bytes(model: nn.Module, cfg: QuantConfig | None = None, high_precision_bytes: int = 2) -> int:
    """What :func:`weight_bytes` will give after :func:`convert_to_nvfp4`, from the shapes alone (works on a
    model built on the ``meta`` device, e.g. the full Wan2.2-5B architecture)."""
    cfg = cfg or _default_config()
    quantize, _ = select_linears(model, cfg.keep_high_precision)
    modules = dict(model.named_modules())
    total = weight_bytes(model, high_precision_bytes)
    for name in quantize:
        w = modules[name].weight
        total += w.numel() // 2 + w.numel() // BLOCK + 4 - w.numel() * high_precision_bytes  # codes + scales + global
    return total
