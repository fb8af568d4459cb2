"""LoRA adapters on the DiT's linear projections, applied from outside the model, and their merge.

``apply_lora(model, cfg)`` swaps each targeted ``nn.Linear`` for a :class:`LoRALinear` that keeps the
original layer as ``base`` (frozen) and adds ``(alpha / rank) * B(A(x))``; ``merge_lora`` folds the
adapters back into plain ``nn.Linear`` layers. Targets are suffixes of module names
(``attn1.to_q`` matches ``blocks.3.attn1.to_q``).

On disk an adapter is either ours (``lora.safetensors``, config in its metadata) or peft's
(``adapter_config.json`` + ``adapter_model.safetensors`` with diffusers' module names, so that
``PeftModel.from_pretrained`` puts it on diffusers' ``WanTransformer3DModel``); :func:`read_adapter`
reads both.

Why not ``peft`` in training: peft would fit the Linear layers, but its injected modules rename the base weights
(``to_q.base_layer.weight``), which breaks the diffusers key map our save/load uses, and they would
stand between the NVFP4 converter (which swaps ``nn.Linear`` modules by name) and the layers it must
see. Sixty lines keep one state-dict layout before and after a merge, and no extra dependency.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from longlive.config import LoRAConfig
from longlive.io import atomic_file, write_text_atomic
from longlive.models.checkpoint import ADAPTER_FILE, PEFT_CONFIG, PEFT_WEIGHTS  # noqa: F401 - the layout's names
from longlive.models.wan_adapter import from_diffusers_module, to_diffusers_module

_PEFT_PREFIX = "base_model.model."
_PEFT_NAMES = {".down.weight": ".lora_A.weight", ".up.weight": ".lora_B.weight"}


class LoRAError(ValueError):
    pass


class LoRALinear(nn.Module):
    """``base(x) + scale * up(down(x))``; ``up`` starts at zero, so a fresh adapter changes nothing."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self.down = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.up = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        base.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * self.up(self.down(x.to(self.down.weight.dtype))).to(x.dtype)

    def delta_weight(self) -> Tensor:
        return (self.scale * (self.up.weight.float() @ self.down.weight.float())).to(self.base.weight.dtype)


def _targets(model: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    found = {name: m for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)}
    if not found:
        raise LoRAError(f"no nn.Linear module matches the LoRA targets {targets}; names look like "
                        f"{[n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:4]}")
    return found


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_lora(model: nn.Module, cfg: LoRAConfig, *, freeze_base: bool = True) -> nn.Module:
    """Wrap the targeted linears in adapters (in place) and, by default, freeze everything else."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise LoRAError("the model already has LoRA adapters; merge_lora() them first")
    if freeze_base:
        model.requires_grad_(False)
    for name, linear in _targets(model, cfg.targets).items():
        _set(model, name, LoRALinear(linear, cfg.rank, cfg.alpha))
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer and put the plain ``nn.Linear`` back (in place).

    Idempotent: a model without adapters is returned unchanged, so merging twice is merging once.
    """
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            m.base.weight += m.delta_weight()
            _set(model, name, m.base)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters alone: ``{module}.down.weight`` / ``{module}.up.weight``."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".down.weight", ".up.weight"))}


def load_lora_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load adapter weights into a model that has matching adapters; refuse anything that does not fit."""
    own = lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise LoRAError(f"LoRA weights do not match the model's adapters: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}; apply_lora with the same targets first")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise LoRAError(f"LoRA weight {k} has shape {tuple(v.shape)} but the model's adapter is "
                            f"{tuple(own[k].shape)}: rank or layer sizes differ from the adapter's config")
    model.load_state_dict(state, strict=False)


def save_adapter(model: nn.Module, cfg: LoRAConfig, directory: str | os.PathLike) -> Path:
    """``directory/lora.safetensors`` with the config (rank, alpha, targets) in its metadata."""
    path = Path(directory) / ADAPTER_FILE
    with atomic_file(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in lora_state_dict(model).items()}, str(tmp),
                  metadata={"lora_config": cfg.model_dump_json()})
    return path


def peft_adapter(cfg: LoRAConfig, state: dict[str, Tensor], base_model: str | None = None) -> tuple[dict, dict]:
    """Our adapter (``lora_state_dict`` keys) as peft's ``(adapter_config, weights)``, in diffusers' module names."""
    modules, weights = set(), {}
    for key, value in state.items():
        suffix = next((s for s in _PEFT_NAMES if key.endswith(s)), None)
        if suffix is None:
            raise LoRAError(f"{key} is not a LoRA weight (expected *.down.weight / *.up.weight from lora_state_dict)")
        module = to_diffusers_module(key[: -len(suffix)])
        modules.add(module)
        weights[_PEFT_PREFIX + module + _PEFT_NAMES[suffix]] = value.detach().contiguous().cpu()
    # Exact module names, not our suffixes: peft matches a name or a '.'-suffix, so this selects these layers only.
    config = {"peft_type": "LORA", "task_type": None, "r": cfg.rank, "lora_alpha": cfg.alpha,
              "target_modules": sorted(modules), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
              "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True, "base_model_name_or_path": base_model}
    return config, weights


def save_peft_adapter(cfg: LoRAConfig, state: dict[str, Tensor], directory: str | os.PathLike,
                      base_model: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (peft's format) into ``directory``.

    The weights are written before the config, each atomically: a directory with a config has its weights.
    """
    import json

    config, weights = peft_adapter(cfg, state, base_model)
    directory = Path(directory)
    with atomic_file(directory / PEFT_WEIGHTS) as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt"})
    write_text_atomic(directory / PEFT_CONFIG, json.dumps(config, indent=2) + "\n")
    return directory


def _read_peft_adapter(directory: Path) -> tuple[LoRAConfig, dict[str, Tensor]]:
    import json

    config_path, weights_path = directory / PEFT_CONFIG, directory / PEFT_WEIGHTS
    if not weights_path.is_file():
        raise LoRAError(f"{config_path} has no {PEFT_WEIGHTS} beside it; copy the adapter's weights there")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise LoRAError(f"{config_path} is not valid JSON ({e})") from None
    # Anything that changes the update beyond (alpha / r) * B A would load silently wrong into LoRALinear.
    unsupported = {k: config.get(k) for k, ok in (("peft_type", "LORA"), ("bias", "none"), ("use_rslora", False),
                                                   ("use_dora", False), ("fan_in_fan_out", False))
                   if config.get(k, ok) != ok}
    unsupported |= {k: config[k] for k in ("rank_pattern", "alpha_pattern", "modules_to_save") if config.get(k)}
    if unsupported:
        raise LoRAError(f"{config_path}: {unsupported} is not supported; only plain LoRA (one rank and alpha, no bias, "
                        "no DoRA/rsLoRA) loads into longlive's LoRALinear")
    state = {}
    for key, value in load_file(str(weights_path)).items():
        suffix = next((s for s, p in _PEFT_NAMES.items() if key.endswith(p)), None)
        if suffix is None or not key.startswith(_PEFT_PREFIX):
            raise LoRAError(f"{weights_path}: {key} is not a peft LoRA weight ({_PEFT_PREFIX}<module>.lora_A/B.weight)")
        module = key[len(_PEFT_PREFIX): -len(_PEFT_NAMES[suffix])]
        state[from_diffusers_module(module) + suffix] = value
    targets = sorted({k.rsplit(".", 2)[0] for k in state})
    if not targets:
        raise LoRAError(f"{weights_path} holds no LoRA weights")
    try:
        cfg = LoRAConfig(rank=config["r"], alpha=config.get("lora_alpha", config["r"]), targets=targets)
    except (KeyError, ValueError) as e:
        raise LoRAError(f"{config_path}: not a usable LoRA config ({e}); it needs r and lora_alpha") from None
    return cfg, state


def read_adapter(directory: str | os.PathLike) -> tuple[LoRAConfig, dict[str, Tensor]] | None:
    """(config, weights) of the adapter in ``directory`` -- ``lora.safetensors`` or peft's
    ``adapter_config.json`` + ``adapter_model.safetensors`` -- or None when there is none."""
    from safetensors import safe_open

    path = Path(directory) / ADAPTER_FILE
    if not path.is_file():
        if (Path(directory) / PEFT_CONFIG).is_file():
            return _read_peft_adapter(Path(directory))
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "lora_config" not in meta:
        raise LoRAError(f"{path} has no lora_config metadata; write it with longlive.models.lora.save_adapter")
    return LoRAConfig.model_validate_json(meta["lora_config"]), load_file(str(path))


def load_and_merge_adapter(model: nn.Module, directory: str | os.PathLike) -> bool:
    """Merge the adapter of ``directory`` (if any, either format) into ``model``; True when there was one."""
    adapter = read_adapter(directory)
    if adapter is None:
        return False
    cfg, state = adapter
    apply_lora(model, cfg, freeze_base=False)
    load_lora_state_dict(model, state)
    merge_lora(model)
    return True
