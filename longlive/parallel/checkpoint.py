"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP), loadable at any world size.

A checkpoint is a directory: DCP's files (each rank writes its shards of the model, optimizer and
any extra tensors such as the EMA, keyed by parameter name) plus ``meta.pt``, small Python state the
main rank writes (step, history, scheduler, fingerprint). DCP re-shards on load, so a checkpoint
written by 2 processes loads in 1 and the other way round; a one-process run with no process group
reads and writes the same format. All ranks must see the same directory (a shared filesystem).

The directory appears complete or not at all: everything goes to ``<name>.tmp`` first and the main
rank swaps it in (:func:`longlive.io.atomic_dir` semantics) after every rank has finished writing.
"""

from __future__ import annotations

import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from longlive.parallel.mesh import ParallelState

META_NAME = "meta.pt"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every call without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None, extra: dict[str, torch.Tensor] | None) -> dict:
    sd = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        sd["optimizer"] = get_optimizer_state_dict(model, optimizer)
    if extra:
        sd["extra"] = dict(extra)
    return sd


def save(
    path: str | os.PathLike, state: ParallelState, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
    *, extra: dict[str, torch.Tensor] | None = None, meta: dict | None = None,
) -> Path:
    """Write model (+ optimizer, + ``extra`` tensors, + ``meta``) to the directory ``path``. Collective."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if state.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    state.barrier()
    with _quiet_single_process():
        dcp.save(_state(model, optimizer, extra), checkpoint_id=tmp, no_dist=not _distributed())
    if state.is_main:
        torch.save(meta or {}, tmp / META_NAME)
        if path.exists():  # swap: a directory cannot be renamed over a non-empty one
            old = path.with_name(path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    state.barrier()
    return path


def exists(path: str | os.PathLike) -> bool:
    return (Path(path) / META_NAME).is_file()


def read_meta(path: str | os.PathLike) -> dict:
    """The ``meta`` a checkpoint was saved with, without touching its tensors (to check a fingerprint first)."""
    return torch.load(Path(path) / META_NAME, map_location="cpu", weights_only=False)


def load(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
    *, extra: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Load into ``model`` (+ ``optimizer``, + ``extra`` tensors in place, same keys) and return ``meta``.

    The model may be sharded differently than when saved (FSDP at another world size, or plain).
    Collective when distributed.
    """
    path = Path(path)
    if not exists(path):
        raise FileNotFoundError(f"{path} is not a finished checkpoint (no {META_NAME})")
    sd = _state(model, optimizer, extra)
    with _quiet_single_process():
        dcp.load(sd, checkpoint_id=path, no_dist=not _distributed())
    set_model_state_dict(model, sd["model"], options=StateDictOptions(strict=True))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, sd["optimizer"])
    if extra:
        for k, v in sd["extra"].items():
            if v is not extra[k]:
                extra[k].copy_(v)
    return read_meta(path)
