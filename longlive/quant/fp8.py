"""FP8 (E4M3) linear layers for Hopper: row-wise dynamic W8A8, applied to a built model from outside.

LongLive 2.0's speed path on an H100 is torchao's float8 "row-wise" recipe plus ``torch.compile``. The
device image has no torchao, and the recipe is small, so it is written here directly on
``torch._scaled_mm`` (the same cuBLAS/CUTLASS row-wise FP8 GEMM torchao calls):

* weights: quantized once, one float32 scale per output channel (``amax(row) / 448``), E4M3 codes;
* activations: quantized on every call, one scale per token (``kernels/fp8_quant.py``: one launch);
* ``y = (a_codes @ w_codes^T) * a_scale * w_scale + bias``, accumulated in float32 by the GEMM, output bf16.

Numerics equal the ``emulated`` path up to the GEMM's float32 accumulation order and the bf16 output
rounding (``dequantize(a) @ dequantize(w)^T + b`` in float32), which runs anywhere and is the reference.
:func:`convert_to_fp8` swaps the same linears :func:`longlive.quant.convert.convert_to_nvfp4` would
(``keep_high_precision`` patterns: embedders, ``time_proj``, ``proj_out`` by default); the model file never
mentions FP8.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longlive_kernels import fp8_quant_ref
from longlive.kernels_dispatch import use_kernel

log = logging.getLogger(__name__)


def fp8_gemm_available(device: torch.device | str | None = None) -> bool:
    """Row-wise FP8 ``torch._scaled_mm``: CUDA compute capability >= 8.9 (Ada, Hopper, Blackwell)."""
    if not torch.cuda.is_available() or not hasattr(torch, "_scaled_mm"):
        return False
    device = torch.device(device or "cuda")
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_rows(x2d: Tensor) -> tuple[Tensor, Tensor]:
    """(R, K) -> E4M3 codes (R, K) and float32 scales (R, 1): the Triton kernel where it runs, else the reference."""
    if use_kernel(x2d):
        from longlive_kernels.fp8_quant import quantize_rows as kernel

        return kernel(x2d)
    return fp8_quant_ref.quantize_rows(x2d)


class FP8Linear(nn.Module):
    """Row-wise dynamic FP8 linear. Buffers: ``weight_fp8`` (out, in) float8_e4m3fn, ``weight_scale``
    (1, out) float32, ``bias`` (out,) or None. ``emulated`` forces the float32 reference computation."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None,
                 bias_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if in_features % 16 or out_features % 16:
            raise ValueError(f"FP8 GEMMs need in/out features divisible by 16, got {in_features} x {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.emulated = False
        self.register_buffer("weight_fp8", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer("weight_scale", torch.ones(1, out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> "FP8Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        codes, scales = quantize_rows(linear.weight.detach())
        layer.weight_fp8, layer.weight_scale = codes, scales.reshape(1, -1).contiguous()
        # bias in bf16: what the row-wise GEMM adds in its epilogue (the output is bf16 anyway)
        layer.bias = linear.bias.detach().to(torch.bfloat16).clone() if linear.bias is not None else None
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8=e4m3 row-wise"

    @property
    def weight_nbytes(self) -> int:
        b = self.bias.numel() * self.bias.element_size() if self.bias is not None else 0
        return self.weight_fp8.numel() + self.weight_scale.numel() * 4 + b

    # whether torch._scaled_mm takes the bias in its epilogue with row-wise scales (learned at the first call)
    _bias_in_gemm: bool = True

    def _scaled_mm(self, a: Tensor, a_scale: Tensor) -> Tensor:
        # row-wise scaling needs a bf16 output; mat2 column-major (the transpose of the row-major codes)
        def mm(bias):
            return torch._scaled_mm(a, self.weight_fp8.t(), scale_a=a_scale, scale_b=self.weight_scale,
                                    bias=bias, out_dtype=torch.bfloat16, use_fast_accum=True)

        if self.bias is not None and FP8Linear._bias_in_gemm:
            try:
                return mm(self.bias)
            except RuntimeError as e:  # some torch builds refuse a bias with row-wise scales
                log.info("torch._scaled_mm refused the bias with row-wise scales (%s); adding it separately", e)
                FP8Linear._bias_in_gemm = False
        y = mm(None)
        return y if self.bias is None else y + self.bias

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input (..., {self.in_features}), got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        a, a_scale = quantize_rows(x2)
        if not self.emulated and x2.is_cuda and fp8_gemm_available(x2.device):
            y = self._scaled_mm(a, a_scale)
        else:
            with torch.autocast(x.device.type, enabled=False):
                w = fp8_quant_ref.dequantize_rows(self.weight_fp8, self.weight_scale.reshape(-1, 1))
                b = self.bias.float() if self.bias is not None else None
                y = F.linear(fp8_quant_ref.dequantize_rows(a, a_scale), w, b)
        return y.to(out_dtype).reshape(*lead, self.out_features)


@torch.no_grad()
def convert_to_fp8(model: nn.Module, keep_high_precision: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """Swap the model's linears (except the kept ones, default ``QuantConfig().keep_high_precision``) for
    :class:`FP8Linear`, in place. Returns the converted names."""
    from longlive.quant.convert import _set_module, select_linears

    if keep_high_precision is None:
        from longlive.quant.convert import _default_config

        keep_high_precision = _default_config().keep_high_precision
    names, _ = select_linears(model, keep_high_precision)
    modules = dict(model.named_modules())
    for name in names:
        _set_module(model, name, FP8Linear.from_linear(modules[name]))
    log.info("FP8: %d linears converted to row-wise E4M3", len(names))
    return names
