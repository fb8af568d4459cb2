"""FSDP2 (``fully_shard``) for WanDiT training, and getting whole weights back out of it.

Each transformer block is its own FSDP unit (its weights are all-gathered just before it runs and
freed after), then the root holds the embedders and the head. The mesh is the flattened ``dp x sp``
mesh: SP ranks hold different shards too, and FSDP's gradient average over all ranks is exactly
what sequence parallel needs (see :mod:`longlive.parallel.sequence`).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from longlive.models.dit import WanDiT
from longlive.parallel.mesh import ParallelState


def apply_fsdp(
    model: WanDiT, state: ParallelState, *, reshard_after_forward: bool = True, param_dtype: torch.dtype | None = None,
) -> WanDiT:
    """Shard ``model`` in place over all ranks (no-op in one process). ``param_dtype`` (e.g. bf16)
    all-gathers weights in that dtype and reduces gradients in float32; None keeps the stored dtype."""
    mesh = state.fsdp_mesh()
    if mesh is None:
        return model
    # FSDP2 warns when a wrapped module returns a view (Block.forward ends in a reshape), because an
    # in-place op on it would skip a hook. WanDiT never modifies a block's output in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    # The root's own parameters (embedders, head) are small; keep them gathered after forward.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight as a whole CPU tensor (a collective: all ranks call it). Plain models: a CPU copy."""
    if not is_sharded(model):
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def plain_copy(model: WanDiT, state: ParallelState) -> WanDiT | None:
    """A one-process CPU :class:`WanDiT` with ``model``'s whole weights on the main rank (None elsewhere),
    for exporting with ``save_dit``. All ranks must call it (it gathers the shards)."""
    sd = full_state_dict(model)
    if not state.is_main:
        return None
    copy = WanDiT(model.cfg, model.in_channels, model.text_dim, model.out_channels)
    copy.load_state_dict(sd)
    return copy.eval()


def to_local_float(x) -> float:
    """A scalar that may be a DTensor (e.g. clip_grad_norm_ over sharded gradients) as a float."""
    return float(x.full_tensor() if isinstance(x, DTensor) else x)
