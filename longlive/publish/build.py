"""Build a release folder from checkpoints, base models, metrics and the preset.

Layout (every file is listed with its SHA-256 in ``manifest.json``, which is written last); the folder is
also a diffusers ``WanPipeline`` repo (hf.py)::

    README.md                    the model card (card.py), with the Hub's YAML front matter
    release.json                 what is inside: checkpoints (kind, dtype, quantization, path), base models,
                                 metrics, git commit, diffusers components; read by ``Release``
    model_index.json             diffusers' pipeline index (transformer, vae, scheduler; text encoder referenced)
    transformer/                 the pipeline's DiT checkpoint (bf16 or as stored, diffusers layout) + ar_config.json
    scheduler/                   its flow-matching scheduler config
    vae/, text/                  the base models inference needs besides the DiT
    checkpoints/<name>/dit/      every other DiT checkpoint (+ ar_config.json, a peft LoRA adapter)
    checkpoints/<name>/...       an NVFP4 checkpoint, copied as written by the quantize stage
    config/preset.json           the resolved, validated preset
    metrics/<name>.json          metrics files, byte for byte
    provenance/git.json          commit, branch, changed files
    provenance/dvc.lock          DVC's lock of the run that produced it
    manifest.json

A release loads with ``longlive.inference.generate.load_release_models`` (or ``longlive generate
--checkpoint <release>/<path of a checkpoint>``), and with diffusers' ``from_pretrained``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from longlive.config import Preset, PublishCheckpoint, PublishConfig
from longlive.io import atomic_dir
from longlive.models.checkpoint import AR_CONFIG_NAME, CRITIC_DIR, DIT_DIR, QUANT_FILE
from longlive.publish import hf
from longlive.publish.card import render_card
from longlive.publish.manifest import FORMAT, ReleaseError, build_manifest, check_version, json_bytes, write_manifest
from longlive.publish.provenance import dvc_lock, git_info
from longlive.secrets import redact_options, redact_url

log = logging.getLogger(__name__)

RELEASE_JSON = "release.json"
QUANT_FILES = (QUANT_FILE, "quant_config.json")  # what a quantized checkpoint records about itself beside its weights


def _copytree(src: Path, dst: Path) -> None:
    # symlinks=False: a linked file is copied as its content, so the release holds plain files only
    shutil.copytree(src, dst, symlinks=False, ignore=shutil.ignore_patterns("__pycache__", ".*"))


def tensor_stats(folder: Path) -> dict:
    """Parameter count and element count per safetensors dtype (headers only: no tensor is read)."""
    from safetensors import safe_open

    params, dtypes = 0, {}
    for file in sorted(folder.rglob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    params += n
                    dtypes[sl.get_dtype()] = dtypes.get(sl.get_dtype(), 0) + n
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ReleaseError(f"{file} is not a readable safetensors file ({e}); rebuild that checkpoint") from None
    return {"elements": params, "dtypes": dtypes}


def detect_quantization(folder: Path) -> dict:
    """What a quantized checkpoint records about itself: a ``quantization.json`` beside the weights,
    or the ``format`` metadata of its safetensors files (``longlive.quant.nvfp4.save`` writes
    ``format: nvfp4``). Empty for a plain checkpoint."""
    from safetensors import safe_open

    found: dict = {}
    for name in QUANT_FILES:
        if (folder / name).is_file():
            try:
                found.update(json.loads((folder / name).read_text()))
            except json.JSONDecodeError as e:
                raise ReleaseError(f"{folder / name} is not valid JSON ({e})") from None
    for file in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") not in (None, "pt", "np", "flax", "tf"):
            found.setdefault("format", meta["format"])
            for key in ("format_version", "backend", "scale_rule"):
                if key in meta:
                    found.setdefault(key, meta[key])
    return found


def _dit_dir(src: Path) -> Path:
    return src / DIT_DIR if (src / DIT_DIR).is_dir() else src


def _check_dit(dit: Path, name: str, preset: Preset) -> None:
    from longlive.models.wan_adapter import CONFIG_NAME, dit_config_from_diffusers

    if not (dit / CONFIG_NAME).is_file():
        raise ReleaseError(
            f"checkpoint {name}: {dit} has no {CONFIG_NAME}; expected a train_ar export ({DIT_DIR}/ + {AR_CONFIG_NAME}) or a "
            f"DiT directory; for an NVFP4 checkpoint set publish.checkpoints.{name}.quantization"
        )
    spec = dit_config_from_diffusers(json.loads((dit / CONFIG_NAME).read_text()))
    if spec.dit != preset.dit:
        raise ReleaseError(
            f"checkpoint {name} ({dit}) has DiT sizes {spec.dit.model_dump()} but preset {preset.name} says "
            f"{preset.dit.model_dump()}; publish it with the preset it was trained with (`dvc exp run -S preset=NAME`)"
        )


def add_checkpoint(dest: Path, name: str, spec: PublishCheckpoint, preset: Preset) -> dict:
    """Copy (or cast to bf16) one checkpoint into ``dest``; return what release.json records about it."""
    src = Path(spec.path)
    if not src.is_dir():
        raise ReleaseError(
            f"checkpoint {name}: {src} does not exist (publish.checkpoints.{name}.path); run the stage that writes "
            "it (`dvc repro`) or fix the path"
        )
    quant = {**detect_quantization(src), **(spec.quantization or {})}
    if quant:
        missing = [k for k in ("format", "backend") if not quant.get(k)]
        if missing:
            raise ReleaseError(
                f"checkpoint {name} ({src}) is quantized but records no {' or '.join(missing)}; set "
                f"publish.checkpoints.{name}.quantization (e.g. {{format: nvfp4, backend: emulated}})"
            )
        _copytree(src, dest)  # the quantize stage's layout is its own: copied as is, never re-cast
        info = {"kind": str(quant["format"]), "dtype": str(quant["format"]), "quantization": quant}
    else:
        dit = _dit_dir(src)
        _check_dit(dit, name, preset)
        dest.mkdir(parents=True)
        for item in src.iterdir():  # ar_config.json and anything else of a train_ar export
            # a DMD export's critic/ (the fake score) is training state, not part of the model
            if dit != src and item.name not in (DIT_DIR, CRITIC_DIR) and not item.name.startswith("."):
                (_copytree if item.is_dir() else shutil.copy2)(item, dest / item.name)
        source = tensor_stats(dit)
        if spec.dtype == "bf16":
            import torch

            from longlive.models.wan_adapter import load_dit, save_dit

            # Through the model, not tensor by tensor: the model knows which parts stay float32.
            save_dit(load_dit(dit, dtype=torch.bfloat16, expect=preset.dit), dest / DIT_DIR)
        else:
            _copytree(dit, dest / DIT_DIR)
        info = {"kind": "dit", "dtype": spec.dtype if spec.dtype == "bf16" else "stored",
                "source_dtypes": source["dtypes"], "quantization": None}
        info.update(hf.add_hf_layout(dest, spec, preset))  # LoRA merged or in peft's format; the diffusers record
        if (dest / AR_CONFIG_NAME).is_file():
            ar = json.loads((dest / AR_CONFIG_NAME).read_text())
            info["ar_config"] = {k: ar[k] for k in ("variant", "i2v", "block_frames", "denoising_steps",
                                                    "timestep_shift", "distilled") if k in ar}
    stats = tensor_stats(dest)
    info.update(source=str(spec.path), parameters=stats["elements"], stored_dtypes=stats["dtypes"],
                bytes=sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()))
    return info


def add_base(dest: Path, base: Path, components: list[str], preset: Preset) -> dict:
    """Copy the base components into ``dest`` (the release's top level: ``vae/`` is where diffusers looks)."""
    bundled, not_bundled = [], {}
    for comp in components:
        hf.check_base_component(comp)
        src = base / comp
        if src.is_dir():
            _copytree(src, dest / comp)
            bundled.append(comp)
        elif comp == "text" and preset.text.kind == "umt5":
            # UMT5-XXL is a separate, large download with its own licence: inference loads it from text.path.
            not_bundled[comp] = f"UMT5 from a local directory (text.path in the preset), {preset.text.max_tokens} tokens"
        else:
            raise ReleaseError(f"base component {comp!r}: {src} does not exist; run the base stage (`dvc repro base`) "
                               "or drop it from publish.base_components")
    return {"bundled": bundled, "not_bundled": not_bundled, "dir": "."}  # Release.base: where vae/ and text/ are


def add_metrics(dest: Path, metrics: dict[str, str]) -> dict[str, dict]:
    out = {}
    for name, path in metrics.items():
        path = Path(path)
        if not path.is_file():
            raise ReleaseError(f"metrics {name}: {path} not found (publish.metrics.{name}); run the stage that writes it "
                               "(`dvc repro`) or drop it from publish.metrics")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ReleaseError(f"metrics {name}: {path} is not valid JSON ({e})") from None
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest / f"{name}.json")
        out[name] = data
    return out


def build_release(
    out_dir: str | os.PathLike,
    *,
    version: str,
    preset: Preset,
    cfg: PublishConfig | None = None,
    repo: str | os.PathLike = ".",
    url: str | None = None,
) -> dict:
    """Write the release folder ``out_dir`` (atomically: complete or absent) and return its manifest.

    ``cfg`` (default ``preset.publish``) names the checkpoints, metrics and base models; relative
    paths are taken from the current directory. ``repo`` is the git/DVC repository whose commit and
    ``dvc.lock`` are recorded. ``url`` is where it will be published (for the model card).
    """
    cfg = cfg or preset.publish
    check_version(version)
    with atomic_dir(out_dir) as tmp:
        checkpoints = {name: add_checkpoint(tmp / "checkpoints" / name, name, spec, preset)
                       for name, spec in cfg.checkpoints.items()}
        base = add_base(tmp, Path(cfg.base), cfg.base_components, preset)
        diffusers = hf.add_pipeline(tmp, checkpoints, base, preset)  # moves one checkpoint to transformer/
        metrics = add_metrics(tmp / "metrics", cfg.metrics)
        (tmp / "config").mkdir()
        # Redacted even though config refuses credentials in params: a release is public, and a preset
        # built in code (or by an older longlive) may still carry storage_options secrets.
        preset_json = redact_options(preset.model_dump(mode="json", by_alias=True))
        (tmp / "config" / "preset.json").write_bytes(json_bytes(preset_json))
        git = git_info(repo)
        (tmp / "provenance").mkdir()
        (tmp / "provenance" / "git.json").write_bytes(json_bytes(git))
        lock = dvc_lock(repo)
        if lock is not None:
            (tmp / "provenance" / "dvc.lock").write_bytes(lock)
        # No timestamp here or in the card: the same inputs give byte-identical files (and content id);
        # the publication time lives in manifest.json.
        release = {
            "format": FORMAT,
            "version": version,
            "preset": preset.name,
            "checkpoints": checkpoints,
            "base": base,
            "metrics": {name: f"metrics/{name}.json" for name in metrics},
            "config": "config/preset.json",
            "git": {k: git[k] for k in ("commit", "branch", "dirty")},
            "dvc_lock": "provenance/dvc.lock" if lock is not None else None,
            "url": redact_url(url) if url else url,
            "license": cfg.license,  # the card's front matter
            "base_model": hf.base_model(cfg, preset),
            "diffusers": diffusers,
        }
        (tmp / RELEASE_JSON).write_bytes(json_bytes(release))
        (tmp / "README.md").write_text(render_card(release, metrics, preset))
        manifest = build_manifest(tmp, version)
        write_manifest(tmp, manifest)  # last: its presence marks a complete folder
    log.info("built release %s in %s: %d files, %.1f MB", version, out_dir, manifest["num_files"],
             manifest["total_bytes"] / 1e6)
    return manifest
