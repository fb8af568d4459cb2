"""Where a stage's models live: the one rule that turns ``preset.device`` (or ``--device``) into a torch device.

Every entry point resolves its device once, here, and builds or loads every model straight onto it; a
second resolver elsewhere is how the ``base`` stage came to train on the CPU beside an idle GPU.
"""

from __future__ import annotations

import torch

from longlive.config import ConfigError


class DeviceError(ConfigError):
    """``device`` (params.yaml or ``--device``) names no device this machine has."""


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None): the first CUDA device if there is one, else the CPU; any other name as torch spells
    it (``cpu``, ``cuda``, ``cuda:1``, ``meta`` for tests). A CUDA device that this machine lacks is an error
    here, not a crash at the first tensor moved to it."""
    if isinstance(name, torch.device):
        device = name
    elif name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError as e:
            raise DeviceError(f"device {name!r} is not a torch device ({e}); use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {str(device)!r} was asked for, but torch sees no CUDA device here; "
                              "set device: auto (or cpu) in params.yaml, or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {str(device)!r} was asked for, but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s); use cuda:0 .. "
                              f"cuda:{torch.cuda.device_count() - 1} or auto")
    return device


def module_devices(*modules: torch.nn.Module) -> set[torch.device]:
    """The devices that the parameters and buffers of ``modules`` sit on (one, for a model ready to run)."""
    return {t.device for m in modules for t in (*m.parameters(), *m.buffers())}


def cuda_usage() -> dict:
    """What this process did with CUDA: whether it initialised it, and the peak memory the caching allocator saw
    on each device (``max_memory_allocated``: tensors; ``max_memory_reserved``: what it held from the GPU), MiB."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {"cuda": False}
    devices = {}
    for i in range(torch.cuda.device_count()):
        allocated, reserved = torch.cuda.max_memory_allocated(i), torch.cuda.max_memory_reserved(i)
        if reserved:
            devices[f"cuda:{i}"] = {"name": torch.cuda.get_device_name(i), "max_allocated_mib": allocated / 2**20,
                                    "max_reserved_mib": reserved / 2**20}
    return {"cuda": True, "devices": devices}


__all__ = ["DeviceError", "cuda_usage", "module_devices", "resolve_device"]
