"""Quantization formats and layers. ``nvfp4``: the NVFP4 format (issue 5)."""

from longlive.quant.nvfp4 import NVFP4Tensor, fake_quantize, load, quantize, save

__all__ = ["NVFP4Tensor", "fake_quantize", "load", "quantize", "save"]
