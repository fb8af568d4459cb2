"""The ``quantize`` stage's work: LoRA first, then NVFP4; the checkpoint, its errors, sizes and quality.

For one few-step student (a ``train_dmd`` export), built by :func:`longlive.inference.build.build_dit` (its LoRA
adapters merged into the weights at load): convert the linears to NVFP4 (``quant`` in params: kept layers,
scale rule, 2D blocks), write the NVFP4 checkpoint (``dit/`` + the student's ``ar_config.json``), and report

* per-layer weight error ``||W - dq(q(W))|| / ||W||``;
* weight bytes of the NVFP4 model against the same model in bf16, overall and over the quantized layers;
* KV-cache bytes per latent frame, NVFP4 storage against bf16;
* the built-in prompt-following score of the bf16 student, the NVFP4 student (weights + activations) and
  the NVFP4 student with the NVFP4 KV cache, on the same held-out prompts and seeds.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from longlive.config import Preset
from longlive.models.checkpoint import AR_CONFIG_NAME, DIT_DIR, Checkpoint, write_trained
from longlive.quant.checkpoint import save_nvfp4_dit
from longlive.quant.convert import convert_to_nvfp4, weight_bytes
from longlive.quant.kv_cache import NVFP4KVStorage
from longlive.quant.linear import NVFP4Linear

log = logging.getLogger(__name__)


def kv_bytes_per_frame(num_layers: int, frame_tokens: int, num_heads: int, head_dim: int) -> tuple[int, int]:
    """(bf16 bytes, NVFP4 bytes) of one latent frame's K and V over all layers, the NVFP4 figure measured
    on :class:`NVFP4KVStorage` itself."""
    storage = NVFP4KVStorage(num_layers)
    kv = torch.randn(1, frame_tokens, num_heads, head_dim, generator=torch.Generator().manual_seed(0))
    for layer in range(num_layers):
        storage.update(layer, kv, kv, True)
    storage.frames_written(1)
    return 2 * num_layers * frame_tokens * num_heads * head_dim * 2, storage.nbytes()


def quantize_student(
    preset: Preset, student_dir: str | os.PathLike, out_dir: str | os.PathLike, *, base_dir: str | os.PathLike,
    num_prompts: int, plots_dir: str | os.PathLike | None = None, device: str = "cpu",
) -> dict:
    """Quantize one student to ``out_dir`` and return the metrics (see the module docstring)."""
    # the eval stack loads VAE/text, and the build sits above this layer: both only here (issue 19.3 moves the
    # scoring into the stage)
    from longlive.eval.quality import evaluate, load_checkpoint
    from longlive.inference.build import build_dit

    student_dir, out_dir = Path(student_dir), Path(out_dir)
    student = Checkpoint.open(student_dir)
    if student.trained is None:
        raise FileNotFoundError(f"{student_dir / AR_CONFIG_NAME} not found: quantize starts from a train_dmd (or "
                                "train_ar) export")
    ar_config = student.trained
    # LoRA merged first, then quantized where it runs: the backend below is picked for this device
    model = build_dit(student, preset, device=device, dtype=torch.float32)
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
    write_trained(out_dir, {**ar_config, "quantized": "nvfp4", "lora_merged": merged})

    d = preset.dit
    h, w = preset.latent_shape[2:]
    tokens = (h // d.patch_size[1]) * (w // d.patch_size[2])
    kv_bf16, kv_nvfp4 = kv_bytes_per_frame(d.num_layers, tokens, d.num_heads, d.head_dim)

    # the same conversion planned for the Wan2.2-5B architecture (meta device, no memory): tiny models are
    # dominated by the embedders and adaLN projection that stay high precision, a 5B model is not
    from longlive.config import load_preset
    from longlive.models.dit import WanDiT
    from longlive.quant.convert import planned_weight_bytes

    big = load_preset("wan22-5b")
    with torch.device("meta"):
        wan = WanDiT(big.dit, big.vae.z_dim, big.text.dim)
    wan_ratio = planned_weight_bytes(wan, preset.quant) / weight_bytes(wan, 2)

    kind = "i2v" if ar_config.get("i2v") else "t2v"
    scores = {}
    for name, checkpoint, overrides, kv in (("bf16", student_dir, [], "dense"), ("nvfp4", out_dir, [], "dense"),
                                            ("nvfp4_kv", out_dir, [], "nvfp4")):
        p = preset.model_copy(update={"quant": preset.quant.model_copy(update={"kv_cache": kv})})
        models, cfg, _ = load_checkpoint(p, checkpoint, base_dir, overrides, device=device)
        r = evaluate(models, cfg, [kind], i2v=kind == "i2v", num_prompts=num_prompts, samples=0)[kind]
        scores[name] = {"score": r["score"], "score_sem": r["score_sem"]}
    errors = report.weight_error
    if plots_dir is not None:
        rows = [{"layer": i, "name": n, "error": e} for i, (n, e) in enumerate(errors.items())]
        plots = Path(plots_dir)
        plots.mkdir(parents=True, exist_ok=True)
        (plots / "layer_error.json").write_text(json.dumps(rows, indent=1))
    metrics = {
        "kind": kind,
        "lora_merged": merged,
        "backend": report.backend,
        "layers_quantized": len(report.quantized),
        "layers_kept": len(report.kept),
        "weight_error_mean": float(np.mean(list(errors.values()))) if errors else None,
        "weight_error_max": float(np.max(list(errors.values()))) if errors else None,
        "weight_bytes_bf16": bf16_bytes,
        "weight_bytes_nvfp4": nvfp4_bytes,
        "weight_bytes_ratio": nvfp4_bytes / bf16_bytes,
        "quantized_layers_bytes_ratio": q_nvfp4 / q_bf16 if q_bf16 else None,
        "wan22_5b_weight_bytes_ratio": wan_ratio,
        "kv_bytes_per_frame_bf16": kv_bf16,
        "kv_bytes_per_frame_nvfp4": kv_nvfp4,
        "kv_bytes_ratio": kv_nvfp4 / kv_bf16,
        "num_prompts": num_prompts,
        "score_bf16": scores["bf16"]["score"],
        "score_nvfp4": scores["nvfp4"]["score"],
        "score_nvfp4_kv": scores["nvfp4_kv"]["score"],
        "score_sem_bf16": scores["bf16"]["score_sem"],
        "score_delta_nvfp4": scores["nvfp4"]["score"] - scores["bf16"]["score"],
        "score_delta_nvfp4_kv": scores["nvfp4_kv"]["score"] - scores["bf16"]["score"],
        "convert_s": round(convert_s, 3),
    }
    log.info("quantize %s: %s", student_dir, metrics)
    return metrics


__all__ = ["quantize_student", "kv_bytes_per_frame"]
