"""Wan2.2 loader: diffusers ``WanTransformer3DModel`` checkpoints <-> :class:`WanDiT` (a key map,
like torchtitan's ``state_dict_adapter.py``), and our own checkpoints in the same layout.

A diffusers transformer directory holds ``config.json`` and either
``diffusion_pytorch_model.safetensors`` or ``diffusion_pytorch_model.safetensors.index.json`` plus
its shards. Shards are read lazily with ``safetensors.safe_open`` into a model built on the meta
device, so only one copy of the weights is ever held.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import NamedTuple

import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from longlive.io import atomic_dir
from longlive.config import DiTConfig
from longlive.models.dit import WanDiT

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
DIFFUSERS_VERSION = "0.42.1"

# (diffusers, ours): key prefixes, then infixes; every other key is the same on both sides
_PREFIXES = [
    ("condition_embedder.time_embedder.", "time_embedder."),
    ("condition_embedder.time_proj.", "time_proj."),
    ("condition_embedder.text_embedder.", "text_embedder."),
]
_INFIXES = [(".to_out.0.", ".to_out."), (".ffn.net.0.proj.", ".ffn.linear_1."), (".ffn.net.2.", ".ffn.linear_2.")]
_IGNORED = re.compile(r"norm_added_q")  # diffusers ignores these on load too


class WanDiTSpec(NamedTuple):
    dit: DiTConfig
    in_channels: int
    text_dim: int
    out_channels: int


def _rename(key: str, to_ours: bool) -> str:
    for diffusers, ours in _PREFIXES:
        old, new = (diffusers, ours) if to_ours else (ours, diffusers)
        if key.startswith(old):
            key = new + key[len(old):]
    for diffusers, ours in _INFIXES:
        key = key.replace(*((diffusers, ours) if to_ours else (ours, diffusers)))
    return key


def from_diffusers_key(key: str) -> str:
    return _rename(key, to_ours=True)


def to_diffusers_key(key: str) -> str:
    return _rename(key, to_ours=False)


def from_diffusers_state_dict(sd: dict) -> dict:
    return {from_diffusers_key(k): v for k, v in sd.items() if not _IGNORED.search(k)}


def to_diffusers_state_dict(sd: dict) -> dict:
    return {to_diffusers_key(k): v for k, v in sd.items()}


def to_diffusers_module(name: str) -> str:
    """A module name of ours in diffusers' naming (``blocks.0.ffn.linear_1`` -> ``blocks.0.ffn.net.0.proj``)."""
    return to_diffusers_key(name + ".weight")[: -len(".weight")]


def from_diffusers_module(name: str) -> str:
    return from_diffusers_key(name + ".weight")[: -len(".weight")]


def dit_config_from_diffusers(config: dict) -> WanDiTSpec:
    """Our config and channel sizes from a diffusers ``WanTransformer3DModel`` config.json dict."""
    unsupported = {
        "image_dim": "an image embedder (Wan2.1 I2V)",
        "added_kv_proj_dim": "added image K/V projections (Wan2.1 I2V)",
        "pos_embed_seq_len": "a learned image position embedding",
    }
    for key, what in unsupported.items():
        if config.get(key) is not None:
            raise ValueError(f"unsupported Wan variant: {key}={config[key]!r} ({what}); "
                             "only text-conditioned transformers (Wan2.2 TI2V/T2V, Wan2.1 T2V) load")
    if config.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise ValueError(f"unsupported Wan variant: qk_norm={config['qk_norm']!r}; "
                         "only 'rms_norm_across_heads' is supported")
    heads, head_dim = config.get("num_attention_heads", 40), config.get("attention_head_dim", 128)
    try:
        dit = DiTConfig(
            num_layers=config.get("num_layers", 40),
            dim=heads * head_dim,
            num_heads=heads,
            ffn_dim=config.get("ffn_dim", 13824),
            freq_dim=config.get("freq_dim", 256),
            patch_size=tuple(config.get("patch_size", (1, 2, 2))),
            eps=config.get("eps", 1e-6),
            cross_attn_norm=config.get("cross_attn_norm", True),
            rope_max_seq_len=config.get("rope_max_seq_len", 1024),
        )
    except ValidationError as e:
        raise ValueError(f"invalid Wan transformer config: {e}") from None
    in_channels = config.get("in_channels", 16)
    return WanDiTSpec(dit, in_channels, config.get("text_dim", 4096), config.get("out_channels") or in_channels)


def diffusers_config(model: WanDiT) -> dict:
    c = model.cfg
    return {
        "_class_name": "WanTransformer3DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "patch_size": list(c.patch_size),
        "num_attention_heads": c.num_heads,
        "attention_head_dim": c.head_dim,
        "in_channels": model.in_channels,
        "out_channels": model.out_channels,
        "text_dim": model.text_dim,
        "freq_dim": c.freq_dim,
        "ffn_dim": c.ffn_dim,
        "num_layers": c.num_layers,
        "cross_attn_norm": c.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads",
        "eps": c.eps,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": c.rope_max_seq_len,
        "pos_embed_seq_len": None,
    }


def _weight_files(path: Path) -> list[Path]:
    if (path / INDEX_NAME).is_file():
        try:
            weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path / INDEX_NAME} is not a valid safetensors index: {e}") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: shards named in {INDEX_NAME} are missing: {missing[:5]}")
        return files
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    raise FileNotFoundError(f"{path}: no weights; expected {WEIGHTS_NAME} or {INDEX_NAME}")


def _few(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:5]) + (f" (and {len(keys) - 5} more)" if len(keys) > 5 else "")


def load_wan_transformer(
    path: str | os.PathLike, expect: DiTConfig | None = None, dtype: torch.dtype | None = torch.float32
) -> WanDiT:
    """Load a diffusers ``WanTransformer3DModel`` directory (or one written by :func:`save_dit`) on the CPU.

    ``expect``: fail if the checkpoint's sizes differ. ``dtype``: parameter dtype (None keeps the
    stored one); in a lower precision the ``WanDiT.keep_in_fp32`` parts stay float32, as in diffusers.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Wan transformer directory {path} does not exist (or is not a directory)")
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path}: missing {CONFIG_NAME}")
    try:
        raw = json.loads((path / CONFIG_NAME).read_text())
        spec = dit_config_from_diffusers(raw)
    except (json.JSONDecodeError, ValueError) as e:
        raise ValueError(f"{path / CONFIG_NAME}: {e}") from None
    if expect is not None and spec.dit != expect:
        diffs = [f"{k} is {getattr(spec.dit, k)!r} in the checkpoint but {getattr(expect, k)!r} expected"
                 for k in DiTConfig.model_fields if getattr(spec.dit, k) != getattr(expect, k)]
        raise ValueError(f"{path / CONFIG_NAME} does not match the expected DiTConfig: " + "; ".join(diffs))

    with torch.device("meta"):
        model = WanDiT(spec.dit, spec.in_channels, spec.text_dim, spec.out_channels)
    wanted = {k: v.shape for k, v in model.state_dict().items()}
    files = _weight_files(path)
    sd, located = {}, {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    if not _IGNORED.search(key):
                        located[from_diffusers_key(key)] = (file, key, tuple(f.get_slice(key).get_shape()))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ValueError(f"could not read {file}: {e} (truncated or not a safetensors file?)") from None
    missing, unexpected = wanted.keys() - located.keys(), located.keys() - wanted.keys()
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the config; missing keys: {_few(missing) or 'none'}; "
                         f"unexpected keys: {_few(unexpected) or 'none'}")
    bad = [f"{k}: {list(s)} in {file.name}, model wants {list(wanted[k])}"
           for k, (file, _, s) in located.items() if tuple(wanted[k]) != s]
    if bad:
        raise ValueError(f"{path}: shape mismatch: " + "; ".join(bad[:5]))

    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for ours, (src, key, _) in located.items():
                    if src == file:
                        t = f.get_tensor(key)
                        keep32 = any(part in WanDiT.keep_in_fp32 for part in ours.split("."))
                        target = torch.float32 if keep32 and dtype is not None else dtype
                        sd[ours] = t if target is None or t.dtype == target else t.to(target)
        except Exception as e:
            raise ValueError(f"could not read {file}: {e} (truncated?)") from None
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def save_dit(model: WanDiT, path: str | os.PathLike) -> Path:
    """Write ``model`` as a diffusers-layout directory (config.json + safetensors), atomically.

    The directory appears complete or not at all: written beside ``path`` under a temporary
    name, then renamed; an existing ``path`` is replaced.
    """
    path = Path(path)
    with atomic_dir(path) as tmp:
        sd = {k: v.detach().contiguous().cpu() for k, v in to_diffusers_state_dict(model.state_dict()).items()}
        save_file(sd, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(diffusers_config(model), indent=2) + "\n")
    return path


def load_dit(path: str | os.PathLike, dtype: torch.dtype | None = None, expect: DiTConfig | None = None) -> WanDiT:
    """Load a checkpoint written by :func:`save_dit` (stored dtype by default)."""
    return load_wan_transformer(path, expect=expect, dtype=dtype)
