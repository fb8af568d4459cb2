"""Sequence parallelism for :class:`~longlive.models.dit.WanDiT`, applied to a built model from outside.

:func:`apply_sequence_parallel` hooks the model so that between the first and the last transformer
block each rank of the SP group holds only its tokens (a :class:`~longlive.parallel.partition.Partition`):

* before block 0 the (replicated) patch embeddings are cut to this rank's tokens, and every block's
  per-frame modulation and per-token cross-attention mask are cut to match;
* self-attention (the parameter-free ``attn1.core`` of each block, swapped for a wrapper) either
  - ``ulysses``: one all-to-all turns (my tokens, all heads) of q, k, v into (all tokens, my heads);
    the original core then runs unchanged -- KV cache (each rank caches its heads), RoPE, the full
    block-causal / teacher-forcing mask -- and a second all-to-all turns the output back. Needs
    ``num_heads % sp == 0``.
  - ``allgather``: K and V are all-gathered (all heads); each rank attends its own queries (the
    mask's rows -- a :class:`FrameMask` restricted to them -- and RoPE of its tokens) to every key.
    Any head count; the cache holds all K/V on every rank; per-rank work depends on the partition (see :mod:`longlive.parallel.partition`).
* cross-attention and the MLPs are per token: they run on local tokens with no communication;
* after the last block the tokens are all-gathered, so the head and the caller see the full output
  on every rank -- samplers, KV-cache bookkeeping and losses stay exactly as in one process.

Gradients: all-gather's backward sums the (identical) output gradients of the ranks, so
weights used before the gather get ``sp x`` their share and those after it (the head) their full
gradient on every rank; averaging gradients over the SP group -- what FSDP2 over the ``dp x sp``
mesh does by default -- gives exactly the one-process gradient. Whoever swaps modules (NVFP4
linears, LoRA) should do so before this: it only touches activations, never weights.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from longlive.models.attention import FrameMask, block_causal_frames
from longlive.models.dit import AttentionCore, WanDiT
from longlive.parallel.partition import (
    Partition,
    contiguous_partition,
    spatial_partition,
    zigzag_partition,
)

MAX_LAYOUTS = 16
PartitionFn = Callable[[int, int, int, "Tensor | None"], Partition]  # (frames, frame_tokens, ranks, frame_mask)


# ---------------------------------------------------------------------------------------------
# Differentiable all-to-all along dim 0 (uneven splits allowed); everything else is built on it.


def _all_to_all(x: Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup) -> Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Rows ``send[j]`` go to rank j; ``recv[j]`` rows come from rank j. Backward: the reverse exchange."""

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup) -> Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _all_to_all(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_to_all(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def all_to_all(x: Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup) -> Tensor:
    return _AllToAll.apply(x, send, recv, group)


# ---------------------------------------------------------------------------------------------
# Per-forward layout


@dataclass
class Layout:
    """The token layout of one forward: who holds what, and the permutations that reassemble it."""

    partition: Partition
    rank: int
    index: Tensor  # (n,) this rank's global token indices, ascending
    counts: list[int]  # tokens per rank
    order: Tensor  # (S,) all ranks' indices concatenated in rank order (the order an exchange delivers)
    inverse: Tensor  # (S,) argsort(order): rank order -> global order
    frames: Tensor | None  # this rank's frames when it does not hold a piece of every frame

    @property
    def n(self) -> int:
        return self.counts[self.rank]

    @property
    def total(self) -> int:
        return sum(self.counts)


def _layout(partition: Partition, rank: int, device: torch.device) -> Layout:
    indices = [partition.token_index(r) for r in range(partition.ranks)]
    order = torch.cat(indices)
    frames = None if partition.holds_all_frames(rank) else torch.tensor(partition.frames[rank], device=device)
    return Layout(partition, rank, indices[rank].to(device), [len(i) for i in indices], order.to(device),
                  torch.argsort(order).to(device), frames)


def _frame_mask(mask: FrameMask | Tensor | None, frame_tokens: int) -> Tensor | None:
    """(F_q, F_k) frame-level view of a mask whose blocks are whole frames; a per-sample mask gives the
    union over the batch (one partition serves the whole batch)."""
    if mask is None:
        return None
    if isinstance(mask, FrameMask):
        return mask.union()
    frames = mask[..., ::frame_tokens, ::frame_tokens].cpu()
    return frames.reshape(-1, *frames.shape[-2:]).any(0) if frames.ndim > 2 else frames


def make_partition_fn(name: str) -> PartitionFn:
    """``spatial``, ``zigzag`` or ``contiguous`` as a function of (frames, frame_tokens, ranks, frame_mask)."""

    # Whole-frame splits are a training layout; a forward with fewer frames than ranks (a 1-frame
    # I2V block, a short cache read) cannot give every rank a frame and falls back to the spatial split.
    def spatial(f, t, p, mask):
        return spatial_partition(f, t, p)

    def contiguous(f, t, p, mask):
        return contiguous_partition(f, t, p) if f >= p else spatial_partition(f, t, p)

    def zigzag(f, t, p, mask):
        if f < p:
            return spatial_partition(f, t, p)
        if mask is None:  # bidirectional: every frame costs the same
            return contiguous_partition(f, t, p)
        # a square mask over an even number of frames whose halves mirror each other is [clean | noisy]
        halves = 2 if mask.shape[0] == mask.shape[1] and f % 2 == 0 and _is_teacher_forcing(mask) else 1
        return zigzag_partition(mask, t, p, halves=halves)

    fns = {"spatial": spatial, "contiguous": contiguous, "zigzag": zigzag}
    if name not in fns:
        raise ValueError(f"sp_partition must be one of {sorted(fns)}, got {name!r}")
    return fns[name]


def _is_teacher_forcing(mask: Tensor) -> bool:
    """Whether a square frame mask is the ``[clean | noisy]`` layout: clean frames never see the noisy
    half, a noisy frame never sees its own clean copy (only earlier blocks), and noisy frames see
    exactly the noisy frames of their own block (a symmetric block diagonal)."""
    F = mask.shape[0] // 2
    clean_to_noisy, noisy_to_clean, noisy_to_noisy = mask[:F, F:], mask[F:, :F], mask[F:, F:]
    return (not bool(clean_to_noisy.any()) and not bool(noisy_to_clean.diagonal().any())
            and bool(noisy_to_noisy.diagonal().all()) and torch.equal(noisy_to_noisy, noisy_to_noisy.T))


# ---------------------------------------------------------------------------------------------
# The wrapper


def check_heads(num_heads: int, sp: int, attention: str) -> None:
    """Ulysses gives each rank ``num_heads / sp`` whole heads; all-gather K/V keeps every head."""
    if attention == "ulysses" and num_heads % sp:
        raise ValueError(
            f"Ulysses sequence parallel gives each of the {sp} ranks num_heads / sp heads, but num_heads = "
            f"{num_heads} does not divide by {sp}; use an SP degree that divides {num_heads} (parallel.sp) "
            f"or parallel.sp_attention: allgather"
        )


class SequenceParallel:
    """The SP state of one model: the group, the attention mode, and the layout of the running forward.

    The layout is set by the model's forward pre-hook and kept until the next forward, so activation
    checkpointing may recompute blocks during backward.
    """

    def __init__(self, group: dist.ProcessGroup, attention: str = "ulysses", partition: str | PartitionFn = "spatial") -> None:
        if attention not in ("ulysses", "allgather"):
            raise ValueError(f"sp attention must be ulysses or allgather, got {attention!r}")
        self.group, self.attention = group, attention
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.partition_fn = make_partition_fn(partition) if isinstance(partition, str) else partition
        # Only temporal partitions look at the mask; the spatial one never pays for reading it.
        self.uses_mask = partition != "spatial"
        self.layout: Layout | None = None
        self._layouts: OrderedDict[tuple, Layout] = OrderedDict()  # a few shapes recur: LRU of MAX_LAYOUTS
        self._memo: dict[int, tuple[Tensor, Tensor]] = {}  # id(full tensor) -> (full, sliced), one forward
        self._mask_rows: OrderedDict[tuple[int, int], tuple] = OrderedDict()  # (mask, layout) -> this rank's rows
        self._handles: list[RemovableHandle] = []
        self._cores: list[tuple[nn.Module, AttentionCore]] = []

    # -- layout -----------------------------------------------------------------------------------

    def set_layout(self, num_frames: int, frame_tokens: int, frame_mask: Tensor | None, device: torch.device) -> Layout:
        key = (num_frames, frame_tokens, str(device),
               None if frame_mask is None else (tuple(frame_mask.shape), frame_mask.numpy().tobytes()))
        if key not in self._layouts:
            partition = self.partition_fn(num_frames, frame_tokens, self.size, frame_mask)
            if partition.ranks != self.size:
                raise ValueError(f"the partition has {partition.ranks} ranks, the SP group {self.size}")
            self._layouts[key] = _layout(partition, self.rank, device)
            while len(self._layouts) > MAX_LAYOUTS:
                self._layouts.popitem(last=False)
        self._layouts.move_to_end(key)
        self.layout, self._memo = self._layouts[key], {}
        return self.layout

    def _rows(self, t: Tensor, dim: int) -> Tensor:
        """``t`` cut to this rank's tokens along ``dim``, computed once per forward for a given tensor."""
        hit = self._memo.get(id(t))
        if hit is None or hit[0] is not t:
            hit = (t, t.index_select(dim, self.layout.index))
            self._memo[id(t)] = hit
        return hit[1]

    def mask_rows(self, mask: FrameMask) -> FrameMask:
        """``mask`` restricted to this rank's queries, kept per (mask, layout) so that its dense mask or
        ``BlockMask`` is built once, not per layer and step."""
        key = (id(mask), id(self.layout))
        hit = self._mask_rows.get(key)
        if hit is None or hit[0] is not mask or hit[1] is not self.layout:  # ids of freed objects are reused
            hit = (mask, self.layout, mask.select_rows(self.layout.index))
            self._mask_rows[key] = hit
            while len(self._mask_rows) > MAX_LAYOUTS:
                self._mask_rows.popitem(last=False)
        self._mask_rows.move_to_end(key)
        return hit[2]

    # -- exchanges (B first, tokens at dim 1) -------------------------------------------------------

    def shard(self, x: Tensor) -> Tensor:
        """(B, S, ...) replicated -> (B, n, ...) this rank's tokens. Backward: zero-filled elsewhere."""
        return x.index_select(1, self.layout.index)

    def gather(self, x: Tensor) -> Tensor:
        """(B, n, ...) -> (B, S, ...) in global order on every rank. Backward: sum over ranks, own rows."""
        L = self.layout
        rows = x.transpose(0, 1).unsqueeze(0).expand(self.size, *x.transpose(0, 1).shape)
        out = all_to_all(rows.reshape(-1, *rows.shape[2:]), [L.n] * self.size, L.counts, self.group)
        return out.index_select(0, L.inverse).transpose(0, 1).contiguous()

    def heads_to_sequence(self, t: Tensor) -> Tensor:
        """(T, B, n, H, d) my tokens, all heads -> (T, B, S, H / P, d) all tokens, my heads (global order)."""
        L, P = self.layout, self.size
        T, B, n, H, d = t.shape
        send = t.unflatten(3, (P, H // P)).permute(3, 2, 0, 1, 4, 5).reshape(P * n, T, B, H // P, d)
        out = all_to_all(send, [n] * P, L.counts, self.group)  # (S, T, B, h, d) in rank order
        return out.index_select(0, L.inverse).permute(1, 2, 0, 3, 4)

    def sequence_to_heads(self, t: Tensor) -> Tensor:
        """(B, S, H / P, d) all tokens, my heads -> (B, n, H, d) my tokens, all heads."""
        L, P = self.layout, self.size
        B, S, h, d = t.shape
        send = t.transpose(0, 1).index_select(0, L.order)  # rank order
        out = all_to_all(send, L.counts, [L.n] * P, self.group)  # (P * n, B, h, d), head group major
        return out.reshape(P, L.n, B, h, d).permute(2, 1, 0, 3, 4).reshape(B, L.n, P * h, d)

    # -- hooks ------------------------------------------------------------------------------------

    def _pre_model(self, model: WanDiT, args: tuple, kwargs: dict):
        x = args[0] if args else kwargs["x"]
        pt, ph, pw = model.cfg.patch_size
        f, tokens = x.shape[2] // pt, (x.shape[3] // ph) * (x.shape[4] // pw)
        frame_mask = _frame_mask(kwargs.get("attn_mask"), tokens) if self.uses_mask else None
        if frame_mask is None and self.uses_mask and kwargs.get("block_frames") is not None:
            cache = kwargs.get("kv_cache")
            frame_mask = block_causal_frames(f, kwargs["block_frames"], cached_frames=cache.num_frames if cache else 0)
            frame_mask = None if bool(frame_mask.all()) else frame_mask  # one block and its history: no mask
        self.set_layout(f, tokens, frame_mask, x.device)

    def _pre_block(self, block: nn.Module, args: tuple, kwargs: dict, *, first: bool):
        x, context, e, rope = args
        L = self.layout
        if first:
            x = self.shard(x)
        if L.frames is not None and e.shape[1] == L.partition.num_frames:
            e = e.index_select(1, L.frames)  # per-frame modulation of this rank's frames
        cm = kwargs.get("context_mask")
        if cm is not None and cm.ndim == 4 and cm.shape[2] == L.total:  # per-token (multi-prompt) mask
            kwargs = {**kwargs, "context_mask": self._rows(cm, 2)}
        return (x, context, e, rope), kwargs

    def _post_last_block(self, block: nn.Module, args: tuple, kwargs: dict, out: Tensor) -> Tensor:
        return self.gather(out)

    def attach(self, model: WanDiT) -> "SequenceParallel":
        check_heads(model.cfg.num_heads, self.size, self.attention)
        if any(isinstance(b.attn1.core, _SPAttention) for b in model.blocks):
            raise ValueError("sequence parallel is already applied to this model")
        blocks = list(model.blocks)
        self._handles.append(model.register_forward_pre_hook(self._pre_model, with_kwargs=True))
        for i, block in enumerate(blocks):
            hook = (lambda m, a, k, first=(i == 0): self._pre_block(m, a, k, first=first))
            self._handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
            original = block.attn1.core
            block.attn1.core = _SPAttention(original, self)
            self._cores.append((block.attn1, original))
        self._handles.append(blocks[-1].register_forward_hook(self._post_last_block, with_kwargs=True))
        return self

    def detach(self) -> None:
        """Undo :meth:`attach`: the model is a plain one-process model again."""
        for h in self._handles:
            h.remove()
        for attn, core in self._cores:
            attn.core = core
        self._handles, self._cores, self.layout = [], [], None


class _SPAttention(nn.Module):
    """Wraps a block's :class:`AttentionCore`: redistributes q, k, v around the unchanged original."""

    def __init__(self, inner: AttentionCore, sp: SequenceParallel) -> None:
        super().__init__()
        self.inner, self.sp = inner, sp  # sp is not a Module: shared state, not a child

    def forward(self, q, k, v, *, rope=None, key_rope=None, mask=None, kv_cache=None, layer=0):
        sp = self.sp
        if sp.attention == "ulysses":
            q, k, v = sp.heads_to_sequence(torch.stack((q, k, v)))
            out = self.inner(q, k, v, rope=rope, key_rope=key_rope, mask=mask, kv_cache=kv_cache, layer=layer)
            return sp.sequence_to_heads(out)
        # allgather: my queries (their RoPE and mask rows) against every key, all heads
        k, v = sp.gather(torch.stack((k, v), dim=2)).unbind(2)
        if rope is not None:
            key_rope = key_rope or rope
            rope = tuple(sp._rows(t, t.ndim - 3) for t in rope)  # tables are (..., S, 1, d / 2)
        if isinstance(mask, FrameMask):
            mask = sp.mask_rows(mask)
        elif mask is not None:
            mask = sp._rows(mask, mask.ndim - 2)
        return self.inner(q, k, v, rope=rope, key_rope=key_rope, mask=mask, kv_cache=kv_cache, layer=layer)

    def extra_repr(self) -> str:
        return f"{self.sp.attention}, sp={self.sp.size}"


def apply_sequence_parallel(
    model: WanDiT, group: dist.ProcessGroup | None, *, attention: str = "ulysses", partition: str | PartitionFn = "spatial",
) -> SequenceParallel | None:
    """Make ``model`` sequence parallel over ``group`` (every rank of it calls this, then runs the same
    forwards on the same inputs). Returns the handle (``.detach()`` undoes it); None when the group has
    one rank or is None, where nothing changes."""
    if group is None or dist.get_world_size(group) == 1:
        return None
    return SequenceParallel(group, attention, partition).attach(model)
