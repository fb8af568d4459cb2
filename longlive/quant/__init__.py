"""NVFP4 (issue 5): the format (``nvfp4``), linear layers with backends and QAT (``linear``, ``convert``)
and the KV cache storage (``kv_cache``)."""

from longlive.quant.convert import (
    ConversionReport, apply_qat, convert_to_nvfp4, planned_weight_bytes, remove_qat, weight_bytes,
)
from longlive.quant.kv_cache import NVFP4KVStorage, make_kv_storage
from longlive.quant.linear import NVFP4FakeQuantLinear, NVFP4Linear, TENVFP4Linear, resolve_backend
from longlive.quant.nvfp4 import NVFP4Tensor, fake_quantize, load, quantize, save

__all__ = [
    "NVFP4Tensor", "fake_quantize", "load", "quantize", "save",
    "NVFP4Linear", "NVFP4FakeQuantLinear", "TENVFP4Linear", "resolve_backend",
    "ConversionReport", "convert_to_nvfp4", "apply_qat", "remove_qat", "weight_bytes", "planned_weight_bytes",
    "NVFP4KVStorage", "make_kv_storage",
]
