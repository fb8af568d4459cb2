"""The NVFP4 half of the ``quantize`` stage: convert a built student, write its checkpoint, measure its sizes.

Given a student already built (its LoRA merged at load, see :mod:`longlive.eval.quantize`, which drives the
stage and scores the result): convert the linears to NVFP4 (``quant`` in params: kept layers, scale rule,
2D blocks), write the NVFP4 checkpoint (``dit/`` + the student's ``ar_config.json``), and measure

* per-layer weight error ``||W - dq(q(W))|| / ||W||``;
* weight bytes of the NVFP4 model against the same model in bf16, overall and over the quantized layers;
* KV-cache bytes per latent frame, NVFP4 storage against bf16.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from longlive.config import Preset, load_preset
from longlive.models.checkpoint import DIT_DIR, write_trained
from longlive.models.dit import WanDiT
from longlive.quant.checkpoint import save_nvfp4_dit
from longlive.quant.convert import ConversionReport, convert_to_nvfp4, planned_weight_bytes, weight_bytes
from longlive.quant.kv_cache import NVFP4KVStorage
from longlive.quant.linear import NVFP4Linear


def kv_bytes_per_frame(num_layers: int, frame_tokens: int, num_heads: int, head_dim: int) -> tuple[int, int]:
    """(bf16 bytes, NVFP4 bytes) of one latent frame's K and V over all layers, the NVFP4 figure measured
    on :class:`NVFP4KVStorage` itself."""
    storage = NVFP4KVStorage(num_layers)
    kv = torch.randn(1, frame_tokens, num_heads, head_dim, generator=torch.Generator().manual_seed(0))
    for layer in range(num_layers):
        storage.update(layer, kv, kv, True)
    storage.frames_written(1)
    return 2 * num_layers * frame_tokens * num_heads * head_dim * 2, storage.nbytes()


@dataclass
class NVFP4Export:
    """What :func:`export_nvfp4` measured while converting and writing one student."""
    report: ConversionReport
    lora_merged: bool
    bf16_bytes: int
    nvfp4_bytes: int
    quantized_bf16_bytes: int
    quantized_nvfp4_bytes: int
    wan_ratio: float
    kv_bf16: int
    kv_nvfp4: int
    convert_s: float


def export_nvfp4(model: torch.nn.Module, preset: Preset, out_dir: str | os.PathLike, trained: dict, *,
                 device: str = "cpu") -> NVFP4Export:
    """Convert the built student ``model`` to NVFP4 in place and write it, with ``trained`` (its
    ``ar_config.json``) marked quantized, to ``out_dir``."""
    out_dir = Path(out_dir)
    merged = model.build_record.lora_merged
    bf16_bytes = weight_bytes(model, 2)
    t0 = time.perf_counter()
    backend = "emulated" if device == "cpu" else preset.quant.backend
    report = convert_to_nvfp4(model, preset.quant, backend=backend, device=device)
    convert_s = time.perf_counter() - t0
    nvfp4_bytes = weight_bytes(model, 2)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, NVFP4Linear)}
    q_bf16 = sum(m.in_features * m.out_features * 2 for m in linears.values())
    q_nvfp4 = sum(m.weight_nvfp4().nbytes for m in linears.values())

    out_dir.mkdir(parents=True, exist_ok=True)
    save_nvfp4_dit(model, out_dir / DIT_DIR, preset.quant, report)
    write_trained(out_dir, {**trained, "quantized": "nvfp4", "lora_merged": merged})

    d = preset.dit
    h, w = preset.latent_shape[2:]
    tokens = (h // d.patch_size[1]) * (w // d.patch_size[2])
    kv_bf16, kv_nvfp4 = kv_bytes_per_frame(d.num_layers, tokens, d.num_heads, d.head_dim)

    # the same conversion planned for the Wan2.2-5B architecture (meta device, no memory): tiny models are
    # dominated by the embedders and adaLN projection that stay high precision, a 5B model is not
    big = load_preset("wan22-5b")
    with torch.device("meta"):
        wan = WanDiT(big.dit, big.vae.z_dim, big.text.dim)
    wan_ratio = planned_weight_bytes(wan, preset.quant) / weight_bytes(wan, 2)
    return NVFP4Export(report, merged, bf16_bytes, nvfp4_bytes, q_bf16, q_nvfp4, wan_ratio, kv_bf16, kv_nvfp4,
                       convert_s)


__all__ = ["NVFP4Export", "export_nvfp4", "kv_bytes_per_frame"]
