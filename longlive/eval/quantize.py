"""The ``quantize`` stage's work: LoRA first, then NVFP4; the checkpoint, its errors, sizes and quality.

For one few-step student (a ``train_dmd`` export), built by :func:`longlive.inference.build.build_dit` (its LoRA
adapters merged into the weights at load), :func:`longlive.quant.export.export_nvfp4` converts and writes
the NVFP4 checkpoint and measures its errors and sizes; this module then scores the built-in
prompt-following benchmark of the bf16 student and of the NVFP4 student with the NVFP4 KV cache, on the held-out
prompts and seeds ``evaluate`` uses. The NVFP4 student itself (weights + activations, dense cache) is not scored
here: ``evaluate`` scores it on those same prompts and seeds (the figure was equal to the last digit when both
did), so its row there is the third point of the comparison. It sits in the eval layer because the scoring and the
build sit above ``quant``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from longlive.config import Preset
from longlive.eval.quality import eval_prompt_following, load_checkpoint
from longlive.inference.build import build_dit
from longlive.models.checkpoint import AR_CONFIG_NAME, Checkpoint
from longlive.quant.export import export_nvfp4

log = logging.getLogger(__name__)


def quantize_student(
    preset: Preset, student_dir: str | os.PathLike, out_dir: str | os.PathLike, *, base_dir: str | os.PathLike,
    num_prompts: int, plots_dir: str | os.PathLike | None = None, device: str = "cpu",
) -> dict:
    """Quantize one student to ``out_dir`` and return the metrics (see the module docstring)."""
    student_dir, out_dir = Path(student_dir), Path(out_dir)
    student = Checkpoint.open(student_dir)
    if student.trained is None:
        raise FileNotFoundError(f"{student_dir / AR_CONFIG_NAME} not found: quantize starts from a train_dmd (or "
                                "train_ar) export")
    ar_config = student.trained
    # LoRA merged first, then quantized where it runs: the backend is picked for this device
    model = build_dit(student, preset, device=device, dtype=torch.float32)
    x = export_nvfp4(model, preset, out_dir, ar_config, device=device)
    report = x.report

    kind = "i2v" if ar_config.get("i2v") else "t2v"
    scores = {}
    for name, checkpoint, overrides, kv in (("bf16", student_dir, [], "dense"), ("nvfp4_kv", out_dir, [], "nvfp4")):
        p = preset.model_copy(update={"quant": preset.quant.model_copy(update={"kv_cache": kv})})
        models, cfg, _ = load_checkpoint(p, checkpoint, base_dir, overrides, device=device)
        r = eval_prompt_following(models, cfg, [kind], i2v=kind == "i2v", num_prompts=num_prompts, samples=0)[kind]
        scores[name] = {"score": r["score"], "score_sem": r["score_sem"]}
    errors = report.weight_error
    if plots_dir is not None:
        rows = [{"layer": i, "name": n, "error": e} for i, (n, e) in enumerate(errors.items())]
        plots = Path(plots_dir)
        plots.mkdir(parents=True, exist_ok=True)
        (plots / "layer_error.json").write_text(json.dumps(rows, indent=1))
    metrics = {
        "kind": kind,
        "lora_merged": x.lora_merged,
        "backend": report.backend,
        "layers_quantized": len(report.quantized),
        "layers_kept": len(report.kept),
        "weight_error_mean": float(np.mean(list(errors.values()))) if errors else None,
        "weight_error_max": float(np.max(list(errors.values()))) if errors else None,
        "weight_bytes_bf16": x.bf16_bytes,
        "weight_bytes_nvfp4": x.nvfp4_bytes,
        "weight_bytes_ratio": x.nvfp4_bytes / x.bf16_bytes,
        "quantized_layers_bytes_ratio": x.quantized_nvfp4_bytes / x.quantized_bf16_bytes if x.quantized_bf16_bytes else None,
        "wan22_5b_weight_bytes_ratio": x.wan_ratio,
        "kv_bytes_per_frame_bf16": x.kv_bf16,
        "kv_bytes_per_frame_nvfp4": x.kv_nvfp4,
        "kv_bytes_ratio": x.kv_nvfp4 / x.kv_bf16,
        "num_prompts": num_prompts,
        "score_bf16": scores["bf16"]["score"],
        "score_nvfp4_kv": scores["nvfp4_kv"]["score"],
        "score_sem_bf16": scores["bf16"]["score_sem"],
        "score_delta_nvfp4_kv": scores["nvfp4_kv"]["score"] - scores["bf16"]["score"],
        "convert_s": round(x.convert_s, 3),
    }
    log.info("quantize %s: %s", student_dir, metrics)
    return metrics


__all__ = ["quantize_student"]
