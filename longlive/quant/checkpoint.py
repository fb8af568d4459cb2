"""NVFP4 DiT checkpoints: the converted model's state (packed codes, E4M3 block scales, FP32 globals, and
the high-precision layers) in one safetensors file, beside ``quantization.json`` that records the format
and how it was made, and the DiT's ``config.json``.

Loading rebuilds the plain model on the meta device, converts it with the recorded settings (which
creates the NVFP4 layers and their buffers), then loads the stored state into it: the packed weights are
used as stored, never re-quantized. The backend that computes with them is chosen at load time for the
device (``auto``), since the same packed weights serve every backend.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from longlive.config import DiTConfig, QuantConfig
from longlive.io import atomic_dir, save_safetensors
from longlive.models.checkpoint import QUANT_FILE
from longlive.models.dit import WanDiT
from longlive.quant.convert import ConversionReport, convert_to_nvfp4

WEIGHTS_FILE = "model.nvfp4.safetensors"
FORMAT = "nvfp4"


def is_nvfp4_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / QUANT_FILE).is_file()


def save_nvfp4_dit(model: WanDiT, path: str | os.PathLike, cfg: QuantConfig, report: ConversionReport) -> Path:
    """Write a converted model to directory ``path`` atomically (``longlive.io.atomic_dir``)."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_safetensors(state, tmp / WEIGHTS_FILE,
                         metadata={"format": FORMAT, "backend": report.backend, "scale_rule": cfg.scale_rule})
        (tmp / "config.json").write_text(json.dumps({
            "dit": model.cfg.model_dump(mode="json"), "in_channels": model.in_channels,
            "out_channels": model.out_channels, "text_dim": model.text_dim}, indent=2) + "\n")
        (tmp / QUANT_FILE).write_text(json.dumps({
            "format": FORMAT, "element": "e2m1", "block_size": 16, "block_scale": "e4m3", "global_scale": "fp32",
            "scale_rule": cfg.scale_rule, "weight_block_2d": cfg.weight_block_2d,
            "keep_high_precision": list(cfg.keep_high_precision), "backend": report.backend,
            "backend_note": "the backend used when converting; loading picks one for its device (auto)",
            "quantized_layers": report.quantized, "kept_layers": report.kept,
        }, indent=2) + "\n")
    return path


def load_nvfp4_dit(path: str | os.PathLike, *, backend: str = "auto", device: torch.device | str = "cpu") -> WanDiT:
    """Load an NVFP4 checkpoint written by :func:`save_nvfp4_dit`, computing with ``backend`` on ``device``."""
    path = Path(path)
    for name in (QUANT_FILE, WEIGHTS_FILE, "config.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing: {path} is not a complete NVFP4 checkpoint "
                                    f"(write it with the quantize stage)")
    meta = json.loads((path / QUANT_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path / QUANT_FILE}: format {meta.get('format')!r}, expected {FORMAT!r}")
    config = json.loads((path / "config.json").read_text())
    with torch.device("meta"):
        model = WanDiT(DiTConfig(**config["dit"]), config["in_channels"], config["text_dim"], config["out_channels"])
    model = model.to_empty(device=device)
    with torch.no_grad():  # uninitialised memory may hold NaN, which the quantizer rightly refuses
        for t in list(model.parameters()) + list(model.buffers()):
            t.zero_()
    cfg = QuantConfig(scale_rule=meta["scale_rule"], weight_block_2d=meta["weight_block_2d"],
                      keep_high_precision=meta["keep_high_precision"], backend=backend)
    convert_to_nvfp4(model, cfg, device=device)
    state = load_file(str(path / WEIGHTS_FILE), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path / WEIGHTS_FILE} does not fit the model its config describes: missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


__all__ = ["save_nvfp4_dit", "load_nvfp4_dit", "is_nvfp4_checkpoint", "QUANT_FILE", "WEIGHTS_FILE"]
