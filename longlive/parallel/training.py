"""Training wrappers of a built DiT, applied by :func:`longlive.inference.build.build_dit` in torchtitan's order
(activation checkpointing, then compile, then FSDP2): they change how a step runs, never what it computes.

* :func:`checkpoint_blocks` -- activation checkpointing of every DiT block: backward recomputes a block's forward
  from its input instead of keeping its activations. The 5B teacher-forcing step (56,320 tokens) needs it; it
  costs about one more forward of every block.
* :func:`checkpoint_cache_free` -- selective checkpointing of the sublayers that never read a KV cache (each
  block's cross-attention and FFN): for DMD's generator, whose self-attention reads the rollout's rolling cache,
  which later blocks overwrite before backward (a recomputed self-attention would see another cache). The FFN's
  two 14336-wide activations are the largest a block keeps.
* :func:`compile_blocks` -- ``torch.compile`` of each block (regional compilation): the norms, modulation, RoPE,
  GELU and gated residuals fuse into a few kernels around the matmuls and the attention, and one compiled graph
  serves every block, so compile time does not grow with depth. A block under a KV cache (inference, DMD
  rollouts) is not what this is for: give it to the inference path's ``compile`` instead.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

from longlive.models.dit import Block, WanDiT


def checkpoint_blocks(model: WanDiT) -> WanDiT:
    """Wrap every :class:`Block` of ``model`` in an activation-checkpoint wrapper (in place; returned for chaining).

    The wrapper's state-dict hooks drop its prefix, so checkpoints keep the plain parameter names."""
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
    return model


def checkpoint_cache_free(model: WanDiT) -> WanDiT:
    """Wrap each block's cross-attention (``attn2``) and FFN in activation-checkpoint wrappers, in place; the
    self-attention, which may read a KV cache, keeps its activations. State-dict names stay plain."""
    targets = {id(m) for b in model.blocks for m in (b.attn2, b.ffn)}
    apply_activation_checkpointing(model, check_fn=lambda m: id(m) in targets)
    return model


def compile_blocks(model: WanDiT) -> WanDiT:
    """``torch.compile`` every block of ``model.blocks`` in place (``nn.Module.compile``: parameter names and the
    module tree stay as they are). After :func:`checkpoint_blocks`, the checkpointed region is what compiles."""
    if getattr(model, "sequence_parallel", None) is not None:
        raise ValueError("compile_blocks: a sequence-parallel DiT keeps its blocks eager (its attention cuts the "
                         "FrameMask per rank); set compile: false with parallel.sp > 1")
    for block in model.blocks:
        block.compile()
    model.compiled_blocks = True  # WanDiT.forward then hands the blocks FlexAttention's BlockMask
    return model


def unwrap_blocks(model: WanDiT) -> list[nn.Module]:
    """The plain :class:`Block` modules under any checkpoint wrapper (for code that walks the blocks)."""
    return [getattr(b, "_checkpoint_wrapped_module", b) for b in model.blocks]


__all__ = ["checkpoint_blocks", "checkpoint_cache_free", "compile_blocks", "unwrap_blocks"]
