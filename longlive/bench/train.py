"""Timing training steps on one process or every rank of a group: the teacher-forcing step that
``benchmarks/sp_scaling.py`` measures, and the timer any training benchmark reuses.

A step is ``zero_grad``, forward + backward, grad-norm clipping and the optimizer step, with the device
synchronised at each boundary so that the spans are the device's work. With several ranks a step lasts as
long as its slowest rank, so the summary takes the maximum over ranks of every span.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from longlive.bench.harness import cuda_peak_gib, now, rank_gather, rank_max, sync
from longlive.config import Preset
from longlive.parallel.fsdp import to_local_float
from longlive.train.ar import attention_mask, build_batch, masked_flow_loss, shot_index, tf_forward
from longlive.train.loop import autocast


def teacher_forcing_inputs(preset: Preset, frames: int, device: torch.device, seed: int):
    """A random T2V teacher-forcing batch of one ``frames``-latent-frame clip ([clean | noisy], one shot, as
    ``train_ar`` builds it from the preset's ``ar`` settings) and its token-level attention mask. Drawn from a
    CPU generator, so every rank of a sequence-parallel group holds the same batch."""
    cfg = preset.ar
    variant = cfg.variants["t2v"]
    C, _, h, w = preset.latent_shape
    _, ph, pw = preset.dit.patch_size
    tokens, text = (h // ph) * (w // pw), preset.text
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(1, C, frames, h, w, generator=g)
    context = torch.randn(1, 1, text.max_tokens, text.dim, generator=g)
    index = torch.zeros(1, frames, dtype=torch.long)
    null = torch.zeros(text.max_tokens, text.dim)
    batch = build_batch(x0, context, index, null, cfg, variant, g).to(device)
    # the frame-level mask, expanded to tokens on the device (the token mask is (2S)^2 booleans)
    frame_mask = attention_mask(frames, 1, cfg.block_frames, variant.independent_first_frame,
                                shots=shot_index([0], frames), sink_frames=cfg.sink_frames,
                                window_frames=cfg.window_frames, multishot_sink=cfg.multishot_sink).to(device)
    return batch, frame_mask.repeat_interleave(tokens, 0).repeat_interleave(tokens, 1)


def teacher_forcing_loss(model: torch.nn.Module, batch, mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The masked flow-matching loss of ``train_ar`` in its autocast (bf16 on CUDA, none on the CPU)."""
    with autocast("auto", device):
        return masked_flow_loss(tf_forward(model, batch, mask), batch)


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor],
                steps: int, device: torch.device, *, grad_clip: float,
                log: Callable[[dict], None] | None = None) -> list[dict]:
    """Run ``steps`` training steps of ``loss_fn()``; one record per step: ``step_s`` (the whole step),
    ``fwd_bwd_s``, ``optim_s`` (clip + optimizer step), ``loss``, ``grad_norm`` and, on CUDA, peak memory
    since the first step (``peak_alloc_gib``, ``peak_reserved_gib``)."""
    out = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(steps):
        sync(device)
        t_step = now()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        sync(device)
        t_fb = now()
        norm = to_local_float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
        optimizer.step()
        sync(device)
        t_end = now()
        rec = {"step": step, "step_s": t_end - t_step, "fwd_bwd_s": t_fb - t_step, "optim_s": t_end - t_fb,
               "loss": loss.item(), "grad_norm": norm, **cuda_peak_gib(device)}
        out.append(rec)
        if log:
            log(rec)
    return out


def summarize_steps(steps: list[dict], state) -> dict:
    """The records of :func:`train_steps` as the slowest rank's (``step_s`` and ``fwd_bwd_s`` maxed over the
    ranks of ``state``, in place), the mean step of all but the first (a warm-up; the only one if alone), each
    rank's peak memory and whether every loss and grad norm is finite."""
    n = len(steps)
    times = rank_max([s["step_s"] for s in steps] + [s["fwd_bwd_s"] for s in steps], state)
    for i, s in enumerate(steps):
        s["step_s"], s["fwd_bwd_s"] = times[i], times[n + i]
    timed = steps[1:] or steps
    mem = ({k: max(s.get(k, 0.0) for s in steps) for k in ("peak_alloc_gib", "peak_reserved_gib")}
           if state.device.type == "cuda" else {})
    return {"steps": steps, "timed_steps": len(timed),
            "step_s": sum(s["step_s"] for s in timed) / len(timed),
            "fwd_bwd_s": sum(s["fwd_bwd_s"] for s in timed) / len(timed),
            "memory_per_rank": rank_gather(mem, state),
            "finite": all(math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"]) for s in steps)}

