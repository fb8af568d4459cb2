"""The Hugging Face side of a release: a diffusers pipeline layout, peft LoRA adapters, Hub metadata, ``--hub``.

A release folder is a diffusers ``WanPipeline`` repo as it is::

    model_index.json             WanPipeline: transformer, vae, scheduler; text_encoder / tokenizer null
    transformer/                 the pipeline's checkpoint: WanTransformer3DModel (+ its ar_config.json)
    vae/                         AutoencoderKLWan
    scheduler/                   FlowMatchEulerDiscreteScheduler with the student's timestep shift
    text/                        the tiny preset's toy text encoder (UMT5 is referenced, never bundled)
    checkpoints/<name>/dit/      every other DiT checkpoint, in the same diffusers layout
    checkpoints/<name>/...       NVFP4 checkpoints; peft adapters (adapter_config.json + adapter_model.safetensors)

One copy of every weight: the pipeline's ``transformer/`` *is* its checkpoint (the bf16 export, not a second
copy beside ``checkpoints/<name>/dit``), and ``vae/`` is the only VAE. ``release.json`` records where each
checkpoint lives (``path``) and where the base models are (``base.dir``), so longlive's loader
(:class:`~longlive.publish.release.Release`) reads the same files diffusers does.

The pipeline's transformer is the first DiT checkpoint that loads without an adapter (a plain or LoRA-merged
export): ``WanPipeline`` cannot apply a peft adapter, so a ``separate`` LoRA checkpoint stays in
``checkpoints/<name>/``. With no such checkpoint (all NVFP4, say) there is no ``model_index.json``.

The text encoder is a reference, not a component: ``model_index.json`` lists ``text_encoder`` and
``tokenizer`` as null (diffusers then asks for them at ``from_pretrained``), and ``release.json``
(``diffusers.text_encoder``) and the card say where UMT5 comes from, or that the tiny preset's encoder is ours.

``WanPipeline`` samples bidirectionally with a fixed step list: it checks the weights, it is not how a causal
few-step student streams (``longlive generate`` is). ``WanTransformer3DModel.from_pretrained`` needs
``accelerate`` (its fp32-kept modules require ``low_cpu_mem_usage=True``), which is why the project depends on it.

LoRA: a LoRA-trained export (base ``dit/`` + ``lora.safetensors``) is published either ``merged`` (the adapter
folded into ``dit/`` in float32, then cast like the rest; nothing else to apply) or ``separate`` (base ``dit/``
+ peft's ``adapter_config.json`` / ``adapter_model.safetensors`` beside it, in diffusers' module names, which
``PeftModel.from_pretrained`` and our own loader both read). ``publish.checkpoints.<name>.lora`` chooses;
``release.json`` says which.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from longlive.config import Preset, PublishCheckpoint, PublishConfig
from longlive.models.checkpoint import ADAPTER_FILE, DIT_DIR
from longlive.publish.manifest import ReleaseError, json_bytes, verify_folder
from longlive.secrets import redact

log = logging.getLogger(__name__)

WAN22_TI2V_5B = "Wan-AI/Wan2.2-TI2V-5B"
WAN22_DIFFUSERS = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"  # where UMT5's diffusers-layout weights and tokenizer live
_WAN22_SIZES = (30, 3072, 24, 14336)  # num_layers, dim, heads, ffn: only such a DiT can come from Wan2.2-TI2V-5B

MODEL_INDEX = "model_index.json"
TRANSFORMER = "transformer"
SCHEDULER = "scheduler"
# Top-level names a base component may not take: the release's own folders and WanPipeline's component names.
RESERVED = frozenset({"checkpoints", "config", "metrics", "provenance", TRANSFORMER, SCHEDULER, "transformer_2",
                      "text_encoder", "tokenizer", MODEL_INDEX, "README.md", "release.json", "manifest.json"})


class HubError(ReleaseError):
    """The Hugging Face Hub refused or could not be reached; the message says what to fix."""


# ----------------------------------------------------------------------------- build hooks


def base_model(cfg: PublishConfig, preset: Preset) -> str | None:
    if cfg.base_model:
        return cfg.base_model
    d = preset.dit
    return WAN22_TI2V_5B if (d.num_layers, d.dim, d.num_heads, d.ffn_dim) == _WAN22_SIZES else None


def text_encoder_ref(preset: Preset) -> dict:
    """How to get the text encoder outside longlive; honest about the tiny one, which no library but ours loads."""
    if preset.text.kind == "umt5":
        return {"library": "transformers", "class": "UMT5EncoderModel", "repo": WAN22_DIFFUSERS,
                "subfolder": "text_encoder", "tokenizer_subfolder": "tokenizer", "max_tokens": preset.text.max_tokens,
                "note": "not bundled: Wan2.2's UMT5-XXL, loaded from a local copy (text.path) by longlive"}
    return {"library": "longlive", "class": "longlive.models.text.TinyTextEncoder", "subfolder": "text",
            "note": "a toy word-level encoder of the synthetic vocabulary, not UMT5; diffusers and transformers "
                    "cannot load it"}


def _dtypes(model) -> dict:
    return {k: v.dtype for k, v in model.state_dict().items()}


def add_hf_layout(dest: Path, spec: PublishCheckpoint, preset: Preset) -> dict:
    """Called by ``add_checkpoint`` once a DiT export is in ``dest``: publish its LoRA adapter merged or in peft's
    format (never ours beside merged weights, or our loader would apply it twice); return what release.json
    records (the diffusers class of ``dit/``, the LoRA state)."""
    import torch

    from longlive.models.lora import apply_lora, load_lora_state_dict, merge_lora, read_adapter, save_peft_adapter
    from longlive.models.wan_adapter import load_dit, save_dit

    info = {"diffusers": {"transformer": {"class": "WanTransformer3DModel", "subfolder": f"checkpoints/{dest.name}/dit"}},
            "lora": None}
    adapter = read_adapter(dest)
    if adapter is None:
        return info
    cfg, state = adapter
    modules = len(state) // 2  # a down and an up weight each (cfg.targets may be suffixes matching many)
    if spec.lora == "merged":
        src = Path(spec.path)
        src_dit = src / DIT_DIR if (src / DIT_DIR).is_dir() else src
        # Merge in float32 from the source, then give every tensor the dtype add_checkpoint chose for it
        # (bf16 with float32 norms, or as stored): merging into bf16 weights would round twice.
        want = _dtypes(load_dit(dest / DIT_DIR, expect=preset.dit))
        model = load_dit(src_dit, dtype=torch.float32, expect=preset.dit)
        apply_lora(model, cfg, freeze_base=False)
        load_lora_state_dict(model, state)
        merge_lora(model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.data = p.data.to(want[name])
            for name, b in model.named_buffers():
                if name in want:
                    b.data = b.data.to(want[name])
        save_dit(model, dest / DIT_DIR)
        info["lora"] = {"merged": True, "rank": cfg.rank, "alpha": cfg.alpha, "modules": modules}
    else:
        save_peft_adapter(cfg, state, dest)  # weights, then config, each atomically
        info["lora"] = {"merged": False, "format": "peft", "adapter": f"checkpoints/{dest.name}", "rank": cfg.rank,
                        "alpha": cfg.alpha, "modules": modules}
    (dest / ADAPTER_FILE).unlink(missing_ok=True)
    log.info("checkpoint %s: LoRA (rank %d, %d modules) %s", dest.name, cfg.rank, modules,
             "merged into dit/" if info["lora"]["merged"] else "kept apart in peft's format")
    return info


def check_base_component(name: str) -> None:
    """Base components sit at the release's top level (``vae/`` is diffusers' place for the VAE)."""
    if name in RESERVED or "/" in name or name.startswith("."):
        raise ReleaseError(f"base component {name!r} would collide with the release's own {name!r} (or is not a "
                           f"folder name); rename it in the base directory and in publish.base_components")


def _pipeline_checkpoint(checkpoints: dict) -> str | None:
    for name, info in checkpoints.items():
        if info.get("kind") == "dit" and not (info.get("lora") and not info["lora"].get("merged")):
            return name
    return None


def _move_to_transformer(root: Path, name: str) -> None:
    """``checkpoints/<name>/dit/*`` and the export's other files (``ar_config.json``) become ``transformer/``:
    renames inside the folder being built, so no weight is copied."""
    src, dst = root / "checkpoints" / name, root / TRANSFORMER
    os.rename(src / DIT_DIR, dst)
    for item in sorted(src.iterdir()):
        if (dst / item.name).exists():
            raise ReleaseError(f"checkpoint {name}: the export's {item.name} would overwrite the transformer's own "
                               f"file of that name; remove or rename it in {src.name}'s export")
        os.rename(item, dst / item.name)
    src.rmdir()
    if not any((root / "checkpoints").iterdir()):
        (root / "checkpoints").rmdir()


def _scheduler_config(shift: float) -> dict:
    """Only what differs from diffusers' defaults (which fill the rest on load), and the diffusers version pinned
    as in every config.json we write: the same model gives the same bytes whatever diffusers built the folder.
    Euler with Wan's shift ``shift * s / (1 + (shift - 1) s)`` is longlive's own sampler (diffusion/flow.py)."""
    from longlive.models.wan_adapter import DIFFUSERS_VERSION

    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
            "num_train_timesteps": 1000, "shift": shift}  # flow.NUM_TRAIN_TIMESTEPS (diffusion sits above publish)


def add_pipeline(root: Path, checkpoints: dict, base: dict, preset: Preset) -> dict:
    """Make the folder being built a diffusers ``WanPipeline`` repo (see the module docstring). Updates each
    checkpoint's ``path`` and transformer subfolder in ``checkpoints``; returns release.json's ``diffusers``."""
    from longlive.models.wan_adapter import DIFFUSERS_VERSION

    for name, info in checkpoints.items():
        info["path"] = f"checkpoints/{name}"
    vae = "vae" in base["bundled"]
    text = text_encoder_ref(preset)
    if text["library"] == "longlive" and "text" not in base["bundled"]:
        text |= {"subfolder": None, "note": text["note"] + "; not in this release (publish.base_components)"}
    record = {"pipeline": None, "model_index": None, "transformer": None,
              "vae": {"class": "AutoencoderKLWan", "subfolder": "vae"} if vae else None,
              "scheduler": None, "text_encoder": text}
    name = _pipeline_checkpoint(checkpoints)
    if name is None:
        log.info("no DiT checkpoint loads without an adapter: no model_index.json")
        return record
    _move_to_transformer(root, name)
    info = checkpoints[name]
    info["path"] = TRANSFORMER
    info["diffusers"]["transformer"]["subfolder"] = TRANSFORMER
    shift = (info.get("ar_config") or {}).get("timestep_shift", preset.inference.timestep_shift)
    (root / SCHEDULER).mkdir()
    (root / SCHEDULER / "scheduler_config.json").write_bytes(json_bytes(_scheduler_config(float(shift))))
    index = {"_class_name": "WanPipeline", "_diffusers_version": DIFFUSERS_VERSION,
             "boundary_ratio": None, "expand_timesteps": False,
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": [None, None], "tokenizer": [None, None],  # referenced (release.json, card), not bundled
             "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": [None, None],
             "vae": ["diffusers", "AutoencoderKLWan"] if vae else [None, None]}
    (root / MODEL_INDEX).write_bytes(json_bytes(index))
    record |= {"pipeline": "WanPipeline", "model_index": MODEL_INDEX,
               "transformer": {"class": "WanTransformer3DModel", "subfolder": TRANSFORMER, "checkpoint": name},
               "scheduler": {"class": "FlowMatchEulerDiscreteScheduler", "subfolder": SCHEDULER, "shift": shift}}
    log.info("diffusers layout: %s is the pipeline's transformer/", name)
    return record


# ----------------------------------------------------------------------------- the Hub


@dataclass
class HubPushResult:
    repo_id: str
    version: str
    commit: str
    url: str
    num_files: int
    private: bool


def _hub_error(e: Exception, repo_id: str, what: str, token: str) -> HubError:
    status = getattr(getattr(e, "response", None), "status_code", None)
    hint = {401: "the token was refused: log in again with `hf auth login` or set HF_TOKEN to a write token",
            403: f"the token may not write to {repo_id}: use a write token of an account or org that owns it",
            404: f"check the repo id {repo_id!r} (owner/name)"}.get(status, "check the network and the Hub's status, "
                                                                       "then run the push again")
    first = (redact(str(e), [token]).strip().splitlines() or [type(e).__name__])[0]
    return HubError(f"Hugging Face Hub: {what} failed for {repo_id}: {first}; {hint}")


def hub_token(repo_id: str, api=None) -> str:
    """The token huggingface_hub would write ``repo_id`` with, after checking the repo id: checked before
    anything is published or sent, so that a missing login costs nothing. Raises :class:`HubError`."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"--hub {repo_id!r} is not a Hub repo id ({str(e).splitlines()[0]}); use owner/name") from None
    try:
        token = getattr(api, "token", None) or get_token()
    except Exception as e:  # get_token raises only for a failed OIDC exchange (HF_OIDC_RESOURCE set)
        raise HubError(f"Hugging Face Hub: no usable token ({str(e).splitlines()[0]}); fix HF_OIDC_RESOURCE or set "
                       "HF_TOKEN") from None
    if not token:
        raise HubError(f"Hugging Face Hub: no token to write {repo_id}; log in with `hf auth login` or set HF_TOKEN "
                       "(a token with write access)")
    return token


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool = True, force: bool = False,
                api=None) -> HubPushResult:
    """Upload a verified local release folder to the Hub model repo ``repo_id`` and tag it with its version.

    The repo's main branch holds the release last pushed (files of an earlier one are deleted in the same
    upload); each version stays reachable as the tag ``<version>``, created only after the upload is listed
    complete. ``private`` applies when the repo is created; an existing repo keeps its visibility. The
    token is huggingface_hub's own (HF_TOKEN or ``hf auth login``), never a parameter of ours; without one
    nothing is sent (the Hub would refuse the first write anyway, after a round trip).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    # huggingface_hub's HTTP errors derive from its HTTP library's base error (httpx or httpx2, by version), as
    # do that library's connection and timeout errors: catching the base names no library of ours.
    transport_error = HfHubHTTPError.__bases__[0]

    api = api or HfApi()
    token = hub_token(repo_id, api)
    folder = Path(folder)
    manifest = verify_folder(folder)  # what goes up is exactly what was published: every file's SHA-256 checked
    version = manifest["version"]
    step = "create_repo"
    try:
        repo_url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        step = "upload_folder"
        commit = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                                   commit_message=f"LongLive release {version}", delete_patterns=["*"])
        step = "list_repo_files"
        listed = set(api.list_repo_files(repo_id, repo_type="model", revision=commit.oid))
        missing = sorted((set(manifest["files"]) | {"manifest.json"}) - listed)
        if missing:
            raise HubError(f"Hugging Face Hub: {repo_id}@{commit.oid[:12]} lacks {missing[:5]} after the upload; "
                           "run the push again (an interrupted upload resumes)")
        step = "create_tag"
        if force:
            try:
                api.delete_tag(repo_id, tag=version, repo_type="model")
            except HfHubHTTPError as e:  # no such tag yet: nothing to replace
                if getattr(getattr(e, "response", None), "status_code", None) != 404:
                    raise
        api.create_tag(repo_id, tag=version, revision=commit.oid, repo_type="model",
                       tag_message=f"LongLive release {version}")
    except HfHubHTTPError as e:
        if step == "create_tag" and getattr(getattr(e, "response", None), "status_code", None) == 409:
            raise HubError(f"Hugging Face Hub: {repo_id} already has the tag {version} (an earlier push of this "
                           "version); pass --force to move it to this upload") from None
        raise _hub_error(e, repo_id, step, token) from None
    except (transport_error, OSError) as e:  # no network, DNS, timeouts, HF_HUB_OFFLINE=1
        raise _hub_error(e, repo_id, step, token) from None
    result = HubPushResult(repo_id, version, commit.oid, str(repo_url), len(manifest["files"]) + 1, private)
    log.info("pushed release %s to the Hub: %s (tag %s, commit %s)", version, repo_id, version, commit.oid[:12])
    return result


def push_release(url: str | os.PathLike, repo_id: str, *, storage_options: dict | None = None,
                 private: bool = True, force: bool = False, progress: bool = True, api=None) -> HubPushResult:
    """Push the published release at ``url`` (``<store>/<version>`` or a local release folder) to the Hub.

    A local release is verified and uploaded in place; one in a remote store is pulled (which verifies
    every file) into a temporary folder first.
    """
    from fsspec.implementations.local import LocalFileSystem

    from longlive.data.shards import open_fs
    from longlive.publish.store import pull_release

    fs, root = open_fs(str(url), storage_options)
    if isinstance(fs, LocalFileSystem):
        return push_to_hub(root, repo_id, private=private, force=force, api=api)
    with tempfile.TemporaryDirectory(prefix="longlive-hub-") as tmp:
        pulled = pull_release(str(url), Path(tmp) / "release", storage_options=storage_options, progress=progress)
        return push_to_hub(pulled.dest, repo_id, private=private, force=force, api=api)
