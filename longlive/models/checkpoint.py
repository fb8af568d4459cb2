"""A checkpoint on disk: its file names, what it holds, and the one order its inference settings merge in.

Every stage that writes a checkpoint (``train_ar``, ``train_dmd``, ``quantize``) and everything that reads one
(``generate``, ``eval-quality``, ``evaluate``, ``publish``) takes the layout from here; no other module spells
these names. An *export*::

    <export>/
      dit/               the DiT: a diffusers WanTransformer3DModel directory (longlive.models.wan_adapter), or an
                         NVFP4 checkpoint -- packed weights beside quantization.json (longlive.quant.checkpoint)
      ar_config.json     the trained layout: block layout, sink + window, step list, shift, I2V (train_ar writes it;
                         train_dmd and quantize copy it with what they add)
      lora.safetensors   a LoRA-trained student's adapters (or peft's adapter_config.json + adapter_model.safetensors)
      critic/            train_dmd's fake score: training state for a QAT fine-tune, never published

A bare DiT directory (``models/base/dit``, a release's ``transformer/``) is a checkpoint too. Given the DiT
directory, ``ar_config.json`` is looked for in it and then beside it (a release keeps it inside
``transformer/``), the adapter beside it.

Inference settings merge in one order, each level over the one before (:func:`inference_settings`):

1. the preset's ``inference`` (params.yaml);
2. the trained layout (``ar_config.json``): block size, first frame, step list, shift, the RoPE position a
   block never starts beyond -- and the sink and window, when the student was trained with a window
   (``ar.window_frames`` set). The trained layout is the single source for sink and window: a preset whose
   ``inference.sink_frames`` / ``window_frames`` say otherwise is overridden, with a warning naming both.
   A student trained on whole clips (no window) records none, and the preset's sink and window apply;
3. the variant's own settings (``evaluate.variants.<name>``: ``denoising_steps`` and ``inference``);
4. ``--set KEY=VALUE`` on the command line.

The module imports no torch: ``longlive generate`` checks its arguments with it before any model loads.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from longlive.config import InferenceConfig
from longlive.errors import UsageError
from longlive.io import write_text_atomic

log = logging.getLogger(__name__)

DIT_DIR = "dit"
CRITIC_DIR = "critic"
AR_CONFIG_NAME = "ar_config.json"
ADAPTER_FILE = "lora.safetensors"  # ours: the LoRA config in the safetensors metadata
PEFT_CONFIG = "adapter_config.json"  # peft's adapter (a published "separate" LoRA)
PEFT_WEIGHTS = "adapter_model.safetensors"
QUANT_FILE = "quantization.json"  # marks an NVFP4 DiT directory (longlive.quant.checkpoint owns its contents)

# What the trained layout sets at inference (level 2 of the merge). Sink and window only when trained with a window.
FROM_TRAINED = ("block_frames", "independent_first_frame", "denoising_steps", "timestep_shift", "max_block_position")
TRAINED_WINDOW = ("sink_frames", "window_frames")


def validation_line(e) -> str:
    """A pydantic ``ValidationError`` as one line: ``field: message (got value); ...``."""
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']} (got {err.get('input')!r})"
                     for err in e.errors())


def trained_settings(trained: dict | None) -> dict:
    """The inference settings a trained layout fixes (see the module docstring, level 2)."""
    if not trained:
        return {}
    keys = FROM_TRAINED + (TRAINED_WINDOW if trained.get("window_frames") is not None else ())
    return {k: trained[k] for k in keys if k in trained}


def parse_overrides(pairs: Sequence[str]) -> dict:
    """``KEY=VALUE`` pairs (values parsed as YAML) -> ``{KEY: value}``; a bad pair is a one-line UsageError."""
    import yaml

    updates = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in InferenceConfig.model_fields:
            raise UsageError(f"--set {pair!r}: expected KEY=VALUE with KEY one of {sorted(InferenceConfig.model_fields)}")
        try:
            updates[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UsageError(f"--set {pair!r}: the value is not valid YAML ({' '.join(str(e).split())}); quote it") from None
    return updates


def inference_settings(
    preset: InferenceConfig, trained: dict | None = None, variant: dict | None = None, overrides: Sequence[str] = (),
    *, source: str | os.PathLike = "the checkpoint",
) -> InferenceConfig:
    """The settings a checkpoint streams with: ``preset`` < ``trained`` (its ``ar_config.json``) < ``variant``
    (settings by name) < ``overrides`` (``KEY=VALUE``), each level validated as it is applied so that a bad value
    is blamed on the level that brought it. ``source`` names the checkpoint in those messages."""
    from pydantic import ValidationError

    cfg = preset
    fixed = trained_settings(trained)
    if fixed:
        differ = {k: (getattr(cfg, k), fixed[k]) for k in TRAINED_WINDOW if k in fixed and getattr(cfg, k) != fixed[k]}
        if differ:
            log.warning("%s was trained with %s; the preset's inference settings (%s) give way to them", source,
                        ", ".join(f"{k}={new}" for k, (_, new) in differ.items()),
                        ", ".join(f"{k}={old}" for k, (old, _) in differ.items()))
        try:
            cfg = InferenceConfig.model_validate({**cfg.model_dump(), **fixed})
        except ValidationError as e:
            raise UsageError(f"the {AR_CONFIG_NAME} beside {source}: {validation_line(e)}; re-export the checkpoint") from None
    if variant:
        cfg = InferenceConfig.model_validate({**cfg.model_dump(), **variant})
    updates = parse_overrides(overrides)
    if updates:
        try:
            cfg = InferenceConfig.model_validate({**cfg.model_dump(), **updates})
        except ValidationError as e:
            raise UsageError(f"--set: {validation_line(e)}; see `longlive config` for the current inference settings") from None
    return cfg


def _read_trained(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON ({e}); re-export the checkpoint (train_ar writes it) or "
                         "delete the file") from None


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint on disk (see the module docstring). :meth:`open` reads nothing but ``ar_config.json``; the
    weights are loaded by :func:`longlive.inference.build.build_dit`."""

    path: Path  # as given: an export or a DiT directory
    dit_dir: Path
    adapter_dir: Path | None  # where a LoRA adapter lies (beside dit/), if one does
    trained: dict | None  # ar_config.json
    trained_path: Path | None

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Checkpoint":
        """An export (a directory holding ``dit/``) or a DiT directory; a missing path opens as an empty
        checkpoint whose ``dit_dir`` does not exist (callers say what to run to make it)."""
        path = Path(path)
        dit = path / DIT_DIR if (path / DIT_DIR).is_dir() else path
        trained_path = next((d / AR_CONFIG_NAME for d in (dit, dit.parent) if (d / AR_CONFIG_NAME).is_file()), None)
        trained = _read_trained(trained_path) if trained_path is not None else None
        beside = dit.parent
        has_adapter = (beside / ADAPTER_FILE).is_file() or (beside / PEFT_CONFIG).is_file()
        return cls(path, dit, beside if has_adapter else None, trained, trained_path)

    def critic(self) -> "Checkpoint":
        """train_dmd's critic (``critic/`` beside ``dit/``): plain weights, no adapter, no trained layout."""
        return Checkpoint(self.path, self.dit_dir.parent / CRITIC_DIR, None, None, None)

    @property
    def exists(self) -> bool:
        return self.dit_dir.is_dir()

    @property
    def nvfp4(self) -> bool:
        """Packed NVFP4 weights (a quantize-stage export), loaded as stored."""
        return (self.dit_dir / QUANT_FILE).is_file()

    @property
    def i2v(self) -> bool:
        return bool(self.trained and self.trained.get("i2v"))

    def layout(self, key: str, default: Any = None) -> Any:
        """One fact of the trained layout (``train_block_sizes``, ``sink_frames``, ...)."""
        return (self.trained or {}).get(key, default)

    def inference(self, preset: InferenceConfig, variant: dict | None = None,
                  overrides: Sequence[str] = ()) -> InferenceConfig:
        """:func:`inference_settings` with this checkpoint's trained layout."""
        return inference_settings(preset, self.trained, variant, overrides, source=self.path)


def write_trained(out_dir: str | os.PathLike, config: dict) -> Path:
    """Write an export's ``ar_config.json`` (atomically)."""
    return write_text_atomic(Path(out_dir) / AR_CONFIG_NAME, json.dumps(config, indent=2) + "\n")


__all__ = [
    "ADAPTER_FILE", "AR_CONFIG_NAME", "CRITIC_DIR", "Checkpoint", "DIT_DIR", "FROM_TRAINED", "PEFT_CONFIG",
    "PEFT_WEIGHTS", "QUANT_FILE", "TRAINED_WINDOW", "inference_settings", "parse_overrides", "trained_settings",
    "validation_line", "write_trained",
]
