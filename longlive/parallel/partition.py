"""Which tokens each sequence-parallel rank holds, and the attention work that gives each rank.

Tokens are laid out frame by frame (post-patch frames of ``frame_tokens`` tokens). A
:class:`Partition` gives rank r the token range ``token_range[r]`` of every frame in ``frames[r]``;
two shapes cover what we need:

* **spatial** (the default): every rank holds ``1 / P`` of the tokens of *every* frame. Any frame-level
  mask (block-causal, teacher forcing, sink + window) then gives every rank exactly the same number
  of query-key pairs, and the frame count need not divide by P (a 1-frame I2V block, 3-frame blocks).
* **temporal** (whole frames): ``contiguous`` cuts the frame sequence into P runs; ``zigzag`` is LongLive
  2.0's balanced split for teacher forcing: each rank holds clean block i *and* its noisy copy, and
  blocks are dealt early/late in a snake (0, 1, .., P-1, P-1, .., 0, ..) so cheap early blocks pair
  with expensive late ones.

Where the partition matters. Ulysses (:mod:`longlive.parallel.sequence`, the default) switches to a
head split for attention, so every rank computes its heads over the *whole* sequence: attention work is
equal for any partition. With query-sharded attention (``allgather``: each rank attends its own
queries to all keys, as in ring / context parallel) a rank's work is the number of allowed
query-key pairs of its queries -- counted by :func:`attention_flops`. Those counts are what a
block-sparse kernel spends; dense masked SDPA computes every pair, so there the cost per rank is its
query count times all keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Partition:
    """Rank r holds tokens ``token_range[r]`` (within a frame) of each frame in ``frames[r]`` (sorted)."""

    num_frames: int
    frame_tokens: int
    frames: tuple[tuple[int, ...], ...]
    token_range: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if len(self.frames) != len(self.token_range) or not self.frames:
            raise ValueError("a partition needs one frame list and one token range per rank")
        covered = torch.zeros(self.num_frames, self.frame_tokens, dtype=torch.int)
        for frames, (lo, hi) in zip(self.frames, self.token_range):
            if list(frames) != sorted(set(frames)) or not 0 <= lo < hi <= self.frame_tokens:
                raise ValueError(f"bad partition entry: frames {frames}, tokens [{lo}, {hi})")
            covered[list(frames), lo:hi] += 1
        if not bool((covered == 1).all()):
            raise ValueError("a partition must give every token to exactly one rank")

    @property
    def ranks(self) -> int:
        return len(self.frames)

    def token_index(self, rank: int) -> Tensor:
        """(n_r,) global indices of rank ``rank``'s tokens, ascending (frame-major, as the model lays them out)."""
        frames = torch.tensor(self.frames[rank], dtype=torch.long)
        lo, hi = self.token_range[rank]
        return (frames[:, None] * self.frame_tokens + torch.arange(lo, hi)).flatten()

    def num_tokens(self, rank: int) -> int:
        lo, hi = self.token_range[rank]
        return len(self.frames[rank]) * (hi - lo)

    def holds_all_frames(self, rank: int) -> bool:
        return len(self.frames[rank]) == self.num_frames


def spatial_partition(num_frames: int, frame_tokens: int, ranks: int) -> Partition:
    """Every rank holds ``frame_tokens / ranks`` consecutive tokens of every frame."""
    if frame_tokens % ranks:
        raise ValueError(
            f"spatial sequence parallel splits each frame's {frame_tokens} tokens over {ranks} ranks, which "
            f"does not divide; use a latent size whose (h / patch) * (w / patch) divides by {ranks}, or "
            f"parallel.sp_partition: zigzag / contiguous"
        )
    n = frame_tokens // ranks
    return Partition(num_frames, frame_tokens, (tuple(range(num_frames)),) * ranks,
                     tuple((r * n, (r + 1) * n) for r in range(ranks)))


def _frame_partition(num_frames: int, frame_tokens: int, groups: list[list[int]]) -> Partition:
    if any(not g for g in groups):
        raise ValueError(
            f"{num_frames} frames cannot give each of {len(groups)} ranks a whole frame; "
            f"use parallel.sp_partition: spatial"
        )
    return Partition(num_frames, frame_tokens, tuple(tuple(sorted(g)) for g in groups),
                     ((0, frame_tokens),) * len(groups))


def contiguous_partition(num_frames: int, frame_tokens: int, ranks: int) -> Partition:
    """Whole frames in P consecutive runs (sizes differ by at most one): the plain split."""
    bounds = [round(r * num_frames / ranks) for r in range(ranks + 1)]
    return _frame_partition(num_frames, frame_tokens, [list(range(bounds[r], bounds[r + 1])) for r in range(ranks)])


def snake(n: int, ranks: int) -> list[int]:
    """Rank of the i-th of n items dealt 0, 1, .., P-1, P-1, .., 1, 0, 0, 1, ..."""
    return [i % ranks if (i // ranks) % 2 == 0 else ranks - 1 - i % ranks for i in range(n)]


def frame_units(frame_mask: Tensor, halves: int = 1) -> list[list[int]]:
    """Frames grouped into units that move together: runs of consecutive frames with the same mask row
    (a causal block), and with ``halves=2`` (teacher forcing, ``[clean | noisy]``) the k-th unit of the
    clean half joined with the k-th of the noisy half -- a clean block and its paired noisy block."""
    F = frame_mask.shape[0]
    if F % halves:
        raise ValueError(f"{F} frames do not split into {halves} equal halves")
    rows = frame_mask.cpu()
    per_half = []
    for h in range(halves):
        units, start = [], h * F // halves
        for f in range(start, (h + 1) * F // halves):
            if f == start or not torch.equal(rows[f], rows[f - 1]):
                units.append([])
            units[-1].append(f)
        per_half.append(units)
    if len({len(u) for u in per_half}) != 1:
        raise ValueError("the halves of a teacher-forcing mask must have the same block layout")
    if len(per_half[0]) == 1:  # one block (e.g. bidirectional): frames are the finest units left
        per_half = [[[f] for f in half[0]] for half in per_half]
    return [sum((half[k] for half in per_half), []) for k in range(len(per_half[0]))]


def _deal(units: list[list[int]], cost: Tensor, ranks: int) -> list[list[int]]:
    """Units sorted by cost, dealt in a snake: rank r gets the r-th cheapest and the r-th dearest."""
    order = sorted(range(len(units)), key=lambda u: (int(cost[units[u]].sum()), u))
    groups: list[list[int]] = [[] for _ in range(ranks)]
    for unit, rank in zip(order, snake(len(units), ranks)):
        groups[rank].extend(units[unit])
    return groups


def zigzag_partition(frame_mask: Tensor, frame_tokens: int, ranks: int, *, halves: int = 1) -> Partition:
    """LongLive 2.0's balanced temporal split: units (see :func:`frame_units`) sorted by their attention
    cost (allowed key frames summed over the unit's query frames) and dealt in a snake, so each rank
    pairs early (cheap) with late (expensive) blocks. With ``halves=2`` each rank holds whole
    ``(clean block, noisy block)`` pairs, keeping the teacher-forcing structure local.

    The snake is exact when the blocks come in multiples of 2P of equal size; otherwise (an I2V
    first-frame block, fewer than 2 blocks per rank) dealing single frames -- a clean frame with its
    noisy copy -- can balance better, and at P = 2 the plain split of ``[clean | noisy]`` is already
    even (noisy block i costs what clean block i costs). So all three are tried and the one whose
    busiest rank does the least wins: never worse than the contiguous split.
    """
    F = frame_mask.shape[0]
    blocks = frame_units(frame_mask, halves)
    frames = [u[i::len(u) // halves] for u in blocks for i in range(len(u) // halves)]  # [clean f, noisy f]
    cost = frame_mask.sum(dim=1).cpu()
    bounds = [round(r * F / ranks) for r in range(ranks + 1)]
    candidates = [_deal(blocks, cost, ranks), _deal(frames, cost, ranks),
                  [list(range(bounds[r], bounds[r + 1])) for r in range(ranks)]]
    candidates = [c for c in candidates if all(c)] or candidates[2:]  # every rank needs a frame
    best = min(candidates, key=lambda groups: max(int(cost[g].sum()) for g in groups))
    return _frame_partition(F, frame_tokens, best)


def attention_flops(
    frame_mask: Tensor | None, partition: Partition, heads: int, head_dim: int, *,
    mode: str = "allgather", cached_frames: int = 0,
) -> list[int]:
    """Counted attention FLOPs (QK^T and PV, 2 per multiply-add, mask-aware) of each rank, one forward.

    ``frame_mask``: (F_q, F_k) boolean frame-level mask, keys = ``cached_frames`` held frames then the
    F_q query frames (None: every query sees every key). ``mode``: ``allgather`` -- each rank's own
    queries against all keys, all heads (query-sharded attention); ``ulysses`` -- all queries, heads / P.
    """
    F, T = partition.num_frames, partition.frame_tokens
    if frame_mask is None:
        frame_mask = torch.ones(F, cached_frames + F, dtype=torch.bool)
    if frame_mask.shape[0] != F:
        raise ValueError(f"frame_mask has {frame_mask.shape[0]} query frames, the partition {F}")
    keys_per_frame = frame_mask.sum(dim=1).long().cpu() * T  # allowed keys of one query token of each frame
    per_pair = 4 * head_dim  # 2 FLOPs x (q.k and p.v) per head
    if mode == "ulysses":
        total = int(keys_per_frame.sum()) * T
        if heads % partition.ranks:
            raise ValueError(f"ulysses needs heads ({heads}) divisible by the ranks ({partition.ranks})")
        return [total * per_pair * heads // partition.ranks] * partition.ranks
    if mode != "allgather":
        raise ValueError(f"mode must be allgather or ulysses, got {mode!r}")
    out = []
    for r in range(partition.ranks):
        lo, hi = partition.token_range[r]
        out.append(int(keys_per_frame[list(partition.frames[r])].sum()) * (hi - lo) * per_pair * heads)
    return out


def imbalance(work: list[int]) -> float:
    """max / mean of per-rank work: 1.0 is perfect balance; the slowest rank sets the step time."""
    mean = sum(work) / len(work)
    return max(work) / mean if mean else 1.0
