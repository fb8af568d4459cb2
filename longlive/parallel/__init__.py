"""Parallelism applied to a built model from outside (torchtitan's ``parallelize.py`` shape).

* :mod:`.mesh` -- process groups and the ``(dp, sp)`` device mesh from torchrun's environment;
* :mod:`.sequence` -- Ulysses (or all-gather K/V) sequence parallelism for :class:`WanDiT`;
* :mod:`.partition` -- which tokens each SP rank holds, and the attention work per rank;
* :mod:`.fsdp` -- FSDP2 ``fully_shard`` for training; :mod:`.checkpoint` -- DCP sharded checkpoints;
* :mod:`.launch` -- ``python -m longlive.parallel.launch MODULE ARGS``: torchrun when the preset asks.

Order of wrapping: quantization / LoRA module swaps first (they change weights), then
:func:`parallelize` (sequence parallel touches activations only, FSDP shards whatever weights are there).
"""

from __future__ import annotations

from longlive.models.dit import WanDiT
from longlive.parallel.fsdp import apply_fsdp, full_state_dict, plain_copy
from longlive.parallel.mesh import ParallelError, ParallelState, init_parallel, parallel_session, shutdown
from longlive.parallel.sequence import SequenceParallel, apply_sequence_parallel


def parallelize(model: WanDiT, state: ParallelState, *, training: bool = False, **fsdp_kwargs) -> WanDiT:
    """Sequence parallel over the state's SP group, then (training) FSDP2 over all ranks.

    In one process the model is returned unchanged. ``model`` must already be on ``state.device``.
    """
    if state.sp > 1:
        model.sequence_parallel = apply_sequence_parallel(
            model, state.sp_group, attention=state.sp_attention, partition=state.sp_partition
        )
    if training and state.distributed:
        apply_fsdp(model, state, **fsdp_kwargs)
    return model


__all__ = [
    "ParallelError", "ParallelState", "init_parallel", "parallel_session", "shutdown", "parallelize",
    "apply_sequence_parallel", "SequenceParallel", "apply_fsdp", "full_state_dict", "plain_copy",
]
