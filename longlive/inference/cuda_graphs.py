"""CUDA graphs of the chunk loop's DiT forwards (``inference.cuda_graphs``).

Why: a forward of the 5B DiT launches about a thousand kernels from Python. At 704x1280 in bf16 the GPU is the
bottleneck and the launches hide behind it, but with FP8 linears (a quantization launch per linear) or at 480x832
the host takes about as long to launch a forward as the GPU to run it, so rows went host-bound. A graph replays
all of a forward's kernels from one launch.

What repeats: a steady block runs its denoising steps as reads of the same cache (same shapes, same held
positions), and its cache pass as the same write; every later block repeats both. A forward is fixed by its
**signature**: the input's shape and dtype, the new frames' positions, the context's shape, and the cache's host
state (:meth:`~longlive.models.attention.KVCache.graph_state`: held positions, write flag, held tokens per layer,
the buffers' generation). Per signature :class:`GraphedForward`

1. runs its calls eagerly within the first block it comes in (they warm what the forward builds on first use: the
   RoPE tables, Triton and cuDNN kernels for the shape, the cache's buffers), so the blocks that fill the cache, whose
   signatures never come again, capture nothing and the first block's latency has no capture in it;
2. captures its first call in a later block, then replays that graph to produce the call's result;
3. replays every later call: inputs copied into the graph's static buffers, the cache's host state set to what the
   captured call left (a replay runs no Python, so nothing else would advance it).

A block ends with its writing forward (the cache pass, or the last step with ``cache_from_last_step``).

What a graph reads from outside its memory pool must stay where it was: the weights; the KV buffers (their
generation is in the signature); the RoPE tables (held by the graph, so the memo's eviction cannot free them); and
the context memo's outputs (``longlive.inference.optimize.apply_context_memo``: the text embedding and each
cross-attention's K and V). A new context is always run eagerly first, which refreshes the memo; a graph captured
under an earlier context then copies the memo's new outputs into the tensors it reads before it replays (61 small
copies, once per prompt switch, instead of a recapture). Without the memo (the plain reference path) or with a
cache whose writes make new tensors (the list-of-tensors cache), every call is eager.

Anything else -- masked passes (re-cache), a forward that fails to capture -- runs eagerly; ``inference.cuda_graphs:
false`` turns the whole thing off. Results equal the eager forward's: a replay runs the same kernels on the same
memory (tests/unit/test_cuda_graphs.py, on a GPU bitwise).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from longlive.inference.optimize import context_modules
from longlive.models.attention import KVCache
from longlive.models.dit import WanDiT

log = logging.getLogger(__name__)

MAX_GRAPHS = 32  # signatures captured per pipeline; beyond it calls run eagerly (a stream has a handful)


class CudaGraph:
    """One ``torch.cuda.CUDAGraph``: :meth:`capture` records ``fn``'s kernels (into ``pool``, shared by a pipeline's
    graphs, which never run concurrently) and returns its output tensor, which every :meth:`replay` rewrites."""

    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], Tensor], pool) -> Tensor:
        # thread_local: the VAE's worker thread keeps decoding (its own stream, its own allocations) meanwhile
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            return fn()

    def replay(self) -> None:
        self.graph.replay()

    def pool(self):
        return self.graph.pool()


@dataclass
class _Entry:
    graph: CudaGraph
    x: Tensor  # static inputs, copied into before each replay
    t: Tensor
    out: Tensor  # the captured output, rewritten by each replay
    pre: tuple  # the cache's host state before and after the captured forward
    post: tuple
    rope: tuple  # the RoPE tables the graph reads (held: the memo may evict them)
    memo: list[Tensor]  # the context memo's outputs the graph reads
    memo_source: tuple  # ids of the memo outputs whose values ``memo`` holds now


_MISSING = object()


class GraphedForward:
    """The pipeline's ``dit(x, t, context, kv_cache=cache, frame_positions=positions)``, replayed from CUDA graphs
    where a signature repeats (see the module docstring). ``graph_factory`` makes a graph object (:class:`CudaGraph`
    on a GPU; tests pass one that re-runs the captured function, to check the bookkeeping on the CPU)."""

    def __init__(self, dit: WanDiT, *, graph_factory: Callable[[], CudaGraph] = CudaGraph,
                 max_graphs: int = MAX_GRAPHS) -> None:
        self.dit, self.graph_factory, self.max_graphs = dit, graph_factory, max_graphs
        self.cache: KVCache | None = None
        self.graphs: dict[tuple, _Entry | None] = {}  # None: not capturable, stays eager
        self.seen: dict[tuple, int] = {}  # signature -> the block it first came in
        self.block = 0  # writing forwards so far: the block the chunk loop is in
        self.pool = None
        self.context: Tensor | None = None
        self.context_version = -1
        self.counts = {"eager": 0, "captured": 0, "replayed": 0}
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ the call

    def __call__(self, x: Tensor, t: Tensor, context: Tensor, positions: Tensor, cache: KVCache) -> Tensor:
        if cache is not self.cache:  # graphs are bound to one cache's buffers
            self.reset(cache)
        writes = cache.write
        out = self._call(x, t, context, positions)
        self.block += writes
        return out

    def _call(self, x: Tensor, t: Tensor, context: Tensor, positions: Tensor) -> Tensor:
        if context is not self.context or context._version != self.context_version:
            self.context, self.context_version = context, context._version
            return self._eager(x, t, context, positions)  # refreshes the context memo for the graphs
        sig = self._signature(x, t, context, positions)
        if sig is None:
            return self._eager(x, t, context, positions)
        entry = self.graphs.get(sig, _MISSING)
        if entry is _MISSING:
            first = self.seen.setdefault(sig, self.block)
            if first == self.block or len(self.graphs) >= self.max_graphs:
                return self._eager(x, t, context, positions)
            entry = self.graphs[sig] = self._capture(x, t, context, positions)
        if entry is None:
            return self._eager(x, t, context, positions)
        return self._replay(entry, x, t)

    def reset(self, cache: KVCache | None = None) -> None:
        """Drop every graph (e.g. after the model changed); the next calls run eagerly and capture anew."""
        self.cache, self.graphs, self.seen, self.pool, self.block = cache, {}, {}, None, 0
        self.context, self.context_version = None, -1

    # ------------------------------------------------------------------ pieces

    def _eager(self, x: Tensor, t: Tensor, context: Tensor, positions: Tensor) -> Tensor:
        self.counts["eager"] += 1
        return self.dit(x, t, context, kv_cache=self.cache, frame_positions=positions)

    def _memo_outputs(self) -> list[Tensor] | None:
        outs = []
        for m in context_modules(self.dit):
            memo = m.__dict__.get("_context_memo")
            if memo is None or memo.output is None:
                return None
            outs.append(memo.output)
        return outs

    def _signature(self, x: Tensor, t: Tensor, context: Tensor, positions: Tensor) -> tuple | None:
        state = self.cache.graph_state()
        if state is None:
            self._warn_once("cache", "CUDA graphs off for this pipeline: its KV cache makes new tensors per write")
            return None
        if self._memo_outputs() is None:
            self._warn_once("memo", "CUDA graphs off for this pipeline: the model has no context memo "
                                    "(apply_context_memo), so a graph would read one prompt's context for good")
            return None
        return (tuple(x.shape), x.dtype, tuple(t.shape), t.dtype, tuple(context.shape), context.dtype,
                tuple(positions.tolist()), state)

    def _capture(self, x: Tensor, t: Tensor, context: Tensor, positions: Tensor) -> _Entry | None:
        cache, dit = self.cache, self.dit
        pre = cache.graph_state()
        h, w = x.shape[-2] // dit.cfg.patch_size[1], x.shape[-1] // dit.cfg.patch_size[2]
        rope = dit.rope_tables(positions, cache, h, w, x.device)  # memo hits: the very tables the forward reads
        memos = [m._context_memo for m in context_modules(dit)]
        memo_state = [(m.input, m.key, m.output) for m in memos]
        sx, st = x.clone(), t.clone()
        graph = self.graph_factory()
        try:
            # the context is read through self: a CUDA graph never reads it again (the memo's outputs stand in for
            # it), a stand-in graph that re-runs the function must see the current one
            out = graph.capture(lambda: dit(sx, st, self.context, kv_cache=cache, frame_positions=positions), self.pool)
        except Exception as e:  # noqa: BLE001 -- any capture failure means: run this signature eagerly
            self._restore(pre, memos, memo_state)
            self._warn_once(f"capture {type(e).__name__}", f"a forward could not be captured as a CUDA graph "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); it runs eagerly")
            return None
        post = cache.graph_state()
        if any(m.output is not o for m, (_, _, o) in zip(memos, memo_state)):
            # the forward recomputed part of the context inside the capture (e.g. a context in another dtype than
            # the text embedder's, converted per call): the graph would pin one prompt, so it is not used
            self._restore(pre, memos, memo_state)
            self._warn_once("memo miss", "a forward recomputes its context on every call; CUDA graphs off for it")
            return None
        cache.load_graph_state(pre)
        self.pool = graph.pool()
        self.counts["captured"] += 1
        outs = [o for _, _, o in memo_state]
        return _Entry(graph, sx, st, out, pre, post, rope, outs, tuple(map(id, outs)))

    def _restore(self, pre: tuple, memos: list, memo_state: list) -> None:
        self.cache.load_graph_state(pre)
        for m, (i, k, o) in zip(memos, memo_state):
            m.input, m.key, m.output = i, k, o

    def _replay(self, entry: _Entry, x: Tensor, t: Tensor) -> Tensor:
        current = self._memo_outputs()
        ids = tuple(map(id, current))
        if ids != entry.memo_source:  # another prompt since the capture: its memo outputs into the graph's tensors
            for dst, src in zip(entry.memo, current):
                if dst is not src:
                    dst.copy_(src)
            entry.memo_source = ids
        entry.x.copy_(x)
        entry.t.copy_(t)
        entry.graph.replay()
        self.cache.load_graph_state(entry.post)
        self.counts["replayed"] += 1
        return entry.out.clone()  # the next replay rewrites entry.out

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

