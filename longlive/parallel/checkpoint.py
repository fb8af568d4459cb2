"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP), loadable at any world size.

A checkpoint is a directory: DCP's files (each rank writes its shards of the model, optimizer and
any extra tensors such as the EMA, keyed by parameter name) plus ``meta.pt``, small Python state the
main rank writes (step, history, scheduler, fingerprint). DCP re-shards on load, so a checkpoint
written by 2 processes loads in 1 and the other way round; a one-process run with no process group
reads and writes the same format. All ranks must see the same directory (a shared filesystem).

The directory appears complete or not at all: everything goes to ``<name>.tmp`` first and the main
rank swaps it in (:func:`longlive.io.replace_dir`) after every rank has finished writing.

Loading never runs code from the directory: ``meta.pt`` loads with ``weights_only=True``; DCP itself
unpickles its ``.metadata`` file with plain ``pickle`` and the non-tensor entries (optimizer
hyperparameters) with ``torch.load(weights_only=False)``, so :func:`load` first unpickles ``.metadata``
with an allowlist of DCP's own metadata classes, and its planner loads each non-tensor entry with
``weights_only=True`` before DCP does. The residual risk is DCP reading files we do not check: a torch
release that adds another pickled file or path to its reader would bypass these checks until added here.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from longlive.io import UnsafeStateError, load_state, replace_dir
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
    # not longlive.io.atomic_dir: every rank writes into the temporary directory, so its name is fixed
    tmp = path.with_name(path.name + ".tmp")
    if state.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    state.barrier()
    with _quiet_single_process():
        dcp.save(_state(model, optimizer, extra), checkpoint_id=tmp, no_dist=not _distributed())
    if state.is_main:
        torch.save(meta or {}, tmp / META_NAME)
        replace_dir(tmp, path)
    state.barrier()
    return path


def exists(path: str | os.PathLike) -> bool:
    return (Path(path) / META_NAME).is_file()


def read_meta(path: str | os.PathLike) -> dict:
    """The ``meta`` a checkpoint was saved with, without touching its tensors (to check a fingerprint first).

    Raises :class:`longlive.io.UnsafeStateError` (one line, nothing run) if it holds more than plain values."""
    return load_state(Path(path) / META_NAME, remove=path)


# What DCP's ``.metadata`` pickle may name: the classes DCP defines for it, and torch's value types.
_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_DCP_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "Path"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        # Names are checked before anything is imported; the resolved object again (a dotted name can reach far).
        if (module, name) in _DCP_GLOBALS or module in (_DCP_METADATA_MODULE, "torch"):
            obj = super().find_class(module, name)
            if ((module, name) in _DCP_GLOBALS
                    or (module == _DCP_METADATA_MODULE and isinstance(obj, type) and obj.__module__ == module)
                    or (module == "torch" and isinstance(obj, torch.dtype))):
                return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not a DCP metadata type")


def _check_dcp_metadata(path: Path) -> None:
    for file in sorted(path.glob("*.metadata")):
        try:
            with open(file, "rb") as f:
                _DCPMetadataUnpickler(f).load()
        except (pickle.UnpicklingError, AttributeError, ImportError, EOFError) as e:
            raise UnsafeStateError(
                f"{file}: refused to load ({e}): DCP metadata may hold only DCP's own types; it was written by "
                f"another torch or planted, and nothing in it was run. Delete {path} to start this stage over"
            ) from None


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, but each non-tensor entry must load with ``weights_only=True`` before DCP loads it."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._path = path

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise UnsafeStateError(
                f"{self._path}: entry {read_item.dest_index.fqn} holds more than plain values and was not loaded; "
                f"delete {self._path} to start this stage over"
            ) from None
        value.seek(0)
        super().load_bytes(read_item, value)


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
    _check_dcp_metadata(path)
    sd = _state(model, optimizer, extra)
    with _quiet_single_process():
        try:
            dcp.load(sd, checkpoint_id=path, planner=_SafeLoadPlanner(path), no_dist=not _distributed())
        except CheckpointException as e:  # DCP wraps every rank's error in a page of tracebacks
            unsafe = [exc for exc, _ in e.failures.values() if isinstance(exc, UnsafeStateError)]
            if unsafe:
                raise unsafe[0] from None
            raise
    set_model_state_dict(model, sd["model"], options=StateDictOptions(strict=True))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, sd["optimizer"])
    if extra:
        for k, v in sd["extra"].items():
            if v is not extra[k]:
                extra[k].copy_(v)
    return read_meta(path)
