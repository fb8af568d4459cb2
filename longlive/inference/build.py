"""One way to assemble the models an entry point runs: :func:`build_dit`, and :func:`build_models` around it.

train_ar, train_dmd, quantize, evaluate, eval-quality, generate and bench get their DiT from :func:`build_dit`,
which applies these steps in this order, and is the only place that applies them:

1. **load** -- a :class:`~longlive.models.checkpoint.Checkpoint`: plain weights in ``dtype`` on the CPU with the
   LoRA adapter beside ``dit/`` merged in (a student runs as it was trained), or an NVFP4 checkpoint's packed
   weights straight onto ``device`` (the backend picked for the device, the adapter merged before packing);
   or weights already in memory (bench's random DiT);
2. **device** -- ``.to(device)``; then a ``frozen`` model (DMD's teacher) stops taking gradients, and every model
   not built for ``training`` goes to eval mode;
3. **LoRA for training** -- fresh trainable adapters (``lora``; train_dmd's generator), made on the device;
4. **quantize** -- ``nvfp4``: the linears converted to NVFP4 (``quant:`` settings; a packed checkpoint is NVFP4
   already); ``qat``: NVFP4 fake quantization of weights and activations, for training;
5. **inference path** -- with ``inference`` given and its ``kernels``, ``compile`` or ``fp8`` on,
   :func:`longlive.inference.optimize.optimize`: FP8 linears, then fused kernels, the per-prompt context memo and
   torch.compile. After every module swap above, since the memo wraps modules a conversion replaces;
6. **training wrappers** -- ``checkpointing``: activation checkpointing of every block (``"cache_free"``: of
   each block's cross-attention and FFN only, for a model whose self-attention reads a KV cache); ``compile_blocks``:
   ``torch.compile`` of each block (:mod:`longlive.parallel.training`), in torchtitan's order, before FSDP;
7. **parallelize** -- sequence parallel over ``parallel``'s SP group, and FSDP2 over all ranks when
   ``training``. It touches activations only and wraps whatever the steps above left (a fused attention core
   ends up inside the sequence-parallel wrapper).

What was done is recorded on the model (``dit.build_record``, a :class:`BuildRecord`). Nothing downstream
changes a built model: :class:`~longlive.inference.pipeline.StreamingPipeline` streams it as it is.

:func:`build_models` adds what inference needs besides the DiT: the VAE (with its decoder's fused norm + SiLU
when ``inference.kernels``, :mod:`longlive.inference.optimize_vae`), the text encoder, and the light decoder when
``inference.decoder`` is ``light``. The inference settings it builds for are ``preset.inference``, merged by
:meth:`Checkpoint.inference` (preset, trained layout, variant, ``--set``) before the build.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from longlive.config import InferenceConfig, LoRAConfig, Preset
from longlive.device import resolve_device
from longlive.inference.request import LIGHT_DECODER_DIR
from longlive.models.checkpoint import DIT_DIR, Checkpoint
from longlive.models.dit import WanDiT

if TYPE_CHECKING:
    from longlive.models.light_decoder import LightDecoder
    from longlive.models.text import TextEncoder
    from longlive.models.vae import WanVAE
    from longlive.parallel import ParallelState


@dataclass
class BuildRecord:
    """What :func:`build_dit` did to a model, in order (``steps``), and what it became."""

    source: str  # the checkpoint's path, or "in memory"
    steps: list[str] = field(default_factory=list)
    lora_merged: bool = False  # an adapter beside dit/ was merged at load
    quant: dict = field(default_factory=lambda: {"quant": "none"})  # evaluate reports it per variant
    inference_path: dict | None = None  # what fast.optimize applied (None: not asked for)


@dataclass
class Models:
    dit: WanDiT
    vae: WanVAE
    text: TextEncoder
    light_decoder: LightDecoder | None = None  # inference.decoder: light


def build_dit(
    source: Checkpoint | str | os.PathLike | WanDiT,
    preset: Preset,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    inference: InferenceConfig | None = None,
    quant: Literal["none", "nvfp4", "qat"] = "none",
    lora: LoRAConfig | None = None,
    frozen: bool = False,
    training: bool = False,
    checkpointing: bool | Literal["cache_free"] = False,
    compile_blocks: bool = False,
    parallel: ParallelState | None = None,
) -> WanDiT:
    """The DiT of ``source`` with the steps of the module docstring applied. ``device`` None: where it was loaded
    (the CPU) or is; ``dtype`` None: as stored; ``preset`` gives the expected sizes (``dit``) and the ``quant:``
    settings."""
    if isinstance(source, WanDiT):
        dit, record = source, BuildRecord("in memory")
        if device is not None:
            dit = dit.to(device)
            record.steps.append(f"to {torch.device(device)}")
    else:
        ckpt = source if isinstance(source, Checkpoint) else Checkpoint.open(source)
        record = BuildRecord(str(ckpt.path))
        if ckpt.nvfp4:
            from longlive.quant.checkpoint import load_nvfp4_dit

            dit = load_nvfp4_dit(ckpt.dit_dir, backend=preset.quant.backend, device=device or "cpu")
            record.quant = {"quant": "nvfp4", "nvfp4_source": "packed export (quantize stage)"}
            record.steps.append("load nvfp4")
        else:
            from longlive.models.lora import load_and_merge_adapter
            from longlive.models.wan_adapter import load_dit

            dit = load_dit(ckpt.dit_dir, dtype=dtype, expect=preset.dit)
            record.steps.append("load")
            if ckpt.adapter_dir is not None:
                record.lora_merged = load_and_merge_adapter(dit, ckpt.adapter_dir)
                record.steps.append("merge lora")
            if device is not None:
                dit = dit.to(device)
                record.steps.append(f"to {torch.device(device)}")
    if frozen:
        dit.requires_grad_(False)
    if frozen or not training:
        dit.eval()
    if lora is not None:
        from longlive.models.lora import apply_lora

        apply_lora(dit, lora)
        record.steps.append("lora adapters")
    if quant == "nvfp4" and record.quant["quant"] == "none":
        from longlive.quant.convert import convert_to_nvfp4

        report = convert_to_nvfp4(dit, preset.quant)
        record.quant = {"quant": "nvfp4", "nvfp4_source": "converted at load", "backend": report.backend,
                        "quantized_linears": len(report.quantized), "kept_linears": len(report.kept)}
        record.steps.append("nvfp4")
    elif quant == "qat":  # same parameters, so the export stays plain weights
        from longlive.quant.convert import apply_qat

        apply_qat(dit, preset.quant)
        record.steps.append("qat")
    if inference is not None and (inference.kernels or inference.compile or inference.fp8):
        record.inference_path = apply_inference_path(dit, inference)
        record.steps.append("inference path")
    if checkpointing == "cache_free":
        from longlive.parallel.training import checkpoint_cache_free

        checkpoint_cache_free(dit)
        record.steps.append("activation checkpointing (cross-attention, FFN)")
    elif checkpointing:
        from longlive.parallel.training import checkpoint_blocks

        checkpoint_blocks(dit)
        record.steps.append("activation checkpointing")
    if compile_blocks:
        from longlive.parallel.training import compile_blocks as compile_each

        compile_each(dit)
        record.steps.append("compile blocks")
    if parallel is not None:
        from longlive.parallel import parallelize

        parallelize(dit, parallel, training=training)
        record.steps.append("parallelize")
    dit.build_record = record
    return dit


def apply_inference_path(dit: WanDiT, inference: InferenceConfig) -> dict:
    """Step 5 alone: :func:`longlive.inference.optimize.optimize` with ``inference``'s switches. Bench measures
    several paths on one set of weights and calls it per variant; everything else gets it from :func:`build_dit`."""
    from longlive.inference.optimize import optimize

    return optimize(dit, kernels=inference.kernels, compile=inference.compile, fp8=inference.fp8,
                    fp8_attention=inference.fp8_attention)


def build_models(
    preset: Preset,
    base: str | os.PathLike = "models/base",
    checkpoint: Checkpoint | str | os.PathLike | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    quant: Literal["none", "nvfp4"] = "none",
    parallel: ParallelState | None = None,
    light_decoder: str | os.PathLike = LIGHT_DECODER_DIR,
) -> Models:
    """Everything :func:`~longlive.inference.generate.generate_video` needs, built for ``preset.inference``: the DiT
    of ``checkpoint`` (default ``<base>/dit``) through :func:`build_dit`, the VAE and text encoder of ``base``
    (``vae/``, ``text/``; UMT5 from ``text.path``), and with ``inference.decoder: light`` the light decoder read from
    ``light_decoder`` (on the VAE's device, in ``dtype``, float32 when None)."""
    from longlive.models.light_decoder import LightDecoder
    from longlive.models.text import load_text_encoder
    from longlive.models.vae import WanVAE

    base, device, cfg = Path(base), torch.device(device), preset.inference
    dit = build_dit(checkpoint or base / DIT_DIR, preset, device=device, dtype=dtype, inference=cfg, quant=quant,
                    parallel=parallel)
    vae_device = resolve_device(cfg.vae_device) if cfg.vae_device != "auto" else device
    vae = WanVAE.from_pretrained(base / "vae", expect=preset.vae, device=vae_device).eval()
    if cfg.kernels and cfg.decoder != "light":  # the decoder's fused norm + SiLU (bitwise the reference off CUDA)
        from longlive.inference.optimize_vae import apply_vae_kernels

        apply_vae_kernels(vae)
    text = load_text_encoder(preset.text, base / "text")
    light = None
    if cfg.decoder == "light":  # on the VAE's device: vae_device is the decoder's device
        light = LightDecoder.from_pretrained(light_decoder, expect=preset.light_decoder, latent_channels=vae.z_dim,
                                             dtype=dtype or torch.float32, device=vae_device)
    return Models(dit, vae, text, light)


__all__ = ["BuildRecord", "Models", "apply_inference_path", "build_dit", "build_models"]
