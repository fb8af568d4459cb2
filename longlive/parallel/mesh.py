"""Process groups and the device mesh, from torchrun's environment.

One process (no torchrun, or ``WORLD_SIZE=1``) needs no process group: :func:`init_parallel` returns a
state with ``distributed=False`` and every wrapper becomes a no-op. Under torchrun (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) it initialises the default group --
NCCL on CUDA, gloo on CPU -- and a 2-D :class:`~torch.distributed.device_mesh.DeviceMesh`
``(dp, sp)``: ranks of one ``sp`` row share a sample and split its tokens (sequence parallel); ``dp``
rows see different samples. FSDP2 shards over the flattened ``dp x sp`` mesh, so every rank holds
``1 / world`` of the weights, gradients and optimizer state whatever the SP degree.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from longlive.config import ParallelConfig
from longlive.device import resolve_device

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class ParallelError(RuntimeError):
    """The process layout does not match what was asked for; the message says how to launch."""


@dataclass
class ParallelState:
    """Where this process sits: rank, device, and the (dp, sp) mesh (None in a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dp: int = 1
    sp: int = 1
    mesh: DeviceMesh | None = None
    sp_attention: str = "ulysses"
    sp_partition: str = "spatial"
    owns_group: bool = False  # True when init_parallel created the default group (and shutdown destroys it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sp_group(self) -> dist.ProcessGroup | None:
        return self.mesh["sp"].get_group() if self.mesh is not None and self.sp > 1 else None

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return self.mesh["dp"].get_group() if self.mesh is not None and self.dp > 1 else None

    @property
    def sp_rank(self) -> int:
        return self.mesh["sp"].get_local_rank() if self.mesh is not None else 0

    @property
    def dp_rank(self) -> int:
        """Index of this rank's data-parallel replica: ranks of one SP group draw the same batches."""
        return self.mesh["dp"].get_local_rank() if self.mesh is not None else 0

    def fsdp_mesh(self) -> DeviceMesh | None:
        """The 1-D mesh FSDP2 shards over: all ranks (``dp x sp`` flattened)."""
        if self.mesh is None:
            return None
        return self.mesh["dp", "sp"]._flatten("dp_sp")  # torchtitan's idiom for dp_shard x cp

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def torchrun_env() -> dict[str, str] | None:
    """torchrun's variables, or None when this process was not started by torchrun (or a spawner like it)."""
    if "WORLD_SIZE" not in os.environ:
        return None
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise ParallelError(f"WORLD_SIZE is set but {missing} are not: start the processes with torchrun")
    return {v: os.environ[v] for v in TORCHRUN_VARS}


def _device(name: str, local_rank: int) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)  # one GPU per process, torchrun's LOCAL_RANK
    return device


def init_parallel(
    cfg: ParallelConfig | None = None, *, device: str = "auto", check_world: bool = True, timeout_s: float = 600.0,
) -> ParallelState:
    """Set up this process from torchrun's environment (a single process without it).

    ``cfg`` gives the SP degree and attention mode; the data-parallel degree is ``world / sp``. With
    ``check_world`` the world size must be ``cfg.nproc * cfg.nnodes`` (what the launcher started).
    """
    cfg = cfg or ParallelConfig()
    env = torchrun_env()
    world = int(env["WORLD_SIZE"]) if env else 1
    rank = int(env["RANK"]) if env else 0
    local_rank = int(env["LOCAL_RANK"]) if env else 0
    if check_world and world != cfg.world_size:
        how = ("python -m longlive.parallel.launch MODULE [ARGS]" if world == 1 else
               f"torchrun with {cfg.nproc} processes per node on {cfg.nnodes} node(s)")
        raise ParallelError(
            f"parallel: the preset asks for {cfg.world_size} process(es) (nproc {cfg.nproc} x nnodes {cfg.nnodes}) "
            f"but {world} started; launch with {how}, or set parallel.nproc to {world}"
        )
    if world % cfg.sp:
        raise ParallelError(f"parallel.sp {cfg.sp} must divide the {world} processes")
    dev = _device(device, local_rank)
    state = ParallelState(rank=rank, world_size=world, local_rank=local_rank, device=dev, dp=world // cfg.sp,
                          sp=cfg.sp, sp_attention=cfg.sp_attention, sp_partition=cfg.sp_partition)
    if world == 1:
        return state
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
        state.owns_group = True
    state.mesh = init_device_mesh(dev.type, (state.dp, state.sp), mesh_dim_names=("dp", "sp"))
    return state


def shutdown(state: ParallelState) -> None:
    if state.owns_group and dist.is_initialized():
        dist.destroy_process_group()
        state.owns_group = False


@contextmanager
def parallel_session(cfg: ParallelConfig | None = None, *, device: str = "auto") -> Iterator[ParallelState]:
    """:func:`init_parallel` for the length of a block (a stage's body), then tear the groups down."""
    state = init_parallel(cfg, device=device)
    try:
        yield state
    finally:
        shutdown(state)


def all_mean(value: float, state: ParallelState, group: dist.ProcessGroup | None = None) -> float:
    """Mean of a Python float over ``group`` (default: all ranks); the value itself in one process."""
    if not state.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=state.device if state.device.type == "cuda" else "cpu")
    dist.all_reduce(t, group=group)
    return float(t) / dist.get_world_size(group)


def any_true(flag: bool, state: ParallelState) -> bool:
    """True on every rank when ``flag`` is True on any (so all ranks take the same branch)."""
    if not state.distributed:
        return flag
    t = torch.tensor([int(flag)], device=state.device if state.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)
