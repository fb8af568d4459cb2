"""The streaming chunk loop: few-step denoising of one block at a time over a rolling KV cache.

For each block of the plan (see :mod:`longlive.inference.schedule`):

1. on a prompt switch, optionally **re-cache**: recompute the K/V of every held frame from its clean
   latent under the new prompt (one t=0 pass with a block-causal mask over the held frames);
2. **denoise**: start from noise and run the step list; each step reads the cache. Step t runs at
   sigma ``shift_sigma(t / 1000, shift)`` (the model sees ``1000 * sigma``); the ``renoise`` sampler
   predicts x0 and re-noises it with fresh noise to the next sigma (Self-Forcing / DMD students), the
   ``euler`` sampler takes an ODE step; both end on the x0 prediction at the last step;
3. **write**: one t=0 pass over the clean block stores its K/V, then the cache evicts and re-bases
   (``cache_from_last_step``: the last denoising step writes instead, one forward less per block).

I2V: the image latent is latent frame 0. With ``independent_first_frame`` it is a block of its own
(only written, never denoised); otherwise it shares the first block, replaces that block's first noisy
frame at every step (at timestep 0) and in the final output. Either way frame 0 is exactly the image.
CFG (``guidance_scale != 1``) runs the conditional and unconditional branches as a batch of two, each
with its own half of the cache.

The loop never waits for the GPU: the dense KV cache is preallocated and updated in place
(:class:`~longlive.models.attention.DenseKVStorage`), noise goes to the device from pinned host memory
without blocking, timesteps are made on the device, and timings are CUDA events read only when
:attr:`BlockOutput.timings` is. With ``inference.cuda_graphs`` on CUDA, the forwards that repeat (a steady
block's denoising steps and its cache pass) replay from CUDA graphs (:mod:`longlive.inference.cuda_graphs`).
The pipeline runs the model as it is given: ``inference.kernels`` / ``compile`` / ``fp8`` are applied when
the model is built (:func:`longlive.inference.build.build_dit`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor

from longlive.config import InferenceConfig
from longlive.diffusion.flow import NUM_TRAIN_TIMESTEPS, step_list_sigmas
from longlive.inference.cuda_graphs import GraphedForward
from longlive.inference.schedule import BlockPlan
from longlive.models.cache import FrameRecord, RollingKVCache, history_mask
from longlive.models.attention import DenseKVStorage
from longlive.models.dit import WanDiT
from longlive.quant.kv_cache import make_kv_storage


def step_sigmas(denoising_steps: list[int], shift: float) -> Tensor:
    """Sigmas of the step list (shifted as in Wan) followed by 0: ``len(denoising_steps) + 1`` values."""
    return torch.cat([step_list_sigmas(denoising_steps, shift), torch.zeros(1)])


def _mark(device: torch.device) -> float | torch.cuda.Event:
    """A point in the chunk loop: a CUDA event on the current stream (no sync), or host time on the CPU."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _seconds(start: float | torch.cuda.Event, end: float | torch.cuda.Event) -> float:
    if isinstance(start, float):
        return end - start
    end.synchronize()
    return start.elapsed_time(end) / 1000.0


def phase_seconds(marks: dict) -> dict:
    """``{phase}_s`` seconds from ``{phase: (start, end)}`` marks (on CUDA: waits for each end event)."""
    return {f"{phase}_s": _seconds(a, b) for phase, (a, b) in marks.items()}


@dataclass
class BlockOutput:
    plan: BlockPlan
    latents: Tensor  # (1, C, frames, h, w) clean latents of the block, float32, on the pipeline's device
    marks: dict = field(default_factory=dict)  # phase -> (start, end) marks: denoise, cache (write pass), recache
    stats: dict = field(default_factory=dict)  # cache_bytes, cache_frames

    @property
    def timings(self) -> dict:
        """``{phase}_s`` seconds of GPU (or host) time per phase, plus ``stats``. On CUDA the first read
        waits for the block's work to finish: read it after the loop, or when the frames are needed anyway."""
        return {**phase_seconds(self.marks), **self.stats}


class StreamingPipeline:
    """Streams a video block by block from a block-causal :class:`WanDiT`.

    ``contexts``: one (1, L, text_dim) embedding per prompt of the schedule; ``null_context`` the
    empty prompt's, needed only for CFG. Latents are normalised VAE latents of shape (C, h, w) per frame.
    """

    def __init__(
        self, dit: WanDiT, cfg: InferenceConfig, device: torch.device | str | None = None, *, kv_cache: str = "dense",
    ) -> None:
        """``kv_cache``: ``dense`` K/V in the model's dtype, or ``nvfp4`` (``longlive.quant.kv_cache``). ``dit`` is
        streamed as it is (built for inference by :func:`~longlive.inference.build.build_dit`); nothing here
        changes it, so one model serves any number of pipelines."""
        if dit.cfg.patch_size[0] != 1:
            raise ValueError("streaming needs dit.patch_size[0] == 1 (one post-patch frame per latent frame)")
        self.dit, self.cfg = dit, cfg
        self.device = torch.device(device) if device is not None else next(dit.parameters()).device
        self.sigmas = step_sigmas(cfg.denoising_steps, cfg.timestep_shift)
        self.kv_cache = kv_cache
        self.cache = self.new_cache()
        self.graphs: GraphedForward | None = None  # inference.cuda_graphs, on CUDA (longlive.inference.cuda_graphs)
        if cfg.cuda_graphs and self.device.type == "cuda":
            self.graphs = GraphedForward(dit)

    def new_cache(self) -> RollingKVCache:
        c, layers = self.cfg, len(self.dit.blocks)
        max_frames = c.sink_frames + c.window_frames + c.block_frames  # sink + window after eviction, plus the new block
        storage = make_kv_storage(self.kv_cache, layers, max_frames)
        if storage is None:  # dense: preallocated and updated in place rather than concatenated per layer and step
            storage = DenseKVStorage(layers, max_frames)
        return RollingKVCache(
            layers, c.sink_frames, c.window_frames,
            multishot_sink=c.multishot_sink, shot_rope_offset=c.multishot_rope_offset,
            max_block_position=c.max_block_position, storage=storage,
        )

    @property
    def cfg_on(self) -> bool:
        return self.cfg.guidance_scale != 1.0

    def _context(self, context: Tensor, null_context: Tensor | None) -> Tensor:
        context = context.to(self.device)
        if not self.cfg_on:
            return context
        if null_context is None:
            raise ValueError(f"guidance_scale {self.cfg.guidance_scale} needs a null_context (the empty prompt)")
        return torch.cat((context, null_context.to(self.device).expand_as(context)))

    def _batch(self, x: Tensor) -> Tensor:
        return torch.cat((x, x)) if self.cfg_on else x

    def forward(self, x: Tensor, t: Tensor, context: Tensor, positions: Tensor) -> Tensor:
        """One DiT forward of the chunk loop over the cache: replayed from a CUDA graph where one is captured
        (``self.graphs``), else eager."""
        if self.graphs is not None:
            return self.graphs(x, t, context, positions, self.cache)
        return self.dit(x, t, context, kv_cache=self.cache, frame_positions=positions)

    def velocity(self, x: Tensor, t: Tensor, context: Tensor, positions: Tensor) -> Tensor:
        """Model velocity for (1, C, n, h, w) ``x`` at per-frame timesteps ``t`` (n,), reading the cache
        (and writing it, inside ``cache.writing()``)."""
        xb = self._batch(x).to(self.device)
        tb = t.to(self.device)[None].expand(xb.shape[0], -1)
        v = self.forward(xb, tb, context, positions).float()
        if self.cfg_on:
            cond, uncond = v.chunk(2)
            v = uncond + self.cfg.guidance_scale * (cond - uncond)
        return v

    def write(self, x0: Tensor, context: Tensor, positions: Tensor) -> None:
        """The t=0 pass over a clean block that stores its K/V."""
        xb = self._batch(x0).to(self.device)
        with self.cache.writing():
            self.forward(xb, torch.zeros(xb.shape[0], x0.shape[2], device=self.device), context, positions)

    @torch.no_grad()
    def recache(self, context: Tensor) -> None:
        """Recompute the K/V of every held frame under ``context`` (already CFG-batched).

        One pass over the held clean latents, each frame seeing its own and earlier blocks: the cache a
        from-scratch block-by-block write of the same frames under the new prompt would build.
        """
        cache = self.cache
        if not cache.frames:
            return
        x = self._batch(cache.latents()).to(self.device)
        positions = cache.positions.clone()
        mask = history_mask([r.block for r in cache.frames], self.dit.tokens_per_frame(*x.shape[-2:]), self.device)
        cache.clear_kv()
        with cache.writing():
            self.dit(x, torch.zeros(x.shape[0], x.shape[2], device=self.device), context,
                     kv_cache=cache, frame_positions=positions, attn_mask=mask)

    def _noise(self, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        """Gaussian noise from the CPU ``generator`` (the same video on any device), on the device without a
        host sync: drawn into pinned memory and copied asynchronously (PyTorch's pinned-memory cache keeps
        the buffer until the copy has finished, so no copy reads a buffer being refilled)."""
        if self.device.type != "cuda":
            return torch.randn(shape, generator=generator).to(self.device)
        host = torch.empty(shape, pin_memory=True)
        torch.randn(shape, generator=generator, out=host)
        return host.to(self.device, non_blocking=True)

    @torch.no_grad()
    def denoise(
        self, noise: Tensor, context: Tensor, positions: Tensor, generator: torch.Generator,
        known: Tensor | None = None, *, write_last: bool = False,
    ) -> Tensor:
        """Few-step denoising of one block from ``noise`` (1, C, n, h, w); ``known`` (1, C, k, h, w) are
        clean leading frames (the I2V image) that replace the noisy ones at every step, at timestep 0.
        ``write_last``: the last step also writes its K/V to the cache (``cache_from_last_step``)."""
        x = noise.to(self.device, torch.float32)
        n, k = x.shape[2], 0 if known is None else known.shape[2]
        if k:
            known = known.to(self.device, torch.float32)
        x0 = x
        for i, (s, s_next) in enumerate(zip(self.sigmas[:-1].tolist(), self.sigmas[1:].tolist())):
            if k:
                x[:, :, :k] = known
            t = torch.full((n,), s * NUM_TRAIN_TIMESTEPS, device=self.device)  # made on the device: no copy
            t[:k] = 0.0
            if write_last and s_next == 0:
                with self.cache.writing():
                    v = self.velocity(x, t, context, positions)
            else:
                v = self.velocity(x, t, context, positions)
            x0 = x - s * v
            if k:
                x0[:, :, :k] = known
            if s_next == 0:
                break
            if self.cfg.sampler == "renoise":
                x = (1 - s_next) * x0 + s_next * self._noise(x.shape, generator)
            else:
                x = x + (s_next - s) * v
        return x0

    @torch.no_grad()
    def stream(
        self,
        plans: list[BlockPlan],
        contexts: list[Tensor],
        latent_shape: tuple[int, int, int],
        *,
        image_latent: Tensor | None = None,
        null_context: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[BlockOutput]:
        """Generate the blocks of ``plans`` in order, yielding each block's clean latents as soon as it is done.

        ``latent_shape``: (C, h, w) of one latent frame. ``image_latent`` (1, C, 1, h, w): I2V first frame.
        Noise comes from ``generator`` (CPU), so a seed gives the same video on any device.
        """
        generator = generator or torch.Generator().manual_seed(0)
        self.cache.reset()
        C, h, w = latent_shape
        shot_start = 0
        batched: dict[int, Tensor] = {}  # one context tensor per prompt: the context memo and CUDA graphs key on it
        for plan in plans:
            marks: dict = {}
            if plan.prompt not in batched:
                batched[plan.prompt] = self._context(contexts[plan.prompt], null_context)
            context = batched[plan.prompt]
            if plan.new_shot:
                shot_start = plan.start
            if plan.switch and self.cfg.recache_on_switch and self.cache.frames:
                start = _mark(self.device)
                self.recache(context)
                marks["recache"] = (start, _mark(self.device))
            positions = self.cache.next_positions(plan.frames, plan.shot)

            known = None
            if image_latent is not None and plan.start == 0:
                known = image_latent.to(self.device, torch.float32)
            start = _mark(self.device)
            noise = self._noise((1, C, plan.frames, h, w), generator)
            written = False
            if known is not None and known.shape[2] >= plan.frames:
                x0 = known[:, :, : plan.frames].clone()  # the image alone: nothing to denoise
            else:
                written = self.cfg.cache_from_last_step
                x0 = self.denoise(noise, context, positions, generator, known, write_last=written)
            marks["denoise"] = (start, _mark(self.device))

            start = _mark(self.device)
            if not written:
                self.write(x0, context, positions)
            self.cache.commit([
                FrameRecord(plan.start + i, plan.index, plan.shot, plan.start + i - shot_start,
                            x0[:, :, i : i + 1])
                for i in range(plan.frames)
            ])
            marks["cache"] = (start, _mark(self.device))
            stats = {"cache_bytes": self.cache.cache_bytes(), "cache_frames": self.cache.held_frames()}
            yield BlockOutput(plan, x0, marks, stats)
