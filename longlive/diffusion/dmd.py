"""Distribution matching distillation (DMD2 / Self-Forcing) for the block-causal student.

Three models: the **generator** (the few-step student), the frozen **real score** (the bidirectional
base teacher, with classifier-free guidance) and the **fake score** (a critic initialised from the
teacher and trained on the generator's samples). In flow matching a score model's velocity ``v`` at
``x_t = (1 - s) x + s * noise`` gives a clean estimate ``x0 = x_t - s * v``.

* Generator: ``x = rollout(...)``; draw ``s`` and noise; ``x0_real``, ``x0_fake`` from the two
  scores; the gradient ``(x0_fake - x0_real) / mean|x - x0_real|`` (per sample) is pushed into ``x``
  through the surrogate loss ``0.5 * ||x - stopgrad(x - grad)||^2`` (mean), whose gradient with
  respect to ``x`` is ``grad / numel``. This moves samples toward where the real score points and
  away from where the generator's own distribution (the fake score) points.
* Critic: flow matching on the generator's (detached) samples, target ``noise - x``.
* Self-forcing rollout: the generator produces its own context block by block through the KV cache
  (as at inference), each block from fresh noise through the step list; one exit step per rollout
  is drawn and only that step is differentiated, earlier steps and the cache writes run without
  gradient -- train and test see the same context, at the memory of one forward per block.

Timesteps: ``t ~ U(min, max)`` (in [0, 1000]) mapped through the Wan shift, one per sample, shared by
all frames (the teacher is bidirectional and was trained that way).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from longlive.diffusion import flow
from longlive.models.cache import FrameRecord, RollingKVCache
from longlive.models.dit import WanDiT


def x0_from_velocity(x_t: Tensor, sigma: Tensor, v: Tensor) -> Tensor:
    """Clean estimate of a flow-matching model: ``x_t - sigma * v`` (sigma broadcast per sample)."""
    return x_t - _expand(sigma, x_t) * v


def _expand(sigma: Tensor, like: Tensor) -> Tensor:
    return sigma.reshape(sigma.shape[0], *([1] * (like.ndim - 1))).to(like)


def sample_dmd_sigma(batch: int, shift: float, min_t: float, max_t: float, g: torch.Generator) -> Tensor:
    """(B,) noise levels: ``t ~ U(min_t, max_t)`` / 1000, then the Wan timestep shift."""
    u = min_t / 1000 + (max_t - min_t) / 1000 * torch.rand(batch, generator=g)
    return flow.shift_sigma(u, shift)


def dmd_gradient(x: Tensor, x0_real: Tensor, x0_fake: Tensor, frame_mask: Tensor | None = None) -> Tensor:
    """DMD's gradient on the generator's samples ``x`` (B, C, F, h, w), normalised per sample.

    ``frame_mask`` (B, F), 1 for generated frames: others (the I2V image) get no gradient and do not
    enter the normaliser.
    """
    p_real, p_fake = x - x0_real, x - x0_fake
    if frame_mask is None:
        frame_mask = torch.ones(x.shape[0], x.shape[2], device=x.device)
    m = frame_mask[:, None, :, None, None].to(x).expand_as(x)
    per_sample = (p_real.abs() * m).sum(dim=(1, 2, 3, 4)) / m.sum(dim=(1, 2, 3, 4)).clamp_min(1)
    return (p_real - p_fake) * m / per_sample.clamp_min(1e-8)[:, None, None, None, None]


def generator_loss(x: Tensor, grad: Tensor) -> Tensor:
    """Surrogate whose gradient with respect to ``x`` is ``grad / x.numel()``."""
    return 0.5 * F.mse_loss(x.float(), (x.float() - grad.float()).detach(), reduction="mean")


def critic_loss(v_pred: Tensor, x: Tensor, noise: Tensor, frame_mask: Tensor | None = None) -> Tensor:
    """Flow-matching loss of the fake score on generator samples ``x``: ``||v - (noise - x)||^2``."""
    err = (v_pred.float() - flow.velocity_target(x, noise).float()).pow(2).mean(dim=(1, 3, 4))  # (B, F)
    if frame_mask is None:
        return err.mean()
    return (err * frame_mask).sum() / frame_mask.sum().clamp_min(1.0)


def score_x0(
    model: WanDiT, x_t: Tensor, sigma: Tensor, context: Tensor, *, null_context: Tensor | None = None,
    guidance_scale: float = 1.0, context_index: Tensor | None = None,
) -> Tensor:
    """x0 estimate of a bidirectional score model at noise ``sigma`` (B,), with CFG when guidance != 1."""
    t = flow.timestep(sigma).to(x_t.device)
    dtype = next(model.parameters()).dtype
    if guidance_scale == 1.0:
        v = model(x_t.to(dtype), t, context.to(dtype), context_index=context_index).float()
    else:
        if null_context is None:
            raise ValueError(f"guidance_scale {guidance_scale} needs the empty prompt's null_context")
        B = x_t.shape[0]
        null = null_context.to(context).expand_as(context)
        index = None if context_index is None else torch.cat((context_index, context_index))
        v = model(torch.cat((x_t, x_t)).to(dtype), torch.cat((t, t)), torch.cat((context, null)).to(dtype),
                  context_index=index).float()
        cond, uncond = v[:B], v[B:]
        v = uncond + guidance_scale * (cond - uncond)
    return x0_from_velocity(x_t, sigma, v)


@dataclass
class RolloutLayout:
    """How the generator streams a clip: blocks, the step list's sigmas, the cache it streams with."""

    block_sizes: list[int]  # e.g. [2, 2, 2, 2, 1] or, for I2V, [1 | 2, 2, 2, 2] (the first is the image)
    sigmas: Tensor  # the step list's sigmas (shifted), no trailing 0
    sink_frames: int = 0
    window_frames: int | None = None
    max_block_position: int | None = None
    image_first: bool = False  # I2V: block 0 is the clean image latent, written, never generated

    def new_cache(self, num_layers: int) -> RollingKVCache:
        window = self.window_frames if self.window_frames is not None else sum(self.block_sizes)
        return RollingKVCache(num_layers, self.sink_frames, window, max_block_position=self.max_block_position)


def rollout(
    generator: WanDiT, shape: tuple[int, ...], context: Tensor, layout: RolloutLayout, g: torch.Generator, *,
    exit_step: int | None = None, image: Tensor | None = None, grad: bool = True,
    device: torch.device | str | None = None,
) -> Tensor:
    """Self-forcing rollout of a clip of ``shape`` (B, C, F, h, w): clean latents, differentiable at the exit step.

    Noise comes from ``g`` (CPU) in the order of the inference pipeline (each block's starting noise,
    then fresh noise for every re-noising), so with the last exit step a rollout is exactly what
    ``StreamingPipeline.stream`` generates. ``exit_step``: the step whose x0 is the block's output
    (default: the last); with ``grad`` only that step is differentiated. ``image`` (B, C, 1, h, w): the
    I2V first frame (``layout.image_first``).
    """
    B, C, F, h, w = shape
    if sum(layout.block_sizes) != F:
        raise ValueError(f"block sizes {layout.block_sizes} do not cover the {F} frames of the clip")
    if layout.image_first and image is None:
        raise ValueError("an I2V rollout (image_first) needs the image latent")
    n_steps = len(layout.sigmas)
    exit_step = n_steps - 1 if exit_step is None else exit_step
    if not 0 <= exit_step < n_steps:
        raise ValueError(f"exit_step {exit_step} outside the {n_steps} steps")
    device = torch.device(device) if device is not None else next(generator.parameters()).device
    cache = layout.new_cache(len(generator.blocks))
    dtype = next(generator.parameters()).dtype
    context = context.to(device, dtype)
    out, start = [], 0
    for b, size in enumerate(layout.block_sizes):
        positions = cache.next_positions(size, 0)
        x = torch.randn((B, C, size, h, w), generator=g).to(device)
        if b == 0 and layout.image_first:
            x0 = image.to(device, torch.float32)
        else:
            for i in range(exit_step + 1):
                s = float(layout.sigmas[i])
                t = torch.full((B, size), s * flow.NUM_TRAIN_TIMESTEPS, device=device)
                with torch.set_grad_enabled(grad and i == exit_step):
                    v = generator(x.to(dtype), t, context, kv_cache=cache, frame_positions=positions).float()
                    x0 = x - s * v
                if i < exit_step:
                    s_next = float(layout.sigmas[i + 1])
                    fresh = torch.randn(x.shape, generator=g).to(device)
                    x = (1 - s_next) * x0.detach() + s_next * fresh
        with torch.no_grad(), cache.writing():  # the t=0 pass that writes the block's K/V, as at inference
            generator(x0.detach().to(dtype), torch.zeros(B, size, device=device), context,
                      kv_cache=cache, frame_positions=positions)
        cache.commit([FrameRecord(start + i, b, 0, start + i, x0[:, :, i : i + 1].detach()) for i in range(size)])
        out.append(x0)
        start += size
    return torch.cat(out, dim=2)


__all__ = [
    "x0_from_velocity", "sample_dmd_sigma", "dmd_gradient", "generator_loss", "critic_loss", "score_x0",
    "RolloutLayout", "rollout",
]
